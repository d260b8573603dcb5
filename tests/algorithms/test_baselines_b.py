"""FedDPA and Per-FedAvg: their local updates against hand-written oracles, and one Flower round each.

The oracles work on the tiny float64 MLP of ``tests/helpers/tiny.py`` with the trained level flattened into
one vector: gradients by ``torch.autograd.functional.jacobian``, the Hessian explicitly by
``torch.autograd.functional.hessian``, and the papers' update rules written out by hand.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.func import functional_call

from pf2lora_core.algorithms import LocalContext, algorithm_class
from pf2lora_core.algorithms.feddpa import FedDPA, FedDPAParams, instance_weight
from pf2lora_core.algorithms.perfedavg import (
    FIRST_ORDER,
    HESSIAN_FREE,
    PerFedAvg,
    PerFedAvgParams,
    gradient,
    hvp_central,
)
from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import AUDIT_DIR, COMMON, METRICS_FILE, PRIVATE, SUMMARY_FILE
from pf2lora_core.config.schema import ConfigError
from pf2lora_core.federation.client_runtime import ClientRuntime
from pf2lora_core.training.adapters import TwoLevelModel
from tests.helpers.flower_run import tiny_inprocess_run
from tests.helpers.tiny import randomize_adapters, two_level_mlp
from tests.helpers.tiny_bert import make_tiny_bert

INNER, OUTER = 0.3, 0.2  # a and b of the Per-FedAvg oracles


def _batches(n: int = 6, seed: int = 5) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return [
        (torch.randn(8, 6, generator=gen, dtype=f64), torch.randn(8, 3, generator=gen, dtype=f64)) for _ in range(n)
    ]


def _objective(model: TwoLevelModel):
    def objective(batch: tuple[Tensor, Tensor], params: dict[str, Tensor] | None) -> Tensor:
        x, y = batch
        out = model.model(x) if params is None else functional_call(model.model, params, (x,), strict=False)
        return ((out - y) ** 2).mean()

    return objective


def _context(model: TwoLevelModel, data: list, steps: int) -> LocalContext:
    return LocalContext(model, _objective(model), itertools.cycle(data), steps, seed=0, device=torch.device("cpu"))


def _changed(before: dict[str, Tensor], after: dict[str, Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------- FedDPA
def _feddpa(steps_per_phase: str = "full", one_batch_per_step: bool = True) -> FedDPA:
    return FedDPA(FedDPAParams(name="feddpa", rank=4, lora_alpha=8, lr=0.05, weight_decay=0.0, private_rank=2,
                               private_alpha=4, private_lr=0.05, steps_per_phase=steps_per_phase,
                               one_batch_per_step=one_batch_per_step, instance_mixing=False, mixing_samples=5,
                               mixing_scale=0.5, mixing_pool=16))  # fmt: skip


def _dpa_model(seed: int = 1) -> TwoLevelModel:
    model = two_level_mlp()
    randomize_adapters(model, seed=seed)
    return model


def test_feddpa_phases_train_disjoint_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    model, algo = _dpa_model(), _feddpa()
    start = {lvl: model.export(lvl) for lvl in (COMMON, PRIVATE)}
    phases: list[dict] = []
    inner = FedDPA.adamw_steps

    def spy(self: FedDPA, ctx: LocalContext, params: dict, penalty=None) -> dict[str, float]:
        active = list(model.model.base_model.active_adapters)
        out = inner(self, ctx, params, penalty)
        phases.append({"active": active, "names": set(params), **{lvl: model.export(lvl) for lvl in (COMMON, PRIVATE)}})
        return out

    monkeypatch.setattr(FedDPA, "adamw_steps", spy)
    metrics = algo.train(_context(model, _batches(), steps=3))
    glob, local = phases
    # phase 1: the global adapter alone (local inactive); it changes, the local one does not
    assert glob["active"] == [COMMON] and glob["names"] == set(model.parameters(COMMON))
    assert _changed(start[COMMON], glob[COMMON]) and not _changed(start[PRIVATE], glob[PRIVATE])
    # phase 2: both adapters active, only the local one changes
    assert local["active"] == [COMMON, PRIVATE] and local["names"] == set(model.parameters(PRIVATE))
    assert _changed(glob[PRIVATE], local[PRIVATE]) and not _changed(glob[COMMON], local[COMMON])
    assert not glob["names"] & local["names"]
    assert metrics["gradient_passes"] == 6.0 and metrics["train_loss"] > 0


def test_feddpa_global_phase_ignores_the_local_adapter() -> None:
    """Two clients with equal global but different local adapters send the same global adapter."""
    a, b = _dpa_model(seed=1), _dpa_model(seed=1)
    b.load(PRIVATE, {k: torch.randn_like(v) for k, v in b.export(PRIVATE).items()})
    _feddpa().train(_context(a, _batches(), steps=2))
    _feddpa().train(_context(b, _batches(), steps=2))
    ua, ub = _feddpa().uplink(a), _feddpa().uplink(b)
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    assert _changed(a.export(PRIVATE), b.export(PRIVATE))


def test_feddpa_uplink_holds_no_private_tensor() -> None:
    model, algo = _dpa_model(), _feddpa()
    algo.train(_context(model, _batches(), steps=1))
    sent = algo.uplink(model)
    assert set(sent) == set(model.parameters(COMMON))
    assert not set(sent) & set(model.parameters(PRIVATE))
    assert not any(f".{PRIVATE}." in key for key in sent)


@pytest.mark.parametrize(("split", "k", "per_phase"), [("full", 3, 3), ("half", 4, 2), ("half", 1, 1)])
@pytest.mark.parametrize("one_batch_per_step", [True, False])
def test_feddpa_step_budget(split: str, k: int, per_phase: int, one_batch_per_step: bool) -> None:
    data = _batches()
    ctx = _context(_dpa_model(), data, steps=k)
    metrics = _feddpa(split, one_batch_per_step).train(ctx)
    assert metrics["gradient_passes"] == 2 * per_phase
    # shared: both phases step through the same per_phase batches; else one fresh batch per step of each phase
    drawn = per_phase if one_batch_per_step else 2 * per_phase
    assert next(ctx.batches) is data[drawn % len(data)]


def test_row_weights_scale_each_adapter_per_row() -> None:
    """Oracle: row i of a row-weighted forward equals the model with B scaled by wc[i], D by wp[i]."""
    model = _dpa_model()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    wc = torch.tensor([1.0, 0.0, 2.0, 0.5, -1.0], dtype=torch.float64)
    wp = torch.tensor([1.0, 1.5, 0.0, 0.25, 3.0], dtype=torch.float64)
    with torch.no_grad(), model.row_weights({COMMON: wc, PRIVATE: wp}):
        mixed = model.model(x)
    for i in range(5):
        scaled = {
            n: p * (wc[i] if ".lora_B.common." in n else wp[i] if ".lora_B.private." in n else 1.0)
            for n, p in model.model.named_parameters()
        }
        with torch.no_grad():
            row = functional_call(model.model, scaled, (x[i : i + 1],), strict=False)
        assert torch.allclose(mixed[i], row[0], rtol=0, atol=1e-12)
    with torch.no_grad():  # the weights are gone after the context
        assert torch.equal(model.model(x), functional_call(model.model, dict(model.model.named_parameters()), (x,)))
    with pytest.raises(ValueError, match="rows"), model.row_weights({COMMON: wc[:3]}):
        model.model(x)
    with pytest.raises(ValueError, match="unknown adapter"), model.row_weights({"other": wc}):
        pass


def test_instance_weight_is_scaled_mean_cosine() -> None:
    """Hand-computed: with as many samples as pool rows every row is compared with the whole pool."""
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    queries = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    s = 2**-0.5
    expected = 0.5 * torch.tensor([(1 + 0 + s) / 3, (-1 + 0 - s) / 3])
    got = instance_weight(queries, pool, samples=3, scale=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(got, expected, atol=1e-6)
    got = instance_weight(queries, pool, samples=10, scale=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(got, expected, atol=1e-6)  # more samples than rows: the whole pool
    one = instance_weight(queries[:1], pool, samples=1, scale=1.0, generator=torch.Generator().manual_seed(3))
    assert float(one) in (1.0, 0.0, pytest.approx(s))  # one draw: the cosine with one pool row
    with pytest.raises(ValueError, match="at least one training instance"):
        instance_weight(queries, pool[:0], 5, 0.5, torch.Generator())


def test_feddpa_mixer_weights_adapters_by_similarity() -> None:
    """The mixer embeds with the local adapter alone and returns 2a / 2(1 - a) per row."""
    model = _dpa_model()
    data = _batches(n=2)
    seen: list[tuple[str, ...]] = []

    def embed(batch: tuple[Tensor, Tensor]) -> Tensor:
        seen.append(tuple(model.model.base_model.active_adapters))
        return batch[0][:, :2].float()

    params = dataclasses.replace(_feddpa().params, instance_mixing=True, mixing_samples=16, mixing_pool=16)
    ctx = dataclasses.replace(_context(model, data, steps=1), embed=embed, train_examples=8)
    weights = FedDPA(params).evaluation_mixer(ctx)
    assert weights is not None and _feddpa().evaluation_mixer(ctx) is None  # off by default
    query = data[1]
    w = weights(query)
    pool = data[0][0][:, :2].float()  # 8 training rows: the first batch of the stream
    cos = torch.nn.functional.cosine_similarity(query[0][:, None, :2].float(), pool[None], dim=-1).mean(1)
    assert torch.allclose(w[PRIVATE], 2 * 0.5 * cos, atol=1e-6)
    assert torch.allclose(w[COMMON], 2 * (1 - 0.5 * cos), atol=1e-6)
    assert set(seen) == {(PRIVATE,)}  # pool and queries embedded with the local adapter alone


def test_feddpa_runtime_mixes_per_instance(tiny_bert: Path) -> None:
    """Instance mixing changes the personalized scores (not the global ones) and is repeatable."""
    base = ["algorithm=feddpa", "model.source=path", f"model.name={tiny_bert}", "federation.num_clients=2",
            "local_steps=2", "task.max_examples=120"]  # fmt: skip
    plain, mixed = ClientRuntime(load(base)), ClientRuntime(load([*base, "algorithm.instance_mixing=true"]))
    common = plain.model.export(COMMON)
    private = {k: torch.randn_like(v) * 0.5 for k, v in plain.model.export(PRIVATE).items()}
    a, b = plain.evaluate(0, common, private), mixed.evaluate(0, common, private)
    assert a.global_ == b.global_
    assert a.personalized["eval_loss"] != b.personalized["eval_loss"]
    assert mixed.evaluate(0, common, private).personalized == b.personalized


@pytest.mark.parametrize(
    ("override", "message"),
    [("algorithm.mixing_scale=2", "mixing_scale"), ("algorithm.steps_per_phase=third", "steps_per_phase")],
)
def test_feddpa_config_refuses(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(["algorithm=feddpa", override])


# ---------------------------------------------------------------------------------------- Per-FedAvg
def _perfedavg(variant: str, **kw) -> PerFedAvg:
    opts = {"name": "perfedavg", "rank": 4, "lora_alpha": 8, "lr": OUTER, "weight_decay": 0.0, "inner_lr": INNER,
            "variant": variant, "fd_eps": 1e-4, "optimizer": "sgd", "one_batch_per_step": False} | kw  # fmt: skip
    return PerFedAvg(PerFedAvgParams(**opts))


class Flat:
    """The common level as one float64 vector, and the loss of a batch as a function of it."""

    def __init__(self, model: TwoLevelModel) -> None:
        params = model.parameters(COMMON)
        self.names, self.shapes = list(params), [p.shape for p in params.values()]
        self.objective = _objective(model)
        self.w = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def split(self, z: Tensor) -> list[Tensor]:
        return [
            t.reshape(s) for t, s in zip(torch.split(z, [s.numel() for s in self.shapes]), self.shapes, strict=True)
        ]

    def f(self, batch):
        return lambda z: self.objective(batch, dict(zip(self.names, self.split(z), strict=True)))

    def grad(self, batch, z: Tensor) -> Tensor:
        return torch.autograd.functional.jacobian(self.f(batch), z)


def _one_level_model() -> TwoLevelModel:
    model = two_level_mlp(private=False)
    randomize_adapters(model)
    return model


def _oracle(flat: Flat, data: list, variant: str) -> Tensor:
    """One Per-FedAvg step written out: Algorithm 1 of Fallah et al. with the explicit Hessian."""
    w = flat.w
    temp = w - INNER * flat.grad(data[0], w)
    g = flat.grad(data[1], temp)
    if variant == HESSIAN_FREE:
        g = g - INNER * torch.autograd.functional.hessian(flat.f(data[2]), w) @ g
    return w - OUTER * g


@pytest.mark.parametrize(("variant", "rtol"), [(FIRST_ORDER, 1e-12), (HESSIAN_FREE, 1e-6)])
def test_perfedavg_step_matches_oracle(variant: str, rtol: float) -> None:
    model, data = _one_level_model(), _batches()
    flat = Flat(model)
    expected = _oracle(flat, data, variant)
    metrics = _perfedavg(variant).train(_context(model, data, steps=1))
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters(COMMON).values()])
    step, want = got - flat.w, expected - flat.w
    assert torch.linalg.vector_norm(step - want) <= rtol * torch.linalg.vector_norm(want)
    other = _oracle(flat, data, FIRST_ORDER if variant == HESSIAN_FREE else HESSIAN_FREE) - flat.w
    assert torch.linalg.vector_norm(other - want) > 1e3 * rtol * torch.linalg.vector_norm(want)  # the test can tell
    assert metrics["gradient_passes"] == (2.0 if variant == FIRST_ORDER else 4.0)


@pytest.mark.parametrize("variant", [FIRST_ORDER, HESSIAN_FREE])
def test_perfedavg_one_batch_step_uses_its_slices(variant: str) -> None:
    """The equal-budget step: D, D' (, D'') are disjoint slices of ONE minibatch (the oracle on the slices)."""
    model, data = _one_level_model(), _batches()
    flat = Flat(model)
    parts = 2 if variant == FIRST_ORDER else 3
    slices = [tuple(t[i] for t in data[0]) for i in torch.tensor_split(torch.arange(8), parts)]
    expected = _oracle(flat, slices, variant)
    ctx = _context(model, data, steps=1)
    _perfedavg(variant, one_batch_per_step=True).train(ctx)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters(COMMON).values()])
    assert torch.linalg.vector_norm(got - expected) <= 1e-6 * torch.linalg.vector_norm(expected - flat.w)
    assert next(ctx.batches) is data[1]  # one minibatch consumed


