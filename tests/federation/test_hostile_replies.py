"""The server survives any reply: a fuzz of malformed train and evaluate replies through whole
rounds of the real strategy, and one test per bound (num-examples, update norm, sparsity weights,
claimed ids, all-failed rounds, unidentified nodes).

In-process against ``tests.federation.test_resume.FakeGrid`` (real Flower records, a deterministic fake client).
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from pf2lora_core.algorithms.aggregation import ROBUST
from pf2lora_core.config.keys import ARRAYS_KEY, METRICS_FILE, METRICS_KEY, NUM_EXAMPLES, TRAIN_LOSS
from pf2lora_core.federation.checks import clip_update, update_norm, update_reference
from pf2lora_core.federation.protocol import CLIENT_KEY, DETAILS_KEY
from pf2lora_core.run.run_dir import new_run_dir
from pf2lora_core.training.runtime import derived_seed
from server_app.strategy import CommonAdapterFedAvg, RunFailedError
from tests.federation.test_resume import (  # noqa: F401  (flower_task_identity is an autouse fixture)
    NODES,
    FakeGrid,
    Reply,
    experiment,
    flower_task_identity,
    initial_common,
    make_strategy,
    shared,
)

HONEST, BAD = (0, 1), (2, 3)
KNOWN = {c: (10 + 5 * c, 10) for c in range(4)}  # what FakeGrid's clients hold: (train, test)
Mutator = Callable[[Reply, random.Random], Reply]


# ------------------------------------------------------------------------------- mutators
def _metric(key: str, value: Any) -> Mutator:
    def change(r: Reply, _: random.Random) -> Reply:
        r.content[METRICS_KEY][key] = value
        return r

    return change


def _drop_metric(key: str) -> Mutator:
    def change(r: Reply, _: random.Random) -> Reply:
        del r.content[METRICS_KEY][key]
        return r

    return change


def _error(r: Reply, _: random.Random) -> Reply:
    return Reply(None, r.metadata, Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "Traceback ... " + "x" * 5000))


def _no_content(r: Reply, _: random.Random) -> Reply:
    r.content = None
    return r


def _drop_record(name: str) -> Mutator:
    def change(r: Reply, _: random.Random) -> Reply:
        del r.content[name]
        return r

    return change


def _extra_record(r: Reply, _: random.Random) -> Reply:
    r.content["extra"] = MetricRecord({"x": 1.0})
    return r


def _spoof_honest(r: Reply, rng: random.Random) -> Reply:
    r.content[METRICS_KEY][CLIENT_KEY] = rng.choice(HONEST)
    return r


def _stray_node(r: Reply, _: random.Random) -> Reply:
    r.metadata = SimpleNamespace(src_node_id=99_999, reply_to_message_id="")
    return r


def _many_metrics(r: Reply, _: random.Random) -> Reply:
    for i in range(80):
        r.content[METRICS_KEY][f"m{i}"] = 1.0
    return r


def _arrays(change: Callable[[dict[str, Array]], None]) -> Mutator:
    def mutate(r: Reply, _: random.Random) -> Reply:
        arrays = dict(r.content[ARRAYS_KEY].items())
        change(arrays)
        r.content[ARRAYS_KEY] = ArrayRecord(arrays)
        return r

    return mutate


def _first_key(arrays: dict[str, Array]) -> str:
    return sorted(arrays)[0]


def _set_first(make: Callable[[np.ndarray], Array]) -> Callable[[dict[str, Array]], None]:
    def change(arrays: dict[str, Array]) -> None:
        key = _first_key(arrays)
        arrays[key] = make(arrays[key].numpy())

    return change


def _pickled(a: np.ndarray) -> Array:
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    return Array(dtype=str(a.dtype), shape=a.shape, stype="numpy.ndarray", data=buf.getvalue())


def _with_value(a: np.ndarray, value: float) -> Array:
    out = a.copy()
    out.flat[0] = value
    return Array(out)


TRAIN_MUTATORS: dict[str, Mutator] = {
    "client error": _error,
    "no content": _no_content,
    "no metrics record": _drop_record(METRICS_KEY),
    "no arrays record": _drop_record(ARRAYS_KEY),
    "extra record": _extra_record,
    "no client key": _drop_metric(CLIENT_KEY),
    "no num-examples": _drop_metric(NUM_EXAMPLES),
    "no train_loss": _drop_metric(TRAIN_LOSS),
    "list-valued metric": _metric(TRAIN_LOSS, [0.1, 0.2]),
    "non-finite loss": _metric(TRAIN_LOSS, float("nan")),
    "num-examples inf": _metric(NUM_EXAMPLES, float("inf")),
    "num-examples nan": _metric(NUM_EXAMPLES, float("nan")),
    "num-examples 1e300": _metric(NUM_EXAMPLES, 1e300),
    "num-examples 1e308": _metric(NUM_EXAMPLES, 1e308),
    "num-examples zero": _metric(NUM_EXAMPLES, 0),
    "num-examples negative": _metric(NUM_EXAMPLES, -5),
    "num-examples over the partition": _metric(NUM_EXAMPLES, 500),
    "spoofed honest id": _spoof_honest,
    "out-of-range id": _metric(CLIENT_KEY, 99),
    "float id": _metric(CLIENT_KEY, 2.5),
    "stray node": _stray_node,
    "too many metrics": _many_metrics,
    "missing array": _arrays(lambda a: a.pop(_first_key(a))),
    "extra array": _arrays(lambda a: a.__setitem__("x.lora_A.private.weight", Array(np.zeros(3, np.float32)))),
    "wrong shape": _arrays(_set_first(lambda a: Array(np.zeros((a.shape[0] + 1, *a.shape[1:]), a.dtype)))),
    "wrong dtype": _arrays(_set_first(lambda a: Array(a.astype(np.float64)))),
    "nan array": _arrays(_set_first(lambda a: _with_value(a, np.nan))),
    "inf array": _arrays(_set_first(lambda a: _with_value(a, np.inf))),
    "huge update": _arrays(_set_first(lambda a: Array((a + 1e6).astype(a.dtype)))),
    "garbage bytes": _arrays(
        _set_first(lambda a: Array(dtype=str(a.dtype), shape=a.shape, stype="numpy.ndarray", data=b"\x93NUMPY junk"))
    ),
    "pickled bytes": _arrays(_set_first(_pickled)),
}


def _details(text: str) -> Mutator:
    def change(r: Reply, _: random.Random) -> Reply:
        r.content[DETAILS_KEY] = ConfigRecord({DETAILS_KEY: text})
        return r

    return change


def _details_extra_key(r: Reply, _: random.Random) -> Reply:
    r.content[DETAILS_KEY] = ConfigRecord({DETAILS_KEY: "{}", "other": "x"})
    return r


def _eval_arrays(r: Reply, _: random.Random) -> Reply:
    r.content[ARRAYS_KEY] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    return r


EVAL_MUTATORS: dict[str, Mutator] = {
    "no content": _no_content,
    "no metrics record": _drop_record(METRICS_KEY),
    "arrays in an evaluate reply": _eval_arrays,
    "extra record": _extra_record,
    "no client key": _drop_metric(CLIENT_KEY),
    "no num-examples": _drop_metric(NUM_EXAMPLES),
    "no personalized metric": _drop_metric("personalized.accuracy"),
    "scalar named personalized": _metric("personalized", 0.9),
    "unknown block": _metric("hacked.accuracy", 0.9),
    "unknown metric": _metric("personalized.hacked", 0.9),
    "list-valued metric": _metric("global.accuracy", [0.1]),
    "inf metric": _metric("personalized.accuracy", float("inf")),
    "num-examples inf": _metric(NUM_EXAMPLES, float("inf")),
    "num-examples 1e300": _metric(NUM_EXAMPLES, 1e300),
    "num-examples over the partition": _metric(NUM_EXAMPLES, 11),
    "spoofed honest id": _spoof_honest,
    "stray node": _stray_node,
    "too many metrics": _many_metrics,
    "details rank scalar": _details('{"rank": 5}'),
    "details deep": _details("[" * 100_000 + "]" * 100_000),
    "details not json": _details("{rank:"),
    "details nan": _details('{"rank": {"effective": NaN}}'),
    "details list": _details("[1, 2]"),
    "details unknown key": _details('{"rank": {}, "secrets": 1}'),
    "details huge": _details('{"rank": {"modules": {"m": "' + "x" * (2 << 20) + '"}}}'),
    "details extra key": _details_extra_key,
}


class FuzzGrid(FakeGrid):
    """FakeGrid whose BAD clients send a malformed reply each time, drawn from the mutators."""

    def __init__(self, nodes: dict[int, int], seed: int) -> None:
        super().__init__(nodes)
        self.rng = random.Random(seed)
        self.applied: list[tuple[str, int, str]] = []  # (phase, round, mutator)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Reply]:
        messages = list(messages)
        rounds = {m.metadata.dst_node_id: int(m.content["config"].get("server-round", 0)) for m in messages}
        out = []
        for reply in super().send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            phase = str(next(m.metadata.message_type for m in messages if m.metadata.dst_node_id == node))
            if self.nodes[node] in BAD and phase != MessageType.QUERY:
                table = TRAIN_MUTATORS if phase == MessageType.TRAIN else EVAL_MUTATORS
                name = self.rng.choice(sorted(table))
                reply = table[name](reply, self.rng)
                self.applied.append((phase, rounds[node], name))
            out.append(reply)
        return out


def fuzz_strategy(tmp_path: Path, name: str, rounds: int) -> tuple[CommonAdapterFedAvg, Any]:
    exp = experiment(
        "homlora",
        f"rounds={rounds} federation.fraction_train=1.0 federation.min_train_clients=2 "
        "federation.max_update_norm=5 federation.num_examples_mismatch=reject",
    )
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), name))
    strategy.known_examples = dict(KNOWN)
    strategy.start_state(initial_common(exp), dict(NODES))
    return strategy, exp


def test_fuzzed_replies_never_crash_and_never_move_the_aggregate(tmp_path: Path) -> None:
    """60 rounds; clients 2 and 3 send a malformed train and evaluate reply every round (240 in
    all); the run equals, bit for bit, one in which they never replied."""
    rounds = 60
    fuzzed, exp = fuzz_strategy(tmp_path, "fuzz", rounds)
    grid = FuzzGrid(dict(NODES), seed=15)
    fuzzed.run_rounds(grid, shared(exp, fuzzed.run.path))  # never raises

    clean, _ = fuzz_strategy(tmp_path, "clean", rounds)
    drop = {(p, r, c) for p in (MessageType.TRAIN, MessageType.EVALUATE) for r in range(1, rounds + 1) for c in BAD}
    clean.run_rounds(FakeGrid(dict(NODES), drop=drop), shared(exp, clean.run.path))

    assert len(grid.applied) == 4 * rounds and len({m for _, _, m in grid.applied}) >= 40  # most mutators drawn
    for key in clean.state:
        assert torch.equal(fuzzed.state[key], clean.state[key]), key
    assert fuzzed.latest_eval == clean.latest_eval
    records = [json.loads(line) for line in (fuzzed.run.path / METRICS_FILE).read_text().splitlines()]
    for record, reference in zip(records, [h.to_json() for h in clean.history], strict=True):
        rnd = record["round"]
        expected = sorted(m for p, r, m in grid.applied if r == rnd)
        eval_errors = [m for m in record["missing"] if m["phase"] == "evaluation" and "client error" in m["reason"]]
        assert len(record["rejected"]) + len(eval_errors) == len(expected), (rnd, expected, record["rejected"])
        for entry in record["rejected"]:
            assert entry["reason"] and len(entry["reason"]) <= 300 and entry["client"].split(" (")[0] in (
                "client 2", "client 3", "client ?"  # ?: a stray node's reply, labelled by its sender
            ), entry  # fmt: skip
        assert record["train"] == reference["train"] and record.get("clients") == reference.get("clients")
        assert record["aggregated"]


# --------------------------------------------------------------------------- one per bound
def one_round(
    tmp_path: Path, grid: FakeGrid, algorithm: str = "homlora", extra: str = "", known: bool = True
) -> tuple[CommonAdapterFedAvg, dict[str, Any]]:
    exp = experiment(algorithm, f"rounds=1 federation.fraction_train=1.0 federation.min_train_clients=1 {extra}")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "bound"))
    if known:
        strategy.known_examples = dict(KNOWN)
    strategy.start_state(initial_common(exp), dict(NODES))
    strategy.run_rounds(grid, shared(exp, strategy.run.path))
    return strategy, json.loads((strategy.run.path / METRICS_FILE).read_text().splitlines()[-1])


def tamper(grid: FakeGrid, client: int, change: Callable[[RecordDict], None], phase: str = MessageType.TRAIN) -> None:
    answer = grid.answer

    def tampered(msg: Message, ph: str, rnd: int, c: int) -> RecordDict:
        content = answer(msg, ph, rnd, c)
        if ph == phase and c == client:
            change(content)
        return content

    grid.answer = tampered  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("inf"), "must be finite"),
        (1e300, "exceeds federation.max_num_examples"),
        (1e308, "exceeds federation.max_num_examples"),
    ],
)
def test_num_examples_infinite_or_huge_is_rejected(tmp_path: Path, value: float, reason: str) -> None:
    grid = FakeGrid(dict(NODES))
    tamper(grid, 3, lambda c: c[METRICS_KEY].__setitem__(NUM_EXAMPLES, value))
    strategy, record = one_round(tmp_path, grid)
    assert [r["client"].split(" (")[0] for r in record["rejected"]] == ["client 3"]
    assert reason in record["rejected"][0]["reason"]
    assert all(torch.isfinite(v).all() and v.abs().max() > 0 for v in strategy.state.values())


def test_num_examples_over_the_partition_is_clipped_or_rejected(tmp_path: Path) -> None:
    grid = FakeGrid(dict(NODES))
    tamper(grid, 3, lambda c: c[METRICS_KEY].__setitem__(NUM_EXAMPLES, 10_000))
    _, record = one_round(tmp_path, grid)  # default: clip to the partition's size
    assert record["rejected"] == [] and record["train"]["3"][NUM_EXAMPLES] == KNOWN[3][0]
    grid = FakeGrid(dict(NODES))
    tamper(grid, 3, lambda c: c[METRICS_KEY].__setitem__(NUM_EXAMPLES, 10_000))
    _, record = one_round(tmp_path / "b", grid, extra="federation.num_examples_mismatch=reject")
    assert "exceeds the 25 examples this client holds" in record["rejected"][0]["reason"]


def test_num_examples_in_deployment_is_held_to_the_first_declared(tmp_path: Path) -> None:
    """Without partition sizes (deployment), a later round may not claim more than round 1 did."""
    exp = experiment("homlora", "rounds=2 federation.fraction_train=1.0 federation.num_examples_mismatch=reject")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "decl"))
    strategy.start_state(initial_common(exp), dict(NODES))
    grid = FakeGrid(dict(NODES))
    answer = grid.answer
    grid.answer = lambda m, ph, rnd, c: (  # type: ignore[method-assign]
        _inflate(answer(m, ph, rnd, c)) if (ph, rnd, c) == (MessageType.TRAIN, 2, 1) else answer(m, ph, rnd, c)
    )
    strategy.run_rounds(grid, shared(exp, strategy.run.path))
    assert strategy.history[0].rejected == []
    assert "exceeds the 15 examples" in strategy.history[1].rejected[0]["reason"]


def _inflate(content: RecordDict) -> RecordDict:
    content[METRICS_KEY][NUM_EXAMPLES] = 1_000
    return content


def test_hetlora_uplink_of_one_rank_fewer_is_norm_bounded(tmp_path: Path) -> None:
    """A HETLoRA client that returns one rank fewer (self-pruning) used to skip the bound."""
    grid = FakeGrid(dict(NODES), prune={3})

    def blow_up(content: RecordDict) -> None:
        arrays = dict(content[ARRAYS_KEY].items())
        key = next(k for k in sorted(arrays) if "lora_B" in k)
        arrays[key] = Array((arrays[key].numpy() * 0 + 1e6).astype(np.float32))
        content[ARRAYS_KEY] = ArrayRecord(arrays)

    tamper(grid, 3, blow_up)
    strategy, record = one_round(tmp_path, grid, "hetlora", "federation.max_update_norm=5")
    assert [r["client"].split(" (")[0] for r in record["rejected"]] == ["client 3"]
    assert "exceeds federation.max_update_norm=5" in record["rejected"][0]["reason"]
    assert all(v.abs().max() < 1e3 for v in strategy.state.values())


def test_hetlora_pruned_components_count_as_moved_to_zero() -> None:
    sent = {"m.lora_A.common.weight": np.ones((3, 2), np.float32)}
    pruned = {"m.lora_A.common.weight": np.ones((2, 2), np.float32)}  # one rank fewer, else unchanged
    assert update_norm(pruned, update_reference(pruned, sent, {})) == pytest.approx(2**0.5)


def test_flora_uplink_is_norm_bounded_against_the_fresh_adapter(tmp_path: Path) -> None:
    """FLoRA's downlink holds stacks, its uplink a fresh LoRA: the bound used to be skipped."""
    grid = FakeGrid(dict(NODES))
    answer = grid.answer

    def fresh_lora(msg: Message, ph: str, rnd: int, c: int) -> RecordDict:
        content = answer(msg, ph, rnd, c)
        if ph != MessageType.TRAIN:
            return content
        exp = experiment("flora")
        common = {k: v.numpy() for k, v in initial_common(exp).items()}
        # an honest client sends the fresh LoRA it drew this round (A from its round seed), untrained here
        drawn = exp.algorithm.update_origin(common, derived_seed(exp.seed, c, rnd))
        scale = 1e4 if c == 3 else 1.0
        up = {k: (v * scale).astype(np.float32) if "lora" in k else v for k, v in drawn.items()}
        content[ARRAYS_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in up.items()})
        return content

    grid.answer = fresh_lora  # type: ignore[method-assign]
    _, record = one_round(tmp_path, grid, "flora", "federation.max_update_norm=5")
    assert [r["client"].split(" (")[0] for r in record["rejected"]] == ["client 3"]
    assert "exceeds federation.max_update_norm=5" in record["rejected"][0]["reason"]
    assert record["clients_trained"] == 3  # the honest fresh adapters (norm 0 from their round's draw) pass
    assert all(t["update_norm"] == 0.0 for t in record["train"].values())


