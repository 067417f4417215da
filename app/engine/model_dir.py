"""What a model directory holds, and whether the service can serve it: checked before any weight is loaded.

Three things decide whether a published reranker works here, and each is checked with the files alone:

- the files can be read by this process (a weights file the container's uid cannot read is "permission
  denied", not "no such file");
- ``config.json`` names a plain ``*ForSequenceClassification`` that the installed transformers implements (no
  remote code, not an embedding or masked-LM model), with one label (or two: not relevant / relevant);
- the tokenizer loads, and the service's own pair encoding gives exactly the ids and type ids of the
  tokenizer's pair encoding ``tokenizer(query, document)``, which is what sentence-transformers'
  ``CrossEncoder`` (and the model's training) used.

The pair template (where the special tokens go, and every position's type id) is learnt from that same pair
encoding, not from the post-processor's internals: transformers 5 rebuilds an ``XLMRobertaTokenizer``'s
post-processor as a ``TemplateProcessing`` whatever ``tokenizer.json`` holds, and BERT's is one too.

``inspect_model_dir`` is what ``python -m app`` runs before gunicorn starts; ``load_pair_encoder`` is what an
HTTP worker needs to tokenise without a copy of the weights; ``TorchBackend`` uses ``open_model_dir``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings, model_dir_problem
from app.engine.base import PairEncoder, PairTemplate

# Nothing is ever fetched at run time; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SUPPORTED = (
    "plain *ForSequenceClassification cross-encoders that transformers implements: XLM-RoBERTa (bge-reranker-*), "
    "BERT/MiniLM (cross-encoder/ms-marco-*), ELECTRA, DeBERTa-v2 (mxbai-rerank-*-v1), ModernBERT "
    "(gte-reranker-modernbert-base)"
)
# Model types whose positions start after padding_idx: 514 position embeddings hold 512 tokens.
OFFSET_POSITION_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"}
# Probe pairs for the self-check: plain English, punctuation, accents, CJK, emoji, digits, runs of spaces.
PROBE_PAIRS = (
    ("What is a panda?", "The giant panda is a bear species endemic to China."),
    ("naïve café", "東京 🙂 data 12345,  two  spaces and UPPER case."),
    ("which passage mentions the harbour", "the harbour was busy"),
)


class ModelLoadError(RuntimeError):
    """The model directory cannot be served. The message is one line: the path, the reason and the fix."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What was found in a model directory, for the start-up log, ``/v1/models`` and the loader."""

    path: Path
    architecture: str
    model_type: str
    num_labels: int
    max_positions: int
    max_length: int  # tokens per (query, document) pair the service will use, special tokens included
    tokenizer_class: str
    uses_type_ids: bool

    def describe(self) -> dict[str, str]:
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "num_labels": str(self.num_labels),
            "max_length": str(self.max_length),
            "tokenizer": self.tokenizer_class,
        }


# --- files ------------------------------------------------------------------------------------------------------


