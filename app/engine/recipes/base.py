"""What every scoring recipe shares: the published files recognition reads, and the interface a recipe fills.

A recipe is the part of a reranker that differs between families: how a (query, document) pair becomes token ids
(a pair template, or an LLM's prompt) and how the model's output becomes one logit (a classifier's, or an answer
token's at the last position). After loading, every family is "one float32 logit per pair, sigmoid for the
score", so the batcher, the engine processes and the HTTP layer never know which recipe runs.

Each recipe says where its input comes from (``reference_ids``: the model authors' own construction, applied with
the model's own tokenizer), and the start-up self-check (``model_dir.verify_pairs``) refuses to serve unless the
service's faster construction gives exactly those ids.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from app.engine.base import PairTemplate

Tokenize = Callable[[list[str]], list[list[int]]]


class RecipeError(RuntimeError):
    """The directory looks like the recipe's family but cannot be scored its way (a missing answer token, say)."""


def read_card(path: Path) -> str:
    """The model card (README.md) as published beside the weights; '' when there is none."""
    try:
        return (path / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def front_matter(card: str) -> dict[str, Any]:
    """The card's YAML front matter (``pipeline_tag``, ``base_model``, ``tags`` ...); {} when absent or unreadable."""
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", card, re.DOTALL)
    if not match:
        return {}
    import yaml

    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def card_title(card: str) -> str:
    """The card's first level-1 heading after the front matter ('' when none)."""
    body = re.sub(r"\A---\s*\n.*?\n---\s*(\n|\Z)", "", card, count=1, flags=re.DOTALL)
    match = re.search(r"^#\s+(.+)$", body, re.MULTILINE)
    return match.group(1).strip() if match else ""


def _normalised(text: str) -> str:
    # ModelScope writes "0.6B" as "0___6B" in local paths; case and separators vary between copies.
    return re.sub(r"[\s_.]+", "-", text.lower())


def directory_names(path: Path) -> list[str]:
    """The names a download gives a model directory: its own (as mounted, and behind a link such as the fetcher's
    ``current``), and a Hugging Face cache's ``models--org--name`` above ``snapshots/<commit>``. Not any other
    ancestor: a folder of models named after one says nothing about its neighbours."""
    names = [path.name, path.resolve().name]
    names += [part for part in path.resolve().parts[-3:] if part.startswith("models--")]
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class ModelFiles:
    """What recognition reads, before any weight is loaded: config.json, the model card and the tokenizer."""

    path: Path
    config: dict[str, Any]
    architecture: str
    model_type: str
    card: str
    tokenizer: Any
    _front_matter: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_front_matter", front_matter(self.card))

    @property
    def pipeline_tag(self) -> str:
        return str(self._front_matter.get("pipeline_tag") or "")

    def evidence_for(self, model_name: str) -> str | None:
        """Where the published files say this directory is ``model_name`` (or a conversion of it): the card's
        title or ``base_model``, else the directory's own name (a hub download is named after its repository).
        None when nothing does: a card that only mentions the model in passing (a sibling model's table) is not
        evidence."""
        wanted = _normalised(model_name)
        title = card_title(self.card)
        if wanted in _normalised(title):
            return f"its model card is titled {title!r}"
        base = self._front_matter.get("base_model")
        for name in base if isinstance(base, list) else [base]:
            if isinstance(name, str) and wanted in _normalised(name):
                return f"its model card's base_model is {name}"
        for name in directory_names(self.path):
            if wanted in _normalised(name):
                return f"its directory is named {name!r}"
        return None


class Recipe(ABC):
    """One family's scoring recipe. Decoder recipes (LLM rerankers) read one answer token's logit at the last
    real token; the cross-encoder recipe reads the model's own classification head on the first token."""

    name: ClassVar[str]
    decoder: ClassVar[bool] = True
    takes_instruction: ClassVar[bool] = False
    #: Where the recipe comes from, for the log and /v1/models.
    source: ClassVar[str] = ""

    def __init__(self, files: ModelFiles, tokenize: Tokenize, *, instruction: str | None = None) -> None:
        self.files = files
        self.tokenizer = files.tokenizer
        self._tokenize = tokenize
        self.default_instruction = instruction

    @classmethod
    @abstractmethod
    def recognise(cls, files: ModelFiles) -> str | None:
        """Why ``files`` are this recipe's model (the evidence, for the start-up log), or None."""

    @classmethod
    def architectures(cls) -> tuple[str, ...]:
        """The config.json architectures this recipe can score (forcing it onto another is refused)."""
        return ()

    @abstractmethod
    def reference_ids(self, query: str, document: str, instruction: str | None) -> list[int]:
        """A pair's token ids exactly as the model authors' own code builds them with the model's tokenizer."""

    def answer_tokens(self) -> tuple[int, int | None]:
        """Decoders read from a causal LM: the token whose logit is the score, and the one subtracted (or None)."""
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        return {"recipe": self.name}


class PromptRecipe(Recipe):
    """A decoder recipe whose pairs are prompt text: the service's ``PairEncoder`` takes it as its ``prompt``."""

    def query_text(self, query: str, instruction: str | None) -> str:
        return query

    def document_text(self, document: str) -> str:
        return document

    @abstractmethod
    def template(self, instruction: str | None) -> PairTemplate:
        """The fixed token ids around the (query text, document text) ids."""

    def encode_text(self, text: str) -> list[int]:
        """One text's ids as the service tokenises it (no special tokens added)."""
        return self._tokenize([text])[0]
