"""The cross-device regime (issue 28, item 4): many clients with little data, a tenth of them per round.

``python -m benchmarks.cross_device [--stages rt2_s0.5,...] [--workers 2]`` (``make results-cross-device``)

``results/`` (``benchmarks.results``) measures 4 clients of 400 snippets that all train every
round: there a client's own data carries most of what it needs, and ``local`` cannot be told
apart from the best federated methods. This is the other regime, ``experiment=cross_device``:
64 clients x 40 snippets (28 train / 4 validation / 8 test), 6 sampled per round, 10 rounds
x 2 local steps, so a client trains in about one round of ten and about a third never train.
PF2LoRA, HOMLoRA, FedSA-LoRA, Per-FedAvg and ``local`` at the configurations ``results/`` uses
(``pf2lora-tune``'s, chosen on ``offline_compare``), Rotten Tomatoes 2-way and 3-way at s = 0.3
and 0.5, seeds 0, 1, 2, evaluated once at the end on every client (the final evaluation: each
client's ``rounds_trained`` says how often it trained). The same runner, log and table cells as
``benchmarks.results`` (mean ± standard error over seeds, ``*`` / ``≈`` by Welch intervals);
its own log, ``results/cross_device/runs.jsonl``, resumable: a re-run computes only what is missing
and ``results/cross_device/README.md`` is re-rendered after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks import results
from benchmarks.federated import CACHE, DATASETS, Job, RunLog, Sizes, mean
from benchmarks.results import (
    PF2LORA,
    RESULTS,
    SEEDS,
    algorithm_overrides,
    config_text,
    kept_prose,
    per_run,
    prior_runs,
    run_time,
    runs_of,
    setting_table,
    table_marks,
    tuned_overrides,
    write_readme,
)
from pf2lora_core.analysis.tables import cell, markdown_table

OUT = RESULTS / "cross_device"
PRESET = "cross_device"
ALGORITHMS = (PF2LORA, "homlora", "fedsa_lora", "perfedavg", "local")
S_VALUES = (0.5, 0.3)
STAGES = tuple(f"{d}_s{s}" for s in S_VALUES for d in DATASETS)  # rt2_s0.5, rt3_s0.5, rt2_s0.3, rt3_s0.3
# rounds a client trained, grouped: (label, lowest, highest)
BUCKETS = (("never trained", 0, 0), ("trained once", 1, 1), ("trained 2+ times", 2, 10**9))


@dataclasses.dataclass(frozen=True)
class CrossDeviceSizes(Sizes):
    """``experiment=cross_device``'s sizes, recorded with every run (a changed preset never reuses old runs).

    ``tests/benchmarks/test_cross_device.py`` checks the defaults are the preset's. ``model_dir``:
    a tiny BERT in place of MiniLM (the smoke run).
    """

    clients: int = 64
    examples: int = 2560
    rounds: int = 10
    local_steps: int = 2
    fraction_train: float = 0.1
    min_train_clients: int = 3
    max_length: int = 32
    model_dir: str = ""

    def overrides(self, setting: str) -> list[str]:
        model = ["model.source=path", f"model.name={self.model_dir}"] if self.model_dir else []
        federation = [
            f"federation.fraction_train={self.fraction_train!r}",
            f"federation.min_train_clients={self.min_train_clients}",
            f"task.max_length={self.max_length}",
        ]
        return [f"experiment={PRESET}", *super().overrides(setting), *federation, *model]


def jobs_of(stage: str, tuned: Mapping[str, list[str]], seeds: Sequence[int]) -> list[Job]:
    if stage not in STAGES:
        raise SystemExit(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    return [Job(stage, algorithm_overrides(name, tuned), seed) for seed in seeds for name in ALGORITHMS]


# --------------------------------------------------------------------------------- tables
def bucket_values(run: Mapping, field: str, low: int, high: int) -> list[float]:
    """``field`` of the clients of ``run`` that trained between ``low`` and ``high`` rounds."""
    trained = run.get("rounds_trained") or []
    values = run.get(field) or []
    return [
        float(v) for t, v in zip(trained, values, strict=False)
        if t is not None and low <= t <= high and v is not None and math.isfinite(float(v))
    ]  # fmt: skip


def bucket_cell(runs: Sequence[Mapping], field: str, low: int, high: int) -> str:
    """Mean ± se over seeds of the mean over the bucket's clients, and how many clients a seed has there."""
    per_seed = [bucket_values(r, field, low, high) for r in runs]
    means = [mean(v) for v in per_seed if v]
    if not means:
        return "-"
    return f"{cell(means)} ({mean(len(v) for v in per_seed):.0f})"


