"""Turning measured cells into figures: per-setting statistics, score accuracy, the printed table and the plot."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.driver import Sample, percentile
from bench.workloads import PreparedWorkload

SEPARATION = 0.02  # fp32 score gap of a "clearly separated" document pair: twice the 0.01 score tolerance


@dataclass
class Cell:
    """One server driven with one workload at one concurrency."""

    workload: str
    clients: int
    server: str  # "baseline" or "service"
    requests: int
    errors: int
    wall_s: float
    pairs_per_s: float  # documents scored per second
    windows_per_s: float  # (query, window) pairs through the model per second
    tokens_per_s: float
    model_flops_per_s: float
    peak_fraction: float  # of the matrix-multiply peak in the server's own compute dtype
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_cores: float  # CPU the server's processes used during the cell, in cores
    other_load_cores: float  # CPU used by processes outside the benchmark during the cell, in cores
    # CPU of the load generator (one asyncio thread): near 1.0 it, not the server, sets the figure.
    client_cores: float = 0.0
    server_extra: dict[str, float] = field(default_factory=dict)  # from the service's /metrics
    ratio_to_baseline: float | None = None
    latency_ratio_to_baseline: float | None = None
    ratio_to_infinity: float | None = None  # the service's pairs/s over Infinity's in the same setting


def summarise(
    prepared: PreparedWorkload,
    samples: list[Sample],
    wall: float,
    *,
    server: str,
    clients: int,
    peak: float,
    server_cores: float,
    other_load_cores: float,
    client_cores: float = 0.0,
) -> Cell:
    ok = [s for s in samples if s.status == 200]
    costs = [prepared.costs[s.request % len(prepared.costs)] for s in ok]
    latencies = [s.latency * 1000 for s in ok]
    flops = sum(c.flops for c in costs) / wall
    return Cell(
        workload=prepared.workload.name,
        clients=clients,
        server=server,
        requests=len(ok),
        errors=len(samples) - len(ok),
        wall_s=wall,
        pairs_per_s=sum(c.documents for c in costs) / wall,
        windows_per_s=sum(c.windows for c in costs) / wall,
        tokens_per_s=sum(c.tokens for c in costs) / wall,
        model_flops_per_s=flops,
        peak_fraction=flops / peak,
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        server_cores=server_cores,
        other_load_cores=other_load_cores,
        client_cores=client_cores,
    )


@dataclass
class Accuracy:
    """The service's scores against the float32 baseline's on the same requests."""

    workload: str
    requests: int
    documents: int
    max_abs_score_diff: float
    mean_abs_score_diff: float
    fp32_score_std: float  # how far the scores spread: a diff means little if every score is the same
    separated_pairs: int  # document pairs of one request whose fp32 scores differ by more than SEPARATION
    separated_order_mismatches: int
    top1_matches: int


def compare_scores(workload: str, ours: list[Sample], baseline: list[Sample]) -> Accuracy | None:
    reference = {s.request: s.scores for s in baseline if s.scores is not None}
    diffs: list[float] = []
    all_fp32: list[float] = []
    separated = mismatched = top1 = requests = 0
    seen: set[int] = set()
    for sample in ours:
        fp32 = reference.get(sample.request)
        if sample.scores is None or fp32 is None or sample.request in seen:
            continue
        seen.add(sample.request)
        requests += 1
        got = sample.scores
        diffs.extend(abs(a - b) for a, b in zip(got, fp32, strict=True))
        all_fp32.extend(fp32)
        top1 += max(range(len(got)), key=got.__getitem__) == max(range(len(fp32)), key=fp32.__getitem__)
        for i in range(len(fp32)):
            for j in range(i + 1, len(fp32)):
                if abs(fp32[i] - fp32[j]) > SEPARATION:
                    separated += 1
                    mismatched += (fp32[i] > fp32[j]) != (got[i] > got[j])
    if not requests:
        return None
    mean = sum(all_fp32) / len(all_fp32)
    std = math.sqrt(sum((v - mean) ** 2 for v in all_fp32) / len(all_fp32))
    return Accuracy(
        workload, requests, len(diffs), max(diffs), sum(diffs) / len(diffs), std, separated, mismatched, top1
    )


def print_cells(cells: list[Cell], peaks: dict[str, float]) -> None:
    peak_text = ", ".join(f"{name} {value / 1e9:.0f} GFLOP/s" for name, value in peaks.items())
    print(f"\nMatrix-multiply peak measured on this machine: {peak_text}")
    header = (
        f"{'setting':<11}{'clients':>7} {'server':<9}{'req':>5}{'err':>4}{'pairs/s':>9}{'tokens/s':>10}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'GFLOP/s':>9}{'% peak':>8}{'x base':>8}{'p50 x':>7}"
        f"{'x inf':>7}{'cores':>6}{'load':>6}{'other':>6}"
    )
    print(header)
    print("-" * len(header))
    for c in cells:
        ratio = f"{c.ratio_to_baseline:.2f}" if c.ratio_to_baseline is not None else "-"
        lat = f"{c.latency_ratio_to_baseline:.2f}" if c.latency_ratio_to_baseline is not None else "-"
        inf = f"{c.ratio_to_infinity:.2f}" if c.ratio_to_infinity is not None else "-"
        print(
            f"{c.workload:<11}{c.clients:>7} {c.server:<9}{c.requests:>5}{c.errors:>4}{c.pairs_per_s:>9.2f}"
            f"{c.tokens_per_s:>10.0f}{c.p50_ms:>9.0f}{c.p95_ms:>9.0f}{c.p99_ms:>9.0f}"
            f"{c.model_flops_per_s / 1e9:>9.0f}{100 * c.peak_fraction:>7.0f}%{ratio:>8}{lat:>7}{inf:>7}"
            f"{c.server_cores:>6.2f}{c.client_cores:>6.2f}{c.other_load_cores:>6.2f}"
        )
    print(
        "pairs/s: documents scored per second; % peak: model FLOP/s over the matmul peak of the server's own "
        "dtype;\nx base: pairs/s over the baseline's; p50 x: p50 latency over the baseline's; x inf: the service's "
        "pairs/s over\nInfinity's; cores: CPU the server used; load: CPU the load generator used (one thread: near "
        "1.00 it\nlimits the cell); other: CPU used meanwhile by processes outside the benchmark (other people's "
        "work), in cores."
    )


def plot(cells: list[Cell], path: Path) -> bool:
    """Pairs/s and p50 latency against clients, per setting; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = list(dict.fromkeys(c.workload for c in cells))
    figure, axes = plt.subplots(2, len(workloads), figsize=(4 * len(workloads), 7), squeeze=False)
    for column, workload in enumerate(workloads):
        for server, style in (("baseline", "o--"), ("infinity", "^:"), ("service", "s-")):
            mine = sorted((c for c in cells if c.workload == workload and c.server == server), key=lambda c: c.clients)
            if not mine:
                continue
            clients = [c.clients for c in mine]
            axes[0][column].plot(clients, [c.pairs_per_s for c in mine], style, label=server)
            axes[1][column].plot(clients, [c.p50_ms / 1000 for c in mine], style, label=server)
        axes[0][column].set_title(workload)
        axes[0][column].set_ylabel("pairs/s")
        axes[1][column].set_ylabel("p50 latency (s)")
        for row in axes:
            row[column].set_xscale("log", base=2)
            row[column].set_xlabel("concurrent clients")
            row[column].grid(alpha=0.3)
            row[column].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def as_json(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value