def test_update_beyond_the_bound_is_clipped_when_configured(tmp_path: Path) -> None:
    grid = FakeGrid(dict(NODES))
    tamper(grid, 3, lambda c: c.__setitem__(ARRAYS_KEY, ArrayRecord(
        {k: Array((a.numpy() + 100.0).astype(np.float32)) for k, a in c[ARRAYS_KEY].items()})))  # fmt: skip
    strategy, record = one_round(
        tmp_path, grid, extra="federation.max_update_norm=5 federation.update_norm_action=clip"
    )
    assert record["rejected"] == [] and record["clients_trained"] == 4
    ref = {k: v.numpy() for k, v in initial_common(experiment("homlora")).items()}
    moved = {k: v.numpy() for k, v in strategy.state.items()}
    assert update_norm(moved, ref) < 5.0  # the clipped client moves the mean by at most 5 * its weight


def test_clip_update_scales_the_update_to_the_bound() -> None:
    ref = {"a": np.zeros(4, np.float32)}
    out = clip_update({"a": np.full(4, 3.0, np.float32)}, ref, 3.0)  # norm 6 -> 3
    assert np.allclose(out["a"], 1.5) and update_norm(out, ref) == pytest.approx(3.0)


def test_robust_aggregators_ignore_a_poisoned_minority(tmp_path: Path) -> None:
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([1e9, -1e9])}]
    assert torch.equal(ROBUST["median"](states, [1.0] * len(states), 0.0)["w"], torch.tensor([3.0, 2.0]))
    five = [*states, {"w": torch.tensor([2.0, 3.0])}, {"w": torch.tensor([-1e9, 1e9])}]
    assert torch.allclose(ROBUST["trimmed_mean"](five, [1.0] * len(five), 0.2)["w"], torch.tensor([2.0, 3.0]))
    grid = FakeGrid(dict(NODES))
    tamper(grid, 3, lambda c: c.__setitem__(ARRAYS_KEY, ArrayRecord(
        {k: Array((a.numpy() + 3.0).astype(np.float32)) for k, a in c[ARRAYS_KEY].items()})))  # fmt: skip
    strategy, _ = one_round(tmp_path, grid, extra="federation.aggregator=median")
    assert all(v.abs().max() < 3.0 for v in strategy.state.values())  # the +3 client is outvoted


