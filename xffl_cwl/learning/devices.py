"""Where training and evaluation run, and at which precision: choices both share."""

from __future__ import annotations

import contextlib

import torch

from xffl_cwl.errors import InputError


def pick_device(name: str = "auto") -> torch.device:
    """CUDA (ROCm builds answer to the same API) when present, CPU otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no GPU; use --device auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 mixed precision keeps fp32 master weights; fp32 runs plain."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise InputError(f"--precision must be fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext()
