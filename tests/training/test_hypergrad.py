"""Oracle tests of the hypergradient (eq. 1) in float64 against autograd through the unroll."""

from __future__ import annotations

import pytest
import torch

from pf2lora_core.config.keys import COMMON, PRIVATE
from pf2lora_core.training.hypergrad import make_hvp
from pf2lora_core.training.solver import hypergradient
from tests.helpers.tiny import regression_problem

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


# ------------------------------------------------------------------ preconditioned lower levels
def _phi(rule: str, y: list[torch.Tensor], g: list[torch.Tensor]) -> list[torch.Tensor]:
    """The step direction of solver.INNER_STEPS (first step of a round), differentiable in g."""
    if rule == "rms":  # one step so far: phi_t = g_t / rms(g_t)
        return [t / t.square().mean().sqrt() for t in g]
    norm = lambda ts: torch.sqrt(sum((t**2).sum() for t in ts))  # noqa: E731
    scale = norm([t.detach() for t in y]) / norm(g)  # trust: ||y|| / ||g||, ||y|| independent of x
    return [scale * t for t in g]


def _oracle_rule(model, loss, rule: str, alpha: float):
    """d/dx f(x, y - alpha phi(grad_y f(x, y))) by autograd through the whole step, phi included."""
    x = {n: p.detach().clone().requires_grad_(True) for n, p in model.parameters(COMMON).items()}
    y = {n: p.detach().clone().requires_grad_(True) for n, p in model.parameters(PRIVATE).items()}
    gy = torch.autograd.grad(loss({**x, **y}), list(y.values()), create_graph=True)
    step = _phi(rule, list(y.values()), list(gy))
    y_new = {n: t - alpha * d for (n, t), d in zip(y.items(), step, strict=True)}
    return torch.autograd.grad(loss({**x, **y_new}), list(x.values()))


@pytest.mark.parametrize("rule", ["rms", "trust"])
@pytest.mark.parametrize("alpha", [0.5, 0.01])
@pytest.mark.parametrize(("method", "kw", "tol"), [("exact", {}, 1e-10), ("finite_difference", {"eps": 1e-6}, 1e-5)])
def test_preconditioned_rule_is_the_exact_derivative_of_its_step(
    rule: str, alpha: float, method: str, kw: dict, tol: float
) -> None:
    """The step's scale depends on x through g: its Jacobian is in h (not a frozen P)."""
    model, loss = regression_problem()
    x, y = model.parameters(COMMON), model.parameters(PRIVATE)
    ours = hypergradient(make_hvp(method, **kw), loss, x, y, alpha, inner_step=rule)
    truth = _oracle_rule(model, loss, rule, alpha)
    assert _rel_err(ours, truth) < tol
    # freezing the scale (P constant) would be wrong by far more than tol: the test can fail
    p_frozen = _frozen_p_hypergradient(model, loss, rule, alpha)
    assert _rel_err(p_frozen, truth) > 1e-2


def _frozen_p_hypergradient(model, loss, rule: str, alpha: float):
    x = {n: p.detach().clone().requires_grad_(True) for n, p in model.parameters(COMMON).items()}
    y = {n: p.detach().clone().requires_grad_(True) for n, p in model.parameters(PRIVATE).items()}
    gy = torch.autograd.grad(loss({**x, **y}), list(y.values()), create_graph=True)
    scale = [(d / g).detach() for d, g in zip(_phi(rule, list(y.values()), [g.detach() for g in gy]), gy, strict=True)]
    y_new = {n: t - alpha * s * g for (n, t), s, g in zip(y.items(), scale, gy, strict=True)}
    return torch.autograd.grad(loss({**x, **y_new}), list(x.values()))


def test_rms_moves_every_tensor_by_alpha_per_entry_and_trust_by_alpha_relative() -> None:
    from pf2lora_core.training.solver import make_inner_step

    gen = torch.Generator().manual_seed(0)
    y = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    g = [
        1e-4 * torch.randn(3, 4, generator=gen, dtype=torch.float64),
        1e2 * torch.randn(5, generator=gen, dtype=torch.float64),
    ]
    rms = make_inner_step("rms")(y, g).direction(g)
    assert [float(d.square().mean().sqrt()) for d in rms] == pytest.approx([1.0, 1.0], rel=1e-12)
    trust = make_inner_step("trust")(y, g).direction(g)
    norm = lambda ts: float(torch.sqrt(sum((t**2).sum() for t in ts)))  # noqa: E731
    assert norm(trust) == pytest.approx(norm(y), rel=1e-12)
    zero = [torch.zeros(3, 4, dtype=torch.float64), g[1]]  # a tensor without gradient takes no step
    assert float(make_inner_step("rms")(y, zero).direction(zero)[0].abs().max()) == 0.0


def test_unknown_inner_step_is_a_clear_error() -> None:
    from pf2lora_core.training.solver import make_inner_step

    with pytest.raises(ValueError, match="inner_step"):
        make_inner_step("adam")
