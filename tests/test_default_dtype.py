"""The CPU default dtype: bf16 only where the CPU has bf16 matrix instructions (AVX512-BF16 or AMX); everywhere
else float32, because emulated bf16 is several times slower than float32 there."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from app.config import DType
from app.engine import torch_backend
from app.engine.torch_backend import cpu_has_native_bf16, resolve_dtype

# "flags" lines as /proc/cpuinfo prints them (two processors each), shortened to the features that matter here
# plus their neighbours, so that a substring match (avx512bw, avx512_vnni, amx_tile) cannot pass for the flag.
SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ZEN4 = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx512vbmi\n"
ZEN2 = "flags\t\t: fpu sse2 avx2 fma bmi2 sha_ni clzero\n"
ICE_LAKE = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bitalg avx512_vpopcntdq\n"
GRAVITON3 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 i8mm sve svebf16\n"


def cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n" + flags + "\nprocessor\t: 1\n" + flags)
    monkeypatch.setattr(torch_backend, "CPUINFO", path)


@pytest.mark.parametrize(
    ("flags", "native"),
    [(SAPPHIRE_RAPIDS, True), (ZEN4, True), (ZEN2, False), (ICE_LAKE, False), (GRAVITON3, False)],
    ids=["sapphire-rapids", "zen4", "zen2", "ice-lake", "graviton3"],
)
def test_auto_picks_bf16_only_with_bf16_matrix_instructions(
    flags: str, native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo(tmp_path, monkeypatch, flags)
    assert cpu_has_native_bf16() is native
    assert resolve_dtype(DType.auto, torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)


def test_an_unreadable_cpuinfo_keeps_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_backend, "CPUINFO", tmp_path / "absent")
    assert resolve_dtype(DType.auto, torch.device("cpu")) == torch.float32


def test_an_explicit_dtype_is_kept_whatever_the_cpu_and_emulated_bf16_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cpuinfo(tmp_path, monkeypatch, ZEN2)
    with caplog.at_level(logging.WARNING, logger=torch_backend.__name__):
        assert resolve_dtype(DType.float32, torch.device("cpu")) == torch.float32
        assert not caplog.records
        assert resolve_dtype(DType.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert "without bf16 matrix instructions" in caplog.text and "unset RERANKER_DTYPE" in caplog.text
    caplog.clear()
    cpuinfo(tmp_path, monkeypatch, SAPPHIRE_RAPIDS)
    with caplog.at_level(logging.WARNING, logger=torch_backend.__name__):
        assert resolve_dtype(DType.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert not caplog.records
