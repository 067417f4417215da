"""LLM rerankers score exactly as their authors' own code does, or are refused.

Fixtures are laid out as the published directories are (tests/llm_factory.py: Qwen3-Reranker's Qwen2 tokenizer
with its chat special tokens and "yes"/"no" tokens, config fields, model card; its ``*-seq-cls`` conversion;
bge-reranker-v2-gemma's Gemma tokenizer; a Qwen3 chat LLM), with a trained-on-the-spot vocabulary and random
weights. The references (tests/llm_reference.py) are the model card's transformers code for Qwen3-Reranker and
FlagEmbedding's ``get_inputs`` for the Gemma reranker, computed in float32 by transformers' own causal LM.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.config import Settings
from app.engine.last_token import MIN_SHARED_PREFIX, common_prefix
from app.engine.model_dir import ModelLoadError, inspect_model_dir, open_model_dir
from app.engine.recipes import Qwen3Reranker
from app.engine.torch_backend import TorchBackend
from app.service import RerankService
from tests.llm_factory import build_llm_reranker, build_qwen3_pair
from tests.llm_reference import (
    gemma_flag_input_ids,
    gemma_flag_scores,
    mxbai_v2_input_ids,
    mxbai_v2_scores,
    qwen3_card_input_ids,
    qwen3_card_scores,
    qwen3_seqcls_scores,
)
from tests.model_factory import make_words
from tests.utils import REPO_ROOT, start_server

QUERY = "What is a panda?"
DOCUMENTS = [
    "The giant panda is a bear species endemic to China.",
    "hi",
    make_words(40, seed=3),
    "1999: yes, no (and 12,345 more)...",
    "\n\nnaïve café 東京 🙂 data",
    make_words(120, seed=4),
]
INSTRUCTION = "Judge whether the passage is about an animal"
TOLERANCE = 1e-4  # float32 against float32; the padding and the head row's product differ by rounding only


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    causal, seq_cls = build_qwen3_pair(root, seed=0)
    return {
        "qwen3-reranker": causal,
        "qwen3-reranker-seq-cls": seq_cls,
        "qwen3-chat": build_llm_reranker(root / "Qwen3-0.6B", family="qwen3-chat"),
        "bge-reranker-v2-gemma": build_llm_reranker(root / "bge-reranker-v2-gemma", family="bge-reranker-v2-gemma"),
        # named as the hub names it: the fixture carries no model card (see tests/llm_factory.py)
        "mxbai-rerank-base-v2": build_llm_reranker(root / "mxbai-rerank-base-v2", family="mxbai-rerank-base-v2"),
    }


def float32_settings(model_dir: Path, **overrides: Any) -> Settings:
    return Settings(model_path=model_dir, dtype="float32", torch_compile="off", torch_threads=1, **overrides)


def sigmoid(logits: Any) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))


def pairs_of(query: str, documents: list[str]) -> list[tuple[str, str]]:
    return [(query, document) for document in documents]


# --- Qwen3-Reranker ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_qwen3_reranker_scores_as_its_model_card(llm_dirs: dict[str, Path], instruction: str | None) -> None:
    model_dir = llm_dirs["qwen3-reranker"]
    backend = TorchBackend(float32_settings(model_dir))
    facts = backend.describe()
    assert (facts["architecture"], facts["recipe"], facts["num_labels"]) == ("Qwen3ForCausalLM", "qwen3-reranker", "1")
    probabilities, raw = qwen3_card_scores(model_dir, pairs_of(QUERY, DOCUMENTS), instruction=instruction)
    assert np.ptp(raw) > 0.5, "the fixture's scores must differ for the comparison to mean anything"
    request = backend.encoder.encode(QUERY, DOCUMENTS, instruction=instruction)
    # every pair is the card's own construction, token for token
    for document, pair in zip(DOCUMENTS, request.pairs, strict=True):
        assert list(pair.input_ids) == qwen3_card_input_ids(model_dir, QUERY, document, instruction=instruction)
    batched = backend.forward(request.pairs)  # right-padded together
    alone = [backend.forward([pair])[0] for pair in request.pairs]
    np.testing.assert_allclose(batched, raw, atol=TOLERANCE)
    np.testing.assert_allclose(alone, raw, atol=TOLERANCE)
    np.testing.assert_allclose(sigmoid(batched), probabilities, atol=TOLERANCE)


def test_a_shared_prefix_scores_as_whole_pairs(llm_dirs: dict[str, Path]) -> None:
    """On the CPU a batch's common prefix runs once (app/engine/last_token.py): the same scores as whole pairs,
    whether the batch shares the whole head of one request or only the system prompt of two."""
    model_dir = llm_dirs["qwen3-reranker"]
    shared, whole = (TorchBackend(float32_settings(model_dir, share_prefix=on)) for on in (True, False))
    assert (shared.describe()["shared_prefix"], whole.describe()["shared_prefix"]) == ("true", "false")
    one_request = shared.encoder.encode(QUERY, DOCUMENTS).pairs
    two_requests = one_request + shared.encoder.encode("another", DOCUMENTS[:3], instruction=INSTRUCTION).pairs
    system_prompt = len(shared.info.recipe.template(None).prefix)  # type: ignore[attr-defined]
    assert common_prefix(one_request) > common_prefix(two_requests) >= system_prompt >= MIN_SHARED_PREFIX
    for pairs in (one_request, two_requests):
        np.testing.assert_allclose(shared.forward(pairs), whole.forward(pairs), atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3-reranker", "qwen3-reranker-seq-cls", "bge-reranker-v2-gemma"])
def test_bfloat16_on_the_cpu_loads_and_stays_close_to_float32(llm_dirs: dict[str, Path], family: str) -> None:
    """What RERANKER_DTYPE=auto runs on CPUs with bf16 matrix instructions: float32 weights under bf16 autocast,
    the head row in float32. Its load-time check compares with transformers' own model in the same precision."""
    model_dir = llm_dirs[family]
    bf16 = TorchBackend(Settings(model_path=model_dir, dtype="bfloat16", torch_compile="off", torch_threads=1))
    reference = TorchBackend(float32_settings(model_dir))
    assert bf16.describe()["dtype"] == "bfloat16"
    pairs = reference.encoder.encode(QUERY, DOCUMENTS).pairs
    assert np.abs(sigmoid(bf16.forward(pairs)) - sigmoid(reference.forward(pairs))).max() < 0.02


