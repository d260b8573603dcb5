"""Per-FedAvg: a shared LoRA trained so that one local gradient step personalizes it (MAML in FL).

Fallah, Mokhtari, Ozdaglar, "Personalized Federated Learning with Theoretical Guarantees: A
Model-Agnostic Meta-Learning Approach" (NeurIPS 2020, arXiv 2002.07948), Algorithm 1, on the
common level ``w`` (one LoRA adapter of rank ``rank`` plus the head, as HOMLoRA). Client i's
meta-objective is ``F_i(w) = f_i(w - a grad f_i(w))``; each local step draws independent batches
``D, D', D''`` and updates (a = ``inner_lr``, b = ``lr``)::

    w~ = w - a grad f(w; D)                                       (inner step, plain SGD)
    g  = grad f(w~; D')                                           (outer gradient at w~)
    w  = w - b g                                                  (first_order, Per-FedAvg (FO))
    w  = w - b (I - a H(w; D'')) g                                (hessian_free, Per-FedAvg (HF))

with the paper's Hessian-free product, a central difference of gradients (``hvp_central``)::

    H(w; D'') g ~= (grad f(w + d g; D'') - grad f(w - d g; D'')) / (2 d),   d = fd_eps / ||g||

A step costs two gradient passes (FO) or four (HF); the train metrics report ``gradient_passes``
per round. With ``one_batch_per_step: true`` (default, the harness's equal budget) a step consumes
ONE minibatch of ``task.batch_size`` like every other algorithm: ``D, D'`` (and ``D''``) are its
two (three) disjoint slices of near-equal size (``torch.tensor_split`` of the rows; a minibatch
with fewer rows than slices is used whole for each). ``false`` is the paper's schedule: two (FO)
or three (HF) independent minibatches per step, so a round reads 2K or 3K minibatches. After K local
steps the client sends ``w``; the server averages. The personalized model of a client is the
shared ``w`` after ONE plain SGD step of size a on one batch of its own training data
(``personalize``, run by the client right before its personalized evaluation; the harness
restores ``w`` afterwards); "global" is ``w`` as is.

Choices the paper leaves open (or that this harness fixes), and ours:

- *Outer optimizer.* The paper's update is plain SGD with step b (``optimizer: sgd``). By default
  we feed the same meta-gradient to AdamW (``optimizer: adamw``, fresh every round), the optimizer
  every other algorithm here uses for its shared adapter with the same ``lr``: plain SGD on LoRA
  factors needs a step orders of magnitude larger than AdamW's, so the comparison would otherwise
  mostly compare optimizers. The inner step and ``personalize`` stay plain SGD, as in the paper.
- *Aggregation.* The paper averages the selected clients uniformly; we keep the harness's FedAvg
  weighted by examples, like every baseline, so that only the local update differs.
- *Batches.* The paper samples ``D, D', D''`` independently. By default we cut one minibatch into
  disjoint slices (same examples per step as every baseline; the slices are still independent
  draws from the client's data, each a third or half the size); ``one_batch_per_step: false``
  takes them as consecutive batches of the client's shuffled stream (a round of K steps reads 2K
  or 3K batches, wrapping around the client's data when needed). The two passes of the finite
  difference share one batch and one dropout mask.
- *delta.* The paper takes a small constant delta; we scale it by ``1 / ||g||`` (as PF2LoRA's
  finite difference), so the probe moves ``w`` by exactly ``fd_eps`` whatever the size of ``g``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams, _positive
from pf2lora_core.config.keys import COMMON, GRADIENT_PASSES, TRAIN_LOSS
from pf2lora_core.training.adapters import AdapterSpec
from pf2lora_core.training.hypergrad import LossFn, _norm

FIRST_ORDER = "first_order"
HESSIAN_FREE = "hessian_free"
VARIANTS = (FIRST_ORDER, HESSIAN_FREE)
OPTIMIZERS = ("adamw", "sgd")
ADAPTED_LOSS = "adapted_loss"  # f(w~; D'), the meta-objective the step descends
# (batches D, D', D'', gradient passes) of one local step per variant: see the module docstring
STEP_COST = {FIRST_ORDER: (2, 2), HESSIAN_FREE: (3, 4)}


@dataclass
class PerFedAvgParams(LoRAParams):
    inner_lr: float  # a: the inner SGD step, also the one personalization step before evaluation
    variant: str  # first_order | hessian_free
    fd_eps: float  # hessian_free: finite-difference step d = fd_eps / ||g||
    optimizer: str  # adamw | sgd: the outer update with step b = lr
    one_batch_per_step: bool  # true: D, D', D'' are slices of one minibatch | false: one minibatch each

    def validate(self) -> None:
        super().validate()
        _positive(self, "inner_lr", "fd_eps")
        if self.variant not in VARIANTS:
            raise ValueError(f"algorithm.variant={self.variant!r}: choose one of {VARIANTS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"algorithm.optimizer={self.optimizer!r}: choose one of {OPTIMIZERS}")


def slice_batch(batch: Any, parts: int) -> list[Any]:
    """``parts`` disjoint row slices of a collated minibatch (near-equal sizes, order kept).

    ``batch`` is a mapping of tensors (a tokenized batch) or a tuple of tensors, rows first. A
    minibatch with fewer rows than ``parts`` cannot be cut without an empty slice: it is then
    returned whole ``parts`` times.
    """
    tensors = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    rows = tensors[0].shape[0]
    if rows < parts:
        return [batch] * parts
    index = torch.tensor_split(torch.arange(rows), parts)
    if isinstance(batch, Mapping):
        return [{k: v[i.to(v.device)] for k, v in batch.items()} for i in index]
    return [tuple(v[i.to(v.device)] for v in tensors) for i in index]


def gradient(loss: LossFn, names: Sequence[str], point: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """``(f(point), grad f(point))`` with ``point`` substituted for the parameters ``names``."""
    leaves = [t.detach().requires_grad_(True) for t in point]
    value = loss(dict(zip(names, leaves, strict=True)))
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True)]


def hvp_central(
    loss: LossFn, names: Sequence[str], w: Sequence[Tensor], v: Sequence[Tensor], eps: float
) -> list[Tensor]:
    """``H_ww f(w) v`` by a central difference of gradients (the Hessian-free step of Per-FedAvg (HF)).

    ``(grad f(w + d v) - grad f(w - d v)) / (2 d)`` with ``d = eps / ||v||``: error O(d^2). This
    is the Hessian of ``f`` in the parameters being trained, unlike ``pf2lora_core.training.hypergrad``,
    whose products are the mixed block ``H_xy`` of two levels.
    """
    norm = float(_norm(v))
    if norm == 0.0:
        return [torch.zeros_like(t) for t in w]
    d = eps / norm
    w0 = [t.detach() for t in w]
    _, plus = gradient(loss, names, torch._foreach_add(w0, list(v), alpha=d))
    _, minus = gradient(loss, names, torch._foreach_add(w0, list(v), alpha=-d))
    diff = torch._foreach_sub(plus, minus)
    torch._foreach_div_(diff, 2 * d)
    return diff


@dataclass
class MetaGradient:
    """The direction of one Per-FedAvg step and the losses seen on the way."""

    grad: list[Tensor]  # g (first order) or (I - a H) g (Hessian-free)
    loss: float  # f(w; D)
    adapted_loss: float  # f(w~; D')


def meta_gradient(
    losses: Sequence[LossFn], names: Sequence[str], w: Sequence[Tensor], inner_lr: float, variant: str, eps: float
) -> MetaGradient:
    """The Per-FedAvg direction at ``w`` from the losses of batches ``D, D'`` (and ``D''`` for HF)."""
    loss0, g0 = gradient(losses[0], names, w)
    temp = torch._foreach_add([t.detach() for t in w], g0, alpha=-inner_lr)  # w~ = w - a grad f(w; D)
    loss1, g1 = gradient(losses[1], names, temp)
    if variant == HESSIAN_FREE:
        hv = hvp_central(losses[2], names, w, g1, eps)
        g1 = torch._foreach_add(g1, hv, alpha=-inner_lr)  # (I - a H(w; D'')) g
    return MetaGradient(g1, float(loss0), float(loss1))


