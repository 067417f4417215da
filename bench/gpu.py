"""The GPU benchmark in one command, for a GPU host without network access (under 8 minutes on one H200).

    python -m bench.gpu --out "$OUT"

1. Installs what such a host lacks (the web stack: fastapi, uvicorn, gunicorn, pydantic...) from wheels
   prepared beforehand on a machine with network (``python -m bench.gpu --prepare-wheels``, into ``.whl/``,
   ignored by git), with ``pip install --no-index --no-deps --target`` into a virtual environment at ``--site``
   whose site-packages also list the host's own (a ``.pth`` file); then runs itself again with that
   environment's python, so every server and test subprocess it starts sees both, whatever environment a test
   gives it. Nothing is fetched.
2. The engine alone, in-process (``bench/engine_alone.py``): ``TorchBackend.forward`` on 64 and 256 pairs of
   256 tokens, unpadded and padded (lengths 248-264), and the matmul peak; as it serves (packed batches on a
   GPU that allows them) and, after the variants, on padded batches (``RERANKER_PACKED_BATCHES=false``).
3. The service (``bench/run.py``: ``python -m app``, the engine-process design on a GPU) with its default
   HTTP workers (``WEB_CONCURRENCY`` unset) beside the seed baseline (``bench/baseline_server.py``); the
   ``target`` setting and ``gpu64`` (64 documents of ~256 tokens), at 1/4/16/64 clients.
4. The GPU test tier, ``pytest -m gpu``.
5. The service with the other worker counts (``--workers``, default 1) on ``gpu64``, without the baseline; then
   what this host's HTTP workers can feed an engine at all, with 1, 2, 4 and 8 workers (``bench/frontend.py``:
   the simulated device with almost no device time, so no GPU is involved).
6. Variants (``--variant``): the service again with other settings on ``gpu64`` at 1, 16 and 64 clients,
   beside the main run's cells; by default ``padded:RERANKER_PACKED_BATCHES=false`` (what packing buys the
   service) and ``budget32k:RERANKER_MAX_BATCH_TOKENS=32768`` (whether batches twice the default token budget,
   a 64-document request in one batch, are worth making the GPU's default). ``eager:RERANKER_CUDA_GRAPHS=false``
   measures what the CUDA graphs buy (on an H100: 215 pairs/s at 16 clients without them, 5,494 with). Then how
   fast one ``gpu64`` request is tokenised with 1-16 threads (``bench/tokenize_threads.py``).

``python -m bench.gpu --suite`` instead runs the test suite there, bar the Docker tier (``--suite MARKS`` for a
part of it, e.g. ``'unit or integration'``), with the model where ``RERANKER_DEVICE=auto`` puts it: the GPU. It
needs more wheels (schemathesis and what it pulls in), which ``--prepare-wheels`` fetches too.

Writes ``gpu-bench.json`` (everything, including each step's full JSON and logs' tails) and ``gpu-bench.txt``
(the figures against the goals) to ``--out``. Each step has a time budget; a step that would not fit is skipped
and says so. Works on a CPU too (``--device cpu`` with small settings), which is how it is tested.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.utils import venv_seeing_this_python  # stdlib and httpx only: safe before the wheels

REPO = Path(__file__).resolve().parent.parent
# Import name -> distribution: what a GPU host with torch, transformers, httpx and pytest may lack.
NEEDED = {
    "fastapi": "fastapi",
    "starlette": "starlette",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "pydantic_settings": "pydantic-settings",
    "dotenv": "python-dotenv",
    "annotated_types": "annotated-types",
    "annotated_doc": "annotated-doc",
    "typing_inspection": "typing-inspection",
    "uvicorn": "uvicorn",
    "uvicorn_worker": "uvicorn-worker",
    "gunicorn": "gunicorn",
    "httptools": "httptools",
    "opentelemetry": "opentelemetry-api",
    "pytest_asyncio": "pytest-asyncio",
    "prometheus_client": "prometheus-client",
    "click": "click",  # uvicorn's
    "h11": "h11",  # uvicorn's
    "sentencepiece": "sentencepiece",  # tests/model_factory.py builds the XLM-R and DeBERTa tokenizers with it
    "google.protobuf": "protobuf",  # ... and writes their SentencePiece models with it
}
# What the rest of the test suite needs besides (``--suite``): schemathesis and what it pulls in.
SUITE_NEEDED = {
    "schemathesis": "schemathesis",
    "hypothesis": "hypothesis",
    "hypothesis_graphql": "hypothesis-graphql",
    "graphql": "graphql-core",
    "jsonschema_rs": "jsonschema-rs",
    "pyrate_limiter": "pyrate-limiter",
    "harfile": "harfile",
    "werkzeug": "werkzeug",
    "markupsafe": "MarkupSafe",
    "requests": "requests",
    "urllib3": "urllib3",
    "charset_normalizer": "charset-normalizer",
    "rich": "rich",
    "markdown_it": "markdown-it-py",
    "mdurl": "mdurl",
    "pygments": "Pygments",
    "sortedcontainers": "sortedcontainers",
    "yaml": "PyYAML",
    # tests/test_fetch.py's ModelScope tests run app.fetch with modelscope's own client.
    "modelscope": "modelscope",
    "modelscope_hub": "modelscope-hub",
    "cryptography": "cryptography",
    "cffi": "cffi",
    "pycparser": "pycparser",
}
# Tools, not modules, pinned here (not this environment's dependencies): py-spy profiles the HTTP workers' GIL in
# the front-end step (bench/frontend.py --profile).
TOOLS = {"py-spy": "py-spy==0.4.3"}
INSTALLED_MARK = "RERANKER_BENCH_GPU_INSTALLED"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", "bench/results/gpu")),
        help="where gpu-bench.json and gpu-bench.txt go",
    )
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="prepared wheels (--prepare-wheels)")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where the wheels are installed")
    parser.add_argument(
        "--prepare-wheels",
        action="store_true",
        help="on a machine with network: download the wheels a GPU host lacks into --wheels, at "
        "this environment's versions, for --python-version, and exit",
    )
    parser.add_argument("--python-version", default="3.12", help="the GPU host's Python (for --prepare-wheels)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--workloads", default="target,gpu64")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument(
        "--workers",
        default="auto,1",
        help="HTTP worker counts (auto: WEB_CONCURRENCY unset, the server's default); the first also runs the "
        "baseline and the variants, the others run gpu64 alone",
    )
    parser.add_argument(
        "--frontend-workers",
        default="1,2,4,8",
        help="worker counts for bench.frontend (what the host's HTTP workers can feed an engine; 'none' skips it)",
    )
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per cell")
    parser.add_argument("--max-requests", type=int, default=300, help="requests per cell at most")
    parser.add_argument("--engine-pairs", default="64,256", help="batch sizes for the engine alone")
    parser.add_argument("--engine-tokens", type=int, default=256, help="tokens per pair for the engine alone")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the service (repeatable)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="LABEL:NAME=VALUE[,NAME=VALUE]",
        help="after the main runs, the service again with these settings (first worker count, no baseline), on "
        "--variant-workloads at --variant-clients, beside the main run's same cells (repeatable; default: "
        "'padded:RERANKER_PACKED_BATCHES=false', the padded batches packing replaced, and "
        "'budget32k:RERANKER_MAX_BATCH_TOKENS=32768', batches of twice the default token budget; "
        "'eager:RERANKER_CUDA_GRAPHS=false' runs every batch eagerly; 'none' for no variant)",
    )
    parser.add_argument("--variant-workloads", default="gpu64")
    parser.add_argument("--variant-clients", default="1,16,64")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/reranker-bench"))
    parser.add_argument(
        "--budget", type=float, default=450.0, help="seconds for everything; a step that would start past it is skipped"
    )
    parser.add_argument("--test-timeout", type=float, default=180.0, help="seconds for pytest -m gpu")
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    parser.add_argument(
        "--suite",
        metavar="MARKS",
        nargs="?",
        const="not docker",
        help="instead of the benchmark, run the test suite on this host (RERANKER_DEVICE=auto: the GPU) for these "
        "pytest marks (default 'not docker': no Docker there), within --budget; writes suite.txt",
    )
    args = parser.parse_args(argv)
    if args.variant is None:
        args.variant = ["padded:RERANKER_PACKED_BATCHES=false", "budget32k:RERANKER_MAX_BATCH_TOKENS=32768"]
    args.variants = {}
    for text in args.variant:
        if text == "none":
            continue
        label, _, settings = text.partition(":")
        if not label or "=" not in settings:
            parser.error(f"--variant {text!r}: want LABEL:NAME=VALUE[,NAME=VALUE]")
        args.variants[label] = settings.split(",")
    return args


# --------------------------------------------------------------------------------------------- the wheels


def prepare_wheels(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    args.wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{distribution}=={version(distribution)}" for distribution in {**NEEDED, **SUITE_NEEDED}.values()]
    for pinned in [*pins, *TOOLS.values()]:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            args.python_version,
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_28_x86_64",
            "-d",
            str(args.wheels),
            pinned,
        ]
        print("+", shlex.join(command), flush=True)
        subprocess.run(command, check=True)
    print(f"{len(list(args.wheels.glob('*.whl')))} wheels in {args.wheels}")
    return 0


def missing_modules(needed: dict[str, str]) -> list[str]:
    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ModuleNotFoundError:  # a dotted name whose parent is missing
            return True

    return [name for name in needed if absent(name)]


def normalised(distribution: str) -> str:
    """A distribution's name as wheel file names spell it: ``markdown-it-py`` -> ``markdown_it_py``."""
    return re.sub(r"[-_.]+", "_", distribution).lower()


