"""What a model directory holds, and whether the service can serve it: checked before any weight is loaded.

Four things decide whether a published reranker works here, and each is checked with the files alone:

- the files can be read by this process (a weights file the container's uid cannot read is "permission
  denied", not "no such file");
- ``config.json`` names an architecture the installed transformers implements (no remote code);
- a scoring recipe fits it (``app/engine/recipes``): a plain ``*ForSequenceClassification`` encoder with one label
  (or two: not relevant / relevant) is a cross-encoder; an LLM reranker is recognised from its model card, config
  and tokenizer (Qwen3-Reranker, bge-reranker-v2-gemma, mxbai-rerank-v2) or named by RERANKER_RECIPE; any other LLM
  is refused;
- the tokenizer loads, and the service's own encoding of probe pairs gives exactly the ids (and type ids) of the
  recipe's reference: the tokenizer's pair encoding ``tokenizer(query, document)`` for a cross-encoder (what
  sentence-transformers' ``CrossEncoder`` and the model's training used), the model card's prompt encoded by the
  model's own tokenizer for an LLM reranker (with and without an instruction).

``inspect_model_dir`` is what ``python -m app`` runs before gunicorn starts; ``load_pair_encoder`` is what an
HTTP worker needs to tokenise without a copy of the weights; ``TorchBackend`` uses ``open_model_dir``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import RecipeChoice, Settings, model_dir_problem
from app.engine.base import PairEncoder
from app.engine.recipes import (
    CrossEncoder,
    ModelFiles,
    PromptRecipe,
    Recipe,
    RecipeError,
    choose_recipe,
    read_card,
)

# Nothing is ever fetched at run time; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SUPPORTED = (
    "plain *ForSequenceClassification cross-encoders that transformers implements: XLM-RoBERTa (bge-reranker-*), "
    "BERT/MiniLM (cross-encoder/ms-marco-*), ELECTRA, DeBERTa-v2 (mxbai-rerank-*-v1), ModernBERT "
    "(gte-reranker-modernbert-base); LLM rerankers with their published recipe: Qwen3-Reranker (causal or "
    "*-seq-cls), bge-reranker-v2-gemma, mxbai-rerank-v2"
)
# Model types whose positions start after padding_idx: 514 position embeddings hold 512 tokens.
OFFSET_POSITION_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert"}
# Probe pairs for the self-check: plain English, punctuation, accents, CJK, emoji, digits, runs of spaces.
PROBE_PAIRS = (
    ("What is a panda?", "The giant panda is a bear species endemic to China."),
    ("naïve café", "東京 🙂 data 12345,  two  spaces and UPPER case."),
    ("which passage mentions the harbour", "the harbour was busy"),
)
# LLM recipes tokenise a prompt's parts on their own: documents that start with what could join the text before
# them (digits, punctuation, a newline, spaces, a special token's text) and end the same way.
PROMPT_PROBE_PAIRS = (
    ("capital?", "1999: the year (and 12,345 more)..."),
    ("  spaced query  ", "\n\nnew lines first\n"),
    ("emoji 🙂?", "  two leading spaces, then <|im_end|> and </think> as text"),
    ("x", ""),
    ("¿Qué es?", "¡Mucho! 東京では…"),
)
PROBE_INSTRUCTION = "Judge whether the passage is about a harbour: answer only yes or no."


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
    recipe: Recipe
    recipe_evidence: str  # why this recipe was chosen (the start-up log says it)

    @property
    def decoder(self) -> bool:
        """An LLM reranker: scored at its last real token by one answer-token row, not by a classifier head."""
        return self.recipe.decoder

    def describe(self) -> dict[str, str]:
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "num_labels": str(self.num_labels),
            "max_length": str(self.max_length),
            "tokenizer": self.tokenizer_class,
            **self.recipe.describe(),
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
    """The (architecture, model_type) to load; raises for remote code and for what transformers does not implement.
    Whether it can rerank is the recipe's question (``choose_recipe``)."""
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
    if not architecture.endswith(("ForSequenceClassification", "ForCausalLM")):
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


