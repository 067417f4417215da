"""The rerankers users download: every published family loads and scores exactly as ``CrossEncoder.predict``.

Each fixture directory is laid out as the published model is (tests/model_factory.py: tokenizer class, special
tokens, TemplateProcessing post-processor, tokenizer files, config fields, safetensors), with a vocabulary
trained on the spot and random weights, and goes through the production loader. Before this, the service
learnt its pair layout from the post-processor's ``sequence_ids``, which a ``TemplateProcessing`` (every
published XLM-R and BERT reranker, once transformers 5 loads it) leaves empty for the first text: the
published bge-reranker-base did not start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.config import Device, Settings
from app.engine.base import PairTemplate
from app.engine.model_dir import ModelLoadError, inspect_model_dir, load_tokenizer, open_model_dir, verify_pairs
from app.engine.torch_backend import TorchBackend, resolve_device
from app.service import RerankService
from tests.model_factory import FAMILIES, build_cross_encoder, make_words
from tests.utils import REPO_ROOT, start_server

PUBLISHED = [name for name in FAMILIES if name != "generic"]
# Where RERANKER_DEVICE=auto puts the model on this host (the service's own rule): the suite runs on GPU hosts too.
AUTO_DEVICE = str(resolve_device(Device.auto))
# What each family's directory must give (published facts, not what the loader happens to do).
EXPECTED = {
    "bge-reranker-base": ("XLMRobertaForSequenceClassification", 512, False),
    "bge-reranker-large": ("XLMRobertaForSequenceClassification", 512, False),
    "bge-reranker-v2-m3": ("XLMRobertaForSequenceClassification", 8192, False),
    "ms-marco-MiniLM-L-6-v2": ("BertForSequenceClassification", 512, True),
    "ms-marco-TinyBERT-L-2-v2": ("BertForSequenceClassification", 512, True),
    "ms-marco-electra-base": ("ElectraForSequenceClassification", 512, True),
    "mxbai-rerank-base-v1": ("DebertaV2ForSequenceClassification", 512, True),
    "gte-reranker-modernbert-base": ("ModernBertForSequenceClassification", 8192, False),
}
QUERY = "What is a panda?"
DOCUMENTS = [
    "The giant panda is a bear species endemic to China.",
    "hi",
    make_words(40, seed=3),
    "naïve café 東京 🙂 data 12345",
    "What's the weather? Is it sunny today?",
    make_words(150, seed=4),
]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    return {name: build_cross_encoder(root / name, family=name) for name in PUBLISHED}


def float32_settings(model_dir: Path, **overrides: Any) -> Settings:
    return Settings(model_path=model_dir, dtype="float32", torch_compile="off", torch_threads=1, **overrides)


def cross_encoder_scores(model_dir: Path, pairs: list[tuple[str, str]], max_length: int | None = None) -> np.ndarray:
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(model_dir), local_files_only=True, device="cpu", max_length=max_length)
    return np.asarray(reference.predict(pairs), dtype=np.float64)


def sigmoid(logits: list[float]) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))


@pytest.mark.parametrize("family", PUBLISHED)
def test_family_loads_and_scores_like_cross_encoder(family: str, family_dirs: dict[str, Path]) -> None:
    model_dir = family_dirs[family]
    backend = TorchBackend(float32_settings(model_dir))
    architecture, max_length, type_ids = EXPECTED[family]
    facts = backend.describe()
    expected_facts = (architecture, "1", str(min(max_length, 512)))  # RERANKER_MAX_LENGTH's default caps at 512
    assert (facts["architecture"], facts["num_labels"], facts["max_length"]) == expected_facts
    assert backend.uses_type_ids is type_ids
    reference = cross_encoder_scores(model_dir, [(QUERY, document) for document in DOCUMENTS])
    assert np.ptp(reference) > 0.01, "the fixture's scores must differ for the comparison to mean anything"
    # alone: one document per forward pass
    alone = [backend.forward(backend.encoder.encode(QUERY, [document]).pairs)[0] for document in DOCUMENTS]
    np.testing.assert_allclose(sigmoid(alone), reference, atol=2e-5)
    # every pair is the tokenizer's own pair encoding, type ids included where the model reads them
    tokenizer = load_tokenizer(model_dir)
    for document, pair in zip(DOCUMENTS, backend.encoder.encode(QUERY, DOCUMENTS).pairs, strict=True):
        encoded = tokenizer(QUERY, document, return_token_type_ids=True)
        assert pair.input_ids == encoded["input_ids"]
        if type_ids:
            assert pair.type_ids == encoded["token_type_ids"]


@pytest.mark.parametrize("family", PUBLISHED)
async def test_family_scores_the_same_batched_with_other_requests(family: str, family_dirs: dict[str, Path]) -> None:
    model_dir = family_dirs[family]
    settings = float32_settings(model_dir, max_batch_tokens=2048, max_batch_pairs=16)
    service = RerankService(settings, lambda: TorchBackend(settings))
    await service.start()
    try:
        requests = [
            (f"{QUERY} {make_words(n, seed=n)}", [*DOCUMENTS[n % 3 :], make_words(5 + 9 * n, seed=n)]) for n in range(6)
        ]
        outcomes = await asyncio.gather(*(service.rerank(query, documents) for query, documents in requests))
    finally:
        await service.stop()
    for (query, documents), outcome in zip(requests, outcomes, strict=True):
        reference = cross_encoder_scores(model_dir, [(query, document) for document in documents])
        np.testing.assert_allclose([d.relevance_score for d in outcome.documents], reference, atol=2e-5)


@pytest.mark.parametrize("family", ["bge-reranker-base", "ms-marco-MiniLM-L-6-v2", "mxbai-rerank-base-v1"])
def test_truncation_cuts_the_document_first(family: str, family_dirs: dict[str, Path]) -> None:
    """A pair past max_length keeps the whole query and the document's start, and scores as exactly those
    tokens do in transformers' own model (CrossEncoder would cut the longer text instead: our documented rule)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model_dir = family_dirs[family]
    backend = TorchBackend(float32_settings(model_dir, max_length=64))
    tokenizer = load_tokenizer(model_dir)
    query, document = make_words(12, seed=5), make_words(300, seed=6)
    pair = backend.encoder.encode(query, [document]).pairs[0]
    template = backend.encoder.template
    query_ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    document_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    room = 64 - template.special_count - len(query_ids)
    assert pair.input_ids == template.build(query_ids, document_ids[:room]).input_ids
    assert len(pair) == 64
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    inputs = {"input_ids": torch.tensor([pair.input_ids])}
    if backend.uses_type_ids:
        inputs["token_type_ids"] = torch.tensor([pair.type_ids])
    with torch.inference_mode():
        expected = float(model(**inputs).logits[0, 0])
    assert backend.forward([pair])[0] == pytest.approx(expected, abs=1e-4)


