"""Device choice and seeding, parsed once from config."""

from __future__ import annotations

import random

import numpy as np
import torch


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present; otherwise the device named (``cpu``, ``cuda``, ``cuda:1``)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"device: {spec!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {spec!r} asked for CUDA but torch sees no GPU (use device=auto or cpu)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A seed derived deterministically from integers (run seed, client, round, ...)."""
    gen = np.random.default_rng(list(parts))
    return int(gen.integers(0, 2**62))
