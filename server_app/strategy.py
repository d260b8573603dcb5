"""Common-only FedAvg: averages the common level and nothing else, rejecting malformed replies.

Objective (PF2LoRA; docs/DESIGN.md, "Server averaging"): ``x <- sum_k n_k x_k / sum_k n_k`` over the common adapters
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

No reply can stop the server: each train and evaluate reply is checked in its own guard
(``pf2lora_core.validation``: the node's own client, required keys, finite numbers, allow-listed
evaluation names, trusted ``num-examples``, an update norm that is never skipped), and anything
unexpected becomes a ``rejected`` entry with the client and a truncated reason. Rounds in which
every client failed stop the run (``federation.max_failed_rounds``) with the first client's error.
"""

from __future__ import annotations

import hashlib
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
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from pf2lora_core.algorithms import Algorithm
from pf2lora_core.checkpoint import (
    SERVER_STATE_DIR,
    ServerCheckpoint,
    algorithm_state,
    capture_rng,
    restore_algorithm_state,
    restore_rng,
)
from pf2lora_core.config import FederationConfig
from pf2lora_core.constants import (
    ARRAYS_KEY,
    COMPUTE_SECONDS,
    EVAL_BLOCKS,
    EVAL_KINDS,
    EVAL_METRIC_NAMES,
    EVAL_REQUIRED_BLOCKS,
    GLOBAL,
    METRICS_KEY,
    NUM_EXAMPLES,
    NUM_VALIDATION,
    PERSONALIZED,
    TRAIN_LOSS,
    VALIDATION,
)
from pf2lora_core.logs import progress
from pf2lora_core.outputs import RunDir
from pf2lora_core.policy import LABEL_HISTOGRAM
from pf2lora_core.protocol import CLIENT_KEY, DETAILS_KEY, TRAINED_BEFORE_KEY, split_metrics
from pf2lora_core.runtime import derived_seed
from pf2lora_core.summary import evaluation_blocks
from pf2lora_core.validation import (
    check_eval_metrics,
    check_num_examples,
    check_required,
    check_scalars,
    check_values,
    clip_update,
    decode_checked,
    parse_details,
    truncate,
    update_norm,
    update_reference,
)

log = logging.getLogger("pf2lora.server")
SERVER_ROUND_KEY = "server-round"  # Flower's key for the round in train / evaluate configs
SAMPLER_SALT = 7_501  # derives the node sampler's seed from the run's seed (any fixed number)
QUERY_TIMEOUT_S = 600.0  # a node answering its identity query: one ClientApp start (~5 s) + model load
# an evaluate reply's plain keys
EVAL_SCALARS = frozenset({CLIENT_KEY, NUM_EXAMPLES, NUM_VALIDATION, COMPUTE_SECONDS})
TRAIN_REQUIRED = (CLIENT_KEY, NUM_EXAMPLES, TRAIN_LOSS)
STATS = ("mean", "weighted_mean", "worst")  # of a metric over clients (outputs.aggregate_metric)


class ReplyRejectedError(Exception):
    """A reply that may not enter the round; ``args[0]`` is the reason."""


