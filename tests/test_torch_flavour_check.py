"""docker/check_torch_flavour.py, the build's guard that the image's torch is the TORCH_FLAVOUR asked for.

Runs without Docker against a stand-in ``torch`` module, so both refusals are covered here, including the one
(a CUDA torch in the CPU image) that a Docker test could only show by downloading ~3 GB. tests/e2e/
test_torch_flavour.py checks the same guard inside a real build.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docker" / "check_torch_flavour.py"


def load_check() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("check_torch_flavour", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_torch(version: str, cuda: str | None) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.__version__ = version  # type: ignore[attr-defined]
    torch.version = types.SimpleNamespace(cuda=cuda)  # type: ignore[attr-defined]
    return torch


@pytest.mark.parametrize(
    ("flavour", "version", "cuda"),
    [("cuda", "2.13.0", "13.0"), ("cuda", "2.13.0+cu126", "12.6"), ("cpu", "2.13.0+cpu", None)],
)
def test_matching_torch_passes_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flavour: str, version: str, cuda: str | None
) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(version, cuda))
    assert load_check().main(["check_torch_flavour.py", flavour]) == 0
    out, err = capsys.readouterr()
    assert out == f"torch {version}, torch.version.cuda {cuda}: fits TORCH_FLAVOUR={flavour}\n"
    assert err == ""


@pytest.mark.parametrize(
    ("flavour", "version", "cuda", "expected"),
    [
        ("cuda", "2.13.0+cpu", None, "ERROR: TORCH_FLAVOUR=cuda but torch 2.13.0+cpu is a CPU build"),
        ("cpu", "2.13.0", "13.0", "ERROR: TORCH_FLAVOUR=cpu but torch 2.13.0 is a CUDA 13.0 build"),
    ],
)
def test_contradicting_torch_fails_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flavour: str,
    version: str,
    cuda: str | None,
    expected: str,
) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(version, cuda))
    assert load_check().main(["check_torch_flavour.py", flavour]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(expected)
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv", [[], ["gpu"], ["cuda", "cpu"]])
def test_unknown_flavour_is_refused_before_torch_is_imported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # an import would raise
    assert load_check().main(["check_torch_flavour.py", *argv]) == 1
    assert "usage:" in capsys.readouterr().err