def rarely_table(log: RunLog, setting: str, tuned: Mapping[str, list[str]], seeds: Sequence[int]) -> list[str]:
    """Personalized (and, for PF2LoRA, global) test accuracy by how often a client trained."""
    head = ["algorithm", *(f"{label} (clients)" for label, _, _ in BUCKETS)]
    lines = []
    for name in ALGORITHMS:
        runs = runs_of(log, setting, algorithm_overrides(name, tuned), seeds)
        lines.append([name, *(bucket_cell(runs, "test", lo, hi) for _, lo, hi in BUCKETS)])
        if name == PF2LORA:  # its common adapter alone: what the private level adds is the difference
            lines.append(
                ["pf2lora, common adapter alone", *(bucket_cell(runs, "test_global", lo, hi) for _, lo, hi in BUCKETS)]
            )
    priors = prior_runs(log, setting, {a: ("", algorithm_overrides(a, tuned)) for a in ALGORITHMS}, seeds)
    lines.append(["prior: client majority", *(bucket_cell(priors, "client_majority", lo, hi) for _, lo, hi in BUCKETS)])
    return markdown_table(head, lines)


def summary_table(log: RunLog, tuned: Mapping[str, list[str]], seeds: Sequence[int]) -> list[str]:
    """Personalized test accuracy, algorithms x settings, then the worst client's, then the priors."""
    runs = {(a, s): runs_of(log, s, algorithm_overrides(a, tuned), seeds) for a in ALGORITHMS for s in STAGES}
    marked = {s: table_marks({a: runs[(a, s)] for a in ALGORITHMS}) for s in STAGES}
    lines = [[a, *(cell(per_run(runs[(a, s)], "test"), mark=marked[s].get(a, "")) for s in STAGES)] for a in ALGORITHMS]
    lines += [[f"{a}: worst client", *(cell(per_run(runs[(a, s)], "test", min)) for s in STAGES)] for a in ALGORITHMS]
    rows = {a: ("", algorithm_overrides(a, tuned)) for a in ALGORITHMS}
    splits = {s: prior_runs(log, s, rows, seeds) for s in STAGES}
    for prior in ("client_majority", "global_majority"):
        lines.append([f"prior: {prior.replace('_', ' ')}", *(cell(per_run(splits[s], prior)) for s in STAGES)])
    return markdown_table(["algorithm", *STAGES], lines)


def header(log: RunLog, tuned: Mapping[str, list[str]], seeds: Sequence[int], workers: int) -> list[str]:
    sz = log.sizes
    per = sz.examples // sz.clients
    jobs = list({j.key: j for stage in STAGES for j in jobs_of(stage, tuned, seeds)}.values())
    n_done, seconds, missing = run_time(log, jobs)
    state = (
        f"all {n_done} runs done" if n_done == len(jobs)
        else f"{n_done} of {len(jobs)} runs done (the cells of the others say \"not run yet\" or are missing; they "
        f"would add about {missing / 3600:.1f} h of run time)"
    )  # fmt: skip
    sampled = max(int(sz.clients * sz.fraction_train), sz.min_train_clients)
    return [
        "# Cross-device: many clients, little data each, a tenth of them per round",
        "",
        "Regenerate (resumable: `runs.jsonl` holds every finished run and this file is rendered from it):",
        "",
        "```bash",
        "make results-cross-device   # = .venv/bin/python -m benchmarks.cross_device --workers 2",
        "```",
        "",
        f"Setting (`experiment=cross_device`): packaged MiniLM-L6, {sz.clients} clients x {per} Rotten Tomatoes "
        f"snippets ({round(per * 0.7)} train / {round(per * 0.1)} validation / {round(per * 0.2)} test per client), "
        f"s-split partition, {sampled} clients sampled per round (`fraction_train={sz.fraction_train}`), "
        f"{sz.rounds} rounds x {sz.local_steps} local steps of 16, snippets cut at {sz.max_length} word pieces, "
        f"seeds {', '.join(map(str, seeds))}; the "
        "final evaluation scores every client at the final common adapter. Configurations: those of "
        "[results/](../README.md) (`pf2lora-tune` on `offline_compare`; chosen in the other regime, not "
        "re-tuned here). Cells: mean ± standard error over seeds of the mean over clients; `*` the best row, "
        "`≈` inside the best's 95% Welch interval; `worst client`: the lowest client's accuracy (8 test rows "
        f"each: one row is 0.125, so the worst of {sz.clients} is mostly sampling noise). Priors: each client's own "
        "majority training label, and the pooled one, scored on the test splits.",
        "",
        f"Run time: {state}; {seconds / 3600:.1f} h summed over the runs done, on a 2-core CPU without GPU, "
        f"{workers} runs at a time.",
        "",
    ]


