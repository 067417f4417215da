"""``python -m app.fetch``: fetch the model once into the models volume, for the reranker to mount read-only.

Run by Compose's one-shot ``model-fetch`` service before the reranker starts (compose.yaml). It downloads
``MODEL_ID`` from the Hugging Face Hub (``huggingface_hub.snapshot_download``) or ModelScope (``modelscope``'s
``snapshot_download``) with the hubs' own clients, which read their own variables: ``HF_ENDPOINT`` / ``HF_TOKEN``
and ``MODELSCOPE_ENDPOINT`` (or the older ``MODELSCOPE_DOMAIN``) / ``MODELSCOPE_API_TOKEN``; proxies come from
``HTTPS_PROXY`` / ``NO_PROXY`` and extra CA certificates from the image's trust store.

Layout of the volume (``MODELS_ROOT``, ``/models`` in the container)::

    .partial/<source>--<org>--<name>/     the download in progress; resumed by the next run (hub clients resume
                                          half-written files with HTTP Range requests)
    snapshots/<source>--<org>--<name>--<commit>/   a complete, verified copy with FETCHED_MARKER inside
    current -> snapshots/...              symlink, swapped atomically once a copy is complete

Several models (``MODEL_ID=name=org/model,name=org/model``) each get this layout in their own folder,
``/models/<name>/``; ``--print-served-models`` prints the ``RERANKER_MODELS`` value that serves them (the image's
entry point uses it).

The reranker reads ``/models/current``, which exists only once a copy is complete: it can never start on a
half-fetched directory. A run whose ``current`` already holds the requested model, source and revision does
nothing and touches no network, so a second ``docker compose up`` does not fetch again.

Any failure is one line ``model-fetch: <what, where, the fix>`` on stderr and a non-zero exit status (2 settings,
3 the hub refused or does not know the model, 4 the hub cannot be reached, 5 the files failed verification or are
not a model, 1 anything else, e.g. a full or read-only volume); ``MODEL_FETCH_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.config import MODEL_NAME  # the service's rule for a served model's name

DEFAULT_MODEL_ID = "BAAI/bge-reranker-base"
SOURCES = ("huggingface", "modelscope")
FETCHED_MARKER = ".fetched.json"
CURRENT = "current"

# Files a PyTorch cross-encoder never needs; the Hub's bge-reranker-base carries a 1.1 GB ONNX export beside its
# weights. When the repository has safetensors weights, the pickled copies (.bin, .pt) are skipped too.
SKIPPED_PATTERNS = (
    ".gitattributes",
    "*.onnx",
    "*.onnx_data",
    "onnx/*",
    "openvino/*",
    "coreml/*",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.tflite",
    "*.gguf",
)
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")

EXIT_OTHER, EXIT_SETTINGS, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_VERIFY = 1, 2, 3, 4, 5


class FetchError(Exception):
    """A fetch failed; ``str()`` is one line naming what, where and the fix."""

    def __init__(self, message: str, *, exit_code: int = EXIT_OTHER) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Request:
    model_id: str
    source: str
    revision: str | None
    root: Path
    name: str = ""  # with several models (MODEL_ID=name=org/model,...), its name and folder in the volume

    @property
    def slug(self) -> str:
        return f"{self.source}--{self.model_id.replace('/', '--')}"

    @property
    def label(self) -> str:
        return f"{self.model_id}@{self.revision or 'default'} from {self.source}"


@dataclass(frozen=True)
class RemoteFile:
    """A file the hub lists: its size and the checksum it publishes (sha256 for LFS files, else the git blob id)."""

    path: str
    size: int | None
    sha256: str | None = None
    git_oid: str | None = None


def log(message: str) -> None:
    """Progress, on stdout; a failure is the one line on stderr (see main)."""
    print(f"model-fetch: {message}", flush=True)


def fail(message: str) -> None:
    print(f"model-fetch: {message}", file=sys.stderr, flush=True)


def wanted(paths: list[str]) -> list[str]:
    """The repository files the service needs (see SKIPPED_PATTERNS)."""
    skipped = list(SKIPPED_PATTERNS)
    if any(fnmatch.fnmatch(path, "*.safetensors") for path in paths):
        skipped += PICKLED_WEIGHTS
    return [path for path in paths if not any(fnmatch.fnmatch(path, pattern) for pattern in skipped)]


# --- the volume ---------------------------------------------------------------------------------------------------


def fetched_record(directory: Path) -> dict[str, object] | None:
    """The marker of a complete copy, or None when ``directory`` is not one."""
    try:
        record = json.loads((directory / FETCHED_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def already_fetched(request: Request) -> dict[str, object] | None:
    record = fetched_record(request.root / CURRENT)
    if record is None:
        return None
    same = (record.get("model_id"), record.get("source"), record.get("revision")) == (
        request.model_id,
        request.source,
        request.revision,
    )
    return record if same else None


@contextlib.contextmanager
def volume_lock(root: Path) -> Iterator[None]:
    """One fetch at a time per volume (``up`` and a manual ``run model-fetch`` may overlap)."""
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_root(root: Path) -> None:
    if not root.is_dir():
        raise FetchError(
            f"models directory {root} does not exist: mount the models volume there (compose.yaml does)",
            exit_code=EXIT_SETTINGS,
        )
    if not os.access(root, os.W_OK | os.X_OK):
        raise FetchError(
            f"models directory {root} is not writable by uid {os.getuid()}: give that uid the volume "
            f"(chown -R {os.getuid()} on the volume) or remove the volume so Docker creates it afresh",
            exit_code=EXIT_SETTINGS,
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(request: Request, staging: Path, commit: str) -> Path:
    """Mark ``staging`` complete, move it under snapshots/ and point ``current`` at it, each step atomic."""
    record = {
        "model_id": request.model_id,
        "source": request.source,
        "revision": request.revision,
        "commit": commit,
        "files": sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file()),
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    marker = staging / FETCHED_MARKER
    with open(marker, "w") as handle:
        json.dump(record, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    snapshots = request.root / "snapshots"
    snapshots.mkdir(exist_ok=True)
    final = snapshots / f"{request.slug}--{commit}"
    if final.exists():  # a refresh of the same commit
        shutil.rmtree(final)
    os.rename(staging, final)
    link = request.root / f".{CURRENT}.tmp"
    link.unlink(missing_ok=True)
    # Relative, so it resolves wherever the volume is mounted.
    link.symlink_to(Path("snapshots") / final.name)
    os.replace(link, request.root / CURRENT)
    _fsync_dir(request.root)
    # Older copies (another MODEL_ID, an earlier revision) only take space; a running reranker has its model
    # in memory already and a restarted one follows ``current``.
    for old in snapshots.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# --- verification -------------------------------------------------------------------------------------------------


def _digests(path: Path) -> tuple[str, str]:
    """sha256 of the content and the git blob id (sha1 of "blob <size>\\0" + content)."""
    sha256 = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            sha256.update(chunk)
            git.update(chunk)
    return sha256.hexdigest(), git.hexdigest()


def verify(staging: Path, files: list[RemoteFile], *, where: str) -> None:
    """Every listed file is there with the size and checksum the hub published; a bad one is deleted so that the
    next run fetches it again."""
    for remote in files:
        local = staging / remote.path
        if not local.is_file():
            raise FetchError(
                f"{remote.path} is missing after the download from {where}: run the fetch again",
                exit_code=EXIT_VERIFY,
            )
        size = local.stat().st_size
        problem = None
        if remote.size is not None and size != remote.size:
            problem = f"{size} bytes, expected {remote.size}"
        elif remote.sha256 or remote.git_oid:
            sha256, git_oid = _digests(local)
            if remote.sha256 and sha256 != remote.sha256:
                problem = f"sha256 {sha256[:12]}…, expected {remote.sha256[:12]}…"
            elif not remote.sha256 and remote.git_oid and git_oid != remote.git_oid:
                problem = f"git blob id {git_oid[:12]}…, expected {remote.git_oid[:12]}…"
        if problem:
            local.unlink()
            # huggingface_hub's per-file record would otherwise call the deleted file up to date.
            (staging / ".cache" / "huggingface" / "download" / f"{remote.path}.metadata").unlink(missing_ok=True)
            raise FetchError(
                f"{remote.path} from {where} failed verification ({problem}): the file was deleted, run the fetch "
                "again (a proxy or mirror that alters files would fail again)",
                exit_code=EXIT_VERIFY,
            )


def check_is_model(directory: Path, request: Request) -> None:
    from app.config import model_dir_problem

    problem = model_dir_problem(directory)
    if problem:
        raise FetchError(
            f"{request.label} is not a model the service can load: {problem}; check MODEL_ID",
            exit_code=EXIT_VERIFY,
        )


# --- Hugging Face Hub ---------------------------------------------------------------------------------------------


def _hf_error(error: Exception, request: Request, endpoint: str) -> FetchError | None:
    from huggingface_hub import errors

    token_hint = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
    if isinstance(error, errors.GatedRepoError):
        return FetchError(
            f"{request.model_id} on {endpoint} is gated: accept its terms on the model page and set HF_TOKEN in .env "
            f"to a token of that account ({token_hint})",
            exit_code=EXIT_REFUSED,
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return FetchError(
            f"{request.model_id} on {endpoint} has no revision {request.revision!r}: fix MODEL_REVISION in .env",
            exit_code=EXIT_REFUSED,
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return FetchError(
            f"{request.model_id} not found on {endpoint} (HTTP {_status(error)}): check MODEL_ID in .env; if the "
            f"model is private or gated, set HF_TOKEN ({token_hint})",
            exit_code=EXIT_REFUSED,
        )
    if isinstance(error, errors.HfHubHTTPError):
        status = _status(error)
        if status in (401, 403):
            return FetchError(
                f"{endpoint} refused the credentials for {request.model_id} (HTTP {status}, {token_hint}): set a "
                "valid HF_TOKEN in .env, or remove it for a public model",
                exit_code=EXIT_REFUSED,
            )
        return FetchError(
            f"{endpoint} answered HTTP {status} for {request.model_id}: try again later, or set HF_ENDPOINT to a "
            "mirror",
            exit_code=EXIT_UNREACHABLE,
        )
    return None


def _status(error: Exception) -> object:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", "?")


def fetch_huggingface(request: Request, staging: Path) -> str:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    endpoint = constants.ENDPOINT
    try:
        api = HfApi()
        commit = api.model_info(request.model_id, revision=request.revision).sha
        if not commit:
            raise FetchError(f"{endpoint} gave no commit for {request.label}", exit_code=EXIT_UNREACHABLE)
        tree = {
            entry.path: entry
            for entry in api.list_repo_tree(request.model_id, revision=commit, recursive=True)
            if isinstance(entry, RepoFile)
        }
        paths = wanted(sorted(tree))
        log(f"{request.label}: commit {commit}, {len(paths)} files, {sum(tree[p].size for p in paths)} bytes")
        # The exact commit, not the branch: every file comes from one snapshot even if the branch moves meanwhile.
        snapshot_download(request.model_id, revision=commit, local_dir=staging, allow_patterns=paths, max_workers=4)
    except FetchError:
        raise
    except Exception as error:
        mapped = _hf_error(error, request, endpoint) or _network_error(error, endpoint, "HF_ENDPOINT")
        if mapped is None:
            raise
        raise mapped from error
    files = []
    for path in paths:
        lfs = tree[path].lfs
        files.append(
            RemoteFile(
                path=path,
                size=tree[path].size,
                sha256=lfs.sha256 if lfs is not None else None,
                git_oid=tree[path].blob_id,
            )
        )
    verify(staging, files, where=endpoint)
    return commit


def _network_error(error: Exception, endpoint: str, variable: str) -> FetchError | None:
    """Connection refused, timeouts, dropped transfers, proxy and TLS failures, in any HTTP client."""
    names = {cls.__name__ for cls in type(error).__mro__}
    network = {
        "ConnectError",
        "ConnectionError",
        "TimeoutException",
        "Timeout",
        "ProxyError",
        "RemoteProtocolError",
        "ReadError",
        "NetworkError",
        "TransportError",
        "ChunkedEncodingError",
        "SSLError",
        "IncompleteRead",
        "LocalEntryNotFoundError",  # huggingface_hub: no connection and nothing cached
    }
    if not names & network:
        return None
    detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return FetchError(
        f"cannot download from {endpoint} ({type(error).__name__}: {detail}): check the network, the proxy "
        f"(HTTPS_PROXY, NO_PROXY) and extra CA certificates (docker/certs), or set {variable} to a mirror; "
        "the files fetched so far are kept and the next run resumes",
        exit_code=EXIT_UNREACHABLE,
    )


# --- ModelScope ---------------------------------------------------------------------------------------------------


class _LastErrors(logging.Handler):
    """Keeps the client's error log lines: ModelScope reports why a file failed (e.g. a hash mismatch) only there,
    and raises a summary ("1 of 6 file(s) failed")."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


