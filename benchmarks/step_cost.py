"""Time and peak memory of one PF2LoRA local step per HVP method, as ratios to one HOMLoRA step.

Setting (the issue's cost table): offline MiniLM-L6 (packaged), batch 16, sequence length 64
(random token ids, no padding), LoRA on query/value, model in train mode (dropout on). Everything
runs the product's own code: ``PF2LoRA`` / ``HOMLoRA`` from ``pf2lora_core.algorithms`` driven
through ``Algorithm.train`` with a ``LocalContext`` whose objective is ``ClassificationTask.loss``.
Both algorithms run at their shipped configurations, read from ``conf/algorithm/pf2lora.yaml`` and
``homlora.yaml`` (``shipped_params``; for PF2LoRA: r=8 / r~=2, ``inner_step`` rms, ``inner_lr`` =
lr, forward finite difference, ``reuse_inner_grad``, the HVP once a round, re-fit J = 3); each row
of ``METHODS`` changes only what its configuration column says, and the ``shipped`` row is the
shipped default itself. Under ``hvp_every = K`` the round's first step is the only one with the HVP
and it is the one *step* drops (below): the shipped row's *step* is its first-order steps, and its
*round / K* is the column that counts the HVP.

How a *step* is timed: ``LocalContext.on_step``, which every algorithm's ``train`` calls once at
the end of each local step (after the step's update), stamps the clock, so the gap between two
stamps is one whole local step, whatever the algorithm does before its steps. Why this hook and not
the batch stream or whole calls alone: since PF2LoRA's re-fit, ``PF2LoRA.train`` draws its K
minibatches before the first step (the re-fit reuses them), so stamps taken when batches are drawn
all fall before any work and their gaps time nothing (that made ``reuse_inner_grad`` read 8x
HOMLoRA); a whole ``train`` call divided by K mixes the step with the per-round set-up (a fresh
AdamW's lazy state, ``reuse_inner_grad``'s one extra pass that starts the carry) and the re-fit's K
lower-level passes, which differ between configurations but not between HVP methods. So the table
gives both: *step* (the stamps' gaps, the first step of each call dropped, as it holds the set-up)
is the cost of the bilevel step the HVP methods differ in; *round / K* (a whole call of K steps
over K) is what a round of the configuration costs per local step, re-fit and set-up included.
Each round runs every method once, each right next to a HOMLoRA call (which goes first alternates
by round, the order of methods rotates), so that load from other processes hits the pair alike: a
method's time ratio is the median over rounds of (its median step time / the adjacent HOMLoRA
median step time), and likewise for the round ratio with whole calls. The table's seconds are
medians over all steps (calls).

How *peak memory* is measured (same definition on both devices: bytes held by torch tensors):

- CUDA: ``torch.cuda.max_memory_allocated`` over the step, after ``reset_peak_memory_stats`` at
  its start. This counts everything live: weights, optimizer state, activations, gradients.
- CPU: torch has no CPU allocator statistics, and neither ``tracemalloc`` (torch allocates
  outside Python's allocator) nor RSS (glibc keeps freed blocks, and the process high-water mark
  cannot be reset) isolates one step. So the step runs under ``torch.profiler`` with
  ``profile_memory=True``, which records every allocation and free of torch's CPU allocator with
  its size; the running sum of those events is the net memory the step adds, and its maximum is
  the step's working set. Peak = resident model (parameters and buffers, counted once per
  storage) + that working set, the CPU analogue of the CUDA figure (it omits the optimizer state
  and the carried gradient that exist before the step: together well under 1% of the weights).
  The profiled steps (the last of a 2-step call, started from the end-of-step stamp before it)
  are separate from the timed ones (the profiler slows a step down).

The table also shows the working set alone, where the methods differ most. The last line printed
is one JSON object ``{method: {"time_ratio": ..., "round_time_ratio": ..., "memory_ratio": ...}}``.

``--smoke``: the same code on a tiny random BERT (``SMOKE_ARCH``, batch 4, length 16, 2 rounds of
3-step calls, one thread), a few seconds, and then checks (``smoke_checks``) that make the numbers mean
something: every train call stamped exactly K steps, every timed step and call has a positive,
finite duration, every ratio is finite and positive, and the steps of one method agree within a
factor of 3 of their median. A stamp that times nothing (as the batch-stream
stamps did) gives a step far below the median, a gap that swallows other steps' work one far above
it. Wall-clock steps are not held to that directly: load from other processes stretches them (by
more than 3x on a busy 2-core machine, which also inflates their median). So the run uses one
thread and stamps this process's CPU time (``time.process_time``) beside the clock: the CPU time
of every step must lie within 3x of its median (load does not stretch CPU time), and every
wall-clock step must last at least a third of that median (load never shrinks a step below the
work in it). Exit status 1 and ``SMOKE step_cost: FAILED ...`` when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchmarks.smoke import Checks
from pf2lora_core.algorithms import Algorithm, LocalContext, LoRAParams
from pf2lora_core.algorithms.homlora import HOMLoRA
from pf2lora_core.algorithms.pf2lora import PF2LoRA, PF2LoRAParams
from pf2lora_core.config.keys import ACCURACY, COMMON, PRIVATE
from pf2lora_core.config.schema import ModelConfig
from pf2lora_core.training.adapters import TwoLevelModel
from pf2lora_core.training.models import LoadedModel, load_classifier
from pf2lora_core.training.precision import configure_matmul_precision
from pf2lora_core.training.runtime import resolve_device
from pf2lora_core.training.solver import autocast_context
from pf2lora_core.training.tasks import ClassificationTask

BASELINE = "homlora"
DEFAULT = "finite_difference"  # the row that is PF2LoRA's shipped configuration itself
# Each method: what it changes in PF2LoRA's shipped configuration (conf/algorithm/pf2lora.yaml:
# reuse_inner_grad, one exact hypergradient step a round, re-fit J = 3). The HVP-method rows are
# taken under the exact rule (``EXACT_RULE``: every step's hypergradient, the three-pass step of
# ``algorithm=pf2lora_exact``), where the methods differ at every step.
DEFAULT = "shipped"  # the row that is PF2LoRA's shipped configuration itself
EXACT_RULE: dict[str, object] = {"reuse_inner_grad": False, "hvp_every": 1}
METHODS: dict[str, dict[str, object]] = {
    DEFAULT: {},
    "exact": {"hvp": "exact", "exact_ad": "reverse", **EXACT_RULE},
    "exact_forward": {"hvp": "exact", "exact_ad": "forward", **EXACT_RULE},
    "finite_difference": EXACT_RULE,  # forward difference: the shipped HVP method
    "finite_difference_central": {"fd_scheme": "central", **EXACT_RULE},
    "first_order": {"hvp": "first_order", **EXACT_RULE},
    "reuse_inner_grad": {"reuse_inner_grad": True, "hvp_every": 1},  # the HVP every step, two passes
    "no_refit": {"refit_steps": 0, **EXACT_RULE},  # the paper's algorithm: no lower-level re-fit
}
VOCAB_LOW = 1000  # token ids below this are [PAD], [unused*] and special tokens in BERT's vocab
MiB = 2**20
# --smoke: a tiny random BERT (vocabulary just above VOCAB_LOW, the lowest random token id)
SMOKE_ARCH = dict(
    vocab_size=1100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64,
)  # fmt: skip
SMOKE_FACTOR = 3.0  # every timed step of a method within this factor of its median step (module docstring)


def shipped_params(name: str, steps: int) -> LoRAParams:
    """``conf/algorithm/<name>.yaml`` as the product resolves it, for rounds of ``steps`` local steps.

    Read with OmegaConf and built by the product's own builder, without Hydra (which the GPU
    device image lacks, ``benchmarks/gpu_device.sh``); the file is the whole algorithm section of
    the default experiment (``config.yaml`` overrides none of it), and its interpolations
    (``${.lr}``, ``${local_steps}``) resolve as in a composed config.
    """
    from omegaconf import OmegaConf

    from pf2lora_core.config.experiment import _build_algorithm, conf_dir

    section = OmegaConf.load(conf_dir() / "algorithm" / f"{name}.yaml")
    root = OmegaConf.create({"local_steps": steps, "algorithm": section})
    return _build_algorithm(root.algorithm).params


def pf2lora_params(steps: int, **overrides: object) -> PF2LoRAParams:
    """PF2LoRA's shipped configuration for rounds of ``steps`` local steps, with ``overrides``."""
    params = shipped_params(PF2LoRA.name, steps)
    if not isinstance(params, PF2LoRAParams):
        raise TypeError(f"conf/algorithm/pf2lora.yaml built {type(params).__name__}")
    return dataclasses.replace(params, **overrides)


