"""What every backend shares: encoded pairs, the long-document policy, the pair encoder and the interface.

Encoding happens per request (in a thread, before batching) so the batcher knows each pair's real token count
and can fill batches on a token budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class EncodedPair:
    """One (query, document window) pair, special tokens included, ready for the model."""

    input_ids: list[int]
    type_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    """How a document longer than the room beside the query is handled.

    ``max_windows == 1`` truncates (the document side first). More windows split the document into windows of
    the room left beside the query, neighbours sharing ``overlap`` tokens; the document scores its best window.
    ``max_document_tokens`` cuts the document before windowing (Cohere v2 / vLLM ``max_tokens_per_doc``).
    """

    max_windows: int = 1
    overlap: int = 0
    max_document_tokens: int | None = None


TRUNCATE = WindowPolicy()


@dataclass(slots=True)
class EncodedRequest:
    """All windows of one request, flat; per document, where its windows start and how many there are."""

    pairs: list[EncodedPair] = field(default_factory=list)
    # Per document: its first pair's position in ``pairs`` and how many windows it has.
    first_pair: list[int] = field(default_factory=list)
    window_count: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(len(pair) for pair in self.pairs)


@dataclass(frozen=True, slots=True)
class PairTemplate:
    """Where a model's special tokens go around a pair, and the type id of every position.

    E.g. XLM-R ``<s> A </s></s> B </s>`` (all type 0), BERT ``[CLS] A [SEP] B [SEP]`` (types ``0 0… 0 1… 1``).
    Learnt from the tokenizer's own pair encoding at load (``model_dir.pair_template``), never assumed.
    """

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    first_type: int = 0
    second_type: int = 0
    # Type ids of the special tokens; empty = the type of the text they follow (prefix: the first text's).
    prefix_types: tuple[int, ...] = ()
    middle_types: tuple[int, ...] = ()
    suffix_types: tuple[int, ...] = ()

    @property
    def special_count(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def build(self, first: Sequence[int], second: Sequence[int]) -> EncodedPair:
        ids = [*self.prefix, *first, *self.middle, *second, *self.suffix]
        types = [
            *(self.prefix_types or (self.first_type,) * len(self.prefix)),
            *(self.first_type,) * len(first),
            *(self.middle_types or (self.first_type,) * len(self.middle)),
            *(self.second_type,) * len(second),
            *(self.suffix_types or (self.second_type,) * len(self.suffix)),
        ]
        return EncodedPair(ids, types)


def padded_tokens(pairs: int, longest: int, total: int) -> int:
    """A batch's cost as a padded batch at its own size: every pair padded to the longest (``Backend.batch_tokens``
    of a backend without fixed shapes or packing)."""
    return pairs * longest


def write_padded(
    pairs: Sequence[EncodedPair], input_ids: Any, attention: Any, types: Any | None, *, pad_id: int
) -> None:
    """Write ``pairs`` into the first rows of preallocated ``(rows, columns)`` integer arrays (numpy): token ids
    right-padded with ``pad_id``, attention 1 on real tokens, type ids where the model reads them (``types``).
    Rows past the pairs (a CUDA graph's fixed shape) attend to their first, pad, token: finite, and unread."""
    input_ids.fill(pad_id)
    attention.fill(0)
    attention[len(pairs) :, 0] = 1
    if types is not None:
        types.fill(0)
    for row, pair in enumerate(pairs):
        input_ids[row, : len(pair)] = pair.input_ids
        attention[row, : len(pair)] = 1
        if types is not None:
            types[row, : len(pair)] = pair.type_ids


class PairPrompt(Protocol):
    """The text an LLM reranker's recipe puts around a pair (``app/engine/recipes``): what the query and each
    document become before tokenising, and the fixed token ids around them (which may depend on the instruction)."""

    @property
    def takes_instruction(self) -> bool: ...

    def query_text(self, query: str, instruction: str | None) -> str: ...

    def document_text(self, document: str) -> str: ...

    def template(self, instruction: str | None) -> PairTemplate: ...


class PairEncoder:
    """Turns (query, documents) into model-ready pairs, truncating or windowing long documents.

    ``tokenize`` maps texts to token ids without special tokens; ``template`` places the special tokens. With a
    ``prompt`` (an LLM reranker's recipe) the texts are the prompt's and so is the template, per instruction.
    """

    def __init__(
        self,
        tokenize: Callable[[list[str]], list[list[int]]],
        template: PairTemplate,
        *,
        max_length: int,
        max_query_share: float,
        prompt: PairPrompt | None = None,
        recipe: str = "cross-encoder",
    ) -> None:
        self._tokenize = tokenize
        self.template = template
        self.prompt = prompt
        self.recipe = recipe
        self.max_length = max_length
        self.max_query_share = max_query_share
        # A query never takes more than this, so a document always keeps room beside it.
        self.max_query_tokens = self._max_query_tokens(template)

    @property
    def takes_instruction(self) -> bool:
        return self.prompt is not None and self.prompt.takes_instruction

    def _max_query_tokens(self, template: PairTemplate) -> int:
        return max(1, int((self.max_length - template.special_count) * self.max_query_share))

    def encode(
        self,
        query: str,
        documents: Sequence[str],
        policy: WindowPolicy = TRUNCATE,
        *,
        instruction: str | None = None,
    ) -> EncodedRequest:
        if not documents:
            return EncodedRequest()
        if self.prompt is None:
            template, texts = self.template, [query, *documents]
        else:
            template = self.prompt.template(instruction)
            texts = [self.prompt.query_text(query, instruction), *map(self.prompt.document_text, documents)]
        if self.max_length - template.special_count < 2:
            raise InvalidRequestError(
                f"the prompt with this instruction is {template.special_count} tokens, which leaves no room for the "
                f"query and document within {self.max_length} (RERANKER_MAX_LENGTH): send a shorter instruction",
                param="instruction",
            )
        query_ids, *document_ids = self._tokenize(texts)
        request = EncodedRequest()
        for doc_ids in document_ids:
            if policy.max_document_tokens is not None and len(doc_ids) > policy.max_document_tokens:
                doc_ids = doc_ids[: policy.max_document_tokens]
            windows, truncated = self.windows(query_ids, doc_ids, policy, template)
            request.first_pair.append(len(request.pairs))
            request.window_count.append(len(windows))
            request.truncated.append(truncated)
            for kept_query, window in windows:
                request.pairs.append(template.build(kept_query, window))
        return request

    def windows(
        self, query_ids: list[int], doc_ids: list[int], policy: WindowPolicy, template: PairTemplate | None = None
    ) -> tuple[list[tuple[list[int], list[int]]], bool]:
        """The (query, document window) token lists to score, and whether any document token was dropped.

        The template's tokens (an LLM reranker's system prompt and answer cue among them) are never cut."""
        template = template or self.template
        budget = self.max_length - template.special_count
        if len(query_ids) + len(doc_ids) <= budget:
            return [(query_ids, doc_ids)], False
        # Too long: the document gives way first; the query is cut only down to its share of the window.
        max_query_tokens = self._max_query_tokens(template)
        query_keep = min(len(query_ids), max(max_query_tokens, budget - len(doc_ids)))
        query_ids = query_ids[:query_keep]
        room = budget - query_keep
        if len(doc_ids) <= room:
            return [(query_ids, doc_ids)], False
        overlap = min(policy.overlap, room // 2)  # a window always moves forward by at least half its size
        stride = room - overlap
        windows: list[tuple[list[int], list[int]]] = []
        start = 0
        while len(windows) < policy.max_windows:
            windows.append((query_ids, doc_ids[start : start + room]))
            if start + room >= len(doc_ids):
                return windows, False
            start += stride
        return windows, True


class Backend(Protocol):
    """What the batcher and the service need from a model backend. Methods are blocking: call them in threads."""

    encoder: PairEncoder

    def forward(self, pairs: Sequence[EncodedPair]) -> list[float]:
        """Logits (float32, one per pair) for pairs of any lengths; padding is the backend's business."""
        ...

    def batch_tokens(self, pairs: int, longest: int, total: int) -> int:
        """The tokens a batch of ``pairs`` pairs (the longest ``longest`` tokens, ``total`` in all) costs as it
        runs: padded (pairs x longest, or the larger CUDA graph shape it is padded to) or packed (its tokens,
        rounded up to a graph's bucket). The batcher sizes batches by it."""
        ...

    def warm_up(self) -> None:
        """Run representative shapes once so the first real request is not slow."""
        ...

    def check(self) -> None:
        """Raise if the model cannot score right now (files gone, device error); used by readiness."""
        ...

    def describe(self) -> dict[str, str]:
        """What was loaded and how it runs (architecture, labels, max length, dtype, device, ...), for the
        start-up log and ``/v1/models``."""
        ...