def wheel_distribution(path: str) -> str:
    """``PyYAML-6.0.3-cp312-....whl`` -> ``pyyaml``: a wheel's distribution, as its file name has it."""
    return Path(path).name.split("-")[0].lower()


def install_and_rerun(args: argparse.Namespace, argv: list[str]) -> None:
    """Install the prepared wheels, then run this command again with them visible.

    All of the web stack's (what the benchmark runs were measured with), but of the suite's extra ones only
    those the host lacks: they include packages such as requests and PyYAML that the host's own libraries use,
    and a wheel of a package the host has would shadow the host's version."""
    needed = {**NEEDED, **SUITE_NEEDED} if args.suite else NEEDED
    missing = missing_modules(needed)
    if not missing:
        return
    if os.environ.get(INSTALLED_MARK):
        sys.exit(f"still missing after installing the wheels: {missing}; prepare them with --prepare-wheels")
    wanted = {normalised(distribution) for distribution in [*NEEDED.values(), *TOOLS]}
    wanted |= {normalised(SUITE_NEEDED[name]) for name in missing if name in SUITE_NEEDED}
    wheels = sorted(path for path in glob.glob(str(args.wheels / "*.whl")) if wheel_distribution(path) in wanted)
    if not wheels:
        sys.exit(
            f"missing {missing} and no wheels in {args.wheels}: run 'python -m bench.gpu --prepare-wheels' on "
            "a machine with network and carry the folder along"
        )
    # A virtual environment at --site: the wheels in its site-packages, then the host's own site directories, so
    # its python sees both whatever environment a subprocess is given (tests replace PYTHONPATH).
    python, purelib = venv_seeing_this_python(args.site, with_pip=False)
    print(f"installing {len(wheels)} wheels for {missing} into {purelib}", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--upgrade",
            "--target",
            str(purelib),
            *wheels,
        ],
        check=True,
    )
    os.chdir(REPO)
    os.execve(str(python), [str(python), "-m", "bench.gpu", *argv], {**os.environ, INSTALLED_MARK: "1"})