def test_robust_aggregator_with_an_own_rule_algorithm_is_a_config_error() -> None:
    from pf2lora_core.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"federation\.aggregator: median needs an algorithm that averages"):
        experiment("hetlora", "federation.aggregator=median")


def test_hetlora_sparsity_weights_are_capped() -> None:
    from pf2lora_core.algorithms.hetlora import sparsity_weighted_mean

    a, b = "m.lora_A.common.weight", "m.lora_B.common.weight"
    ups = [{a: torch.ones(1, 2), b: torch.ones(2, 1)} for _ in range(3)] + [
        {a: torch.ones(1, 2), b: torch.full((2, 1), 1e6)}
    ]
    capped = sparsity_weighted_mean(ups, 1, [1.0] * 4, max_weight_ratio=4.0)[b]
    # norms 2, 2, 2, 2e6 -> weights 2, 2, 2, 8 (capped): B = (3 * 1 + 8/2 * 1e6 ... ) / 14 per unit weight
    expected = (2 * 1 * 3 + 8 * 1e6) / 14
    assert torch.allclose(capped, torch.full((2, 1), expected))
    assert sparsity_weighted_mean(ups, 1, [1.0] * 4)[b].max() > 0.99e6  # uncapped: the big one is the aggregate


# --------------------------------------------------------------------------------- identity
def test_claimed_id_collision_is_rejected_and_logged(tmp_path: Path, caplog: Any) -> None:
    """A node claiming the id of an offline site is refused; the real site is taken back when it returns."""
    exp = experiment("homlora", "rounds=2 federation.fraction_train=1.0")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "claim"))
    strategy.start_state(initial_common(exp), dict(NODES))
    grid = FakeGrid(dict(NODES))
    real = next(n for n, c in NODES.items() if c == 2)
    del grid.nodes[real]  # site 2 is offline
    grid.nodes[666] = 2  # an impostor claims it
    grid.kill_at = (MessageType.EVALUATE, 1)
    with caplog.at_level(logging.WARNING, logger="pf2lora.server"), pytest.raises(Exception, match="killed"):
        strategy.run_rounds(grid, shared(exp, strategy.run.path))
    assert 666 not in strategy.clients and strategy.clients[real] == 2
    assert (
        f"node 666 claims client 2, which node {real} holds (offline; federation.rebind_clients=false)" in caplog.text
    )
    assert all(c != 2 for p, r, c in grid.sent if p == MessageType.TRAIN)


