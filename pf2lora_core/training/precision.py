"""Numeric precision of local training: float32 matmuls everywhere, bf16 autocast only where it is safe.

Choices, and why:

- **float32 matmuls are IEEE float32** (``torch.set_float32_matmul_precision("highest")``, i.e.
  no TF32 on Ampere/Hopper, no bf16 passes inside oneDNN on CPU). The finite-difference HVP
  subtracts two gradients that differ by about ``eps`` relative; TF32's 10-bit mantissa (about
  5e-4 relative rounding) would swamp that difference. Set once per client process
  (``configure_matmul_precision``); it is torch's default, made explicit so that a library or a
  user's site hook turning TF32 on cannot silently degrade the hypergradient. cuDNN's TF32 flag
  is left alone: the models here run no convolutions.
- **bf16 autocast** (``bf16: true``) covers every pass whose result is used directly, except the
  passes that form a finite difference: both ends of each difference run float32 with autocast
  off (``float32_pass``), since bf16's 8-bit mantissa (about 4e-3 relative) is larger than the
  signal. Per method, with ``bf16: true``:

  ===================================  ===========================  ============================
  method                               bf16 passes                  float32 passes
  ===================================  ===========================  ============================
  exact (reverse or forward mode)      inner, outer, HVP            none
  finite_difference, forward           outer grad_x f(x, y')        inner (the base), y + d v
  finite_difference, central           inner, outer                 y + d v, y - d v
  finite_difference + reuse_inner_grad first step's carried grad_y  outer (the base), y' + d v
  first_order, joint, one-level        every pass                   none
  ===================================  ===========================  ============================

  Losses are always reduced in float32 (logits are cast first), parameters, gradients and
  optimizer states stay float32, and what leaves a client is float32 on the CPU
  (``TwoLevelModel.export``; Flower's ArrayRecord rejects bfloat16). Evaluation runs under the
  same autocast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

# True inside a pass whose gradients form a finite difference (read by solver.autocast_context)
_FLOAT32_PASS: ContextVar[bool] = ContextVar("pf2lora_float32_pass", default=False)


@contextmanager
def float32_pass() -> Iterator[None]:
    """Run the enclosed passes in float32: the task's bf16 autocast stands down inside."""
    token = _FLOAT32_PASS.set(True)
    try:
        yield
    finally:
        _FLOAT32_PASS.reset(token)


def float32_required() -> bool:
    """Whether the current pass must run in float32 (inside ``float32_pass``)."""
    return _FLOAT32_PASS.get()


def configure_matmul_precision() -> None:
    """IEEE float32 matmuls (no TF32): see the module docstring."""
    torch.set_float32_matmul_precision("highest")
