"""Where and how a model runs: the precision `--precision auto` picks."""

from __future__ import annotations

import pytest
import torch

from vtfuse import runtime
from vtfuse.runtime import BF16_MIN_PARAMETERS, training_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("fast", [False, True])
def test_auto_is_bf16_only_for_a_large_model_on_bf16_hardware(monkeypatch, fast):
    monkeypatch.setattr(runtime, "bf16_is_fast", lambda device: fast)
    assert training_precision("auto", CPU, BF16_MIN_PARAMETERS - 1) == "fp32"
    assert training_precision("auto", CPU, BF16_MIN_PARAMETERS) == ("bf16" if fast else "fp32")


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_an_explicit_precision_is_kept(monkeypatch, asked):
    monkeypatch.setattr(runtime, "bf16_is_fast", lambda device: asked == "fp32")
    assert training_precision(asked, CPU, 10**9) == asked
    assert training_precision(asked, CPU, 10) == asked


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match=r"'fp16'.*auto, fp32, bf16"):
        training_precision("fp16", CPU, 10)


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
