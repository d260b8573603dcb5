"""Where a client's round goes: FLOPs and CPU seconds per phase, PF2LoRA against HOMLoRA (issue 29, item 1).

``python -m benchmarks.round_cost [--first-round] [--pf2lora OVERRIDE ...] [overrides ...]``

(``--pf2lora``: overrides for PF2LoRA alone, e.g. ``--pf2lora algorithm.hvp_every=5``.)

One client's round as the ClientApp runs it in steady state with ``eval_every=1`` (round r >= 2:
``ClientRuntime.train`` from the common adapter the previous round's evaluation re-fitted the
private level to, which PF2LoRA then does not re-fit again (``client_app``: a re-fit belongs to the
common adapter it was made for), then ``ClientRuntime.evaluate`` at the common adapter the round
produced; ``--first-round``: round 1, which re-fits before training), on the shipped defaults
(``conf/``: MiniLM-L6, Rotten Tomatoes, client 0; the algorithm's own
``conf/algorithm/<name>.yaml``), split into phases:

- training: *re-fit before training* (PF2LoRA's J lower-level steps at the received x),
  *lower-level gradient* (the bilevel step's grad_y f(x, y)), *outer gradient* (grad f at y'),
  *HVP* (the hypergradient's Hessian-vector product), *other training* (everything else in
  ``train``: HOMLoRA's whole AdamW steps, the optimiser updates);
- evaluation: *re-fit before evaluating*, *evaluation passes* (the forward passes over the test
  and validation splits, global and personalized), *other evaluation* (the rank analysis, loading).

FLOPs are counted by ``torch.utils.flop_counter`` (what ``summary.json``'s cost counts: matrix
products and convolutions, so the rank analysis's QR/SVD count none), CPU seconds by
``time.process_time`` (load on the machine does not stretch them). A phase is charged what runs
inside it and not inside a phase nested in it (exclusive accounting), so the phases sum to the
whole round exactly. FLOPs are exact and machine-independent; the seconds are one run's.

The last line printed is one JSON object: per algorithm, per phase ``{"flops", "seconds"}``, and
the ratios of PF2LoRA's training and training + evaluation FLOPs to HOMLoRA's.
``--smoke``: the same on a tiny BERT; checks that every phase expected of each algorithm was
charged, that the phases sum to the independently counted total, and that the gradient passes
PF2LoRA reports match its phases' calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

from pf2lora_core.training.cost import flop_counter

ALGORITHMS = ("homlora", "pf2lora")
TRAIN, EVALUATE = "training", "evaluation"
REFIT_TRAIN, REFIT_EVAL = "re-fit before training", "re-fit before evaluating"
LOWER, OUTER, HVP = "lower-level gradient", "outer gradient", "HVP"
EVAL_PASSES = "evaluation passes"
OTHER = {TRAIN: "other training", EVALUATE: "other evaluation"}
PHASES = (REFIT_TRAIN, LOWER, OUTER, HVP, OTHER[TRAIN], REFIT_EVAL, EVAL_PASSES, OTHER[EVALUATE])
# phases whose insides are not split further (an HVP by finite differences calls the Evaluator's grads)
LEAVES = {REFIT_TRAIN, REFIT_EVAL, LOWER, OUTER, HVP, EVAL_PASSES}


@dataclass
class _Open:
    name: str
    flops: int
    seconds: float
    nested_flops: int = 0
    nested_seconds: float = 0.0


@dataclass
class Ledger:
    """Exclusive FLOPs and CPU seconds per phase, read off one running ``FlopCounterMode``."""

    counter: FlopCounterMode
    flops: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    stack: list[_Open] = field(default_factory=list)

    def _total(self) -> int:
        return int(self.counter.get_total_flops())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.stack and self.stack[-1].name in LEAVES:  # inside a leaf: charged to it
            yield
            return
        opened = _Open(name, self._total(), time.process_time())
        self.stack.append(opened)
        try:
            yield
        finally:
            self.stack.pop()
            flops, seconds = self._total() - opened.flops, time.process_time() - opened.seconds
            self.flops[name] = self.flops.get(name, 0) + flops - opened.nested_flops
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds - opened.nested_seconds
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.stack:
                self.stack[-1].nested_flops += flops
                self.stack[-1].nested_seconds += seconds

    def current_top(self) -> str:
        return next((o.name for o in self.stack if o.name in (TRAIN, EVALUATE)), "")


def _wrap(ledger: Ledger, name: str | Callable[[], str], fn: Callable) -> Callable:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with ledger.phase(name() if callable(name) else name):
            return fn(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def instrumented(ledger: Ledger) -> Iterator[None]:
    """Charge the product's own functions to phases while the block runs (patched back afterwards)."""
    from pf2lora_core.algorithms import pf2lora
    from pf2lora_core.federation.client_runtime import ClientRuntime
    from pf2lora_core.training import hypergrad

    patches: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, new: Any) -> None:
        patches.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, new)

    def make_hvp(*args: Any, **kwargs: Any) -> Any:
        method = original_make_hvp(*args, **kwargs)
        method.gradient_pass = _wrap(ledger, LOWER, method.gradient_pass)  # instance attributes: this solver only
        method.hvp = _wrap(ledger, HVP, method.hvp)
        return method

    original_make_hvp = pf2lora.make_hvp
    refit = lambda: REFIT_TRAIN if ledger.current_top() == TRAIN else REFIT_EVAL  # noqa: E731
    patch(pf2lora, "make_hvp", make_hvp)
    patch(pf2lora.PF2LoRA, "refit_private", _wrap(ledger, refit, pf2lora.PF2LoRA.refit_private))
    patch(hypergrad.Evaluator, "grads", _wrap(ledger, OUTER, hypergrad.Evaluator.grads))
    patch(ClientRuntime, "train", _wrap(ledger, TRAIN, ClientRuntime.train))
    patch(ClientRuntime, "evaluate", _wrap(ledger, EVALUATE, ClientRuntime.evaluate))
    patch(ClientRuntime, "_evaluate_split", _wrap(ledger, EVAL_PASSES, ClientRuntime._evaluate_split))
    try:
        yield
    finally:
        for owner, attr, old in reversed(patches):
            setattr(owner, attr, old)


