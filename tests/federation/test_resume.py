"""Server checkpoints and resume: a run killed after round t and resumed ends bitwise where an
uninterrupted one does.

The strategy runs in-process against ``FakeGrid``: real Flower messages, answered by a
deterministic fake client (its update depends only on client, round and what it was sent), so
the server side (sampling RNG, algorithm state, aggregation order, history) is tested exactly and
fast. The end-to-end resume through real Flower processes is in ``test_deploy.py``.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from pf2lora_core.algorithms import REGISTRY
from pf2lora_core.config.experiment import Experiment, load
from pf2lora_core.config.keys import ARRAYS_KEY, GLOBAL, METRICS_FILE, METRICS_KEY, PERSONALIZED
from pf2lora_core.federation.checkpoint import (
    SERVER_STATE_DIR,
    ServerCheckpoint,
    algorithm_state,
    capture_rng,
    latest_checkpoint,
    restore_algorithm_state,
)
from pf2lora_core.federation.checks import resolved_federation
from pf2lora_core.federation.private_store import PrivateState, PrivateStore
from pf2lora_core.federation.protocol import CLIENT_KEY, CONFIG_YAML_KEY, RUN_KEY, flatten_eval
from pf2lora_core.federation.resume import load_resume, truncate_metrics
from pf2lora_core.run.run_dir import RunDir, new_run_dir
from pf2lora_core.tools.launch import federation_config
from pf2lora_core.training.runtime import derived_seed
from server_app.strategy import CommonAdapterFedAvg, RoundPlan

SUPERLINK_NODE = 1  # Flower's node id of the SuperLink itself (sender of the errors it generates)


@pytest.fixture(autouse=True)
def flower_task_identity() -> Iterator[None]:
    """Flower builds Messages only inside a run; give this process one for the test."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 42, 1, SUPERLINK_NODE
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


# ------------------------------------------------------------------------------ fake grid
@dataclass
class Reply:
    """Duck-typed reply (Flower builds replies only on a SuperNode)."""

    content: RecordDict | None
    metadata: SimpleNamespace
    error: Error | None = None

    def has_error(self) -> bool:
        return self.error is not None


class KilledError(RuntimeError):
    """The server process 'dies' here."""


@dataclass
class FakeGrid:
    """Nodes answering QUERY / TRAIN / EVALUATE like the ClientApp would, deterministically.

    ``drop``: (phase, round, client) whose reply never comes (a timeout); ``unavailable``: the
    SuperLink answers for that node with Flower's node-unavailable error; ``kill_at``: raise
    ``KilledError`` when the first message of that (phase, round) is sent; ``prune``: clients that
    send back a LoRA of one rank less than they got (HETLoRA's self-pruning, so its state moves).
    """

    nodes: dict[int, int]  # node id -> client (partition id)
    drop: set[tuple[str, int, int]] = field(default_factory=set)
    unavailable: set[tuple[str, int, int]] = field(default_factory=set)
    kill_at: tuple[str, int] | None = None
    prune: set[int] = field(default_factory=set)
    sent: list[tuple[str, int, int]] = field(default_factory=list)  # (phase, round, client) in order

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Reply]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what Grid.push_messages does
            node = msg.metadata.dst_node_id
            client = self.nodes[node]
            phase = str(msg.metadata.message_type)
            rnd = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
            if self.kill_at == (phase, rnd):
                raise KilledError(f"killed at {phase} round {rnd}")
            self.sent.append((phase, rnd, client))
            meta = SimpleNamespace(src_node_id=node, reply_to_message_id=msg.metadata.message_id)
            if (phase, rnd, client) in self.drop:
                continue
            if (phase, rnd, client) in self.unavailable:
                meta.src_node_id = SUPERLINK_NODE
                replies.append(Reply(None, meta, Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable")))
                continue
            replies.append(Reply(self.answer(msg, phase, rnd, client), meta))
        return replies

    def answer(self, msg: Message, phase: str, rnd: int, client: int) -> RecordDict:
        if phase == MessageType.QUERY:
            return RecordDict({METRICS_KEY: MetricRecord({CLIENT_KEY: client})})
        down = {k: v.numpy() for k, v in msg.content[ARRAYS_KEY].items()}
        if phase == MessageType.EVALUATE:
            # a state-dependent score inside the accuracy's bound [0, 1] (the server rejects any other)
            acc = float(1.0 / (1.0 + np.exp(-np.mean([a.mean() for a in down.values()]))))
            metrics = flatten_eval(client, 10, {PERSONALIZED: {"accuracy": acc}, GLOBAL: {"accuracy": acc / 2}})
            return RecordDict({METRICS_KEY: MetricRecord(metrics)})
        gen = np.random.default_rng(derived_seed(client, rnd))
        up = {k: (a + 0.01 * gen.standard_normal(a.shape)).astype(a.dtype) for k, a in down.items()}
        if client in self.prune:
            rank = min(a.shape[0] for k, a in up.items() if "lora_A" in k)
            up = {k: a[: max(rank - 1, 1)] if "lora_A" in k else a[:, : max(rank - 1, 1)] if "lora_B" in k else a
                  for k, a in up.items()}  # fmt: skip
        metrics = {CLIENT_KEY: client, "num-examples": 10 + 5 * client, "train_loss": 1.0 / (1 + rnd + client)}
        record = ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in up.items()})
        return RecordDict({ARRAYS_KEY: record, METRICS_KEY: MetricRecord(metrics)})