def describe(overrides: dict[str, object]) -> str:
    """A row's configuration column: what it changes in the shipped default."""
    return " ".join(f"{k}={v}" for k, v in overrides.items()) or "shipped default"


@dataclass
class Call:
    """One timed ``train`` call of K local steps."""

    steps: list[float]  # seconds of each step after the first (one end-of-step stamp to the next)
    total: float  # seconds of the whole call: set-up, re-fit, every step
    cpu_steps: list[float]  # the same steps in this process's CPU seconds (the smoke checks')
    # seconds from the call's first objective evaluation to its last end-of-step stamp: every step,
    # the first included, without what ``train`` does before any work (drawing its K batches)
    work: float = 0.0


@dataclass
class Arm:
    """One thing to measure: an algorithm on its model, and what it measured."""

    name: str
    algorithm: Algorithm
    model: TwoLevelModel
    initial: dict[str, dict[str, Tensor]]
    config: str = ""
    seconds: list[float] = field(default_factory=list)  # every timed step
    cpu_seconds: list[float] = field(default_factory=list)  # the same steps in process CPU seconds
    totals: list[float] = field(default_factory=list)  # every timed call, over its K steps
    ratios: list[float] = field(default_factory=list)  # step time / adjacent HOMLoRA step time
    round_ratios: list[float] = field(default_factory=list)  # call time / adjacent HOMLoRA call time
    peak: int = 0
    working_set: int = 0
    notes: list[str] = field(default_factory=list)

    def reset(self) -> None:
        """Same adapter values before every call, so every method sees the same problem."""
        for level, state in self.initial.items():
            self.model.load(level, state)
        self.model.model.train()


