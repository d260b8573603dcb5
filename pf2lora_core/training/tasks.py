"""Tasks: the loss a client optimises and the metrics it reports.

A task never knows which algorithm runs; algorithms never know which task they train. Every task
offers the same four things (``Task``): ``loss`` of a batch (optionally with substituted
parameters, for the hypergradient), ``batches`` of a split, ``evaluate`` on a test split and
``embed`` (per-row representations, for FedDPA's instance-wise mixing). ``TASKS`` maps
``task.kind`` to the class; ``make_task`` builds one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import datasets
import torch
from torch import Tensor, nn
from torch.func import functional_call

from pf2lora_core import data
from pf2lora_core.config.keys import ACCURACY, BALANCED_ACCURACY, EVAL_LOSS, MCC, METEOR, PERPLEXITY
from pf2lora_core.config.schema import GenerationConfig, TaskConfig
from pf2lora_core.data.columns import (
    ATTENTION_MASK,
    IGNORE_INDEX,
    INPUT_IDS,
    LABELS,
    PROMPT,
    PROMPT_LENGTH,
    TARGET,
)
from pf2lora_core.data.sources import CAUSAL_LM, CLASSIFICATION
from pf2lora_core.training.generation_metrics import GENERATION_METRICS, perplexity, wordnet

Batch = dict[str, Tensor]
Around = Callable[[Batch], AbstractContextManager[Any]]


def accuracy(preds: Tensor, labels: Tensor) -> float:
    return float((preds == labels).float().mean()) if labels.numel() else float("nan")


def balanced_accuracy(preds: Tensor, labels: Tensor) -> float:
    """Mean recall over the classes present in ``labels``: ``(1/|C|) sum_c #{pred = y = c} / #{y = c}``.

    A model that predicts one label everywhere scores ``1/|C|`` whatever the label mix, so a score
    that only reflects the label prior shows as what it is (scikit-learn's ``balanced_accuracy_score``).
    """
    classes = torch.unique(labels)
    if classes.numel() == 0:
        return float("nan")
    return float(torch.stack([(preds[labels == c] == c).float().mean() for c in classes]).mean())


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


class Task(Protocol):
    """What a client's runtime and the algorithms need of a task."""

    kind: str
    metric: str  # the metric summaries rank clients by

    def loss(self, model: nn.Module, batch: Batch, params: dict[str, Tensor] | None = None) -> Tensor: ...

    def batches(self, ds: datasets.Dataset, shuffle: bool, seed: int) -> data.Batches: ...

    def evaluate(self, model: nn.Module, ds: datasets.Dataset, around: Around | None = None) -> dict[str, float]: ...

    def embed(self, model: nn.Module, batch: Batch) -> Tensor: ...


class _TokenTask:
    """What every task over tokenized text shares: device moves, batching, mean-pooled embeddings."""

    kind: str
    metric: str

    def __init__(
        self, device: torch.device, autocast: Callable[[], Any], tokenizer: Any, batch_size: int, eval_batch_size: int
    ) -> None:
        self.device = device
        self.autocast = autocast
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size

    def _to(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def batches(self, ds: datasets.Dataset, shuffle: bool, seed: int) -> data.Batches:
        """Training batches (``shuffle``) of ``ds``, collated for this task."""
        return data.batches(ds, self.batch_size, self.tokenizer, shuffle=shuffle, seed=seed, kind=self.kind)

    def _eval_batches(self, ds: datasets.Dataset) -> data.Batches:
        return data.batches(ds, self.eval_batch_size, self.tokenizer, shuffle=False, seed=0, kind=self.kind)

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
        mask = batch.get(ATTENTION_MASK)
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class ClassificationTask(_TokenTask):
    """Sequence classification: cross-entropy on the labels; accuracy or MCC."""

    kind = CLASSIFICATION

    def __init__(
        self,
        metric: str,
        device: torch.device,
        autocast: Callable[[], Any],
        tokenizer: Any = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"task.metric={metric!r}: choose one of {sorted(METRICS)}")
        super().__init__(device, autocast, tokenizer, batch_size, eval_batch_size)
        self.metric = metric

    @classmethod
    def from_config(
        cls, task: TaskConfig, generation: GenerationConfig, tokenizer: Any, device: torch.device, autocast: Callable
    ) -> ClassificationTask:
        return cls(task.metric, device, autocast, tokenizer, task.batch_size, task.eval_batch_size)

    def loss(self, model: nn.Module, batch: Batch, params: dict[str, Tensor] | None = None) -> Tensor:
        batch = self._to(batch)
        with self.autocast():
            if params is None:
                logits = model(**_inputs(batch)).logits
            else:
                logits = functional_call(model, params, args=(), kwargs=_inputs(batch), strict=False).logits
        return nn.functional.cross_entropy(logits.float(), batch["labels"])

    def evaluate(self, model: nn.Module, ds: datasets.Dataset, around: Around | None = None) -> dict[str, float]:
        """Loss and metric on the split ``ds``; ``around(batch)`` wraps each batch's forward
        (e.g. per-instance adapter weights)."""
        return self.evaluate_batches(model, self._eval_batches(ds), around)

    @torch.no_grad()
    def evaluate_batches(
        self, model: nn.Module, batches: Iterable[Batch], around: Around | None = None
    ) -> dict[str, float]:
        """Loss and metric over ``batches``."""
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
            return {EVAL_LOSS: float("nan"), self.metric: float("nan"), BALANCED_ACCURACY: float("nan")}
        p, y = torch.cat(preds), torch.cat(labels)
        return {
            EVAL_LOSS: loss_sum / n,
            self.metric: METRICS[self.metric](p, y),
            BALANCED_ACCURACY: balanced_accuracy(p, y),
        }


def _inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != LABELS}


class CausalLMTask(_TokenTask):
    """Causal language modelling: next-token cross-entropy on target tokens, generation metrics.

    The loss is the mean cross-entropy of predicting each target token from everything before it;
    prompt and padding positions carry ``IGNORE_INDEX`` and are left out. Evaluation reports the
    held-out targets' perplexity (``exp`` of the mean token NLL over all of the split's target
    tokens) and, for ``generation.metrics``, BLEU / ROUGE-L / METEOR of decoded continuations:
    one hypothesis per distinct prompt (greedy or beam search, left-padded batches), scored
    against every target of that prompt in the split.
    """

    kind = CAUSAL_LM

    def __init__(
        self,
        metric: str,
        device: torch.device,
        autocast: Callable[[], Any],
        tokenizer: Any,
        batch_size: int,
        eval_batch_size: int,
        generation: GenerationConfig,
    ) -> None:
        problem = generation_metrics_problem(metric, generation.metrics)
        if problem is not None:
            raise ValueError(f"{problem[0]}: {problem[1]}")
        if METEOR in generation.metrics:
            wordnet()  # a missing WordNet fails here, when the client starts, not after a round of training
        super().__init__(device, autocast, tokenizer, batch_size, eval_batch_size)
        self.metric = metric
        self.generation = generation

    @classmethod
    def from_config(
        cls, task: TaskConfig, generation: GenerationConfig, tokenizer: Any, device: torch.device, autocast: Callable
    ) -> CausalLMTask:
        return cls(task.metric, device, autocast, tokenizer, task.batch_size, task.eval_batch_size, generation)

    def loss(self, model: nn.Module, batch: Batch, params: dict[str, Tensor] | None = None) -> Tensor:
        batch = self._to(batch)
        inputs = _inputs(batch)
        with self.autocast():
            if params is None:
                logits = model(**inputs).logits
            else:
                logits = functional_call(model, params, args=(), kwargs=inputs, strict=False).logits
        return token_cross_entropy(logits.float(), batch[LABELS])

    def evaluate(self, model: nn.Module, ds: datasets.Dataset, around: Around | None = None) -> dict[str, float]:
        """Perplexity of the split's targets, then the generation metrics of its distinct prompts."""
        was_training = model.training
        model.eval()
        try:
            out = self._perplexity(model, ds, around)
            if self.generation.metrics:
                hypotheses, references = self.generate(model, ds, around)
                for name in self.generation.metrics:
                    out[name] = GENERATION_METRICS[name](hypotheses, references) if hypotheses else float("nan")
        finally:
            model.train(was_training)
        return out

    @torch.no_grad()
    def _perplexity(self, model: nn.Module, ds: datasets.Dataset, around: Around | None) -> dict[str, float]:
        nll, tokens = 0.0, 0
        for batch in self._eval_batches(ds):
            batch = self._to(batch)
            with self.autocast(), around(batch) if around else nullcontext():
                logits = model(**_inputs(batch)).logits.float()
            nll += float(token_cross_entropy(logits, batch[LABELS], reduction="sum"))
            tokens += int((batch[LABELS][:, 1:] != IGNORE_INDEX).sum())
        return {EVAL_LOSS: nll / tokens if tokens else float("nan"), PERPLEXITY: perplexity(nll, tokens)}

    @torch.no_grad()
    def generate(
        self, model: nn.Module, ds: datasets.Dataset, around: Around | None = None
    ) -> tuple[list[str], list[list[str]]]:
        """One decoded continuation per distinct prompt of ``ds`` and that prompt's references."""
        prompts, references = group_references(ds)
        gen = self.generation
        if around is not None and gen.num_beams > 1:
            raise ValueError("per-instance adapter weights (FedDPA instance mixing) need generation.num_beams=1")
        hypotheses: list[str] = []
        for start in range(0, len(prompts), gen.batch_size):
            batch = self._to(left_pad([ids for ids, _ in prompts[start : start + gen.batch_size]], self.pad_id))
            with self.autocast(), around(batch) if around else nullcontext():
                output = model.generate(
                    **batch,
                    max_new_tokens=gen.max_new_tokens,
                    num_beams=gen.num_beams,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
            new = output[:, batch[INPUT_IDS].shape[1] :]
            hypotheses.extend(t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return hypotheses, references

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def generation_metrics_problem(metric: str, metrics: Sequence[str]) -> tuple[str, str] | None:
    """``(key, what is wrong)`` when a causal-LM task cannot report ``metric`` with ``metrics``, else None."""
    valid = [PERPLEXITY, *GENERATION_METRICS]
    unknown = sorted(set(metrics) - set(GENERATION_METRICS))
    if metric not in valid:
        return "task.metric", f"a causal_lm task reports one of {valid}, got {metric!r}"
    if unknown:
        return "generation.metrics", f"unknown {unknown}; choose from {sorted(GENERATION_METRICS)}"
    if metric != PERPLEXITY and metric not in metrics:
        return "task.metric", f"{metric!r} is not computed: add it to generation.metrics"
    return None


def token_cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy: position t predicts token t + 1; ``IGNORE_INDEX`` labels are skipped.

    ``sum_t -log p(y_{t+1} | y_<=t) / #{t : y_{t+1} not ignored}`` (``reduction="mean"``).
    """
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    return nn.functional.cross_entropy(
        shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def group_references(ds: datasets.Dataset) -> tuple[list[tuple[list[int], str]], list[list[str]]]:
    """Distinct prompts of a tokenized causal-LM split (first-appearance order) and their targets.

    Returns ``[(prompt token ids, prompt text)]`` and, aligned, each prompt's reference texts.
    """
    index: dict[str, int] = {}
    prompts: list[tuple[list[int], str]] = []
    references: list[list[str]] = []
    for ids, length, prompt, target in zip(ds[INPUT_IDS], ds[PROMPT_LENGTH], ds[PROMPT], ds[TARGET], strict=True):
        if prompt not in index:
            index[prompt] = len(prompts)
            prompts.append((list(ids[:length]), prompt))
            references.append([])
        references[index[prompt]].append(target.strip())
    return prompts, references


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Left-padded ``input_ids`` and ``attention_mask``: every prompt ends where generation starts."""
    width = max(len(s) for s in sequences)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return {INPUT_IDS: torch.tensor(ids, dtype=torch.long), ATTENTION_MASK: torch.tensor(mask, dtype=torch.long)}


TASKS: dict[str, type[ClassificationTask] | type[CausalLMTask]] = {
    CLASSIFICATION: ClassificationTask,
    CAUSAL_LM: CausalLMTask,
}


def make_task(
    task: TaskConfig,
    generation: GenerationConfig,
    tokenizer: Any,
    device: torch.device,
    autocast: Callable[[], Any],
) -> Task:
    """The task object for ``task.kind`` (``TASKS``)."""
    if task.kind not in TASKS:
        raise ValueError(f"task.kind={task.kind!r}: choose one of {sorted(TASKS)}")
    return TASKS[task.kind].from_config(task, generation, tokenizer, device, autocast)