def test_node_keys_bind_identity_to_public_keys(tmp_path: Path, caplog: Any) -> None:
    keys = {n: f"ecdsa-key-of-node-{n}".encode() for n in NODES}

    class KeyGrid(FakeGrid):
        def get_nodes(self) -> list[SimpleNamespace]:
            return [SimpleNamespace(node_id=n, public_key=keys.get(n, b"")) for n in self.nodes]

    import hashlib

    mapping = {hashlib.sha256(keys[n]).hexdigest(): c for n, c in NODES.items() if c != 3}
    mapping[keys[next(n for n, c in NODES.items() if c == 3)].decode()] = 3  # the key's text works too
    exp = experiment("homlora", "rounds=1 federation.fraction_train=1.0")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "keys"))
    strategy.node_keys = mapping
    strategy.start_state(initial_common(exp), {})
    liar = next(n for n, c in NODES.items() if c == 1)
    grid = KeyGrid({**NODES, liar: 0})  # node of client 1's key claims partition 0
    with caplog.at_level(logging.WARNING, logger="pf2lora.server"):
        strategy.run_rounds(grid, shared(exp, strategy.run.path))
    assert sorted(strategy.clients.values()) == [0, 2, 3]
    assert f"node {liar} claims client 0 but its public key is client 1's" in caplog.text


