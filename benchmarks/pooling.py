"""What the classifier head should read: mean pooling vs the pretrained [CLS] pooler (frozen or trained).

A short in-process measurement (no Flower): one client holding ``--rows`` Rotten Tomatoes snippets
(iid), HOMLoRA for ``--steps`` local steps of MiniLM, then validation (and test, for information
only) accuracy per arm. The default of ``model.pooling`` is chosen on validation.

    python -m benchmarks.pooling --rows 1000 --steps 80 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time

from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import ACCURACY, BALANCED_ACCURACY, COMMON
from pf2lora_core.federation.client_runtime import ClientRuntime

ARMS = {
    "mean": ["model.pooling=mean"],
    "native (frozen pooler)": ["model.pooling=native"],
    "native + trained pooler": ["model.pooling=native", "model.head_modules=[classifier,pooler]"],
}


def measure(arm: list[str], rows: int, steps: int, seed: int) -> dict[str, float]:
    exp = load(["algorithm=homlora", "partition=iid", "federation.num_clients=1", "federation.min_train_clients=1",
                f"task.max_examples={rows}",
                f"local_steps={steps}", f"seed={seed}", "flops_rounds=0", *arm])  # fmt: skip
    rt = ClientRuntime(exp)
    start = time.perf_counter()
    out = rt.train(0, 1, rt.model.export(COMMON), None)
    ev = rt.evaluate(0, out.common, None)
    return {
        "validation": ev.validation[ACCURACY],
        "validation_balanced": ev.validation[BALANCED_ACCURACY],
        "test": ev.personalized[ACCURACY],
        "num_validation": ev.num_validation,
        "num_test": ev.num_examples,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args()
    for seed in args.seeds:
        for name in args.arms:
            result = measure(ARMS[name], args.rows, args.steps, seed)
            print(json.dumps({"arm": name, "seed": seed, **result}), flush=True)


if __name__ == "__main__":
    main()