def test_hvp_central_matches_explicit_hessian() -> None:
    model = _one_level_model()
    flat, batch = Flat(model), _batches()[0]
    v = torch.randn(flat.w.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    exact = torch.autograd.functional.hessian(flat.f(batch), flat.w) @ v
    loss = lambda params: flat.objective(batch, params)  # noqa: E731
    got = torch.cat([t.reshape(-1) for t in hvp_central(loss, flat.names, flat.split(flat.w), flat.split(v), 1e-4)])
    assert torch.allclose(got, exact, rtol=1e-6, atol=1e-9)
    assert torch.all(
        hvp_central(loss, flat.names, flat.split(flat.w), [torch.zeros(s) for s in flat.shapes], 1e-4)[0] == 0
    )


def test_perfedavg_personalize_is_one_sgd_step() -> None:
    model, data = _one_level_model(), _batches()
    flat = Flat(model)
    _perfedavg(FIRST_ORDER).personalize(_context(model, data, steps=1))
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters(COMMON).values()])
    assert torch.allclose(got, flat.w - INNER * flat.grad(data[0], flat.w), rtol=0, atol=1e-14)
    _, g = gradient(lambda p: flat.objective(data[0], p), flat.names, flat.split(flat.w))
    assert any(float(t.abs().max()) > 0 for t in g)


