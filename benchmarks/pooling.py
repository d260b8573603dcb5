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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import ACCURACY, BALANCED_ACCURACY, COMMON
from pf2lora_core.federation.client_runtime import ClientRuntime

ARMS = {
    "mean": ["model.pooling=mean"],
    "native (frozen pooler)": ["model.pooling=native"],
    "native + trained pooler": ["model.pooling=native", "model.head_modules=[classifier,pooler]"],
}


def measure(arm: list[str], rows: int, steps: int, seed: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    exp = load(["algorithm=homlora", "partition=iid", "federation.num_clients=1", "federation.min_train_clients=1",
                f"task.max_examples={rows}",
                f"local_steps={steps}", f"seed={seed}", "flops_rounds=0", *arm, *extra])  # fmt: skip
    rt = ClientRuntime(exp)
    start = time.perf_counter()
    out = rt.train(0, 1, rt.model.export(COMMON), None)
    ev = rt.evaluate(0, out.common, None)
    return {
        "pooling": exp.model.pooling,
        "head_modules": list(exp.model.head_modules),
        "validation": ev.validation[ACCURACY],
        "validation_balanced": ev.validation[BALANCED_ACCURACY],
        "test": ev.personalized[ACCURACY],
        "num_validation": ev.num_validation,
        "num_test": ev.num_examples,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, 80 rows, 1 step, every arm; checks the lines")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke()
    for seed in args.seeds:
        for name in args.arms:
            result = measure(ARMS[name], args.rows, args.steps, seed)
            print(json.dumps({"arm": name, "seed": seed, **result}), flush=True)
    return 0


def smoke() -> int:
    """``--smoke``: every arm on the tiny BERT (80 rows, 1 step, one thread), then checks of each JSON line.

    Checks: the line parses; the arm's configuration is the one the model was built with (its
    pooling, and the pooler trained or not); accuracies lie in [0, 1] over a non-empty validation
    and test split; the arm took time.
    """
    import tempfile

    import torch

    from benchmarks.smoke import Checks, tiny_model_overrides

    torch.set_num_threads(1)
    checks = Checks("pooling")
    with tempfile.TemporaryDirectory(prefix="pf2lora-smoke-pooling-") as tmp:
        model = tiny_model_overrides(Path(tmp) / "tiny-bert")
        for name, arm in ARMS.items():
            line = json.dumps({"arm": name, "seed": 0, **measure(arm, 80, 1, 0, model)})
            print(line, flush=True)
            row = checks.json_line(line, f"{name}: its line")
            if row is None:
                continue
            pooling = arm[0].split("=", 1)[1]
            checks.require(row["pooling"] == pooling, f"{name}: pooling {row['pooling']} is {pooling}")
            trained = "pooler" in row["head_modules"]
            checks.require(trained == (len(arm) > 1), f"{name}: pooler trained {trained}")
            checks.require(row["num_validation"] > 0 and row["num_test"] > 0, f"{name}: validation and test rows")
            for key in ("validation", "validation_balanced", "test"):
                checks.finite(row[key], f"{name}: {key}", 0.0, 1.0)
            checks.finite(row["seconds"], f"{name}: seconds", low=1e-9)
    return checks.finish()


if __name__ == "__main__":
    raise SystemExit(main())
