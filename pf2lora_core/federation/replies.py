"""A reply as plain data, and the decision on it: a typed train / evaluate reply, or a rejection with its reason.

The strategy turns each Flower reply into a ``Reply`` (record names, metrics, configs, the arrays'
declared shape and dtype with a decoder that never unpickles) and asks a ``ReplyChecker``; every
check is in ``pf2lora_core.federation.checks``. What the checker needs to know about the round
(the node's client, what was sent to it, who already replied) comes in as arguments, so the same
reply always gets the same answer and each rule is testable on a dict.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pf2lora_core.config.keys import (
    ARRAYS_KEY,
    COMPUTE_SECONDS,
    EVAL_BLOCKS,
    EVAL_METRIC_NAMES,
    EVAL_REQUIRED_BLOCKS,
    FLOPS_PER_CLIENT_EVALUATION,
    METRICS_KEY,
    NUM_EXAMPLES,
    NUM_VALIDATION,
    TRAIN_LOSS,
    UPDATE_NORM,
)
from pf2lora_core.config.schema import FederationConfig
from pf2lora_core.federation.checks import (
    Spec,
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
from pf2lora_core.federation.node_policy import LABEL_HISTOGRAM
from pf2lora_core.federation.protocol import CLIENT_KEY, DETAILS_KEY, split_metrics
from pf2lora_core.run.records import out_of_bounds

log = logging.getLogger("pf2lora.server")
TRAIN, EVALUATE = "train", "evaluate"
VALIDATION_PHASE = "validation"  # an evaluate reply's num-validation, bounded like its num-examples
TRAIN_REQUIRED = (CLIENT_KEY, NUM_EXAMPLES, TRAIN_LOSS)
# an evaluate reply's plain keys (the rest are <block>.<metric>)
EVAL_SCALARS = frozenset({CLIENT_KEY, NUM_EXAMPLES, NUM_VALIDATION, COMPUTE_SECONDS, FLOPS_PER_CLIENT_EVALUATION})
Decoder = Callable[[], np.ndarray]


class ReplyRejectedError(Exception):
    """A reply that may not enter the round; ``args[0]`` is the reason."""


@dataclass
class Reply:
    """A reply as the server received it, in plain data.

    ``arrays``: record name -> array name -> (declared shape, declared dtype, decoder); the
    decoder is only called once the declared structure passed. ``error``: the reply's error
    reason (a client that failed), else None.
    """

    node: int
    error: str | None = None
    arrays: dict[str, dict[str, tuple[tuple[int, ...], np.dtype, Decoder]]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TrainReply:
    client: int
    arrays: dict[str, np.ndarray]  # decoded, finite, within the update-norm bound
    weight: float  # the trusted num-examples
    metrics: dict[str, float]


@dataclass
class EvaluateReply:
    client: int
    entry: dict[str, Any]  # evaluation blocks, counts, rank (and the label histogram a site opted to share)


@dataclass(frozen=True)
class ReplyLimits:
    """The bounds a reply is held to (the ``federation`` config section)."""

    max_update_norm: float = 0.0  # 0 = not bounded
    update_norm_action: str = "reject"  # reject | clip
    max_num_examples: int = 10_000_000
    num_examples_mismatch: str = "clip"  # clip | reject

    @classmethod
    def of(cls, fed: FederationConfig) -> ReplyLimits:
        norm = fed.max_update_norm
        if isinstance(norm, bool) or not isinstance(norm, (int, float)):
            raise ValueError(
                f"federation.max_update_norm={norm!r}: resolve it to a number for the run first "
                "(pf2lora_core.federation.checks.resolved_federation)"
            )
        return cls(float(norm), fed.update_norm_action, fed.max_num_examples, fed.num_examples_mismatch)


class ReplyChecker:
    """Decides on train and evaluate replies; remembers each client's first declared example counts.

    Parameters
    ----------
    limits : ReplyLimits
        Norm and example-count bounds.
    metric : str
        The task's metric (every evaluated block must hold it).
    check_uplink : callable
        The algorithm's structural check of a common-level uplink: ``(expected, declared) -> reason or None``.
    known_examples : mapping
        Client -> (train, test[, validation]) sizes the server knows (simulation); empty in
        deployment, where the first value each client declares bounds its later ones.
    num_labels : int, optional
        The classification head's size: a shared label histogram must have one count per label.
    pooled_training : bool
        The centralized reference: one node trains on every client's data (its weight is their sum).
    """

    def __init__(
        self,
        limits: ReplyLimits,
        metric: str,
        check_uplink: Callable[[Mapping[str, Spec], Mapping[str, Spec]], str | None],
        known_examples: Mapping[int, tuple[int, ...]] | None = None,
        pooled_training: bool = False,
        num_labels: int | None = None,
    ) -> None:
        self.limits = limits
        self.metric = metric
        self.check_uplink = check_uplink
        self.known_examples = dict(known_examples or {})
        self.pooled_training = pooled_training
        self.num_labels = num_labels
        self.declared: dict[tuple[str, int], float] = {}

    # ---------------------------------------------------------------------------- train
    def train(
        self,
        reply: Reply,
        expected_client: int | None,
        sent: Mapping[str, np.ndarray] | None,
        fresh: Mapping[str, np.ndarray],
        already: set[int] | frozenset[int] = frozenset(),
        audit: Callable[[dict[str, np.ndarray]], None] | None = None,
    ) -> TrainReply:
        """A train reply of the node's own client, structurally as sent, finite and bounded.

        ``sent``: the arrays sent to this node this round (None: nothing was); ``fresh``: the
        seeded initial common level (reference of FLoRA's fresh adapters); ``already``: clients
        whose train reply this round was accepted; ``audit``: called with the decoded arrays of a
        structurally valid reply, before its values are judged (a hostile reply is kept as sent).
        """
        if reply.error is not None:
            raise ReplyRejectedError(f"client error: {reply.error}")
        if set(reply.arrays) != {ARRAYS_KEY} or set(reply.metrics) != {METRICS_KEY} or reply.configs:
            raise ReplyRejectedError(
                f"expected one ArrayRecord '{ARRAYS_KEY}' and one MetricRecord '{METRICS_KEY}' (no ConfigRecord), "
                f"got {truncate(str(sorted(reply.arrays)), 80)} / {truncate(str(sorted(reply.metrics)), 80)} / "
                f"{truncate(str(sorted(reply.configs)), 80)}"
            )
        client, metrics = self._client_metrics(reply, expected_client)
        reason = check_required(metrics, TRAIN_REQUIRED) or check_scalars(metrics) or check_bounds(metrics)
        if reason is not None:
            raise ReplyRejectedError(reason)
        if sent is None:
            raise ReplyRejectedError("no training message was sent to this node this round")
        if client in already:
            raise ReplyRejectedError(f"a second training reply from client {client} this round")
        weight = self.weight(TRAIN, client, metrics[NUM_EXAMPLES])
        arrays = reply.arrays[ARRAYS_KEY]
        expected = {k: (v.shape, v.dtype) for k, v in sent.items()}
        declared = {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype, _) in arrays.items()}
        reason = self.check_uplink(expected, declared)  # before any bytes are decoded
        if reason is not None:
            raise ReplyRejectedError(reason)
        decoded, reason = decode_checked({k: decode for k, (_, _, decode) in arrays.items()}, declared)
        if reason is not None:
            raise ReplyRejectedError(reason)
        if audit is not None:
            audit(decoded)
        reason = check_values(decoded)
        if reason is not None:
            raise ReplyRejectedError(reason)
        bounded, norm = self.bounded(client, decoded, sent, fresh)
        # the server's own measure of the update, recorded in every mode (the client cannot set it)
        return TrainReply(client, bounded, weight, {**{k: float(v) for k, v in metrics.items()}, UPDATE_NORM: norm})

    def bounded(
        self,
        client: int,
        decoded: dict[str, np.ndarray],
        sent: Mapping[str, np.ndarray],
        fresh: Mapping[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], float]:
        """``decoded`` within ``max_update_norm`` of what it updates (``update_reference``): clipped or
        rejected; and its norm as received (measured whether or not a bound is set)."""
        cap = self.limits.max_update_norm
        reference = update_reference(decoded, sent, fresh)
        norm = update_norm(decoded, reference)
        if cap <= 0 or norm <= cap:
            return decoded, norm
        why = f"update norm {norm:.4g} exceeds federation.max_update_norm={cap:.4g}"
        if self.limits.update_norm_action != "clip":
            raise ReplyRejectedError(why)
        log.warning("client %d: %s; clipped to it", client, why)
        return clip_update(decoded, reference, cap), norm

    # ---------------------------------------------------------------------------- evaluate
    def evaluate(
        self,
        reply: Reply,
        expected_client: int | None,
        was_sent: bool,
        already: set[int] | frozenset[int] = frozenset(),
    ) -> EvaluateReply:
        """An evaluate reply held to the train reply's standard: the node's own client, the allow-listed
        metric names (``EVAL_BLOCKS`` x ``EVAL_METRIC_NAMES``), numbers only, a trusted ``num-examples``,
        details within size and depth caps."""
        configs = set(reply.configs)
        if reply.arrays or set(reply.metrics) != {METRICS_KEY} or configs - {DETAILS_KEY}:
            raise ReplyRejectedError(
                f"expected one MetricRecord '{METRICS_KEY}' (and a ConfigRecord '{DETAILS_KEY}'), got arrays "
                f"{sorted(reply.arrays)}, metrics {sorted(reply.metrics)}, configs {sorted(configs)}"
            )
        client, metrics = self._client_metrics(reply, expected_client)
        reason = (
            check_eval_metrics(metrics, self.metric, EVAL_BLOCKS, EVAL_REQUIRED_BLOCKS, EVAL_METRIC_NAMES, EVAL_SCALARS)
            or check_required(metrics, (NUM_EXAMPLES,))
            or check_bounds(metrics, allow_nan=True)
        )
        if reason is not None:
            raise ReplyRejectedError(reason)
        if not was_sent:
            raise ReplyRejectedError("no evaluation message was sent to this node this round")
        if client in already:
            raise ReplyRejectedError(f"a second evaluation reply from client {client} this round")
        details = self._details(reply.configs.get(DETAILS_KEY))
        weight = self.weight(EVALUATE, client, metrics[NUM_EXAMPLES])
        validation = metrics.get(NUM_VALIDATION, 0)  # weights the validation means only; optional
        if validation:
            validation = self.weight(VALIDATION_PHASE, client, validation)
        flat = {k: float(v) for k, v in metrics.items() if k != CLIENT_KEY}
        entry = split_metrics({**flat, NUM_EXAMPLES: int(weight), NUM_VALIDATION: int(validation)})
        entry["rank"] = details.get("rank", {})
        if LABEL_HISTOGRAM in details:  # only from a site that opted in (share-data-stats)
            entry[LABEL_HISTOGRAM] = details[LABEL_HISTOGRAM]
        return EvaluateReply(client, entry)

    def _details(self, record: Mapping[str, Any] | None) -> dict[str, Any]:
        if record is not None and set(record) - {DETAILS_KEY}:
            raise ReplyRejectedError(f"ConfigRecord '{DETAILS_KEY}' holds keys other than '{DETAILS_KEY}'")
        details, reason = parse_details(record.get(DETAILS_KEY) if record is not None else None, self.num_labels)
        if reason is not None:
            raise ReplyRejectedError(reason)
        return details

    # ---------------------------------------------------------------------------- shared
    @staticmethod
    def _client_metrics(reply: Reply, expected: int | None) -> tuple[int, dict[str, Any]]:
        """The reply's one MetricRecord and the client it is from; rejected unless the node is that client."""
        metrics = dict(reply.metrics[METRICS_KEY])
        if expected is None:
            raise ReplyRejectedError(f"node {reply.node} has not identified itself as a client")
        claimed = metrics.get(CLIENT_KEY)
        if isinstance(claimed, bool) or not isinstance(claimed, (int, float)) or claimed != expected:
            raise ReplyRejectedError(f"claims client {truncate(repr(claimed), 40)} but the node is client {expected}")
        return expected, metrics

    def weight(self, phase: str, client: int, value: object) -> float:
        """The trusted ``num-examples`` of a reply (see ``check_num_examples``); rejected if not acceptable.

        Bounded by what the server knows the client holds (simulation: its partition; the pooled
        reference: every partition), else by what the client declared first (deployment).
        """
        sizes = self.known_examples
        index = {TRAIN: 0, EVALUATE: 1, VALIDATION_PHASE: 2}[phase]
        if sizes and phase == TRAIN and self.pooled_training:
            known: float | None = sum(s[0] for s in sizes.values())
        elif sizes and client in sizes and len(sizes[client]) > index:
            known = sizes[client][index]
        else:  # deployment (or a size the server was not told): the client's first declaration bounds the rest
            known = self.declared.get((phase, client))
        weight, reason = check_num_examples(
            value, known, self.limits.max_num_examples, self.limits.num_examples_mismatch
        )  # fmt: skip
        if reason is not None:
            raise ReplyRejectedError(
                reason if phase != VALIDATION_PHASE else reason.replace(NUM_EXAMPLES, NUM_VALIDATION)
            )
        if weight != value:
            log.warning("%s reply of client %d: %s %s clipped to %g", phase, client, _count_key(phase), value, weight)
        self.declared.setdefault((phase, client), weight)
        return weight


def _count_key(phase: str) -> str:
    return NUM_VALIDATION if phase == VALIDATION_PHASE else NUM_EXAMPLES


def check_bounds(metrics: Mapping[str, Any], allow_nan: bool = False) -> str | None:
    """Every number within its bound (``records.METRIC_BOUNDS``; ``<block>.<metric>`` by its metric).

    ``allow_nan``: an evaluate reply's NaN marks a metric the algorithm cannot measure (recorded
    as null). The counts (``num-examples``, ``num-validation``) are bounded by ``weight``."""
    for key, value in metrics.items():
        if key in (CLIENT_KEY, NUM_EXAMPLES, NUM_VALIDATION) or (allow_nan and math.isnan(value)):
            continue
        reason = out_of_bounds(key.rpartition(".")[2], float(value))
        if reason is not None:
            return f"metric {truncate(key, 60)}: {reason}"
    return None


def stale_reason(node: int, reply_to: str, sent_ids: Mapping[int, str]) -> str | None:
    """Why a reply from ``node`` that answers message ``reply_to`` does not count this round, else None.

    A reply counts only for the message this round sent to that very node: a reply replayed from an
    earlier round, or one answering another node's message, is not this node's update."""
    expected = sent_ids.get(node)
    if expected is None:
        return f"node {node} was sent no message this round"
    if reply_to != expected:
        return f"answers message {truncate(reply_to or '(none)', 16)}, not the one sent to node {node} this round"
    return None


def rejection_reason(err: Exception) -> str:
    """The rejection reason of a check that failed, or of anything unexpected a reply caused."""
    if isinstance(err, ReplyRejectedError):
        return str(err.args[0])
    return f"malformed reply ({type(err).__name__}: {err})"