def test_node_that_never_identifies_is_backed_off(tmp_path: Path, caplog: Any) -> None:
    class Silent(FakeGrid):
        queries: int = 0

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Reply]:
            messages = list(messages)
            self.queries += sum(1 for m in messages if m.metadata.dst_node_id == 4040)
            return [r for r in super().send_and_receive(
                [m for m in messages if m.metadata.dst_node_id != 4040], timeout=timeout)]  # fmt: skip

    exp = experiment("homlora", "rounds=6 federation.fraction_train=1.0")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "silent"))
    nodes = {n: c for n, c in NODES.items() if c != 3}
    strategy.start_state(initial_common(exp), nodes)
    grid = Silent({**nodes, 4040: 3})
    with caplog.at_level(logging.WARNING, logger="pf2lora.server"):
        strategy.run_rounds(grid, shared(exp, strategy.run.path))
    assert grid.queries == 3  # asked in rounds 1, 2 and 4 (backoff 1, 2, 4), not twice in each of 6 rounds
    assert "node 4040 did not identify itself; not sampled, asked again in round 2" in caplog.text


# ---------------------------------------------------------------------------- failed rounds
def test_run_whose_every_client_fails_in_round_1_stops_with_the_error(tmp_path: Path) -> None:
    grid = FakeGrid(dict(NODES))
    grid.answer = lambda *a: (_ for _ in ()).throw(AssertionError)  # type: ignore[method-assign]  (unused)
    grid.unavailable = {(MessageType.TRAIN, 1, c) for c in range(4)}
    exp = experiment("homlora", "rounds=3")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "fail"))
    strategy.start_state(initial_common(exp), dict(NODES))
    with pytest.raises(
        RunFailedError,
        match=r"round 1: every client failed in the first round .* unavailable: Error: Node Unavailable",
    ):
        strategy.run_rounds(grid, shared(exp, strategy.run.path))
    record = json.loads((strategy.run.path / METRICS_FILE).read_text().splitlines()[-1])
    assert record["round"] == 1 and not record["aggregated"]  # the failed round is still on record
    assert not any(p == MessageType.TRAIN and r > 1 for p, r, _ in grid.sent)


