"""A client's local work without Flower: per-process caching, private state to disk and back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import COMMON, PRIVATE
from pf2lora_core.federation import client_runtime as client_mod
from pf2lora_core.federation.private_store import PrivateState, PrivateStore
from tests.helpers.tiny_bert import make_tiny_bert


@pytest.fixture(scope="module")
def exp_yaml(tmp_path_factory: pytest.TempPathFactory) -> str:
    model = make_tiny_bert(tmp_path_factory.mktemp("m") / "tiny-bert")
    exp = load(["model.source=path", f"model.name={model}", "federation.num_clients=3", "local_steps=2",
                "task.max_examples=240"])  # fmt: skip
    return exp.to_yaml()


def test_runtime_is_cached_per_process(exp_yaml: str) -> None:
    assert client_mod.runtime_for(exp_yaml) is client_mod.runtime_for(exp_yaml)
    rt = client_mod.runtime_for(exp_yaml)
    assert rt.split(0) is rt.split(0)  # tokenized once


def test_private_level_round_trips_through_disk(exp_yaml: str, tmp_path: Path) -> None:
    rt = client_mod.runtime_for(exp_yaml)
    common = rt.model.export(COMMON)
    out = rt.train(0, 1, common, None)
    assert set(out.common) == set(common) and set(out.private) == set(rt.initial_private)
    assert any(not torch.equal(out.private[k], rt.initial_private[k]) for k in out.private)
    store = PrivateStore(tmp_path, "run-x", 0)
    store.save(PrivateState(out.private, round=1, steps_total=2))
    restored = store.load()
    assert restored is not None and restored.round == 1 and restored.steps_total == 2
    for k, v in out.private.items():
        assert torch.equal(restored.tensors[k], v)
    in_memory = rt.evaluate(0, out.common, out.private)
    fresh = client_mod.ClientRuntime(rt.exp)  # a new process would build its own runtime
    from_disk = fresh.evaluate(0, out.common, restored.tensors)
    assert from_disk.personalized == pytest.approx(in_memory.personalized)


def test_clients_do_not_share_private_levels(exp_yaml: str) -> None:
    rt = client_mod.runtime_for(exp_yaml)
    common = rt.model.export(COMMON)
    rt.train(0, 1, common, None)
    rt._load(common, None)  # a client with no private state starts from the seeded init
    for k, v in rt.model.export(PRIVATE).items():
        assert torch.equal(v, rt.initial_private[k])


def test_personalized_differs_from_global_after_training(exp_yaml: str) -> None:
    rt = client_mod.runtime_for(exp_yaml)
    out = rt.train(1, 1, rt.model.export(COMMON), None)
    ev = rt.evaluate(1, out.common, out.private)
    assert ev.personalized["eval_loss"] != ev.global_["eval_loss"]
    assert ev.rank["effective"] > 0 and ev.num_examples > 0
    assert 0 < ev.rank["private_energy"] < 1  # the private level learned, and holds part of the update


def test_evaluation_refits_the_private_level_to_the_common_level_it_gets(exp_yaml: str) -> None:
    """PF2LoRA's personalized model is (x, y re-fitted at x): the re-fit is repeatable, returned, and
    leaves the kept level (training's) as it was; with ``refit_steps=0`` nothing is re-fitted."""
    rt = client_mod.runtime_for(exp_yaml)
    assert rt.exp.algorithm.params.refit_steps > 0  # the default re-fits
    out = rt.train(2, 1, rt.model.export(COMMON), None)
    kept = {k: v.clone() for k, v in out.private.items()}
    first, again = rt.evaluate(2, out.common, out.private), rt.evaluate(2, out.common, out.private)
    assert first.private is not None and set(first.private) == set(kept)
    assert any(not torch.equal(first.private[k], kept[k]) for k in kept)  # the re-fit moved y
    assert all(torch.equal(first.private[k], again.private[k]) for k in kept)  # repeatable
    assert first.personalized == again.personalized
    assert all(torch.equal(out.private[k], kept[k]) for k in kept)  # the caller's level untouched
    # evaluating with the re-fitted level and no further re-fit scores what was reported
    no_refit = client_mod.ClientRuntime(load([*_overrides(rt), "algorithm.refit_steps=0"]))
    direct = no_refit.evaluate(2, out.common, first.private)
    assert direct.private is None
    assert direct.personalized["eval_loss"] == pytest.approx(first.personalized["eval_loss"], rel=1e-5)


def _overrides(rt: client_mod.ClientRuntime) -> list[str]:
    return [
        "model.source=path", f"model.name={rt.exp.model.name}", "federation.num_clients=3", "local_steps=2",
        "task.max_examples=240",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "reuses"),
    [("homlora", True), ("ffa_lora", True), ("hetlora", True), ("flexlora", True), ("flora", False),
     ("pf2lora", False), ("perfedavg", False), ("fedsa_lora", False), ("feddpa", False), ("local", False)],
)  # fmt: skip
def test_personalized_is_evaluated_once_only_where_it_is_the_global_model(
    exp_yaml: str, name: str, reuses: bool
) -> None:
    """One level and nothing adapted for evaluation: the personalized score is the global one, not
    computed again; the two computed separately agree (deterministic evaluation)."""
    base = client_mod.runtime_for(exp_yaml)
    rt = client_mod.ClientRuntime(load([*_overrides(base), f"algorithm={name}"]))
    assert rt.personalized_is_global is reuses
    if reuses:
        common = rt.model.export(COMMON)
        out = rt.train(0, 1, common, None)
        ev = rt.evaluate(0, out.common, None)
        assert ev.personalized is ev.global_  # not evaluated twice
        rt._load(out.common, None)
        again = rt._evaluate_personalized(0, {"test": rt.split(0).test})["test"]
        assert again == pytest.approx(ev.global_)
