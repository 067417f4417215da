"""Prefix sharing for LLM rerankers on the CPU: one pass over the shared prompt head, then only the documents.

An instruction LLM reranker such as Qwen3-Reranker-0.6B scores each (query, document) pair as

    system prompt + "<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>:"  +  " {document}" + suffix
    score = w · h_last,   w = lm_head[yes] - lm_head[no],   h_last = final-norm hidden state at the last token

Every pair of a request starts with the same tokens (the prefix: system prompt, instruction and query, 60-100
tokens), so the prefix's keys and values are the same for all of them. Two ways to score a request of B pairs
are measured side by side, on one model, in one process:

* full: the B whole sequences (prefix + document + suffix) in one right-padded batch through the base model;
* shared prefix: the prefix once (batch 1, ``use_cache=True``), then only the B documents (+ suffix) in one
  right-padded batch, each layer attending to the prefix's keys and values (a view over the B rows) followed by
  the rows' own, with positions continuing after the prefix; the cache keeps nothing between layers, as the
  service's ``app/engine/last_token.py`` does.

Both read the hidden state at each row's last real token and dot it with ``w`` in float32; the vocabulary-wide
head is never computed. Per configuration the table gives pairs/s and ms per request (median of timed repeats
after a warm-up) and the largest score difference between the two, and between each and a per-pair unbatched
reference (each pair alone, no padding, no cache); the speed-up is the median of per-repeat ratios full/shared.
``|score|`` (the largest reference score) is the scale to read the differences against.

The model has Qwen3-Reranker-0.6B's published config (Qwen3ForCausalLM: vocab 151669, hidden 1024, 28 layers,
16 query / 8 KV heads of 128, MLP 3072, RoPE θ 1e6, tied embeddings), built in memory with random weights from
a fixed seed; ``--layers`` makes it shallower for quick runs (the cost per layer is the same, so the speed-up
of one method over the other carries over; absolute throughput scales by about 28 / layers). Token ids are
random, so no tokenizer or download is needed. The prefix is about 66 template tokens (system prompt, the
default instruction and the markers) plus the query; every document is followed by the 9 suffix tokens.

Shapes: ``--prefix-len`` (default 80) with documents of ``--doc-mean`` tokens ± ``--doc-spread`` (default
200 ± 50 %) for each ``--batch`` (default 16 and 64), and the RAGFlow request shape (a ~15-token query, so an
81-token prefix, 32 and 64 documents of 128-256 tokens) unless ``--no-ragflow``. Each runs in float32 and,
where the CPU has AVX512-BF16 or AMX, under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with float32
weights. Attention is SDPA; ``torch.inference_mode()``; threads = the CPUs this process may use.

    python -m bench.prefix_sharing --layers 4
    python -m bench.prefix_sharing --layers 28 --batch 4 --doc-mean 64 --no-ragflow --repeats 1   # 28-layer check
    python -m bench.prefix_sharing --prefix-len 80 200 400 --batch 32 --no-ragflow --json prefix-sweep.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen3Config

from app.engine.last_token import prefix_then

# Qwen/Qwen3-Reranker-0.6B's config.json (Qwen3ForCausalLM); only num_hidden_layers is ever overridden.
QWEN3_RERANKER_0_6B: dict[str, Any] = {
    "vocab_size": 151669,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 28,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
# The "yes" and "no" token ids of the Qwen3 tokenizer. With random weights any two rows would do; these keep
# w the row a real checkpoint would use.
YES_ID, NO_ID = 9693, 2152
# Token counts of the card's strings under the Qwen3 tokenizer (approximate): the system prompt block, the
# default instruction and the "<Instruct>: ", "\n<Query>: ", "\n<Document>:" markers; and the suffix
# "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n".
TEMPLATE_TOKENS = 66
SUFFIX_TOKENS = 9
RAGFLOW_QUERY_TOKENS = 15
PAD_ID = 151643  # any id works: padded positions are masked out and never read


@dataclass(frozen=True)
class Shape:
    """One request shape: a prefix of ``prefix_len`` tokens and ``batch`` documents of doc_min..doc_max tokens."""

    name: str
    prefix_len: int
    doc_min: int
    doc_max: int
    batch: int


@dataclass(frozen=True)
class Request:
    prefix: torch.Tensor  # [P] token ids
    docs: list[torch.Tensor]  # B tensors of [n_i]: " {document}" + suffix


@dataclass
class Row:
    shape: str
    dtype: str
    layers: int
    batch: int
    prefix_len: int
    doc_tokens_mean: float  # document + suffix
    prefix_doc_ratio: float
    token_ratio: float  # tokens the full path runs / tokens the shared path runs (padding excluded)
    full_pairs_s: float
    shared_pairs_s: float
    full_ms: float
    shared_ms: float
    speedup: float
    full_vs_shared: float
    full_vs_ref: float
    shared_vs_ref: float
    score_scale: float  # max |reference score|, to read the differences against
    full_times_s: list[float]
    shared_times_s: list[float]


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def has_fast_bf16(flags: set[str]) -> bool:
    # Without these, oneDNN emulates bf16 matmuls through float32 and autocast only adds conversions.
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def build_model(layers: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The base model (no lm_head) of a random-weight Qwen3-Reranker-0.6B, and w = lm_head[yes] - lm_head[no]."""
    torch.manual_seed(seed)
    config = Qwen3Config(**{**QWEN3_RERANKER_0_6B, "num_hidden_layers": layers})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.eval()
    head = model.get_output_embeddings().weight
    w = (head[YES_ID] - head[NO_ID]).detach().float().clone()
    return model.model, w


