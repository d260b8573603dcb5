"""Hessian-vector products for PF2LoRA's hypergradient, one small class per method.

With ``x`` the common (upper-level) adapter and ``y`` the private (lower-level) one, the one-step
unroll ``y' = y - alpha * grad_y f(x, y)`` has the exact derivative (docs/DESIGN.md, "Hypergradient")::

    h = grad_x f(x, y') - alpha * H_xy f(x, y) @ grad_y f(x, y')        (1)

With a scale-free lower level ``y' = y - alpha phi(grad_y f(x, y))`` (``solver.INNER_STEPS``) the
same derivative reads ``h = grad_x f(x, y') - alpha * H_xy f(x, y) @ J_phi^T grad_y f(x, y')``:
only the vector ``v`` of the product changes (the solver builds it), not the methods here.

Every method here supplies the mixed product ``H_xy f(x, y) v`` (the term in (1)) behind one
interface: ``gradient_pass`` evaluates ``f`` and its gradients at a point ``y`` (keeping whatever
the method needs later), and ``hvp`` returns ``H_xy f(x, y) v`` for that same point, or ``None``
when the method drops the term. Methods are chosen by name from ``HVP_METHODS``.

- ``exact`` / reverse-over-reverse: the gradient pass builds a differentiable ``grad_y``
  (``create_graph=True``); the HVP is one more backward, ``grad_x <grad_y f, v>``.
- ``exact`` / forward-over-reverse: the directional derivative of ``y -> grad_x f(x, y)`` along
  ``v``, i.e. ``torch.func.jvp(grad(f))``, computed with ``torch.autograd.forward_ad`` dual
  tensors (``y + eps v``) carried through one ordinary reverse pass: same numbers, without
  functorch's per-op wrapper overhead. Falls back to reverse-over-reverse where the model does
  not support forward-mode AD.
- ``finite_difference``: ``(grad_x f(x, y + d v) - grad_x f(x, y)) / d`` with
  ``d = eps / ||v||`` (forward; the base gradient comes free from the gradient pass) or
  ``(grad_x f(x, y + d v) - grad_x f(x, y - d v)) / (2 d)`` (central, O(d^2) error).
- ``first_order``: the term is dropped (the paper's first-order ablation).

Attention: *every* pass of a step (inner, outer, HVP probes and products, for every method)
runs under one SDPA backend, the math kernel (``math_attention``): flash / memory-efficient
kernels implement neither double backward nor forward-mode AD, and passes of one step must not
switch kernels, since each kernel has its own numerics and its own way of drawing attention
dropout from the RNG. Models whose attention goes through transformers' attention interface run
attention with live dropout in ``dropout_tape.taped_attention`` instead (eager, masks on the dropout tape),
so their attention-dropout masks are equal across the passes by construction.

Precision: under bf16 autocast the two ends of every finite difference run in float32
(``precision.float32_pass``); see ``pf2lora_core.training.precision`` for which pass runs in which precision.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from pf2lora_core.training.precision import float32_pass

log = logging.getLogger(__name__)

# ``loss(params)``: the loss of the current batch, with the given tensors substituted for the
# model's parameters of the same names (``None``: the model's own parameters).
LossFn = Callable[[dict[str, Tensor] | None], Tensor]


def math_attention() -> AbstractContextManager[None]:
    """Context selecting the math SDPA backend (differentiable twice, forward-AD capable).

    Every pass of a bilevel step runs under it (``Evaluator.grads``, the HVP methods), so that
    all passes of one step share one attention kernel.
    """
    return sdpa_kernel([SDPBackend.MATH])


@dataclass
class GradPass:
    """Result of one gradient evaluation at a lower-level point ``y``."""

    loss: Tensor
    grad_x: list[Tensor]  # empty when the pass was asked for ``grad_y`` only
    grad_y: list[Tensor]  # empty when the pass was asked for ``grad_x`` only
    # differentiable grad_y, kept only by reverse-over-reverse for its HVP
    grad_y_graph: list[Tensor] | None = None


class Evaluator:
    """Evaluates the loss and its gradients at ``(x, y)`` for a fixed batch.

    ``x`` are the model's own upper-level parameters (updated in place by AdamW); the lower-level
    point ``y`` is passed explicitly and substituted through ``functional_call``, so a pass at
    ``y'`` or ``y + d v`` never touches (or invalidates) the tensors a held graph refers to.
    Gradients are computed only for what the caller asks for: a pass that needs ``grad_x`` alone
    (a finite-difference probe) leaves ``y`` out of the graph, and one that needs ``grad_y`` alone
    skips the upper level's weight gradients (with ``create_graph`` also their second-order graph).
    """

    def __init__(self, loss: LossFn, x: dict[str, Tensor], y_names: Sequence[str]) -> None:
        self.loss_fn = loss
        self.x = x
        self.y_names = list(y_names)

    def as_dict(self, y: Sequence[Tensor]) -> dict[str, Tensor]:
        return dict(zip(self.y_names, y, strict=True))

    def grads(
        self, y: Sequence[Tensor], *, want_x: bool = True, want_y: bool = True, create_graph: bool = False
    ) -> GradPass:
        if not (want_x or want_y):
            raise ValueError("a gradient pass must want grad_x, grad_y or both")
        if want_y:
            leaves = [t if t.requires_grad else t.detach().requires_grad_(True) for t in y]
        else:
            leaves = [t.detach() for t in y]
        xs = list(self.x.values()) if want_x else []
        inputs = xs + (leaves if want_y else [])
        with math_attention():  # one kernel for every pass of a step (module docstring)
            loss = self.loss_fn(self.as_dict(leaves))
            grads = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]
        nx = len(xs)
        gy_graph = list(grads[nx:]) if create_graph else None
        return GradPass(
            loss=loss.detach(),
            grad_x=[g.detach() for g in grads[:nx]],
            grad_y=[g.detach() for g in grads[nx:]],
            grad_y_graph=gy_graph,
        )

    def grad_x(self, y: Sequence[Tensor]) -> list[Tensor]:
        return self.grads(y, want_y=False).grad_x


def _norm(v: Sequence[Tensor]) -> Tensor:
    """Euclidean norm of a list of tensors (float64 result; one fused kernel per list)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(v))).double())