def test_the_instruction_changes_the_scores(llm_dirs: dict[str, Path]) -> None:
    backend = TorchBackend(float32_settings(llm_dirs["qwen3-reranker"]))
    default = backend.forward(backend.encoder.encode(QUERY, DOCUMENTS).pairs)
    instructed = backend.forward(backend.encoder.encode(QUERY, DOCUMENTS, instruction=INSTRUCTION).pairs)
    assert np.abs(np.subtract(default, instructed)).max() > 1e-3


def test_seq_cls_conversion_scores_as_the_causal_form(llm_dirs: dict[str, Path]) -> None:
    """The *-seq-cls form is recognised as Qwen3-Reranker and scored with its prompt: on main before this change
    it was served as a bare (query, document) cross-encoder pair, with confident, wrong scores."""
    causal, seq_cls = llm_dirs["qwen3-reranker"], llm_dirs["qwen3-reranker-seq-cls"]
    backend = TorchBackend(float32_settings(seq_cls))
    facts = backend.describe()
    assert (facts["architecture"], facts["recipe"]) == ("Qwen3ForSequenceClassification", "qwen3-reranker")
    pair = backend.encoder.encode(QUERY, [DOCUMENTS[0]]).pairs[0]
    assert list(pair.input_ids) == qwen3_card_input_ids(seq_cls, QUERY, DOCUMENTS[0])
    ours = backend.forward(backend.encoder.encode(QUERY, DOCUMENTS).pairs)
    _, card_raw = qwen3_card_scores(causal, pairs_of(QUERY, DOCUMENTS))
    np.testing.assert_allclose(ours, card_raw, atol=TOLERANCE)
    np.testing.assert_allclose(ours, qwen3_seqcls_scores(seq_cls, pairs_of(QUERY, DOCUMENTS)), atol=TOLERANCE)


