"""Oracle tests of one BilevelSolver step (docs/DESIGN.md, "The update rule") in float64.

The oracle flattens both levels into one vector, takes the explicit Hessian of the loss with
``torch.autograd.functional.hessian``, reads the mixed block ``H_xy`` off it, and applies the
step's three equations and AdamW's update rule (Loshchilov & Hutter) by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pf2lora_core.config.keys import COMMON, PRIVATE
from pf2lora_core.training.hypergrad import make_hvp
from pf2lora_core.training.solver import BilevelSolver
from tests.helpers.tiny import regression_problem

ALPHA = 0.5
LR, WEIGHT_DECAY, BETAS = 0.05, 0.1, (0.9, 0.999)
# AdamW's first step is about lr * sign(h) with the usual eps=1e-8, blind to h's size; a large eps
# keeps the update proportional to h, so the test sees an error in h's magnitude too.
ADAM_EPS = 0.1


class Flat:
    """Both levels as one float64 vector ``[x; y]`` and back."""

    def __init__(self, x: dict[str, Tensor], y: dict[str, Tensor]) -> None:
        self.names = list(x) + list(y)
        self.shapes = [t.shape for t in [*x.values(), *y.values()]]
        self.nx = sum(t.numel() for t in x.values())

    def vec(self, x: dict[str, Tensor], y: dict[str, Tensor]) -> Tensor:
        return torch.cat([t.detach().reshape(-1) for t in [*x.values(), *y.values()]])

    def params(self, z: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = shape.numel()
            out[name] = z[i : i + n].reshape(shape)
            i += n
        return out


def _oracle_step(loss, x: dict[str, Tensor], y: dict[str, Tensor], adam_t: int, m: Tensor, v2: Tensor):
    """(x_new, y_new, m, v2): one step with AdamW (docs/DESIGN.md, "The update rule"), from the explicit Hessian."""
    flat = Flat(x, y)
    z = flat.vec(x, y)
    nx = flat.nx

    def f(w: Tensor) -> Tensor:
        return loss(flat.params(w))

    grad0 = torch.autograd.functional.jacobian(f, z)
    y_new = z[nx:] - ALPHA * grad0[nx:]
    z_new = torch.cat([z[:nx], y_new])
    grad1 = torch.autograd.functional.jacobian(f, z_new)
    h_xy = torch.autograd.functional.hessian(f, z)[:nx, nx:]  # d^2 f / dx dy at (x, y)
    h = grad1[:nx] - ALPHA * h_xy @ grad1[nx:]
    x_new, m, v2 = _adamw(z[:nx], h, adam_t, m, v2)
    return x_new, y_new, m, v2


def _adamw(x: Tensor, g: Tensor, t: int, m: Tensor, v2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b1, b2 = BETAS
    m = b1 * m + (1 - b1) * g
    v2 = b2 * v2 + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v2 / (1 - b2**t)
    x = x * (1 - LR * WEIGHT_DECAY) - LR * m_hat / (v_hat.sqrt() + ADAM_EPS)
    return x, m, v2


def _solver(model, method: str, reuse: bool = False, **kw) -> BilevelSolver:
    x = model.parameters(COMMON)
    opt = torch.optim.AdamW(list(x.values()), lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    return BilevelSolver(x, model.parameters(PRIVATE), make_hvp(method, **kw), ALPHA, opt, reuse_inner_grad=reuse)


def _state(model) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """float64 copies of (x, y) (``export`` would cast to float32)."""
    return tuple({n: p.detach().clone() for n, p in model.parameters(level).items()} for level in (COMMON, PRIVATE))


def _as_vec(model, level: str) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters(level).values()])


@pytest.mark.parametrize(
    ("method", "kw", "tol"),
    [
        ("exact", {"exact_ad": "reverse"}, 1e-10),
        ("exact", {"exact_ad": "forward"}, 1e-10),
        ("finite_difference", {"eps": 1e-6, "scheme": "forward"}, 1e-5),
        ("finite_difference", {"eps": 1e-4, "scheme": "central"}, 1e-5),
    ],
)
def test_one_step_matches_explicit_oracle(method: str, kw: dict, tol: float) -> None:
    model, loss = regression_problem()
    x0, y0 = _state(model)
    zeros = torch.zeros(Flat(x0, y0).nx, dtype=torch.float64)
    x_new, y_new, _, _ = _oracle_step(loss, x0, y0, 1, zeros, zeros)
    stats = _solver(model, method, **kw).step(loss)
    assert stats.passes == 3
    assert torch.allclose(_as_vec(model, PRIVATE), y_new, rtol=0, atol=1e-12)  # y <- y'
    assert float((_as_vec(model, COMMON) - x_new).abs().max()) < tol * LR
    # and the step moved x by more than the tolerance: the check can fail
    assert float((x_new - Flat(x0, y0).vec(x0, y0)[: x_new.numel()]).abs().max()) > 1e3 * tol * LR


def test_first_order_drops_the_hvp_term() -> None:
    model, loss = regression_problem()
    x0, y0 = _state(model)
    flat = Flat(x0, y0)
    z = flat.vec(x0, y0)
    grad0 = torch.autograd.functional.jacobian(lambda w: loss(flat.params(w)), z)
    z1 = torch.cat([z[: flat.nx], z[flat.nx :] - ALPHA * grad0[flat.nx :]])
    h = torch.autograd.functional.jacobian(lambda w: loss(flat.params(w)), z1)[: flat.nx]
    x_new, _, _ = _adamw(z[: flat.nx], h, 1, torch.zeros_like(h), torch.zeros_like(h))
    stats = _solver(model, "first_order").step(loss)
    assert stats.passes == 2 and stats.hvp_norm == 0.0
    assert torch.allclose(_as_vec(model, COMMON), x_new, rtol=0, atol=1e-12)


def test_reuse_inner_grad_second_step_uses_the_carried_gradient() -> None:
    """Step 2's inner gradient is grad_y f(x_0, y_1) from step 1's outer pass, not grad_y f(x_1, y_1)."""
    model, loss = regression_problem()
    solver = _solver(model, "exact", reuse=True)
    x0, y0 = _state(model)
    flat = Flat(x0, y0)
    nx = flat.nx

    def grad(x: dict[str, Tensor], y: dict[str, Tensor]) -> Tensor:
        return torch.autograd.functional.jacobian(lambda w: loss(flat.params(w)), flat.vec(x, y))

    assert solver.step(loss).passes == 3  # the first step also starts the carry
    x1, y1 = _state(model)
    carried = grad(x0, y1)[nx:]  # the outer pass of step 1 ran at (x_0, y_1)
    fresh = grad(x1, y1)[nx:]
    assert float((carried - fresh).abs().max()) > 1e-6  # stale and fresh differ: the test can fail

    assert solver.step(loss).passes == 2
    y2_expected = flat.vec(x1, y1)[nx:] - ALPHA * carried
    assert torch.allclose(_as_vec(model, PRIVATE), y2_expected, rtol=0, atol=1e-12)

    # x: AdamW's second step with h at y_2 = y', the HVP taken at y' too (solver docstring)
    z2 = torch.cat([flat.vec(x1, y1)[:nx], y2_expected])
    y2 = {n: t for n, t in flat.params(z2).items() if n in y1}
    g2 = grad(x1, y2)
    h_xy = torch.autograd.functional.hessian(lambda w: loss(flat.params(w)), z2)[:nx, nx:]
    h2 = g2[:nx] - ALPHA * h_xy @ g2[nx:]
    h1 = _step1_h(loss, flat, x0, y0, y1)
    _, m, v2 = _adamw(flat.vec(x0, y0)[:nx], h1, 1, torch.zeros_like(h1), torch.zeros_like(h1))
    x2_expected, _, _ = _adamw(flat.vec(x1, y1)[:nx], h2, 2, m, v2)
    assert torch.allclose(_as_vec(model, COMMON), x2_expected, rtol=0, atol=1e-10)


def _step1_h(loss, flat: Flat, x0, y0, y1) -> Tensor:
    """Step 1 of reuse mode: carry from (x_0, y_0), then h at y_1 with the HVP at y_1."""
    z1 = flat.vec(x0, y1)
    g1 = torch.autograd.functional.jacobian(lambda w: loss(flat.params(w)), z1)
    h_xy = torch.autograd.functional.hessian(lambda w: loss(flat.params(w)), z1)[: flat.nx, flat.nx :]
    return g1[: flat.nx] - ALPHA * h_xy @ g1[flat.nx :]


def test_joint_mode_updates_both_levels_from_one_gradient() -> None:
    """The paper's ablation: y <- y - alpha grad_y f(x, y) and AdamW on grad_x f(x, y), same point."""
    model, loss = regression_problem()
    x0, y0 = _state(model)
    flat = Flat(x0, y0)
    z = flat.vec(x0, y0)
    g = torch.autograd.functional.jacobian(lambda w: loss(flat.params(w)), z)
    x_new, _, _ = _adamw(
        z[: flat.nx], g[: flat.nx], 1, torch.zeros(flat.nx, dtype=z.dtype), torch.zeros(flat.nx, dtype=z.dtype)
    )
    y_new = z[flat.nx :] - ALPHA * g[flat.nx :]
    x = model.parameters(COMMON)
    opt = torch.optim.AdamW(list(x.values()), lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    solver = BilevelSolver(x, model.parameters(PRIVATE), make_hvp("exact"), ALPHA, opt, mode="joint")
    assert solver.step(loss).passes == 1
    assert torch.allclose(_as_vec(model, PRIVATE), y_new, rtol=0, atol=1e-12)
    assert torch.allclose(_as_vec(model, COMMON), x_new, rtol=0, atol=1e-12)


def test_unknown_mode_is_rejected() -> None:
    model, _ = regression_problem()
    with pytest.raises(ValueError, match="mode"):
        _solver_mode(model, "alternating")


def _solver_mode(model, mode: str) -> BilevelSolver:
    x = model.parameters(COMMON)
    opt = torch.optim.AdamW(list(x.values()), lr=LR)
    return BilevelSolver(x, model.parameters(PRIVATE), make_hvp("exact"), ALPHA, opt, mode=mode)


@pytest.mark.parametrize("rule", ["rms", "trust"])
def test_preconditioned_steps_match_autograd_through_the_step(rule: str) -> None:
    """Two solver steps of a scale-free rule: y' and x' from autograd through the whole step.

    ``rms`` averages the squared gradient over the round's steps: step 2's scale holds step 1's
    mean square as a constant and its own as a function of x.
    """
    model, loss = regression_problem()
    names_x, names_y = list(model.parameters(COMMON)), list(model.parameters(PRIVATE))
    solver = _solver_rule(model, rule)
    sum_sq = None
    m, v2 = None, None
    for t in (1, 2):
        x0, y0 = _state(model)
        xs = {n: x0[n].clone().requires_grad_(True) for n in names_x}
        ys = {n: y0[n].clone().requires_grad_(True) for n in names_y}
        gy = torch.autograd.grad(loss({**xs, **ys}), list(ys.values()), create_graph=True)
        if rule == "rms":
            ms = [g.square().mean() for g in gy]
            prev = [torch.zeros((), dtype=torch.float64)] * len(ms) if sum_sq is None else sum_sq
            step = [g / ((p + s) / t).sqrt() for g, p, s in zip(gy, prev, ms, strict=True)]
            sum_sq = [(p + s).detach() for p, s in zip(prev, ms, strict=True)]
        else:
            ynorm = torch.sqrt(sum((v.detach() ** 2).sum() for v in ys.values()))
            step = [ynorm / torch.sqrt(sum((g**2).sum() for g in gy)) * g for g in gy]
        y_new = {n: ys[n] - ALPHA * d for n, d in zip(names_y, step, strict=True)}
        h = torch.autograd.grad(loss({**xs, **y_new}), list(xs.values()))
        hv = torch.cat([g.reshape(-1) for g in h])
        if m is None:
            m = v2 = torch.zeros_like(hv)
        x_new, m, v2 = _adamw(torch.cat([x0[n].reshape(-1) for n in names_x]), hv, t, m, v2)
        solver.step(loss)
        expected_y = torch.cat([t_.detach().reshape(-1) for t_ in y_new.values()])
        assert torch.allclose(_as_vec(model, PRIVATE), expected_y, rtol=0, atol=1e-12)
        assert float((_as_vec(model, COMMON) - x_new).abs().max()) < 1e-10 * LR


def _solver_rule(model, rule: str) -> BilevelSolver:
    x = model.parameters(COMMON)
    opt = torch.optim.AdamW(list(x.values()), lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    return BilevelSolver(x, model.parameters(PRIVATE), make_hvp("exact"), ALPHA, opt, inner_step=rule)


def test_inner_step_ratio_reports_the_relative_step() -> None:
    model, loss = regression_problem()
    y0 = _as_vec(model, PRIVATE).clone()
    stats = _solver_rule(model, "trust").step(loss)
    assert stats.inner_step_ratio == pytest.approx(ALPHA, rel=1e-9)  # ||y' - y|| = alpha ||y||
    assert float(torch.linalg.norm(_as_vec(model, PRIVATE) - y0) / torch.linalg.norm(y0)) == pytest.approx(ALPHA)


@pytest.mark.parametrize("rule", ["sgd", "rms", "trust"])
def test_refit_takes_lower_level_steps_at_fixed_x(rule: str) -> None:
    """``refit_lower_level``: J steps ``y <- y - alpha phi(grad_y f(x, y))`` by hand, x untouched (float64)."""
    from pf2lora_core.training.solver import refit_lower_level

    model, loss = regression_problem()
    x0, y = _state(model)
    names = list(y)
    sum_sq = [torch.zeros((), dtype=torch.float64) for _ in names]
    for t in (1, 2, 3):  # the oracle: the rule written out
        ys = {n: y[n].clone().requires_grad_(True) for n in names}
        g = torch.autograd.grad(loss({**x0, **ys}), list(ys.values()))
        if rule == "sgd":
            d = list(g)
        elif rule == "rms":  # the mean square averaged over the re-fit's steps so far
            sum_sq = [s + gi.square().mean() for s, gi in zip(sum_sq, g, strict=True)]
            d = [gi / (s / t).sqrt() for gi, s in zip(g, sum_sq, strict=True)]
        else:
            ynorm = torch.sqrt(sum((v**2).sum() for v in y.values()))
            d = [ynorm / torch.sqrt(sum((gi**2).sum() for gi in g)) * gi for gi in g]
        y = {n: y[n] - ALPHA * di for n, di in zip(names, d, strict=True)}
    passes = refit_lower_level(model.parameters(PRIVATE), [loss] * 3, ALPHA, rule)
    assert passes == 3
    expected = torch.cat([t.reshape(-1) for t in y.values()])
    assert torch.allclose(_as_vec(model, PRIVATE), expected, rtol=0, atol=1e-12)
    assert torch.equal(_as_vec(model, COMMON), torch.cat([t.reshape(-1) for t in x0.values()]))  # x fixed
    y_init = torch.cat([t.reshape(-1) for t in regression_problem()[0].parameters(PRIVATE).values()])
    assert float((expected - y_init.detach()).abs().max()) > 1e-3  # the re-fit moved y: the check can fail


def test_refit_lowers_the_lower_level_loss() -> None:
    """What the re-fit is for: after the common level moved, J lower-level steps reduce f(x, y) at that x."""
    from pf2lora_core.training.solver import refit_lower_level

    model, loss = regression_problem()
    with torch.no_grad():  # the server replaced x: move it away from where y was fitted
        for p in model.parameters(COMMON).values():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype))
    before = float(loss(None))
    refit_lower_level(model.parameters(PRIVATE), [loss] * 5, 0.05, "rms")
    assert float(loss(None)) < before