class HvpMethod:
    """Interface of an HVP method; see the module docstring."""

    #: whether the gradient pass must keep a differentiable grad_y
    needs_graph: bool = False
    #: whether ``hvp`` reads the gradient pass's own ``grad_x`` (the forward-difference base)
    needs_base_grad_x: bool = False

    def gradient_pass(self, ev: Evaluator, y: Sequence[Tensor], *, want_x: bool = True) -> GradPass:
        """``f`` and its gradients at ``y``; ``want_x=False``: the caller needs no ``grad_x``.

        ``grad_x`` is still computed when this method's ``hvp`` needs it (``needs_base_grad_x``).
        """
        return ev.grads(y, want_x=want_x or self.needs_base_grad_x, create_graph=self.needs_graph)

    def hvp(self, ev: Evaluator, y: Sequence[Tensor], v: Sequence[Tensor], at: GradPass) -> list[Tensor] | None:
        raise NotImplementedError


class FirstOrder(HvpMethod):
    """Drops the second-order term of (1): ``h = grad_x f(x, y')``."""

    def hvp(self, ev: Evaluator, y: Sequence[Tensor], v: Sequence[Tensor], at: GradPass) -> None:
        return None


class FiniteDifference(HvpMethod):
    """Difference of ``grad_x`` along ``v`` with step ``d = eps / ||v||``."""

    def __init__(self, eps: float = 1e-3, scheme: str = "forward") -> None:
        if scheme not in ("forward", "central"):
            raise ValueError(f"finite-difference scheme must be 'forward' or 'central', got {scheme!r}")
        if not eps > 0:
            raise ValueError(f"finite-difference eps must be > 0, got {eps}")
        self.eps = eps
        self.scheme = scheme
        self.needs_base_grad_x = scheme == "forward"

    def gradient_pass(self, ev: Evaluator, y: Sequence[Tensor], *, want_x: bool = True) -> GradPass:
        if not self.needs_base_grad_x:
            return super().gradient_pass(ev, y, want_x=want_x)
        with float32_pass():  # its grad_x is one end of the forward difference
            return super().gradient_pass(ev, y, want_x=want_x)

    def hvp(self, ev: Evaluator, y: Sequence[Tensor], v: Sequence[Tensor], at: GradPass) -> list[Tensor]:
        with float32_pass():  # both ends of the difference in float32, even under bf16 autocast
            return self._difference(ev, y, v, at)

    def _difference(self, ev: Evaluator, y: Sequence[Tensor], v: Sequence[Tensor], at: GradPass) -> list[Tensor]:
        norm = float(_norm(v))
        if norm == 0.0:
            return [torch.zeros_like(p) for p in ev.x.values()]
        d = self.eps / norm
        y0, v = [t.detach() for t in y], list(v)
        plus = ev.grad_x(torch._foreach_add(y0, v, alpha=d))  # y + d v
        if self.scheme == "forward":
            base = at.grad_x if at.grad_x else ev.grad_x(y0)  # a pass asked without grad_x
            diff = torch._foreach_sub(plus, base)
            torch._foreach_div_(diff, d)
            return diff
        minus = ev.grad_x(torch._foreach_add(y0, v, alpha=-d))  # y - d v
        diff = torch._foreach_sub(plus, minus)
        torch._foreach_div_(diff, 2 * d)
        return diff