def _quiet_modelscope(debug: bool) -> _LastErrors:
    errors = _LastErrors()
    for name in ("modelscope", "modelscope_hub"):
        logger = logging.getLogger(name)
        logger.addHandler(errors)
        if not debug:
            # Its own handlers print retries and errors; the one line on stderr says why instead.
            for child in [
                logger,
                *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith(name + ".")),
            ]:
                for handler in list(child.handlers):
                    if handler is not errors:
                        child.removeHandler(handler)
                child.propagate = child is not logger and child.propagate
    return errors


def _modelscope_error(error: Exception, request: Request, endpoint: str, logged: list[str]) -> FetchError:
    names = {cls.__name__ for cls in type(error).__mro__}
    detail = " ".join(str(error).split())[:200] or type(error).__name__
    token_hint = "MODELSCOPE_API_TOKEN is set" if os.environ.get("MODELSCOPE_API_TOKEN") else "no token is set"
    if "NotExistError" in names or getattr(getattr(error, "response", None), "status_code", None) == 404:
        return FetchError(
            f"{request.model_id} not found on ModelScope ({endpoint}): {detail}; check MODEL_ID and MODEL_REVISION "
            f"in .env; for a private model set MODELSCOPE_API_TOKEN ({token_hint})",
            exit_code=EXIT_REFUSED,
        )
    if names & {"AuthenticationError", "PermissionDeniedError"}:
        return FetchError(
            f"ModelScope ({endpoint}) refused the credentials for {request.model_id} ({detail}, {token_hint}): set "
            "a valid MODELSCOPE_API_TOKEN in .env",
            exit_code=EXIT_REFUSED,
        )
    mismatch = [message for message in logged if "mismatch" in message.lower()]
    if mismatch or "FileIntegrityError" in names:
        return FetchError(
            f"a file from ModelScope ({endpoint}) failed verification ({(mismatch or [detail])[-1][:200]}): it was "
            "not kept; run the fetch again (a proxy or mirror that alters files would fail again)",
            exit_code=EXIT_VERIFY,
        )
    network = _network_error(error, endpoint, "MODELSCOPE_ENDPOINT")
    if network is not None or names & {"NetworkError", "FileDownloadError", "ServerError", "RateLimitError"}:
        why = logged[-1][:200] if logged else detail
        return FetchError(
            f"cannot download {request.model_id} from ModelScope ({endpoint}): {why}: check the network, the proxy "
            "(HTTPS_PROXY, NO_PROXY), or set MODELSCOPE_ENDPOINT to a mirror; the files fetched so far are kept "
            "and the next run resumes",
            exit_code=EXIT_UNREACHABLE,
        )
    why = logged[-1][:200] if logged else detail
    return FetchError(
        f"ModelScope ({endpoint}) could not deliver {request.label}: {type(error).__name__}: {why}; check MODEL_ID "
        "and MODEL_REVISION (MODEL_FETCH_DEBUG=1 shows the traceback)",
        exit_code=EXIT_UNREACHABLE,
    )


