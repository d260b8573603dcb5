"""Honest clients' update norms, the basis of federation.max_update_norm: ``python -m benchmarks.update_norm``.

Runs ``--rounds`` rounds of the given algorithms in-process (every client trains from the
downlink, the server averages by examples, as the real strategy does) on the default experiment
(MiniLM, Rotten Tomatoes, 8 clients, 5 local steps) plus any Hydra overrides, and prints, per
algorithm and round, the largest and median ``||uplink - downlink||_2`` (pf2lora_core.federation.checks
.update_norm, the quantity the server bounds).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from pf2lora_core.config.experiment import load
from pf2lora_core.federation.checks import auto_bound, update_norm, update_reference
from pf2lora_core.federation.client_runtime import ClientRuntime
from pf2lora_core.training.runtime import derived_seed


def measure(algorithm: str, rounds: int, overrides: list[str]) -> list[list[float]]:
    exp = load([f"algorithm={algorithm}", *overrides])
    runtime = ClientRuntime(exp)
    algo = exp.algorithm
    initial = runtime.model.export("common")
    fresh = {k: v.numpy() for k, v in initial.items()}
    state = algo.server_init(initial)
    privates: dict[int, dict[str, torch.Tensor] | None] = {}
    norms = []
    for rnd in range(1, rounds + 1):
        ups, weights, clients, row = [], [], [], []
        for client in range(exp.federation.num_clients):
            down = algo.downlink(state, client)
            out = runtime.train(client, rnd, down, privates.get(client))
            privates[client] = out.private or None
            up = {k: v.numpy() for k, v in out.common.items()}
            sent = {k: v.numpy() for k, v in down.items()}
            origin = algo.update_origin(fresh, derived_seed(exp.seed, client, rnd))  # as the server measures it
            row.append(update_norm(up, update_reference(up, sent, origin)))
            ups.append(out.common), weights.append(float(out.num_examples)), clients.append(client)
        state = algo.server_update(state, ups, weights, clients)
        norms.append(row)
        bound = auto_bound(algo, exp.local_steps, exp.federation.num_clients, sum(t.numel() for t in initial.values()))
        print(f"{algorithm} round {rnd}: max {max(row):.4f} median {statistics.median(row):.4f} "
              f"(federation.max_update_norm=auto: {bound:.4g})", flush=True)  # fmt: skip
    return norms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--algorithms", default="homlora,pf2lora")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, 2 clients, 1 step; checks the norms")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke(args.algorithms.split(","), args.rounds)
    everything = []
    for name in args.algorithms.split(","):
        everything += [n for row in measure(name, args.rounds, args.overrides) for n in row]
    print(f"all: max {max(everything):.4f}, 99th percentile {np.percentile(everything, 99):.4f}")
    return 0


def smoke(algorithms: list[str], rounds: int) -> int:
    """``--smoke``: ``rounds`` rounds of 2 tiny-BERT clients, 1 local step each, one thread; then checks.

    Checks: one norm per client and round of every algorithm, each finite and positive (a client
    that trained moved its adapter; a zero norm would mean the uplink measured nothing), and the
    JSON line of the largest and 99th-percentile norm parses.
    """
    import json
    import tempfile
    from pathlib import Path

    from benchmarks.smoke import Checks, tiny_model_overrides

    torch.set_num_threads(1)
    checks, clients = Checks("update_norm"), 2
    with tempfile.TemporaryDirectory(prefix="pf2lora-smoke-update-norm-") as tmp:
        tiny = [*tiny_model_overrides(Path(tmp) / "tiny-bert"), f"federation.num_clients={clients}",
                f"task.max_examples={80 * clients}", "local_steps=1", "flops_rounds=0"]  # fmt: skip
        everything = []
        for name in algorithms:
            norms = measure(name, rounds, tiny)
            checks.require([len(row) for row in norms] == [clients] * rounds, f"{name}: a norm per client and round")
            for r, row in enumerate(norms, start=1):
                for k, norm in enumerate(row):
                    checks.finite(norm, f"{name} round {r} client {k}: update norm", low=1e-12)
            everything += [n for row in norms for n in row]
    line = json.dumps({"max": max(everything), "p99": float(np.percentile(everything, 99)), "n": len(everything)})
    print(line)
    checks.json_line(line, "the JSON line")
    return checks.finish()


if __name__ == "__main__":
    raise SystemExit(main())