def verify_pairs(
    encoder: PairEncoder, tokenizer: Any, path: Path, *, uses_type_ids: bool, recipe: Recipe | None = None
) -> None:
    """Refuse to start unless the service's pairs are the recipe's own: the tokenizer's ``tokenizer(query,
    document)`` for a cross-encoder, the model card's prompt through the model's tokenizer for an LLM reranker
    (with the default instruction and with another)."""
    if recipe is not None and recipe.decoder:
        instructions = (None, PROBE_INSTRUCTION) if encoder.takes_instruction else (None,)
        for query, document in PROBE_PAIRS + PROMPT_PROBE_PAIRS:
            for instruction in instructions:
                service = list(encoder.encode(query, [document], instruction=instruction).pairs[0].input_ids)
                recipe_ids = recipe.reference_ids(query, document, instruction)
                if service != recipe_ids:
                    pairs = enumerate(zip(service, recipe_ids, strict=False))
                    at = next((i for i, (a, b) in pairs if a != b), min(len(service), len(recipe_ids)))
                    raise ModelLoadError(
                        f"the tokenizer in {path} encodes the {recipe.name} prompt differently from the service "
                        f"(self-check on {query!r} / {document!r}: from token {at}, service "
                        f"{service[at : at + 12]}, recipe {recipe_ids[at : at + 12]}); refusing to serve wrong "
                        "scores; fix: report this model and tokenizer version"
                    )
        return
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


def open_model_dir(
    path: Path,
    *,
    max_length: int,
    max_query_share: float,
    recipe: RecipeChoice | str = RecipeChoice.auto,
    instruction: str | None = None,
) -> tuple[PairEncoder, ModelInfo, Any]:
    """Check the directory, choose its scoring recipe and build the service's pair encoder from its tokenizer (no
    weights loaded).

    Returns the encoder, what was found, and the transformers tokenizer (for its pad id and input names).
    Raises :class:`ModelLoadError` with one line naming the path, the reason and the fix.
    """
    check_files(path)
    config = read_config(path)
    architecture, model_type = check_architecture(path, config)
    tokenizer = load_tokenizer(path)
    tokenize = tokenize_function(tokenizer)
    files = ModelFiles(path, config, architecture, model_type, read_card(path), tokenizer)
    forced = recipe.value if isinstance(recipe, RecipeChoice) else str(recipe)
    try:
        chosen, evidence = choose_recipe(files, tokenize, forced=forced, instruction=instruction)
    except RecipeError as error:
        raise ModelLoadError(f"{error}; supported: {SUPPORTED}") from None
    if instruction is not None and not chosen.takes_instruction:
        raise ModelLoadError(
            f"RERANKER_INSTRUCTION is set, but model at {path} is scored by the {chosen.name} recipe, which takes "
            "no instruction; fix: unset RERANKER_INSTRUCTION"
        )
    # A causal LM is read through one answer-token row: one label, whatever its vocabulary.
    num_labels = label_count(path, config) if architecture.endswith("ForSequenceClassification") else 1
    uses_type_ids = not chosen.decoder and "token_type_ids" in tokenizer.model_input_names
    positions, usable_length = _max_length(config, model_type, tokenizer, max_length)
    prompt: PromptRecipe | None = None
    if isinstance(chosen, PromptRecipe):
        template, prompt = chosen.template(None), chosen
    elif isinstance(chosen, CrossEncoder):
        template = chosen.template
    else:
        raise TypeError(f"recipe {chosen.name} neither prompts nor pairs")
    encoder = PairEncoder(
        tokenize,
        template,
        max_length=usable_length,
        max_query_share=max_query_share,
        prompt=prompt,
        recipe=chosen.name,
    )
    verify_pairs(encoder, tokenizer, path, uses_type_ids=uses_type_ids, recipe=chosen)
    info = ModelInfo(
        path=path,
        architecture=architecture,
        model_type=model_type,
        num_labels=num_labels,
        max_positions=positions,
        max_length=usable_length,
        tokenizer_class=type(tokenizer).__name__,
        uses_type_ids=uses_type_ids,
        recipe=chosen,
        recipe_evidence=evidence,
    )
    return encoder, info, tokenizer


def load_pair_encoder(settings: Settings) -> PairEncoder:
    """The pair encoder alone: what an HTTP worker needs to tokenise without a copy of the weights."""
    return open_model_dir(settings.model_directory, **encoder_settings(settings))[0]


def encoder_settings(settings: Settings) -> dict[str, Any]:
    """The settings ``open_model_dir`` reads, as its keyword arguments."""
    return {
        "max_length": settings.max_length,
        "max_query_share": settings.max_query_share,
        "recipe": settings.recipe,
        "instruction": settings.instruction,
    }


def inspect_model_dir(
    path: Path,
    *,
    max_length: int = 512,
    max_query_share: float = 0.5,
    recipe: RecipeChoice | str = RecipeChoice.auto,
    instruction: str | None = None,
) -> ModelInfo:
    """Everything ``open_model_dir`` checks, for a preflight before the server starts."""
    return open_model_dir(
        path, max_length=max_length, max_query_share=max_query_share, recipe=recipe, instruction=instruction
    )[1]
