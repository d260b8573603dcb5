"""Measured cost of local training: FLOPs counted by ``torch.utils.flop_counter``.

``FlopCounterMode`` intercepts every aten op of the wrapped call (forward, backward, double
backward and forward-mode AD alike) and adds up the FLOPs of matrix products and attention, the
ops that dominate a transformer; elementwise ops count zero, as in every FLOP table. So the
hypergradient's extra passes are counted exactly as they run. Counting costs some Python
dispatch per op (5-30% on MiniLM on CPU), which is why clients count only in the first rounds.

Attention is counted under SDPA's math kernel, where it is plain matrix products the counter
always sees (the same FLOPs as the fused kernels compute). The fused kernels' own rules miss or
break on what we run: on CPU (torch 2.13) the counter credits the fused SDPA with zero FLOPs, and
with grouped-query attention (SmolLM2: 9 query, 3 key/value heads; transformers passes
``enable_gqa=True``) torch's SDPA rule before 2.13 asserts equal head counts, which would crash
the counted first round of any GQA decoder on GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


@contextlib.contextmanager
def flop_counter() -> Iterator[FlopCounterMode]:
    """A running ``FlopCounterMode`` with attention on SDPA's math kernel (see the module docstring)."""
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        yield counter


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` and return its result with the FLOPs it executed."""
    with flop_counter() as counter:
        result = fn()
    return result, int(counter.get_total_flops())
