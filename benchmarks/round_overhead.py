"""Round overhead of the Flower simulation: a round's wall time over the clients' own compute in it.

Runs ``flwr run .`` (the product path) with one client at a time (``client-resources-num-cpus=2``
on 2 cores), so a round's wall time is the clients' compute plus everything else: Ray scheduling,
message (de)serialisation, server-side validation, aggregation, checkpoint and log writing.
The first round is excluded (it loads the model and tokenizes the data once per process).
Last line: ``{"round_overhead": x}`` with x = sum(round seconds) / sum(client compute seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pf2lora_core.config.keys import METRICS_FILE
from pf2lora_core.run.records import read_metrics
from pf2lora_core.tools.launch import flwr_run

ROOT = Path(__file__).resolve().parent.parent


def measure(clients: int, rounds: int, steps: int, extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        overrides = (
            f"federation.num_clients={clients} rounds={rounds} local_steps={steps} run_dir={run_dir} "
            f"federation.state_dir={tmp}/state task.max_examples={clients * 100} {extra}"
        ).strip()
        proc = flwr_run(
            overrides,
            f"num-supernodes={clients} client-resources-num-cpus=2",
            Path(tmp) / "flwr_home",
            ROOT,
            timeout=1800,
            extra_env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        )
        if proc.returncode != 0 or not (run_dir / METRICS_FILE).exists():
            sys.stderr.write((proc.stdout + proc.stderr)[-3000:])
            raise SystemExit("the simulation failed")
        records = read_metrics(run_dir / METRICS_FILE)
    steady = records[1:] if len(records) > 1 else records
    wall = sum(r.seconds for r in steady)
    compute = sum(r.client_compute_s for r in steady)
    return {"rounds": [(r.round, round(r.seconds, 2), round(r.client_compute_s, 2)) for r in records],
            "wall_s": wall, "compute_s": compute, "round_overhead": wall / compute}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--overrides", default="", help="extra Hydra overrides")
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, 2 clients, 2 rounds of 1 step; checks")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke()
    report(measure(args.clients, args.rounds, args.local_steps, args.overrides))
    return 0


def report(result: dict) -> str:
    print("round, wall s, client compute s:", result["rounds"])
    print(f"steady-state rounds: {result['wall_s']:.2f} s wall, {result['compute_s']:.2f} s client compute")
    line = json.dumps({"round_overhead": round(result["round_overhead"], 4)})
    print(line)
    return line


def smoke() -> int:
    """``--smoke``: a real ``flwr run`` of the tiny BERT (2 clients, 2 rounds of 1 step), then checks.

    Checks: every round was recorded with positive wall time and positive client compute (the
    steady-state round, the second, is what the ratio reads), the ratio is finite and positive,
    and its JSON line parses.
    """
    from benchmarks.smoke import Checks, tiny_model_overrides

    checks, clients, rounds = Checks("round_overhead"), 2, 2
    with tempfile.TemporaryDirectory(prefix="pf2lora-smoke-round-overhead-") as tmp:
        tiny = " ".join([*tiny_model_overrides(Path(tmp) / "tiny-bert"), "flops_rounds=0"])
        result = measure(clients, rounds, 1, tiny)
    checks.require([r[0] for r in result["rounds"]] == list(range(1, rounds + 1)), f"rounds {result['rounds']}")
    for rnd, wall, compute in result["rounds"]:
        checks.finite(wall, f"round {rnd}: wall s", low=1e-9)
        checks.finite(compute, f"round {rnd}: client compute s", low=1e-9)
    line = checks.json_line(report(result), "the JSON line")
    if line is not None:
        checks.finite(line["round_overhead"], "round_overhead", low=1e-9)
    return checks.finish()


if __name__ == "__main__":
    raise SystemExit(main())
