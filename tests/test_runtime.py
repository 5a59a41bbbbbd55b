"""Where and how a model runs: which hardware has bf16 matrix units."""

from __future__ import annotations

import torch

from vtfuse import runtime

CPU = torch.device("cpu")


def test_bf16_hardware_on_the_cpu_is_read_from_its_flags(monkeypatch, tmp_path):
    """AMX or AVX-512 BF16 in /proc/cpuinfo's flags; a device that is neither CPU nor CUDA has
    none."""
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    for flags, fast in [("fpu avx2 avx512f", False), ("fpu amx_bf16 amx_tile", True),
                        ("avx512f avx512_bf16", True)]:  # fmt: skip
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert runtime.bf16_is_fast(CPU) is fast
    cpuinfo.unlink()
    assert runtime.bf16_is_fast(CPU) is False
    assert runtime.bf16_is_fast(torch.device("meta")) is False