def fetch_modelscope(request: Request, staging: Path) -> str:
    try:
        from modelscope import snapshot_download
        from modelscope.hub.api import HubApi
    except ImportError as error:
        raise FetchError(
            f"the modelscope client is not installed in this image ({error}): pip install modelscope, or use "
            "MODEL_SOURCE=huggingface",
            exit_code=EXIT_SETTINGS,
        ) from None
    debug = os.environ.get("MODEL_FETCH_DEBUG", "").lower() in ("1", "true", "yes")
    logged = _quiet_modelscope(debug)
    endpoint = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "https://modelscope.cn"
    revision = request.revision or "master"
    try:
        listing = HubApi().get_model_files(request.model_id, revision=revision, recursive=True)
        sizes = {str(item["Path"]): item.get("Size") for item in listing if item.get("Type", "blob") != "tree"}
        paths = wanted(sorted(sizes))
        log(f"{request.label}: {len(paths)} files, {sum(int(sizes[p] or 0) for p in paths)} bytes")
        # The modelscope client checks each file's sha256 against the hub's record as it downloads.
        snapshot_download(request.model_id, revision=revision, local_dir=str(staging), allow_patterns=paths)
    except FetchError:
        raise
    except Exception as error:
        raise _modelscope_error(error, request, endpoint, logged.messages) from error
    files = [RemoteFile(path=path, size=int(size) if isinstance(size, int) else None) for path, size in sizes.items()]
    verify(staging, [file for file in files if file.path in paths], where=endpoint)
    return revision