def test_failed_rounds_after_success_stop_after_max_failed_rounds(tmp_path: Path) -> None:
    drop = {(MessageType.TRAIN, r, c) for r in (2, 3) for c in range(4)}
    exp = experiment("homlora", "rounds=5 federation.fraction_train=1.0 federation.max_failed_rounds=2")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "later"))
    strategy.start_state(initial_common(exp), dict(NODES))
    grid = FakeGrid(dict(NODES), drop=drop)
    with pytest.raises(
        RunFailedError, match=r"round 3: every client failed in 2 round\(s\) in a row .*no training reply"
    ):
        strategy.run_rounds(grid, shared(exp, strategy.run.path))
    assert [h.round for h in strategy.history] == [1, 2, 3]


# ------------------------------------------------------------------------------ audit, blocks
def test_audit_runs_after_the_structure_checks_and_survives_undecodable_bytes(tmp_path: Path) -> None:
    grid = FakeGrid(dict(NODES))

    def garbage(content: RecordDict) -> None:
        arrays = dict(content[ARRAYS_KEY].items())
        key = sorted(arrays)[0]
        a = arrays[key]
        arrays[key] = Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=b"\x93NUMPY garbage")
        content[ARRAYS_KEY] = ArrayRecord(arrays)

    tamper(grid, 3, garbage)
    strategy, record = one_round(tmp_path, grid, extra="federation.audit_replies=true")
    assert "do not decode as a plain array" in record["rejected"][0]["reason"]
    audit = sorted(p.name for p in (strategy.run.path / "audit" / "round_0001").iterdir())
    bad_node = next(n for n, c in NODES.items() if c == 3)
    assert f"train_node{bad_node}.safetensors" not in audit  # never decoded, never kept
    assert sum(name.startswith("train_node") and name.endswith(".safetensors") for name in audit) == 3
    assert sum(name.startswith("evaluate_node") for name in audit) == 4