# ------------------------------------------------------------------------------------------------- steps


class Steps:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.record: dict[str, Any] = {"steps": {}}

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.started)

    def run(self, name: str, command: list[str], *, needs_s: float, timeout_s: float, env: Sequence[str] = ()) -> bool:
        """Run one step as a subprocess, its output to ``<out>/<name>.log``; skip it if the budget is spent."""
        log_path = self.args.out / f"{name}.log"
        if self.left() < needs_s:
            self.record["steps"][name] = {"skipped": f"out of time ({self.left():.0f}s left, needs ~{needs_s:.0f}s)"}
            print(f"== {name}: skipped, out of time", flush=True)
            return False
        print(f"== {name}: {shlex.join(command)}", flush=True)
        began = time.monotonic()
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(item.split("=", 1) for item in env)}
        with log_path.open("wb") as log:
            try:
                code = subprocess.run(
                    command,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    timeout=max(10.0, min(timeout_s, self.left())),
                ).returncode
            except subprocess.TimeoutExpired:
                code = -1
        text = log_path.read_text(errors="replace")
        self.record["steps"][name] = {
            "command": shlex.join(command),
            "exit": code,
            "seconds": round(time.monotonic() - began, 1),
            "log_tail": text[-4000:],
        }
        print(f"== {name}: exit {code} in {time.monotonic() - began:.0f}s", flush=True)
        return code == 0

    def run_json(
        self, name: str, command: list[str], *, needs_s: float, timeout_s: float, env: Sequence[str] = ()
    ) -> Any:
        """``run`` for a command that takes ``--json PATH``: its figures, written to ``<out>/<name>.json`` (None
        when the step was skipped or failed)."""
        result = self.args.out / f"{name}.json"
        if self.run(name, [*command, "--json", str(result)], needs_s=needs_s, timeout_s=timeout_s, env=env):
            return json.loads(result.read_text())
        return None


