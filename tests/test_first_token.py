"""The last layer computed for the first token only (app/engine/first_token.py) changes no score.

Checked against transformers' own, unmodified model on the tiny cross-encoder: exact in float32, within
half-precision rounding in float16, compiled under bf16 autocast within the service's 0.01 tolerance; and a
model whose head reads more than the first token is detected on load and keeps its whole last layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.config import Settings
from app.engine.first_token import FirstTokenLastLayer
from app.engine.torch_backend import TorchBackend
from tests.model_factory import make_words

QUERY = "kalo mine ruvo"


def documents() -> list[str]:
    """Lengths from one word to past the 512-token window, so batches are padded and one pair is truncated."""
    return [make_words(n, seed=n) for n in (1, 7, 40, 120, 300, 700)]


def backend_for(model_dir: Path, **overrides: Any) -> TorchBackend:
    return TorchBackend(Settings(model_path=model_dir, torch_threads=1, **overrides))


def reference_logits(model_dir: Path, backend: TorchBackend) -> np.ndarray:
    """transformers' unmodified model in float32 on the backend's own token ids, one pair at a time."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    logits = []
    with torch.inference_mode():
        for pair in backend.encoder.encode(QUERY, documents()).pairs:
            logits.append(float(model(input_ids=torch.tensor([pair.input_ids])).logits[0, 0]))
    return np.array(logits)


def last_layer(backend: TorchBackend) -> torch.nn.Module:
    return backend.model.base_model.encoder.layer[-1]  # type: ignore[no-any-return]


def test_float32_scores_equal_the_whole_model(tiny_model_dir: Path) -> None:
    backend = backend_for(tiny_model_dir, dtype="float32", torch_compile="off")
    assert backend.describe()["first_token_last_layer"] == "true"
    assert isinstance(last_layer(backend), FirstTokenLastLayer)
    pairs = backend.encoder.encode(QUERY, documents()).pairs
    reference = reference_logits(tiny_model_dir, backend)
    np.testing.assert_allclose(backend.forward(pairs), reference, atol=1e-5)  # padded, in one batch
    np.testing.assert_allclose([backend.forward([pair])[0] for pair in pairs], reference, atol=1e-5)


def test_float16_weights_score_within_rounding(tiny_model_dir: Path) -> None:
    # The CUDA default (float16 weights, no autocast), run on the CPU.
    backend = backend_for(tiny_model_dir, dtype="float16", torch_compile="off")
    assert (backend.describe()["weights"], backend.describe()["first_token_last_layer"]) == ("float16", "true")
    pairs = backend.encoder.encode(QUERY, documents()).pairs
    reference = reference_logits(tiny_model_dir, backend)
    assert np.abs(np.array(backend.forward(pairs)) - reference).max() < 0.05 * max(1.0, np.abs(reference).max())


def test_compiled_bf16_path_keeps_it_and_stays_within_tolerance(tiny_model_dir: Path) -> None:
    backend = backend_for(tiny_model_dir, dtype="bfloat16", torch_compile="on")
    backend.warm_up()
    facts = backend.describe()
    assert (facts["compiled"], facts["first_token_last_layer"]) == ("true", "true")
    pairs = backend.encoder.encode(QUERY, documents()).pairs
    reference = 1 / (1 + np.exp(-reference_logits(tiny_model_dir, backend)))
    for got in (backend.forward(pairs), [backend.forward([pair])[0] for pair in pairs]):
        scores = 1 / (1 + np.exp(-np.array(got)))
        assert np.abs(scores - reference).max() <= 0.01


def test_a_head_reading_every_token_keeps_the_whole_last_layer(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose head pools all tokens (not XLM-R's, but other cross-encoders' heads do) must not be pruned."""
    from transformers.models.xlm_roberta import modeling_xlm_roberta

    head = modeling_xlm_roberta.XLMRobertaClassificationHead

    def mean_pooling_head(self: Any, features: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(features.mean(dim=1))))  # type: ignore[no-any-return]

    monkeypatch.setattr(head, "forward", mean_pooling_head)
    backend = backend_for(tiny_model_dir, dtype="float32", torch_compile="off")
    assert backend.describe()["first_token_last_layer"] == "false"
    assert not isinstance(last_layer(backend), FirstTokenLastLayer)
    pairs = backend.encoder.encode(QUERY, documents()).pairs
    np.testing.assert_allclose(
        [backend.forward([pair])[0] for pair in pairs], reference_logits(tiny_model_dir, backend), atol=1e-5
    )


def test_the_benchmark_counts_the_flops_the_service_runs(tiny_model_dir: Path) -> None:
    """bench/flops.py's analytic count (which the README's % of peak rests on) equals what torch counts."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from bench.flops import ModelShape, pair_flops

    def attention_flops(query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
        return sdpa_flop_count(query, key, value)  # type: ignore[no-any-return]

    # torch counts SDPA's CUDA kernels but not its CPU one: the same formula, given here.
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    backend = backend_for(tiny_model_dir, dtype="float32", torch_compile="off")
    shape = ModelShape.from_model_dir(tiny_model_dir)
    for words in (3, 50, 400):
        pair = backend.encoder.encode(QUERY, [make_words(words, seed=words)]).pairs
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            backend.forward(pair)
        assert counter.get_total_flops() == pair_flops(len(pair[0]), shape)