# ------------------------------------------------------------------------------- helpers
CLIENTS = 4
NODES = {1000 + 7 * k: k for k in range(CLIENTS)}  # node ids unrelated to the partition ids


def experiment(algorithm: str, extra: str = "") -> Experiment:
    return load(
        f"algorithm={algorithm} rounds=3 federation.num_clients={CLIENTS} federation.fraction_train=0.5 "
        # no norm bound unless a test sets one: the fake uplinks (randn factors, a pruned HETLoRA rank)
        # are not shaped like trained LoRA updates, which max_update_norm=auto is scaled from
        f"federation.min_train_clients=1 federation.wait_for_nodes_s=0 federation.max_update_norm=0 {extra}"
    )


def initial_common(exp: Experiment) -> dict[str, torch.Tensor]:
    """A two-module LoRA plus a head, shaped like what the model exports (seeded)."""
    r = exp.algorithm.params.rank
    g = torch.Generator().manual_seed(0)
    common = {}
    for module in ("enc.0.query", "enc.0.value"):
        common[f"{module}.lora_A.common.weight"] = torch.randn(r, 6, generator=g)
        common[f"{module}.lora_B.common.weight"] = 0.1 * torch.randn(6, r, generator=g)
    common["classifier.weight"] = torch.randn(2, 6, generator=g)
    return common


def make_strategy(exp: Experiment, run_dir: Path) -> CommonAdapterFedAvg:
    plan = RoundPlan(exp.rounds, eval_every=1, metric="accuracy", seed=exp.seed, config_yaml=exp.to_yaml())
    params = sum(t.numel() for t in initial_common(exp).values())  # what max_update_norm=auto scales with
    fed = resolved_federation(exp.federation, exp.algorithm, exp.local_steps, params)
    return CommonAdapterFedAvg(algorithm=exp.algorithm, run=RunDir(run_dir), federation=fed, plan=plan)


def shared(exp: Experiment, run_dir: Path) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord({CONFIG_YAML_KEY: exp.to_yaml(), RUN_KEY: run_dir.name})


def run_fresh(exp: Experiment, run_dir: Path, grid: FakeGrid) -> CommonAdapterFedAvg:
    strategy = make_strategy(exp, run_dir)
    strategy.start_state(initial_common(exp), dict(NODES))
    strategy.run_rounds(grid, shared(exp, run_dir))
    return strategy


def resume(run_dir: Path, grid: FakeGrid) -> CommonAdapterFedAvg:
    """What the ServerApp does with ``resume=<run_dir>``: recorded config, rebuilt set-up, restored state."""
    exp, run, ckpt = load_resume(run_dir)
    strategy = make_strategy(exp, run.path)
    strategy.start_state(initial_common(exp), dict(NODES))
    strategy.restore(ckpt)
    strategy.run_rounds(grid, shared(exp, run.path), first_round=ckpt.round + 1)
    return strategy


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("algorithm", ["pf2lora", "hetlora"])
def test_resumed_run_ends_bitwise_equal_to_uninterrupted(tmp_path: Path, algorithm: str) -> None:
    """3 rounds, half the clients sampled per round: uninterrupted vs killed when round 2 starts
    (after round 1's checkpoint) and resumed. Same common adapter bit for bit, same clients sampled
    in every round, same algorithm state (HETLoRA's per-client ranks) and the same history."""
    exp = experiment(algorithm)
    prune = set(range(CLIENTS)) if algorithm == "hetlora" else set()  # every client prunes a rank a round
    whole_grid = FakeGrid(dict(NODES), prune=prune)
    whole = run_fresh(exp, new_run_dir(str(tmp_path), "whole"), whole_grid)

    run_dir = new_run_dir(str(tmp_path), "killed")
    killed_grid = FakeGrid(dict(NODES), prune=prune, kill_at=(MessageType.TRAIN, 2))
    with pytest.raises(KilledError):
        run_fresh(experiment(algorithm), run_dir, killed_grid)
    assert latest_checkpoint(run_dir / SERVER_STATE_DIR).name == "round_0001.safetensors"

    resumed_grid = FakeGrid(dict(NODES), prune=prune)
    resumed = resume(run_dir, resumed_grid)

    assert_bitwise_equal(whole.state, resumed.state)
    assert algorithm_state(whole.algorithm).keys() == algorithm_state(resumed.algorithm).keys()
    if algorithm == "hetlora":
        assert whole.algorithm.ranks == resumed.algorithm.ranks
        assert min(whole.algorithm.ranks.values()) < exp.algorithm.params.rank  # the state did move
    after_round_1 = [s for s in whole_grid.sent if s[1] >= 2 and s[0] != MessageType.QUERY]
    assert after_round_1 == [s for s in resumed_grid.sent if s[0] != MessageType.QUERY]
    assert len({tuple(c for p, r, c in after_round_1 if p == MessageType.TRAIN and r == n) for n in (2, 3)}) == 2
    lines = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert [x["train"] for x in lines] == [x.to_json()["train"] for x in whole.history]


