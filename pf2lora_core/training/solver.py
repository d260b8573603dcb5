"""PF2LoRA's local solver: K bilevel steps on one client (docs/DESIGN.md, "The update rule").

One local step on client k, with ``x`` the common adapter and ``y`` the private one::

    y' = y - alpha * phi(grad_y f(x, y))                                    (lower level)
    h  = grad_x f(x, y') - alpha * H_xy f(x, y) @ J_phi^T grad_y f(x, y')   (hypergradient, eq. 1)
    x  = AdamW(x, h; lr=beta)                                               (upper level)
    y  = y'

``phi`` is the lower level's step direction, chosen by ``algorithm.inner_step`` (``INNER_STEPS``),
and ``J_phi`` its Jacobian at ``g = grad_y f(x, y)``: since ``g`` depends on ``x`` through
``H_yx``, ``dy'/dx = -alpha J_phi H_yx`` and ``h`` is the exact derivative of
``x -> f(x, y - alpha phi(grad_y f(x, y)))``, the step actually taken, for every rule (the
float64 oracle tests differentiate through the whole step, ``phi`` included). Every ``J_phi``
below is symmetric, so the term is one HVP along the vector ``J_phi^T grad_y f(x, y')``:

- ``sgd``: ``phi(g) = g``, ``J = I``: the paper's rule (plain SGD, step ``alpha``; docs/DESIGN.md, "Lower level"),
  whose authors report a step of 1e-3 for the client-specific adapter. Plain SGD on LoRA
  factors has no natural scale: the private gradient's size varies by orders of magnitude with
  the model, the task, the ranks and the alphas (and within a run: ``grad_C = 0`` while
  ``D = 0``), so one ``alpha`` is a large relative step on one setting and none on another.
  Measured on MiniLM / Rotten Tomatoes (``benchmarks/robustness.py --diagnose``, round 1):
  ``||y' - y|| / ||y||`` per step is 1.5-9% at ``alpha = 5`` (the private level learns each
  client's label prior within a round and then outruns the common level) and 0.15-0.23% at
  ``alpha = 0.5`` (it barely moves: personalized = global); on SmolLM2 5.0 diverges outright.
- ``rms`` (the default; ``conf/algorithm/pf2lora.yaml`` gives the measurements): per private
  tensor ``t``, ``phi_t(g_t) = g_t / sqrt(m_t)`` with ``m_t`` the mean over this round's steps so
  far of ``mean(g_t^2)`` (``phi_t = 0`` while it is 0). Every tensor moves by ``alpha`` (root mean
  square per entry) per step whatever its gradient's scale, in its gradient's direction; alpha
  means what Adam's learning rate means (the paper's 1e-3 is of this scale; default: the common
  level's learning rate beta, so both levels move by the same amount per entry and step).
  ``J_t = P_t (I - g_t g_t^T / (n N_t m_t))`` (``P_t = m_t^(-1/2)``, ``n`` steps, ``N_t`` entries).
- ``trust``: ``phi(g) = (||y|| / ||g||) g`` over the whole private level, so that
  ``||y' - y|| = alpha ||y||`` exactly (a trust region of relative radius ``alpha``);
  ``J = (||y|| / ||g||) (I - g g^T / ||g||^2)``.

Treating the scale as a constant (``J = P I``) would be the common shortcut; it is not used: on
the float64 test problem, at ``alpha`` in [0.01, 0.05], it is 4-52% off the true hypergradient,
further off than dropping the second-order term altogether (0.2-35%); tests/training/test_hypergrad.py
checks the exact one and that the shortcut differs.

The HVP in ``h`` comes from ``pf2lora_core.training.hypergrad``. All passes of one step see the same
batch and the same dropout masks (the RNG is re-seeded per pass from one per-step seed), so
``h`` is the exact derivative of one fixed stochastic objective (``pf2lora_core.training.dropout_tape``: the
masks are drawn once per step and replayed in the later passes).

**Re-fit** (``refit_lower_level``; ``algorithm.refit_steps``, J = K by default, 0 = the paper's
algorithm): whenever the client receives a common level, before a round's bilevel steps and
before evaluating, J steps of the lower-level rule at that fixed ``x``,
``y <- y - alpha phi(grad_y f(x, y))``. The private level is kept across rounds, but the server
replaces the ``x`` it was trained with by the average; without the re-fit the kept ``y`` goes on
compensating a common level that no longer exists, and the personalized model can fall below its
own global one (measured: benchmarks/robustness.py, results/README.md). The bilevel problem
defines client k's model as ``(x, y_k*(x))``; the re-fit is that definition's warm-started,
first-order solve at the ``x`` the client uses. Like the paper's warm start of ``y`` across steps,
its dependence on ``x`` is not differentiated: each bilevel step's ``h`` stays the exact derivative
of that step's one-step unroll from the ``y`` it starts at. In training the re-fit reuses the
round's own K minibatches (no extra examples; J more gradient passes, in the FLOPs).

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
- *hvp_every* ``m`` (truncated hypergradient; 1, the default, is the exact rule): the HVP term
  is computed at the round's steps ``t = 0, m, 2m, ...`` only, and dropped at the others,
  ``h_t = grad_x f(x_t, y'_t)`` (``hvp=first_order`` at those steps): one gradient pass fewer at
  every such step (two instead of three; one instead of two with ``reuse_inner_grad``); ``m >= K``
  keeps one exact step a round. Measured error against the exact ``h_t`` at the same point, on the
  float64 test problem (5 steps, ``m = 5``): 0.08-0.30 relative at ``alpha = 0.5``, 0.02-0.07 at
  ``alpha = 0.1``. Reusing the last exact term instead was measured and rejected: 0.82-1.09 and
  0.07-0.22 at the same points, worse than dropping it from the second stale step on
  (tests/training/test_solver.py, ``test_truncated_hvp_error_is_measured``).
- *joint* mode (the paper's ablation, no bilevel): one gradient of ``f(x, y)`` updates both
  levels at once, ``y`` by its ``inner_step`` rule (alpha) and ``x`` by AdamW (beta).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pf2lora_core.training.hypergrad import Evaluator, GradPass, HvpMethod, LossFn, _norm, math_attention
from pf2lora_core.training.precision import float32_required

BILEVEL = "bilevel"
JOINT = "joint"
MODES = (BILEVEL, JOINT)


# ------------------------------------------------------------------ lower-level preconditioners
SGD = "sgd"
RMS = "rms"
TRUST = "trust"


class InnerMap:
    """One step's direction ``phi(g)`` (``y' = y - alpha phi(g)``) and its Jacobian's transpose.

    ``sgd``: ``phi(g) = g``. Subclasses scale ``g``; their ``transpose`` is the exact
    ``J_phi(g)^T v``, so that ``dy'/dx^T v = -alpha H_xy J_phi^T v`` (module docstring).
    """

    def direction(self, grad: list[Tensor]) -> list[Tensor]:
        return grad

    def transpose(self, v: list[Tensor]) -> list[Tensor]:
        return v


class _Scaled(InnerMap):
    """``phi(g)_t = P_t g_t``, ``J^T v = P_t (v_t - k_t g_t <g, v>_t)`` (``<,>_t``: the tensor's group)."""

    def __init__(self, grad: list[Tensor], p: list[Tensor], k: list[Tensor], per_tensor: bool) -> None:
        self.grad, self.p, self.k, self.per_tensor = grad, p, k, per_tensor

    def direction(self, grad: list[Tensor]) -> list[Tensor]:
        return torch._foreach_mul(grad, self.p)

    def transpose(self, v: list[Tensor]) -> list[Tensor]:
        dots = [(g.double() * u.double()).sum() for g, u in zip(self.grad, v, strict=True)]
        if not self.per_tensor:
            dots = [torch.stack(dots).sum()] * len(dots)
        coef = [(k * d).to(g.dtype) for k, d, g in zip(self.k, dots, self.grad, strict=True)]
        projected = torch._foreach_sub(list(v), torch._foreach_mul(self.grad, coef))
        return torch._foreach_mul(projected, self.p)


def _identity(y: list[Tensor], grad: list[Tensor]) -> InnerMap:
    """``sgd``: ``phi(g) = g``, the paper's rule (docs/DESIGN.md, "Lower level")."""
    return InnerMap()


class TensorRMS:
    """``rms``: ``P_t = m_t^(-1/2)``, ``m_t = (1/n) sum_{s<=n} mean(g_{t,s}^2)`` over the round's steps.

    ``phi_t(g_t) = g_t / sqrt((S_t + |g_t|^2 / N_t) / n)`` (``S_t``: the earlier steps' sum, a
    constant of this step; ``N_t``: the tensor's size), whose Jacobian is
    ``P_t (I - g_t g_t^T / (n N_t m_t))``. One object per round (the solver is built afresh
    every round), so the average starts over with the round, like AdamW's moments.
    """

    def __init__(self) -> None:
        self.sum_sq: list[Tensor] | None = None
        self.steps = 0

    def __call__(self, y: list[Tensor], grad: list[Tensor]) -> InnerMap:
        ms = [g.detach().double().square().mean() for g in grad]
        self.sum_sq = ms if self.sum_sq is None else torch._foreach_add(self.sum_sq, ms)
        self.steps += 1
        m = [s / self.steps for s in self.sum_sq]
        p = [_safe_inverse(mi.sqrt()) for mi in m]
        k = [_safe_inverse(self.steps * g.numel() * mi) for mi, g in zip(m, grad, strict=True)]
        return _Scaled(grad, [pi.to(g.dtype) for pi, g in zip(p, grad, strict=True)], k, per_tensor=True)


def _trust(y: list[Tensor], grad: list[Tensor]) -> InnerMap:
    """``trust``: ``phi(g) = (||y|| / ||g||) g``, Jacobian ``(||y|| / ||g||) (I - g g^T / ||g||^2)``."""
    gnorm = _norm(grad)
    p = (_safe_inverse(gnorm) * _norm(y)).to(grad[0].dtype)
    k = _safe_inverse(gnorm**2)
    return _Scaled(grad, [p] * len(grad), [k] * len(grad), per_tensor=False)


def _safe_inverse(t: Tensor) -> Tensor:
    """``1 / t`` in float64, and 0 where ``t`` is 0 (a tensor without gradient takes no step)."""
    t = t.double()
    return torch.where(t > 0, 1.0 / t.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


# (y, grad_y) -> the step's map; a factory per round (``rms`` keeps the round's average)
Preconditioner = Callable[[list[Tensor], list[Tensor]], InnerMap]

INNER_STEPS: dict[str, Callable[[], Preconditioner]] = {
    SGD: lambda: _identity,
    RMS: TensorRMS,
    TRUST: lambda: _trust,
}


def make_inner_step(name: str) -> Preconditioner:
    """The preconditioner named by ``algorithm.inner_step`` (a fresh one: ``rms`` keeps state)."""
    if name not in INNER_STEPS:
        raise ValueError(f"algorithm.inner_step={name!r}: choose one of {sorted(INNER_STEPS)}")
    return INNER_STEPS[name]()


@dataclass
class StepStats:
    """What a local step reports (averaged over the round by the caller).

    The values stay 0-dim tensors on the device and become floats where they are read (``loss``,
    ``hvp_norm``, ``inner_step_ratio``): a step never waits for the GPU to report them, and a
    round syncs once, for its mean loss (``loss_tensor``).
    """

    loss_tensor: Tensor
    hvp_norm_tensor: Tensor | None = None
    passes: int = 0
    ratio_tensor: Tensor | None = None  # ||y' - y|| / ||y||: how far the lower level moved, relatively

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)

    @property
    def hvp_norm(self) -> float:
        return 0.0 if self.hvp_norm_tensor is None else float(self.hvp_norm_tensor)

    @property
    def inner_step_ratio(self) -> float:
        return 0.0 if self.ratio_tensor is None else float(self.ratio_tensor)


class BilevelSolver:
    """Runs PF2LoRA local steps on parameter dicts ``x`` (common) and ``y`` (private).

    Parameters
    ----------
    x, y:
        Upper- and lower-level parameters by name (the model's own ``nn.Parameter`` objects).
    hvp:
        An ``HvpMethod``; ignored in ``joint`` mode.
    inner_lr:
        ``alpha``, the lower level's step size (its meaning depends on ``inner_step``).
    outer_optimizer:
        Optimizer over ``x`` (AdamW with lr ``beta`` in PF2LoRA).
    inner_step:
        The lower level's preconditioner ``P`` by name (``INNER_STEPS``; module docstring).
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
        inner_step: str = SGD,
        hvp_every: int = 1,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if hvp_every < 1:
            raise ValueError(f"hvp_every must be >= 1 (1 = the exact rule), got {hvp_every}")
        self.precond = make_inner_step(inner_step)
        if not y:
            raise ValueError("the bilevel solver needs a non-empty private (lower) level")
        self.x, self.y = x, y
        self.hvp, self.alpha, self.opt = hvp, inner_lr, outer_optimizer
        self.mode, self.reuse = mode, reuse_inner_grad
        self._carried: list[Tensor] | None = None  # inner gradient carried by reuse_inner_grad
        self.hvp_every, self._steps = hvp_every, 0

    def step(self, loss: LossFn) -> StepStats:
        ev = Evaluator(loss, dict(self.x), list(self.y))
        y = [p.detach() for p in self.y.values()]
        if self.mode == JOINT:
            return self._joint(ev, y)
        fresh = self._steps % self.hvp_every == 0  # compute the HVP term at this step (module docstring)
        self._steps += 1
        if self.reuse:
            return self._step_reuse(ev, y, fresh)
        return self._step_exact_rule(ev, y, fresh)

    # ------------------------------------------ the rule of docs/DESIGN.md, "The update rule"
    def _step_exact_rule(self, ev: Evaluator, y: list[Tensor], fresh: bool = True) -> StepStats:
        # grad_y f(x,y) (+ grad_x f(x,y) only where the method needs it: the forward-difference base)
        inner = self.hvp.gradient_pass(ev, y, want_x=False) if fresh else ev.grads(y, want_x=False)
        phi = self.precond(y, inner.grad_y)
        y_new = _step(y, phi.direction(inner.grad_y), self.alpha)
        outer = ev.grads(y_new)  # grad_x f(x,y'), v = J_phi^T grad_y f(x,y')
        hv = self.hvp.hvp(ev, y, phi.transpose(outer.grad_y), inner) if fresh else None  # hvp_every: dropped
        ratio = _ratio(y, y_new)  # before the update: ``y`` shares the parameters' storage
        self._update(outer.grad_x, hv, y_new)
        return StepStats(inner.loss.detach(), _hvp_norm(hv), 3 if hv is not None else 2, ratio)

    def _step_reuse(self, ev: Evaluator, y: list[Tensor], fresh: bool = True) -> StepStats:
        passes = 0
        if self._carried is None:
            self._carried = ev.grads(y, want_x=False).grad_y
            passes += 1
        phi = self.precond(y, self._carried)
        y_new = _step(y, phi.direction(self._carried), self.alpha)
        outer: GradPass = self.hvp.gradient_pass(ev, y_new) if fresh else ev.grads(y_new)
        # HVP at y' (see module docstring); none between hvp_every's exact steps
        hv = self.hvp.hvp(ev, y_new, phi.transpose(outer.grad_y), outer) if fresh else None
        self._carried = outer.grad_y
        ratio = _ratio(y, y_new)
        self._update(outer.grad_x, hv, y_new)
        passes += 2 if hv is not None else 1
        return StepStats(outer.loss.detach(), _hvp_norm(hv), passes, ratio)

    def _joint(self, ev: Evaluator, y: list[Tensor]) -> StepStats:
        g = ev.grads(y)
        y_new = _step(y, self.precond(y, g.grad_y).direction(g.grad_y), self.alpha)
        ratio = _ratio(y, y_new)
        self._update(g.grad_x, None, y_new)
        return StepStats(g.loss.detach(), passes=1, ratio_tensor=ratio)

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


def _step(y: list[Tensor], direction: list[Tensor], lr: float) -> list[Tensor]:
    """``y - lr * direction`` for a list of tensors (one fused kernel)."""
    return torch._foreach_add(y, direction, alpha=-lr)


def _ratio(y: list[Tensor], y_new: list[Tensor]) -> Tensor:
    """``||y' - y|| / ||y||`` (0 for a zero ``y``), a 0-dim tensor: no host sync."""
    den = _norm(y)
    return torch.where(den > 0, _norm(torch._foreach_sub(y_new, y)) / den, torch.zeros_like(den))


def refit_lower_level(
    y: dict[str, nn.Parameter], losses: Iterable[LossFn], inner_lr: float, inner_step: str = SGD
) -> int:
    """Re-fit the private level to the common level now loaded: ``y <- y - alpha phi(grad_y f(x, y))``, x fixed.

    One lower-level step (the rule of ``BilevelSolver``, the same ``alpha`` and ``phi``) per loss of
    ``losses``, with no upper-level step: a first-order warm-started solve of ``y*(x) = argmin_y
    f(x, y)`` at the common adapter ``x`` the client has just received. Why it is needed: during a
    round ``y`` is fitted jointly with the client's *own* drifting ``x``; the server then replaces
    that ``x`` by the average, and the kept ``y`` compensates a common level that no longer
    exists (measured on Rotten Tomatoes: a client's personalized accuracy fell from 0.70-0.80 with
    its own ``x`` to 0.32 with the average, below its global model's 0.77). The bilevel problem
    defines client k's model as ``(x, y_k*(x))``: this is that definition applied at the ``x`` the
    client is evaluated (and next trains) with. Returns the number of gradient passes (one a step).
    """
    params = list(y.values())
    precond = make_inner_step(inner_step)
    passes = 0
    for loss in losses:
        with math_attention():
            raw = torch.autograd.grad(loss(None), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, params, strict=True)]
        with torch.no_grad():
            y_now = [p.detach() for p in params]
            torch._foreach_add_(params, precond(y_now, grads).direction(grads), alpha=-inner_lr)
        passes += 1
    return passes


