"""The CUDA path, on a GPU host (``pytest -m gpu``; skipped where no GPU is visible).

Every published family loads on the GPU and its default precision (float16) and bfloat16 score within 0.01
of float32 on the CPU (``CrossEncoder.predict``), alone and batched; clearly separated documents never swap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.batcher import plan_batches
from app.config import Settings
from app.engine.torch_backend import TorchBackend
from tests.model_factory import FAMILIES, build_cross_encoder, make_words

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOLERANCE = 0.01
QUERY = make_words(10, seed=21)
DOCUMENTS = [make_words(n, seed=100 + n) for n in (3, 20, 60, 120, 250, 400, 700)] + [
    "The giant panda is a bear species endemic to China.",
    "naïve café 東京 🙂 data 12345",
]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-models")
    return {name: build_cross_encoder(root / name, family=name) for name in FAMILIES if name != "generic"}


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
@pytest.mark.parametrize("family", [name for name in FAMILIES if name != "generic"])
def test_cuda_scores_within_tolerance_of_float32(family: str, dtype: str, family_dirs: dict[str, Path]) -> None:
    from sentence_transformers import CrossEncoder

    model_dir = family_dirs[family]
    # CUDA graphs on for the default precision (what serving runs); test_cuda_graphs_... compares them with eager.
    backend = TorchBackend(
        Settings(
            model_path=model_dir,
            device="cuda",
            dtype=dtype,  # type: ignore[arg-type]
            cuda_graphs=dtype == "auto",
        )
    )
    backend.warm_up()
    assert backend.describe()["device"].startswith("cuda")
    assert backend.describe()["dtype"] == ("float16" if dtype == "auto" else "bfloat16")
    reference = np.asarray(
        CrossEncoder(str(model_dir), device="cpu", max_length=512).predict(
            [(QUERY, document) for document in DOCUMENTS]
        ),
        dtype=np.float64,
    )
    pairs = backend.encoder.encode(QUERY, DOCUMENTS).pairs
    batched = 1 / (1 + np.exp(-np.asarray(backend.forward(pairs), dtype=np.float64)))  # one padded batch
    alone = 1 / (1 + np.exp(-np.asarray([backend.forward([pair])[0] for pair in pairs], dtype=np.float64)))
    for scores in (batched, alone):
        assert float(np.abs(scores - reference).max()) <= TOLERANCE
        separated = [
            (i, j)
            for i in range(len(scores))
            for j in range(len(scores))
            if reference[i] - reference[j] > 2 * TOLERANCE
        ]
        assert [(i, j) for i, j in separated if scores[i] <= scores[j]] == []


def test_cuda_health_check_and_describe(family_dirs: dict[str, Path]) -> None:
    backend = TorchBackend(Settings(model_path=family_dirs["bge-reranker-base"], device="auto"))  # type: ignore[arg-type]
    backend.check()
    facts = backend.describe()
    assert (facts["device"], facts["dtype"], facts["weights"]) == ("cuda", "float16", "float16")
    assert facts["architecture"] == "XLMRobertaForSequenceClassification"


def test_cuda_graphs_score_as_the_eager_model(family_dirs: dict[str, Path]) -> None:
    """Batches of every size, padded into captured shapes or too big for one, score as the eager model does."""
    settings = {"model_path": family_dirs["ms-marco-MiniLM-L-6-v2"], "device": "cuda", "dtype": "float32"}
    graphed = TorchBackend(Settings(**settings))  # type: ignore[arg-type]
    graphed.warm_up()
    eager = TorchBackend(Settings(**settings, cuda_graphs=False))  # type: ignore[arg-type]
    eager.warm_up()
    assert graphed.graphs is not None and len(graphed.graphs) > 50
    assert eager.graphs is None
    captured = len(graphed.graphs)

    def spread(count: int, words: int, step: int) -> list[int]:
        return [words + step * n for n in range(count)]

    cases = (  # words per document, and whether the batch runs in a graph
        (spread(1, 5, 7), True),
        (spread(5, 30, 7), True),
        (spread(13, 100, 7), True),
        (spread(50, 60, 7), False),  # 50 pairs of up to ~420 tokens: past the budget, eager
        (spread(64, 300, 7), False),  # 64 x 512
    )
    for word_counts, graph in cases:
        count = len(word_counts)
        documents = [make_words(words, seed=count * 100 + n) for n, words in enumerate(word_counts)]
        pairs = sorted(graphed.encoder.encode(QUERY, documents).pairs, key=len)
        padded = count * max(len(pair) for pair in pairs)
        assert (graphed.graphs.shape_for(count, len(pairs[-1])) is not None) == graph, (count, padded)
        np.testing.assert_allclose(graphed.forward(pairs), eager.forward(pairs), atol=1e-4)
    # Full batches, as the batcher cuts 64 documents of ~256 tokens by their buckets: graphs, the eager scores.
    documents = [make_words(236 + n % 9, seed=n) for n in range(64)]
    pairs = sorted(graphed.encoder.encode(QUERY, documents).pairs, key=len)
    batches = plan_batches(
        [len(pair) for pair in pairs], max_batch_tokens=16384, max_batch_pairs=256, batch_tokens=graphed.batch_tokens
    )
    assert len(batches[0]) >= 48, [len(batch) for batch in batches]
    for batch in batches:
        chosen = [pairs[position] for position in batch]
        assert graphed.graphs.shape_for(len(chosen), max(len(pair) for pair in chosen)) is not None
        np.testing.assert_allclose(graphed.forward(chosen), eager.forward(chosen), atol=1e-4)
    assert len(graphed.graphs) == captured  # serving captures nothing new: warm-up covered every shape


@pytest.mark.parametrize("family", ["bge-reranker-base", "ms-marco-MiniLM-L-6-v2"])
def test_packed_batches_score_as_the_padded_model(family: str, family_dirs: dict[str, Path]) -> None:
    """float16 on CUDA runs packed (FlashAttention varlen, graphs over (pairs, tokens) buckets): every batch the
    batcher plans, from one short pair to 64 documents of ~256 tokens and pairs of the full length, scores as the
    padded eager model does, to float16's rounding."""
    settings = {"model_path": family_dirs[family], "device": "cuda"}
    packed = TorchBackend(Settings(**settings))  # type: ignore[arg-type]
    packed.warm_up()
    padded = TorchBackend(Settings(**settings, cuda_graphs=False))  # type: ignore[arg-type]
    padded.warm_up()
    assert packed.describe()["packed_batches"] == "true", packed.describe()
    assert packed.packed_graphs is not None and packed.graphs is None
    assert padded.describe()["packed_batches"] == "false"
    captured = len(packed.packed_graphs)
    rounds = [
        [5],
        [3, 40, 9, 120],
        [236 + n % 9 for n in range(64)],
        [60 + 7 * n for n in range(50)],  # up to ~400 words: truncated to the model's 512 tokens
        [700] * 40,
    ]
    for number, words in enumerate(rounds):
        documents = [make_words(count, seed=1000 * number + n) for n, count in enumerate(words)]
        pairs = packed.encoder.encode(QUERY, documents).pairs
        lengths = [len(pair) for pair in pairs]
        for batch in plan_batches(
            lengths, max_batch_tokens=16384, max_batch_pairs=256, batch_tokens=packed.batch_tokens
        ):
            chosen = [pairs[position] for position in sorted(batch)]
            assert packed.packed_graphs.bucket(len(chosen), sum(map(len, chosen)), max(map(len, chosen))) is not None
            scores, reference = np.array(packed.forward(chosen)), np.array(padded.forward(chosen))
            assert float(np.abs(scores - reference).max()) <= 0.02 * max(1.0, float(np.abs(reference).max()))
    assert len(packed.packed_graphs) == captured


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
@pytest.mark.parametrize("family", ["qwen3-reranker", "bge-reranker-v2-gemma", "mxbai-rerank-base-v2"])
def test_llm_rerankers_on_cuda_within_tolerance_of_float32(family: str, dtype: str, tmp_path: Path) -> None:
    """LLM rerankers on the GPU (float16 with CUDA graphs of padded batches, or bfloat16 under autocast) against
    the service's own float32 scores on the CPU, which tests/test_llm_rerankers.py ties to the authors' code."""
    from tests.llm_factory import build_llm_reranker

    model_dir = build_llm_reranker(tmp_path / family, family=family)
    cpu = TorchBackend(Settings(model_path=model_dir, device="cpu", dtype="float32", torch_compile="off"))  # type: ignore[arg-type]
    pairs = cpu.encoder.encode(QUERY, DOCUMENTS).pairs
    reference = 1 / (1 + np.exp(-np.asarray(cpu.forward(pairs), dtype=np.float64)))
    backend = TorchBackend(
        Settings(model_path=model_dir, device="cuda", dtype=dtype, cuda_graphs=dtype == "auto")  # type: ignore[arg-type]
    )
    backend.warm_up()
    facts = backend.describe()
    assert facts["device"].startswith("cuda") and facts["recipe"] != "cross-encoder"
    if dtype == "auto":
        assert int(facts["cuda_graphs"]) > 0, "padded CUDA graphs of the decoder were not captured"
    batched = 1 / (1 + np.exp(-np.asarray(backend.forward(sorted(pairs, key=len)), dtype=np.float64)))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
    batched = batched[np.argsort(order)]
    alone = 1 / (1 + np.exp(-np.asarray([backend.forward([pair])[0] for pair in pairs], dtype=np.float64)))
    for scores in (batched, alone):
        assert float(np.abs(scores - reference).max()) <= TOLERANCE


def test_memory_estimate_of_two_models_on_the_gpu(family_dirs: dict[str, Path]) -> None:
    """The engine's check on a GPU: fp16 weights (2 bytes a parameter), the GPU's free memory as the budget, and
    a budget too small refused with one line naming both models."""
    from app.engine.memory import MemoryRefusal, check_models_fit, count_parameters

    models = f"xlmr={family_dirs['bge-reranker-base']},bert={family_dirs['ms-marco-MiniLM-L-6-v2']}"
    needs = check_models_fit(Settings(models=models, device="cuda"), where="engine")
    assert [need.name for need in needs] == ["xlmr", "bert"]
    for need in needs:
        assert need.weight_bytes == 2 * count_parameters(need.path)
    with pytest.raises(MemoryRefusal, match=r"do not fit on the cuda .*xlmr .*bert "):
        check_models_fit(Settings(models=models, device="cuda", memory_limit_mb=1), where="engine")