@dataclass
class Round:
    algorithm: str
    flops: dict[str, int]
    seconds: dict[str, float]
    calls: dict[str, int]
    total_flops: int  # counted independently of the ledger: the check that the phases sum to it
    gradient_passes: float

    def phase_flops(self, part: str) -> int:
        """Training or evaluation FLOPs (the phases charged inside that part)."""
        names = _part_phases(part)
        return sum(self.flops.get(n, 0) for n in names)


def _part_phases(part: str) -> tuple[str, ...]:
    if part == TRAIN:
        return (REFIT_TRAIN, LOWER, OUTER, HVP, OTHER[TRAIN])
    return (REFIT_EVAL, EVAL_PASSES, OTHER[EVALUATE])


def measure(algorithm: str, overrides: Sequence[str], first_round: bool = False) -> Round:
    """One client round of ``algorithm`` (train, then evaluate at the round's common adapter), by phase.

    Steady state (default): the round starts from the private level an evaluation at the same
    common adapter re-fitted (uncounted), as every round after an evaluated one does.
    """
    from pf2lora_core.config.experiment import load
    from pf2lora_core.config.keys import COMMON, GRADIENT_PASSES
    from pf2lora_core.federation.client_runtime import ClientRuntime

    exp = load([f"algorithm={algorithm}", "flops_rounds=0", *overrides])  # flops_rounds=0: our counter alone
    runtime = ClientRuntime(exp)
    common = runtime.model.export(COMMON)
    private, fitted = None, False
    if not first_round and exp.algorithm.refits_private:  # the previous round's evaluation, not counted
        private, fitted = runtime.evaluate(0, common, None).private, True
    with flop_counter() as counter:
        ledger = Ledger(counter)
        with instrumented(ledger):
            trained = runtime.train(0, 1, common, private, fitted=fitted)
            runtime.evaluate(0, trained.common, trained.private or None)
    flops = {OTHER.get(k, k): v for k, v in ledger.flops.items()}
    seconds = {OTHER.get(k, k): v for k, v in ledger.seconds.items()}
    passes = float(trained.metrics.get(GRADIENT_PASSES, 0.0))
    return Round(algorithm, flops, seconds, ledger.calls, int(counter.get_total_flops()), passes)


# ------------------------------------------------------------------------------------ report
def table(rounds: Sequence[Round]) -> list[str]:
    from pf2lora_core.analysis.tables import markdown_table

    head = ["phase", *(f"{r.algorithm} GFLOPs" for r in rounds), *(f"{r.algorithm} CPU s" for r in rounds)]
    rows = []
    for name in PHASES:
        if any(name in r.flops for r in rounds):
            rows.append([name, *(f"{r.flops.get(name, 0) / 1e9:.2f}" for r in rounds),
                         *(f"{r.seconds.get(name, 0.0):.2f}" for r in rounds)])  # fmt: skip
    rows.append(["total", *(f"{sum(r.flops.values()) / 1e9:.2f}" for r in rounds),
                 *(f"{sum(r.seconds.values()):.2f}" for r in rounds)])  # fmt: skip
    return markdown_table(head, rows)


