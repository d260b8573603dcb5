"""Common-adapter FedAvg: a Flower strategy that averages the common level and nothing else.

Objective (PF2LoRA, docs/DESIGN.md, "Server averaging"): ``x <- sum_k n_k x_k / sum_k n_k`` over the
common adapters ``x_k`` the clients return, ``n_k`` their trusted numbers of training examples;
private adapters never reach the server. The rule itself is the algorithm's
(``Algorithm.server_update``) or a robust one named by ``federation.aggregator``
(``pf2lora_core.algorithms.aggregation``); this class is the Flower glue around Flower-free parts:

- ``pf2lora_core.federation.nodes.NodeDirectory``: node id -> client binding (identity queries,
  node keys, back-off), and sampling by *client* with a seeded RNG (node ids differ per run);
- ``pf2lora_core.federation.replies.ReplyChecker``: each reply becomes a typed train / evaluate
  reply or a rejection with its reason, so no reply can stop the server;
- ``pf2lora_core.federation.rounds.RoundLog``: the round record, a ``metrics.jsonl`` line.

A round completes with the replies that arrived within ``round_timeout_s`` when at least
``min_train_clients`` are valid; every missing reply is logged; rounds in which every client failed
stop the run (``federation.max_failed_rounds``) with the first client's error; after every round
the whole server state is checkpointed (``pf2lora_core.federation.checkpoint``) so ``resume=<run dir>``
continues the run. ``start`` is Flower's loop with one change: it can begin after a checkpoint's
round (Flower's ``Strategy.start`` always begins at round 1).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from pf2lora_core.algorithms import Algorithm
from pf2lora_core.algorithms.aggregation import MEAN, ROBUST
from pf2lora_core.config.keys import ARRAYS_KEY, GLOBAL, METRICS_KEY, NUM_EXAMPLES, PERSONALIZED, TRAIN_LOSS, VALIDATION
from pf2lora_core.config.schema import FederationConfig
from pf2lora_core.federation.availability import CLIENT_UNAVAILABLE
from pf2lora_core.federation.checkpoint import (
    SERVER_STATE_DIR,
    ServerCheckpoint,
    algorithm_state,
    capture_rng,
    restore_algorithm_state,
    restore_rng,
)
from pf2lora_core.federation.checks import truncate
from pf2lora_core.federation.nodes import NodeDirectory
from pf2lora_core.federation.protocol import CLIENT_KEY, TRAINED_BEFORE_KEY
from pf2lora_core.federation.replies import (
    Reply,
    ReplyChecker,
    ReplyLimits,
    ReplyRejectedError,
    rejection_reason,
    stale_reason,
)
from pf2lora_core.federation.rounds import RoundLog, trained_before
from pf2lora_core.run.console import progress
from pf2lora_core.run.records import STATS, RoundRecord
from pf2lora_core.run.run_dir import RunDir
from pf2lora_core.training.runtime import derived_seed

__all__ = ["CommonAdapterFedAvg", "RoundLog", "RoundPlan", "RunFailedError"]

log = logging.getLogger("pf2lora.server")
SERVER_ROUND_KEY = "server-round"  # Flower's key for the round in train / evaluate configs


class RunFailedError(RuntimeError):
    """Rounds in a row in which every client failed: the run cannot succeed as set up."""


@dataclass(frozen=True)
class RoundPlan:
    """What the rounds are: how many, when to evaluate, on which metric, the run's seed and resolved config."""

    num_rounds: int
    eval_every: int = 1
    metric: str = "accuracy"
    seed: int = 0
    config_yaml: str = ""
    num_labels: int | None = None  # the classification head's size (a shared label histogram's length)

    def evaluates(self, server_round: int) -> bool:
        return server_round % self.eval_every == 0 or server_round == self.num_rounds