def test_v2_m3_scores_pairs_longer_than_512_tokens_when_allowed(family_dirs: dict[str, Path]) -> None:
    model_dir = family_dirs["bge-reranker-v2-m3"]
    backend = TorchBackend(float32_settings(model_dir, max_length=2048))
    assert backend.encoder.max_length == 2048
    document = make_words(1200, seed=8)
    pair = backend.encoder.encode(QUERY, [document]).pairs[0]
    assert 1000 < len(pair) <= 2048  # whole, not cut at 512
    reference = cross_encoder_scores(model_dir, [(QUERY, document)], max_length=2048)
    np.testing.assert_allclose(sigmoid(backend.forward([pair])), reference, atol=2e-5)
    # bge-reranker-base has 514 positions: the same setting is capped at 512, not an index error
    base = TorchBackend(float32_settings(family_dirs["bge-reranker-base"], max_length=2048))
    assert base.encoder.max_length == 512


@pytest.mark.server
@pytest.mark.parametrize("family", PUBLISHED)
def test_family_over_http_from_python_m_app(family: str, family_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = family_dirs[family]
    server = start_server(model_dir, tmp_path, workers=1, RERANKER_DTYPE="float32", RERANKER_TORCH_COMPILE="off")
    try:
        with server.client() as client:
            answer = client.post("/v1/rerank", json={"model": "m", "query": QUERY, "documents": DOCUMENTS})
            assert answer.status_code == 200, answer.text
            models = client.get("/v1/models").json()["data"][0]
    finally:
        assert server.stop() == 0
    scores = {result["index"]: result["relevance_score"] for result in answer.json()["results"]}
    reference = cross_encoder_scores(model_dir, [(QUERY, document) for document in DOCUMENTS])
    np.testing.assert_allclose([scores[i] for i in range(len(DOCUMENTS))], reference, atol=2e-5)
    architecture, _, _ = EXPECTED[family]
    assert models["architecture"] == architecture
    assert (models["num_labels"], models["dtype"], models["device"]) == (1, "float32", AUTO_DEVICE)
    assert models["max_model_len"] == 512
    # the start-up log says what was loaded
    assert architecture in server.log() and "max length 512" in server.log()


# --- refusals: one line naming the path, why, and what is supported -----------------------------------------


def edited_copy(source: Path, target: Path, **config_changes: Any) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_remote_code_model_is_refused(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = edited_copy(
        family_dirs["bge-reranker-base"],
        tmp_path / "remote",
        architectures=["NewForSequenceClassification"],
        auto_map={"AutoModelForSequenceClassification": "modeling.NewForSequenceClassification"},
    )
    with pytest.raises(ModelLoadError) as refused:
        inspect_model_dir(model_dir)
    message = str(refused.value)
    assert "\n" not in message
    assert str(model_dir) in message and "remote code" in message and "XLM-RoBERTa" in message


def test_embedding_model_is_refused(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = edited_copy(family_dirs["bge-reranker-base"], tmp_path / "embedder", architectures=["XLMRobertaModel"])
    with pytest.raises(ModelLoadError, match=f"{model_dir} is XLMRobertaModel, not a sequence classifier.*supported"):
        inspect_model_dir(model_dir)


def test_unknown_architecture_is_refused(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = edited_copy(
        family_dirs["bge-reranker-base"],
        tmp_path / "unknown",
        architectures=["FancyForSequenceClassification"],
        model_type="fancy",
    )
    with pytest.raises(ModelLoadError, match=f"{model_dir} is FancyForSequenceClassification .* does not implement"):
        inspect_model_dir(model_dir)


def test_self_check_refuses_a_template_that_is_not_the_tokenizers(family_dirs: dict[str, Path]) -> None:
    model_dir = family_dirs["ms-marco-MiniLM-L-6-v2"]
    encoder, info, tokenizer = open_model_dir(model_dir, max_length=512, max_query_share=0.5)
    verify_pairs(encoder, tokenizer, model_dir, uses_type_ids=True)  # the learnt template passes
    right = encoder.template
    # XLM-R's layout (a doubled separator) around BERT's ids: the ids differ
    encoder.template = PairTemplate(prefix=right.prefix, middle=right.middle * 2, suffix=right.suffix)
    with pytest.raises(ModelLoadError, match=f"the tokenizer in {model_dir} pairs texts differently"):
        verify_pairs(encoder, tokenizer, model_dir, uses_type_ids=True)
    # the same ids with every type id 0: BERT reads type ids, so this is refused too
    encoder.template = PairTemplate(prefix=right.prefix, middle=right.middle, suffix=right.suffix)
    with pytest.raises(ModelLoadError, match="type ids the service does not reproduce"):
        verify_pairs(encoder, tokenizer, model_dir, uses_type_ids=True)
    assert info.uses_type_ids


def test_learnt_templates_are_the_published_layouts(family_dirs: dict[str, Path]) -> None:
    def layout(family: str) -> tuple[list[str], list[str], list[str], tuple[int, ...]]:
        encoder, _, tokenizer = open_model_dir(family_dirs[family], max_length=512, max_query_share=0.5)
        t = encoder.template
        pair = t.build([10], [11])
        return (
            tokenizer.convert_ids_to_tokens(list(t.prefix)),
            tokenizer.convert_ids_to_tokens(list(t.middle)),
            tokenizer.convert_ids_to_tokens(list(t.suffix)),
            tuple(pair.type_ids),
        )

    assert layout("bge-reranker-base") == (["<s>"], ["</s>", "</s>"], ["</s>"], (0, 0, 0, 0, 0, 0))
    assert layout("ms-marco-MiniLM-L-6-v2") == (["[CLS]"], ["[SEP]"], ["[SEP]"], (0, 0, 0, 1, 1))
    assert layout("mxbai-rerank-base-v1") == (["[CLS]"], ["[SEP]"], ["[SEP]"], (0, 0, 0, 1, 1))


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory another uid can traverse (pytest's own tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="reranker-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the check as another uid")
def test_unreadable_weights_say_permission_denied_and_the_uid(
    family_dirs: dict[str, Path], world_readable_dir: Path
) -> None:
    model_dir = world_readable_dir / "model"
    shutil.copytree(family_dirs["ms-marco-TinyBERT-L-2-v2"], model_dir)
    model_dir.chmod(0o755)
    for path in model_dir.iterdir():
        path.chmod(0o644)
    (model_dir / "model.safetensors").chmod(0o600)  # owned by root, as after a download with umask 077
    failed = run_as_nobody(f"from app.engine.model_dir import check_files; check_files(Path({str(model_dir)!r}))")
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]
    assert "permission denied reading model.safetensors" in last and "as uid 65534" in last, failed.stderr
    assert "mode 0600" in last and "chmod" in last
    # the settings' cheap check (what readiness re-runs) says the same
    problem = run_as_nobody(
        f"from app.config import model_dir_problem; print(model_dir_problem(Path({str(model_dir)!r})))"
    ).stdout
    assert "permission denied reading model.safetensors" in problem and "as uid 65534" in problem, problem


def run_as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as uid 65534: imports first, as root (the interpreter and its library may live under
    /root), then the uid drops and the statement after the last ``;`` runs."""
    *imports, statement = code.split("; ")
    prelude = "; ".join(["import os", "from pathlib import Path", *imports, "os.setgid(65534)", "os.setuid(65534)"])
    return subprocess.run(
        [sys.executable, "-c", f"{prelude}; {statement}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def test_load_log_names_what_was_loaded(family_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.engine.torch_backend"):
        TorchBackend(float32_settings(family_dirs["ms-marco-electra-base"]))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    assert "ElectraForSequenceClassification" in line and "labels 1" in line and "max length 512" in line
    assert f"on {AUTO_DEVICE}" in line and "float32" in line
