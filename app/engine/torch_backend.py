"""The PyTorch backend: loads a local cross-encoder directory offline and scores batches of pairs.

How it runs, and why (measured on bge-reranker-base's shape with ``python -m bench.run``; README, "Benchmark"):

- Every device: the last layer runs for the first token only (``first_token.py``): the score reads nothing
  else, so the same answer for ~7 % fewer FLOPs (10 % faster on the CPU); checked on a probe batch at load.
- CUDA: float16 weights and activations, SDPA (fused) attention, one forward pass per batcher batch, replayed
  from CUDA graphs. BERT, RoBERTa and XLM-RoBERTa models run packed batches (``packed.py``: no padding, attention
  pair by pair with FlashAttention's varlen kernel); other models, padded batches in graph buckets
  (``cuda_graphs.py``). With RERANKER_DTYPE=bfloat16, float32 weights under bf16 autocast, as on the CPU
  (padded batches): bf16 weights and activations throughout swapped clearly separated pairs on an H200
  (tests/test_precision.py).
- CPU with native bf16 (AVX512-BF16 / AMX): float32 weights under ``torch.autocast(bfloat16)``. oneDNN runs
  the matrix products in bf16 at twice its best float32 rate (4-5x what eager float32, MKL's sgemm, gets on
  a 2-core EPYC), while layer norms, softmax and the residual stream stay float32, so scores land closer to
  float32 than with bf16 weights, at the same speed once compiled.
- CPU: ``torch.compile`` (inductor, frozen weights) prepacks the bf16 weights for oneDNN once and fuses the
  element-wise work (GELU, bias, residual, casts) around the matrix products: 15-20 % faster than eager. One
  graph serves every batch shape (dynamic sizes; the batch dimension unbacked, so one pair needs no 2nd graph).
  Compiled, plain attention beats the SDPA kernel there; without a compiler it falls back to eager + SDPA.
- CPU: a batch runs in slices of at most ``CPU_SLICE_TOKENS`` padded tokens. Two to four thousand tokens
  already keep the cores' matrix units busy; bigger slices spill activations out of the caches (16k-token
  passes ran ~15 % slower) and, length-sorted, each slice pads only to its own longest pair.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Nothing is ever fetched at run time; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no progress bars in service logs
# inductor names its default cache directory after the user, which a container's bare uid may not have.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor-{os.getuid()}"))

import numpy as np
import torch

from app.config import Compile, Device, DType, Settings, model_dir_problem
from app.cpus import usable_cpus
from app.engine.base import EncodedPair, padded_tokens, write_padded
from app.engine.cuda_graphs import CudaGraphs
from app.engine.first_token import FIRST_TOKEN_HEADS, prune_last_layer, restore_last_layer
from app.engine.last_token import MIN_SHARED_PREFIX, LastTokenScorer, common_prefix
from app.engine.model_dir import ModelLoadError, encoder_settings, open_model_dir
from app.engine.packed import PackedGraphs, PackedModel, packable

__all__ = ["ModelLoadError", "TorchBackend"]

logger = logging.getLogger(__name__)

# Padded tokens per forward pass on the CPU (see the module docstring).
CPU_SLICE_TOKENS = 4096


# Where the kernel lists the CPU's features ("flags" lines on x86).
CPUINFO = Path("/proc/cpuinfo")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 beats float32. Elsewhere
    (AVX2-only x86, ARM, an unreadable cpuinfo) bf16 is emulated and several times slower than float32."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return False
    flags = {
        flag
        for line in text.splitlines()
        if line.startswith("flags") and ":" in line
        for flag in line.split(":", 1)[1].split()
    }
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _has_cxx_compiler() -> bool:
    """Whether inductor can build CPU kernels here. Without one, ``auto`` skips compiling at once instead of
    spending half a minute on a compile that must fail (the CPU image may ship no compiler)."""
    import shutil

    candidates = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    found = any(name and shutil.which(name) for name in candidates)
    if not found:
        logger.info("no C++ compiler found: the forward pass runs eagerly (RERANKER_TORCH_COMPILE=auto)")
    return found


def _load_failure(path: Path, error: Exception) -> str:
    """One line for a model whose weights cannot be loaded: the path, the reason, the fix."""
    if isinstance(error, PermissionError):
        return (
            f"model directory {path}: permission denied reading {Path(error.filename or '').name or 'the weights'} "
            f"as uid {os.getuid()}; fix: chmod -R a+rX {path}"
        )
    message = " ".join(str(error).split())[:300]
    return (
        f"cannot load the model from {path}: {type(error).__name__}: {message}; fix: check that the weights "
        "(model.safetensors or pytorch_model.bin) are complete (download the model again)"
    )


def resolve_device(device: Device) -> torch.device:
    if device is Device.cuda and not torch.cuda.is_available():
        raise ModelLoadError("RERANKER_DEVICE=cuda but no CUDA device is visible (check the GPU reservation)")
    if device is Device.cuda or (device is Device.auto and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype is DType.auto:
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if dtype is DType.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "RERANKER_DTYPE=bfloat16 on a CPU without bf16 matrix instructions (AVX512-BF16 or AMX): bf16 is "
            "emulated here and several times slower than float32; unset RERANKER_DTYPE for float32"
        )
    return {DType.float32: torch.float32, DType.float16: torch.float16, DType.bfloat16: torch.bfloat16}[dtype]


def weights_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype the weights are kept in: float32 under bf16 autocast (CPU and CUDA), else the compute dtype.

    bf16 weights and activations throughout (8 significant bits in the residual stream and layer norms) swap
    clearly separated documents; under autocast only the matrix products round to bf16.
    """
    return torch.float32 if compute is torch.bfloat16 else compute