def reply_data(msg: Message) -> Reply:
    """A Flower reply as plain data for the checks (array bytes are decoded only on demand, never unpickled)."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return Reply(node, error=str(msg.error.reason))
    content = msg.content
    arrays = {
        name: {k: (tuple(a.shape), a.dtype, a.numpy) for k, a in record.items()}
        for name, record in content.array_records.items()
    }
    metrics = {name: dict(record) for name, record in content.metric_records.items()}
    configs = {name: dict(record) for name, record in content.config_records.items()}
    return Reply(node, arrays=arrays, metrics=metrics, configs=configs)


class CommonAdapterFedAvg(FedAvg):
    """Flower's FedAvg, aggregating the common adapter by the algorithm's rule, every reply checked first.

    Parameters
    ----------
    algorithm : Algorithm
        Its ``downlink`` / ``server_update`` / ``check_uplink`` define what is sent and averaged.
    run : RunDir
        Where rounds, checkpoints and audits go.
    federation : FederationConfig
        Sampling fractions, bounds on replies, timeouts, identity (the ``federation`` config section).
    plan : RoundPlan
        Rounds, evaluation cadence, metric, seed, resolved config.
    known_examples : dict, optional
        Client -> (train, test) sizes the server knows (simulation), which bound what clients declare.
    """

    def __init__(
        self,
        *,
        algorithm: Algorithm,
        run: RunDir,
        federation: FederationConfig,
        plan: RoundPlan,
        known_examples: dict[int, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=federation.fraction_train,
            fraction_evaluate=federation.fraction_evaluate,
            min_train_nodes=federation.min_train_clients,
            min_evaluate_nodes=1 if federation.fraction_evaluate > 0 else 0,
            min_available_nodes=federation.num_clients,
            weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key="config",
        )
        self.algorithm, self.run, self.fed, self.plan = algorithm, run, federation, plan
        self.nodes = NodeDirectory(federation.num_clients, plan.seed, federation.node_keys, federation.rebind_clients)
        self.checker = ReplyChecker(
            ReplyLimits.of(federation),
            plan.metric,
            algorithm.check_uplink,
            known_examples,
            algorithm.pooled_training,
            plan.num_labels,
        )
        self.current: RoundLog | None = None
        self.state: dict[str, torch.Tensor] = {}  # the algorithm's server state (set by start_state)
        self.fresh: dict[str, np.ndarray] = {}  # the seeded initial common level (FLoRA's fresh LoRA)
        self.sent: dict[int, dict[str, np.ndarray]] = {}  # node id -> arrays sent this round
        self.outbox: dict[int, Message] = {}  # node id -> message sent (Flower sets its id on push)
        self.latest_eval: dict[int, dict[str, Any]] = {}
        # the end of the run: every client (or federation.final_eval_clients) at the final common adapter
        self.final_clients: list[int] = []  # sent the final evaluation
        self.final_eval: dict[int, dict[str, Any]] = {}  # those that answered it: the summary's clients
        self.history: list[RoundRecord] = []
        self.query_config = ConfigRecord()  # what a node needs to answer its identity query (set by start)
        self.t0 = time.time()
        self.elapsed_before = 0.0  # seconds of the rounds run before a resume
        self.failed_rounds = 0  # consecutive rounds without any valid reply
        self.round_now = 0
        self.round_timeout_s = federation.round_timeout_s  # (``start`` takes Flower's ``timeout``)

    # the directory's and checker's state, as attributes of the strategy (tests and resume read them)
    @property
    def clients(self) -> dict[int, int]:
        return self.nodes.clients

    @clients.setter
    def clients(self, value: dict[int, int]) -> None:
        self.nodes.clients = dict(value)

    @property
    def sampler(self) -> Any:
        return self.nodes.sampler

    @property
    def known_examples(self) -> dict[int, tuple[int, int]]:
        return self.checker.known_examples

    @known_examples.setter
    def known_examples(self, value: dict[int, tuple[int, int]]) -> None:
        self.checker.known_examples = dict(value)

    @property
    def node_keys(self) -> dict[str, int]:
        return self.nodes.node_keys

    @node_keys.setter
    def node_keys(self, value: dict[str, int]) -> None:
        self.nodes.node_keys = dict(value)

    def start_state(self, common: dict[str, torch.Tensor], clients: dict[int, int]) -> ArrayRecord:
        """Set the node -> client map and the algorithm's initial server state; returns the latter."""
        self.clients = clients
        self.fresh = {k: v.detach().cpu().numpy() for k, v in common.items()}
        self.state = self.algorithm.server_init(common)
        return ArrayRecord(self.state)

    # ------------------------------------------------------------------------------ rounds
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
        first_round: int = 1,
    ) -> Result:
        """Flower's ``Strategy.start`` from ``first_round`` (a resumed run: the round after its checkpoint).

        ``initial_arrays`` seeds the state unless ``start_state`` (and ``restore``) set it already.
        ``evaluate_fn`` is not used: every evaluation here is the clients' own, on their own splits.
        """
        if not self.state:
            self.start_state(initial_arrays.to_torch_state_dict(), self.clients)
        self.plan = dataclasses.replace(self.plan, num_rounds=num_rounds)
        self.round_timeout_s = timeout
        return self.run_rounds(grid, train_config or ConfigRecord(), first_round, evaluate_config)

    def run_rounds(
        self, grid: Grid, shared: ConfigRecord, first_round: int = 1, evaluate_config: ConfigRecord | None = None
    ) -> Result:
        """Rounds ``first_round..num_rounds``; ``RunFailedError`` (after recording the round) when the
        run cannot succeed (see ``_stop_if_failed``)."""
        self.query_config = ConfigRecord(dict(shared))
        result = Result()
        timeout = self.round_timeout_s
        for server_round in range(first_round, self.plan.num_rounds + 1):
            messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord(dict(shared)), grid)
            _, train_metrics = self.aggregate_train(server_round, grid.send_and_receive(messages, timeout=timeout))
            self._stop_if_failed(server_round)
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            config = ConfigRecord(dict(evaluate_config if evaluate_config is not None else shared))
            messages = self.configure_evaluate(server_round, ArrayRecord(), config, grid)
            eval_metrics = self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_metrics
        result.arrays = ArrayRecord(self.state)
        return result

    def _stop_if_failed(self, server_round: int) -> None:
        """Count a round in which every client failed; stop the run when it cannot succeed: after
        ``max_failed_rounds`` such rounds in a row, or at once while the run never aggregated."""
        cur = self.current
        assert cur is not None
        if cur.train:
            self.failed_rounds = 0
            return
        self.failed_rounds += 1
        never = not any(h.aggregated for h in self.history)
        if self.failed_rounds < self.fed.max_failed_rounds and not never:
            return
        first = (cur.rejected or cur.missing or [{"client": "no client", "reason": "no client was sampled"}])[0]
        self._record_round()
        why = "the first round of the run" if never else f"{self.failed_rounds} round(s) in a row"
        raise RunFailedError(
            f"round {server_round}: every client failed in {why} (federation.max_failed_rounds="
            f"{self.fed.max_failed_rounds}); first error: {first['client']}: {first['reason']}"
        )

    # ------------------------------------------------------------------------------ nodes
    def connected_clients(self, grid: Grid) -> list[int]:
        """Clients whose node is connected now, in order; new nodes are identified first.

        Waits up to ``wait_for_nodes_s`` for all ``num_clients`` (a SuperNode restarting after a
        crash rejoins), then goes on with the clients there are.
        """
        deadline = time.time() + self.fed.wait_for_nodes_s
        while True:
            connected = set(grid.get_node_ids())
            due = self.nodes.due(self.nodes.unknown(connected), connected, self.round_now)
            if due:
                timeout = min(self.fed.query_timeout_s, self.round_timeout_s)
                claims = query_partition_ids(grid, due, self.query_config, timeout)
                keys = node_key_fingerprints(grid, due) if self.node_keys else {}
                self.nodes.record_answers(due, claims, connected, self.round_now, keys)
            clients = self.nodes.connected_clients(connected)
            if len(clients) >= self.fed.num_clients or time.time() > deadline:
                return clients
            time.sleep(1.0)

    def _messages(self, clients: list[int], config: ConfigRecord, server_round: int, kind: str) -> list[Message]:
        """One message per sampled client: the algorithm's downlink for that client, and ``config``.

        Training messages add their arrays' size to the round's downlink (evaluation sends the same
        arrays again and is not part of the training cost). Each message also says the last round
        this client's reply was aggregated (0 = never), so a client whose private level is lost
        can tell that it is lost.
        """
        assert self.current is not None
        out = []
        for client in clients:
            node = self.nodes.node_of(client)
            assert node is not None
            record = ArrayRecord(self.algorithm.downlink(self.state, client))
            self.sent[node] = {k: v.numpy() for k, v in record.items()}
            before = trained_before(self.history, client)
            cfg = ConfigRecord({**dict(config), SERVER_ROUND_KEY: server_round, TRAINED_BEFORE_KEY: before})
            out.append(Message(RecordDict({ARRAYS_KEY: record, "config": cfg}), dst_node_id=node, message_type=kind))
            self.outbox[node] = out[-1]
            if kind == MessageType.TRAIN:
                self.current.bytes_down += record.count_bytes()
        return out

    # ----------------------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current, self.round_now = RoundLog(round=server_round), server_round
        self.sent, self.outbox = {}, {}
        available = self.connected_clients(grid)
        if len(available) < self.fed.min_train_clients:
            raise RuntimeError(
                f"round {server_round}: {len(available)} client(s) connected and identified after "
                f"{self.fed.wait_for_nodes_s:.0f} s, fewer than "
                f"federation.min_train_clients={self.fed.min_train_clients}"
            )
        if len(available) < self.fed.num_clients:
            missing = sorted(set(range(self.fed.num_clients)) - set(available))
            log.warning("round %d: clients %s are not connected; training without them", server_round, missing)
        if self.algorithm.pooled_training:  # the centralized reference trains on one node
            clients = self.nodes.sample(available, 0.0, 1)
        else:
            clients = self.nodes.sample(available, self.fraction_train, self.fed.min_train_clients)
        messages = self._messages(clients, config, server_round, MessageType.TRAIN)
        log.info("round %d/%d: training on %d clients", server_round, self.plan.num_rounds, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        cur = self.current
        assert cur is not None
        valid: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        replied: set[int] = set()
        for msg in replies:
            try:
                node = self._source(msg)
                replied.add(node)
                if unavailable(msg):  # offline (the SuperLink says so) or a simulated drop-out: missing
                    self._missing(server_round, node, "training", truncate(f"unavailable: {msg.error.reason}"))
                    continue
                self._check_answers(msg)
                reply = reply_data(msg)
                audit = functools.partial(self._audit, server_round, "train", node, msg)
                client = self.clients.get(reply.node)
                started = time.perf_counter()
                try:
                    accepted = self.checker.train(
                        reply, client, self.sent.get(reply.node), self._origin(client, server_round), set(valid),
                        audit if self.fed.audit_replies else None,
                    )  # fmt: skip
                finally:
                    cur.check_s += time.perf_counter() - started
            except Exception as err:  # every reply is a candidate, never a crash
                self._reject(server_round, msg, rejection_reason(err))
                continue
            valid[accepted.client] = ({k: torch.from_numpy(v) for k, v in accepted.arrays.items()}, accepted.weight)
            cur.train[accepted.client] = {**accepted.metrics, NUM_EXAMPLES: accepted.weight}
            cur.bytes_up += msg.content[ARRAYS_KEY].count_bytes()
        self._log_missing(server_round, "training", replied)
        return self._aggregate(server_round, valid)

    def _aggregate(
        self, server_round: int, valid: dict[int, tuple[dict[str, torch.Tensor], float]]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new common level from the accepted replies, in client order (reproducible float sums)."""
        cur = self.current
        assert cur is not None
        clients = sorted(valid)
        states, weights = [valid[c][0] for c in clients], [valid[c][1] for c in clients]
        cur.train = {c: cur.train[c] for c in clients}
        required = 1 if self.algorithm.pooled_training else self.fed.min_train_clients
        if len(states) < required:
            log.warning(
                "round %d: %d valid replies < federation.min_train_clients=%d; common adapter unchanged",
                server_round, len(states), required,
            )  # fmt: skip
            return None, None
        if self.fed.aggregator == MEAN:
            self.state = self.algorithm.server_update(self.state, states, weights, clients)
        else:  # like-shaped common adapters only (config validation refuses other algorithms)
            self.state = ROBUST[self.fed.aggregator](states, weights, self.fed.trim_fraction)
        cur.aggregated = True
        self.run.save_common(server_round, self.state)
        return ArrayRecord(self.state), MetricRecord({TRAIN_LOSS: float(cur.train_loss() or 0.0)})

    # -------------------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent, self.outbox = {}, {}
        if server_round == self.plan.num_rounds:
            return self._messages(self._final_clients(grid, server_round), config, server_round, MessageType.EVALUATE)
        if not self.plan.evaluates(server_round) or self.fraction_evaluate == 0:
            return []
        clients = self.nodes.sample(self.connected_clients(grid), self.fraction_evaluate, 1)
        return self._messages(clients, config, server_round, MessageType.EVALUATE)

    def _final_clients(self, grid: Grid, server_round: int) -> list[int]:
        """Every connected client (``federation.final_eval_clients`` = 0), else a seeded sample of that size."""
        available = self.connected_clients(grid)
        size = self.fed.final_eval_clients
        clients = available if size == 0 or size >= len(available) else self.nodes.sample(available, 0.0, size)
        log.info("round %d: final evaluation of %d clients at the final common adapter", server_round, len(clients))
        self.final_clients = list(clients)
        return clients

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        cur = self.current
        assert cur is not None
        replied: set[int] = set()
        for msg in replies:
            try:
                node = self._source(msg)
                replied.add(node)
                if msg.has_error():
                    self._missing(server_round, node, "evaluation", truncate(f"client error: {msg.error.reason}"))
                    continue
                self._check_answers(msg)
                reply = reply_data(msg)
                started = time.perf_counter()
                try:
                    accepted = self.checker.evaluate(
                        reply, self.clients.get(reply.node), reply.node in self.sent, set(cur.evaluation)
                    )
                finally:
                    cur.check_s += time.perf_counter() - started
                self._audit(server_round, "evaluate", reply.node, msg)
            except Exception as err:  # every reply is a candidate, never a crash
                self._reject(server_round, msg, rejection_reason(err), phase="evaluation")
                continue
            cur.evaluation[accepted.client] = accepted.entry
        self._log_missing(server_round, "evaluation", replied)
        cur.evaluation = dict(sorted(cur.evaluation.items()))
        self.latest_eval.update(cur.evaluation)
        if server_round == self.plan.num_rounds:
            self.final_eval = dict(cur.evaluation)
        record = self._record_round()
        self.checkpoint(server_round).save(self.run.path / SERVER_STATE_DIR)
        log.info(
            "round %d/%d done in %.1fs | %s | train loss %.4f | %s | rejected %d", server_round, self.plan.num_rounds,
            record.seconds, progress(record.elapsed, server_round, self.plan.num_rounds),
            _nan(record.train_loss), self._eval_line(record), len(record.rejected),
        )  # fmt: skip
        if not record.evaluated:
            return None
        return MetricRecord(
            {f"{kind}.{stat}": getattr(record.kinds[kind], stat) for kind in (PERSONALIZED, GLOBAL) for stat in STATS}
        )

    # -------------------------------------------------------------------------- the round's record
    def _record_round(self) -> RoundRecord:
        """The current round's metrics.jsonl line, appended to the history and the run directory."""
        assert self.current is not None
        record = self.current.record(self.elapsed_before + time.time() - self.t0, self.plan.metric)
        self.history.append(record)
        self.run.append_metrics(record)
        return record

    def _reject(self, server_round: int, msg: Message, reason: str, phase: str = "") -> None:
        assert self.current is not None
        label = self._label(msg)
        entry = self.current.reject(label, reason, phase)
        log.warning("round %d: excluded %sreply from %s: %s", server_round, f"{phase} " if phase else "", label,
                    entry["reason"])  # fmt: skip

    def _label(self, msg: Message) -> str:
        """``client K (node N)`` from the server's own node map (never from the reply's claim)."""
        try:
            return self.nodes.label(self._source(msg))
        except Exception:  # (a reply without usable metadata still gets a label)
            return "client ? (node ?)"

    def _source(self, msg: Message) -> int:
        """The node a reply is about: its sender, or for errors the SuperLink generates on a node's
        behalf (node unavailable), the node the original message went to."""
        reply_to = getattr(msg.metadata, "reply_to_message_id", "")
        if reply_to:
            for node, sent in self.outbox.items():
                if sent.metadata.message_id == reply_to:
                    return node
        return int(msg.metadata.src_node_id)

    def _origin(self, client: int | None, server_round: int) -> Mapping[str, np.ndarray]:
        """What ``client``'s uplink tensors that the downlink lacks start from (``Algorithm.update_origin``)."""
        if client is None:
            return self.fresh  # an unidentified node: rejected by the checks before any norm
        return self.algorithm.update_origin(self.fresh, derived_seed(self.plan.seed, client, server_round))

    def _check_answers(self, msg: Message) -> None:
        """A reply counts only for the message this round sent to its node (not a replayed or stale one)."""
        if msg.has_error():
            return  # the SuperLink's errors come on a node's behalf; _source maps them by reply_to
        sent_ids = {node: m.metadata.message_id for node, m in self.outbox.items()}
        reply_to = str(getattr(msg.metadata, "reply_to_message_id", "") or "")
        reason = stale_reason(int(msg.metadata.src_node_id), reply_to, sent_ids)
        if reason is not None:
            raise ReplyRejectedError(reason)

    def _log_missing(self, server_round: int, phase: str, replied: set[int]) -> None:
        """Log (and record) every node sent a message this round that did not reply in time."""
        assert self.current is not None
        for node in sorted(set(self.sent) - replied):
            reason = f"no {phase} reply within federation.round_timeout_s={self.round_timeout_s:g} s"
            self._missing(server_round, node, phase, reason)

    def _missing(self, server_round: int, node: int, phase: str, reason: str) -> None:
        """Record (and log) that ``node`` sent no usable ``phase`` reply this round, and why."""
        assert self.current is not None
        log.warning("round %d: %s: %s", server_round, self.nodes.label(node), reason)
        self.current.missing.append({"client": self.nodes.label(node), "phase": phase, "reason": reason})

    def _audit(
        self, server_round: int, kind: str, node: int, msg: Message, arrays: dict[str, np.ndarray] | None = None
    ) -> None:
        """With federation.audit_replies, keep a structurally valid reply as received (size-capped)."""
        if not self.fed.audit_replies:
            return
        content = msg.content
        info = {
            "metrics": {rec: dict(mr) for rec, mr in content.metric_records.items()},
            "configs": {rec: dict(cr) for rec, cr in content.config_records.items()},
        }
        tensors = {f"{ARRAYS_KEY}/{k}": torch.from_numpy(np.array(a)) for k, a in (arrays or {}).items()}
        self.run.audit(server_round, f"{kind}_node{node}", tensors, info)

    def _eval_line(self, record: RoundRecord) -> str:
        """The log's evaluation part: a round that did not evaluate says so, not ``nan``."""
        if not record.evaluated:
            return "not evaluated"
        pers, glob = record.kinds[PERSONALIZED].mean, record.kinds[GLOBAL].mean
        val = record.kinds[VALIDATION].mean if VALIDATION in record.kinds else float("nan")
        return f"personalized {self.plan.metric} {pers:.4f} | global {glob:.4f} | validation {val:.4f}"

    # --------------------------------------------------------------------------- checkpoint
    def checkpoint(self, server_round: int) -> ServerCheckpoint:
        """Everything needed to continue after ``server_round`` (see ``pf2lora_core.federation.checkpoint``)."""
        return ServerCheckpoint(
            round=server_round,
            state=self.state,
            algorithm=algorithm_state(self.algorithm),
            history=self.history,
            latest_eval=self.latest_eval,
            sampler=self.nodes.sampler.getstate(),
            rng=capture_rng(),
            config_yaml=self.plan.config_yaml,
        )

    def restore(self, ckpt: ServerCheckpoint) -> None:
        """Continue from ``ckpt`` (call after ``start_state``, which rebuilds the algorithm's set-up)."""
        self.state = dict(ckpt.state)
        restore_algorithm_state(self.algorithm, ckpt.algorithm)
        self.history = list(ckpt.history)
        self.latest_eval = dict(ckpt.latest_eval)
        self.nodes.sampler.setstate(ckpt.sampler)
        restore_rng(ckpt.rng)
        last = self.history[-1].elapsed if self.history else 0.0
        self.elapsed_before = last if math.isfinite(last) else 0.0


def query_partition_ids(grid: Grid, nodes: list[int], shared: ConfigRecord, timeout: float) -> dict[int, int]:
    """Ask ``nodes`` for their partition id (a QUERY message); node id -> client for those that answered."""
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord(dict(shared))}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in nodes
    ]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        try:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                log.warning("node %d failed to identify itself: %s", node, truncate(reply.error.reason))
                continue
            claimed = reply.content[METRICS_KEY][CLIENT_KEY]
            if isinstance(claimed, bool) or not isinstance(claimed, (int, float)) or claimed != int(claimed):
                raise ValueError(f"partition id {truncate(repr(claimed), 40)} is not an integer")
            found[node] = int(claimed)
        except Exception as err:  # (one malformed identity reply never stops the server)
            log.warning("a node sent a malformed identity reply: %s", truncate(repr(err)))
    return found


def node_key_fingerprints(grid: Grid, nodes: list[int]) -> dict[int, tuple[str, str]]:
    """Node id -> (its public key as text, the SHA-256 hex of the key bytes), from the SuperLink's node info.

    Nodes without a key (no SuperNode authentication) are left out.
    """
    wanted, out = set(nodes), {}
    try:
        infos = list(grid.get_nodes())
    except Exception as err:  # (a grid that cannot list nodes: no keys, every claim refused)
        log.warning("cannot read the SuperNodes' public keys: %s", err)
        return {}
    for info in infos:
        key = bytes(getattr(info, "public_key", b"") or b"")
        if info.node_id in wanted and key:
            out[int(info.node_id)] = (key.decode("utf-8", "replace").strip(), hashlib.sha256(key).hexdigest())
    return out


def unavailable(msg: Message) -> bool:
    """An error reply saying the node could not answer at all (offline, or a simulated drop-out),
    not that it tried and failed: such a reply counts as missing, not as rejected."""
    return msg.has_error() and int(msg.error.code) in (ErrorCode.NODE_UNAVAILABLE, CLIENT_UNAVAILABLE)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
