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
from pf2lora_core.federation.checks import update_norm, update_reference
from pf2lora_core.federation.client_runtime import ClientRuntime


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
            row.append(update_norm(up, update_reference(up, sent, fresh)))
            ups.append(out.common), weights.append(float(out.num_examples)), clients.append(client)
        state = algo.server_update(state, ups, weights, clients)
        norms.append(row)
        print(f"{algorithm} round {rnd}: max {max(row):.4f} median {statistics.median(row):.4f}", flush=True)
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--algorithms", default="homlora,pf2lora")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    everything = []
    for name in args.algorithms.split(","):
        everything += [n for row in measure(name, args.rounds, args.overrides) for n in row]
    print(f"all: max {max(everything):.4f}, 99th percentile {np.percentile(everything, 99):.4f}")


if __name__ == "__main__":
    main()