# ------------------------------------------------------------------ truncated hypergradient (hvp_every)
class _Capture(torch.optim.AdamW):
    """AdamW that records the ``h`` it is stepped with (the solver sets ``p.grad = h``)."""

    def __init__(self, params, **kw) -> None:
        super().__init__(params, **kw)
        self.seen: list[Tensor] = []

    def step(self, closure=None):  # type: ignore[override]
        self.seen.append(torch.cat([p.grad.detach().reshape(-1) for g in self.param_groups for p in g["params"]]))
        return super().step(closure)


def _truncated_run(
    m: int, steps: int, method: str = "exact", reuse: bool = False, alpha: float = ALPHA
) -> tuple[list[float], list[int], list[float]]:
    """Per step: the relative error of the ``h`` the solver used against the exact ``h`` at that
    step's ``(x, y)``, its passes, and the error the rejected variant (the last exact term reused,
    ``h_t = grad_x f(x_t, y'_t) - alpha c_{t0}``) would have had at the same point."""
    from pf2lora_core.training.solver import hypergradient

    model, loss = regression_problem()
    x, y = model.parameters(COMMON), model.parameters(PRIVATE)
    opt = _Capture(list(x.values()), lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    solver = BilevelSolver(x, y, make_hvp(method), alpha, opt, reuse_inner_grad=reuse, hvp_every=m)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    errors, passes, stale, term = [], [], [], None
    for t in range(steps):
        exact = flat(hypergradient(make_hvp("exact"), loss, x, y, alpha))
        first = flat(hypergradient(make_hvp("first_order"), loss, x, y, alpha))
        term = exact - first if t % m == 0 else term  # -alpha c_{t0}
        stale.append(float((first + term - exact).norm() / exact.norm()))
        passes.append(solver.step(loss).passes)
        errors.append(float((opt.seen[-1] - exact).norm() / exact.norm()))
    return errors, passes, stale


def test_truncated_hvp_is_exact_at_every_mth_step_and_first_order_between() -> None:
    errors, passes, _ = _truncated_run(m=3, steps=7)
    assert passes == [3, 2, 2, 3, 2, 2, 3]
    assert max(errors[t] for t in (0, 3, 6)) < 1e-10  # the exact rule at t = 0, m, 2m
    assert min(errors[t] for t in (1, 2, 4, 5)) > 1e-3  # no term in between: the test can fail
    exact_errors, exact_passes, _ = _truncated_run(m=1, steps=7)
    assert max(exact_errors) < 1e-10 and exact_passes == [3] * 7  # hvp_every=1 is the exact rule


def test_truncated_hvp_with_reuse_costs_one_pass_between() -> None:
    _, passes, _ = _truncated_run(m=5, steps=5, reuse=True)
    assert passes == [3, 1, 1, 1, 1]  # the carry's start + outer + HVP, then one pass a step


@pytest.mark.parametrize(
    ("alpha", "dropped_band", "stale_band"), [(0.5, (0.07, 0.3), (0.8, 1.1)), (0.1, (0.015, 0.08), (0.17, 0.23))]
)
def test_truncated_hvp_error_is_measured(alpha: float, dropped_band: tuple, stale_band: tuple) -> None:
    """The errors the solver's docstring quotes (float64 problem, m = 5, 5 steps): between exact
    steps h is first order, and reusing the last exact term instead would be further off."""
    errors, _, stale = _truncated_run(m=5, steps=5, alpha=alpha)
    assert errors[0] < 1e-10
    assert all(dropped_band[0] <= e <= dropped_band[1] for e in errors[1:]), errors
    assert all(stale_band[0] <= e <= stale_band[1] for e in stale[2:]), stale
    assert all(s > e for s, e in zip(stale[2:], errors[2:], strict=True))  # why the term is dropped, not reused


def test_hvp_every_must_be_positive() -> None:
    model, _ = regression_problem()
    x = model.parameters(COMMON)
    with pytest.raises(ValueError, match="hvp_every must be >= 1"):
        opt = torch.optim.AdamW(x.values())
        BilevelSolver(x, model.parameters(PRIVATE), make_hvp("exact"), ALPHA, opt, hvp_every=0)


@pytest.mark.parametrize(
    ("alpha", "reuse_band", "shipped_band"), [(0.5, (0.04, 0.34), (0.12, 0.38)), (0.1, (0.005, 0.06), (0.005, 0.09))]
)
def test_reuse_inner_grad_error_is_measured(alpha: float, reuse_band: tuple, shipped_band: tuple) -> None:
    """The errors README.md quotes for ``reuse_inner_grad`` alone and with ``hvp_every = K`` (the
    shipped pair) against the exact h at the same point (float64 problem, 5 steps)."""
    reuse, _, _ = _truncated_run(m=1, steps=5, reuse=True, alpha=alpha)
    shipped, _, _ = _truncated_run(m=5, steps=5, reuse=True, alpha=alpha)
    assert all(reuse_band[0] <= e <= reuse_band[1] for e in reuse), reuse
    assert all(shipped_band[0] <= e <= shipped_band[1] for e in shipped), shipped