def test_a_truncated_pair_keeps_the_prompt_and_its_suffix(llm_dirs: dict[str, Path]) -> None:
    model_dir = llm_dirs["qwen3-reranker"]
    backend = TorchBackend(float32_settings(model_dir, max_length=160))
    recipe = backend.info.recipe
    assert isinstance(recipe, Qwen3Reranker)
    long_document = make_words(400, seed=9)
    request = backend.encoder.encode(QUERY, [long_document])
    pair = request.pairs[0]
    assert request.truncated == [True] and len(pair) == 160
    template = recipe.template(None)
    assert tuple(pair.input_ids[: len(template.prefix)]) == template.prefix
    assert tuple(pair.input_ids[-len(template.suffix) :]) == template.suffix
    # exactly the card's own truncation of the same text to the same length (it cuts the text's end)
    assert list(pair.input_ids) == qwen3_card_input_ids(model_dir, QUERY, long_document, max_length=160)
    _, card_raw = qwen3_card_scores(model_dir, [(QUERY, long_document)], max_length=160)
    np.testing.assert_allclose(backend.forward([pair]), card_raw, atol=TOLERANCE)
    # windows: every window of a chunked document carries the whole prompt
    from app.engine.base import WindowPolicy

    windows = backend.encoder.encode(QUERY, [long_document], WindowPolicy(max_windows=8, overlap=16)).pairs
    assert len(windows) > 1
    for window in windows:
        assert tuple(window.input_ids[: len(template.prefix)]) == template.prefix
        assert tuple(window.input_ids[-len(template.suffix) :]) == template.suffix
        assert len(window) <= 160


async def test_llm_pairs_score_the_same_batched_with_other_requests(llm_dirs: dict[str, Path]) -> None:
    model_dir = llm_dirs["qwen3-reranker"]
    settings = float32_settings(model_dir, max_batch_tokens=2048, max_batch_pairs=16)
    service = RerankService(settings, lambda: TorchBackend(settings))
    await service.start()
    try:
        requests = [
            (f"{QUERY} {make_words(n, seed=n)}", [*DOCUMENTS[n % 3 :], make_words(5 + 9 * n, seed=n)], instruction)
            for n in range(6)
            for instruction in (None, INSTRUCTION if n % 2 else None)
        ]
        outcomes = await asyncio.gather(
            *(service.rerank(query, documents, instruction=instruction) for query, documents, instruction in requests)
        )
    finally:
        await service.stop()
    for (query, documents, instruction), outcome in zip(requests, outcomes, strict=True):
        probabilities, raw = qwen3_card_scores(model_dir, pairs_of(query, documents), instruction=instruction)
        np.testing.assert_allclose([d.logit for d in outcome.documents], raw, atol=TOLERANCE)
        np.testing.assert_allclose([d.relevance_score for d in outcome.documents], probabilities, atol=TOLERANCE)


# --- bge-reranker-v2-gemma and mxbai-rerank-v2 -------------------------------------------------------------------

# family: (architecture, recipe, the authors' scores, the authors' ids, an instruction to try)
OTHER_FAMILIES: dict[str, tuple[str, str, Any, Any, str]] = {
    "bge-reranker-v2-gemma": (
        "GemmaForCausalLM",
        "bge-reranker-gemma",
        lambda model_dir, pairs, instruction: gemma_flag_scores(model_dir, pairs, prompt=instruction),
        lambda model_dir, query, doc, instruction: gemma_flag_input_ids(model_dir, query, doc, prompt=instruction),
        "Does passage B answer query A? Say 'Yes' or 'No'.",  # FlagEmbedding's prompt, replaced
    ),
    "mxbai-rerank-base-v2": (
        "Qwen2ForCausalLM",
        "mxbai-rerank-v2",
        lambda model_dir, pairs, instruction: mxbai_v2_scores(model_dir, pairs, instruction=instruction),
        lambda model_dir, query, doc, instruction: mxbai_v2_input_ids(model_dir, query, doc, instruction=instruction),
        INSTRUCTION,  # mixedbread's "instruction:" line
    ),
}


@pytest.mark.parametrize("with_instruction", [False, True])
@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_family_scores_as_its_authors_code(llm_dirs: dict[str, Path], family: str, with_instruction: bool) -> None:
    """bge-reranker-v2-gemma as FlagEmbedding's model card scores it, mxbai-rerank-v2 as mixedbread's package."""
    architecture, recipe, scores, input_ids, instruction = OTHER_FAMILIES[family]
    instruction = instruction if with_instruction else None
    model_dir = llm_dirs[family]
    backend = TorchBackend(float32_settings(model_dir))
    facts = backend.describe()
    assert (facts["architecture"], facts["recipe"]) == (architecture, recipe)
    reference = scores(model_dir, pairs_of(QUERY, DOCUMENTS), instruction)
    assert np.ptp(reference) > 0.5, "the fixture's scores must differ for the comparison to mean anything"
    request = backend.encoder.encode(QUERY, DOCUMENTS, instruction=instruction)
    for document, pair in zip(DOCUMENTS, request.pairs, strict=True):
        assert list(pair.input_ids) == input_ids(model_dir, QUERY, document, instruction)
    np.testing.assert_allclose(backend.forward(request.pairs), reference, atol=TOLERANCE)
    np.testing.assert_allclose([backend.forward([p])[0] for p in request.pairs], reference, atol=TOLERANCE)


