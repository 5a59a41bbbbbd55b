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
