"""Issue 29: PF2LoRA's cost options against the exact rule, at results/'s sizes, s = 0.5, 3 seeds.

``python results/cost_options/run.py run <variant>``: the variant's 6 runs (Rotten Tomatoes 2-way and
3-way at s = 0.5, seeds 0-2; PF2LoRA's tuned configuration of results/, ``eval_every=1`` so that
every round after the first trains from its evaluation's re-fit), resumable (``benchmarks.federated.RunLog``
skips what its jsonl holds), 2 at a time. ``python results/cost_options/run.py table``: the
markdown table of README.md, each variant against the exact rule's rows of ``results/runs.jsonl``
(the same configuration and sizes, run before the re-fit was kept) with the 95% Welch interval of
the difference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = ("rt2_s0.5", "rt3_s0.5")
SEEDS = (0, 1, 2)
TUNED_LR = 0.0020554062603827007  # results/' tuned PF2LoRA lr (tune_offline_compare)
# variant -> (its runs' file, PF2LoRA overrides beyond results/'s tuned configuration)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "refit once (J = 5, exact hypergradient)": ("refit_once.jsonl", ()),
    "cheap: reuse_inner_grad, hvp_every = 5, J = 3": (
        "cheap.jsonl",
        ("algorithm.reuse_inner_grad=true", "algorithm.hvp_every=5", "algorithm.refit_steps=3"),
    ),
    # the private level's step at a quarter of the common one (issue 29, item 4: generation overfit)
    "cheap, inner_lr = lr / 4": (
        "cheap_inner_quarter.jsonl",
        (
            "algorithm.reuse_inner_grad=true",
            "algorithm.hvp_every=5",
            "algorithm.refit_steps=3",
            f"algorithm.inner_lr={TUNED_LR / 4}",
        ),
    ),
    # and round 1 from the private initialization (no re-fit before a client's first bilevel steps)
    "shipped: cheap, inner_lr = lr / 4, round 1 from the initialization": (
        "shipped.jsonl",
        (
            "algorithm.reuse_inner_grad=true",
            "algorithm.hvp_every=5",
            "algorithm.refit_steps=3",
            f"algorithm.inner_lr={TUNED_LR / 4}",
            "algorithm.refit_initial=false",
        ),
    ),
}


def run(variant: str) -> None:
    from benchmarks.federated import Job, RunLog, Sizes, run_all
    from benchmarks.results import PF2LORA, algorithm_overrides, tuned_overrides

    name, extra = VARIANTS[variant]
    log = RunLog(HERE / name, Sizes())
    base = algorithm_overrides(PF2LORA, tuned_overrides())  # every variant on top of the exact rule
    jobs = [Job(s, (*base, "eval_every=1", *extra), seed) for seed in SEEDS for s in reversed(SETTINGS)]
    run_all(jobs, log, workers=2)


def _scores(path: Path, keep) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if keep(row["job"]):
            test = row["result"]["test"]
            out.setdefault(row["job"]["setting"], []).append(sum(test) / len(test))
    return out


def table() -> str:
    from benchmarks.results import PF2LORA, algorithm_overrides, tuned_overrides
    from pf2lora_core.analysis.statistics import welch_interval
    from pf2lora_core.analysis.tables import cell

    tuned = list(algorithm_overrides(PF2LORA, tuned_overrides()))
    exact = _scores(HERE.parent / "runs.jsonl", lambda job: list(job["overrides"]) == tuned)
    lines = ["| variant | " + " | ".join(f"{s} personalized test" for s in SETTINGS) + " |", "|---" * 3 + "|"]
    lines.append("| exact rule (results/) | " + " | ".join(cell(exact.get(s, [])) for s in SETTINGS) + " |")
    for variant, (name, _) in VARIANTS.items():
        path = HERE / name
        got = _scores(path, lambda job: True) if path.exists() else {}
        cells = []
        for s in SETTINGS:
            lo, hi = welch_interval(got.get(s, []), exact.get(s, []))
            cells.append(f"{cell(got.get(s, []))} (difference in [{lo:+.3f}, {hi:+.3f}])")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(" ".join(sys.argv[2:]) if sys.argv[2:] else next(iter(VARIANTS)))
    else:
        print(table())
