"""Sweep report on a hand-written sweep directory: grouping, seed statistics, tables, plots, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from pf2lora_core.analysis.loading import ReportError, parse_overrides, split_overrides
from pf2lora_core.analysis.report import build_report, main
from pf2lora_core.config.keys import FAILED_FILE, JOB_FILE, METRICS_FILE, PLOTS_DIR, REPORT_CSV, SUMMARY_FILE
from tests.helpers.markdown import row_of

# Personalized mean per (algorithm, partition.s) and seed; every other number follows from it below.
PERSONALIZED_MEAN = {
    ("pf2lora", 0.3): (0.80, 0.90),  # mean 0.85, sample std sqrt(2 * 0.05^2 / 1) = 0.0707107
    ("pf2lora", 0.9): (0.70, 0.76),
    ("local", 0.3): (0.60, 0.64),
    ("local", 0.9): (0.50, 0.56),
}
SECONDS_PER_ROUND = (1.0, 3.0)  # per seed: mean 2.0, sample std sqrt(2) = 1.4142136
# pf2lora's clients' effective ranks per seed: client mean 3 and 4, min 2 and 3, max 4 and 5,
# population std across the two clients 1 in both seeds.
PF2LORA_RANKS = ((2.0, 4.0), (3.0, 5.0))
CLIENT_MAJORITY = (0.64, 0.68)  # per seed (the split, shared by the algorithms): mean 0.66, se 0.02


def _client(c: int, acc: float, rank: float | None) -> dict[str, Any]:
    modules = {"q": {"effective": 2, "entropy": 1.5, "singular_values": [4.0, 2.0, 1.0, 0.01]}}
    return {
        "client": c,
        "num_train": 10,
        "num_test": 5,
        "personalized": {"accuracy": acc},
        "global": {"accuracy": acc - 0.1},
        "rank": {} if rank is None else {"effective": rank, "entropy": rank, "modules": modules},
    }


def _summary(algorithm: str, s: float, seed: int) -> dict[str, Any]:
    mean = PERSONALIZED_MEAN[(algorithm, s)][seed]
    ranks = PF2LORA_RANKS[seed] if algorithm == "pf2lora" else (None, None)
    has_global = algorithm == "pf2lora"  # "local" trains no shared model
    return {
        "algorithm": algorithm,
        "seed": seed,
        "rounds": 2,
        "clients": [_client(0, mean - 0.05, ranks[0]), _client(1, mean + 0.05, ranks[1])],
        "personalized": {
            "metric": "accuracy",
            "mean": mean,
            "weighted_mean": mean,
            "worst": mean - 0.05,
            "balanced_accuracy": {"mean": 0.5},
        },
        "validation": {"metric": "accuracy", "mean": mean - 0.02, "weighted_mean": mean, "worst": mean - 0.1},
        "baselines": {
            "client_majority": {"metric": "accuracy", "mean": CLIENT_MAJORITY[seed]},
            "global_majority": {"metric": "accuracy", "mean": 0.55},
        },
        "global": {
            "metric": "accuracy",
            "mean": mean - 0.1 if has_global else None,
            "weighted_mean": None,
            "worst": None,
        },
        "communication": {
            "params_common": 1000,
            "params_private": 500,
            "bytes_up_per_round": 4000.0,
            "bytes_down_per_round": 8000.0,
        },
        "cost": {"seconds_total": 2 * SECONDS_PER_ROUND[seed], "seconds_per_round": SECONDS_PER_ROUND[seed]},
    }


def _overrides(algorithm: str, s: float, seed: int) -> list[str]:
    return [f"algorithm={algorithm}", f"partition.s={s}", f"seed={seed}", "rounds=2"]


def _job(root: Path, name: str, overrides: list[str], status: str) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / JOB_FILE).write_text(json.dumps({"overrides": overrides, "status": status}))
    return path


def _write_sweep(root: Path) -> Path:
    """8 finished jobs (2 algorithms x 2 values of partition.s x 2 seeds), one failed, one malformed."""
    for algorithm, s in PERSONALIZED_MEAN:
        for seed in (0, 1):
            path = _job(root, f"{algorithm}-s{s}-seed{seed}", _overrides(algorithm, s, seed), "done")
            summary = _summary(algorithm, s, seed)
            (path / SUMMARY_FILE).write_text(json.dumps(summary))
            rounds = [{"round": r, "seconds": 1.0, "bytes_up": 4000, "bytes_down": 8000} for r in (1, 2)]
            for r in rounds:
                r["personalized"] = {
                    **summary["personalized"],
                    "mean": summary["personalized"]["mean"] - 0.1 / r["round"],
                }
            (path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rounds))
            (path / "config.yaml").write_text("rounds: 2\n")
    failed = _job(root, "pf2lora-s0.9-seed2", _overrides("pf2lora", 0.9, 2), "failed")
    error = {"overrides": _overrides("pf2lora", 0.9, 2), "error": "RuntimeError: CUDA out of memory", "log_tail": "..."}
    (failed / FAILED_FILE).write_text(json.dumps(error))
    broken = _job(root, "local-s0.3-seed2", _overrides("local", 0.3, 2), "done")
    (broken / SUMMARY_FILE).write_text('{"algorithm": "local", "personalized": ')  # cut off mid-write
    (root / "notes.txt").write_text("files are not jobs")
    return root


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return _write_sweep(tmp_path / "sweep")


def _rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / REPORT_CSV, newline="") as fh:
        return list(csv.DictReader(fh))


def _results(report: str) -> str:
    """The section of report.md with the results table (the cost table has rows of the same names)."""
    return report.split("## Results")[1].split("## ")[0]


def _row(rows: list[dict[str, str]], algorithm: str, s: str) -> dict[str, str]:
    (row,) = [r for r in rows if r["algorithm"] == algorithm and r["partition.s"] == s]
    return row


def test_csv_one_row_per_group_with_seed_mean_and_sample_std(sweep: Path) -> None:
    build_report(sweep)
    rows = _rows(sweep)
    assert len(rows) == 4
    row = _row(rows, "pf2lora", "0.3")
    assert row["n_seeds"] == "2"
    assert float(row["personalized_mean"]) == pytest.approx(0.85)
    assert float(row["personalized_std"]) == pytest.approx(0.0707106781)
    assert float(row["personalized_worst_mean"]) == pytest.approx(0.80)
    assert float(row["seconds_per_round_mean"]) == pytest.approx(2.0)
    assert float(row["seconds_per_round_std"]) == pytest.approx(1.4142135624)
    assert float(row["params_common_mean"]) == 1000 and float(row["params_common_std"]) == 0
    assert float(row["rank_mean"]) == pytest.approx(3.5) and float(row["rank_std"]) == pytest.approx(0.7071067812)
    assert float(row["rank_min_mean"]) == pytest.approx(2.5) and float(row["rank_max_mean"]) == pytest.approx(4.5)
    assert float(row["rank_client_std_mean"]) == pytest.approx(1.0)
    assert float(_row(rows, "local", "0.9")["personalized_mean"]) == pytest.approx(0.53)


def test_missing_values_are_empty_cells(sweep: Path) -> None:
    build_report(sweep)
    local = _row(_rows(sweep), "local", "0.3")
    assert local["global_mean"] == local["global_std"] == ""  # no global model
    assert local["rank_mean"] == local["rank_max_std"] == ""  # no rank info
    assert local["flops_per_local_step_mean"] == ""  # not in the summary


def test_constant_key_is_setting_not_column(sweep: Path) -> None:
    report = build_report(sweep).read_text()
    header = (sweep / REPORT_CSV).read_text().splitlines()[0].split(",")
    assert header[:3] == ["algorithm", "partition.s", "n_seeds"]
    assert "rounds" not in header and "seed" not in header
    assert "- `rounds=2`" in report


def test_markdown_table_row_and_problem_jobs(sweep: Path) -> None:
    report = build_report(sweep).read_text()
    # mean ± se [mean ± t_{0.975,1} se]: se = 0.0707 / sqrt(2) = 0.05, t = 12.706; the best row of s = 0.3
    row = ["pf2lora", "0.3", "0.830 ± 0.050 [0.195, 1.465] *", "0.850 ± 0.050 [0.215, 1.485] *"]
    assert row_of(_results(report), "pf2lora", "0.3")[:4] == row
    # local at s = 0.3: 0.62 vs 0.85, Welch nu = 1.3 -> t_1: interval (-0.45, 0.91) holds 0 -> ≈;
    # local at s = 0.9: 0.53 vs 0.73, nu = 2, t = 4.303: (0.017, 0.383) -> told apart, unmarked
    row = ["local", "0.3", "0.600 ± 0.020 [0.346, 0.854] ≈", "0.620 ± 0.020 [0.366, 0.874] ≈"]
    assert row_of(_results(report), "local", "0.3")[:4] == row
    row = ["local", "0.9", "0.510 ± 0.030 [0.129, 0.891]", "0.530 ± 0.030 [0.149, 0.911]"]
    assert row_of(_results(report), "local", "0.9")[:4] == row
    priors = report.split("## Label prior (test split)")[1].split("##")[0]
    assert row_of(priors, "0.3") == ["0.3", "0.660 ± 0.020 [0.406, 0.914]", "0.550 ± 0.000 [0.550, 0.550]", "2"]
    failed = report.split("## Failed jobs")[1].split("## Incomplete jobs")
    assert "pf2lora-s0.9-seed2" in failed[0] and "RuntimeError: CUDA out of memory" in failed[0]
    assert "partition.s=0.9 seed=2" in failed[0]
    assert "local-s0.3-seed2" in failed[1] and "summary.json malformed" in failed[1]


def test_plot_files_exist_and_are_linked(sweep: Path) -> None:
    report = build_report(sweep).read_text()
    names = [
        "metric_vs_partition_s.png",
        "rank_spread_vs_partition_s.png",
        "clients_at_partition_s_0.9.png",
        "rounds_at_partition_s_0.9.png",
        "rank_spectra_at_partition_s_0.9.png",
    ]
    for name in names:
        assert (sweep / PLOTS_DIR / name).stat().st_size > 0
        assert f"({PLOTS_DIR}/{name})" in report


def test_at_picks_the_slice_and_rejects_unknown_values(sweep: Path) -> None:
    build_report(sweep, at="0.3")
    assert (sweep / PLOTS_DIR / "clients_at_partition_s_0.3.png").exists()
    with pytest.raises(ReportError, match=r"values: 0\.3, 0\.9"):
        build_report(sweep, at="0.5")


def test_unknown_x_lists_swept_keys(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ReportError, match=r"'lr' is not a swept key.*partition\.s"):
        build_report(sweep, x_key="lr")
    with pytest.raises(ReportError, match="not a swept key"):
        build_report(sweep, x_key="rounds")  # constant: part of the setting, not an axis
    assert main([str(sweep), "--x", "lr"]) == 2
    assert "partition.s" in capsys.readouterr().err


def test_main_prints_report_path(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep)]) == 0
    assert capsys.readouterr().out.strip() == str(sweep / "report.md")


def test_main_without_jobs_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    assert "no job directories" in capsys.readouterr().err
    (tmp_path / PLOTS_DIR).mkdir()  # a folder without job.json is not a job
    assert main([str(tmp_path)]) == 2
    assert main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_no_x_axis_and_no_rank_info_skip_their_plots(tmp_path: Path) -> None:
    """Only the algorithm swept, one seed each, no rank info: no x-axis or spectrum plot, no ± cells."""
    for algorithm, s in (("local", 0.3), ("homlora", 0.3)):
        path = _job(tmp_path, algorithm, [f"algorithm={algorithm}", "partition.s=0.3"], "done")
        summary = _summary("local", s, 0) | {"algorithm": algorithm}
        (path / SUMMARY_FILE).write_text(json.dumps(summary))
    _job(tmp_path, "queued", ["algorithm=flora", "partition.s=0.3"], "skipped")
    report = build_report(tmp_path).read_text()
    assert sorted(p.name for p in (tmp_path / PLOTS_DIR).iterdir()) == ["clients.png"]
    assert row_of(_results(report), "local") == ["local", "0.580", "0.600", "0.600", "0.550", "0.500", "-", "1"]
    assert "`queued`" in report.split("## Incomplete jobs")[1]
    assert _rows(tmp_path)[0]["personalized_std"] == ""
    with pytest.raises(ReportError, match="--at needs an x axis"):
        build_report(tmp_path, at="0.3")


def test_overrides_parsing_and_split() -> None:
    assert parse_overrides(["+a=1", "b.c=x=y"]) == {"a": "1", "b.c": "x=y"}
    with pytest.raises(TypeError, match="list of 'key=value'"):
        parse_overrides("a=1")
    swept, setting = split_overrides([{"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}])
    assert swept == ["b", "c"] and setting == {"a": "1"}


def test_lower_is_better_metric_marks_the_smallest(tmp_path: Path) -> None:
    for algorithm, ppl in (("pf2lora", (10.0, 10.2)), ("homlora", (20.0, 20.4))):
        for seed in (0, 1):
            path = _job(tmp_path, f"{algorithm}{seed}", [f"algorithm={algorithm}", f"seed={seed}"], "done")
            summary = {"algorithm": algorithm, "personalized": {"metric": "perplexity", "mean": ppl[seed]}}
            (path / SUMMARY_FILE).write_text(json.dumps(summary))
    report = build_report(tmp_path).read_text()
    assert row_of(_results(report), "pf2lora")[:3] == ["pf2lora", "-", "10.100 ± 0.100 [8.829, 11.371] *"]
    assert row_of(_results(report), "homlora")[:3] == ["homlora", "-", "20.200 ± 0.200 [17.659, 22.741]"]


def test_seed_subdirectories_of_a_job_are_runs(tmp_path: Path) -> None:
    """A multi-seed job (a tuning trial) holds seed=<s>/ run directories: each is a run."""
    for seed in (0, 1):
        path = _job(tmp_path / "algorithm.lr=0.01", f"seed={seed}", ["algorithm=pf2lora", "algorithm.lr=0.01",
                    f"seed={seed}"], "done")  # fmt: skip
        summary = _summary("pf2lora", 0.3, seed)
        summary["cost"] |= {"flops_per_local_step": 2e9, "examples_per_round": 128.0}
        (path / SUMMARY_FILE).write_text(json.dumps(summary))
        # FLOPs / round = 2e9 per step x 3 steps x ceil(5 clients x 0.5) = 3 clients trained per round
        (path / "config.yaml").write_text("local_steps: 3\nfederation: {num_clients: 5, fraction_train: 0.5}\n")
    build_report(tmp_path)
    (row,) = _rows(tmp_path)
    assert row["n_seeds"] == "2" and float(row["validation_mean"]) == pytest.approx(0.83)
    assert float(row["validation_se"]) == pytest.approx(0.05)
    assert float(row["client_majority_mean"]) == pytest.approx(0.66)
    assert float(row["flops_per_round_mean"]) == pytest.approx(1.8e10)
    assert float(row["examples_per_round_mean"]) == 128.0