# --- the whole fetch ----------------------------------------------------------------------------------------------


def fetch(request: Request, *, refresh: bool = False) -> Path:
    """Make ``root/current`` a complete, verified copy of the requested model; return its directory."""
    check_root(request.root)
    with volume_lock(request.root):
        record = None if refresh else already_fetched(request)
        if record is not None:
            current = (request.root / CURRENT).resolve()
            log(f"{request.label} is already in the volume (commit {record.get('commit')}, {current}): nothing to do")
            return current
        staging = request.root / ".partial" / request.slug
        staging.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        if request.source == "huggingface":
            commit = fetch_huggingface(request, staging)
        else:
            commit = fetch_modelscope(request, staging)
        # The clients' bookkeeping (resume records, locks) is not part of the model.
        for bookkeeping in (".cache", ".msc", ".mdl", "._____temp"):
            shutil.rmtree(staging / bookkeeping, ignore_errors=True)
        check_is_model(staging, request)
        final = publish(request, staging, commit)
        log(
            f"{request.label}: verified and published as {request.root / CURRENT} -> {final.name} "
            f"in {time.monotonic() - started:.1f} s"
        )
        return final


def parse_args(argv: list[str] | None) -> tuple[list[Request], bool]:
    parser = argparse.ArgumentParser(prog="python -m app.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", default=os.environ.get("MODEL_ID") or DEFAULT_MODEL_ID)
    parser.add_argument("--source", default=os.environ.get("MODEL_SOURCE") or "huggingface")
    parser.add_argument("--revision", default=os.environ.get("MODEL_REVISION") or None)
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("MODELS_ROOT") or "/models"))
    parser.add_argument(
        "--refresh",
        action="store_true",
        default=os.environ.get("MODEL_REFRESH", "").lower() in ("1", "true", "yes"),
        help="fetch again even if the volume already holds the model (e.g. to follow a moved branch)",
    )
    parser.add_argument(
        "--print-served-models",
        action="store_true",
        help="print the RERANKER_MODELS value that serves what MODEL_ID lists (name=org/model,...) and exit",
    )
    args = parser.parse_args(argv)
    if os.environ.get("MODEL_DIR"):
        # compose.yaml passes MODEL_DIR here only to catch this: set in .env, but without compose.model-dir.yaml
        # the stack would fetch MODEL_ID and silently ignore the directory.
        raise FetchError(
            f"MODEL_DIR={os.environ['MODEL_DIR']} is set but compose.model-dir.yaml is not in COMPOSE_FILE, so it "
            "would be ignored: add compose.model-dir.yaml to COMPOSE_FILE in .env to serve that directory, or "
            "unset MODEL_DIR to fetch MODEL_ID",
            exit_code=EXIT_SETTINGS,
        )
    source = args.source.strip().lower()
    if source not in SOURCES:
        raise FetchError(f"MODEL_SOURCE={args.source!r} is not one of {', '.join(SOURCES)}", exit_code=EXIT_SETTINGS)
    entries = named_model_ids(args.model_id)
    if args.print_served_models:
        print(",".join(f"{name}={args.root / name / CURRENT}" for name, _ in entries if name))
        raise SystemExit(0)
    requests = []
    for name, model_id in entries:
        if model_id.count("/") != 1 or not all(model_id.split("/")) or ".." in model_id:
            raise FetchError(
                f"MODEL_ID={args.model_id!r}: {model_id!r} is not a hub model id of the form org/name (e.g. "
                f"{DEFAULT_MODEL_ID}, or several as name=org/name,name=org/name)",
                exit_code=EXIT_SETTINGS,
            )
        # Several models: each in its own folder of the volume, with its own current link.
        root = args.root / name if name else args.root
        requests.append(Request(model_id=model_id, source=source, revision=args.revision, root=root, name=name))
    return requests, args.refresh


