"""Time and peak memory of one PF2LoRA local step per HVP method, as ratios to one HOMLoRA step.

Setting (the issue's cost table): offline MiniLM-L6 (packaged), batch 16, sequence length 64
(random token ids, no padding), LoRA on query/value with r=8 (alpha 16) for the common level and
r~=2 (alpha 4) for the private one, model in train mode (dropout on). Everything runs the
product's own code: ``PF2LoRA`` / ``HOMLoRA`` from ``pf2lora_core.algorithms`` driven through
``Algorithm.train`` with a ``LocalContext`` whose objective is ``ClassificationTask.loss``.

How a *step* is timed: the context's batch iterator stamps the clock each time ``train`` takes
a batch, which it does once at the start of every local step, so the gaps between stamps are
whole steps (the last one ends when ``train`` returns). The first step of each ``train`` call
is dropped: it carries the per-round set-up (a fresh AdamW's lazy state, and for
``reuse_inner_grad`` the one extra gradient pass that starts the carry). Each round runs every
method once, each right next to a HOMLoRA call (which goes first alternates by round, the order
of methods rotates), so that load from other processes hits the pair alike: a method's time
ratio is the median over rounds of (its median step time / the adjacent HOMLoRA median step
time). The table's seconds are medians over all steps.

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
  The profiled steps are separate from the timed ones (the profiler slows a step down).

The table also shows the working set alone, where the methods differ most. The last line printed
is one JSON object ``{method: {"time_ratio": ..., "memory_ratio": ...}}``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

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
HOMLORA_PARAMS = LoRAParams(name=HOMLoRA.name, rank=8, lora_alpha=16, lr=2e-3, weight_decay=0.0)
# conf/algorithm/pf2lora.yaml's values; each method below overrides the HVP choice only.
PF2LORA_PARAMS = PF2LoRAParams(
    name=PF2LoRA.name,
    rank=8,
    lora_alpha=16,
    lr=2e-3,
    weight_decay=0.0,
    private_rank=2,
    private_alpha=4,
    inner_lr=0.5,
    hvp="finite_difference",
    fd_eps=1e-3,
    fd_scheme="forward",
    exact_ad="reverse",
    mode="bilevel",
    reuse_inner_grad=False,
)
METHODS: dict[str, dict[str, object]] = {
    "exact": {"hvp": "exact", "exact_ad": "reverse"},
    "exact_forward": {"hvp": "exact", "exact_ad": "forward"},
    "finite_difference": {"hvp": "finite_difference", "fd_scheme": "forward"},
    "finite_difference_central": {"hvp": "finite_difference", "fd_scheme": "central"},
    "first_order": {"hvp": "first_order"},
    "reuse_inner_grad": {"hvp": "finite_difference", "fd_scheme": "forward", "reuse_inner_grad": True},
}
VOCAB_LOW = 1000  # token ids below this are [PAD], [unused*] and special tokens in BERT's vocab
MiB = 2**20


@dataclass
class Arm:
    """One thing to measure: an algorithm on its model, and what it measured."""

    name: str
    algorithm: Algorithm
    model: TwoLevelModel
    initial: dict[str, dict[str, Tensor]]
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # step time / adjacent HOMLoRA step time
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


class _CpuPeak:
    def __init__(self, module: nn.Module) -> None:
        self.resident = _resident_bytes(module)
        self.prof: torch.profiler.profile | None = None

    def start(self) -> None:
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self.prof.start()

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
) -> list[float]:
    """One ``train`` call of ``steps`` local steps; seconds of every step after the first.

    With ``meter``, the memory of the last step is measured instead (its time is then returned
    too but must not be used: the CPU meter slows it down).
    """
    stamps: list[float] = []

    def stamped() -> Iterator[dict[str, Tensor]]:
        for batch in batches:
            _sync(device)
            stamps.append(time.perf_counter())
            if meter is not None and len(stamps) == steps:
                meter.start()
            yield batch

    arm.reset()
    module = arm.model.model

    def objective(batch: dict[str, Tensor], params: dict[str, Tensor] | None) -> Tensor:
        return task.loss(module, batch, params)  # the client's objective (pf2lora_core.federation.client_runtime)

    ctx = LocalContext(model=arm.model, objective=objective, batches=stamped(), steps=steps, seed=0, device=device)
    arm.algorithm.train(ctx)
    _sync(device)
    stamps.append(time.perf_counter())
    if meter is not None:
        arm.peak, arm.working_set = meter.stop()
    return [b - a for a, b in itertools.pairwise(stamps)][1:]


def build_arms(
    device: torch.device, loaded: LoadedModel | None = None, methods: Sequence[str] | None = None
) -> list[Arm]:
    """HOMLoRA and the PF2LoRA ``methods`` (default: all of ``METHODS``) on copies of ``loaded``.

    ``loaded`` defaults to the packaged MiniLM-L6.
    """
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    cfg = ModelConfig(
        source="packaged",
        name="minilm-l6",
        target_modules=["query", "value"],
        head_level=COMMON,
        head_modules=[],
        cache_dir="",
        pooling="mean",
    )
    loaded = loaded or load_classifier(cfg, num_labels=2)

    def wrap(algorithm: Algorithm) -> TwoLevelModel:
        torch.manual_seed(0)  # same adapter init for both models
        common, private = algorithm.adapters()
        return TwoLevelModel(
            copy.deepcopy(loaded.model),
            target_modules=loaded.target_modules,
            common=common,
            private=private,
            head_modules=loaded.head_modules,
            head_level=cfg.head_level,
        ).to(device)

    homlora = HOMLoRA(HOMLORA_PARAMS)
    hom_model = wrap(homlora)
    arms = [Arm(BASELINE, homlora, hom_model, {COMMON: hom_model.export(COMMON)})]
    two_level = wrap(PF2LoRA(PF2LORA_PARAMS))
    initial = {COMMON: two_level.export(COMMON), PRIVATE: two_level.export(PRIVATE)}
    for name, overrides in METHODS.items():
        if methods is not None and name not in methods:
            continue
        algorithm = PF2LoRA(dataclasses.replace(PF2LORA_PARAMS, **overrides))
        arms.append(Arm(name, algorithm, two_level, initial))
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
            times = {a.name: run_call(a, batches, task, steps=args.steps, device=device) for a in pair}
            for a in pair:
                a.seconds += times[a.name]
            arm.ratios.append(statistics.median(times[arm.name]) / statistics.median(times[base.name]))


def report(arms: list[Arm], device: torch.device, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    base = arms[0]
    m0, w0 = base.peak, max(base.working_set, 1)
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    precision = "bf16 autocast" if getattr(args, "bf16", False) else "float32"
    print(
        f"PF2LoRA local step vs HOMLoRA local step: {getattr(args, 'model', 'MiniLM-L6')}, batch {args.batch_size}, "
        f"length {args.seq_len}, r=8 / r~=2 on query,value, train mode, {precision}; device {device} ({threads}), "
        f"torch {torch.__version__}, {platform.machine()}; median of {len(base.seconds)} steps each"
    )
    header = f"{'method':<27} {'step s':>7} {'time x':>7} {'peak MiB':>9} {'mem x':>6} {'work MiB':>9} {'work x':>7}"
    print(header)
    print("-" * len(header))
    out: dict[str, dict[str, float]] = {}
    for arm in arms:
        t = statistics.median(arm.seconds)
        ratio = statistics.median(arm.ratios) if arm.ratios else 1.0
        row = {"time_ratio": round(ratio, 3), "memory_ratio": round(arm.peak / m0, 3)}
        print(
            f"{arm.name:<27} {t:>7.3f} {row['time_ratio']:>7.2f} {arm.peak / MiB:>9.1f} {row['memory_ratio']:>6.2f} "
            f"{arm.working_set / MiB:>9.1f} {arm.working_set / w0:>7.2f}"
        )
        for note in dict.fromkeys(arm.notes):
            print(f"    note: {note}")
        if arm is not base:
            out[arm.name] = row
    spread = max(statistics.pstdev(a.seconds) / statistics.median(a.seconds) for a in arms)
    print(f"largest relative spread of step times across repetitions: {spread:.1%}")
    return out


def table(
    device: torch.device,
    args: argparse.Namespace,
    loaded: LoadedModel | None = None,
    methods: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Measure and print the table; returns ``{method: {"time_ratio", "memory_ratio"}}``.

    ``args``: rounds, steps, batch_size, seq_len, bf16 (autocast of every pass, with the
    finite-difference passes in float32: ``pf2lora_core.training.precision``) and optionally model (a label).
    """
    configure_matmul_precision()  # as every client does: IEEE float32 matmuls
    arms = build_arms(device, loaded, methods)
    vocab = arms[0].model.model.config.vocab_size
    batches = itertools.cycle(random_batches(4, args.batch_size, args.seq_len, vocab, seed=0))
    bf16 = bool(getattr(args, "bf16", False))
    task = ClassificationTask(ACCURACY, device, autocast=lambda: autocast_context(device, bf16))
    measure(arms, batches, task, device, args)
    return report(arms, device, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs every method once")
    parser.add_argument("--steps", type=int, default=3, help="local steps per train call (the first is dropped)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (finite differences stay float32)")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.rounds < 1:
        parser.error("need --steps >= 2 and --rounds >= 1")
    logging.basicConfig(level=logging.ERROR)
    print(json.dumps(table(resolve_device(args.device), args)))


if __name__ == "__main__":
    main()