def hypergradient(
    solver_hvp: HvpMethod,
    loss: LossFn,
    x: dict[str, Tensor],
    y: dict[str, Tensor],
    alpha: float,
    inner_step: str = SGD,
) -> list[Tensor]:
    """The hypergradient ``h`` of eq. (1) at ``(x, y)`` without updating anything (for tests)."""
    ev = Evaluator(loss, x, list(y))
    y0 = [t.detach() for t in y.values()]
    inner = solver_hvp.gradient_pass(ev, y0, want_x=False)
    phi = make_inner_step(inner_step)(y0, inner.grad_y)
    y_new = _step(y0, phi.direction(inner.grad_y), alpha)
    outer = ev.grads(y_new)
    hv = solver_hvp.hvp(ev, y0, phi.transpose(outer.grad_y), inner)
    if hv is None:
        return outer.grad_x
    return torch._foreach_add(outer.grad_x, hv, alpha=-alpha)


def _hvp_norm(hv: list[Tensor] | None) -> Tensor | None:
    return None if hv is None else _norm(hv).detach()


def autocast_context(device: torch.device, bf16: bool) -> AbstractContextManager[None]:
    """bf16 autocast when asked (CUDA, and CPU, which torch's autocast supports too), else float32.

    Inside ``precision.float32_pass`` (the finite-difference passes) autocast is off whatever
    ``bf16`` says; ``pf2lora_core.training.precision`` lists which pass runs in which precision.
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