@pytest.mark.parametrize(("override", "message"), [("algorithm.variant=second", "variant"),
                                                   ("algorithm.optimizer=adam", "optimizer"),
                                                   ("algorithm.inner_lr=0", "inner_lr")])  # fmt: skip
def test_perfedavg_config_refuses(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(["algorithm=perfedavg", override])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("m") / "tiny-bert")


def test_perfedavg_runtime_personalizes_and_restores(tiny_bert: Path) -> None:
    exp = load(["algorithm=perfedavg", "model.source=path", f"model.name={tiny_bert}", "federation.num_clients=2",
                "local_steps=1", "task.max_examples=120", "algorithm.inner_lr=1.0"])  # fmt: skip
    assert type(exp.algorithm) is algorithm_class("perfedavg")
    rt = ClientRuntime(exp)
    common = rt.model.export(COMMON)
    first = rt.evaluate(0, common, None)
    after = rt.model.export(COMMON)
    second = rt.evaluate(0, common, None)
    assert not _changed(common, after)  # the adaptation was undone
    assert first.global_ == second.global_ and first.personalized == second.personalized
    assert first.personalized["eval_loss"] != first.global_["eval_loss"]  # the one step did something


# ------------------------------------------------------------------------------ through Flower, end to end
@pytest.mark.slow
@pytest.mark.parametrize(("algorithm", "extra"), [("feddpa", "algorithm.instance_mixing=true"), ("perfedavg", "")])
def test_one_round_through_flower(algorithm: str, extra: str, tiny_bert: Path, tmp_path: Path) -> None:
    overrides = (
        f"algorithm={algorithm} rounds=1 local_steps=1 federation.min_train_clients=1 federation.audit_replies=true "
        + extra
    )
    run_dir = tiny_inprocess_run(tmp_path, overrides, model=tiny_bert)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["algorithm"] == algorithm and len(summary["clients"]) == 2
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in records] == [1] and not any(r["rejected"] for r in records)
    for client in summary["clients"]:  # both a personalized and a global model were scored
        assert client["personalized"]["eval_loss"] == client["personalized"]["eval_loss"]  # not NaN
        assert client["global"]["eval_loss"] == client["global"]["eval_loss"]
    replies = sorted((run_dir / AUDIT_DIR).rglob("*.safetensors"))
    assert len(replies) == sum(r["clients_trained"] for r in records) > 0  # every train reply was audited
    for reply in replies:
        assert not any(f".{PRIVATE}." in key for key in load_file(str(reply)))
