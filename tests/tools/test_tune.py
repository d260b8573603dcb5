"""pf2lora-tune: Hydra's Optuna sweeper per algorithm, choice on validation, fresh-seed re-runs, report."""

from __future__ import annotations

import csv
import json
import math
import shlex
import subprocess
from pathlib import Path

import pytest

from pf2lora_core.config.keys import JOB_LOG_FILE, SUMMARY_FILE
from pf2lora_core.tools.tune import TUNE_CSV, TUNE_JSON, TUNE_MD, main

FAST = ["task.max_examples=160", "federation.num_clients=2", "rounds=1", "local_steps=1"]


def _arg(overrides: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in overrides if a.split("=", 1)[0] == key), None)


class FakeTrials:
    """Stands in for ``flwr run``: a summary whose validation and test scores disagree on the best trial.

    Validation rises with ``algorithm.lr`` and test falls with it, so the trial with the largest
    learning rate is best on validation and worst on test: choosing it shows validation decides.
    """

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, overrides: str, federation, home, app_dir, timeout, extra_env=None, connection=None):
        args = [a for a in shlex.split(overrides)]
        self.calls.append(args)
        run_dir = Path(_arg(args, "run_dir").strip('"'))
        lr, seed = float(_arg(args, "algorithm.lr") or 0.002), int(_arg(args, "seed") or 0)
        noise = 0.001 * seed
        summary = {
            "algorithm": _arg(args, "algorithm"),
            "seed": seed,
            "personalized": {"metric": "accuracy", "mean": 0.9 - 10 * lr + noise},
            "validation": {"metric": "accuracy", "mean": 0.5 + 10 * lr + noise},
            "global": {"metric": "accuracy", "mean": 0.6},
            "baselines": {
                "client_majority": {"metric": "accuracy", "mean": 0.7 + noise},
                "global_majority": {"metric": "accuracy", "mean": 0.55},
            },
            "cost": {"examples_per_round": 64, "flops_per_local_step": 1e9, "seconds_per_round": 1.0},
        }
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
        return subprocess.CompletedProcess([], 0, "round 1 ...\n", "")


