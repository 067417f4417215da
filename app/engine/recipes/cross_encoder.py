"""Cross-encoders (``*ForSequenceClassification`` encoders: XLM-RoBERTa, BERT, ELECTRA, DeBERTa-v2, ModernBERT),
scored as sentence-transformers' ``CrossEncoder.predict`` scores them: the tokenizer's own pair encoding
``tokenizer(query, document)``, the model's own classification head on it (one logit, or two: not relevant /
relevant, whose difference is the log-odds).

The pair template (where the special tokens go, and every position's type id) is learnt from that same pair
encoding, not from the post-processor's internals: transformers 5 rebuilds an ``XLMRobertaTokenizer``'s
post-processor as a ``TemplateProcessing`` whatever ``tokenizer.json`` holds, and BERT's is one too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from app.engine.base import PairTemplate
from app.engine.recipes.base import ModelFiles, Recipe, RecipeError, Tokenize

# The pair the template is learnt from (the self-check then tries more).
TEMPLATE_PROBE = ("What is a panda?", "The giant panda is a bear species endemic to China.")


def _find(sequence: Sequence[int], part: Sequence[int], start: int) -> int:
    for at in range(start, len(sequence) - len(part) + 1):
        if list(sequence[at : at + len(part)]) == list(part):
            return at
    return -1


def pair_template(tokenizer: Any, path: Path) -> PairTemplate:
    """Where the tokenizer's pair encoding puts its special tokens around (query, document), and their types."""
    query, document = TEMPLATE_PROBE
    query_ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    document_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    pair = tokenizer(query, document, return_token_type_ids=True)
    ids: list[int] = list(pair["input_ids"])
    types: list[int] = list(pair.get("token_type_ids") or [0] * len(ids))
    first = _find(ids, query_ids, 0)
    second = _find(ids, document_ids, first + len(query_ids)) if first >= 0 else -1
    if first < 0 or second < 0 or not query_ids or not document_ids:
        raise RecipeError(
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


class CrossEncoder(Recipe):
    name: ClassVar[str] = "cross-encoder"
    decoder: ClassVar[bool] = False
    source: ClassVar[str] = "sentence-transformers' CrossEncoder.predict (the tokenizer's own pair encoding)"

    def __init__(self, files: ModelFiles, tokenize: Tokenize, *, instruction: str | None = None) -> None:
        super().__init__(files, tokenize, instruction=instruction)
        self.template = pair_template(self.tokenizer, files.path)

    @classmethod
    def recognise(cls, files: ModelFiles) -> str | None:
        if files.architecture.endswith("ForSequenceClassification"):
            return f"{files.architecture} is a sequence classifier"
        return None

    def reference_ids(self, query: str, document: str, instruction: str | None) -> list[int]:
        return list(self.tokenizer(query, document)["input_ids"])