def test_checkpoint_round_trips_every_algorithms_server_state(tmp_path: Path) -> None:
    """After one server update, every registered algorithm restored from its checkpoint into a fresh
    object sends the same downlinks and makes the same next update, bit for bit."""

    def spec(d: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {k: (tuple(v.shape), v.numpy().dtype) for k, v in d.items()}

    def uplinks(alg: Any, state: dict, common: dict, k: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for c in range(2):
            down = alg.downlink(state, c)
            base = down if set(down) == set(common) and alg.check_uplink(spec(down), spec(down)) is None else common
            out.append({name: v + 0.1 * (c + 1 + k) for name, v in base.items()})
        return out

    for name in sorted(REGISTRY):
        exp = experiment(name)
        alg, common = exp.algorithm, initial_common(exp)
        state = alg.server_update(alg.server_init(common), uplinks(alg, alg.server_init(common), common, 0),
                                  [1.0, 2.0], [0, 1])  # fmt: skip
        path = ServerCheckpoint(1, state, algorithm_state(alg), [], {}, None, capture_rng(), "").save(tmp_path)
        loaded = ServerCheckpoint.load(path)
        fresh = experiment(name).algorithm
        fresh.server_init(common)
        restore_algorithm_state(fresh, loaded.algorithm)
        for client in range(3):
            assert_bitwise_equal(alg.downlink(state, client), fresh.downlink(loaded.state, client))
        ups = uplinks(alg, state, common, 1)
        expected = alg.server_update(state, ups, [1.0, 2.0], [0, 1])
        assert_bitwise_equal(expected, fresh.server_update(loaded.state, ups, [1.0, 2.0], [0, 1]))


def test_checkpoint_restores_rng_and_sampler(tmp_path: Path) -> None:
    exp = experiment("pf2lora")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "rng"))
    strategy.start_state(initial_common(exp), dict(NODES))
    random.seed(3)
    torch.manual_seed(3)
    np.random.seed(3)
    path = strategy.checkpoint(1).save(tmp_path)
    expected = (random.random(), float(torch.rand(1)), float(np.random.rand()), strategy.sampler.random())
    random.seed(99)
    torch.manual_seed(99)
    np.random.seed(99)
    other = make_strategy(exp, new_run_dir(str(tmp_path), "rng2"))
    other.restore(ServerCheckpoint.load(path))
    assert (random.random(), float(torch.rand(1)), float(np.random.rand()), other.sampler.random()) == expected


def test_checkpoint_refuses_what_it_cannot_store_without_pickle(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="without pickle"):
        ServerCheckpoint(1, {}, {"fn": lambda: 0}, [], {}, None).save(tmp_path)


def test_truncate_metrics_keeps_checkpointed_rounds(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"round": 1}\n{"round": 2}\n{"round": 3}\n{"round": 4, "trunc')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"round": 1}\n{"round": 2}\n'


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no run directory"):
        load_resume(tmp_path / "nope")
    (tmp_path / "run" / SERVER_STATE_DIR).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="start it afresh"):
        load_resume(tmp_path / "run")


def test_federation_config_of_a_resumed_run_is_the_recorded_size(tmp_path: Path) -> None:
    recorded = load("federation.num_clients=3")
    ServerCheckpoint(1, {}, {}, [], {}, None, config_yaml=recorded.to_yaml()).save(tmp_path / SERVER_STATE_DIR)
    assert federation_config(load(f"resume={tmp_path}")).startswith("num-supernodes=3 ")