def test_validation_block_and_balanced_accuracy_are_accepted(tmp_path: Path) -> None:
    """i12a's ``validation`` block (same shape as ``personalized``) passes the allow-list."""
    grid = FakeGrid(dict(NODES))

    def with_validation(content: RecordDict) -> None:
        content[METRICS_KEY]["validation.accuracy"] = 0.7
        content[METRICS_KEY]["validation.balanced_accuracy"] = 0.6

    tamper(grid, 1, with_validation, phase=MessageType.EVALUATE)
    strategy, record = one_round(tmp_path, grid)
    assert not [r for r in record["rejected"] if r.get("phase") == "evaluation"]
    assert strategy.latest_eval[1]["validation"] == {"accuracy": 0.7, "balanced_accuracy": 0.6}


def test_start_returns_flowers_result(tmp_path: Path) -> None:
    """The round loop is Flower's ``Strategy.start``: a ``Result`` with the final arrays and the
    per-round train / evaluate MetricRecords (``aggregate_evaluate`` returns one)."""
    from flwr.serverapp.strategy import Result

    exp = experiment("homlora", "rounds=2 federation.fraction_train=1.0")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "start"))
    strategy.clients = dict(NODES)
    initial = ArrayRecord(initial_common(exp))
    result = strategy.start(FakeGrid(dict(NODES)), initial, num_rounds=2, timeout=60,
                            train_config=shared(exp, strategy.run.path))  # fmt: skip
    assert isinstance(result, Result) and sorted(result.train_metrics_clientapp) == [1, 2]
    assert result.evaluate_metrics_clientapp[2]["personalized.mean"] == pytest.approx(
        strategy.history[1].kinds["personalized"].mean
    )
    for key, value in result.arrays.to_torch_state_dict().items():
        assert torch.equal(value, strategy.state[key])