class ExactReverse(HvpMethod):
    """Reverse-over-reverse: ``H_xy v = grad_x <grad_y f(x, y), v>`` on the kept graph."""

    needs_graph = True

    def hvp(self, ev: Evaluator, y: Sequence[Tensor], v: Sequence[Tensor], at: GradPass) -> list[Tensor]:
        if at.grad_y_graph is None:  # pass built without a graph (e.g. forward-mode fallback)
            at = ev.grads(y, create_graph=True)
        assert at.grad_y_graph is not None
        with math_attention():
            out = torch.autograd.grad(at.grad_y_graph, list(ev.x.values()), grad_outputs=list(v), allow_unused=True)
        at.grad_y_graph = None  # the graph is consumed; drop the reference so memory is freed
        return [torch.zeros_like(p) if g is None else g for g, p in zip(out, ev.x.values(), strict=True)]


class ExactForward(HvpMethod):
    """Forward-over-reverse: the tangent of ``y -> grad_x f(x, y)`` along ``v`` (``jvp(grad f)``).

    ``y`` enters as dual tensors ``(y, v)`` and one reverse pass takes ``grad_x``; every op of
    that pass (backward formulas included) propagates the tangent, so the tangent of ``grad_x``
    is ``H_xy f(x, y) v``. ``y`` carries no reverse-mode gradient here: the pass differentiates
    for ``x`` only.
    """

    def __init__(self) -> None:
        self._fallback: ExactReverse | None = None

    def hvp(self, ev: Evaluator, y: Sequence[Tensor], v: Sequence[Tensor], at: GradPass) -> list[Tensor]:
        if self._fallback is not None:
            return self._fallback.hvp(ev, y, v, at)
        x = list(ev.x.values())
        try:
            with math_attention(), fwad.dual_level():
                duals = [fwad.make_dual(t.detach(), vi) for t, vi in zip(y, v, strict=True)]
                grads = torch.autograd.grad(ev.loss_fn(ev.as_dict(duals)), x, allow_unused=True)
                tangents = [None if g is None else fwad.unpack_dual(g).tangent for g in grads]
        except (NotImplementedError, RuntimeError) as err:
            log.warning("forward-over-reverse HVP unsupported by this model (%s); using reverse-over-reverse", err)
            self._fallback = ExactReverse()
            return self._fallback.hvp(ev, y, v, at)
        return [torch.zeros_like(p) if t is None else t for t, p in zip(tangents, x, strict=True)]


def make_hvp(method: str, *, eps: float = 1e-3, scheme: str = "forward", exact_ad: str = "reverse") -> HvpMethod:
    """Build the HVP method named by config (``algorithm.hvp`` and its options)."""
    if method not in HVP_METHODS:
        raise ValueError(f"unknown hvp method {method!r}; choose one of {sorted(HVP_METHODS)}")
    return HVP_METHODS[method](eps=eps, scheme=scheme, exact_ad=exact_ad)


def _exact(exact_ad: str, **_: object) -> HvpMethod:
    if exact_ad not in EXACT_AD:
        raise ValueError(f"exact_ad must be one of {sorted(EXACT_AD)}, got {exact_ad!r}")
    return EXACT_AD[exact_ad]()


EXACT_AD: dict[str, Callable[[], HvpMethod]] = {"reverse": ExactReverse, "forward": ExactForward}

HVP_METHODS: dict[str, Callable[..., HvpMethod]] = {
    "exact": lambda eps, scheme, exact_ad: _exact(exact_ad),
    "finite_difference": lambda eps, scheme, exact_ad: FiniteDifference(eps, scheme),
    "first_order": lambda eps, scheme, exact_ad: FirstOrder(),
}