def make_request(shape: Shape, vocab: int, generator: torch.Generator) -> Request:
    prefix = torch.randint(0, vocab, (shape.prefix_len,), generator=generator)
    lengths = torch.randint(shape.doc_min, shape.doc_max + 1, (shape.batch,), generator=generator)
    docs = [torch.randint(0, vocab, (int(n) + SUFFIX_TOKENS,), generator=generator) for n in lengths]
    return Request(prefix, docs)


def right_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids [B, n_max] padded on the right, the 0/1 mask and each row's length."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask, lengths


def cache_keyword(base: torch.nn.Module) -> str:
    # transformers 5.x renamed the forward's `past_key_values` to `cache` (the old name warns, then goes);
    # 4.x only knows `past_key_values`.
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def last_token_scores(hidden: torch.Tensor, lengths: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    last = hidden[torch.arange(hidden.shape[0]), lengths - 1]
    return last.float() @ w


def score_full(base: torch.nn.Module, w: torch.Tensor, request: Request) -> torch.Tensor:
    ids, mask, lengths = right_pad([torch.cat([request.prefix, d]) for d in request.docs])
    hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return last_token_scores(hidden, lengths, w)


def score_shared(base: torch.nn.Module, w: torch.Tensor, request: Request, keyword: str) -> torch.Tensor:
    prefix_len = len(request.prefix)
    prefix_out = base(input_ids=request.prefix[None], use_cache=True)
    cache = returned_cache(prefix_out)
    for layer in cache.layers:
        # The service's own way (app/engine/last_token.py): each layer's update returns the prefix (a view over the
        # rows) followed by the rows' keys and keeps nothing. A cache that grows through the pass measured 0.78x
        # whole pairs at 28 layers here; this one 1.1x.
        layer.update = prefix_then(layer.keys, layer.values, len(request.docs))
    ids, doc_mask, lengths = right_pad(request.docs)
    # The 2D mask spans cached + new keys: all prefix keys are real, the documents' padding is not.
    mask = torch.cat([torch.ones(len(request.docs), prefix_len, dtype=doc_mask.dtype), doc_mask], dim=1)
    # Positions continue after the prefix, so RoPE sees each document token where the full sequence has it.
    positions = torch.arange(prefix_len, prefix_len + ids.shape[1])[None]
    out = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{keyword: cache})
    return last_token_scores(out.last_hidden_state, lengths, w)


def score_reference(base: torch.nn.Module, w: torch.Tensor, request: Request) -> torch.Tensor:
    scores = []
    for doc in request.docs:
        ids = torch.cat([request.prefix, doc])[None]
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state
        scores.append(hidden[0, -1].float() @ w)
    return torch.stack(scores)