class RunFailedError(RuntimeError):
    """Rounds in a row in which every client failed: the run cannot succeed as set up."""


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
        known_examples: dict[int, tuple[int, int]] | None = None,
        max_num_examples: int = 10_000_000,
        num_examples_mismatch: str = "clip",
        update_norm_action: str = "reject",
        aggregator: str = "mean",
        trim_fraction: float = 0.2,
        max_failed_rounds: int = 1,
        node_keys: dict[str, int] | None = None,
        rebind_clients: bool = False,
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
        # weights the server can trust: (train, test) sizes per client where the server knows them
        # (simulation), else the first value each client declared (deployment)
        self.known_examples = dict(known_examples or {})
        self.declared: dict[tuple[str, int], float] = {}
        self.max_num_examples = max_num_examples
        self.num_examples_mismatch = num_examples_mismatch
        self.update_norm_action = update_norm_action
        self.aggregator = aggregator
        self.trim_fraction = trim_fraction
        self.max_failed_rounds = max_failed_rounds
        self.failed_rounds = 0  # consecutive rounds without any valid reply
        self.node_keys = dict(node_keys or {})
        self.rebind_clients = rebind_clients
        self.fresh: dict[str, np.ndarray] = {}  # the seeded initial common level (FLoRA's fresh LoRA)
        self.backoff: dict[int, tuple[int, int]] = {}  # unidentified node -> (failures, next round to ask)
        self.ignored: set[int] = set()  # nodes ignored (all partitions mapped, or their claim refused)
        self.round_now = 0

    def start_state(self, common: dict[str, torch.Tensor], clients: dict[int, int]) -> ArrayRecord:
        """Set the node -> client map and the algorithm's initial server state; returns the latter."""
        self.clients = dict(clients)
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
        """Flower's ``Strategy.start``: rounds ``first_round..num_rounds``; Flower's ``Result``.

        ``initial_arrays`` is the seeded common level; when the state was set already
        (``start_state``, then ``restore`` of a checkpoint for a resumed run: ``first_round`` is
        the round after it) it is kept. ``evaluate_fn`` (server-side evaluation) is not used: every
        evaluation here is the clients' own, on their own splits.
        """
        if not self.state:
            self.start_state(initial_arrays.to_torch_state_dict(), self.clients)
        self.num_rounds, self.round_timeout_s = num_rounds, timeout
        return self.run_rounds(grid, train_config or ConfigRecord(), first_round, evaluate_config)

    def run_rounds(
        self, grid: Grid, shared: ConfigRecord, first_round: int = 1, evaluate_config: ConfigRecord | None = None
    ) -> Result:
        """Rounds ``first_round..num_rounds`` (the loop of ``start``, able to start later).

        Raises ``RunFailedError`` (after recording the round in metrics.jsonl) when
        ``federation.max_failed_rounds`` rounds in a row had no valid reply, or the first round of
        a run that never aggregated had none.
        """
        self.query_config = ConfigRecord(dict(shared))
        result = Result()
        for server_round in range(first_round, self.num_rounds + 1):
            replies = grid.send_and_receive(
                self.configure_train(server_round, ArrayRecord(), ConfigRecord(dict(shared)), grid),
                timeout=self.round_timeout_s,
            )
            _, train_metrics = self.aggregate_train(server_round, replies)
            self._stop_if_failed(server_round)
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            eval_config = ConfigRecord(dict(evaluate_config if evaluate_config is not None else shared))
            replies = grid.send_and_receive(
                self.configure_evaluate(server_round, ArrayRecord(), eval_config, grid),
                timeout=self.round_timeout_s,
            )
            eval_metrics = self.aggregate_evaluate(server_round, replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_metrics
        result.arrays = ArrayRecord(self.state)
        return result

    def _stop_if_failed(self, server_round: int) -> None:
        """Count a round in which every client failed; stop the run when it cannot succeed."""
        cur = self.current
        assert cur is not None
        if cur.train:
            self.failed_rounds = 0
            return
        self.failed_rounds += 1
        never = not any(h.get("aggregated") for h in self.history)
        if self.failed_rounds < self.max_failed_rounds and not never:
            return
        first = (cur.rejected or cur.missing or [{"client": "no client", "reason": "no client was sampled"}])[0]
        record = self._finish_round()
        self.history.append(record)
        self.run.append_metrics(record)
        why = "the first round of the run" if never else f"{self.failed_rounds} round(s) in a row"
        raise RunFailedError(
            f"round {server_round}: every client failed in {why} (federation.max_failed_rounds="
            f"{self.max_failed_rounds}); first error: {first['client']}: {first['reason']}"
        )

    def _messages(
        self, clients: list[int], config: ConfigRecord, server_round: int, kind: str, count_bytes: bool
    ) -> list[Message]:
        """One message per sampled client: the algorithm's downlink for that client, and ``config``.

        ``count_bytes``: add the arrays' serialised size to the round's downlink (training messages;
        evaluation sends the same arrays again and is not part of the training cost). Each message
        also says the last round this client's reply was aggregated (0 = never), so a client whose
        private level is lost can tell that it is lost.
        """
        nodes = {client: node for node, client in self.clients.items()}
        out = []
        for client in clients:
            node = nodes[client]
            record = ArrayRecord(self.algorithm.downlink(self.state, client))
            self.sent[node] = {k: v.numpy() for k, v in record.items()}
            cfg = ConfigRecord(
                {**dict(config), SERVER_ROUND_KEY: server_round, TRAINED_BEFORE_KEY: self.trained_before(client)}
            )
            content = RecordDict({ARRAYS_KEY: record, "config": cfg})
            out.append(Message(content=content, dst_node_id=node, message_type=kind))
            self.outbox[node] = out[-1]
            if count_bytes:
                assert self.current is not None
                self.current.bytes_down += record.count_bytes()
        return out

    def trained_before(self, client: int) -> int:
        """The last round (in this run's history) whose aggregate included ``client``'s reply; 0 = never."""
        rounds = [int(h["round"]) for h in self.history if h.get("aggregated") and str(client) in h.get("train", {})]
        return max(rounds, default=0)

    def connected_clients(self, grid: Grid) -> list[int]:
        """Clients (partition ids) whose node is connected now, in order; new nodes are identified first.

        Waits up to ``wait_for_nodes_s`` for all ``num_clients`` (a SuperNode restarting after a
        crash rejoins), then goes on with the clients there are.
        """
        deadline = time.time() + self.wait_for_nodes_s
        while True:
            connected = set(grid.get_node_ids())
            new = sorted(connected - set(self.clients) - self.ignored)
            if new:
                self._identify(grid, new, connected)
            clients = sorted(c for n, c in self.clients.items() if n in connected)
            if len(clients) >= self.num_clients or time.time() > deadline:
                return clients
            time.sleep(1.0)

    def _identify(self, grid: Grid, nodes: list[int], connected: set[int]) -> None:
        """Ask ``nodes`` for their partition ids; map each to its client unless the claim is refused.

        Nodes that failed to answer are asked again only after 1, 2, 4, ... rounds (each query may
        wait ``QUERY_TIMEOUT_S``); once every partition is mapped to a connected node, new nodes
        are ignored (logged once).
        """
        mapped = {c for n, c in self.clients.items() if n in connected}
        if len(mapped) >= self.num_clients:
            for node in nodes:
                log.warning("node %d ignored: every partition is mapped to a connected node", node)
                self.ignored.add(node)
            return
        due = [n for n in nodes if self.backoff.get(n, (0, 0))[1] <= self.round_now]
        if not due:
            return
        found = query_partition_ids(grid, due, self.query_config, QUERY_TIMEOUT_S)
        keys = node_key_fingerprints(grid, due) if self.node_keys else {}
        for node in due:
            if node not in found:
                failures = self.backoff.get(node, (0, 0))[0] + 1
                self.backoff[node] = (failures, self.round_now + 2 ** (failures - 1))
                log.warning(
                    "node %d did not identify itself; not sampled, asked again in round %d",
                    node, self.backoff[node][1],
                )  # fmt: skip
                continue
            self.backoff.pop(node, None)
            reason = self._bind(node, found[node], connected, keys.get(node))
            if reason is not None:
                log.warning("node %d %s; node %d ignored", node, reason, node)
                self.ignored.add(node)

    def _bind(self, node: int, client: int, connected: set[int], key: tuple[str, str] | None) -> str | None:
        """Map ``node`` to the ``client`` it claims; why not, or None when mapped."""
        if not 0 <= client < self.num_clients:
            return f"claims partition {client}, outside [0, num_clients={self.num_clients})"
        holder = next((n for n, c in self.clients.items() if c == client), None)
        if self.node_keys:  # identity from keys: the claim must match the key's partition
            bound = next((self.node_keys[k] for k in (key or ()) if k in self.node_keys), None)
            if bound is None:
                return f"has no entry in federation.node_keys (public key SHA-256 {key[1] if key else '?'})"
            if bound != client:
                return f"claims client {client} but its public key is client {bound}'s"
        elif holder is not None and holder != node and (holder in connected or not self.rebind_clients):
            state = "connected" if holder in connected else "offline; federation.rebind_clients=false"
            return f"claims client {client}, which node {holder} holds ({state})"
        if holder is not None and holder != node:
            del self.clients[holder]
            log.info("client %d reconnected as node %d (was node %d)", client, node, holder)
        self.clients[node] = client
        return None

    def _sample(self, clients: list[int], fraction: float, minimum: int) -> list[int]:
        """``fraction`` of ``clients`` (at least ``minimum``), drawn with the strategy's own RNG."""
        size = min(len(clients), max(int(len(clients) * fraction), minimum))
        return sorted(self.sampler.sample(clients, size))

    # ----------------------------------------------------------------------------- train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = RoundLog(round=server_round)
        self.round_now = server_round
        self.sent, self.outbox = {}, {}
        available = self.connected_clients(grid)
        if len(available) < self.min_train_clients:
            raise RuntimeError(
                f"round {server_round}: {len(available)} client(s) connected and identified after "
                f"{self.wait_for_nodes_s:.0f} s, fewer than federation.min_train_clients={self.min_train_clients}"
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
            label = self._label(msg)
            try:
                replied.add(self._source(msg))
                client, arrays, weight, metrics = self._train_candidate(server_round, msg, valid)
            except Exception as err:  # every reply is a candidate, never a crash
                reason = _reason(err)
                self._reject(server_round, label, reason)
                continue
            valid[client] = ({k: torch.from_numpy(v) for k, v in arrays.items()}, weight)
            self.current.train[client] = {**metrics, NUM_EXAMPLES: weight}
            self.current.bytes_up += msg.content[ARRAYS_KEY].count_bytes()
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
        if self.aggregator == "mean":
            self.state = self.algorithm.server_update(self.state, states, weights, clients)
        else:  # like-shaped common adapters only (config validation refuses other algorithms)
            self.state = robust_aggregate(states, self.aggregator, self.trim_fraction)
        aggregated = self.state
        self.current.aggregated = True
        self.run.save_common(server_round, aggregated)
        loss = sum(w * self.current.train[c][TRAIN_LOSS] for c, w in zip(self.current.train, weights, strict=True))
        return ArrayRecord(aggregated), MetricRecord({TRAIN_LOSS: loss / sum(weights)})

    def _reject(self, server_round: int, label: str, reason: str, phase: str = "") -> None:
        assert self.current is not None
        reason = truncate(reason)
        log.warning("round %d: excluded %sreply from %s: %s", server_round, f"{phase} " if phase else "", label, reason)
        entry = {"client": label, "reason": reason}
        self.current.rejected.append({**entry, "phase": phase} if phase else entry)

    def _label(self, msg: Message) -> str:
        """``client K (node N)`` from the server's own node map (never from the reply's claim)."""
        try:
            node = self._source(msg)
        except Exception:  # (a reply without usable metadata still gets a label)
            return "client ? (node ?)"
        return f"client {self.clients.get(node, '?')} (node {node})"

    def _source(self, msg: Message) -> int:
        """The node a reply is about: its sender, or for errors the SuperLink generates on a node's
        behalf (node unavailable), the node the original message went to."""
        reply_to = getattr(msg.metadata, "reply_to_message_id", "")
        if reply_to:
            for node, sent in self.outbox.items():
                if sent.metadata.message_id == reply_to:
                    return node
        return int(msg.metadata.src_node_id)

    def _log_missing(self, server_round: int, phase: str, replied: set[int]) -> None:
        """Log (and record) every node sent a message this round that did not reply in time."""
        assert self.current is not None
        for node in sorted(set(self.sent) - replied):
            client = f"client {self.clients.get(node, '?')} (node {node})"
            reason = f"no {phase} reply within federation.round_timeout_s={self.round_timeout_s:g} s"
            log.warning("round %d: %s: %s", server_round, client, reason)
            self.current.missing.append({"client": client, "phase": phase, "reason": reason})

    def _audit(self, server_round: int, kind: str, node: int, arrays: dict[str, np.ndarray], msg: Message) -> None:
        """With federation.audit_replies, keep a structurally valid reply as received (size-capped)."""
        if not self.audit_replies:
            return
        content = msg.content
        info = {
            "metrics": {rec: dict(mr) for rec, mr in content.metric_records.items()},
            "configs": {rec: dict(cr) for rec, cr in content.config_records.items()},
        }
        tensors = {f"{ARRAYS_KEY}/{k}": torch.from_numpy(np.array(a)) for k, a in arrays.items()}
        self.run.audit(server_round, f"{kind}_node{node}", tensors, info)

    def _metrics(self, msg: Message, node: int) -> tuple[int, dict[str, float]]:
        """The reply's one MetricRecord and the client it is from; rejected unless the node is that client."""
        content = msg.content
        metrics = dict(content[METRICS_KEY])
        expected = self.clients.get(node)
        if expected is None:
            raise ReplyRejectedError(f"node {node} has not identified itself as a client")
        claimed = metrics.get(CLIENT_KEY)
        if isinstance(claimed, bool) or not isinstance(claimed, (int, float)) or claimed != expected:
            raise ReplyRejectedError(f"claims client {truncate(repr(claimed), 40)} but the node is client {expected}")
        return expected, metrics

    def _weight(self, phase: str, client: int, value: object) -> float:
        """The trusted ``num-examples`` of a reply (see ``check_num_examples``); rejected if not acceptable."""
        sizes = self.known_examples
        if sizes and phase == "train" and self.algorithm.pooled_training:
            known: float | None = sum(train for train, _ in sizes.values())
        elif sizes:
            known = sizes[client][0 if phase == "train" else 1] if client in sizes else None
        else:
            known = self.declared.get((phase, client))  # deployment: what the client declared first
        weight, reason = check_num_examples(value, known, self.max_num_examples, self.num_examples_mismatch)
        if reason is not None:
            raise ReplyRejectedError(reason)
        if weight != value:
            log.warning("%s reply of client %d: num-examples %s clipped to %g", phase, client, value, weight)
        if not sizes:
            self.declared.setdefault((phase, client), weight)
        return weight

    def _train_candidate(
        self, server_round: int, msg: Message, valid: dict[int, Any]
    ) -> tuple[int, dict[str, np.ndarray], float, dict[str, float]]:
        """(client, decoded arrays, weight, metrics) of an acceptable train reply; ReplyRejectedError otherwise."""
        if msg.has_error():
            raise ReplyRejectedError(f"client error: {msg.error.reason}")
        content = msg.content
        if set(content.array_records) != {ARRAYS_KEY} or set(content.metric_records) != {METRICS_KEY}:
            raise ReplyRejectedError(
                f"expected one ArrayRecord '{ARRAYS_KEY}' and one MetricRecord '{METRICS_KEY}', got "
                f"{sorted(content.array_records)} / {sorted(content.metric_records)}"
            )
        node = int(msg.metadata.src_node_id)
        client, metrics = self._metrics(msg, node)
        reason = check_required(metrics, TRAIN_REQUIRED) or check_scalars(metrics)
        if reason is not None:
            raise ReplyRejectedError(reason)
        sent = self.sent.get(node)
        if sent is None:
            raise ReplyRejectedError("no training message was sent to this node this round")
        if client in valid:
            raise ReplyRejectedError(f"a second training reply from client {client} this round")
        weight = self._weight("train", client, metrics[NUM_EXAMPLES])
        arrays = content[ARRAYS_KEY]
        expected = {k: (v.shape, v.dtype) for k, v in sent.items()}
        declared = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in arrays.items()}
        reason = self.algorithm.check_uplink(expected, declared)  # before any bytes are decoded
        if reason is not None:
            raise ReplyRejectedError(reason)
        decoded, reason = decode_checked({k: a.numpy for k, a in arrays.items()}, declared)  # never unpickles
        if reason is not None:
            raise ReplyRejectedError(reason)
        self._audit(server_round, "train", node, decoded, msg)
        reason = check_values(decoded)
        if reason is not None:
            raise ReplyRejectedError(reason)
        return client, self._bounded(client, decoded, sent), weight, {k: float(v) for k, v in metrics.items()}

    def _bounded(
        self, client: int, decoded: dict[str, np.ndarray], sent: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """``decoded`` within ``max_update_norm`` of what it updates (``update_reference``): clipped or rejected."""
        if self.max_update_norm <= 0:
            return decoded
        reference = update_reference(decoded, sent, self.fresh)
        norm = update_norm(decoded, reference)
        if norm <= self.max_update_norm:
            return decoded
        why = f"update norm {norm:.4g} exceeds federation.max_update_norm={self.max_update_norm:.4g}"
        if self.update_norm_action != "clip":
            raise ReplyRejectedError(why)
        log.warning("client %d: %s; clipped to it", client, why)
        return clip_update(decoded, reference, self.max_update_norm)

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
            label = self._label(msg)
            try:
                node = self._source(msg)
                replied.add(node)
                if msg.has_error():
                    reason = truncate(f"client error: {msg.error.reason}")
                    log.warning("round %d: evaluation failed on %s: %s", server_round, label, reason)
                    self.current.missing.append({"client": label, "phase": "evaluation", "reason": reason})
                    continue
                client, entry = self._evaluate_candidate(server_round, msg)
            except Exception as err:  # every reply is a candidate, never a crash
                reason = _reason(err)
                self._reject(server_round, label, reason, phase="evaluation")
                continue
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
        if PERSONALIZED not in record:
            return None
        return MetricRecord(
            {f"{kind}.{stat}": float(record[kind][stat]) for kind in (PERSONALIZED, GLOBAL) for stat in STATS}
        )

    def _evaluate_candidate(self, server_round: int, msg: Message) -> tuple[int, dict[str, Any]]:
        """(client, evaluation entry) of an acceptable evaluate reply; ReplyRejectedError otherwise.

        Held to the same standard as a train reply: the node's own client, the allow-listed
        metric names of ``pf2lora_core.constants`` (``EVAL_BLOCKS`` x ``EVAL_METRIC_NAMES``),
        numbers only, a trusted ``num-examples``, details within size and depth caps.
        """
        content = msg.content
        configs = set(content.config_records)
        if content.array_records or set(content.metric_records) != {METRICS_KEY} or configs - {DETAILS_KEY}:
            raise ReplyRejectedError(
                f"expected one MetricRecord '{METRICS_KEY}' (and a ConfigRecord '{DETAILS_KEY}'), got arrays "
                f"{sorted(content.array_records)}, metrics {sorted(content.metric_records)}, configs {sorted(configs)}"
            )
        node = int(msg.metadata.src_node_id)
        client, metrics = self._metrics(msg, node)
        reason = check_eval_metrics(
            metrics, self.metric, EVAL_BLOCKS, EVAL_REQUIRED_BLOCKS, EVAL_METRIC_NAMES, EVAL_SCALARS
        ) or check_required(metrics, (NUM_EXAMPLES,))
        if reason is not None:
            raise ReplyRejectedError(reason)
        if node not in self.sent:
            raise ReplyRejectedError("no evaluation message was sent to this node this round")
        if client in self.current.evaluation:  # type: ignore[union-attr]
            raise ReplyRejectedError(f"a second evaluation reply from client {client} this round")
        details_record = content.config_records.get(DETAILS_KEY)
        if details_record is not None and set(details_record) - {DETAILS_KEY}:
            raise ReplyRejectedError(f"ConfigRecord '{DETAILS_KEY}' holds keys other than '{DETAILS_KEY}'")
        details, reason = parse_details(details_record.get(DETAILS_KEY) if details_record is not None else None)
        if reason is not None:
            raise ReplyRejectedError(reason)
        weight = self._weight("evaluate", client, metrics[NUM_EXAMPLES])
        validation = metrics.get(NUM_VALIDATION, 0)  # weights the validation means only; optional
        if validation:
            validation, reason = check_num_examples(validation, None, self.max_num_examples, "reject")
            if reason is not None:
                raise ReplyRejectedError(reason.replace(f"'{NUM_EXAMPLES}'", f"'{NUM_VALIDATION}'"))
        self._audit(server_round, "evaluate", node, {}, msg)
        flat = {k: float(v) for k, v in metrics.items() if k != CLIENT_KEY}
        entry = split_metrics({**flat, NUM_EXAMPLES: int(weight), NUM_VALIDATION: int(validation)})
        entry["rank"] = details.get("rank", {})
        if LABEL_HISTOGRAM in details:  # only from a site that opted in (share-data-stats)
            entry[LABEL_HISTOGRAM] = details[LABEL_HISTOGRAM]
        return client, entry

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


def federation_options(fed: FederationConfig) -> dict[str, Any]:
    """The strategy's keyword arguments that come straight from the ``federation`` config section."""
    return {
        "num_clients": fed.num_clients,
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_clients": fed.min_train_clients,
        "max_update_norm": fed.max_update_norm,
        "audit_replies": fed.audit_replies,
        "round_timeout_s": fed.round_timeout_s,
        "wait_for_nodes_s": fed.wait_for_nodes_s,
        "max_num_examples": fed.max_num_examples,
        "num_examples_mismatch": fed.num_examples_mismatch,
        "update_norm_action": fed.update_norm_action,
        "aggregator": fed.aggregator,
        "trim_fraction": fed.trim_fraction,
        "max_failed_rounds": fed.max_failed_rounds,
        "node_keys": dict(fed.node_keys),
        "rebind_clients": fed.rebind_clients,
    }


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


def robust_aggregate(states: list[dict[str, torch.Tensor]], kind: str, trim_fraction: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise ``median`` (as Flower's FedMedian) or ``trimmed_mean`` (Flower's ``trim_mean``:
    per coordinate, the mean after cutting ``trim_fraction`` of the values at each end). Unweighted:
    a poisoned minority can shift neither, whatever its values or its claimed numbers of examples."""
    out = {}
    for key in states[0]:
        stacked = np.stack([s[key].double().numpy() for s in states])
        value = np.median(stacked, axis=0) if kind == "median" else trim_mean(stacked, trim_fraction)
        out[key] = torch.from_numpy(np.asarray(value)).to(states[0][key].dtype)
    return out


def _reason(err: Exception) -> str:
    """The rejection reason of a check that failed, or of anything unexpected a reply caused."""
    if isinstance(err, ReplyRejectedError):
        return str(err.args[0])
    return f"malformed reply ({type(err).__name__}: {err})"


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