class _CudaPeak:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> tuple[int, int]:
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return peak, peak - self.base

    def close(self) -> None:
        """Nothing to stop (``_CpuPeak.close``'s counterpart)."""


class _CpuPeak:
    def __init__(self, module: nn.Module) -> None:
        self.resident = _resident_bytes(module)
        self.prof: torch.profiler.profile | None = None

    def start(self) -> None:
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.prof.start()

    def close(self) -> None:
        """Stop without reading (the call it measured failed)."""
        if self.prof is not None:
            with contextlib.suppress(Exception):
                self.prof.stop()
            self.prof = None

    def stop(self) -> tuple[int, int]:
        assert self.prof is not None
        self.prof.stop()
        events = [e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        return self.resident + peak, peak


def _resident_bytes(module: nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module.state_dict().values()}
    return sum(storages.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(VOCAB_LOW, vocab, (batch_size, seq_len), generator=gen),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch_size,), generator=gen),
        }
        for _ in range(n)
    ]


def run_call(
    arm: Arm,
    batches: Iterator[dict[str, Tensor]],
    task: ClassificationTask,
    steps: int,
    device: torch.device,
    meter: _CudaPeak | _CpuPeak | None = None,
) -> Call:
    """One ``train`` call of ``steps`` local steps, timed by ``LocalContext.on_step`` (module docstring).

    With ``meter``, the memory of the last step is measured instead (from the stamp that ends the
    step before it; the times are then returned too but must not be used: the CPU meter slows them).
    """
    stamps: list[float] = []
    cpu: list[float] = []

    def on_step() -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if meter is not None and len(stamps) == steps - 1:
            meter.start()

    arm.reset()
    module = arm.model.model

    began: list[float] = []

    def objective(batch: dict[str, Tensor], params: dict[str, Tensor] | None) -> Tensor:
        if not began:  # the first work of the call (Call.work)
            _sync(device)
            began.append(time.perf_counter())
        return task.loss(module, batch, params)  # the client's objective (pf2lora_core.federation.client_runtime)

    ctx = LocalContext(
        model=arm.model, objective=objective, batches=batches, steps=steps, seed=0, device=device, on_step=on_step
    )
    _sync(device)
    start = time.perf_counter()
    try:
        arm.algorithm.train(ctx)
    except BaseException:
        if meter is not None:
            meter.close()  # a profiler left running crashes the interpreter at exit
        raise
    _sync(device)
    total = time.perf_counter() - start
    if meter is not None:
        arm.peak, arm.working_set = meter.stop()
    if len(stamps) != steps:
        raise RuntimeError(f"{arm.name}: train ended {len(stamps)} local steps (LocalContext.on_step) for {steps}")
    return Call(_gaps(stamps), total, _gaps(cpu), stamps[-1] - began[0] if began and stamps else 0.0)