@contextmanager
def precision(dtype: str) -> Iterator[None]:
    if dtype == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def timed(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_shape(
    base: torch.nn.Module, w: torch.Tensor, shape: Shape, dtype: str, layers: int, repeats: int, seed: int
) -> Row:
    generator = torch.Generator().manual_seed(seed)
    request = make_request(shape, int(QWEN3_RERANKER_0_6B["vocab_size"]), generator)
    keyword = cache_keyword(base)
    with torch.inference_mode(), precision(dtype):
        full = score_full(base, w, request)  # also the warm-up of each path
        shared = score_shared(base, w, request, keyword)
        reference = score_reference(base, w, request)
        # A second untimed call of each: the first calls of a new shape also build oneDNN kernels and grow the
        # allocator's pools, which is not what a serving process pays per request.
        score_full(base, w, request)
        score_shared(base, w, request, keyword)
        full_times, shared_times = [], []
        for _ in range(repeats):
            # Interleaved, so a slow spell on the machine hits both methods alike.
            full_times.append(timed(lambda: score_full(base, w, request)))
            shared_times.append(timed(lambda: score_shared(base, w, request, keyword)))
    full_t, shared_t = statistics.median(full_times), statistics.median(shared_times)
    doc_tokens = [len(d) for d in request.docs]
    mean_doc = sum(doc_tokens) / len(doc_tokens)
    full_tokens = sum(shape.prefix_len + n for n in doc_tokens)
    shared_tokens = shape.prefix_len + sum(doc_tokens)
    return Row(
        shape=shape.name,
        dtype=dtype,
        layers=layers,
        batch=shape.batch,
        prefix_len=shape.prefix_len,
        doc_tokens_mean=round(mean_doc, 1),
        prefix_doc_ratio=round(shape.prefix_len / mean_doc, 3),
        token_ratio=round(full_tokens / shared_tokens, 3),
        full_pairs_s=shape.batch / full_t,
        shared_pairs_s=shape.batch / shared_t,
        full_ms=full_t * 1000,
        shared_ms=shared_t * 1000,
        # The median of paired ratios: each repeat times both methods back to back, so a slow spell on a shared
        # host (seen here: the same matmul at 280 then 130 GFLOP/s within seconds) cancels out of each ratio.
        speedup=statistics.median(f / s for f, s in zip(full_times, shared_times, strict=True)),
        full_vs_shared=float((full - shared).abs().max()),
        full_vs_ref=float((full - reference).abs().max()),
        shared_vs_ref=float((shared - reference).abs().max()),
        score_scale=float(reference.abs().max()),
        full_times_s=full_times,
        shared_times_s=shared_times,
    )


def shapes_for(args: argparse.Namespace) -> list[Shape]:
    spread = round(args.doc_mean * args.doc_spread)
    shapes = [
        Shape(f"P{p} doc{args.doc_mean}±{spread}", p, args.doc_mean - spread, args.doc_mean + spread, b)
        for p in args.prefix_len
        for b in args.batch
    ]
    if not args.no_ragflow:
        p = TEMPLATE_TOKENS + RAGFLOW_QUERY_TOKENS
        shapes += [Shape("RAGFlow doc128-256", p, 128, 256, b) for b in (32, 64)]
    return shapes


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'shape':<22}{'dtype':>6}{'B':>4}{'P':>5}{'doc':>6}{'P/doc':>7}{'tok×':>6}"
        f"{'full p/s':>10}{'shared p/s':>11}{'full ms':>10}{'shared ms':>10}{'speedup':>8}"
        f"{'|f-s|':>10}{'|f-ref|':>10}{'|s-ref|':>10}{'|score|':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.shape:<22}{r.dtype:>6}{r.batch:>4}{r.prefix_len:>5}{r.doc_tokens_mean:>6.0f}{r.prefix_doc_ratio:>7.2f}"
            f"{r.token_ratio:>6.2f}{r.full_pairs_s:>10.2f}{r.shared_pairs_s:>11.2f}{r.full_ms:>10.0f}"
            f"{r.shared_ms:>10.0f}{r.speedup:>7.2f}×{r.full_vs_shared:>10.2e}{r.full_vs_ref:>10.2e}"
            f"{r.shared_vs_ref:>10.2e}{r.score_scale:>9.3f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (28 = the real depth)")
    parser.add_argument("--prefix-len", type=int, nargs="+", default=[80], help="shared prefix tokens (sweepable)")
    parser.add_argument("--doc-mean", type=int, default=200, help="mean document tokens (suffix not included)")
    parser.add_argument("--doc-spread", type=float, default=0.5, help="documents are uniform in mean·(1 ± spread)")
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="documents per request")
    parser.add_argument("--no-ragflow", action="store_true", help="skip the RAGFlow request shapes")
    parser.add_argument(
        "--dtypes", nargs="+", choices=["fp32", "bf16"], default=None, help="default: fp32, and bf16 if the CPU has it"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (after two untimed calls)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    bf16 = has_fast_bf16(flags)
    dtypes = args.dtypes or (["fp32", "bf16"] if bf16 else ["fp32"])
    if "bf16" in dtypes and not bf16:
        print("note: this CPU has neither AVX512-BF16 nor AMX: bf16 autocast runs emulated", file=sys.stderr)
    machine = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    print(
        f"{machine['cpu']}, {args.threads} threads, flags {' '.join(machine['flags'])}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; Qwen3-Reranker-0.6B config, {args.layers} of 28 layers, "
        f"random weights (seed {args.seed}), median of {args.repeats}"
    )
    base, w = build_model(args.layers, args.seed)
    rows = []
    for dtype in dtypes:
        for shape in shapes_for(args):
            rows.append(run_shape(base, w, shape, dtype, args.layers, args.repeats, args.seed))
            print(f"  done: {shape.name} B={shape.batch} {dtype}", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine, "args": vars(args) | {"json": str(args.json)}, "rows": [asdict(r) for r in rows]},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