def batch_figures(cell: dict[str, Any]) -> str:
    """A service cell's average forward pass (pairs, tokens as run, ms: to set beside the engine alone's), the
    forward thread's busy share, tokenising per request, and the load generator's CPU (near 1.00: it limits)."""
    extra = cell.get("server_extra") or {}
    return (
        f"{cell['clients']}: {extra.get('mean_batch_pairs', 0):.0f} pairs/{extra.get('mean_batch_tokens', 0):.0f} t "
        f"{extra.get('mean_batch_ms', 0):.1f} ms busy {extra.get('model_busy_share', 0):.0%} "
        f"tok {extra.get('tokenize_ms', 0):.1f} ms load {cell.get('client_cores', 0):.2f}"
    )


def summarise(record: dict[str, Any]) -> list[str]:
    """The figures against the issue's goals, as lines of text."""
    lines: list[str] = []
    engine = record.get("engine_alone") or {}
    # Runs before the layouts were measured apart have no "layout": their batches were uniform.
    batches = {(b["pairs"], b.get("layout", "uniform")): b for b in engine.get("batches", [])}
    # The goals' setting, 64 pairs of 256 tokens, unpadded: the stricter reference (see bench/engine_alone.py).
    engine64 = batches.get((64, "uniform"))
    padded_engine = record.get("engine_alone_padded") or {}
    padded64 = {b.get("layout"): b for b in padded_engine.get("batches", []) if b["pairs"] == 64}.get("uniform")
    for label, figures in (("engine alone", engine), ("engine alone, padded batches", padded_engine)):
        if not figures.get("batches"):
            continue
        described = figures["describe"]
        lines.append(
            f"{label} ({described.get('device')}, {described.get('dtype')}, packed "
            f"{described.get('packed_batches', 'false')}, {described.get('cuda_graphs')} graphs):"
        )
        lines.extend(
            f"  {b['pairs']} pairs x {b.get('shortest', b['longest'])}-{b['longest']} tokens "
            f"({b.get('layout', 'uniform')}): {b['pairs_per_s']:.0f} pairs/s, {b['ms_per_batch']:.2f} ms/batch, "
            f"{100 * b['peak_fraction']:.0f}% of the {figures['matmul_peak_flops'] / 1e12:.0f} TFLOP/s matmul peak"
            for b in figures["batches"]
        )
    for key, run in sorted(record.get("service", {}).items()):
        cells = run.get("cells", [])
        lines.append(f"\n{key}: pairs/s (p50 ms, % of matmul peak, x baseline)")
        for workload in dict.fromkeys(c["workload"] for c in cells):
            for server in ("service", "baseline"):
                mine = sorted(
                    (c for c in cells if c["workload"] == workload and c["server"] == server),
                    key=lambda c: c["clients"],
                )
                if not mine:
                    continue
                row = ", ".join(
                    f"{c['clients']}: {c['pairs_per_s']:.0f} ({c['p50_ms']:.0f} ms, {100 * c['peak_fraction']:.0f}%"
                    + (f", {c['ratio_to_baseline']:.2f}x" if c.get("ratio_to_baseline") else "")
                    + (f", {c['errors']} errors" if c["errors"] else "")
                    + ")"
                    for c in mine
                )
                lines.append(f"  {workload:<7} {server:<8} {row}")
                if server == "service":
                    lines.append(f"  {'':<7} {'batches':<8} " + ", ".join(map(batch_figures, mine)))
        by = {(c["workload"], c["clients"]): c for c in cells if c["server"] == "service"}
        goals = []
        if engine64:
            for clients in (16, 64):
                cell = by.get(("gpu64", clients))
                if cell:
                    share = cell["pairs_per_s"] / engine64["pairs_per_s"]
                    beside_padded = (
                        f" ({cell['pairs_per_s'] / padded64['pairs_per_s']:.1%} of the padded engine's)"
                        if padded64
                        else ""
                    )
                    goals.append(
                        f"gpu64 at {clients} clients: {share:.1%} of the engine alone{beside_padded} (want >= 85%): "
                        f"{'met' if share >= 0.85 else 'NOT met'}; {100 * cell['peak_fraction']:.1f}% of "
                        f"peak (want >= 40%): {'met' if cell['peak_fraction'] >= 0.40 else 'NOT met'}"
                    )
            one = by.get(("gpu64", 1))
            if one:
                goals.append(
                    f"gpu64 p50 at 1 client {one['p50_ms']:.1f} ms vs the engine's batch "
                    f"{engine64['ms_per_batch']:.1f} ms (want within a few ms)"
                )
        low, high = by.get(("gpu64", 4)), by.get(("gpu64", 64))
        if low and high:
            held = high["pairs_per_s"] >= 0.95 * low["pairs_per_s"]
            goals.append(
                f"gpu64 4 -> 64 clients: {low['pairs_per_s']:.0f} -> {high['pairs_per_s']:.0f} pairs/s "
                f"(no drop; 5% noise allowed): {'met' if held else 'NOT met'}"
            )
        target16 = by.get(("target", 16))
        if target16 and target16.get("ratio_to_baseline"):
            ratio = target16["ratio_to_baseline"]
            goals.append(
                f"target at 16 clients: {ratio:.2f}x the baseline (want >= 5x): {'met' if ratio >= 5 else 'NOT met'}"
            )
        lines.extend(f"  goal: {goal}" for goal in goals)
    tests = record["steps"].get("gpu-tests")
    if tests:
        tail = tests.get("log_tail", "").strip().splitlines()
        outcome = tests.get("skipped") or f"exit {tests.get('exit')}"
        lines.append(f"\npytest -m gpu: {outcome}" + (f"; {tail[-1]}" if tail else ""))
    if frontend := record.get("frontend"):
        lines.append(
            f"\nwhat the HTTP workers can feed an engine ({frontend['workload']}, bench.frontend: the simulated "
            f"device, almost free; {frontend['cores']} cores):"
        )
        for result in frontend["results"]:
            cells = ", ".join(
                f"{cell['clients']} clients {cell['pairs_per_s']} pairs/s on {cell['worker_cores']} cores"
                for cell in result["cells"]
            )
            lines.append(f"  {result['workers']} worker(s): {cells}; {result['worker_rss_mib']} MiB a worker")
            if gil := result.get("gil"):
                places = "; ".join(f"{place} {share:.0%}" for place, share in gil["top"][:5])
                lines.append(
                    f"    one worker's GIL held {gil['gil_held_share']:.0%} at {gil['clients']} clients: {places}"
                )
    if tokenize := record.get("tokenize"):
        figures = ", ".join(f"{label} {ms:.1f} ms" for label, ms in tokenize["ms"].items())
        lines.append(f"\ntokenising one gpu64 request ({tokenize['cores']} cores): {figures}")
    lines.append(
        "\nsteps: "
        + ", ".join(
            f"{name} {step.get('seconds', '-')}s" + (" SKIPPED" if "skipped" in step else "")
            for name, step in record["steps"].items()
        )
    )
    return lines


