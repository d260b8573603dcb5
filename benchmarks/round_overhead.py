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
        records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    steady = records[1:] if len(records) > 1 else records
    wall = sum(r["seconds"] for r in steady)
    compute = sum(r["client_compute_s"] for r in steady)
    return {"rounds": [(r["round"], round(r["seconds"], 2), round(r["client_compute_s"], 2)) for r in records],
            "wall_s": wall, "compute_s": compute, "round_overhead": wall / compute}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--overrides", default="", help="extra Hydra overrides")
    args = parser.parse_args()
    result = measure(args.clients, args.rounds, args.local_steps, args.overrides)
    print("round, wall s, client compute s:", result["rounds"])
    print(f"steady-state rounds: {result['wall_s']:.2f} s wall, {result['compute_s']:.2f} s client compute")
    print(json.dumps({"round_overhead": round(result["round_overhead"], 4)}))


if __name__ == "__main__":
    main()
