"""Common-only FedAvg: averages the common level and nothing else, rejecting malformed replies.

Objective (PF2LoRA, DESIGN.md): ``x <- sum_k n_k x_k / sum_k n_k`` over the common adapters
``x_k`` the clients return, ``n_k`` their numbers of training examples; private adapters never
reach the server. The aggregation rule itself is the algorithm's (``Algorithm.aggregate``, a pure
function tested beside it); this class adds validation, logging and the run directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from pf2lora_core.algorithms import Algorithm
from pf2lora_core.constants import (
    ARRAYS_KEY,
    COMPUTE_SECONDS,
    GLOBAL,
    METRICS_KEY,
    NUM_EXAMPLES,
    PERSONALIZED,
    TRAIN_LOSS,
)
from pf2lora_core.outputs import RunDir, aggregate_metric
from pf2lora_core.protocol import CLIENT_KEY, DETAILS_KEY, decode_details, split_metrics
from pf2lora_core.validation import check_values

log = logging.getLogger("pf2lora.server")


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
        self.latest_eval: dict[int, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.t0 = time.time()

    def start_state(self, common: dict[str, torch.Tensor], clients: dict[int, int]) -> ArrayRecord:
        """Set the node -> client map and the algorithm's initial server state; returns the latter."""
        self.clients = dict(clients)
        self.state = self.algorithm.server_init(common)
        return ArrayRecord(self.state)

    def _personalize_messages(self, messages: list[Message], count_bytes: bool) -> list[Message]:
        """Replace each sampled node's arrays by the algorithm's downlink for that node's client.

        ``count_bytes``: add the arrays' serialised size to the round's downlink (training messages;
        evaluation sends the same arrays again and is not part of the training cost).
        """
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.clients:
                raise RuntimeError(f"node {node} did not identify itself (its partition-id is unknown)")
            down = self.algorithm.downlink(self.state, self.clients[node])
            record = ArrayRecord(down)
            self.sent[node] = {k: v.numpy() for k, v in record.items()}
            content = RecordDict({ARRAYS_KEY: record, "config": msg.content["config"]})
            out.append(Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type))
            if count_bytes:
                assert self.current is not None
                self.current.bytes_down += record.count_bytes()
        return out

    # ----------------------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = RoundLog(round=server_round)
        self.sent = {}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.algorithm.pooled_training:  # the centralized reference trains on one node
            messages = messages[:1]
        messages = self._personalize_messages(messages, count_bytes=True)
        log.info("round %d/%d: training on %d clients", server_round, self.num_rounds, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current is not None
        states, weights, clients = [], [], []
        for msg in replies:
            self._audit(server_round, "train", msg)
            client, reason, decoded = self._inspect_train_reply(msg)
            if reason is not None:
                log.warning("round %d: excluded reply from %s: %s", server_round, client, reason)
                self.current.rejected.append({"client": client, "reason": reason})
                continue
            content = msg.content
            metrics = dict(content[METRICS_KEY])
            states.append({k: torch.from_numpy(v) for k, v in decoded.items()})
            weights.append(float(metrics[NUM_EXAMPLES]))
            clients.append(int(metrics[CLIENT_KEY]))
            self.current.train[clients[-1]] = {k: float(v) for k, v in metrics.items()}
            self.current.bytes_up += content[ARRAYS_KEY].count_bytes()
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
        node = f"node {msg.metadata.src_node_id}"
        if msg.has_error():
            return node, f"client error: {msg.error.reason}", {}
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
        decoded = {k: a.numpy() for k, a in arrays.items()}
        same_shapes = all(decoded[k].shape == sent[k].shape for k in decoded if k in sent) and set(decoded) == set(sent)
        bound = self.max_update_norm if same_shapes else 0.0  # a norm bound needs like-shaped tensors
        return client, check_values(decoded, sent, bound), decoded

    # -------------------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round % self.eval_every and server_round != self.num_rounds:
            return []
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self._personalize_messages(messages, count_bytes=False)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        assert self.current is not None
        for msg in replies:
            self._audit(server_round, "evaluate", msg)
            if msg.has_error():
                log.warning("round %d: evaluation failed on node %d: %s", server_round, msg.metadata.src_node_id,
                            msg.error.reason)  # fmt: skip
                continue
            metrics = dict(msg.content[METRICS_KEY])
            client = int(metrics.pop(CLIENT_KEY))
            entry = split_metrics(metrics)
            details = msg.content.config_records.get(DETAILS_KEY)
            entry["rank"] = decode_details(details.get(DETAILS_KEY) if details else None).get("rank", {})
            self.current.evaluation[client] = entry
        self.latest_eval.update(self.current.evaluation)
        record = self._finish_round()
        self.history.append(record)
        self.run.append_metrics(record)
        pers = record.get(PERSONALIZED, {})
        glob = record.get(GLOBAL, {})
        log.info(
            "round %d/%d done in %.1fs | train loss %.4f | personalized %s %.4f | global %.4f | rejected %d",
            server_round, self.num_rounds, record["seconds"], record.get(TRAIN_LOSS) or float("nan"), self.metric,
            _nan(pers.get("mean")), _nan(glob.get("mean")), len(record["rejected"]),
        )  # fmt: skip
        return None

    def _finish_round(self) -> dict[str, Any]:
        cur = self.current
        assert cur is not None
        weights = [v[NUM_EXAMPLES] for v in cur.train.values()]
        losses = [v[TRAIN_LOSS] for v in cur.train.values()]
        record: dict[str, Any] = {
            "round": cur.round,
            "seconds": time.time() - cur.started,
            "elapsed": time.time() - self.t0,
            TRAIN_LOSS: sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights) if weights else None,
            "clients_trained": len(cur.train),
            "aggregated": cur.aggregated,
            "rejected": cur.rejected,
            # serialised arrays of this round's training messages, all clients together
            "bytes_down": cur.bytes_down,
            "bytes_up": cur.bytes_up,
            "train": {str(c): v for c, v in sorted(cur.train.items())},
            # the clients' own work this round (train + evaluate), for the round-overhead ratio
            "client_compute_s": sum(v.get(COMPUTE_SECONDS, 0.0) for v in cur.train.values())
            + sum(e.get(COMPUTE_SECONDS, 0.0) for e in cur.evaluation.values()),
        }
        if cur.evaluation:
            for kind in (PERSONALIZED, GLOBAL):
                vals = [e[kind].get(self.metric, float("nan")) for e in cur.evaluation.values()]
                ns = [e[NUM_EXAMPLES] for e in cur.evaluation.values()]
                record[kind] = {"metric": self.metric, **aggregate_metric(vals, ns, self.metric)}
            record["clients"] = {
                str(c): {PERSONALIZED: e[PERSONALIZED], GLOBAL: e[GLOBAL], "rank": e["rank"].get("effective")}
                for c, e in sorted(cur.evaluation.items())
            }
        return record


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
