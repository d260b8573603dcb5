"""PF2LoRA's local solver: K bilevel steps on one client (DESIGN.md, "training is bilevel").

One local step on client k, with ``x`` the common adapter and ``y`` the private one::

    y' = y - alpha * grad_y f(x, y)                                    (lower level, plain SGD)
    h  = grad_x f(x, y') - alpha * H_xy f(x, y) @ grad_y f(x, y')       (hypergradient, eq. 1)
    x  = AdamW(x, h; lr=beta)                                          (upper level)
    y  = y'

The HVP in ``h`` comes from ``pf2lora_core.hypergrad``. All passes of one step see the same
batch and the same dropout masks (the RNG is re-seeded per pass from one per-step seed), so
``h`` is the exact derivative of one fixed stochastic objective (``pf2lora_core.noise``: the
masks are drawn once per step and replayed in the later passes).

Choices the paper leaves open, and ours:

- *Batches*: the inner step, the outer gradient and the HVP use the same minibatch (the
  forward finite difference then reuses the inner pass's ``grad_x f(x, y)`` for free).
- *Optimizer state across rounds*: AdamW's moments are reset at the start of every round.
  The server replaces ``x`` by the average each round, so moments from the client's own previous
  trajectory describe a different point; resetting also keeps clients stateless for ``x``.
- *Initialisation*: peft's LoRA init for both levels (A, C Kaiming-uniform; B, D zero), so the
  adapted model starts equal to the base model and ``D C = 0`` until the private level learns.
  The private level is initialised once per client from the run seed and then persists.
- *reuse_inner_grad* (off by default, not in the paper): the next step's inner gradient is the
  ``grad_y f(x_t, y_{t+1})`` the outer pass has just computed (stale in ``x`` by one outer step),
  and the HVP is taken at ``y'`` (the outer pass's own ``grad_x`` is then the forward-difference
  base): two gradient evaluations per step instead of three.
- *joint* mode (the paper's ablation, no bilevel): one gradient of ``f(x, y)`` updates both
  levels at once, ``y`` by SGD (alpha) and ``x`` by AdamW (beta).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pf2lora_core.hypergrad import Evaluator, GradPass, HvpMethod, LossFn, _norm
from pf2lora_core.precision import float32_required

BILEVEL = "bilevel"
JOINT = "joint"
MODES = (BILEVEL, JOINT)


@dataclass
class StepStats:
    """What a local step reports (averaged over the round by the caller)."""

    loss: float
    hvp_norm: float = 0.0
    passes: int = 0


class BilevelSolver:
    """Runs PF2LoRA local steps on parameter dicts ``x`` (common) and ``y`` (private).

    Parameters
    ----------
    x, y:
        Upper- and lower-level parameters by name (the model's own ``nn.Parameter`` objects).
    hvp:
        An ``HvpMethod``; ignored in ``joint`` mode.
    inner_lr:
        ``alpha``, the lower level's SGD step size.
    outer_optimizer:
        Optimizer over ``x`` (AdamW with lr ``beta`` in PF2LoRA).
    """

    def __init__(
        self,
        x: dict[str, nn.Parameter],
        y: dict[str, nn.Parameter],
        hvp: HvpMethod,
        inner_lr: float,
        outer_optimizer: torch.optim.Optimizer,
        mode: str = BILEVEL,
        reuse_inner_grad: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not y:
            raise ValueError("the bilevel solver needs a non-empty private (lower) level")
        self.x, self.y = x, y
        self.hvp, self.alpha, self.opt = hvp, inner_lr, outer_optimizer
        self.mode, self.reuse = mode, reuse_inner_grad
        self._carried: list[Tensor] | None = None  # inner gradient carried by reuse_inner_grad

    def step(self, loss: LossFn) -> StepStats:
        ev = Evaluator(loss, dict(self.x), list(self.y))
        y = [p.detach() for p in self.y.values()]
        if self.mode == JOINT:
            return self._joint(ev, y)
        if self.reuse:
            return self._step_reuse(ev, y)
        return self._step_exact_rule(ev, y)

    # -------------------------------------------------------------- the rule of DESIGN.md
    def _step_exact_rule(self, ev: Evaluator, y: list[Tensor]) -> StepStats:
        # grad_y f(x,y) (+ grad_x f(x,y) only where the method needs it: the forward-difference base)
        inner = self.hvp.gradient_pass(ev, y, want_x=False)
        y_new = _sgd(y, inner.grad_y, self.alpha)
        outer = ev.grads(y_new)  # grad_x f(x,y'), v = grad_y f(x,y')
        hv = self.hvp.hvp(ev, y, outer.grad_y, inner)
        self._update(outer.grad_x, hv, y_new)
        return StepStats(loss=float(inner.loss), hvp_norm=_hvp_norm(hv), passes=3 if hv is not None else 2)

    def _step_reuse(self, ev: Evaluator, y: list[Tensor]) -> StepStats:
        passes = 0
        if self._carried is None:
            self._carried = ev.grads(y, want_x=False).grad_y
            passes += 1
        y_new = _sgd(y, self._carried, self.alpha)
        outer: GradPass = self.hvp.gradient_pass(ev, y_new)
        hv = self.hvp.hvp(ev, y_new, outer.grad_y, outer)  # HVP at y' (see module docstring)
        self._carried = outer.grad_y
        self._update(outer.grad_x, hv, y_new)
        return StepStats(loss=float(outer.loss), hvp_norm=_hvp_norm(hv), passes=passes + (2 if hv is not None else 1))

    def _joint(self, ev: Evaluator, y: list[Tensor]) -> StepStats:
        g = ev.grads(y)
        y_new = _sgd(y, g.grad_y, self.alpha)
        self._update(g.grad_x, None, y_new)
        return StepStats(loss=float(g.loss), passes=1)

    def _update(self, grad_x: list[Tensor], hv: list[Tensor] | None, y_new: list[Tensor]) -> None:
        """Outer AdamW step with h = grad_x - alpha * hv, then commit y <- y'."""
        params = list(self.x.values())
        h = grad_x if hv is None else torch._foreach_add(grad_x, hv, alpha=-self.alpha)
        for p, g in zip(params, h, strict=True):
            p.grad = g.to(p.dtype)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(list(self.y.values()), y_new)


def _sgd(y: list[Tensor], grad: list[Tensor], lr: float) -> list[Tensor]:
    """``y - lr * grad`` for a list of tensors (one fused kernel)."""
    return torch._foreach_add(y, grad, alpha=-lr)


def hypergradient(
    solver_hvp: HvpMethod, loss: LossFn, x: dict[str, Tensor], y: dict[str, Tensor], alpha: float
) -> list[Tensor]:
    """The hypergradient ``h`` of eq. (1) at ``(x, y)`` without updating anything (for tests)."""
    ev = Evaluator(loss, x, list(y))
    y0 = [t.detach() for t in y.values()]
    inner = solver_hvp.gradient_pass(ev, y0, want_x=False)
    y_new = _sgd(y0, inner.grad_y, alpha)
    outer = ev.grads(y_new)
    hv = solver_hvp.hvp(ev, y0, outer.grad_y, inner)
    if hv is None:
        return outer.grad_x
    return torch._foreach_add(outer.grad_x, hv, alpha=-alpha)


def _hvp_norm(hv: list[Tensor] | None) -> float:
    return 0.0 if hv is None else float(_norm(hv))


def autocast_context(device: torch.device, bf16: bool) -> AbstractContextManager[None]:
    """bf16 autocast when asked (CUDA, and CPU, which torch's autocast supports too), else float32.

    Inside ``precision.float32_pass`` (the finite-difference passes) autocast is off whatever
    ``bf16`` says; ``pf2lora_core.precision`` lists which pass runs in which precision.
    """
    if bf16 and device.type in ("cuda", "cpu") and not float32_required():
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def iterate_forever(batches: Iterable) -> Iterator:
    """Cycle over an iterable of batches (a client's K steps may exceed one epoch)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("no training batches: the client's train split is empty")
