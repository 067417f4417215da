"""How many CPUs this process may really use: what sizes HTTP workers, encode threads and torch's threads.

``os.sched_getaffinity`` sees the CPUs a container may run on, not its CPU quota: under ``docker run --cpus 4``
(compose's ``cpus:``) on a 64-core host it still says 64, and sizing threads and workers by it runs 64 threads
on 4 CPUs' worth of time. So the quota of this process's cgroup and of every cgroup above it (v2 ``cpu.max``,
v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded up, caps the affinity.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _quota_cpus(quota: str, period: str) -> float | None:
    """CPUs a quota allows (None: no limit)."""
    if quota in ("max", "-1"):
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and cgroup v1 ``cpu`` controller path, from ``/proc/self/cgroup``."""
    unified = cpu = None
    for line in proc_cgroup.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            unified = path
        elif "cpu" in controllers.split(","):
            cpu = path
    return unified, cpu


def _limits_up_the_tree(start: Path, top: Path, read: str | tuple[str, str]) -> list[float]:
    """The CPU limits set on ``start`` and every directory above it up to ``top``."""
    limits = []
    directory = start
    while True:
        try:
            if isinstance(read, str):
                fields = (directory / read).read_text().split()
                allowed = _quota_cpus(fields[0], fields[1]) if len(fields) >= 2 else None
            else:
                allowed = _quota_cpus(
                    (directory / read[0]).read_text().strip(), (directory / read[1]).read_text().strip()
                )
        except OSError:
            allowed = None
        if allowed is not None:
            limits.append(allowed)
        if directory == top or top not in directory.parents:
            return limits
        directory = directory.parent


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, in CPUs (None: none set)."""
    try:
        unified, cpu = _cgroup_paths(proc_cgroup.read_text())
    except OSError:
        return None
    limits: list[float] = []
    if unified is not None:
        top = root / "unified" if (root / "unified").is_dir() else root  # hybrid hierarchies mount v2 there
        limits += _limits_up_the_tree(top / unified.lstrip("/"), top, "cpu.max")
    if cpu is not None:
        top = root / "cpu" if (root / "cpu").is_dir() else root / "cpu,cpuacct"
        limits += _limits_up_the_tree(top / cpu.lstrip("/"), top, ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    return min(limits) if limits else None


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by its cgroups' CPU quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    return cpus if limit is None else max(1, min(cpus, math.ceil(limit)))