def render(log: RunLog, tuned: Mapping[str, list[str]], seeds: Sequence[int], out: Path, workers: int = 2) -> Path:
    """Write ``out / README.md`` from the finished runs, keeping its prose block; returns its path."""
    readme = out / "README.md"
    lines = [*header(log, tuned, seeds, workers), kept_prose(readme), "", "## Personalized test accuracy", ""]
    lines += [*summary_table(log, tuned, seeds), ""]
    lines += ["## Clients that rarely train", "",
              "Personalized test accuracy of the clients grouped by the rounds they trained (mean ± se over seeds; "
              "in brackets, clients per seed in the group).", ""]  # fmt: skip
    for setting in STAGES:
        lines += [f"### {setting}", "", *rarely_table(log, setting, tuned, seeds), ""]
    algorithms = {a: (config_text(a, tuned), algorithm_overrides(a, tuned)) for a in ALGORITHMS}
    for setting in STAGES:
        d, _, s = setting.partition("_s")
        lines += [f"## {DATASETS[d]}, s = {s}", "", *setting_table(log, setting, algorithms, seeds), ""]
    return write_readme(readme, lines)


# --------------------------------------------------------------------------------- running
def regenerate(
    stages: Sequence[str], log: RunLog, tuned: Mapping[str, list[str]], seeds: Sequence[int], workers: int,
    cache: Path, out: Path, render_each: bool = True,
) -> list[Job]:  # fmt: skip
    """``benchmarks.results.regenerate`` with this benchmark's jobs and README."""
    render_here = functools.partial(render, workers=workers)
    return results.regenerate(
        stages, log, tuned, seeds, workers, cache, out, render_each, jobs_for=jobs_of, render_with=render_here
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cross_device", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, from: " + ", ".join(STAGES))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--workers", type=int, default=2, help="runs at once (threads split between them)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the 3-way csv is built")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render-only", action="store_true", help="re-render README.md from runs.jsonl")
    parser.add_argument("--smoke", action="store_true", help="tiny runs into a temporary directory; checks them")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke(args.cache)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    log, tuned = RunLog(args.out / "runs.jsonl", CrossDeviceSizes()), tuned_overrides()
    failed = (
        []
        if args.render_only
        else regenerate(args.stages.split(","), log, tuned, seeds, args.workers, args.cache, args.out)
    )
    print(f"wrote {render(log, tuned, seeds, args.out, args.workers)}")
    return 1 if failed else 0


SMOKE_SIZES = dict(clients=8, examples=160, rounds=1, local_steps=1, fraction_train=0.25, min_train_clients=2)


def smoke(cache: Path) -> int:
    """``--smoke``: 8 clients of 20 snippets, 2 sampled in its one round, the tiny BERT, stage rt2_s0.5, seed 0.

    Checks: every job ran; every client was evaluated (the final evaluation, not only the sampled
    ones) with accuracies in [0, 1]; ``rounds_trained`` of a run sums to the client-rounds that
    trained, and some clients never trained; the README's tables are full; results/ untouched.
    """
    from benchmarks.smoke import Checks, fingerprint, tiny_bert

    checks, before, seeds, stage = Checks("cross_device"), fingerprint(), [0], STAGES[0]
    with tempfile.TemporaryDirectory(prefix="pf2lora-smoke-cd-") as tmp:
        out = Path(tmp) / "cross_device"
        sizes = CrossDeviceSizes(**SMOKE_SIZES, model_dir=str(tiny_bert(Path(tmp) / "tiny-bert")))
        log, tuned = RunLog(out / "runs.jsonl", sizes), tuned_overrides()
        failed = regenerate([stage], log, tuned, seeds, 2, cache, out, render_each=False)
        readme = render(log, tuned, seeds, out).read_text(encoding="utf-8")
        checks.require(not failed, f"no failed run ({len(failed)} failed)")
        per_round = max(int(sizes.clients * sizes.fraction_train), sizes.min_train_clients)
        for job in jobs_of(stage, tuned, seeds):
            result, name = log.result(job), " ".join(job.overrides)
            if not checks.require(result is not None, f"{name}: ran"):
                continue
            trained = result.get("rounds_trained") or []
            checks.require(len(result["test"]) == len(trained) == sizes.clients, f"{name}: every client evaluated")
            for k, value in enumerate(result["test"]):
                checks.finite(value, f"{name}: client {k} test", 0.0, 1.0)
            checks.require(
                sum(trained) == sizes.rounds * per_round, f"{name}: rounds_trained sums to {sizes.rounds} x {per_round}"
            )
            checks.require(0 in trained, f"{name}: some client never trained ({trained})")
        summary = readme.split("## Personalized test accuracy", 1)[-1].split("\n## ", 1)[0]
        rarely = readme.split(f"### {stage}", 1)[-1].split("\n#", 1)[0]
        for name in ALGORITHMS:  # a number in the row's first cell after the name (tabulate pads the cells)
            checks.require(
                re.search(rf"^\|\s*{name}\s*\|\s*\d\.\d{{3}}", summary, re.M) is not None,
                f"README: {name} in the summary",
            )
            row = re.search(rf"^\|\s*{name}\s*\|\s*(\d\.\d{{3}})", rarely, re.M)
            checks.require(row is not None, f"README: {name}'s never-trained clients scored")
        print(json.dumps({"runs": len(log.done), "failed": len(failed)}))
    checks.require(fingerprint() == before, "results/ untouched")
    return checks.finish()


if __name__ == "__main__":
    raise SystemExit(main())
