"""A client's local work, free of Flower: load levels, train a round, evaluate.

``ClientRuntime`` holds what a client process keeps between messages: the frozen base model with
both adapters attached, the tokenizer, the task and the algorithm. In a Ray simulation one
process serves many clients in turn, so the runtime is cached per process (``runtime_for``) and
a client's own state (its private level) is loaded into the shared model at every message.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import datasets
import torch
from torch import Tensor

from pf2lora_core import data
from pf2lora_core.algorithms import Algorithm, LocalContext
from pf2lora_core.config.experiment import Experiment, parse
from pf2lora_core.config.keys import (
    BATCHES_SEEN,
    COMMON,
    COMPUTE_SECONDS,
    EVAL_LOSS,
    EXAMPLES_SEEN,
    FLOPS_PER_CLIENT_ROUND,
    FLOPS_PER_STEP,
    GLOBAL,
    GRADIENT_PASSES,
    PERSONALIZED,
    PRIVATE,
    VALIDATION,
    VALIDATION_GLOBAL,
)
from pf2lora_core.data.columns import TEST
from pf2lora_core.data.site import config_label_names, site_split
from pf2lora_core.federation.received_config import parse_received_config
from pf2lora_core.training.adapters import TwoLevelModel
from pf2lora_core.training.cost import count_flops
from pf2lora_core.training.models import load_model
from pf2lora_core.training.precision import configure_matmul_precision
from pf2lora_core.training.rank import rank_report
from pf2lora_core.training.runtime import derived_seed, resolve_device, seed_everything
from pf2lora_core.training.solver import autocast_context, iterate_forever
from pf2lora_core.training.tasks import make_task

StateDict = dict[str, Tensor]
DEPLOYMENT = "deployment"  # federation.kind of a real deployment: site-local data, labels from config
# the re-fit's minibatch and dropout streams (``ClientRuntime.refit``): a seed of its own arity, apart
# from training's (run seed, client, round) and personalization's
REFIT_STREAM = 1 << 22


@dataclass
class TrainOutcome:
    common: StateDict  # what is sent
    private: StateDict  # what is kept
    metrics: dict[str, float]  # includes COMPUTE_SECONDS
    num_examples: int


@dataclass
class EvalOutcome:
    personalized: dict[str, float]  # test split
    global_: dict[str, float]  # test split
    rank: dict  # rank_report(...) of the client's full update
    num_examples: int  # rows of the test split
    seconds: float  # compute time of this evaluation
    validation: dict[str, float] = field(default_factory=dict)  # personalized, on the validation split
    validation_global: dict[str, float] = field(default_factory=dict)  # global, on the validation split
    num_validation: int = 0  # rows of the validation split
    # the private level as evaluated, where the algorithm re-fitted it (``Algorithm.refits_private``)
    private: StateDict | None = None
    flops: float | None = None  # counted FLOPs of this evaluation (``count_flops=True``), re-fit included

    def results(self) -> dict[str, dict[str, float]]:
        """Every evaluated kind (``constants.EVAL_KINDS``) -> its metrics, as the client sends them."""
        return {
            PERSONALIZED: self.personalized,
            GLOBAL: self.global_,
            VALIDATION: self.validation,
            VALIDATION_GLOBAL: self.validation_global,
        }


def label_names(exp: Experiment) -> list[str]:
    """The label set: from config in deployment (no data on the server), else from the pooled data."""
    if exp.federation.kind == DEPLOYMENT:
        return config_label_names(exp.task)
    return data.task_label_names(exp.task, exp.seed)


def build_model(exp: Experiment, device: torch.device) -> tuple[TwoLevelModel, object]:
    """Base model + adapters, initialised from the run seed (identical on server and clients)."""
    model, tokenizer, _ = build_model_with_heads(exp, device)
    return model, tokenizer


def build_model_with_heads(exp: Experiment, device: torch.device) -> tuple[TwoLevelModel, object, list[str]]:
    """``build_model`` and the task-head modules trained in full (a site checks its uplink against them)."""
    labels = label_names(exp)
    seed_everything(exp.seed)
    loaded = load_model(exp.model, exp.task.kind, num_labels=len(labels))
    algorithm = exp.algorithm
    common, private = algorithm.adapters()
    model = TwoLevelModel(
        loaded.model,
        target_modules=loaded.target_modules,
        common=common,
        private=private,
        head_modules=loaded.head_modules,
        head_level=algorithm.head_level(exp.model.head_level),
        assign=algorithm.assign_level,
    ).to(device)
    return model, loaded.tokenizer, list(loaded.head_modules)


class ClientRuntime:
    """Per-process client state shared by all clients this process serves."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.device = resolve_device(str(exp.cfg.device))
        configure_matmul_precision()  # IEEE float32 matmuls, no TF32 (pf2lora_core.training.precision)
        self.model, self.tokenizer, self.head_modules = build_model_with_heads(exp, self.device)
        # Every client's private level starts from the same seeded init (C random, D = 0).
        self.initial_private = self.model.export(PRIVATE) if self.has_private else {}
        bf16 = bool(exp.cfg.bf16)
        self.task = make_task(
            exp.task, exp.generation, self.tokenizer, self.device, autocast=lambda: autocast_context(self.device, bf16)
        )

    @property
    def has_private(self) -> bool:
        return PRIVATE in self.model.levels

    @property
    def personalized_is_global(self) -> bool:
        """The client's own model is the common adapter as received: one level, nothing adapted or
        re-weighted for evaluation (HOMLoRA, FFA-LoRA, HETLoRA, FlexLoRA). Its evaluation is
        then the global one, not run a second time (evaluation is deterministic: eval mode, no
        sampling); tests/federation/test_client_runtime.py checks the two agree."""
        a = self.exp.algorithm
        return (
            not self.has_private
            and a.has_global_model
            and not a.adapts_for_evaluation
            and not a.refits_private
            and type(a).evaluation_mixer is Algorithm.evaluation_mixer
        )

    def split(self, client: int) -> data.ClientSplit:
        e = self.exp
        if e.federation.kind == DEPLOYMENT:  # this site's own file (policy.localize chose it), unpartitioned
            return site_split(e.task, e.seed, self.tokenizer)
        return data.client_split(e.task, e.partition, e.federation.num_clients, client, e.seed, self.tokenizer)

    def _evaluate_global(self, splits: Mapping[str, datasets.Dataset]) -> dict[str, dict[str, float]]:
        """The common adapter alone on each split; NaN metrics where the algorithm has no global model."""
        if not self.exp.algorithm.has_global_model:
            return {name: self._missing() for name in splits}
        with self.model.only(COMMON):
            return {name: self._evaluate_split(ds) for name, ds in splits.items()}

    def refit(self, client: int, x_round: int) -> tuple[int, data.CountedBatches]:
        """Re-fit the private level loaded to the common level loaded (``Algorithm.refit_private``).

        Its minibatches and dropout masks come from a stream of (run seed, client, ``x_round``: the
        round that produced this common level), so one common level and one private level give the
        same re-fit bit for bit wherever it is made: at the evaluation of round r, before the
        training of round r + 1 when that evaluation's re-fit is not at hand (a restarted node, a
        round not evaluated), and in a resumed run. Returns the gradient passes it took and the
        minibatches it drew (from the training split: J of them).
        """
        self.model.model.train()
        seed = derived_seed(self.exp.seed, client, REFIT_STREAM, x_round)
        ctx = self._context(client, seed, self.exp.local_steps)
        drawn = data.CountedBatches(ctx.batches)
        return self.exp.algorithm.refit_private(dataclasses.replace(ctx, batches=drawn)), drawn

    def _evaluate_personalized(
        self, client: int, splits: Mapping[str, datasets.Dataset], x_round: int = 0
    ) -> dict[str, dict[str, float]]:
        """The client's own model on each split, after the algorithm's personalization (restored afterwards).

        One personalization serves every split, so validation and test score the same model.
        """
        if self.exp.algorithm.refits_private:  # the client's model: the private level re-fitted to this x
            self.refit(client, x_round)
        if not self.exp.algorithm.adapts_for_evaluation:
            return {name: self._evaluate_mixed(client, ds) for name, ds in splits.items()}
        snapshot = {level: self.model.export(level) for level in self.model.levels}
        seed = derived_seed(self.exp.seed, client, 1 << 20)  # fixed: evaluation is repeatable
        self.model.model.train()
        self.exp.algorithm.personalize(self._context(client, seed, 1))
        try:
            return {name: self._evaluate_mixed(client, ds) for name, ds in splits.items()}
        finally:
            for level, state in snapshot.items():
                self.model.load(level, state)

    def _missing(self) -> dict[str, float]:
        return {EVAL_LOSS: float("nan"), self.exp.task.metric: float("nan")}

    def _evaluate_split(self, ds: datasets.Dataset, around: Callable | None = None) -> dict[str, float]:
        """The task's metrics on ``ds``; an empty split (``task.val_fraction=0``) is not evaluated."""
        if len(ds) == 0:
            return self._missing()
        return self.task.evaluate(self.model.model, ds, around=around)

    def _evaluate_mixed(self, client: int, test: datasets.Dataset) -> dict[str, float]:
        """Evaluate the model, with the algorithm's per-instance adapter weights where it has any."""
        seed = derived_seed(self.exp.seed, client, 1 << 21)  # fixed: evaluation is repeatable
        mixer = self.exp.algorithm.evaluation_mixer(self._context(client, seed, 1))
        if mixer is None:
            return self._evaluate_split(test)
        return self._evaluate_split(test, around=lambda batch: self.model.row_weights(mixer(batch)))

    def _load(self, downlink: Mapping[str, Tensor], private: Mapping[str, Tensor] | None) -> None:
        """The client's own private level first, then the server's downlink (which may build on it)."""
        if self.has_private:
            self.model.load(PRIVATE, private if private else self.initial_private)
        self.exp.algorithm.receive(self.model, downlink)

    def train(
        self,
        client: int,
        server_round: int,
        common: Mapping[str, Tensor],
        private: Mapping[str, Tensor] | None,
        fitted: bool = False,
    ) -> TrainOutcome:
        """``fitted``: ``private`` is already re-fitted to ``common`` (``LocalContext.private_fitted``);
        else an algorithm that re-fits does it here first, unless ``private`` is None (a fresh private
        level; see ``Algorithm.refits_initial``) (``refit``: the same re-fit the evaluation
        of round ``server_round - 1`` made, so a resumed or restarted client trains bit for bit alike)."""
        start = time.perf_counter()
        self._load(common, private)
        steps = self.exp.local_steps
        if self.exp.algorithm.pooled_training:
            steps *= self.exp.federation.num_clients
        ctx = self._context(client, derived_seed(self.exp.seed, client, server_round), steps)
        drawn = data.CountedBatches(ctx.batches)
        algorithm = self.exp.algorithm
        # a fresh private level (the client's first round, or its state lost) is the initialization:
        # re-fitted only where the algorithm asks (``refits_initial``)
        due = algorithm.refits_private and not fitted
        refits = due and (bool(private) or algorithm.refits_initial)
        ctx = dataclasses.replace(ctx, batches=drawn, private_fitted=fitted or due)

        refit_drawn: list[data.CountedBatches] = []  # the re-fit's minibatches, where training makes it

        def work() -> dict[str, float]:
            passes = 0
            if refits:
                passes, got = self.refit(client, server_round - 1)
                refit_drawn.append(got)
            self.model.model.train()
            out = self.exp.algorithm.train(ctx)
            if passes:
                out[GRADIENT_PASSES] = out.get(GRADIENT_PASSES, float(steps)) + passes
            return out

        if server_round <= int(self.exp.cfg.flops_rounds):
            metrics, flops = count_flops(work)
            metrics[FLOPS_PER_STEP] = flops / steps
            metrics[FLOPS_PER_CLIENT_ROUND] = float(flops)
        else:
            metrics = work()
        # what this round consumed (equal-budget accounting): one pass per step unless the algorithm says
        # (a re-fit made here, with no evaluation's at hand, reads J more from the training split)
        metrics[BATCHES_SEEN] = float(drawn.batches + sum(r.batches for r in refit_drawn))
        metrics[EXAMPLES_SEEN] = float(drawn.examples + sum(r.examples for r in refit_drawn))
        metrics.setdefault(GRADIENT_PASSES, float(steps))
        metrics[COMPUTE_SECONDS] = time.perf_counter() - start
        return TrainOutcome(
            common=wire_state(self.exp.algorithm.uplink(self.model)),
            private=wire_state(self.model.export(PRIVATE)) if self.has_private else {},  # kept in an ArrayRecord too
            metrics=metrics,
            num_examples=len(self._train_data(client)),
        )

    def _train_data(self, client: int) -> datasets.Dataset:
        """The client's training split, or every client's pooled for the centralized reference."""
        e = self.exp
        if e.algorithm.pooled_training and e.federation.kind != DEPLOYMENT:
            return data.pooled_train(e.task, e.partition, e.federation.num_clients, e.seed, self.tokenizer)
        return self.split(client).train

    def _context(self, client: int, seed: int, steps: int) -> LocalContext:
        """Local work on ``client``'s training split: endless shuffled batches, the task's loss."""
        batches = self.task.batches(self._train_data(client), shuffle=True, seed=seed)
        module = self.model.model
        return LocalContext(
            model=self.model,
            objective=lambda batch, params: self.task.loss(module, batch, params),
            batches=iterate_forever(batches),
            steps=steps,
            seed=seed,
            device=self.device,
            embed=lambda batch: self.task.embed(module, batch),
            train_examples=len(self._train_data(client)),
        )

    def evaluate(
        self,
        client: int,
        common: Mapping[str, Tensor],
        private: Mapping[str, Tensor] | None,
        count: bool = False,
        x_round: int = 0,
    ) -> EvalOutcome:
        """Both models on the test and validation splits; ``count``: count its FLOPs (``flops_rounds``);
        ``x_round``: the round that produced ``common`` (the re-fit's stream, ``refit``)."""
        if count:
            outcome, flops = count_flops(lambda: self._evaluate(client, common, private, x_round))
            return dataclasses.replace(outcome, flops=float(flops))
        return self._evaluate(client, common, private, x_round)

    def _evaluate(
        self, client: int, common: Mapping[str, Tensor], private: Mapping[str, Tensor] | None, x_round: int
    ) -> EvalOutcome:
        start = time.perf_counter()
        self._load(common, private)
        split = self.split(client)
        splits = {TEST: split.test, VALIDATION: split.validation}
        global_ = self._evaluate_global(splits)
        personalized = global_ if self.personalized_is_global else self._evaluate_personalized(client, splits, x_round)
        factors = self.model.update_factors
        levels = (factors([COMMON]), factors([PRIVATE])) if self.has_private else None
        rank = rank_report(factors(), float(self.exp.cfg.rank_threshold), levels=levels)
        refitted = wire_state(self.model.export(PRIVATE)) if self.exp.algorithm.refits_private else None
        return EvalOutcome(
            personalized[TEST],
            global_[TEST],
            rank,
            len(split.test),
            time.perf_counter() - start,
            validation=personalized[VALIDATION],
            validation_global=global_[VALIDATION],
            num_validation=len(split.validation),
            private=refitted,
        )


def wire_state(state: StateDict) -> StateDict:
    """What may leave the client: contiguous CPU tensors, floating point ones as float32.

    Flower's ArrayRecord rejects bfloat16, and the server averages in float32; an algorithm's
    ``uplink`` normally returns ``TwoLevelModel.export`` copies already, so this only guards overrides.
    """
    out = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        out[name] = (t.float() if t.is_floating_point() else t).contiguous()
    return out


@functools.lru_cache(maxsize=2)
def experiment_for(config_yaml: str) -> Experiment:
    """The parsed experiment of a received, resolved config (parsed once per process).

    Read as plain data (``received_config``): whatever the text holds, nothing in it is resolved
    on this client, not even a ``${...}`` that reached it through a YAML escape.
    """
    return parse(parse_received_config(config_yaml))


@functools.lru_cache(maxsize=2)
def runtime_for(config_yaml: str) -> ClientRuntime:
    """The process-wide runtime for a resolved config (built once, reused every round)."""
    return ClientRuntime(experiment_for(config_yaml))