def test_two_trials_per_algorithm_through_optuna_choose_on_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeTrials()
    monkeypatch.setattr("pf2lora_core.tools.sweep.flwr_run", fake)
    out = tmp_path / "tune"
    args = ["--algorithms", "pf2lora,homlora", "--trials", "2", "--final-seeds", "7,8", "--out", str(out),
            *FAST, "sweep.seeds=[0,1]"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "OptunaSweeper" in printed and "about" in printed  # sampled by Optuna; time left shown
    record = json.loads((out / TUNE_JSON).read_text())
    for algorithm in ("pf2lora", "homlora"):
        trials = [c for c in fake.calls if _arg(c, "algorithm") == algorithm and _arg(c, "seed") in ("0", "1")]
        lrs = sorted({float(_arg(c, "algorithm.lr")) for c in trials})
        assert len(lrs) == 2 and len(trials) == 4  # 2 trials x 2 tuning seeds, the same count per algorithm
        chosen = record["algorithms"][algorithm]["chosen"]
        assert float(chosen["algorithm.lr"]) == lrs[-1]  # best on validation, worst on test
        assert record["algorithms"][algorithm]["trials_total"] == 2
        final = [c for c in fake.calls if _arg(c, "algorithm") == algorithm and _arg(c, "seed") in ("7", "8")]
        assert len(final) == 2 and all(float(_arg(c, "algorithm.lr")) == lrs[-1] for c in final)
    pf2 = record["algorithms"]["pf2lora"]["chosen"]
    assert set(pf2) == {"algorithm.lr"}  # its lower-level step follows lr: the same search as HOMLoRA's
    assert set(record["algorithms"]["homlora"]["chosen"]) == {"algorithm.lr"}
    assert (out / "trials" / "pf2lora" / "optimization_results.yaml").is_file()  # Optuna's own record
    trial_logs = list((out / "trials" / "pf2lora").glob(f"*/seed=0/{JOB_LOG_FILE}"))
    assert len(trial_logs) == 2 and "round 1" in trial_logs[0].read_text()

    report = (out / TUNE_MD).read_text()
    rows = {r["algorithm"]: r for r in csv.DictReader((out / TUNE_CSV).open())}
    lr = float(record["algorithms"]["homlora"]["chosen"]["algorithm.lr"])
    test = [0.9 - 10 * lr + 0.001 * s for s in (7, 8)]
    assert float(rows["homlora"]["test_mean"]) == pytest.approx(sum(test) / 2)
    assert float(rows["homlora"]["test_std"]) == pytest.approx(0.001 / math.sqrt(2))
    assert float(rows["homlora"]["test_se"]) == pytest.approx(0.0005)
    assert float(rows["homlora"]["examples_per_round"]) == 64
    assert float(rows["prior:client_majority"]["test_mean"]) == pytest.approx(0.7075)
    assert "| prior: client_majority |" in report and "| prior: global_majority |" in report
    assert f"`algorithm.lr={lr:.4g}`" in report

    calls = len(fake.calls)
    assert main(args) == 0  # the same command again: every run finished before, none re-runs
    assert len(fake.calls) == calls


def test_tuning_refuses_what_it_sets_itself_and_reused_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path)]
    assert main([*out, "--algorithms", "homlora", "seed=3"]) == 2
    assert "seed=... is set by pf2lora-tune" in capsys.readouterr().err
    assert main([*out, "--algorithms", "homlora", "--final-seeds", "0,5"]) == 2
    assert "overlap the tuning seeds" in capsys.readouterr().err
    assert main([*out, "--algorithms", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_runs_without_validation_stop_tuning_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_validation(overrides: str, *args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        run_dir = Path(_arg(shlex.split(overrides), "run_dir").strip('"'))
        summary = {"algorithm": "homlora", "personalized": {"metric": "accuracy", "mean": 0.8}}
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr("pf2lora_core.tools.sweep.flwr_run", no_validation)
    args = ["--algorithms", "homlora", "--trials", "1", "--out", str(tmp_path), *FAST, "sweep.seeds=[0]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no trial has a validation metric" in err and "no 'validation.mean'" in err
    assert not (tmp_path / "final").exists()  # nothing re-run on fresh seeds, nothing chosen on test


@pytest.mark.slow
def test_real_tuning_through_flower_on_a_tiny_bert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 trial x 1 tuning seed of HOMLoRA through Optuna and Flower, then the choice on 1 fresh seed.

    Two real runs (each ``flwr run`` costs 20-40 s on 2 cores): the plumbing through Flower. How the
    choice among trials is made is test_two_trials_per_algorithm_through_optuna_choose_on_validation's.
    """
    from tests.helpers.tiny_bert import make_tiny_bert

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    tiny = make_tiny_bert(tmp_path / "tiny-bert")
    out = tmp_path / "tune"
    common = ["model.source=path", f"model.name={tiny}", *FAST, "federation.min_train_clients=1", "sweep.seeds=[0]"]
    code = main(["--algorithms", "homlora", "--trials", "1", "--final-seeds", "5", "--out", str(out), *common])
    summaries = [json.loads(p.read_text()) for p in (out / "trials" / "homlora").glob(f"*/seed=0/{SUMMARY_FILE}")]
    assert code == 0 and len(summaries) == 1
    record = json.loads((out / TUNE_JSON).read_text())["algorithms"]["homlora"]
    assert record["validation_objective"] == pytest.approx(summaries[0]["validation"]["mean"])
    (final,) = (out / "final" / "homlora").glob(f"*/{SUMMARY_FILE}")
    assert json.loads(final.read_text())["seed"] == 5
    assert (final.parent / JOB_LOG_FILE).stat().st_size > 0  # the successful run's log is kept
    rows = {r["algorithm"]: r for r in csv.DictReader((out / TUNE_CSV).open())}
    assert rows["homlora"]["test_mean"] and rows["homlora"]["flops_per_round"]
    assert "prior: client_majority" in (out / TUNE_MD).read_text()