def ratios(rounds: Sequence[Round]) -> dict[str, float]:
    by = {r.algorithm: r for r in rounds}
    pf, hom = by["pf2lora"], by["homlora"]
    train = pf.phase_flops(TRAIN) / hom.phase_flops(TRAIN)
    both = sum(pf.flops.values()) / sum(hom.flops.values())
    return {"training_flops_ratio": train, "round_flops_ratio": both}


def report(rounds: Sequence[Round]) -> dict[str, Any]:
    out: dict[str, Any] = {
        r.algorithm: {n: {"flops": r.flops[n], "seconds": round(r.seconds.get(n, 0.0), 4)} for n in r.flops}
        for r in rounds
    }
    out.update(ratios(rounds))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.round_cost", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both algorithms (e.g. local_steps=8)")
    parser.add_argument("--smoke", action="store_true", help="a tiny BERT; checks the accounting")
    parser.add_argument("--first-round", action="store_true", help="round 1 (PF2LoRA re-fits before training)")
    parser.add_argument("--pf2lora", action="append", default=[], metavar="OVERRIDE", help="for PF2LoRA alone")
    args = parser.parse_args(argv)
    from pf2lora_core.run.console import quiet_libraries

    quiet_libraries()  # no progress bars between the lines of the table
    if args.smoke:
        return smoke()
    extra = {"pf2lora": args.pf2lora}
    rounds = [measure(a, [*args.overrides, *extra.get(a, [])], args.first_round) for a in ALGORITHMS]
    print("\n".join(table(rounds)))
    r = ratios(rounds)
    print(f"PF2LoRA / HOMLoRA FLOPs: training {r['training_flops_ratio']:.2f}x, training + evaluation "
          f"{r['round_flops_ratio']:.2f}x")  # fmt: skip
    print(json.dumps(report(rounds)))
    return 0


EXPECTED = {
    "homlora": {OTHER[TRAIN], EVAL_PASSES},
    "pf2lora": {LOWER, OUTER, HVP, REFIT_EVAL, EVAL_PASSES},  # steady state: no re-fit before training
}


def smoke() -> int:
    from benchmarks.smoke import Checks, tiny_model_overrides

    checks = Checks("round_cost")
    with tempfile.TemporaryDirectory(prefix="pf2lora-smoke-cost-") as tmp:
        overrides = [
            *tiny_model_overrides(Path(tmp)),
            "local_steps=2",
            "task.max_examples=160",
            "federation.num_clients=2",
        ]
        rounds = [measure(a, overrides) for a in ALGORITHMS]  # the shipped defaults
        exact = [*overrides, "algorithm=pf2lora_exact"]  # every step's exact hypergradient, J = K
        steady, first = measure("pf2lora", exact), measure("pf2lora", exact, first_round=True)
    for r in rounds:
        for name in EXPECTED[r.algorithm]:
            checks.finite(r.flops.get(name, 0), f"{r.algorithm}: {name} FLOPs", low=1.0)
            checks.finite(r.seconds.get(name, -1.0), f"{r.algorithm}: {name} seconds", low=0.0)
        checks.require(sum(r.flops.values()) == r.total_flops, f"{r.algorithm}: phases sum to the round's FLOPs")
    pf = next(r for r in rounds if r.algorithm == "pf2lora")
    steps, refit = 2, 2  # local_steps, and pf2lora_exact's refit_steps (= local_steps)
    # steady state: the evaluation's re-fit only (the training starts from it); round 1: both
    for r in (pf, steady):
        checks.require(REFIT_TRAIN not in r.calls and r.calls.get(REFIT_EVAL) == 1, f"one re-fit: {r.calls}")
    checks.require(first.calls.get(REFIT_TRAIN) == 1 and first.calls.get(REFIT_EVAL) == 1, f"two: {first.calls}")
    # the exact rule, forward difference: the HVP is one gradient pass, a step three (lower, outer, HVP)
    checks.require(steady.calls.get(LOWER) == steps and steady.calls.get(HVP) == steps, f"each step: {steady.calls}")
    checks.require(steady.gradient_passes == 3 * steps, f"passes {steady.gradient_passes} = 3K")
    checks.require(first.gradient_passes == refit + 3 * steps, f"round 1 passes {first.gradient_passes} = J + 3K")
    # the default: reuse_inner_grad (the carry's start, then one pass a step) and one HVP a round (hvp_every = K)
    checks.require(pf.calls.get(HVP) == 1 and pf.gradient_passes == 1 + steps + 1, f"default: {pf.gradient_passes}")
    checks.require(sum(steady.flops.values()) > sum(pf.flops.values()), "the default costs less than the exact rule")
    for key, value in ratios(rounds).items():
        checks.finite(value, key, low=1.0)
    print("\n".join(table(rounds)))
    print(json.dumps(report(rounds)))
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
