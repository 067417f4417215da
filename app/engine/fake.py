"""A deterministic model without torch, for fast API and batcher tests.

It tokenises on whitespace and scores a pair by word overlap, so tests know the right ranking in advance:
the document sharing more words with the query scores higher. It goes through the same ``PairEncoder``,
batcher and service as the real backend.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence

from app.engine.base import EncodedPair, PairEncoder, PairTemplate, padded_tokens

FAKE_TEMPLATE = PairTemplate(prefix=(0,), middle=(2, 2), suffix=(2,))


def _token_id(word: str) -> int:
    return 10 + zlib.crc32(word.lower().encode()) % 100_000


def fake_tokenize(texts: list[str]) -> list[list[int]]:
    return [[_token_id(word) for word in text.split()] for text in texts]


class FakeBackend:
    """Logit = 4 × (share of the query's words found in the document window) − 2."""

    def __init__(self, *, max_length: int = 512, max_query_share: float = 0.5, forward_delay_s: float = 0.0) -> None:
        self.encoder = PairEncoder(fake_tokenize, FAKE_TEMPLATE, max_length=max_length, max_query_share=max_query_share)
        self.forward_delay_s = forward_delay_s
        self.batches: list[list[int]] = []  # lengths of the pairs in every forward call, for batcher tests
        self.healthy = True
        self.fail_next_forward = False
        self._lock = threading.Lock()

    def batch_tokens(self, pairs: int, longest: int, total: int) -> int:
        return padded_tokens(pairs, longest, total)  # no fixed shapes: a batch runs at its own size

    def forward(self, pairs: Sequence[EncodedPair]) -> list[float]:
        if self.fail_next_forward:
            self.fail_next_forward = False
            raise RuntimeError("simulated device failure")
        with self._lock:
            self.batches.append([len(pair) for pair in pairs])
        if self.forward_delay_s:
            time.sleep(self.forward_delay_s)
        return [self._logit(pair) for pair in pairs]

    @staticmethod
    def _logit(pair: EncodedPair) -> float:
        ids = pair.input_ids
        middle = next((i for i in range(1, len(ids) - 1) if ids[i] == 2 and ids[i + 1] == 2), None)
        if middle is None:  # not built by the template (hand-made test pairs): no query words
            return -2.0
        query, document = set(ids[1:middle]), set(ids[middle + 2 : -1])
        share = len(query & document) / len(query) if query else 0.0
        return 4.0 * share - 2.0

    def warm_up(self) -> None:
        self.forward(self.encoder.encode("warm", ["up"]).pairs)

    def check(self) -> None:
        if not self.healthy:
            raise RuntimeError("fake backend marked unhealthy")

    def describe(self) -> dict[str, str]:
        return {"device": "fake", "dtype": "float32", "max_length": str(self.encoder.max_length)}