def _gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def minilm() -> LoadedModel:
    """The packaged MiniLM-L6 classifier (2 labels, mean pooling, LoRA on query and value)."""
    cfg = ModelConfig(
        source="packaged",
        name="minilm-l6",
        target_modules=["query", "value"],
        head_level=COMMON,
        head_modules=[],
        cache_dir="",
        pooling="mean",
    )
    return load_classifier(cfg, num_labels=2)


def tiny_bert() -> LoadedModel:
    """A tiny randomly initialised BERT classifier of ``SMOKE_ARCH`` (no files)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**SMOKE_ARCH, num_labels=2))
    return LoadedModel(model, None, ["classifier"], ["query", "value"])


def build_arms(
    device: torch.device, steps: int, loaded: LoadedModel | None = None, methods: Sequence[str] | None = None
) -> list[Arm]:
    """HOMLoRA and the PF2LoRA ``methods`` (default: all of ``METHODS``) on copies of ``loaded``.

    Both at their shipped configurations for rounds of ``steps`` local steps (``shipped_params``);
    ``loaded`` defaults to the packaged MiniLM-L6.
    """
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    loaded = loaded or minilm()

    def wrap(algorithm: Algorithm) -> TwoLevelModel:
        torch.manual_seed(0)  # same adapter init for both models
        common, private = algorithm.adapters()
        return TwoLevelModel(
            copy.deepcopy(loaded.model),
            target_modules=loaded.target_modules,
            common=common,
            private=private,
            head_modules=loaded.head_modules,
            head_level=COMMON,
        ).to(device)

    homlora = HOMLoRA(shipped_params(HOMLoRA.name, steps))
    hom_model = wrap(homlora)
    arms = [Arm(BASELINE, homlora, hom_model, {COMMON: hom_model.export(COMMON)}, "shipped default")]
    shipped = pf2lora_params(steps)
    two_level = wrap(PF2LoRA(shipped))
    initial = {COMMON: two_level.export(COMMON), PRIVATE: two_level.export(PRIVATE)}
    for name, overrides in METHODS.items():
        if methods is not None and name not in methods:
            continue
        algorithm = PF2LoRA(dataclasses.replace(shipped, **overrides))
        arms.append(Arm(name, algorithm, two_level, initial, describe(overrides)))
    return arms


class _Warnings(logging.Handler):
    """Collects warnings from the hypergradient module (e.g. a forward-mode fallback)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def measure(
    arms: list[Arm], batches: Iterator, task: ClassificationTask, device: torch.device, args: argparse.Namespace
) -> None:
    warnings = _Warnings()
    logging.getLogger("pf2lora_core.training.hypergrad").addHandler(warnings)
    # Round 0 measures memory (one profiled step per arm) and doubles as the warm-up.
    for arm in arms:
        seen = len(warnings.messages)
        meter = _CudaPeak(device) if device.type == "cuda" else _CpuPeak(arm.model.model)
        run_call(arm, batches, task, steps=2, device=device, meter=meter)
        arm.notes += warnings.messages[seen:]
    base, methods = arms[0], arms[1:]
    for r in range(args.rounds):
        shift = r % len(methods)
        for arm in methods[shift:] + methods[:shift]:
            # HOMLoRA right next to each method (alternating which goes first): per-pair ratios
            pair = (base, arm) if r % 2 == 0 else (arm, base)
            calls = {a.name: run_call(a, batches, task, steps=args.steps, device=device) for a in pair}
            for a in pair:
                a.seconds += calls[a.name].steps
                a.cpu_seconds += calls[a.name].cpu_steps
                a.totals.append(calls[a.name].total / args.steps)
            arm.ratios.append(statistics.median(calls[arm.name].steps) / statistics.median(calls[base.name].steps))
            arm.round_ratios.append(calls[arm.name].total / calls[base.name].total)