class Float32Head(torch.nn.Module):
    """Runs a classification head outside autocast, in float32.

    Under bf16 autocast the head's last projection would return a bf16 logit: 8 significant bits, a step of
    0.03 at a logit of 5, visible in the [0, 1] score. The head is two small products on the first token only,
    so float32 costs nothing.
    """

    def __init__(self, head: torch.nn.Module, device_type: str) -> None:
        super().__init__()
        self.head = head
        self.device_type = device_type

    def forward(self, features: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, enabled=False):
            return self.head(features.float(), **kwargs)  # type: ignore[no-any-return]


def slices(lengths: Sequence[int], budget: int | None) -> Iterator[tuple[int, int]]:
    """Consecutive ``[start, stop)`` runs whose padded size (count × longest) stays within ``budget`` tokens."""
    start, widest = 0, 0
    for position, length in enumerate(lengths):
        widest = max(widest, length)
        if budget is not None and position > start and (position - start + 1) * widest > budget:
            yield start, position
            start, widest = position, length
    if start < len(lengths):
        yield start, len(lengths)


class TorchBackend:
    """A sequence-classification cross-encoder on one device. Thread-safe for concurrent ``forward`` calls."""

    def __init__(self, settings: Settings, *, model_copies: int | None = None) -> None:
        """``model_copies``: how many copies of the model share this machine's cores (default: one per worker,
        as inline workers each hold one; an engine process is the only one)."""
        self.model_path = settings.model_directory
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)  # the dtype of the matrix products
        self.weights_dtype = weights_dtype(self.dtype)
        self.slice_tokens = CPU_SLICE_TOKENS if self.device.type == "cpu" else None
        if self.device.type == "cpu":
            copies = model_copies or settings.worker_processes
            threads = settings.torch_threads or max(1, usable_cpus() // copies)
            torch.set_num_threads(threads)
        # The tokenizer side first: it refuses a directory the service cannot serve before any weight is read.
        self.encoder, self.info, hf_tokenizer = open_model_dir(settings.model_directory, **encoder_settings(settings))
        self.compile_mode = settings.torch_compile
        # LLM rerankers run eagerly unless compiling is asked for: their compile on the CPU (dynamic shapes over
        # a 28-layer decoder) has not been measured to pay for its start-up.
        self.compiled = self.compile_mode is Compile.on or (
            self.compile_mode is Compile.auto
            and self.device.type == "cpu"
            and not self.info.decoder
            and _has_cxx_compiler()
        )
        # Compiled on the CPU, plain attention (matmul, softmax, matmul) beats the SDPA kernel: inductor fuses
        # the scaling, mask and softmax, and the products go to oneDNN (7 % faster on 126-token pairs).
        self.attention = "eager" if self.compiled and self.device.type == "cpu" else "sdpa"
        self.pad_id = int(hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0)
        self.uses_type_ids = self.info.uses_type_ids
        # A decoder's scorer reads one row already (a 2-label *-seq-cls's difference included).
        self.num_labels = 1 if self.info.decoder else self.info.num_labels
        self.model = self._load(settings.model_directory)
        if self.weights_dtype != self.dtype and isinstance(getattr(self.model, "classifier", None), torch.nn.Module):
            self.model.classifier = Float32Head(self.model.classifier, self.device.type)
        # Before compiling: the compiled graph is of the pruned model.
        self.first_token_last_layer = self._prune_last_layer()
        # LLM rerankers on the CPU: a batch's common prefix runs once (last_token.py), if it scores the same.
        self.shared_prefix = (
            settings.share_prefix and self.info.decoder and self.device.type == "cpu" and self._check_shared_prefix()
        )
        # CUDA graphs, captured by warm_up(): of packed batches (packed.py) where the model allows, else of
        # padded ones (cuda_graphs.py).
        self.graphs: CudaGraphs | None = None
        self.packed_graphs: PackedGraphs | None = None
        self._want_graphs = self.device.type == "cuda" and settings.cuda_graphs
        self._want_packed = settings.packed_batches
        self._max_batch_pairs = settings.max_batch_pairs
        self._max_batch_tokens = settings.max_batch_tokens
        # What runs a batch: the model itself, or its compiled graph (compiled lazily, by warm_up()).
        self._run: Callable[..., Any] = self.model
        if self.compiled:
            self._run = self._compiled_model()

    def _padded_probe(self) -> list[EncodedPair]:
        """Pairs of different lengths, so a batch of them is padded and the mask is exercised: what the load-time
        checks (first-token last layer, CUDA graphs) compare against the plain model."""
        return self.encoder.encode(
            "which passage mentions the harbour", ["the harbour was busy", "a short one", "x " * 40]
        ).pairs

    def _prune_last_layer(self) -> bool:
        """Run the last layer for the first token only (first_token.py) if the model is laid out for it and a
        probe batch scores the same both ways; otherwise leave the model as it was."""
        if getattr(self.model.config, "model_type", None) not in FIRST_TOKEN_HEADS:
            return False  # no first-token head (DeBERTa, ModernBERT, LLM rerankers): no probe pass to pay for
        probe = self._padded_probe()
        full = np.array(self._forward(probe, self.model, autocast=False))
        original = prune_last_layer(self.model, float32_path=self.weights_dtype != self.dtype)
        if original is None:
            return False
        try:
            pruned = np.array(self._forward(probe, self.model, autocast=False))
        except Exception as error:  # a transformers version whose layer contract differs: keep the whole layer
            restore_last_layer(self.model, original)
            logger.warning(
                "scoring the last layer for the first token only failed on a probe batch (%s: %s); "
                "running the whole last layer",
                type(error).__name__,
                error,
            )
            return False
        # The same arithmetic in the weights' dtype: float32 agrees to ~1e-5, half precision to its rounding.
        # A model whose head reads more than the first token would be off by far more.
        tolerance = (1e-3 if self.weights_dtype == torch.float32 else 3e-2) * max(1.0, float(np.abs(full).max()))
        difference = float(np.abs(pruned - full).max())
        if not difference <= tolerance:
            restore_last_layer(self.model, original)
            logger.warning(
                "scoring the last layer for the first token only moved a probe logit by %.3g; "
                "running the whole last layer",
                difference,
            )
            return False
        return True

    def _probe_tolerance(self, reference: np.ndarray) -> float:
        """How far a decoder's probe logits may move between two ways of computing the same arithmetic: rounding
        in the dtype of the matrix products."""
        return (1e-3 if self.dtype == torch.float32 else 3e-2) * max(1.0, float(np.abs(reference).max()))

    def _check_shared_prefix(self) -> bool:
        """Whether running a batch's common prefix once scores a probe batch as whole pairs do."""
        probe = self._padded_probe()
        whole = np.array(self._forward(probe, self.model))
        try:
            shared = np.array(self._forward_shared(probe, common_prefix(probe)))
        except Exception as error:  # a transformers version whose cache differs: whole pairs
            logger.warning("a shared prefix failed on a probe batch (%s: %s); whole pairs", type(error).__name__, error)
            return False
        difference = float(np.abs(shared - whole).max())
        if not difference <= self._probe_tolerance(whole):
            logger.warning("a shared prefix moved a probe logit by %.3g; whole pairs", difference)
            return False
        return True

    def _forward_shared(self, pairs: Sequence[EncodedPair], shared: int) -> list[float]:
        """Scores of ``pairs``, whose first ``shared`` tokens are the same, that prefix run once."""
        prefix = torch.tensor([list(pairs[0].input_ids[:shared])], dtype=torch.long, device=self.device)
        rests = self._padded_inputs([EncodedPair(pair.input_ids[shared:], pair.type_ids[shared:]) for pair in pairs])
        with torch.inference_mode(), self._autocast():
            output = self.model.forward_shared(prefix, rests["input_ids"], rests["attention_mask"])
        return self._scores(output.logits)

    def _compiled_model(self) -> Callable[..., Any]:
        import torch._inductor.config as inductor_config

        compiled = torch.compile(self.model, dynamic=True)

        def run(**inputs: torch.Tensor) -> Any:
            # Frozen weights become constants: their bf16 casts are folded and oneDNN prepacks them once, at
            # compile time (25 % faster than unfrozen). Patched around each call, not set once: inductor's
            # config is thread-local, and the first call (the compile) may come from any thread. Passing
            # options={"freezing": True} to torch.compile does not reach it (measured).
            with inductor_config.patch(freezing=True):
                return compiled(**inputs)  # type: ignore[no-untyped-call]

        return run

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.weights_dtype != self.dtype:
            return torch.autocast(device_type=self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def _auto_class(self) -> Any:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        causal = self.info.architecture.endswith("ForCausalLM")
        return AutoModelForCausalLM if causal else AutoModelForSequenceClassification

    def _load(self, path: Path) -> Any:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        started = time.perf_counter()
        try:
            model = self._auto_class().from_pretrained(
                path, local_files_only=True, dtype=self.weights_dtype, attn_implementation=self.attention
            )
        except ValueError as error:
            if "attn_implementation" not in str(error) and "does not support" not in str(error):
                raise ModelLoadError(f"cannot load the model from {path}: {error}") from None
            # Some architectures (DeBERTa-v2) have no SDPA kernel: their own attention is the one that exists.
            model = self._load_default_attention(path)
        except Exception as error:
            raise ModelLoadError(_load_failure(path, error)) from None
        model.to(self.device).eval()
        if self.info.decoder:
            model = self._last_token_scorer(model, path)
        logger.info(
            "loaded %s (recipe %s: %s; labels %s, max length %d) from %s on %s (weights %s, matrix products %s, "
            "attention %s) in %.1fs",
            self.info.architecture,
            self.info.recipe.name,
            self.info.recipe_evidence,
            self.info.num_labels,
            self.info.max_length,
            path,
            self.device,
            str(self.weights_dtype).removeprefix("torch."),
            str(self.dtype).removeprefix("torch."),
            model.config._attn_implementation,
            time.perf_counter() - started,
        )
        return model

    def _last_token_scorer(self, model: Any, path: Path) -> LastTokenScorer:
        """The decoder as one logit per pair (last_token.py; the vocabulary-wide head goes), refused unless it
        gives, on right-padded probe pairs, the logits transformers' own model gives each pair alone."""
        answer = self.info.recipe.answer_tokens() if self.info.architecture.endswith("ForCausalLM") else None
        probe = self._padded_probe()
        with torch.inference_mode(), self._autocast():
            expected = []
            for pair in probe:
                logits = model(input_ids=torch.tensor([list(pair.input_ids)], device=self.device)).logits.float()
                if answer is None:  # a *ForSequenceClassification: its own pooled logits
                    row = logits[0]
                    expected.append(float(row[1] - row[0]) if row.shape[0] == 2 else float(row[0]))
                else:
                    last = logits[0, -1]
                    expected.append(float(last[answer[0]] - (last[answer[1]] if answer[1] is not None else 0.0)))
        try:
            scorer = LastTokenScorer(model, answer).to(self.device).eval()
        except ValueError as error:
            raise ModelLoadError(f"cannot score the model in {path} with its recipe: {error}") from None
        self.model = scorer  # what _forward runs
        scored = np.array(self._forward(probe, scorer))
        difference = float(np.abs(scored - np.array(expected)).max())
        # The same arithmetic but for the padding (masked) and the one-row head (float32 here; under bf16 autocast
        # transformers' vocabulary head rounds its logits to bf16): rounding apart.
        if not difference <= self._probe_tolerance(np.array(expected)):
            raise ModelLoadError(
                f"the {self.info.recipe.name} scorer of the model in {path} moved a probe logit by {difference:.3g} "
                "against transformers' own model: refusing to serve wrong scores; fix: report this model and "
                "transformers version"
            )
        return scorer

    def _load_default_attention(self, path: Path) -> Any:
        try:
            model = self._auto_class().from_pretrained(path, local_files_only=True, dtype=self.weights_dtype)
        except Exception as error:
            raise ModelLoadError(_load_failure(path, error)) from None
        self.attention = str(model.config._attn_implementation)
        return model

    @property
    def _serving_graphs(self) -> PackedGraphs | CudaGraphs | None:
        """The graphs batches replay from: packed where captured, else padded, else none (eager)."""
        return self.packed_graphs if self.packed_graphs is not None else self.graphs

    def batch_tokens(self, pairs: int, longest: int, total: int) -> int:
        graphs = self._serving_graphs
        return (graphs.batch_tokens if graphs is not None else padded_tokens)(pairs, longest, total)

    def forward(self, pairs: Sequence[EncodedPair]) -> list[float]:
        # The batcher hands pairs sorted by length, so each slice pads only to its own longest pair.
        scores: list[float] = []
        for start, stop in slices([len(pair) for pair in pairs], self.slice_tokens):
            part = pairs[start:stop]
            shared = common_prefix(part) if self.shared_prefix else 0
            if shared >= MIN_SHARED_PREFIX:
                scores.extend(self._forward_shared(part, shared))
            else:
                scores.extend(self._forward(part, self._run, graphs=True))
        return scores

    def _forward(
        self, pairs: Sequence[EncodedPair], run: Callable[..., Any], *, autocast: bool = True, graphs: bool = False
    ) -> list[float]:
        # Graphs only from forward(): their static buffers belong to the one forward thread, and readiness
        # probes (check()) run beside it.
        if graphs and self.packed_graphs is not None:
            replayed = self.packed_graphs.run(pairs)
            if replayed is not None:
                return self._scores(replayed)
        if graphs and self.graphs is not None:
            replayed = self.graphs.run(pairs)
            if replayed is not None:
                return self._scores(replayed)
        inputs = self._padded_inputs(pairs)
        if run is not self.model:
            for tensor in inputs.values():
                # Any batch size, 1 included, reuses the one compiled graph (no 0/1 specialisation).
                torch._dynamo.decorators.mark_unbacked(tensor, 0)
        with torch.inference_mode(), self._autocast() if autocast else contextlib.nullcontext():
            return self._scores(run(**inputs).logits)

    def _padded_inputs(self, pairs: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        """The model's inputs for ``pairs`` padded to their own longest, on the device."""
        shape = (len(pairs), max(len(pair) for pair in pairs))
        input_ids, attention = np.empty(shape, dtype=np.int64), np.empty(shape, dtype=np.int64)
        types = np.empty(shape, dtype=np.int64) if self.uses_type_ids else None
        write_padded(pairs, input_ids, attention, types, pad_id=self.pad_id)
        inputs = {
            "input_ids": torch.from_numpy(input_ids).to(self.device, non_blocking=True),
            "attention_mask": torch.from_numpy(attention).to(self.device, non_blocking=True),
        }
        if types is not None:
            inputs["token_type_ids"] = torch.from_numpy(types).to(self.device, non_blocking=True)
        return inputs

    def _scores(self, logits: torch.Tensor) -> list[float]:
        logits = logits.float()  # float32 before the sigmoid: no bf16/fp16 ties
        if self.num_labels == 2:
            # log-odds of "relevant", so sigmoid(logit) is the softmax probability of label 1
            logits = logits[:, 1] - logits[:, 0]
        else:
            logits = logits[:, 0]
        return [float(value) for value in logits.cpu().numpy()]

    def warm_up(self) -> None:
        started = time.perf_counter()
        if self.compiled:
            self._compile_now()
        wants_graphs = self._want_graphs and self.graphs is None and self.packed_graphs is None
        if wants_graphs and not (self._want_packed and self._capture_packed_graphs()):
            self._capture_graphs()
        encoder = self.encoder
        for words, batch in ((8, 1), (60, 8), (encoder.max_length, 2)):
            text = " ".join(["warm"] * words)
            request = encoder.encode("warm up", [text] * batch)
            self.forward(request.pairs)
        logger.info("warmed up in %.2fs", time.perf_counter() - started)

    def _capture_packed_graphs(self) -> bool:
        """Capture the packed graphs and check them on padded probe batches against the padded eager model;
        False (and a warning where the model could have run packed) to serve padded batches instead."""
        reason = packable(self.model, self.device, self.dtype, self.weights_dtype)
        if reason is not None:
            logger.info("padded batches: %s", reason)
            return False
        graphs = PackedGraphs(
            PackedModel(self.model, pad_id=self.pad_id, uses_type_ids=self.uses_type_ids),
            self.device,
            max_length=self.encoder.max_length,
            max_batch_pairs=self._max_batch_pairs,
            max_batch_tokens=self._max_batch_tokens,
        )
        try:
            graphs.capture()
            probes = [self._padded_probe(), self._long_probe(graphs)]
            for probe in probes:
                eager = np.array(self._forward(probe, self.model))
                replayed = graphs.run(probe)
                if replayed is None:
                    raise RuntimeError(f"no captured shape holds a probe batch of {len(probe)} pairs")
                difference = float(np.abs(np.array(self._scores(replayed)) - eager).max())
                # The same arithmetic on the same tokens, bar the padding and the kernels: rounding apart.
                if not difference <= 3e-2 * max(1.0, float(np.abs(eager).max())):
                    logger.warning("packed batches moved a probe logit by %.3g; batches run padded", difference)
                    return False
        except Exception as error:
            logger.warning(
                "packed batches could not be captured, batches run padded: %s: %s", type(error).__name__, error
            )
            return False
        self.packed_graphs = graphs
        return True

    def _long_probe(self, graphs: PackedGraphs) -> list[EncodedPair]:
        """Up to 40 pairs of spread lengths up to the longest, as many as the largest bucket holds: a full-size
        packed batch for the load-time check."""
        documents = [" ".join(["harbour"] * ((graphs.max_length * n) // 40)) for n in range(1, 41)]
        pairs = self.encoder.encode("which passage mentions the harbour", documents).pairs
        pairs = [pair for pair in pairs if len(pair) <= graphs.max_length]
        while len(pairs) > 1 and graphs.bucket(len(pairs), sum(map(len, pairs)), max(map(len, pairs))) is None:
            pairs = pairs[:-1]
        return pairs

    def _capture_graphs(self) -> None:
        """Capture the CUDA graphs and check them on a padded probe batch against the eager model; on any
        failure or difference serve eagerly (slower small batches, the same scores)."""
        graphs = CudaGraphs(
            self.model,
            self.device,
            max_length=self.encoder.max_length,
            max_batch_pairs=self._max_batch_pairs,
            max_batch_tokens=self._max_batch_tokens,
            pad_id=self.pad_id,
            uses_type_ids=self.uses_type_ids,
        )
        probe = self._padded_probe()
        try:
            with self._autocast():
                graphs.capture()
            eager = np.array(self._forward(probe, self.model))
            replayed = graphs.run(probe)
            if replayed is None:
                raise RuntimeError("no captured shape holds the probe batch")
            difference = float(np.abs(np.array(self._scores(replayed)) - eager).max())
        except Exception as error:
            logger.warning(
                "CUDA graphs could not be captured, every batch runs eagerly: %s: %s", type(error).__name__, error
            )
            return
        # The same kernels on the same pairs, bar the padding: they differ by rounding only.
        tolerance = 3e-2 * max(1.0, float(np.abs(eager).max()))
        if not difference <= tolerance:
            logger.warning("CUDA graphs moved a probe logit by %.3g; every batch runs eagerly", difference)
            return
        self.graphs = graphs

    def _compile_now(self) -> None:
        """Compile on a first batch; with ``auto``, a failure (no C++ compiler, say) falls back to eager."""
        started = time.perf_counter()
        pairs = self.encoder.encode("warm up", ["compile", "the forward pass"]).pairs
        try:
            compiled = self._forward(pairs, self._run)
        except Exception as error:
            if self.compile_mode is Compile.on:
                raise ModelLoadError(f"torch.compile failed (RERANKER_TORCH_COMPILE=on): {error}") from error
            logger.warning("torch.compile failed, running eagerly: %s: %s", type(error).__name__, error)
            self._run, self.compiled = self.model, False
            with contextlib.suppress(Exception):  # an architecture without SDPA keeps the attention it has
                self.model.set_attn_implementation("sdpa")  # eagerly, the fused kernel is the faster one
                self.attention = "sdpa"
            return
        eager = self._forward(pairs, self.model)
        logger.info(
            "compiled the forward pass in %.1fs (max |compiled - eager| logit %.2g)",
            time.perf_counter() - started,
            float(np.max(np.abs(np.subtract(compiled, eager)))),
        )

    def check(self) -> None:
        problem = model_dir_problem(self.model_path)
        if problem:
            raise RuntimeError(problem)
        request = self.encoder.encode("health", ["check"])
        # Eagerly: readiness probes run beside the batcher's forward thread, and the compiled graph is only
        # ever run from that one thread.
        scores = self._forward(request.pairs, self.model)
        if not np.isfinite(scores).all():
            raise RuntimeError("the model returned a non-finite score")

    def describe(self) -> dict[str, str]:
        graphs = self._serving_graphs
        return {
            **self.info.describe(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights": str(self.weights_dtype).removeprefix("torch."),
            "compiled": str(self.compiled).lower(),
            "attention": self.attention,
            "first_token_last_layer": str(self.first_token_last_layer).lower(),
            "packed_batches": str(self.packed_graphs is not None).lower(),
            "shared_prefix": str(self.shared_prefix).lower(),
            "cuda_graphs": str(len(graphs) if graphs is not None else 0),
            "threads": str(torch.get_num_threads()),
        }