def test_stray_node_at_start_is_ignored_not_fatal(tmp_path: Path, caplog: Any) -> None:
    """One stray node used to abort the run at start; now it is logged and ignored."""
    exp = experiment("homlora", "rounds=1 federation.fraction_train=1.0")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "stray"))
    strategy.start_state(initial_common(exp), {})  # as the ServerApp does: nodes identified in round 1
    with caplog.at_level(logging.WARNING, logger="pf2lora.server"):
        strategy.run_rounds(FakeGrid({**NODES, 5555: 99}), shared(exp, strategy.run.path))
    assert sorted(strategy.clients.values()) == [0, 1, 2, 3] and 5555 not in strategy.clients
    assert "node 5555 claims partition 99, outside [0, num_clients=4)" in caplog.text
    assert strategy.history[0].clients_trained == 4


def test_a_node_silent_to_its_identity_query_holds_the_round_only_query_timeout_s(tmp_path: Path) -> None:
    """Issue 28: a node online but never answering its QUERY made every round wait 600 s; now the
    wait is federation.query_timeout_s (at most round_timeout_s) and the round goes on without it."""
    waits: list[float | None] = []

    class SilentGrid(FakeGrid):
        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Any]:
            messages = list(messages)
            if messages and str(messages[0].metadata.message_type) == MessageType.QUERY:
                waits.append(timeout)
            return super().send_and_receive(messages, timeout=timeout)

    silent = ("query", 0, 3)  # client 3's node never answers who it is
    exp = experiment("homlora", "rounds=1 federation.fraction_train=1.0 federation.query_timeout_s=7")
    strategy = make_strategy(exp, new_run_dir(str(tmp_path), "silent"))
    strategy.start_state(initial_common(exp), {})
    strategy.run_rounds(SilentGrid(dict(NODES), drop={silent}), shared(exp, strategy.run.path))
    assert waits and set(waits) == {7.0}
    assert strategy.history[0].clients_trained == 3 and 3 not in strategy.history[0].train
