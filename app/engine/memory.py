"""Will the served models fit? An estimate made before any weight is read, so that a set of models too large for
the device is refused at start in one line (naming each model and what it needs) instead of running out of
memory on the first large batch, or at the third model's load after minutes of loading the first two.

Per model, per copy (inline CPU workers each hold one copy of every model; an engine process holds one):

- weights: the parameters counted from the safetensors headers (no tensor is read), at the bytes per parameter
  they are kept in (``torch_backend.weights_dtype``: 2 under float16, else 4; bf16 autocast keeps float32
  weights);
- activations: one full batch of ``RERANKER_MAX_BATCH_TOKENS`` tokens through one layer at a time (inference
  keeps no layer's activations for the next): the feed-forward's and the projections' outputs per token, plus
  the attention scores of padded pairs of the maximum length; on a GPU twice that, for the CUDA graphs' memory
  pool and the caching allocator's slack.

It is an estimate: ``RERANKER_MEMORY_LIMIT_MB`` states what may be used when the device's free memory is not the
right budget (a GPU shared with another service, a host running RAGFlow beside the reranker).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from app.config import BackendKind, Device, DType, EngineMode, Settings

GIB = 1024**3
MIB = 1024**2
GPU_ACTIVATION_FACTOR = 2  # CUDA graph pools and allocator slack over one batch's live activations
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class MemoryRefusal(Exception):
    """The served models do not fit; ``str()`` is one line naming each model and what it needs."""


@dataclass(frozen=True, slots=True)
class MemoryNeed:
    name: str
    path: Path
    parameters: int
    weight_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


def count_parameters(model_dir: Path) -> int:
    """Parameters in the weights files, from the safetensors headers (or pickled files' sizes, read as float32
    unless config.json names another dtype)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return sum(_safetensors_parameters(model_dir / shard) for shard in shards)
    if (model_dir / "model.safetensors").is_file():
        return _safetensors_parameters(model_dir / "model.safetensors")
    pickled = [model_dir / "pytorch_model.bin"] if (model_dir / "pytorch_model.bin").is_file() else []
    pickled_index = model_dir / "pytorch_model.bin.index.json"
    if pickled_index.is_file():
        pickled = [
            model_dir / shard for shard in sorted(set(json.loads(pickled_index.read_text())["weight_map"].values()))
        ]
    config = _config(model_dir)
    stored = config.get("torch_dtype") or config.get("dtype") or "float32"
    per_parameter = 2 if stored in ("float16", "bfloat16") else 4
    return sum(path.stat().st_size for path in pickled) // per_parameter


def _safetensors_parameters(path: Path) -> int:
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(min(length, 100 * MIB)))
        return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    except (ValueError, TypeError, KeyError, struct.error, AttributeError):
        # Not a readable safetensors file: the loader says so with the path; here its size stands in (float32).
        return path.stat().st_size // 4


def _config(model_dir: Path) -> dict[str, object]:
    config: dict[str, object] = json.loads((model_dir / "config.json").read_text())
    return config


def _int(config: dict[str, object], *names: str, default: int) -> int:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return default


def estimate(settings: Settings, *, device: str) -> MemoryNeed:
    """One copy of the model ``settings`` serve (``Settings.for_model``) on ``device`` ("cuda" or "cpu")."""
    model_dir = settings.model_directory
    parameters = count_parameters(model_dir)
    half = settings.dtype is DType.float16 or (settings.dtype is DType.auto and device == "cuda")
    weight_bytes = parameters * (2 if half else 4)
    config = _config(model_dir)
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        config = {**config, **text_config}
    hidden = _int(config, "hidden_size", "d_model", default=1024)
    intermediate = _int(config, "intermediate_size", default=4 * hidden)
    heads = _int(config, "num_attention_heads", default=16)
    positions = _int(config, "max_position_embeddings", default=settings.max_length)
    pair_length = min(settings.max_length, positions)
    activation_dtype_bytes = 4 if settings.dtype is DType.float32 else 2
    tokens = settings.max_batch_tokens
    per_layer = tokens * (intermediate + 6 * hidden) + tokens * heads * pair_length
    activation_bytes = per_layer * activation_dtype_bytes * (GPU_ACTIVATION_FACTOR if device == "cuda" else 1)
    return MemoryNeed(settings.model_name, model_dir, parameters, weight_bytes, activation_bytes)


def host_available_bytes() -> int:
    """Memory this process may still take on the host: MemAvailable, or a cgroup's limit less its usage when
    that is lower (a container's --memory)."""
    available = _meminfo_available()
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < 1 << 60:  # "max" or a huge v1 number: no limit
            available = min(available, int(limit_text) - usage)
        break
    return available


def _meminfo_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def runs_on_cuda(settings: Settings) -> bool:
    """Where an engine process (which has torch) will put the models."""
    if settings.device is Device.cpu:
        return False
    import torch

    return bool(torch.cuda.is_available())


def check_models_fit(settings: Settings, *, where: str, device: str | None = None, copies: int = 1) -> list[MemoryNeed]:
    """Raise :class:`MemoryRefusal` unless ``copies`` copies of every served model fit on ``device`` (None: the
    GPU when this process would use one, else the CPU). ``where`` says which check this is, for the log.

    Returns the estimates (empty for the simulated backend, which holds no weights)."""
    if settings.backend is BackendKind.simulated:
        return []
    device = device or ("cuda" if runs_on_cuda(settings) else "cpu")
    needs = [estimate(settings.for_model(served), device=device) for served in settings.served_models()]
    needed = copies * sum(need.total_bytes for need in needs)
    if settings.memory_limit_mb is not None:
        available, budget = settings.memory_limit_mb * MIB, f"RERANKER_MEMORY_LIMIT_MB={settings.memory_limit_mb}"
    elif device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        available, budget = free, f"{_gib(free)} free of the GPU's {_gib(total)}"
    else:
        available = host_available_bytes()
        budget = f"{_gib(available)} available on the host"
    if needed <= available:
        return needs
    each = ", ".join(
        f"{need.name} ({need.path}) {_gib(need.total_bytes)} = weights {_gib(need.weight_bytes)} "
        f"({need.parameters / 1e6:.0f}M parameters) + activations {_gib(need.activation_bytes)}"
        for need in needs
    )
    times = f"{copies} copies (one per worker) of " if copies > 1 else ""
    raise MemoryRefusal(
        f"the served models do not fit on the {device} ({where} check): {times}{each}; {_gib(needed)} needed, "
        f"{budget}. Serve fewer models (RERANKER_MODELS), lower RERANKER_MAX_BATCH_TOKENS, or set "
        "RERANKER_MEMORY_LIMIT_MB if this estimate is wrong for this host"
    )


def cpu_copies(settings: Settings, workers: int) -> int:
    """Copies of each model on the host: one per inline worker, one in total with an engine process."""
    return 1 if settings.engine is EngineMode.process else workers


def _gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"
