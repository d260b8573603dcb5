"""``summary.json`` (DESIGN contract) from the per-round history, and the end-of-run table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pf2lora_core.constants import COMMON, FLOPS_PER_STEP, GLOBAL, NUM_EXAMPLES, PERSONALIZED, PRIVATE
from pf2lora_core.experiment import Experiment
from pf2lora_core.outputs import aggregate_metric


def build_summary(
    exp: Experiment,
    history: Sequence[Mapping[str, Any]],
    latest_eval: Mapping[int, Mapping[str, Any]],
    label_hists: Sequence[Mapping[str, list[int]]],
    params: Mapping[str, int],
    seconds_total: float,
) -> dict[str, Any]:
    """Final per-client results (each client's latest evaluation) and their aggregates."""
    metric = exp.task.metric
    num_train = _latest_num_train(history)
    clients = []
    for c in sorted(latest_eval):
        e = latest_eval[c]
        clients.append(
            {
                "client": c,
                "num_train": num_train.get(c),
                "num_test": e.get(NUM_EXAMPLES),
                PERSONALIZED: e.get(PERSONALIZED, {}),
                GLOBAL: e.get(GLOBAL, {}),
                "rank": e.get("rank", {}),
                "label_histogram": label_hists[c] if c < len(label_hists) else None,
            }
        )
    weights = [cl["num_test"] or 0 for cl in clients]
    rounds_done = len(history)
    up = [r["bytes_up"] for r in history]
    down = [r["bytes_down"] for r in history]
    return {
        "algorithm": exp.algorithm.name,
        "task": exp.task.name,
        "model": exp.model.name,
        "seed": exp.seed,
        "num_clients": exp.federation.num_clients,
        "rounds": rounds_done,
        "partition": {k: v for k, v in vars(exp.partition).items()},
        "clients": clients,
        **{
            kind: {"metric": metric, **aggregate_metric([_m(cl, kind, metric) for cl in clients], weights, metric)}
            for kind in (PERSONALIZED, GLOBAL)
        },
        "label_histograms": list(label_hists),
        "rejected": [dict(rej, round=r["round"]) for r in history for rej in r["rejected"]],
        "communication": {
            "params_common": params.get(COMMON, 0),
            "params_private": params.get(PRIVATE, 0),
            "bytes_up_per_round": sum(up) / max(len(up), 1),
            "bytes_down_per_round": sum(down) / max(len(down), 1),
        },
        "cost": {
            "seconds_total": seconds_total,
            "seconds_per_round": seconds_total / max(rounds_done, 1),
            # mean over the clients' counted rounds (``flops_rounds``); None when none was counted
            FLOPS_PER_STEP: _mean_train_metric(history, FLOPS_PER_STEP),
        },
    }


def _m(client: Mapping[str, Any], kind: str, metric: str) -> float:
    value = client.get(kind, {}).get(metric)
    return float("nan") if value is None else float(value)


def _mean_train_metric(history: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [m[key] for r in history for m in r.get("train", {}).values() if key in m]
    return sum(values) / len(values) if values else None


def _latest_num_train(history: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for record in history:
        for c, metrics in record.get("train", {}).items():
            out[int(c)] = int(metrics[NUM_EXAMPLES])
    return out


def format_client_table(summary: Mapping[str, Any]) -> str:
    """Plain-text table: one row per client, then mean / weighted mean / worst."""
    metric = summary[PERSONALIZED]["metric"]
    head = f"{'client':>6} {'train':>6} {'test':>5} {'personalized':>13} {'global':>8} {'eff.rank':>8}"
    lines = [f"{summary['algorithm']} on {summary['task']} ({metric})", head, "-" * len(head)]
    for c in summary["clients"]:
        lines.append(
            f"{c['client']:>6} {c['num_train'] or 0:>6} {c['num_test'] or 0:>5} "
            f"{_fmt(c[PERSONALIZED].get(metric)):>13} {_fmt(c[GLOBAL].get(metric)):>8} "
            f"{_fmt(c['rank'].get('effective'), 2):>8}"
        )
    lines.append("-" * len(head))
    for agg in ("mean", "weighted_mean", "worst"):
        lines.append(f"{agg:>18} {_fmt(summary[PERSONALIZED][agg]):>13} {_fmt(summary[GLOBAL][agg]):>8}")
    cost = summary["cost"]
    lines.append(f"{cost['seconds_total']:.1f} s total, {cost['seconds_per_round']:.1f} s per round")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
