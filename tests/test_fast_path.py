"""The CPU fast path's moving parts: slicing batches on a token budget, and compiling with a safe fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from app.config import Settings
from app.engine.torch_backend import ModelLoadError, TorchBackend, slices
from tests.model_factory import make_words


class TestSlices:
    def test_consecutive_runs_within_the_padded_budget(self) -> None:
        lengths = [10, 10, 20, 20, 30, 50, 50, 100]
        runs = list(slices(lengths, 60))
        assert runs == [(0, 3), (3, 5), (5, 6), (6, 7), (7, 8)]
        assert all((stop - start) * max(lengths[start:stop]) <= 60 for start, stop in runs if stop - start > 1)

    def test_a_pair_longer_than_the_budget_runs_alone(self) -> None:
        assert list(slices([5, 500, 5], 100)) == [(0, 1), (1, 2), (2, 3)]

    def test_no_budget_is_one_run_and_no_pairs_none(self) -> None:
        assert list(slices([3, 1, 2], None)) == [(0, 3)]
        assert list(slices([], 100)) == []


def failing_compile(*_: Any, **__: Any) -> Any:
    def run(**___: Any) -> Any:
        raise RuntimeError("no C++ compiler found")

    return run


def bf16_settings(model_dir: Path, compile_mode: str) -> Settings:
    return Settings(model_path=model_dir, dtype="bfloat16", torch_compile=compile_mode, torch_threads=1)  # type: ignore[arg-type]


def test_auto_falls_back_to_eager_when_compiling_fails(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", failing_compile)
    backend = TorchBackend(bf16_settings(tiny_model_dir, "auto"))
    backend.warm_up()
    assert (backend.describe()["compiled"], backend.describe()["attention"]) == ("false", "sdpa")
    eager = TorchBackend(bf16_settings(tiny_model_dir, "off"))
    pairs = backend.encoder.encode("kalo mine", [make_words(n, seed=n) for n in (3, 40, 300)]).pairs
    assert backend.forward(pairs) == eager.forward(pairs)


def test_on_refuses_to_start_when_compiling_fails(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", failing_compile)
    backend = TorchBackend(bf16_settings(tiny_model_dir, "on"))
    with pytest.raises(ModelLoadError, match=r"torch.compile failed.*no C\+\+ compiler"):
        backend.warm_up()


def test_cpu_bf16_keeps_float32_weights_and_head(tiny_model_dir: Path) -> None:
    backend = TorchBackend(bf16_settings(tiny_model_dir, "off"))
    facts = backend.describe()
    assert (facts["dtype"], facts["weights"]) == ("bfloat16", "float32")
    assert all(p.dtype == torch.float32 for p in backend.model.parameters())
    pair = backend.encoder.encode("kalo", ["mine ruvo"]).pairs
    logit = backend.forward(pair)[0]
    # A bf16 head would round the logit to 8 significant bits; the float32 head does not.
    assert float(torch.tensor(logit).to(torch.bfloat16).float()) != logit or logit == 0
