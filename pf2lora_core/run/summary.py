"""``summary.json`` (docs/DESIGN.md, "summary.json") from the per-round history, and the end-of-run table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pf2lora_core.config.keys import (
    ACCURACY,
    BALANCED_ACCURACY,
    BATCHES_SEEN,
    COMMON,
    EVAL_KINDS,
    EXAMPLES_SEEN,
    FLOPS_PER_CLIENT_EVALUATION,
    FLOPS_PER_CLIENT_ROUND,
    FLOPS_PER_EVALUATED_ROUND,
    FLOPS_PER_STEP,
    GLOBAL,
    GRADIENT_PASSES,
    NUM_EXAMPLES,
    NUM_VALIDATION,
    PERSONALIZED,
    PRIVATE,
    VALIDATION,
)
from pf2lora_core.data.columns import TEST, TRAIN
from pf2lora_core.data.sources import CLASSIFICATION
from pf2lora_core.run.records import (
    Aggregate,
    ClientResult,
    Communication,
    Cost,
    Rank,
    RoundRecord,
    Stats,
    Summary,
)
from pf2lora_core.run.run_dir import aggregate_metric

CLIENT_MAJORITY = "client_majority"  # each client predicts the majority label of its own train split
GLOBAL_MAJORITY = "global_majority"  # every client predicts the majority label of all train splits pooled


if TYPE_CHECKING:
    from pf2lora_core.config.experiment import Experiment


def aggregate_block(results: Sequence[Mapping[str, float]], weights: Sequence[float], metric: str) -> Aggregate:
    """``{metric, mean, weighted_mean, worst}`` of the clients' ``metric`` (NaNs skipped).

    Where the clients report balanced accuracy (classification), the block also carries
    ``balanced_accuracy: {mean, weighted_mean, worst}``: every evaluated kind has the same shape.
    """
    stats = Stats(**aggregate_metric([_get(r, metric) for r in results], weights, metric))
    balanced = None
    if any(BALANCED_ACCURACY in r for r in results):
        balanced = Stats(**aggregate_metric([_get(r, BALANCED_ACCURACY) for r in results], weights))
    return Aggregate(metric, stats, balanced)


def evaluation_blocks(evaluation: Mapping[int, Mapping[str, Any]], metric: str) -> dict[str, Aggregate]:
    """One aggregate block per evaluated kind (``EVAL_KINDS``) of a round's (or the latest) evaluations.

    ``personalized`` / ``global`` are weighted by the test rows, ``validation`` /
    ``validation_global`` by the validation rows.
    """
    entries = list(evaluation.values())
    return {
        kind: aggregate_block([e.get(kind) or {} for e in entries], [e.get(count) or 0 for e in entries], metric)
        for kind, count in EVAL_KINDS.items()
    }


def majority_baselines(
    label_hists: Sequence[Mapping[str, list[int]] | None],
) -> list[dict[str, dict[str, float] | None] | None]:
    """Per client, the test accuracy and balanced accuracy of two constant predictors.

    ``client_majority``: the most frequent label of the client's own TRAIN split (ties: the lowest
    label id), scored on its TEST split: ``acc = n_test[m_k] / |test_k|``. ``global_majority``:
    the most frequent label of every client's train split pooled, ``g``, scored the same way. A
    constant predictor's balanced accuracy is ``1 / |labels present in test|`` when its label is
    present, else 0. The test split's labels never choose the predicted label.

    In deployment only sites that opted in (``share-data-stats``) report histograms: a client
    without one has no baselines (None), and ``global_majority`` needs every client's train
    histogram (the pooled majority is unknown otherwise), so it is None everywhere then.
    """
    known = [h for h in label_hists if h is not None]
    # pooled only where every client's train histogram is known and all have one length (the checks
    # on replies hold a site's histogram to the head's size; this keeps the summary total anyway)
    complete = bool(label_hists) and len(known) == len(label_hists) and len({len(h[TRAIN]) for h in known}) == 1
    g = int(np.argmax(np.sum([np.asarray(h[TRAIN]) for h in known], axis=0))) if complete else None
    out: list[dict[str, dict[str, float] | None] | None] = []
    for h in label_hists:
        if h is None:
            out.append(None)
            continue
        train, test = np.asarray(h[TRAIN]), np.asarray(h[TEST])
        own = int(np.argmax(train)) if train.sum() else g
        out.append(
            {
                CLIENT_MAJORITY: None if own is None else _constant_scores(test, own),
                GLOBAL_MAJORITY: None if g is None else _constant_scores(test, g),
            }
        )
    return out


def _constant_scores(test: np.ndarray, label: int) -> dict[str, float]:
    n, present = int(test.sum()), int((test > 0).sum())
    if n == 0:
        return {ACCURACY: float("nan"), BALANCED_ACCURACY: float("nan")}
    hit = int(test[label]) if label < len(test) else 0
    return {ACCURACY: hit / n, BALANCED_ACCURACY: (1.0 / present) if hit else 0.0}


def build_summary(
    exp: Experiment,
    history: Sequence[RoundRecord],
    latest_eval: Mapping[int, Mapping[str, Any]],
    label_hists: Sequence[Mapping[str, list[int]] | None],
    params: Mapping[str, int],
    seconds_total: float,
) -> Summary:
    """Final per-client results (each client's latest evaluation) and their aggregates."""
    metric = exp.task.metric
    num_train = _latest_num_train(history)
    classification = exp.task.kind == CLASSIFICATION
    baselines = majority_baselines(label_hists) if classification else []
    clients = []
    for c in sorted(latest_eval):
        e = latest_eval[c]
        hist = label_hists[c] if c < len(label_hists) else None
        clients.append(
            ClientResult(
                client=c,
                num_train=num_train.get(c),
                num_validation=e.get(NUM_VALIDATION),
                num_test=e.get(NUM_EXAMPLES),
                results={kind: {k: _get(e[kind], k) for k in e[kind]} for kind in EVAL_KINDS if e.get(kind)},
                rank=Rank.from_json(e.get("rank") or {}, f"client {c}'s rank"),
                label_histogram=None if hist is None else {s: list(v) for s, v in hist.items()},
                baselines=baselines[c] if c < len(baselines) else None,
                rounds_trained=sum(1 for r in history if r.aggregated and c in r.train),
            )
        )
    weights = [cl.num_test or 0 for cl in clients]
    rounds_done = len(history)
    up = [r.bytes_up for r in history]
    down = [r.bytes_down for r in history]
    return Summary(
        algorithm=exp.algorithm.name,
        task=exp.task.name,
        model=exp.model.name,
        seed=exp.seed,
        num_clients=exp.federation.num_clients,
        rounds=rounds_done,
        partition=dict(vars(exp.partition)),
        clients=clients,
        kinds=evaluation_blocks({cl.client: _eval_entry(cl) for cl in clients}, metric),
        baselines=_baseline_blocks(clients, weights) if classification else None,
        label_histograms=[None if h is None else {s: list(v) for s, v in h.items()} for h in label_hists],
        rejected=[dict(rej, round=r.round) for r in history for rej in r.rejected],
        communication=Communication(
            params_common=params.get(COMMON, 0),
            params_private=params.get(PRIVATE, 0),
            bytes_up_per_round=sum(up) / max(len(up), 1),
            bytes_down_per_round=sum(down) / max(len(down), 1),
        ),
        cost=Cost(
            {
                "seconds_total": seconds_total,
                "seconds_per_round": seconds_total / max(rounds_done, 1),
                # mean over the clients' counted rounds (``flops_rounds``); None when none was counted
                FLOPS_PER_STEP: _mean_train_metric(history, FLOPS_PER_STEP),
                FLOPS_PER_CLIENT_ROUND: _mean_train_metric(history, FLOPS_PER_CLIENT_ROUND),
                # one client's evaluation (both models, re-fit included), mean over counted evaluations,
                # and an evaluated round's total: training + evaluation (issue 29's cost target)
                FLOPS_PER_CLIENT_EVALUATION: _mean_eval_metric(history, FLOPS_PER_CLIENT_EVALUATION),
                FLOPS_PER_EVALUATED_ROUND: _sum_or_none(
                    _mean_train_metric(history, FLOPS_PER_CLIENT_ROUND),
                    _mean_eval_metric(history, FLOPS_PER_CLIENT_EVALUATION),
                ),
                # what local training consumed: summed over a round's clients, mean over rounds ...
                "examples_per_round": _per_round_total(history, EXAMPLES_SEEN),
                "gradient_passes_per_round": _per_round_total(history, GRADIENT_PASSES),
                # ... and per client and round (the equal-budget check: K batches of task.batch_size)
                "examples_per_client_round": _mean_train_metric(history, EXAMPLES_SEEN),
                "batches_per_client_round": _mean_train_metric(history, BATCHES_SEEN),
                "gradient_passes_per_client_round": _mean_train_metric(history, GRADIENT_PASSES),
            }
        ),
    )


def _get(results: Mapping[str, Any], key: str) -> float:
    value = results.get(key)
    return float("nan") if value is None else float(value)


def _eval_entry(client: ClientResult) -> dict[str, Any]:
    """A summary client row in the shape of one evaluation reply (for ``evaluation_blocks``)."""
    counts = {NUM_EXAMPLES: client.num_test, NUM_VALIDATION: client.num_validation}
    return {**{kind: client.results.get(kind, {}) for kind in EVAL_KINDS}, **counts}


def _baseline_blocks(clients: Sequence[ClientResult], weights: Sequence[float]) -> dict[str, Aggregate]:
    """``{client_majority, global_majority}``: aggregate blocks over the summarised clients."""
    rows = [cl.baselines or {} for cl in clients]
    return {
        name: aggregate_block([r.get(name) or {} for r in rows], weights, ACCURACY)
        for name in (CLIENT_MAJORITY, GLOBAL_MAJORITY)
    }


def _per_round_total(history: Sequence[RoundRecord], key: str) -> float | None:
    totals = [r.train_total(key) or 0.0 for r in history if r.train]
    return sum(totals) / len(totals) if totals else None


def _mean_train_metric(history: Sequence[RoundRecord], key: str) -> float | None:
    values = [m[key] for r in history for m in r.train.values() if key in m]
    return sum(values) / len(values) if values else None


def _mean_eval_metric(history: Sequence[RoundRecord], key: str) -> float | None:
    """Mean of ``key`` over every evaluation reply that reports it (None: none does)."""
    values = [float(m[key]) for r in history for m in r.clients.values() if isinstance(m.get(key), int | float)]
    return sum(values) / len(values) if values else None


def _sum_or_none(*parts: float | None) -> float | None:
    return None if any(p is None for p in parts) else sum(p for p in parts if p is not None)


def _latest_num_train(history: Sequence[RoundRecord]) -> dict[int, int]:
    out: dict[int, int] = {}
    for record in history:
        for c, metrics in record.train.items():
            out[c] = int(metrics[NUM_EXAMPLES])
    return out


def format_client_table(summary: Summary) -> str:
    """Plain-text table: one row per client, then mean / weighted mean / worst, then the baselines.

    Columns: the rounds the client trained in (``never`` for one that never did: its train size is
    then unknown to the server, ``-``, not zero), its split sizes, test-split ``personalized`` and
    ``global``, the personalized model on ``validation``, the personalized balanced accuracy
    (``bal.acc``) and the client's own majority-label accuracy (``client maj.``) where the task is
    classification, then the learned rank of the client's update as the scale-free entropy rank
    (``ent.rank``; ``rank.effective`` in summary.json is the 5%-threshold count) and the private
    level's share of its energy (``private``; ``-`` without a private level).
    """
    metric = summary.metric
    left = f"{'client':>6} {'rounds':>6} {'train':>6} {'val':>4} {'test':>5}"
    head = (
        f"{left} {'personalized':>13} {'global':>8} "
        f"{'validation':>10} {'bal.acc':>7} {'client maj.':>11} {'ent.rank':>8} {'private':>7}"
    )
    lines = [f"{summary.algorithm} on {summary.task} ({metric})", head, "-" * len(head)]
    for c in summary.clients:
        maj = (c.baselines or {}).get(CLIENT_MAJORITY) or {}
        lines.append(
            f"{c.client:>6} {_rounds(c.rounds_trained):>6} {_count(c.num_train):>6} {_count(c.num_validation):>4} "
            f"{_count(c.num_test):>5} {_fmt(c.value(PERSONALIZED, metric)):>13} {_fmt(c.value(GLOBAL, metric)):>8} "
            f"{_fmt(c.value(VALIDATION, metric)):>10} {_fmt(c.value(PERSONALIZED, BALANCED_ACCURACY)):>7} "
            f"{_fmt(maj.get(ACCURACY)):>11} {_fmt(c.rank.entropy, 2):>8} {_fmt(c.rank.private_energy, 2):>7}"
        )
    lines.append("-" * len(head))
    none = Aggregate(metric)
    pers, glob, val = summary.personalized, summary.global_, summary.validation or none
    for agg in ("mean", "weighted_mean", "worst"):
        balanced = getattr(pers.balanced, agg) if pers.balanced else None
        lines.append(
            f"{agg:>{len(left)}} {_fmt(getattr(pers, agg)):>13} {_fmt(getattr(glob, agg)):>8} "
            f"{_fmt(getattr(val, agg)):>10} {_fmt(balanced):>7}"
        )
    for name, b in (summary.baselines or {}).items():
        lines.append(
            f"{name} accuracy: mean {_fmt(b.mean)}, weighted {_fmt(b.weighted_mean)}, "
            f"worst {_fmt(b.worst)} (balanced {_fmt(b.balanced.mean if b.balanced else None)})"
        )
    lines.extend(_beyond_prior(summary))
    cost = summary.cost
    lines.append(f"{cost.get('seconds_total') or 0:.1f} s total, {cost.get('seconds_per_round') or 0:.1f} s per round")
    if cost.get("examples_per_client_round") is not None:
        lines.append(
            f"per client and round: {cost.get('examples_per_client_round'):.0f} examples in "
            f"{cost.get('batches_per_client_round'):.0f} batches, "
            f"{cost.get('gradient_passes_per_client_round'):.0f} gradient passes"
        )
    train_flops, eval_flops = cost.get(FLOPS_PER_CLIENT_ROUND), cost.get(FLOPS_PER_CLIENT_EVALUATION)
    if train_flops is not None and eval_flops is not None:
        lines.append(
            f"FLOPs per client: {train_flops:.3g} training a round + {eval_flops:.3g} an evaluation = "
            f"{train_flops + eval_flops:.3g} (counted in round 1..flops_rounds)"
        )
    return "\n".join(lines)


def _beyond_prior(summary: Summary) -> list[str]:
    """One line: how far the personalized model is above each client's own majority-label prior.

    A model at its prior learned the label skew and nothing else; the balanced accuracy says the
    same from the other side (a constant predictor scores ``1 / classes`` there).
    """
    prior = (summary.baselines or {}).get(CLIENT_MAJORITY)
    pers = summary.personalized
    if prior is None or prior.mean is None or pers.mean is None or summary.metric != ACCURACY:
        return []
    gap = pers.mean - prior.mean
    verdict = "learned beyond the label prior" if gap > 0 else "no better than predicting each client's majority label"
    head = f"personalized {pers.mean:.4f} vs client-majority prior {prior.mean:.4f}"
    return [f"{head}: {100 * gap:+.1f} points ({verdict})"]


def _rounds(rounds: int | None) -> str:
    """Rounds the client trained in; a client evaluated without ever training says so."""
    return "-" if rounds is None else "never" if rounds == 0 else str(rounds)


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"
