"""The benchmark's comparisons that the README and docs/cpu-int8.md quote: the per-token int8 layer computes what
its description says, and the Infinity ratio is judged against the 1.5x goal."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.int8_dynamic import DynamicInt8Linear, SimulatedInt8Linear, TimeSplit, time_split
from bench.report import Cell
from bench.run import check_targets, infinity_executable


def test_the_int8_kernel_path_equals_the_same_rounding_done_in_float() -> None:
    """oneDNN's u8 x s8 product plus the rank-one correction is exactly per-token asymmetric, per-channel
    symmetric int8 rounding (so the accuracy figures measure the method, not a mistake in the algebra)."""
    torch.manual_seed(0)
    linear = nn.Linear(384, 1536)
    x = torch.randn(3, 40, 384) * torch.linspace(0.1, 4.0, 384)  # channels of very different ranges
    x[:, :, 7] += 12.0  # an outlier channel, as BERT's residual stream has
    with torch.inference_mode():
        exact = linear(x)
        kernel = DynamicInt8Linear(linear, out_dtype=torch.float32)(x)
        simulated = SimulatedInt8Linear(linear, weights=True, activations=True)(x)
    assert kernel.shape == exact.shape == (3, 40, 1536)
    torch.testing.assert_close(kernel, simulated, rtol=1e-4, atol=1e-3)
    error = (kernel - exact).abs().max().item()
    assert 1e-3 < error < 0.1 * exact.abs().max().item()  # int8 rounding: visible, but far from wrong


def test_smoothing_is_undone_inside_the_layer() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    x = torch.randn(10, 64)
    smooth = torch.rand(64) * 3 + 0.2
    with torch.inference_mode():
        plain = DynamicInt8Linear(linear, out_dtype=torch.float32)(x)
        smoothed = DynamicInt8Linear(linear, out_dtype=torch.float32, smooth=smooth)(x)
        exact = linear(x)
    scale = exact.abs().max()
    assert (plain - exact).abs().max() < 0.05 * scale
    assert (smoothed - exact).abs().max() < 0.05 * scale  # weights scaled up by `smooth`, inputs divided back
    assert (smoothed - plain).abs().max() > 1e-4  # a different rounding, not the same layer


def _cell(server: str, clients: int, ratio_to_infinity: float | None) -> Cell:
    return Cell(
        workload="target",
        clients=clients,
        server=server,
        requests=10,
        errors=0,
        wall_s=1.0,
        pairs_per_s=40.0,
        windows_per_s=40.0,
        tokens_per_s=4000.0,
        model_flops_per_s=1e11,
        peak_fraction=0.3,
        p50_ms=100.0,
        p95_ms=120.0,
        p99_ms=130.0,
        server_cores=1.8,
        other_load_cores=0.0,
        ratio_to_infinity=ratio_to_infinity,
    )


def test_the_infinity_goal_is_judged_at_4_and_16_clients() -> None:
    lines = check_targets([_cell("service", 4, 1.08), _cell("service", 16, 1.62), _cell("infinity", 16, None)])
    assert "4 clients: 1.08x Infinity's pairs/s (want >= 1.5x): NOT met" in lines
    assert "16 clients: 1.62x Infinity's pairs/s (want >= 1.5x): met" in lines
    assert not any("Infinity" in line for line in check_targets([_cell("service", 4, None)]))


def test_infinity_is_driven_only_where_asked_or_installed(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert infinity_executable("off") is None
    assert infinity_executable("/opt/infinity/bin/infinity_emb") == "/opt/infinity/bin/infinity_emb"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert infinity_executable("auto") is None
    executable = tmp_path / "infinity_emb"
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    assert infinity_executable("auto") == str(executable)


def test_the_int8_peak_is_measured_on_the_cpu_and_refused_for_cuda() -> None:
    from bench.flops import measure_matmul_peak

    assert measure_matmul_peak(dtype_name="int8", device="cpu", threads=1, repeats=1) > 1e9  # op/s
    with pytest.raises(ValueError, match="CPU only"):
        measure_matmul_peak(dtype_name="int8", device="cuda", threads=1)


def test_the_ceiling_is_amdahls_law_over_the_profiled_split() -> None:
    """The bound quoted in docs/cpu-int8.md: only the linear products get faster, everything else stays."""
    split = TimeSplit(whole=0.254, linear=0.159, attention=0.015)
    assert split.other == pytest.approx(0.080)
    assert split.ceiling(1.0) == pytest.approx(1.0)
    assert split.ceiling(2.0) == pytest.approx(0.254 / (0.095 + 0.0795))
    assert split.ceiling(math.inf) == pytest.approx(0.254 / 0.095)  # free products: the rest sets the pace
    needed = split.product_speedup_needed(1.6)
    assert split.ceiling(needed) == pytest.approx(1.6)
    assert split.product_speedup_needed(3.0) == math.inf  # beyond 0.254 / 0.095 = 2.67x nothing will do


def test_a_profiled_pass_is_split_into_its_linear_products_and_the_rest() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512), nn.LayerNorm(512)).eval()
    x = torch.randn(256, 512)
    queries, keys = torch.randn(8, 64, 32), torch.randn(8, 32, 64)

    def run() -> None:
        with torch.inference_mode():
            model(x)
            torch.bmm(queries, keys).softmax(-1)

    run()
    split = time_split(run, passes=5)
    assert split.whole > 0
    assert 0 < split.linear < split.whole  # the two products were seen, and they are not all of it
    assert 0 < split.attention < split.linear  # the batched product, far smaller than the linear layers'
    assert split.other > 0  # GELU, the layer norm and the softmax
    assert split.linear + split.attention + split.other == pytest.approx(split.whole)