def service_command(
    args: argparse.Namespace,
    name: str,
    *,
    workers: str,
    baseline: bool,
    workloads: str | None = None,
    clients: str | None = None,
    env: Sequence[str] = (),
) -> list[str]:
    """``bench.run`` for one service run, its figures to ``<out>/<name>.json``."""
    command = [
        sys.executable,
        "-m",
        "bench.run",
        "--device",
        args.device,
        "--workloads",
        workloads or args.workloads,
        "--clients",
        clients or args.clients,
        "--duration",
        str(args.duration),
        "--max-requests",
        str(args.max_requests),
        "--workers",
        workers,
        "--no-memory",
        "--cache-dir",
        str(args.cache_dir),
        "--json",
        str(args.out / f"{name}.json"),
        "--plot",
        str(args.out / f"{name}.png"),
    ]
    if not baseline:
        command.append("--no-baseline")
    for item in [*args.service_env, *env]:
        command += ["--service-env", item]
    return command


def keep_service_figures(steps: Steps, args: argparse.Namespace, name: str, key: str) -> None:
    """A service run's figures (``<out>/<name>.json``, if it wrote them) into the record, under ``key``."""
    result = args.out / f"{name}.json"
    if result.is_file():
        figures = json.loads(result.read_text())
        if figures.get("service_workers"):  # what "auto" came to on this host
            key = key.replace("auto", f"auto ({figures['service_workers']})")
        steps.record["service"][key] = figures


