"""Oracle tests of the hypergradient (eq. 1) in float64 against autograd through the unroll."""

from __future__ import annotations

import pytest
import torch

from pf2lora_core.constants import COMMON, PRIVATE
from pf2lora_core.hypergrad import make_hvp
from pf2lora_core.solver import hypergradient
from tests.tiny import regression_problem

ALPHA = 0.5


def _oracle(model, loss):
    """h = d/dx f(x, y - alpha grad_y f(x, y)) by autograd through the explicit unroll."""
    x = {n: p.detach().clone().requires_grad_(True) for n, p in model.parameters(COMMON).items()}
    y = {n: p.detach().clone().requires_grad_(True) for n, p in model.parameters(PRIVATE).items()}
    inner = loss({**x, **y})
    gy = torch.autograd.grad(inner, list(y.values()), create_graph=True)
    y_new = {n: t - ALPHA * g for (n, t), g in zip(y.items(), gy, strict=True)}
    outer = loss({**x, **y_new})
    return torch.autograd.grad(outer, list(x.values()))


def _explicit_hvp_term(model, loss):
    """H_xy f(x, y) @ grad_y f(x, y'), by double autograd on fresh leaves."""
    x = {n: p.detach().clone().requires_grad_(True) for n, p in model.parameters(COMMON).items()}
    y = {n: p.detach().clone().requires_grad_(True) for n, p in model.parameters(PRIVATE).items()}
    gy = torch.autograd.grad(loss({**x, **y}), list(y.values()), create_graph=True)
    y_new = {n: (t - ALPHA * g).detach().requires_grad_(True) for (n, t), g in zip(y.items(), gy, strict=True)}
    v = torch.autograd.grad(loss({**x, **y_new}), list(y_new.values()))
    dot = sum((g * vi).sum() for g, vi in zip(gy, v, strict=True))
    return torch.autograd.grad(dot, list(x.values()))


def _rel_err(a, b) -> float:
    num = torch.sqrt(sum(((s - t) ** 2).sum() for s, t in zip(a, b, strict=True)))
    den = torch.sqrt(sum((t**2).sum() for t in b))
    return float(num / den)


def _ours(model, loss, method: str, **kw):
    return hypergradient(make_hvp(method, **kw), loss, model.parameters(COMMON), model.parameters(PRIVATE), ALPHA)


@pytest.mark.parametrize("exact_ad", ["reverse", "forward"])
@pytest.mark.parametrize("head_level", [COMMON, PRIVATE])
def test_exact_matches_unroll(exact_ad: str, head_level: str) -> None:
    model, loss = regression_problem(head_level)
    assert _rel_err(_ours(model, loss, "exact", exact_ad=exact_ad), _oracle(model, loss)) < 1e-8


@pytest.mark.parametrize(("scheme", "eps"), [("forward", 1e-6), ("central", 1e-4)])
def test_finite_difference_close(scheme: str, eps: float) -> None:
    model, loss = regression_problem()
    assert _rel_err(_ours(model, loss, "finite_difference", eps=eps, scheme=scheme), _oracle(model, loss)) < 1e-4


def test_central_more_accurate_than_forward_at_same_eps() -> None:
    model, loss = regression_problem()
    oracle = _oracle(model, loss)
    fwd = _rel_err(_ours(model, loss, "finite_difference", eps=1e-2, scheme="forward"), oracle)
    cen = _rel_err(_ours(model, loss, "finite_difference", eps=1e-2, scheme="central"), oracle)
    assert cen < fwd


def test_first_order_differs_by_exactly_the_hvp_term() -> None:
    model, loss = regression_problem()
    exact = _ours(model, loss, "exact")
    first = _ours(model, loss, "first_order")
    term = _explicit_hvp_term(model, loss)
    assert float(sum((t**2).sum() for t in term)) > 1e-6  # the term is not trivially zero
    diff = [f - e for f, e in zip(first, exact, strict=True)]
    assert _rel_err(diff, [ALPHA * t for t in term]) < 1e-8


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown hvp method"):
        make_hvp("newton")