def named_model_ids(value: str) -> list[tuple[str, str]]:
    """MODEL_ID as (name, hub id) pairs: one bare ``org/name`` (name ""), or ``name=org/name,name=org/name``
    for several models served side by side (RERANKER_MODELS names them the same)."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if len(items) == 1 and "=" not in items[0]:
        return [("", items[0])]
    entries: list[tuple[str, str]] = []
    for item in items:
        name, equals, model_id = (part.strip() for part in item.partition("="))
        if not equals or not MODEL_NAME.fullmatch(name):
            raise FetchError(
                f"MODEL_ID={value!r}: with several models each entry is name=org/model, the name of letters, "
                f"digits, '.', '_' or '-' ({item!r} is not)",
                exit_code=EXIT_SETTINGS,
            )
        if any(name == earlier for earlier, _ in entries):
            raise FetchError(f"MODEL_ID={value!r}: the name {name!r} is given twice", exit_code=EXIT_SETTINGS)
        entries.append((name, model_id))
    return entries


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("MODEL_FETCH_DEBUG", "").lower() in ("1", "true", "yes")
    # This process exists to download: the image's HF_HUB_OFFLINE=1 is for the reranker. Set before
    # huggingface_hub is imported, which reads it once.
    os.environ["HF_HUB_OFFLINE"] = "0"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # one line per step in `docker compose logs`
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if not debug:
        # The clients' own retry chatter ("Trying to resume download...") would bury the one line that says why.
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # huggingface_hub sets its level from it on import
        os.environ.setdefault("TQDM_DISABLE", "1")  # ModelScope's per-file progress bars
    try:
        requests, refresh = parse_args(argv)
        for request in requests:
            if request.name:
                # Several models: the volume must be mounted; each model's folder in it is made here.
                check_root(request.root.parent)
                request.root.mkdir(exist_ok=True)
            fetch(request, refresh=refresh)
    except FetchError as error:
        if debug:
            traceback.print_exc()
        fail(str(error))
        return error.exit_code
    except OSError as error:
        if debug:
            traceback.print_exc()
        if error.errno == errno.ENOSPC:
            fail(
                f"no space left on the models volume ({error.filename}): free space on the Docker disk; the "
                "files fetched so far are kept and the next run resumes"
            )
        else:
            fail(
                f"{error.strerror or error} ({error.filename}): the models volume must be writable by uid {os.getuid()}"
            )
        return EXIT_OTHER
    except Exception as error:
        if debug:
            traceback.print_exc()
        fail(
            f"unexpected {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''} "
            "(MODEL_FETCH_DEBUG=1 shows the traceback)"
        )
        return EXIT_OTHER
    return 0


if __name__ == "__main__":
    sys.exit(main())