def run_suite(args: argparse.Namespace) -> int:
    """The test suite on this host, as CI runs it bar Docker: does everything pass with the model on the GPU?"""
    steps = Steps(args)
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-m", args.suite]
    # A real "pip install ." needs an index (build isolation's setuptools, uvicorn[standard]'s uvloop...): none here.
    command += ["--deselect", "tests/test_package.py::test_pip_install_then_the_console_script_serves"]
    steps.run("suite", command, needs_s=30, timeout_s=args.budget)
    step = steps.record["steps"]["suite"]
    tail = step.get("log_tail", "").strip().splitlines()
    log = (args.out / "suite.log").read_text(errors="replace").splitlines()
    failures = [line for line in log if line.startswith(("FAILED", "ERROR"))]
    summary = [
        f"pytest -m {args.suite!r} on this host: exit {step.get('exit')} in {step.get('seconds')}s",
        *(tail[-2:] if tail else []),
        *failures,
    ]
    (args.out / "suite.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0 if step.get("exit") == 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.prepare_wheels:
        return prepare_wheels(args)
    install_and_rerun(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.suite:
        return run_suite(args)
    steps = Steps(args)
    python = sys.executable

    # The benchmark model (bge-reranker-base's shape, random weights), built once into the cache.
    steps.run(
        "model",
        [
            python,
            "-c",
            f"from bench.model import ensure_model; from pathlib import Path; "
            f"print(ensure_model(Path({str(args.cache_dir)!r})))",
        ],
        needs_s=30,
        timeout_s=300,
    )
    model_dir = args.cache_dir / "bge-reranker-base"

    def engine_alone(name: str, pairs: str, env: Sequence[str] = ()) -> Any:
        command = [python, "-m", "bench.engine_alone", "--model-dir", str(model_dir), "--device", args.device]
        command += ["--pairs", pairs, "--tokens", str(args.engine_tokens)]
        return steps.run_json(name, command, needs_s=40, timeout_s=180, env=env)

    # The engine as it serves (packed batches where the model and GPU allow); with padded batches near the end.
    steps.record["engine_alone"] = engine_alone("engine-alone", args.engine_pairs)

    # In order of what a short budget may least afford to lose: the first worker count (with the baseline: the
    # goals' figures), the GPU tests, the other worker counts, the front end alone, the variants, the engine alone
    # on padded batches, then the tokenising figures.
    steps.record["service"] = {}
    worker_counts = args.workers.split(",")

    def service_run(workers: str, *, baseline: bool) -> None:
        name = f"service-{workers}" + ("w" if workers.isdigit() else "")
        command = service_command(
            args, name, workers=workers, baseline=baseline, workloads=None if baseline else args.variant_workloads
        )
        steps.run(name, command, needs_s=90 if baseline else 60, timeout_s=330)
        keep_service_figures(steps, args, name, f"service, {workers} HTTP worker(s)")

    service_run(worker_counts[0], baseline=True)  # the baseline does not depend on our worker count

    if not args.no_tests:
        # tests/test_gpu.py only: other modules need what a GPU host lacks (schemathesis) and run in CI anyway.
        steps.run(
            "gpu-tests",
            [python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu.py"],
            needs_s=30,
            timeout_s=args.test_timeout,
        )

    # The other worker counts on gpu64 (by default one worker: what an unset WEB_CONCURRENCY replaced), then
    # what this host's HTTP workers can feed an engine at all (no GPU: the simulated device, almost free).
    for workers in worker_counts[1:]:
        service_run(workers, baseline=False)
    if args.frontend_workers != "none":
        frontend = [python, "-m", "bench.frontend", "--workers", args.frontend_workers, "--clients", "16,64"]
        frontend += ["--profile", "--duration", "3", "--cache-dir", str(args.cache_dir)]
        steps.record["frontend"] = steps.run_json("frontend", frontend, needs_s=40, timeout_s=240)

    for label, settings in args.variants.items():
        name = f"variant-{label}"
        command = service_command(
            args,
            name,
            workers=worker_counts[0],
            baseline=False,
            workloads=args.variant_workloads,
            clients=args.variant_clients,
            env=settings,
        )
        steps.run(name, command, needs_s=75, timeout_s=240)
        keep_service_figures(
            steps, args, name, f"variant {label} ({', '.join(settings)}), {worker_counts[0]} HTTP worker(s)"
        )

    steps.record["engine_alone_padded"] = engine_alone(
        "engine-alone-padded", args.engine_pairs.split(",")[0], ["RERANKER_PACKED_BATCHES=false"]
    )

    steps.record["tokenize"] = steps.run_json(
        "tokenize", [python, "-m", "bench.tokenize_threads", "--model-dir", str(model_dir)], needs_s=30, timeout_s=120
    )

    steps.record["total_seconds"] = round(time.monotonic() - steps.started, 1)
    summary = summarise(steps.record)
    (args.out / "gpu-bench.json").write_text(json.dumps(steps.record, indent=2))
    (args.out / "gpu-bench.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    print(f"\n{args.out / 'gpu-bench.json'}, {args.out / 'gpu-bench.txt'} ({steps.record['total_seconds']}s)")
    # pytest's 5 is "no test ran" (no GPU tests selected): reported above, not a failure of the benchmark.
    failed = [
        name
        for name, step in steps.record["steps"].items()
        if step.get("exit") not in (0, None) and not (name == "gpu-tests" and step.get("exit") == 5)
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
