"""Every setting of the service, in one pydantic-settings class.

Variables are read from the environment with the prefix ``RERANKER_``; third-party variables keep their own names
(``WEB_CONCURRENCY``, ``PROMETHEUS_MULTIPROC_DIR``). An invalid value stops start-up with one line naming it
(see :func:`load_settings`).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.cpus import usable_cpus


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Compile(str, Enum):
    """Whether the forward pass runs through ``torch.compile`` (inductor)."""

    auto = "auto"
    on = "on"
    off = "off"


class EngineMode(str, Enum):
    """Where the model runs: in each HTTP worker, or in one engine process per device that workers share."""

    auto = "auto"
    process = "process"
    inline = "inline"


class BackendKind(str, Enum):
    """What scores the pairs: the PyTorch model, or a simulated accelerator (tests and benchmarks only)."""

    torch = "torch"
    simulated = "simulated"


class RecipeChoice(str, Enum):
    """How (query, document) pairs become model input and logits a score (``app/engine/recipes``)."""

    auto = "auto"
    cross_encoder = "cross-encoder"
    qwen3_reranker = "qwen3-reranker"
    bge_reranker_gemma = "bge-reranker-gemma"
    mxbai_rerank_v2 = "mxbai-rerank-v2"


class LongDocuments(str, Enum):
    """What happens to a document longer than the room left beside the query, when a request does not say."""

    truncate = "truncate"
    chunk = "chunk"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RERANKER_", extra="ignore", frozen=True, populate_by_name=True)

    # The model
    model_path: Path | None = Field(
        None, description="Local directory of the model (mounted read-only). One of it and RERANKER_MODELS is required."
    )
    model_name: str = Field("bge-reranker-base-local", description="Model id served by /v1/models and echoed.")
    models: str | None = Field(
        None,
        description=(
            "Several models side by side: name=directory,name=directory,... (names of letters, digits, . _ -). "
            "Requests choose one by their model field (404 for another name) or by the model-scoped base URL "
            "/models/{name}. When set, RERANKER_MODEL_PATH and RERANKER_MODEL_NAME are not used."
        ),
    )
    memory_limit_mb: int | None = Field(
        None,
        ge=1,
        description=(
            "Memory the models may take, in MiB; start-up refuses a set of models whose estimated weights and "
            "activations exceed it. Unset: the GPU's free memory, or on the CPU the host's available memory (a "
            "container's memory limit counted)."
        ),
    )
    recipe: RecipeChoice = Field(
        RecipeChoice.auto,
        description=(
            "How pairs are scored. auto = recognised from the model's own files: plain *ForSequenceClassification "
            "encoders as cross-encoders; Qwen3-Reranker (causal or *-seq-cls), bge-reranker-v2-gemma and "
            "mxbai-rerank-v2 with their published prompts, recognised from the model card's title or base_model "
            "(or a directory named after them); any other LLM is refused. Set it only where recognition cannot "
            "work (a renamed copy without its model card)."
        ),
    )
    instruction: str | None = Field(
        None,
        description=(
            "The instruction LLM rerankers are given when a request sends none (Qwen3-Reranker's <Instruct>, "
            "mxbai-rerank-v2's instruction line, bge-reranker-v2-gemma's prompt); unset = the model's own default."
        ),
    )
    device: Device = Field(Device.auto, description="auto picks CUDA when a GPU is visible, else the CPU.")
    dtype: DType = Field(
        DType.auto,
        description=(
            "auto = float16 on CUDA, bfloat16 on CPUs with native bf16 matrix instructions, else float32. "
            "bfloat16 on a CPU keeps float32 weights, layer norms and residuals; only matrix products run in bf16."
        ),
    )
    max_length: int = Field(512, ge=8, le=8192, description="Tokens per (query, document) pair, special ones included.")
    torch_threads: int = Field(
        0,
        ge=0,
        description="Intra-op CPU threads per worker; 0 = the CPUs this process may use (its CPU quota counted) "
        "/ workers.",
    )
    torch_compile: Compile = Field(
        Compile.auto,
        description=(
            "Compile the forward pass with torch.compile during warm-up (needs a C++ compiler on CPU; adds start-up "
            "time). auto = on for the CPU, falling back to eager if compiling fails; off on CUDA."
        ),
    )
    cuda_graphs: bool = Field(
        True,
        description=(
            "On CUDA, replay captured CUDA graphs of every batch shape within the token budget (3-6x faster small "
            "batches, full ones independent of CPU load; captured during warm-up: packed batches 312 shapes in "
            "~3 s on an H100, padded ones 328 in ~50 s). false = every batch eagerly."
        ),
    )
    share_prefix: bool = Field(
        True,
        description=(
            "LLM rerankers on the CPU: the tokens every pair of a batch starts with (system prompt, instruction, "
            "a request's query) run once and their keys and values serve every pair (1.1x pairs/s measured with "
            "Qwen3-Reranker-0.6B's shape on 2 cores); checked against whole pairs at start. false = whole pairs."
        ),
    )
    packed_batches: bool = Field(
        True,
        description=(
            "On CUDA (compute capability 8.0+, float16), run BERT, RoBERTa and XLM-RoBERTa models on packed "
            "batches: no padding, attention per pair (FlashAttention varlen), graphs over (pairs, tokens) buckets; "
            "checked against the padded model at start. false = padded batches."
        ),
    )

    # Where the model runs
    engine: EngineMode = Field(
        EngineMode.auto,
        description=(
            "process = one engine process per GPU (one on the CPU) holds the model and runs the batcher and the "
            "forward pass; HTTP workers parse, tokenise and hand it encoded pairs over a Unix socket. inline = "
            "every worker loads its own model. auto = process when a GPU is visible (or the backend is "
            "simulated), inline on the CPU, where it measured as fast with less memory moved around."
        ),
    )
    backend: BackendKind = Field(
        BackendKind.torch, description="torch, or simulated: a stand-in accelerator for tests and benchmarks."
    )
    simulated_token_us: float = Field(
        3.0, gt=0, description="Simulated backend: device microseconds per padded token of a batch."
    )
    simulated_launches: int = Field(
        20, ge=0, description="Simulated backend: kernel launches per forward pass (each takes the GIL)."
    )
    simulated_launch_us: float = Field(
        200.0, ge=0, description="Simulated backend: microseconds each launch holds the GIL."
    )

    engine_socket_dir: Path | None = Field(
        None,
        description="Where engine processes listen (Unix sockets); default: the temp directory, one per port.",
    )

    # The server
    host: str = Field("0.0.0.0", description="Address gunicorn binds.")
    port: int = Field(9300, ge=1, le=65535, description="Port gunicorn binds.")
    workers: int | None = Field(
        None,
        ge=1,
        le=64,
        validation_alias=AliasChoices("WEB_CONCURRENCY", "RERANKER_WORKERS"),
        description=(
            "HTTP worker processes (WEB_CONCURRENCY). Inline, each loads its own copy of the model; with engine "
            "processes, workers hold only the tokenizer and do the tokenising. Unset: 1 inline; with engine "
            "processes one per 4 CPUs (a container's CPU quota counted), 2 to 8 (one worker cannot keep a GPU "
            "fed)."
        ),
    )
    api_key: SecretStr | None = Field(
        None, description="When set, every route but health, ready and metrics needs it (logged as **********)."
    )
    metrics_need_key: bool = Field(False, description="Also guard /metrics with the API key.")
    worker_timeout: int = Field(
        300, ge=10, description="Seconds gunicorn waits for a silent worker: must cover model load + warm-up."
    )
    graceful_timeout: int = Field(30, ge=1, description="Seconds a stopping worker gets to finish its requests.")
    log_level: str = Field("info", description="debug, info, warning or error.")
    access_log: bool = Field(True, description="One structured line per request.")

    # Batching and limits
    max_batch_tokens: int = Field(
        16384,
        ge=64,
        description=(
            "Tokens in one forward pass as it runs: padded, batch pairs × longest pair; packed (CUDA, BERT family), "
            "the pairs' own tokens."
        ),
    )
    max_batch_pairs: int = Field(256, ge=1, description="Pairs in one forward pass at most.")
    max_queue_pairs: int = Field(
        8192, ge=1, description="Pairs waiting in one worker's queue; past it requests get 429 with Retry-After."
    )
    max_documents: int = Field(1000, ge=1, description="Documents in one request at most (413 past it).")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Request body size at most (413 past it).")

    # Long documents
    long_documents: LongDocuments = Field(
        LongDocuments.truncate,
        description="Default for requests that do not ask: truncate, or chunk into windows and keep the best.",
    )
    default_max_chunks: int = Field(8, ge=1, description="Windows per document when chunking by default.")
    default_overlap_tokens: int = Field(80, ge=0, description="Tokens shared by neighbouring windows by default.")
    max_query_share: float = Field(
        0.5, gt=0.0, le=0.9, description="Share of a pair's length a query may take; longer queries are truncated."
    )
    max_windows_per_request: int = Field(
        4096, ge=1, description="Scored windows (pairs) in one request at most (413 past it)."
    )

    # Third-party variables, read under their own names
    prometheus_multiproc_dir: Path = Field(
        Path("/tmp/reranker-metrics"),
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description="Where the workers' metric files live; wiped when the server starts.",
    )

    @field_validator("models")
    @classmethod
    def _models_are_served_models(cls, models: str | None) -> str | None:
        if models is None or not models.strip():
            return None
        for served in parse_served_models(models):
            problem = model_dir_problem(served.path)
            if problem:
                raise ValueError(f"model {served.name!r} ({served.path}): {problem}")
        return models

    @model_validator(mode="after")
    def _one_model_or_several(self) -> Settings:
        if self.models is not None:
            if self.torch_compile is Compile.on and len(parse_served_models(self.models)) > 1:
                raise ValueError(
                    "RERANKER_TORCH_COMPILE=on cannot compile several models in one process (their graphs "
                    "invalidate each other's): leave it auto (several models run eagerly) or serve one model"
                )
            return self  # each directory was checked with its name
        if self.model_path is None:
            raise ValueError("set RERANKER_MODEL_PATH (one model) or RERANKER_MODELS (name=directory,...)")
        problem = model_dir_problem(self.model_path)
        if problem:
            raise ValueError(f"RERANKER_MODEL_PATH: {problem}")
        return self

    @property
    def model_directory(self) -> Path:
        """The directory of the one model these settings load (``served_models()`` gives each its own)."""
        if self.model_path is None:
            raise SettingsError("these settings serve several models (RERANKER_MODELS): take one of served_models()")
        return self.model_path

    def served_models(self) -> list[ServedModel]:
        """Every model this server serves, in the configured order; one model is a list of one."""
        if self.models is None:
            return [ServedModel(self.model_name, self.model_directory)]
        return parse_served_models(self.models)

    @property
    def routes_by_model(self) -> bool:
        """Whether a request's ``model`` chooses what scores it. With one model any name is accepted, as the
        seed deployment did (RAGFlow sends whatever name its user typed)."""
        return self.models is not None

    def for_model(self, served: ServedModel) -> Settings:
        """These settings for one served model: what the loader, the encoder and the batcher read.

        Several models in one process run eagerly on the CPU (``auto`` compiles only a model alone): compiled
        side by side they invalidate each other's graphs (transformers' forward wrapper is one code object for
        every model class, and loading a model changes a registry the graphs are guarded on), and measured with
        a bge-reranker-base- and a MiniLM-shaped model the first recompiled for 55 s and then ran 2.5x slower."""
        update: dict[str, object] = {"model_path": served.path, "model_name": served.name, "models": None}
        if len(self.served_models()) > 1 and self.torch_compile is Compile.auto:
            update["torch_compile"] = Compile.off
        return self.model_copy(update=update)

    @property
    def worker_processes(self) -> int:
        """The HTTP workers running: the master resolves an unset ``WEB_CONCURRENCY`` (``http_workers``) and
        exports the number to the processes it starts, so only a process outside the server sees 1 here."""
        return self.workers or 1

    @property
    def engine_sockets_path(self) -> Path:
        return self.engine_socket_dir or Path(tempfile.gettempdir()) / f"reranker-engines-{self.port}"

    @field_validator("instruction")
    @classmethod
    def _blank_instruction_is_none(cls, instruction: str | None) -> str | None:
        return instruction if instruction is not None and instruction.strip() else None

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, level: str) -> str:
        if level.lower() not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("must be one of debug, info, warning, error, critical")
        return level.lower()

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_no_key(cls, key: SecretStr | None) -> SecretStr | None:
        return key if key is not None and key.get_secret_value() else None

    def effective(self) -> dict[str, str]:
        """Every setting under the variable that sets it, as the service will use it; secrets redacted."""
        values = self.model_dump(mode="json")  # SecretStr dumps as "**********"
        return {_env_name(name): str(values[name]) for name in type(self).model_fields}

    @model_validator(mode="after")
    def _batch_fits_one_pair(self) -> Settings:
        if self.max_batch_tokens < self.max_length:
            raise ValueError(
                f"RERANKER_MAX_BATCH_TOKENS ({self.max_batch_tokens}) must be at least RERANKER_MAX_LENGTH "
                f"({self.max_length}), or a full-length pair could never be scored"
            )
        return self


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    path: Path


def parse_served_models(models: str) -> list[ServedModel]:
    """``name=directory,name=directory``: every name unique and usable in a URL (``/models/{name}/rerank``)."""
    served: list[ServedModel] = []
    for entry in (item.strip() for item in models.split(",")):
        if not entry:
            continue
        name, equals, path = (part.strip() for part in entry.partition("="))
        if not equals or not name or not path:
            raise ValueError(f"{entry!r} is not name=directory")
        if not MODEL_NAME.fullmatch(name):
            raise ValueError(
                f"model name {name!r} ({path}) must be 1-64 letters, digits, '.', '_' or '-' (no '/': it is part "
                "of the model's URL /models/{name}/...)"
            )
        if any(name == earlier.name for earlier in served):
            raise ValueError(f"model name {name!r} is given twice ({path})")
        served.append(ServedModel(name, Path(path)))
    if not served:
        raise ValueError("names no model: give name=directory,name=directory")
    return served


WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "vocab.txt", "spiece.model", "vocab.json")


def model_dir_problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable model directory, as one line naming the path; or None. Cheap file checks
    only (no torch, no CUDA): the settings, the preflight, the loader and readiness use it."""
    if not path.exists():
        return f"model directory {path} does not exist (mount the model there or set RERANKER_MODEL_PATH)"
    if not path.is_dir():
        return f"model path {path} is not a directory"
    if not os.access(path, os.R_OK | os.X_OK):
        return _permission_denied(path, path, "listing it")
    if not (path / "config.json").is_file():
        return f"model directory {path} has no config.json: is it a Hugging Face model directory?"
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return f"model directory {path} has no weights ({', '.join(WEIGHT_FILES[:2])})"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return f"model directory {path} has no tokenizer files (tokenizer.json or sentencepiece.bpe.model)"
    # Checked with this uid itself: is_file() and stat() succeed on a file open() refuses, and the loader would
    # then say "No such file or directory". Subfolders too (sharded weights, a 1_Pooling folder).
    for entry in sorted(path.rglob("*")):
        if not os.access(entry, os.R_OK | (os.X_OK if entry.is_dir() else 0)):
            return _permission_denied(path, entry, f"reading {entry.relative_to(path)}")
    return None


