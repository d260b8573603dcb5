"""Hessian-vector products for PF2LoRA's hypergradient, one small class per method.

With ``x`` the common (upper-level) adapter and ``y`` the private (lower-level) one, the one-step
unroll ``y' = y - alpha * grad_y f(x, y)`` has the exact derivative (DESIGN.md, step 2)::

    h = grad_x f(x, y') - alpha * H_xy f(x, y) @ grad_y f(x, y')        (1)

Every method here supplies the mixed product ``H_xy f(x, y) v`` (the term in (1)) behind one
interface: ``gradient_pass`` evaluates ``f`` and its gradients at a point ``y`` (keeping whatever
the method needs later), and ``hvp`` returns ``H_xy f(x, y) v`` for that same point, or ``None``
when the method drops the term. Methods are chosen by name from ``HVP_METHODS``.

- ``exact`` / reverse-over-reverse: the gradient pass builds a differentiable ``grad_y``
  (``create_graph=True``); the HVP is one more backward, ``grad_x <grad_y f, v>``.
- ``exact`` / forward-over-reverse: ``torch.func.jvp`` of ``y -> grad_x f(x, y)`` along ``v``.
  Falls back to reverse-over-reverse where the model does not support forward-mode AD.
- ``finite_difference``: ``(grad_x f(x, y + d v) - grad_x f(x, y)) / d`` with
  ``d = eps / ||v||`` (forward; the base gradient comes free from the gradient pass) or
  ``(grad_x f(x, y + d v) - grad_x f(x, y - d v)) / (2 d)`` (central, O(d^2) error).
- ``first_order``: the term is dropped (the paper's first-order ablation).

Second-order passes run under the math SDPA backend: flash / memory-efficient attention kernels
implement neither double backward nor forward-mode AD.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

# ``loss(params)``: the loss of the current batch, with the given tensors substituted for the
# model's parameters of the same names (``None``: the model's own parameters).
LossFn = Callable[[dict[str, Tensor] | None], Tensor]


def math_attention() -> AbstractContextManager[None]:
    """Context selecting the math SDPA backend (differentiable twice, forward-AD capable)."""
    return sdpa_kernel([SDPBackend.MATH])


@dataclass
class GradPass:
    """Result of one gradient evaluation at a lower-level point ``y``."""

    loss: Tensor
    grad_x: list[Tensor]
    grad_y: list[Tensor]
    # differentiable grad_y, kept only by reverse-over-reverse for its HVP
    grad_y_graph: list[Tensor] | None = None


class Evaluator:
    """Evaluates the loss and its gradients at ``(x, y)`` for a fixed batch.

    ``x`` are the model's own upper-level parameters (updated in place by AdamW); the lower-level
    point ``y`` is passed explicitly and substituted through ``functional_call``, so a pass at
    ``y'`` or ``y + d v`` never touches (or invalidates) the tensors a held graph refers to.
    """

    def __init__(self, loss: LossFn, x: dict[str, Tensor], y_names: Sequence[str]) -> None:
        self.loss_fn = loss
        self.x = x
        self.y_names = list(y_names)

    def as_dict(self, y: Sequence[Tensor]) -> dict[str, Tensor]:
        return dict(zip(self.y_names, y, strict=True))

    def grads(self, y: Sequence[Tensor], *, want_y: bool = True, create_graph: bool = False) -> GradPass:
        leaves = [t if t.requires_grad else t.detach().requires_grad_(True) for t in y]
        ctx = math_attention() if create_graph else nullcontext()
        with ctx:
            loss = self.loss_fn(self.as_dict(leaves))
            inputs = list(self.x.values()) + (leaves if want_y else [])
            grads = torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]
        nx = len(self.x)
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
    return torch.sqrt(sum((t.double() ** 2).sum() for t in v))


class HvpMethod:
    """Interface of an HVP method; see the module docstring."""

    #: whether the gradient pass must keep a differentiable grad_y
    needs_graph: bool = False

    def gradient_pass(self, ev: Evaluator, y: Sequence[Tensor]) -> GradPass:
        return ev.grads(y, create_graph=self.needs_graph)

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

    def hvp(self, ev: Evaluator, y: Sequence[Tensor], v: Sequence[Tensor], at: GradPass) -> list[Tensor]:
        norm = float(_norm(v))
        if norm == 0.0:
            return [torch.zeros_like(g) for g in at.grad_x]
        d = self.eps / norm
        plus = ev.grad_x([t.detach() + d * vi for t, vi in zip(y, v, strict=True)])
        if self.scheme == "forward":
            return [(gp - g0) / d for gp, g0 in zip(plus, at.grad_x, strict=True)]
        minus = ev.grad_x([t.detach() - d * vi for t, vi in zip(y, v, strict=True)])
        return [(gp - gm) / (2 * d) for gp, gm in zip(plus, minus, strict=True)]


class ExactReverse(HvpMethod):
    """Reverse-over-reverse: ``H_xy v = grad_x <grad_y f(x, y), v>`` on the kept graph."""

    needs_graph = True

    def hvp(self, ev: Evaluator, y: Sequence[Tensor], v: Sequence[Tensor], at: GradPass) -> list[Tensor]:
        if at.grad_y_graph is None:  # pass built without a graph (e.g. forward-mode fallback)
            at = ev.grads(y, create_graph=True)
        assert at.grad_y_graph is not None
        with math_attention():
            out = torch.autograd.grad(
                at.grad_y_graph, list(ev.x.values()), grad_outputs=list(v), allow_unused=True
            )
        at.grad_y_graph = None  # the graph is consumed; drop the reference so memory is freed
        return [torch.zeros_like(p) if g is None else g for g, p in zip(out, ev.x.values(), strict=True)]


class ExactForward(HvpMethod):
    """Forward-over-reverse: ``torch.func.jvp`` of ``y -> grad_x f(x, y)`` along ``v``."""

    def __init__(self) -> None:
        self._fallback: ExactReverse | None = None

    def hvp(self, ev: Evaluator, y: Sequence[Tensor], v: Sequence[Tensor], at: GradPass) -> list[Tensor]:
        if self._fallback is not None:
            return self._fallback.hvp(ev, y, v, at)
        x0 = {n: p.detach() for n, p in ev.x.items()}

        def grad_x_at(y_dict: dict[str, Tensor]) -> dict[str, Tensor]:
            return torch.func.grad(lambda xd: ev.loss_fn({**xd, **y_dict}))(x0)

        try:
            with math_attention():
                _, tangent = torch.func.jvp(grad_x_at, (ev.as_dict([t.detach() for t in y]),), (ev.as_dict(v),))
        except (NotImplementedError, RuntimeError) as err:
            log.warning("forward-over-reverse HVP unsupported by this model (%s); using reverse-over-reverse", err)
            self._fallback = ExactReverse()
            return self._fallback.hvp(ev, y, v, at)
        return [tangent[n] for n in ev.x]


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