class PerFedAvg(Algorithm):
    name = "perfedavg"
    Params = PerFedAvgParams
    params: PerFedAvgParams
    adapts_for_evaluation = True

    def adapters(self) -> tuple[AdapterSpec, None]:
        return AdapterSpec(self.params.rank, self.params.lora_alpha), None

    def optimizer(self, params: dict[str, torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The outer update with step b: AdamW (default) or the paper's plain SGD."""
        if self.params.optimizer == "sgd":
            return torch.optim.SGD(list(params.values()), lr=self.params.lr, weight_decay=self.params.weight_decay)
        return self.adamw(params)

    def train(self, ctx: LocalContext) -> dict[str, float]:
        p = self.params
        params = ctx.model.parameters(COMMON)
        names, tensors = list(params), list(params.values())
        opt = self.optimizer(params)
        n_batches, passes = STEP_COST[p.variant]
        losses, adapted = [], []
        for step in range(ctx.steps):
            fns = [ctx.loss_for(b, n_batches * step + j) for j, b in enumerate(self._step_batches(ctx, n_batches))]
            meta = meta_gradient(fns, names, tensors, p.inner_lr, p.variant, p.fd_eps)
            for t, g in zip(tensors, meta.grad, strict=True):
                t.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(meta.loss)
            adapted.append(meta.adapted_loss)
            ctx.step_done()
        return {
            TRAIN_LOSS: sum(losses) / len(losses),
            ADAPTED_LOSS: sum(adapted) / len(adapted),
            GRADIENT_PASSES: float(passes * ctx.steps),
        }

    def _step_batches(self, ctx: LocalContext, parts: int) -> list:
        """``D, D'`` (, ``D''``) of one step: slices of one minibatch, or ``parts`` minibatches (paper)."""
        if self.params.one_batch_per_step:
            return slice_batch(next(ctx.batches), parts)
        return [next(ctx.batches) for _ in range(parts)]

    def personalize(self, ctx: LocalContext) -> None:
        """One plain SGD step of size a on one training batch: ``w <- w - a grad f(w; D)``."""
        params = ctx.model.parameters(COMMON)
        tensors = list(params.values())
        _, grads = gradient(ctx.loss_for(next(ctx.batches), 0), list(params), tensors)
        with torch.no_grad():
            torch._foreach_add_(tensors, grads, alpha=-self.params.inner_lr)