def test_private_store_starts_a_round_from_the_round_before(tmp_path: Path) -> None:
    """A round run again after a resume must start from the private level before it, even though
    the clients already saved what that round's first attempt produced."""
    store = PrivateStore(tmp_path, "run", 0)
    one, two = {"c": torch.ones(2)}, {"c": torch.full((2,), 2.0)}
    store.save(PrivateState(one, round=1, steps_total=3))
    store.save(PrivateState(two, round=2, steps_total=6))
    assert torch.equal(store.load(before_round=2).tensors["c"], one["c"])
    assert store.load(before_round=3).round == 2 and store.load().round == 2
    store.save(PrivateState({"c": torch.full((2,), 5.0)}, round=2, steps_total=6))  # round 2 run again
    assert store.load(before_round=2).round == 1  # the round before is kept
    assert store.load(before_round=1) is None


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    for r in range(1, 5):
        ServerCheckpoint(r, {"x": torch.full((2,), float(r))}, {}, [], {}, None).save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round_0003.history.json", "round_0003.safetensors", "round_0004.history.json", "round_0004.safetensors"
    ]  # fmt: skip
    assert ServerCheckpoint.load(latest_checkpoint(tmp_path)).state["x"][0] == 4.0


# ------------------------------------------------------------- the whole app, in one process
@dataclass
class LocalGrid:
    """Flower's grid in one process: every node is a ``Context`` served by the real ClientApp.

    ``kill_after_train``: the server 'dies' once the clients have replied to that round's training
    (they saved the private adapters it produced; the server never aggregated them).
    """

    contexts: dict[int, Any]
    kill_after_train: int | None = None

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from client_app.app import app as client_app

        replies, rounds = [], set()
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if msg.metadata.message_type == MessageType.TRAIN:
                rounds.add(int(msg.content["config"]["server-round"]))
            replies.append(client_app(msg, self.contexts[msg.metadata.dst_node_id]))
        if self.kill_after_train in rounds:
            raise KilledError(f"server killed after the clients trained round {self.kill_after_train}")
        return replies


def local_contexts(first_node: int) -> dict[int, Any]:
    """Fresh node contexts (empty ``context.state``), as a new Flower run gets them."""
    from flwr.app import Context

    return {
        first_node + k: Context(
            run_id=42, node_id=first_node + k, node_config={"partition-id": k, "num-partitions": 3},
            state=RecordDict(), run_config={},
        )
        for k in range(3)
    }  # fmt: skip


@pytest.mark.slow
def test_app_resumed_after_a_kill_ends_bitwise_equal(tmp_path: Path) -> None:
    """The ServerApp's own code path with the real ClientApp (tiny BERT, packaged data), in one process.

    Compared: the common adapter after round 2 (``checkpoints/common_round_0002.safetensors``) of an
    uninterrupted 2-round run, and of a run whose server was killed after the clients had finished
    round 2's training (so their disks hold round 2's private adapters) and that was then resumed
    with ``resume=<run dir>`` on fresh node contexts (new node ids, empty ``context.state``).
    Bitwise equal, and so are the clients' final evaluations.
    """
    from safetensors.torch import load_file

    from server_app.app import prepare_resume, run_experiment
    from tests.helpers.tiny_bert import make_tiny_bert

    model = make_tiny_bert(tmp_path / "tiny-bert")

    def exp_for(name: str) -> Experiment:
        return load(
            f"model.source=path model.name={model} federation.num_clients=3 task.max_examples=120 rounds=2 "
            f"local_steps=1 task.batch_size=4 task.eval_batch_size=20 task.max_length=16 flops_rounds=0 "
            f"federation.state_dir={tmp_path / 'state'} run_dir={tmp_path / name}"
        )

    whole = exp_for("whole")
    run_experiment(LocalGrid(local_contexts(100)), whole, RunDir(new_run_dir("", "", str(tmp_path / "whole"))))
    killed = exp_for("killed")
    with pytest.raises(KilledError):
        run_experiment(LocalGrid(local_contexts(200), kill_after_train=2), killed,
                       RunDir(new_run_dir("", "", str(tmp_path / "killed"))))  # fmt: skip
    assert PrivateStore(tmp_path / "state", "killed", 0).load().round == 2  # the clients were ahead
    exp, run, ckpt = prepare_resume(str(tmp_path / "killed"), f"resume={tmp_path / 'killed'}")
    assert ckpt.round == 1 and exp.to_yaml() == killed.to_yaml()
    summary = run_experiment(LocalGrid(local_contexts(300)), exp, run, ckpt)

    name = "checkpoints/common_round_0002.safetensors"
    assert_bitwise_equal(load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "killed" / name)))
    reference = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert [c["personalized"] for c in summary.to_json()["clients"]] == [
        c["personalized"] for c in reference["clients"]
    ]
    assert [json.loads(x)["round"] for x in (tmp_path / "killed" / METRICS_FILE).read_text().splitlines()] == [1, 2]
