"""How fast one request is tokenised, by how it is spread over threads: the latency a worker adds before the GPU.

    python -m bench.tokenize_threads --model-dir /tmp/reranker-bench/bge-reranker-base

Tokenises one ``gpu64`` request (64 documents of ~256 tokens) the way an HTTP worker with engine processes does
(``RerankService._encode_and_score``: parts of at least 4 documents, each tokenised and packed in an encode
thread), with 1 to 16 threads, and once more with the tokenizer's own Rust thread pool
(``TOKENIZERS_PARALLELISM=true``; the server sets it to false). Prints the median milliseconds per request;
``--json`` writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

THREADS = (1, 2, 4, 8, 16)


async def median_ms(model_dir: Path, threads: int, repeats: int) -> float:
    from app.service import RerankService, encode_parts
    from bench.workloads import WORKLOADS, load_encoder

    encoder = load_encoder(model_dir)
    workload = WORKLOADS["gpu64"]
    body = workload.bodies(1)[0]
    query, documents = str(body["query"]), list(body["documents"])  # type: ignore[call-overload]
    policy = workload.policy()
    loop = asyncio.get_running_loop()
    parts = encode_parts(len(documents), threads)  # as an idle worker with ``threads`` encode threads cuts it
    seconds = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 5):  # the first few start the threads
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    loop.run_in_executor(pool, RerankService._encode_and_pack, encoder, query, documents[part], policy)
                    for part in parts
                )
            )
            seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds[5:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tokenize_threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args(argv)
    if args.threads is not None:
        print(json.dumps(asyncio.run(median_ms(args.model_dir, args.threads, args.repeats))))
        return 0
    # Each figure in its own process: the tokenizer reads TOKENIZERS_PARALLELISM once.
    results: dict[str, float] = {}
    runs = [("false", threads) for threads in THREADS] + [("true", 1)]
    for parallelism, threads in runs:
        command = [sys.executable, "-m", "bench.tokenize_threads", "--model-dir", str(args.model_dir)]
        child = subprocess.run(
            [*command, "--repeats", str(args.repeats), "--threads", str(threads)],
            env={**os.environ, "TOKENIZERS_PARALLELISM": parallelism},
            capture_output=True,
            text=True,
            check=True,
        )
        label = f"{threads} encode threads" if parallelism == "false" else "1 call, the tokenizer's Rust threads"
        results[label] = round(float(child.stdout.strip().splitlines()[-1]), 2)
        print(f"{label}: {results[label]:.2f} ms", flush=True)
    print(f"(64 documents of ~256 tokens; {len(os.sched_getaffinity(0))} cores)")
    if args.json:
        args.json.write_text(json.dumps({"cores": len(os.sched_getaffinity(0)), "ms": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