# --- recognition and refusal -------------------------------------------------------------------------------------


def copy_without_card(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "README.md").unlink(missing_ok=True)  # mxbai-rerank-v2's fixture carries none
    return target


def test_a_chat_llm_is_refused_with_one_line_naming_the_setting(llm_dirs: dict[str, Path]) -> None:
    model_dir = llm_dirs["qwen3-chat"]
    with pytest.raises(ModelLoadError) as refused:
        inspect_model_dir(model_dir)
    message = str(refused.value)
    assert "\n" not in message
    assert str(model_dir) in message and "Qwen3ForCausalLM" in message
    assert "recipe is unknown" in message and "RERANKER_RECIPE=qwen3-reranker" in message
    # the preflight says the same, in one line, and the server never starts
    env = {"RERANKER_MODEL_PATH": str(model_dir), "PATH": "/usr/bin:/bin", "HOME": str(model_dir.parent)}
    checked = subprocess.run(
        [sys.executable, "-m", "app", "--check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 2
    assert checked.stderr.strip().count("\n") == 0 and "RERANKER_RECIPE" in checked.stderr


@pytest.mark.parametrize(
    ("family", "name"),
    [("bge-reranker-v2-gemma", "gemma-2b"), ("mxbai-rerank-base-v2", "Qwen2.5-0.5B-Instruct")],
)
def test_every_touched_family_refuses_its_plain_llm(
    llm_dirs: dict[str, Path], tmp_path: Path, family: str, name: str
) -> None:
    """The same architecture and tokenizer as a recognised reranker, without its card or name: a base or chat LLM
    (Gemma, Qwen2) is refused, not scored with a guessed recipe."""
    plain = copy_without_card(llm_dirs[family], tmp_path / name)
    with pytest.raises(ModelLoadError, match=r"recipe is unknown.*RERANKER_RECIPE"):
        inspect_model_dir(plain)


def test_a_seq_cls_llm_without_evidence_is_refused_and_the_setting_forces_the_recipe(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    anonymous = copy_without_card(llm_dirs["qwen3-reranker-seq-cls"], tmp_path / "my-model")
    with pytest.raises(ModelLoadError, match=r"sequence classifier built on an LLM.*RERANKER_RECIPE"):
        inspect_model_dir(anonymous)
    info = inspect_model_dir(anonymous, recipe="qwen3-reranker")
    assert (info.recipe.name, info.recipe_evidence) == ("qwen3-reranker", "RERANKER_RECIPE=qwen3-reranker")
    # a recipe forced onto another family's architecture is refused, not tried
    with pytest.raises(ModelLoadError, match="scores GemmaForCausalLM only"):
        inspect_model_dir(anonymous, recipe="bge-reranker-gemma")


def test_a_copy_named_after_the_model_is_recognised_without_its_card(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    named = copy_without_card(llm_dirs["qwen3-reranker"], tmp_path / "Qwen3-Reranker-0___6B")  # ModelScope's name
    info = inspect_model_dir(named)
    assert info.recipe.name == "qwen3-reranker" and "directory is named" in info.recipe_evidence
    cached = tmp_path / "models--Qwen--Qwen3-Reranker-0.6B" / "snapshots" / "6a5829f0"  # a Hugging Face cache
    cached.parent.mkdir(parents=True)
    copy_without_card(llm_dirs["qwen3-reranker"], cached)
    assert "models--Qwen--Qwen3-Reranker-0.6B" in inspect_model_dir(cached).recipe_evidence
    # a folder named after rerankers says nothing about a chat model inside it
    folder = tmp_path / "qwen3-reranker-models"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="recipe is unknown"):
        inspect_model_dir(copy_without_card(llm_dirs["qwen3-chat"], folder / "Qwen3-0.6B"))
    carded = inspect_model_dir(llm_dirs["qwen3-reranker"])
    assert "model card" in carded.recipe_evidence
    # BAAI's card is titled "Reranker": its text names the model, whatever the directory is called
    renamed = tmp_path / "my-reranker"
    shutil.copytree(llm_dirs["bge-reranker-v2-gemma"], renamed)
    info = inspect_model_dir(renamed)
    assert (info.recipe.name, info.recipe_evidence) == (
        "bge-reranker-gemma",
        "its model card names BAAI/bge-reranker-v2-gemma",
    )


def test_the_self_check_refuses_a_construction_that_is_not_the_recipes(
    llm_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the space after "<Document>:", Qwen's tokenizer joins differently: the service must not start.
    monkeypatch.setattr(Qwen3Reranker, "document_text", lambda self, document: document)
    with pytest.raises(ModelLoadError, match=r"encodes the qwen3-reranker prompt differently.*refusing"):
        open_model_dir(llm_dirs["qwen3-reranker"], max_length=512, max_query_share=0.5)


def test_a_scorer_that_disagrees_with_transformers_is_refused_at_load(
    llm_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading the second-to-last token instead of the last: what a padding or mask mistake would look like.
    from app.engine import last_token

    def read_one_early(self: Any, hidden: Any, attention_mask: Any) -> Any:
        return original(
            self, hidden, attention_mask - (attention_mask.cumsum(-1) == attention_mask.sum(-1, keepdim=True)).long()
        )

    original = last_token.LastTokenScorer._read
    monkeypatch.setattr(last_token.LastTokenScorer, "_read", read_one_early)
    with pytest.raises(ModelLoadError, match=r"moved a probe logit .* against transformers' own model: refusing"):
        TorchBackend(float32_settings(llm_dirs["qwen3-reranker"]))


def test_an_instruction_setting_is_refused_for_a_cross_encoder(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"RERANKER_INSTRUCTION is set.*cross-encoder"):
        inspect_model_dir(tiny_model_dir, instruction="anything")


# --- over HTTP, from python -m app -------------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("engine", ["inline", "process"])
def test_qwen3_reranker_over_http(llm_dirs: dict[str, Path], tmp_path: Path, engine: str) -> None:
    model_dir = llm_dirs["qwen3-reranker"]
    server = start_server(model_dir, tmp_path, workers=2, RERANKER_DTYPE="float32", RERANKER_ENGINE=engine)
    try:
        assert "recipe qwen3-reranker (its model card is titled" in server.log()
        with server.client() as client:
            card = client.get("/v1/models").json()["data"][0]
            assert (card["recipe"], card["architecture"]) == ("qwen3-reranker", "Qwen3ForCausalLM")
            assert card["instruction"] == "Given a web search query, retrieve relevant passages that answer the query"
            assert client.get("/info").json()["recipe"] == "qwen3-reranker"
            probabilities, raw = qwen3_card_scores(model_dir, pairs_of(QUERY, DOCUMENTS))
            instructed, _ = qwen3_card_scores(model_dir, pairs_of(QUERY, DOCUMENTS), instruction=INSTRUCTION)
            body = {"model": "qwen3", "query": QUERY, "documents": DOCUMENTS, "top_n": len(DOCUMENTS)}

            def scores(answer: httpx.Response) -> list[float]:
                assert answer.status_code == 200, answer.text
                results = sorted(answer.json()["results"], key=lambda result: result["index"])
                return [result["relevance_score"] for result in results]

            np.testing.assert_allclose(scores(client.post("/v1/rerank", json=body)), probabilities, atol=TOLERANCE)
            with_instruction = client.post("/v1/rerank", json={**body, "instruction": INSTRUCTION})
            np.testing.assert_allclose(scores(with_instruction), instructed, atol=TOLERANCE)
            raw_answer = client.post("/v1/rerank", json={**body, "raw_scores": True})
            np.testing.assert_allclose(scores(raw_answer), raw, atol=TOLERANCE)
            # TEI's dialect (RAGFlow's HuggingFace provider) gets the same scores
            tei = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "truncate": True}).json()
            np.testing.assert_allclose(
                [r["score"] for r in sorted(tei, key=lambda r: r["index"])], probabilities, atol=TOLERANCE
            )
            blank = client.post("/v1/rerank", json={**body, "instruction": "  "})
            assert blank.status_code == 422 and blank.json()["error"]["param"] == "instruction"
    finally:
        server.stop()


@pytest.mark.server
def test_a_cross_encoder_answers_an_instruction_with_422(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(tiny_model_dir, tmp_path, workers=1)
    try:
        with server.client() as client:
            card = client.get("/v1/models").json()["data"][0]
            assert card["recipe"] == "cross-encoder"
            answer = client.post("/v1/rerank", json={"query": "q", "documents": ["d"], "instruction": "be strict"})
            assert answer.status_code == 422
            error = answer.json()["error"]
            assert error["param"] == "instruction" and "takes no instruction" in error["message"]
    finally:
        server.stop()