def report(arms: list[Arm], device: torch.device, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    base = arms[0]
    m0, w0 = base.peak, max(base.working_set, 1)
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    precision = "bf16 autocast" if getattr(args, "bf16", False) else "float32"
    print(
        f"PF2LoRA local step vs HOMLoRA local step: {getattr(args, 'model', 'MiniLM-L6')}, batch {args.batch_size}, "
        f"length {args.seq_len}, r=8 / r~=2 on query,value, train mode, {precision}; device {device} ({threads}), "
        f"torch {torch.__version__}, {platform.machine()}; {args.steps} local steps a call, "
        f"median of {len(base.seconds)} steps / {len(base.totals)} calls each"
    )
    print("step: one local step (end-of-step stamps; first of each call dropped); round/K: a whole call over K")
    width = max(len(a.config) for a in arms)
    header = (
        f"{'method':<26} {'configuration':<{width}} {'step s':>7} {'step x':>7} {'round/K s':>9} {'round x':>7} "
        f"{'peak MiB':>9} {'mem x':>6} {'work MiB':>9} {'work x':>7}"
    )
    print(header)
    print("-" * len(header))
    out: dict[str, dict[str, float]] = {}
    for arm in arms:
        ratio = statistics.median(arm.ratios) if arm.ratios else 1.0
        round_ratio = statistics.median(arm.round_ratios) if arm.round_ratios else 1.0
        row = {
            "time_ratio": round(ratio, 3),
            "round_time_ratio": round(round_ratio, 3),
            "memory_ratio": round(arm.peak / max(m0, 1), 3),
        }
        print(
            f"{arm.name:<26} {arm.config:<{width}} {statistics.median(arm.seconds):>7.3f} {ratio:>7.2f} "
            f"{statistics.median(arm.totals):>9.3f} {round_ratio:>7.2f} {arm.peak / MiB:>9.1f} "
            f"{row['memory_ratio']:>6.2f} {arm.working_set / MiB:>9.1f} {arm.working_set / w0:>7.2f}"
        )
        for note in dict.fromkeys(arm.notes):
            print(f"    note: {note}")
        if arm is not base:
            out[arm.name] = row
    spread = max(statistics.pstdev(a.seconds) / statistics.median(a.seconds) for a in arms)
    print(f"largest relative spread (std / median) of one method's step times: {spread:.1%}")
    return out


def table(
    device: torch.device,
    args: argparse.Namespace,
    loaded: LoadedModel | None = None,
    methods: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Measure and print the table; returns ``{method: {"time_ratio", "round_time_ratio", "memory_ratio"}}``.

    ``args``: rounds, steps, batch_size, seq_len, bf16 (autocast of every pass, with the
    finite-difference passes in float32: ``pf2lora_core.training.precision``) and optionally model (a label).
    """
    return measured(device, args, loaded, methods)[1]


def measured(
    device: torch.device,
    args: argparse.Namespace,
    loaded: LoadedModel | None = None,
    methods: Sequence[str] | None = None,
) -> tuple[list[Arm], dict[str, dict[str, float]]]:
    """``table`` with the arms it measured (their every step and call)."""
    configure_matmul_precision()  # as every client does: IEEE float32 matmuls
    arms = build_arms(device, args.steps, loaded, methods)
    vocab = arms[0].model.model.config.vocab_size
    batches = itertools.cycle(random_batches(4, args.batch_size, args.seq_len, vocab, seed=0))
    bf16 = bool(getattr(args, "bf16", False))
    task = ClassificationTask(ACCURACY, device, autocast=lambda: autocast_context(device, bf16))
    measure(arms, batches, task, device, args)
    return arms, report(arms, device, args)


def smoke_checks(arms: Sequence[Arm], out: dict[str, dict[str, float]], checks: Checks) -> None:
    """What makes the table's numbers mean something (module docstring, ``--smoke``)."""
    checks.require(set(out) == {a.name for a in arms[1:]}, f"one JSON row per PF2LoRA method: {sorted(out)}")
    checks.require(any(a.name == DEFAULT and a.config == "shipped default" for a in arms), "the default row is shipped")
    for arm in arms:
        steps = arm.seconds
        checks.require(bool(steps) and len(arm.cpu_seconds) == len(steps), f"{arm.name}: timed steps")
        if not steps:
            continue
        checks.require(all(math.isfinite(t) and t > 0 for t in steps + arm.totals), f"{arm.name}: durations > 0")
        cpu = statistics.median(arm.cpu_seconds)
        lo, hi = min(arm.cpu_seconds) / cpu, max(arm.cpu_seconds) / cpu
        checks.require(
            min(steps) >= cpu / SMOKE_FACTOR,
            f"{arm.name}: fastest step {min(steps) * 1e3:.2f} ms >= median CPU time {cpu * 1e3:.2f} ms "
            f"/ {SMOKE_FACTOR:g}",
        )
        checks.require(
            lo >= 1 / SMOKE_FACTOR and hi <= SMOKE_FACTOR,
            f"{arm.name}: CPU time of every step within x{SMOKE_FACTOR:g} of its median {cpu * 1e3:.2f} ms "
            f"(fastest x{lo:.2f}, slowest x{hi:.2f})",
        )
    for name, row in out.items():
        for key, value in row.items():
            checks.require(math.isfinite(value) and value > 0, f"{name}: {key} {value} finite and > 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs every method once")
    parser.add_argument("--steps", type=int, default=3, help="local steps per train call (the first is dropped)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (finite differences stay float32)")
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT on the CPU, seconds; checks the numbers")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rounds < 1:
        parser.error("need --steps >= 2 and --rounds >= 1")
    logging.basicConfig(level=logging.ERROR)
    if not args.smoke:
        print(json.dumps(table(resolve_device(args.device), args)))
        return 0
    torch.set_num_threads(1)  # modest, and steadier step times on a shared machine
    args = argparse.Namespace(**{**vars(args), "rounds": 2, "steps": 3, "batch_size": 4, "seq_len": 16})
    args.model = "tiny random BERT (smoke)"
    arms, out = measured(torch.device("cpu"), args, tiny_bert())
    print(json.dumps(out))
    checks = Checks("step_cost")
    smoke_checks(arms, out, checks)
    return checks.finish()


if __name__ == "__main__":
    raise SystemExit(main())