def _permission_denied(model: Path, entry: Path, doing: str) -> str:
    info = entry.stat()
    return (
        f"model directory {model}: permission denied {doing} (owner uid {info.st_uid}, mode "
        f"{stat.S_IMODE(info.st_mode):04o}) as uid {os.getuid()}; fix: chmod -R a+rX {model}"
    )


class SettingsError(Exception):
    """A setting is missing or invalid; the message is one line that names it."""


def describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        env_name = _env_name(field)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "is required"
        parts.append(f"{env_name}: {message}" if env_name else message)
    return "invalid configuration: " + "; ".join(parts)


def _env_name(field: str) -> str:
    """The environment variable behind a field (errors may report a field or its alias)."""
    info = Settings.model_fields.get(field)
    if info is None:
        return field  # already an alias such as WEB_CONCURRENCY
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        alias = alias.choices[0]
    if isinstance(alias, str):
        return alias
    return f"RERANKER_{field.upper()}"


AUTO_WORKERS_CPUS_EACH = 4  # with engine processes, one HTTP worker per this many CPUs ...
AUTO_WORKERS_RANGE = (2, 8)  # ... within these bounds


def http_workers(settings: Settings, *, engines: bool) -> int:
    """How many HTTP workers the master forks: ``WEB_CONCURRENCY`` when set, else by where the model runs.

    Inline, each worker holds a model copy: one. With engine processes a worker parses, tokenises and packs, and
    one worker runs out before a GPU does (on an H100 one worker tokenised ~93 ``gpu64`` requests/s while the GPU
    idled 12 % of the time; ``python -m bench.frontend`` measures a host's workers, and with ``--profile`` how much
    of the time one worker's GIL is held).
    """
    if settings.workers is not None:
        return settings.workers
    if not engines:
        return 1
    low, high = AUTO_WORKERS_RANGE
    return min(high, max(low, usable_cpus() // AUTO_WORKERS_CPUS_EACH))


def load_settings() -> Settings:
    """Read the settings from the environment; raise :class:`SettingsError` with one clear line if invalid."""
    try:
        return Settings()  # type: ignore[call-arg]  # every field comes from the environment
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


def settings_table() -> str:
    """The README's settings table, written from the fields themselves (``python -m app.config``); a test
    checks the README holds exactly this."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.is_required():
            default = "(required)"
        elif field.default is None:
            default = "(unset)"
        else:
            value = getattr(field.default, "value", field.default)
            default = f"`{str(value).lower() if isinstance(value, bool) else value}`"
        rows.append(f"| `{_env_name(name)}` | {default} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
