"""FFA-LoRA, FedSA-LoRA and local-only LoRA: what each level holds, what travels, what trains.

Client-side checks run ``ClientRuntime`` on a tiny BERT (separate runtimes stand for separate
client processes); one real Flower simulation per algorithm checks the run end to end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pf2lora_core.config.experiment import Experiment, load
from pf2lora_core.config.keys import AUDIT_DIR, COMMON, EVAL_LOSS, METRICS_FILE, PRIVATE, SUMMARY_FILE
from pf2lora_core.config.schema import ConfigError
from pf2lora_core.federation.client_runtime import ClientRuntime, build_model
from tests.helpers.flower_run import tiny_inprocess_run
from tests.helpers.tiny_bert import make_tiny_bert

ALGORITHMS = ("ffa_lora", "fedsa_lora", "local")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("m") / "tiny-bert")


def experiment(model: Path, algorithm: str, *extra: str) -> Experiment:
    return load([f"algorithm={algorithm}", "model.source=path", f"model.name={model}", "federation.num_clients=2",
                 "local_steps=3", "task.max_examples=120", *extra])  # fmt: skip


def named(rt: ClientRuntime, part: str) -> dict[str, torch.Tensor]:
    """Every parameter whose name contains ``part`` (e.g. ``.lora_A.``), detached copies."""
    return {n: p.detach().clone() for n, p in rt.model.model.named_parameters() if part in n}


def changed(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(after[k], before[k]) for k in before)


# --------------------------------------------------------------------------------------- FFA-LoRA
def test_ffa_lora_keeps_a_identical_on_every_client(tiny_bert: Path) -> None:
    exp = experiment(tiny_bert, "ffa_lora")
    server, _ = build_model(exp, torch.device("cpu"))
    a_server = {n: p.detach().clone() for n, p in server.model.named_parameters() if ".lora_A." in n}
    clients = [ClientRuntime(exp), ClientRuntime(exp)]  # two client processes
    common = server.export(COMMON)
    outs = [rt.train(k, 1, common, None) for k, rt in enumerate(clients)]
    for rt in clients:
        a = named(rt, ".lora_A.")
        assert a and a.keys() == a_server.keys()
        assert all(torch.equal(a[n], a_server[n]) for n in a)  # same seeded init, unchanged by training
        params = dict(rt.model.model.named_parameters())
        assert not any(params[n].requires_grad or rt.model.level_of(n) for n in a)  # frozen: no level
    assert all(float(t.abs().max()) > 0 for t in a_server.values())  # a real random projection, not zeros
    for out in outs:
        assert not any(".lora_A." in k for k in out.common)  # A never travels
        assert any(".lora_B." in k for k in out.common) and out.private == {}
        assert changed(out.common, common)  # B (and the head) trained
        assert all(float(out.common[k].abs().max()) > 0 for k in out.common if ".lora_B." in k)
    assert changed(outs[0].common, outs[1].common)  # different clients, different data


def test_ffa_lora_a_is_fixed_by_the_run_seed(tiny_bert: Path) -> None:
    """The shared A comes from the run seed, not from anything the clients exchange."""
    a0 = named(ClientRuntime(experiment(tiny_bert, "ffa_lora")), ".lora_A.")
    a1 = named(ClientRuntime(experiment(tiny_bert, "ffa_lora", "seed=1")), ".lora_A.")
    assert any(not torch.equal(a0[n], a1[n]) for n in a0)


# ------------------------------------------------------------------------------------- FedSA-LoRA
def test_fedsa_lora_sends_a_and_keeps_b(tiny_bert: Path) -> None:
    rt = ClientRuntime(experiment(tiny_bert, "fedsa_lora"))
    a_names, b_names = set(named(rt, ".lora_A.")), set(named(rt, ".lora_B."))
    common = rt.model.export(COMMON)
    head = {k for k in common if ".lora_" not in k}
    assert a_names and head and set(common) == a_names | head  # A + the (common) head, never B
    assert set(rt.initial_private) == b_names and rt.has_private
    assert all(float(t.abs().max()) == 0 for t in rt.initial_private.values())  # peft's B = 0
    out = rt.train(0, 1, common, None)
    assert set(out.common) == set(common) and set(out.private) == b_names
    assert changed(out.private, rt.initial_private)  # B trained
    assert changed({k: out.common[k] for k in a_names}, common)  # A trained


def test_fedsa_lora_private_b_persists_per_client(tiny_bert: Path) -> None:
    rt = ClientRuntime(experiment(tiny_bert, "fedsa_lora"))
    common = rt.model.export(COMMON)
    first = rt.train(0, 1, common, None)
    rt.train(1, 1, common, None)  # another client trains on the shared model in between
    second = rt.train(0, 2, first.common, first.private)  # client 0 resumes from its own B
    rt._load(first.common, first.private)
    assert all(torch.equal(v, first.private[k]) for k, v in rt.model.export(PRIVATE).items())
    rt._load(common, None)  # a client without private state starts from the seeded B
    assert all(torch.equal(v, rt.initial_private[k]) for k, v in rt.model.export(PRIVATE).items())
    assert changed(second.private, first.private)
    ev = rt.evaluate(0, second.common, second.private)
    assert math.isnan(ev.global_[EVAL_LOSS]) and math.isfinite(ev.personalized[EVAL_LOSS])


# ------------------------------------------------------------------------------------------- local
def test_local_lora_sends_nothing(tiny_bert: Path) -> None:
    """With ``model.head_level=private`` local-only LoRA is the strict no-federation reference."""
    rt = ClientRuntime(experiment(tiny_bert, "local", "model.head_level=private"))
    assert rt.model.export(COMMON) == {} and rt.model.levels == (PRIVATE,)
    trainable = {n for n, p in rt.model.model.named_parameters() if p.requires_grad}
    assert trainable == set(rt.initial_private)
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    assert any(".lora_" not in n for n in trainable)  # the head is private too
    out = rt.train(0, 1, {}, None)
    assert out.common == {} and changed(out.private, rt.initial_private)
    algo = rt.exp.algorithm
    assert algo.server_update({}, [out.common, {}], [3.0, 1.0], [0, 1]) == {}  # FedAvg of nothing
    ev = rt.evaluate(0, {}, out.private)
    assert math.isnan(ev.global_[EVAL_LOSS]) and math.isfinite(ev.personalized[EVAL_LOSS])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_parameters_are_lora_params(tiny_bert: Path, algorithm: str) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        experiment(tiny_bert, algorithm, "+algorithm.private_rank=2")


# ------------------------------------------------------------------------------ end to end (Flower)
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_round_through_flower(algorithm: str, tiny_bert: Path, tmp_path: Path) -> None:
    overrides = (
        f"algorithm={algorithm} rounds=1 local_steps=1 federation.min_train_clients=1 federation.audit_replies=true"
    )
    run_dir = tiny_inprocess_run(tmp_path, overrides, model=tiny_bert)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["algorithm"] == algorithm and [c["client"] for c in summary["clients"]] == [0, 1]
    metric = summary["personalized"]["metric"]
    for c in summary["clients"]:
        assert 0 <= c["personalized"][metric] <= 1
    record = json.loads((run_dir / METRICS_FILE).read_text().splitlines()[0])
    assert record["clients_trained"] == 2 and not record["rejected"]
    sent = [load_file(str(p)) for p in sorted((run_dir / AUDIT_DIR).rglob("*.safetensors"))]
    if algorithm == "ffa_lora":
        assert summary["global"]["mean"] is not None
        assert len(sent) == 2 and not any(".lora_A." in k for s in sent for k in s)
    else:
        assert summary["global"]["mean"] is None and all(c["global"][metric] is None for c in summary["clients"])
    if algorithm == "fedsa_lora":
        assert len(sent) == 2 and not any(".lora_B." in k for s in sent for k in s)
        assert all(any(".lora_A." in k for k in s) for s in sent)
    if algorithm == "local":  # the head follows model.head_level (common): it alone travels, never the LoRA
        assert len(sent) == 2 and not any(".lora_" in k for s in sent for k in s)
        assert summary["communication"]["params_common"] > 0
