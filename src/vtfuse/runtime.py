"""Where and how a model runs: the device, bf16 autocast, and the random seeds. Training,
inference, evaluation and serving all import these; none of them imports the others for it."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch

PRECISIONS = ("auto", "fp32", "bf16")
CPUINFO = Path("/proc/cpuinfo")


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto": the GPU when CUDA has one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# `--precision auto` trains under bf16 autocast from this many parameters up, on hardware with
# bf16 matrix units. Measured on a 2-core CPU with AMX (samples/s bf16 ÷ fp32): 1.37× at 7.7 M
# parameters, 2.33× at 61 M (benchmarks/run.py); below, it depends on the shapes (0.79× for a
# 0.8 M captioner over 9 image tokens, 1.27× for the default 1.2 M one over 81:
# benchmarks/precision.py). The default models stay fp32 until their learning curves, all
# measured in fp32, are re-measured in bf16.
BF16_MIN_PARAMETERS = 4_000_000


def bf16_is_fast(device: torch.device) -> bool:
    """Has `device` bf16 matrix units: a CUDA GPU that supports bf16 (Ampere on), or a CPU with
    AMX or AVX-512 BF16 (read from /proc/cpuinfo: elsewhere, False)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = CPUINFO.read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def training_precision(precision: str, device: torch.device, parameters: int) -> str:
    """The precision a run trains in: "auto" is bf16 for a model of `BF16_MIN_PARAMETERS` or
    more on a device with bf16 matrix units, fp32 otherwise; "fp32" and "bf16" as asked."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if parameters >= BF16_MIN_PARAMETERS and bf16_is_fast(device) else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on CPU or CUDA; fp32 runs without autocast."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32 or bf16")
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
