"""The round record: what one round produced, and the ``metrics.jsonl`` line it becomes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pf2lora_core.config.keys import (
    COMPUTE_SECONDS,
    EVAL_KINDS,
    FLOPS_PER_CLIENT_EVALUATION,
    NUM_EXAMPLES,
    TRAIN_LOSS,
)
from pf2lora_core.federation.checks import truncate
from pf2lora_core.run.records import RoundRecord
from pf2lora_core.run.summary import evaluation_blocks


@dataclass
class RoundLog:
    """What one round produced; ``record`` makes it a line of metrics.jsonl."""

    round: int
    started: float = field(default_factory=time.time)
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[int, dict[str, Any]] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    aggregated: bool = False
    missing: list[dict[str, Any]] = field(default_factory=list)  # sampled, no reply within the timeout
    check_s: float = 0.0  # seconds the server spent checking this round's replies

    def reject(self, label: str, reason: str, phase: str = "") -> dict[str, Any]:
        """Record a rejected reply (reason truncated); returns the entry."""
        entry: dict[str, Any] = {"client": label, "reason": truncate(reason)}
        if phase:
            entry["phase"] = phase
        self.rejected.append(entry)
        return entry

    def train_loss(self) -> float | None:
        """The round's training loss: the clients' losses weighted by their trusted example counts."""
        weights = [v[NUM_EXAMPLES] for v in self.train.values()]
        losses = [v[TRAIN_LOSS] for v in self.train.values()]
        return sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights) if weights else None

    def record(self, elapsed: float, metric: str) -> RoundRecord:
        """The metrics.jsonl line of this round; ``elapsed``: the run's seconds so far."""
        evaluated = bool(self.evaluation)
        return RoundRecord(
            round=self.round,
            seconds=time.time() - self.started,
            elapsed=elapsed,
            train_loss=self.train_loss(),
            clients_trained=len(self.train),
            aggregated=self.aggregated,
            rejected=self.rejected,
            missing=self.missing,
            bytes_down=self.bytes_down,
            bytes_up=self.bytes_up,
            train=dict(sorted(self.train.items())),
            # the clients' own work this round (train + evaluate), for the round-overhead ratio
            client_compute_s=sum(v.get(COMPUTE_SECONDS, 0.0) for v in self.train.values())
            + sum(e.get(COMPUTE_SECONDS, 0.0) for e in self.evaluation.values()),
            # personalized / global on test, validation / validation_global on the validation split
            kinds=evaluation_blocks(self.evaluation, metric) if evaluated else {},
            clients={
                c: {
                    **{kind: e.get(kind, {}) for kind in EVAL_KINDS},
                    "rank": e["rank"].get("effective"),
                    **(
                        {FLOPS_PER_CLIENT_EVALUATION: e[FLOPS_PER_CLIENT_EVALUATION]}
                        if FLOPS_PER_CLIENT_EVALUATION in e
                        else {}
                    ),
                }
                for c, e in sorted(self.evaluation.items())
            },
            server_check_s=self.check_s,
        )


def trained_before(history: Sequence[RoundRecord], client: int) -> int:
    """The last round in ``history`` whose aggregate included ``client``'s reply; 0 = never."""
    return max((h.round for h in history if h.aggregated and client in h.train), default=0)
