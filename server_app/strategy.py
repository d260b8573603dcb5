"""Common-only FedAvg: averages the common level and nothing else, rejecting malformed replies.

Objective (PF2LoRA, DESIGN.md): ``x <- sum_k n_k x_k / sum_k n_k`` over the common adapters
``x_k`` the clients return, ``n_k`` their numbers of training examples; private adapters never
reach the server. The aggregation rule itself is the algorithm's (``Algorithm.aggregate``, a pure
function tested beside it); this class adds validation, logging and the run directory.

Deployment concerns live here too: nodes are sampled by *client* id with the strategy's own seeded
RNG (node ids differ from run to run; sampling by them would make runs irreproducible); a node
that connects late or reconnects under a new node id is identified before it is sampled; a round
completes with the replies that arrived within ``round_timeout_s`` when at least
``min_train_clients`` of them are valid, and every missing reply is logged; after every round the
whole server state is checkpointed (``pf2lora_core.checkpoint``) so that ``resume=<run dir>``
continues the run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from pf2lora_core.algorithms import Algorithm
from pf2lora_core.checkpoint import (
    SERVER_STATE_DIR,
    ServerCheckpoint,
    algorithm_state,
    capture_rng,
    restore_algorithm_state,
    restore_rng,
)
from pf2lora_core.constants import (
    ARRAYS_KEY,
    COMPUTE_SECONDS,
    EVAL_KINDS,
    GLOBAL,
    METRICS_KEY,
    NUM_EXAMPLES,
    PERSONALIZED,
    TRAIN_LOSS,
    VALIDATION,
)
from pf2lora_core.logs import progress
from pf2lora_core.outputs import RunDir
from pf2lora_core.policy import LABEL_HISTOGRAM
from pf2lora_core.protocol import CLIENT_KEY, DETAILS_KEY, decode_details, split_metrics
from pf2lora_core.runtime import derived_seed
from pf2lora_core.summary import evaluation_blocks
from pf2lora_core.validation import check_values, decode_checked

log = logging.getLogger("pf2lora.server")
SERVER_ROUND_KEY = "server-round"  # Flower's key for the round in train / evaluate configs
SAMPLER_SALT = 7_501  # derives the node sampler's seed from the run's seed (any fixed number)
QUERY_TIMEOUT_S = 600.0  # a node answering its identity query: one ClientApp start (~5 s) + model load


@dataclass
class RoundLog:
    """What one round produced; becomes a line of metrics.jsonl."""

    round: int
    started: float = field(default_factory=time.time)
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[int, dict[str, Any]] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    aggregated: bool = False
    missing: list[dict[str, Any]] = field(default_factory=list)  # sampled, no reply within the timeout


class CommonOnlyFedAvg(FedAvg):
    """FedAvg over the common level with per-reply validation and run-directory output."""

    def __init__(
        self,
        *,
        algorithm: Algorithm,
        run: RunDir,
        num_clients: int,
        fraction_train: float,
        fraction_evaluate: float,
        min_train_clients: int,
        max_update_norm: float,
        audit_replies: bool,
        eval_every: int,
        num_rounds: int,
        metric: str,
        seed: int = 0,
        round_timeout_s: float = 3600.0,
        wait_for_nodes_s: float = 30.0,
        config_yaml: str = "",
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_clients,
            min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
            min_available_nodes=num_clients,
            weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key="config",
        )
        self.algorithm = algorithm
        self.run = run
        self.min_train_clients = min_train_clients
        self.max_update_norm = max_update_norm
        self.audit_replies = audit_replies
        self.eval_every = eval_every
        self.num_rounds = num_rounds
        self.metric = metric
        self.current: RoundLog | None = None
        self.clients: dict[int, int] = {}  # node id -> client (partition id), from identify_clients
        self.state: dict[str, torch.Tensor] = {}  # the algorithm's server state (set by start_state)
        self.sent: dict[int, dict[str, np.ndarray]] = {}  # node id -> arrays sent this round
        self.outbox: dict[int, Message] = {}  # node id -> message sent (Flower sets its id on push)
        self.latest_eval: dict[int, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.num_clients = num_clients
        self.round_timeout_s = round_timeout_s
        self.wait_for_nodes_s = wait_for_nodes_s
        self.config_yaml = config_yaml
        self.sampler = random.Random(derived_seed(seed, SAMPLER_SALT))
        self.query_config = ConfigRecord()  # what a node needs to answer its identity query (set by run_rounds)
        self.elapsed_before = 0.0  # seconds of the rounds run before a resume

    def start_state(self, common: dict[str, torch.Tensor], clients: dict[int, int]) -> ArrayRecord:
        """Set the node -> client map and the algorithm's initial server state; returns the latter."""
        self.clients = dict(clients)
        self.state = self.algorithm.server_init(common)
        return ArrayRecord(self.state)

    # ------------------------------------------------------------------------------ rounds
    def run_rounds(
        self, grid: Grid, shared: ConfigRecord, first_round: int = 1, evaluate_config: ConfigRecord | None = None
    ) -> None:
        """Rounds ``first_round..num_rounds`` (Flower's ``Strategy.start`` loop, able to start later)."""
        self.query_config = ConfigRecord(dict(shared))
        for server_round in range(first_round, self.num_rounds + 1):
            replies = grid.send_and_receive(
                self.configure_train(server_round, ArrayRecord(), ConfigRecord(dict(shared)), grid),
                timeout=self.round_timeout_s,
            )
            self.aggregate_train(server_round, replies)
            eval_config = ConfigRecord(dict(evaluate_config if evaluate_config is not None else shared))
            replies = grid.send_and_receive(
                self.configure_evaluate(server_round, ArrayRecord(), eval_config, grid),
                timeout=self.round_timeout_s,
            )
            self.aggregate_evaluate(server_round, replies)

    def _messages(
        self, clients: list[int], config: ConfigRecord, server_round: int, kind: str, count_bytes: bool
    ) -> list[Message]:
        """One message per sampled client: the algorithm's downlink for that client, and ``config``.

        ``count_bytes``: add the arrays' serialised size to the round's downlink (training messages;
        evaluation sends the same arrays again and is not part of the training cost).
        """
        nodes = {client: node for node, client in self.clients.items()}
        out = []
        for client in clients:
            node = nodes[client]
            record = ArrayRecord(self.algorithm.downlink(self.state, client))
            self.sent[node] = {k: v.numpy() for k, v in record.items()}
            cfg = ConfigRecord({**dict(config), SERVER_ROUND_KEY: server_round})
            content = RecordDict({ARRAYS_KEY: record, "config": cfg})
            out.append(Message(content=content, dst_node_id=node, message_type=kind))
            self.outbox[node] = out[-1]
            if count_bytes:
                assert self.current is not None
                self.current.bytes_down += record.count_bytes()
        return out

    def connected_clients(self, grid: Grid) -> list[int]:
        """Clients (partition ids) whose node is connected now, in order; new nodes are identified first.

        Waits up to ``wait_for_nodes_s`` for all ``num_clients`` (a SuperNode restarting after a
        crash rejoins), then goes on with the clients there are.
        """
        deadline = time.time() + self.wait_for_nodes_s
        while True:
            connected = set(grid.get_node_ids())
            new = sorted(connected - set(self.clients))
            if new:
                self._identify(grid, new, connected)
            clients = sorted(c for n, c in self.clients.items() if n in connected)
            if len(clients) >= self.num_clients or time.time() > deadline:
                return clients
            time.sleep(1.0)

    def _identify(self, grid: Grid, nodes: list[int], connected: set[int]) -> None:
        """Ask ``nodes`` for their partition ids; map each to its client unless the client is taken."""
        found = query_partition_ids(grid, nodes, self.query_config, QUERY_TIMEOUT_S)
        for node in nodes:
            if node not in found:
                log.warning("node %d did not identify itself; not sampled this round", node)
                continue
            client = found[node]
            holder = next((n for n, c in self.clients.items() if c == client), None)
            if holder is not None and holder in connected:
                log.warning(
                    "node %d claims client %d, which node %d holds; node %d ignored", node, client, holder, node
                )
                continue
            if holder is not None:
                del self.clients[holder]
                log.info("client %d reconnected as node %d (was node %d)", client, node, holder)
            self.clients[node] = client

    def _sample(self, clients: list[int], fraction: float, minimum: int) -> list[int]:
        """``fraction`` of ``clients`` (at least ``minimum``), drawn with the strategy's own RNG."""
        size = min(len(clients), max(int(len(clients) * fraction), minimum))
        return sorted(self.sampler.sample(clients, size))

    # ----------------------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = RoundLog(round=server_round)
        self.sent, self.outbox = {}, {}
        available = self.connected_clients(grid)
        if len(available) < self.min_train_clients:
            raise RuntimeError(
                f"round {server_round}: {len(available)} client(s) connected after {self.wait_for_nodes_s:.0f} s, "
                f"fewer than federation.min_train_clients={self.min_train_clients}"
            )
        if len(available) < self.num_clients:
            missing = sorted(set(range(self.num_clients)) - set(available))
            log.warning("round %d: clients %s are not connected; training without them", server_round, missing)
        if self.algorithm.pooled_training:  # the centralized reference trains on one node
            clients = self._sample(available, 0.0, 1)
        else:
            clients = self._sample(available, self.fraction_train, self.min_train_clients)
        messages = self._messages(clients, config, server_round, MessageType.TRAIN, count_bytes=True)
        log.info("round %d/%d: training on %d clients", server_round, self.num_rounds, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current is not None
        valid: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        replied: set[int] = set()
        for msg in replies:
            replied.add(self._source(msg))
            self._audit(server_round, "train", msg)
            client, reason, decoded = self._inspect_train_reply(msg)
            if reason is not None:
                log.warning("round %d: excluded reply from %s: %s", server_round, client, reason)
                self.current.rejected.append({"client": client, "reason": reason})
                continue
            content = msg.content
            metrics = dict(content[METRICS_KEY])
            valid[int(metrics[CLIENT_KEY])] = ({k: torch.from_numpy(v) for k, v in decoded.items()},
                                               float(metrics[NUM_EXAMPLES]))  # fmt: skip
            self.current.train[int(metrics[CLIENT_KEY])] = {k: float(v) for k, v in metrics.items()}
            self.current.bytes_up += content[ARRAYS_KEY].count_bytes()
        self._log_missing(server_round, "training", replied)
        # in client order, not arrival order: the float sums (and so the run) are reproducible
        clients = sorted(valid)
        states = [valid[c][0] for c in clients]
        weights = [valid[c][1] for c in clients]
        self.current.train = {c: self.current.train[c] for c in clients}
        required = 1 if self.algorithm.pooled_training else self.min_train_clients
        if len(states) < required:
            log.warning(
                "round %d: %d valid replies < federation.min_train_clients=%d; common adapter unchanged",
                server_round, len(states), required,
            )  # fmt: skip
            return None, None
        self.state = self.algorithm.server_update(self.state, states, weights, clients)
        aggregated = self.state
        self.current.aggregated = True
        self.run.save_common(server_round, aggregated)
        loss = sum(w * self.current.train[c][TRAIN_LOSS] for c, w in zip(self.current.train, weights, strict=True))
        return ArrayRecord(aggregated), MetricRecord({TRAIN_LOSS: loss / sum(weights)})

    def _source(self, msg: Message) -> int:
        """The node a reply is about: its sender, or for errors the SuperLink generates on a node's
        behalf (node unavailable), the node the original message went to."""
        reply_to = getattr(msg.metadata, "reply_to_message_id", "")
        if reply_to:
            for node, sent in self.outbox.items():
                if sent.metadata.message_id == reply_to:
                    return node
        return msg.metadata.src_node_id

    def _log_missing(self, server_round: int, phase: str, replied: set[int]) -> None:
        """Log (and record) every node sent a message this round that did not reply in time."""
        assert self.current is not None
        for node in sorted(set(self.sent) - replied):
            client = f"client {self.clients.get(node, '?')} (node {node})"
            reason = f"no {phase} reply within federation.round_timeout_s={self.round_timeout_s:g} s"
            log.warning("round %d: %s: %s", server_round, client, reason)
            self.current.missing.append({"client": client, "phase": phase, "reason": reason})

    def _audit(self, server_round: int, kind: str, msg: Message) -> None:
        """With federation.audit_replies, keep the reply exactly as received (arrays decoded without pickle)."""
        if not self.audit_replies or msg.has_error():
            return
        content = msg.content
        records = content.array_records.items()
        arrays = {f"{rec}/{k}": torch.from_numpy(a.numpy()) for rec, ar in records for k, a in ar.items()}
        info = {
            "metrics": {rec: dict(mr) for rec, mr in content.metric_records.items()},
            "configs": {rec: dict(cr) for rec, cr in content.config_records.items()},
        }
        self.run.audit(server_round, f"{kind}_node{msg.metadata.src_node_id}", arrays, info)

    def _inspect_train_reply(self, msg: Message) -> tuple[str, str | None, dict[str, np.ndarray]]:
        """(client label, reason to exclude or None, decoded arrays)."""
        source = self._source(msg)
        node = f"node {source}"
        if msg.has_error():
            return f"client {self.clients.get(source, '?')} ({node})", f"client error: {msg.error.reason}", {}
        content = msg.content
        if set(content.array_records) != {ARRAYS_KEY} or set(content.metric_records) != {METRICS_KEY}:
            reason = (
                f"expected one ArrayRecord '{ARRAYS_KEY}' and one MetricRecord '{METRICS_KEY}', got "
                f"{sorted(content.array_records)} / {sorted(content.metric_records)}"
            )
            return node, reason, {}
        metrics = content[METRICS_KEY]
        client = f"client {metrics.get(CLIENT_KEY, '?')} ({node})"
        n = metrics.get(NUM_EXAMPLES)
        if not isinstance(n, (int, float)) or not n > 0:
            return client, f"'{NUM_EXAMPLES}' must be a positive number, got {n!r}", {}
        expected_client = self.clients.get(msg.metadata.src_node_id)
        if str(expected_client) != str(metrics.get(CLIENT_KEY)):
            return client, f"claims client {metrics.get(CLIENT_KEY)!r} but the node is client {expected_client}", {}
        sent = self.sent.get(msg.metadata.src_node_id)
        if sent is None:
            return client, "no training message was sent to this node this round", {}
        arrays = content[ARRAYS_KEY]
        expected = {k: (v.shape, v.dtype) for k, v in sent.items()}
        declared = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in arrays.items()}
        reason = self.algorithm.check_uplink(expected, declared)  # before any bytes are decoded
        if reason is not None:
            return client, reason, {}
        decoded, reason = decode_checked({k: a.numpy for k, a in arrays.items()}, declared)  # never unpickles
        if reason is not None:
            return client, reason, {}
        same_shapes = all(decoded[k].shape == sent[k].shape for k in decoded if k in sent) and set(decoded) == set(sent)
        bound = self.max_update_norm if same_shapes else 0.0  # a norm bound needs like-shaped tensors
        return client, check_values(decoded, sent, bound), decoded

    # -------------------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent, self.outbox = {}, {}
        if (server_round % self.eval_every and server_round != self.num_rounds) or self.fraction_evaluate == 0:
            return []
        available = self.connected_clients(grid)
        clients = self._sample(available, self.fraction_evaluate, 1)
        return self._messages(clients, config, server_round, MessageType.EVALUATE, count_bytes=False)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        assert self.current is not None
        replied: set[int] = set()
        for msg in replies:
            node = self._source(msg)
            replied.add(node)
            self._audit(server_round, "evaluate", msg)
            if msg.has_error():
                log.warning("round %d: evaluation failed on client %s (node %d): %s", server_round,
                            self.clients.get(node, "?"), node, msg.error.reason)  # fmt: skip
                label = f"client {self.clients.get(node, '?')} (node {node})"
                reason = f"client error: {msg.error.reason}"
                self.current.missing.append({"client": label, "phase": "evaluation", "reason": reason})
                continue
            metrics = dict(msg.content[METRICS_KEY])
            client = int(metrics.pop(CLIENT_KEY))
            entry = split_metrics(metrics)
            details = msg.content.config_records.get(DETAILS_KEY)
            decoded = decode_details(details.get(DETAILS_KEY) if details else None)
            entry["rank"] = decoded.get("rank", {})
            if LABEL_HISTOGRAM in decoded:  # only from a site that opted in (share-data-stats)
                entry[LABEL_HISTOGRAM] = decoded[LABEL_HISTOGRAM]
            self.current.evaluation[client] = entry
        self._log_missing(server_round, "evaluation", replied)
        self.current.evaluation = dict(sorted(self.current.evaluation.items()))
        self.latest_eval.update(self.current.evaluation)
        record = self._finish_round()
        self.history.append(record)
        self.run.append_metrics(record)
        self.checkpoint(server_round).save(self.run.path / SERVER_STATE_DIR)
        log.info(
            "round %d/%d done in %.1fs | %s | train loss %.4f | %s | rejected %d", server_round, self.num_rounds,
            record["seconds"], progress(record["elapsed"], server_round, self.num_rounds),
            _nan(record.get(TRAIN_LOSS)), self._eval_line(record), len(record["rejected"]),
        )  # fmt: skip
        return None

    def _eval_line(self, record: dict[str, Any]) -> str:
        """The log's evaluation part: a round that did not evaluate says so, not ``nan``."""
        if PERSONALIZED not in record:
            return "not evaluated"
        pers, glob = _nan(record[PERSONALIZED].get("mean")), _nan(record[GLOBAL].get("mean"))
        val = _nan(record.get(VALIDATION, {}).get("mean"))
        return f"personalized {self.metric} {pers:.4f} | global {glob:.4f} | validation {val:.4f}"

    def _finish_round(self) -> dict[str, Any]:
        cur = self.current
        assert cur is not None
        weights = [v[NUM_EXAMPLES] for v in cur.train.values()]
        losses = [v[TRAIN_LOSS] for v in cur.train.values()]
        record: dict[str, Any] = {
            "round": cur.round,
            "seconds": time.time() - cur.started,
            "elapsed": self.elapsed_before + time.time() - self.t0,
            TRAIN_LOSS: sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights) if weights else None,
            "clients_trained": len(cur.train),
            "aggregated": cur.aggregated,
            "rejected": cur.rejected,
            "missing": cur.missing,  # sampled clients that did not reply in time (or at all)
            # serialised arrays of this round's training messages, all clients together
            "bytes_down": cur.bytes_down,
            "bytes_up": cur.bytes_up,
            "train": {str(c): v for c, v in sorted(cur.train.items())},
            # the clients' own work this round (train + evaluate), for the round-overhead ratio
            "client_compute_s": sum(v.get(COMPUTE_SECONDS, 0.0) for v in cur.train.values())
            + sum(e.get(COMPUTE_SECONDS, 0.0) for e in cur.evaluation.values()),
        }
        if cur.evaluation:
            # personalized / global on test, validation / validation_global on the validation split
            record.update(evaluation_blocks(cur.evaluation, self.metric))
            record["clients"] = {
                str(c): {**{kind: e.get(kind, {}) for kind in EVAL_KINDS}, "rank": e["rank"].get("effective")}
                for c, e in sorted(cur.evaluation.items())
            }
        return record

    # --------------------------------------------------------------------------- checkpoint
    def checkpoint(self, server_round: int) -> ServerCheckpoint:
        """Everything needed to continue after ``server_round`` (see ``pf2lora_core.checkpoint``)."""
        return ServerCheckpoint(
            round=server_round,
            state=self.state,
            algorithm=algorithm_state(self.algorithm),
            history=self.history,
            latest_eval=self.latest_eval,
            sampler=self.sampler.getstate(),
            rng=capture_rng(),
            config_yaml=self.config_yaml,
        )

    def restore(self, ckpt: ServerCheckpoint) -> None:
        """Continue from ``ckpt`` (call after ``start_state``, which rebuilds the algorithm's set-up)."""
        self.state = dict(ckpt.state)
        restore_algorithm_state(self.algorithm, ckpt.algorithm)
        self.history = list(ckpt.history)
        self.latest_eval = dict(ckpt.latest_eval)
        self.sampler.setstate(ckpt.sampler)
        restore_rng(ckpt.rng)
        self.elapsed_before = float(self.history[-1].get("elapsed", 0.0)) if self.history else 0.0


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
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d failed to identify itself: %s", node, reply.error.reason)
            continue
        try:
            found[node] = int(reply.content[METRICS_KEY][CLIENT_KEY])
        except (KeyError, TypeError, ValueError) as err:
            log.warning("node %d sent a malformed identity reply: %r", node, err)
    return found


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
