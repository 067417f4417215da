"""The CPUs the service sizes itself by: the affinity, capped by a CPU quota set on the container's cgroup or any
above it (``docker run --cpus``), read from cgroup trees laid out as the kernel mounts them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import cpus
from app.cpus import cgroup_cpu_limit, usable_cpus


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_container(tmp_path: Path) -> None:
    # docker run --cpus 2.5 with a cgroup namespace: the container sees its own cgroup as "/".
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "fs" / "cpu.max", "250000 100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "proc") == 2.5


def test_the_tightest_quota_up_the_v2_tree_wins(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/system.slice/docker-abc.scope\n")
    write(tmp_path / "fs" / "system.slice" / "docker-abc.scope" / "cpu.max", "max 100000\n")
    write(tmp_path / "fs" / "system.slice" / "cpu.max", "400000 100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "proc") == 4.0


def test_no_quota_is_no_limit(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/user.slice\n")
    write(tmp_path / "fs" / "user.slice" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "proc") is None
    # No cgroup files at all (a root cgroup has no cpu.max; /proc may be missing): no limit either.
    assert cgroup_cpu_limit(tmp_path / "nowhere", tmp_path / "proc") is None
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "no-proc") is None


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    write(tmp_path / "proc", "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    base = tmp_path / "fs" / "cpu,cpuacct" / "docker" / "abc"
    write(base / "cpu.cfs_quota_us", "150000\n")
    write(base / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "proc") == 1.5
    write(base / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "proc") is None


def test_usable_cpus_caps_the_affinity_by_the_quota_rounded_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 2.5)
    assert usable_cpus() == 3
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 0.2)
    assert usable_cpus() == 1
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    assert usable_cpus() == 64
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 8.0)
    assert usable_cpus() == 2  # a quota never adds CPUs the process may not run on


def test_this_machine_reads_without_error() -> None:
    limit = cgroup_cpu_limit()
    assert limit is None or limit > 0
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
