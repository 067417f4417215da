"""What the benchmark sends: RAGFlow-shaped rerank requests, and what each one costs the model.

A request is RAGFlow's OpenAI-compatible call, ``{"model", "query", "documents": [...], "top_n": len(documents)}``,
with in-vocabulary pseudo-words (one word is about one token with the benchmark model's tokenizer). Every
request's pairs are also encoded here with the service's own ``PairEncoder``, so pairs, tokens and FLOPs are
counted exactly as the model sees them (padding excluded), and identically for both servers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.engine.base import PairEncoder, WindowPolicy
from bench.flops import ModelShape, pair_flops
from tests.model_factory import make_words

MODEL_NAME = "bge-reranker-base"


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    documents: int
    min_words: int
    max_words: int
    query_words: int = 12
    options: Mapping[str, int] = field(default_factory=dict)  # extra request fields (long-document chunking)
    baseline: bool = True  # the baseline cannot chunk: chunked settings are compared with our own truncation

    def policy(self) -> WindowPolicy:
        chunks = self.options.get("max_chunks_per_doc")
        if chunks is None:
            return WindowPolicy()
        return WindowPolicy(max_windows=chunks, overlap=self.options.get("overlap_tokens", 0))

    def bodies(self, count: int) -> list[dict[str, object]]:
        """``count`` distinct requests, the same on every run (seeded by the workload's name)."""
        rng = random.Random(self.name.removesuffix("-chunk"))  # chunked and truncated long settings share texts
        out = []
        for _ in range(count):
            query = make_words(self.query_words, seed=rng.randrange(1 << 30))
            documents = [
                make_words(rng.randint(self.min_words, self.max_words), seed=rng.randrange(1 << 30))
                for _ in range(self.documents)
            ]
            out.append(
                {"model": MODEL_NAME, "query": query, "documents": documents, "top_n": len(documents), **self.options}
            )
        return out


WORKLOADS = {
    w.name: w
    for w in (
        Workload("target", "16 documents of ~100 words (the target setting)", 16, 95, 105),
        Workload("mixed16", "16 documents of 50-450 tokens", 16, 50, 450),
        Workload("mixed64", "64 documents of 50-450 tokens", 64, 50, 450),
        Workload("gpu64", "64 documents of ~256 tokens (the GPU goal's setting)", 64, 235, 250),
        Workload("long", "16 documents of ~1500 tokens, truncated to 512", 16, 1450, 1550),
        Workload(
            "long-chunk",
            "the same 16 documents, max_chunks_per_doc=4, overlap_tokens=80",
            16,
            1450,
            1550,
            options={"max_chunks_per_doc": 4, "overlap_tokens": 80},
            baseline=False,
        ),
    )
}


@dataclass(frozen=True)
class RequestCost:
    """What one request makes the model do (no padding counted)."""

    documents: int
    windows: int  # pairs run through the model (> documents when documents are chunked)
    tokens: int
    flops: float


@dataclass(frozen=True)
class PreparedWorkload:
    workload: Workload
    bodies: list[bytes]  # encoded once, so the load generator spends no time on JSON
    costs: list[RequestCost]


def prepare(workload: Workload, count: int, encoder: PairEncoder, shape: ModelShape) -> PreparedWorkload:
    bodies = workload.bodies(count)
    costs = []
    for body in bodies:
        documents = body["documents"]
        assert isinstance(documents, list)
        encoded = encoder.encode(str(body["query"]), documents, workload.policy())
        lengths = [len(pair) for pair in encoded.pairs]
        costs.append(
            RequestCost(len(documents), len(lengths), sum(lengths), sum(pair_flops(n, shape) for n in lengths))
        )
    return PreparedWorkload(workload, [json.dumps(body).encode() for body in bodies], costs)


def load_encoder(model_dir: Path, *, max_length: int = 512, max_query_share: float = 0.5) -> PairEncoder:
    """The service's own pair encoder on the model's tokenizer (the service's defaults for length and query share)."""
    from app.engine.model_dir import open_model_dir

    encoder, _, _ = open_model_dir(model_dir, max_length=max_length, max_query_share=max_query_share)
    return encoder
