"""Tasks: the loss a client optimises and the metrics it reports.

A task never knows which algorithm runs; algorithms never know which task they train.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pf2lora_core.constants import ACCURACY, EVAL_LOSS, MCC

Batch = dict[str, Tensor]


def accuracy(preds: Tensor, labels: Tensor) -> float:
    return float((preds == labels).float().mean()) if labels.numel() else float("nan")


def matthews_correlation(preds: Tensor, labels: Tensor) -> float:
    """Multi-class Matthews correlation (Gorodkin 2004); 0 when undefined, as in scikit-learn."""
    k = int(max(int(preds.max()), int(labels.max())) + 1) if labels.numel() else 0
    if k == 0:
        return float("nan")
    cm = torch.zeros(k, k, dtype=torch.float64)
    cm.index_put_((labels.long(), preds.long()), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    t, p = cm.sum(1), cm.sum(0)
    c, s = cm.trace(), cm.sum()
    num = c * s - (t * p).sum()
    den = math.sqrt(float((s**2 - (p * p).sum()) * (s**2 - (t * t).sum())))
    return 0.0 if den == 0 else float(num / den)


METRICS: dict[str, Callable[[Tensor, Tensor], float]] = {ACCURACY: accuracy, MCC: matthews_correlation}


class ClassificationTask:
    """Sequence classification: cross-entropy on the labels; accuracy or MCC."""

    def __init__(self, metric: str, device: torch.device, autocast: Callable[[], Any]) -> None:
        if metric not in METRICS:
            raise ValueError(f"task.metric={metric!r}: choose one of {sorted(METRICS)}")
        self.metric = metric
        self.device = device
        self.autocast = autocast

    def _to(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: Batch, params: dict[str, Tensor] | None = None) -> Tensor:
        batch = self._to(batch)
        with self.autocast():
            if params is None:
                logits = model(**_inputs(batch)).logits
            else:
                logits = functional_call(model, params, args=(), kwargs=_inputs(batch), strict=False).logits
        return nn.functional.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        around: Callable[[Batch], AbstractContextManager[Any]] | None = None,
    ) -> dict[str, float]:
        """Loss and metric over ``batches``; ``around(batch)`` wraps each batch's forward
        (e.g. per-instance adapter weights)."""
        was_training = model.training
        model.eval()
        preds, labels, loss_sum, n = [], [], 0.0, 0
        for batch in batches:
            batch = self._to(batch)
            with self.autocast(), around(batch) if around else nullcontext():
                logits = model(**_inputs(batch)).logits.float()
            loss_sum += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            n += len(batch["labels"])
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        model.train(was_training)
        if n == 0:
            return {EVAL_LOSS: float("nan"), self.metric: float("nan")}
        p, y = torch.cat(preds), torch.cat(labels)
        return {EVAL_LOSS: loss_sum / n, self.metric: METRICS[self.metric](p, y)}

    @torch.no_grad()
    def embed(self, model: nn.Module, batch: Batch) -> Tensor:
        """One vector per row: the last hidden layer averaged over the row's real tokens (eval mode)."""
        was_training = model.training
        model.eval()
        batch = self._to(batch)
        try:
            with self.autocast():
                hidden = model(**_inputs(batch), output_hidden_states=True).hidden_states[-1].float()
        finally:
            model.train(was_training)
        mask = batch.get("attention_mask")
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != "labels"}
