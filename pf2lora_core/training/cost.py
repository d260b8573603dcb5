"""Measured cost of local training: FLOPs counted by ``torch.utils.flop_counter``.

``FlopCounterMode`` intercepts every aten op of the wrapped call (forward, backward, double
backward and forward-mode AD alike) and adds up the FLOPs of matrix products and attention, the
ops that dominate a transformer; elementwise ops count zero, as in every FLOP table. So the
hypergradient's extra passes are counted exactly as they run. Counting costs some Python
dispatch per op (5-30% on MiniLM on CPU), which is why clients count only in the first rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` and return its result with the FLOPs it executed."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())