def check_files(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` is a model directory whose files this process can read."""
    problem = model_dir_problem(path)
    if problem:
        raise ModelLoadError(problem)


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"model directory {path}: config.json cannot be read ({error}); fix: download the model again"
        ) from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"model directory {path}: config.json is not a JSON object; fix: download it again")
    return config


def check_architecture(path: Path, config: dict[str, Any]) -> tuple[str, str]:
    """The (architecture, model_type) to load; raises for remote code and for anything but a classifier."""
    import transformers
    from transformers import CONFIG_MAPPING

    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else ""
    model_type = str(config.get("model_type", ""))
    implemented = bool(architecture) and hasattr(transformers, architecture)
    if config.get("auto_map") and not implemented:
        raise ModelLoadError(
            f"model at {path} needs remote code (config.json auto_map -> {architecture or 'custom classes'}), "
            f"which this service never runs; supported: {SUPPORTED}"
        )
    if not architecture.endswith("ForSequenceClassification"):
        what = architecture or "a model with no architectures entry"
        raise ModelLoadError(
            f"model at {path} is {what}, not a sequence classifier (a cross-encoder reranker); an embedding or "
            f"language model cannot rerank here; supported: {SUPPORTED}"
        )
    if model_type not in CONFIG_MAPPING or not implemented:
        raise ModelLoadError(
            f"model at {path} is {architecture} (model_type {model_type!r}), which transformers "
            f"{transformers.__version__} does not implement; supported: {SUPPORTED}"
        )
    return architecture, model_type


def label_count(path: Path, config: dict[str, Any]) -> int:
    labels = config.get("id2label")
    count = len(labels) if isinstance(labels, dict) and labels else int(config.get("num_labels", 2))
    if count not in (1, 2):
        raise ModelLoadError(
            f"model at {path} has {count} labels; a reranker has 1 (a relevance logit) or 2 (not relevant, "
            "relevant); fix: use a cross-encoder reranker, not a multi-class classifier"
        )
    return count


# --- the tokenizer and the pair template ------------------------------------------------------------------------


def load_tokenizer(path: Path) -> Any:
    """The model's own tokenizer, as transformers (and so sentence-transformers) loads it."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        message = " ".join(str(error).split())[:300]
        raise ModelLoadError(
            f"cannot load the tokenizer from {path}: {type(error).__name__}: {message}; fix: check that "
            "tokenizer.json / tokenizer_config.json are complete (download the model again)"
        ) from None
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ModelLoadError(
            f"the tokenizer in {path} has no fast version (tokenizer.json); fix: download the model's tokenizer.json"
        )
    return tokenizer


def _find(sequence: Sequence[int], part: Sequence[int], start: int) -> int:
    for at in range(start, len(sequence) - len(part) + 1):
        if list(sequence[at : at + len(part)]) == list(part):
            return at
    return -1


def pair_template(tokenizer: Any, path: Path) -> PairTemplate:
    """Where the tokenizer's pair encoding puts its special tokens around (query, document), and their types."""
    query, document = PROBE_PAIRS[0]
    query_ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    document_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    pair = tokenizer(query, document, return_token_type_ids=True)
    ids: list[int] = list(pair["input_ids"])
    types: list[int] = list(pair.get("token_type_ids") or [0] * len(ids))
    first = _find(ids, query_ids, 0)
    second = _find(ids, document_ids, first + len(query_ids)) if first >= 0 else -1
    if first < 0 or second < 0 or not query_ids or not document_ids:
        raise ModelLoadError(
            f"the tokenizer in {path} does not encode a (query, document) pair as the two texts plus special "
            f"tokens ({tokenizer.convert_ids_to_tokens(ids)[:40]}); fix: use the model's published tokenizer files"
        )
    after_first, after_second = first + len(query_ids), second + len(document_ids)
    return PairTemplate(
        prefix=tuple(ids[:first]),
        middle=tuple(ids[after_first:second]),
        suffix=tuple(ids[after_second:]),
        first_type=types[first],
        second_type=types[second],
        prefix_types=tuple(types[:first]),
        middle_types=tuple(types[after_first:second]),
        suffix_types=tuple(types[after_second:]),
    )


def tokenize_function(tokenizer: Any) -> Any:
    """Texts → token ids without special tokens, in the tokenizer's Rust code (releases the GIL).

    A private copy of the backend tokenizer, without the file's own truncation and padding: windows and padding
    are the service's.
    """
    from tokenizers import Tokenizer

    private = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    private.no_truncation()
    private.no_padding()

    def tokenize(texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips the character offsets nothing here reads: the same ids for a quarter less
        # time (64 documents of ~256 tokens: 13.3 ms instead of 18.2 ms on one core).
        return [encoding.ids for encoding in private.encode_batch_fast(texts, add_special_tokens=False)]

    return tokenize


def verify_pairs(encoder: PairEncoder, tokenizer: Any, path: Path, *, uses_type_ids: bool) -> None:
    """Refuse to start unless the service's pairs are the tokenizer's own ``tokenizer(query, document)``."""
    for query, document in PROBE_PAIRS:
        ours = encoder.encode(query, [document]).pairs[0]
        theirs = tokenizer(query, document, return_token_type_ids=True)
        their_ids = list(theirs["input_ids"])
        if ours.input_ids != their_ids:
            raise ModelLoadError(
                f"the tokenizer in {path} pairs texts differently from the service (self-check on "
                f"{query!r} / {document!r}: service {ours.input_ids[:24]}, tokenizer {their_ids[:24]}); "
                "refusing to serve wrong scores; fix: report this model and tokenizer version"
            )
        their_types = list(theirs.get("token_type_ids") or [0] * len(their_ids))
        if uses_type_ids and ours.type_ids != their_types:
            raise ModelLoadError(
                f"the tokenizer in {path} gives type ids the service does not reproduce (self-check on "
                f"{query!r}: service {ours.type_ids[:24]}, tokenizer {their_types[:24]}); refusing to serve "
                "wrong scores; fix: report this model and tokenizer version"
            )


# --- putting it together ----------------------------------------------------------------------------------------


def _max_length(config: dict[str, Any], model_type: str, tokenizer: Any, wanted: int) -> tuple[int, int]:
    positions = int(config.get("max_position_embeddings") or wanted)
    usable = positions - (2 if model_type in OFFSET_POSITION_TYPES else 0)
    # The tokenizer's model_max_length is what CrossEncoder truncates to; a huge value means "not set".
    tokenizer_max = int(getattr(tokenizer, "model_max_length", 0) or 0)
    limits = [wanted, usable] + ([tokenizer_max] if 0 < tokenizer_max < 1_000_000 else [])
    return positions, min(limits)


def open_model_dir(path: Path, *, max_length: int, max_query_share: float) -> tuple[PairEncoder, ModelInfo, Any]:
    """Check the directory and build the service's pair encoder from its tokenizer (no weights loaded).

    Returns the encoder, what was found, and the transformers tokenizer (for its pad id and input names).
    Raises :class:`ModelLoadError` with one line naming the path, the reason and the fix.
    """
    check_files(path)
    config = read_config(path)
    architecture, model_type = check_architecture(path, config)
    num_labels = label_count(path, config)
    tokenizer = load_tokenizer(path)
    uses_type_ids = "token_type_ids" in tokenizer.model_input_names
    positions, usable_length = _max_length(config, model_type, tokenizer, max_length)
    encoder = PairEncoder(
        tokenize_function(tokenizer),
        pair_template(tokenizer, path),
        max_length=usable_length,
        max_query_share=max_query_share,
    )
    verify_pairs(encoder, tokenizer, path, uses_type_ids=uses_type_ids)
    info = ModelInfo(
        path=path,
        architecture=architecture,
        model_type=model_type,
        num_labels=num_labels,
        max_positions=positions,
        max_length=usable_length,
        tokenizer_class=type(tokenizer).__name__,
        uses_type_ids=uses_type_ids,
    )
    return encoder, info, tokenizer


def load_pair_encoder(settings: Settings) -> PairEncoder:
    """The pair encoder alone: what an HTTP worker needs to tokenise without a copy of the weights."""
    encoder, _, _ = open_model_dir(
        settings.model_path, max_length=settings.max_length, max_query_share=settings.max_query_share
    )
    return encoder


def inspect_model_dir(path: Path, *, max_length: int = 512, max_query_share: float = 0.5) -> ModelInfo:
    """Everything ``open_model_dir`` checks, for a preflight before the server starts."""
    return open_model_dir(path, max_length=max_length, max_query_share=max_query_share)[1]
