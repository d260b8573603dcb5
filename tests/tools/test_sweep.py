"""pf2lora-sweep: planning and validation (fast), and a real multirun through Flower (slow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pf2lora_core.config.keys import FAILED_FILE, JOB_FILE, JOB_LOG_FILE, REPORT_CSV, REPORT_MD, SUMMARY_FILE
from pf2lora_core.tools.sweep import expand, experiment_overrides, main, slug
from tests.helpers.tiny_bert import make_tiny_bert

OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def test_expand_is_the_cartesian_product_in_hydra_order() -> None:
    jobs = expand(["algorithm=pf2lora,homlora", "partition.s=0.3,0.9", "seed=range(0,2)", "rounds=2"])
    assert len(jobs) == 8
    assert jobs[0] == ["algorithm=pf2lora", "partition.s=0.3", "seed=0", "rounds=2"]
    assert jobs[1] == ["algorithm=pf2lora", "partition.s=0.3", "seed=1", "rounds=2"]
    assert jobs[-1] == ["algorithm=homlora", "partition.s=0.9", "seed=1", "rounds=2"]
    assert experiment_overrides(["hydra.sweep.dir=x", "sweep.report_x=seed", "seed=1"]) == ["seed=1"]


def test_slug_is_one_safe_path_component() -> None:
    assert slug("algorithm=homlora,partition.s=0.5") == "algorithm=homlora,partition.s=0.5"
    name = slug("model.name=/tmp/x y/tiny,seed=0")
    assert "/" not in name and " " not in name
    long = slug("model.name=/" + "a" * 300)
    assert len(long) <= 120 and long != slug("model.name=/" + "a" * 299)
    assert slug("") == "default"


@pytest.mark.parametrize(
    ("override", "key"),
    [("partition.s=0.5,7", "partition.s"), ("partition.bogus=1", "bogus"), ("algorithm=nope", "nope"),
     ("model.source=path", "model.name")],
)  # fmt: skip
def test_an_invalid_override_fails_before_any_work(
    override: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["-m", f"output_dir={tmp_path}", "algorithm=homlora,pf2lora", override])
    assert code == 2
    err = capsys.readouterr().err
    assert key in err and "invalid" in err
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_an_app_flower_cannot_package_fails_before_any_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pf2lora_core.tools import launch

    monkeypatch.setattr(launch, "fab_comma_paths", lambda app_dir: ["results/lr=0.1,seed=0/summary.json"])
    assert main(["-m", f"output_dir={tmp_path}", "algorithm=homlora,pf2lora"]) == 2
    err = capsys.readouterr().err
    assert "results/lr=0.1,seed=0/summary.json" in err and "comma" in err
    assert not any(tmp_path.iterdir())  # no job was started or written


def _broken_model(path: Path) -> Path:
    """A directory that passes the up-front check (it has a config.json) but cannot be loaded."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return path


@pytest.mark.slow
def test_multirun_records_failures_reports_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in OFFLINE:
        monkeypatch.setenv(var, "1")
    tiny, broken = make_tiny_bert(tmp_path / "tiny-bert"), _broken_model(tmp_path / "broken")
    sweep_dir = tmp_path / "sweep"
    common = [f"hydra.sweep.dir={sweep_dir}", "model.source=path", "federation.num_clients=2",
              "task.max_examples=160", "rounds=1", "local_steps=1", "federation.min_train_clients=1"]  # fmt: skip
    # Every real `flwr run` costs 20-40 s on 2 cores, so the sweeps through Flower run 3 jobs in all;
    # the cartesian product of two swept keys is test_glob_expands_through_hydras_sweeper's (FakeFlower).
    first = ["algorithm=homlora", "partition.s=0.5", f"model.name={tiny}"]
    assert main(["-m", *common, *first]) == 0
    out = capsys.readouterr().out
    assert out.count("done in") == 1 and "[1/1]" in out and "FAILED" not in out
    (done,) = [p for p in sweep_dir.iterdir() if (p / SUMMARY_FILE).exists()]
    cost = json.loads((done / SUMMARY_FILE).read_text())["cost"]  # cost accounting reached the summary
    assert cost["flops_per_local_step"] > 0 and cost["seconds_per_round"] > 0

    # a job that fails inside the app (a model that passes the up-front check but cannot load) comes
    # first: it is recorded with its error, and the real run after it still happens
    assert main(["-m", *common, "algorithm=fedsa_lora", "partition.s=0.5", f"model.name={broken},{tiny}"]) == 1
    out = capsys.readouterr().out
    assert "[1/2] FAILED" in out and "[2/2] done in" in out
    jobs = [p for p in sweep_dir.iterdir() if (p / JOB_FILE).exists()]
    failed = [p for p in jobs if (p / FAILED_FILE).exists()]
    assert len(jobs) == 3 and len(failed) == 1 and sum((p / SUMMARY_FILE).exists() for p in jobs) == 2
    record = json.loads((failed[0] / FAILED_FILE).read_text())
    assert record["error"] and str(broken) in " ".join(record["overrides"])
    rows = list(csv.DictReader((sweep_dir / REPORT_CSV).open()))
    assert sorted(r["algorithm"] for r in rows) == ["fedsa_lora", "homlora"]
    report = (sweep_dir / REPORT_MD).read_text()
    assert "Failed" in report and str(broken) in report

    finished = [p for p in jobs if (p / SUMMARY_FILE).exists()]
    stamps = {p: (p / SUMMARY_FILE).stat().st_mtime_ns for p in finished}
    assert main(["-m", *common, *first]) == 0  # the first sweep again: nothing re-run
    out = capsys.readouterr().out
    assert out.count("skipped (finished before)") == 1 and "done in" not in out
    assert all((p / SUMMARY_FILE).stat().st_mtime_ns == t for p, t in stamps.items())


class FakeFlower:
    """Stands in for ``flwr run``: writes a minimal summary where the app would, or fails."""

    def __init__(self, fail_when: str = "", timeout: bool = False) -> None:
        self.fail_when, self.timeout, self.calls = fail_when, timeout, []

    def __call__(self, overrides: str, federation: str | None, home: Path | None, app_dir: Path, timeout: float,
                 extra_env: dict | None = None, connection: str | None = None):  # fmt: skip
        import shlex
        import subprocess

        self.calls.append((overrides, federation, home, connection, extra_env))
        if self.timeout:
            raise subprocess.TimeoutExpired("flwr", timeout, output="partial log")
        if self.fail_when and self.fail_when in overrides:
            return subprocess.CompletedProcess([], 1, "", "Traceback...\nValueError: boom in the app\n")
        run_dir = Path(next(a.split("=", 1)[1] for a in shlex.split(overrides) if a.startswith("run_dir=")).strip('"'))
        summary = {"algorithm": "homlora", "personalized": {"metric": "accuracy", "mean": 0.75}}
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
        return subprocess.CompletedProcess([], 0, "ok", "")


def test_single_run_mode_runs_once_then_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    fake = FakeFlower()
    monkeypatch.setattr("pf2lora_core.tools.sweep.flwr_run", fake)
    args = [f"output_dir={tmp_path}", "algorithm=homlora", "rounds=1"]
    assert main(args) == 0 and main(args) == 0
    out = capsys.readouterr().out
    assert len(fake.calls) == 1 and "done in" in out and "skipped (finished before)" in out
    job = tmp_path / "runs" / "demo" / "algorithm=homlora,rounds=1"
    assert json.loads((job / JOB_FILE).read_text()) == {"overrides": args, "status": "done"}
    overrides, federation, home, connection, env = fake.calls[0]
    assert f'run_dir=\\"{job}\\"' in overrides and "num-supernodes=4" in federation
    assert home == job / ".flwr_home" and connection is None and env["HF_HUB_OFFLINE"] == "1"
    assert not (tmp_path / REPORT_MD).exists()  # one run: no sweep report


def test_failures_and_timeouts_are_recorded_and_the_sweep_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr("pf2lora_core.tools.sweep.flwr_run", FakeFlower(fail_when="partition.s=0.5"))
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra.sweep.dir={sweep}", "algorithm=homlora", "partition.s=0.5,0.9", "sweep.job_timeout_s=5"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "[1/2] FAILED" in out and "ValueError: boom in the app" in out and "[2/2] done in" in out
    failed = json.loads((sweep / "algorithm=homlora,partition.s=0.5" / FAILED_FILE).read_text())
    assert failed["error"] == "ValueError: boom in the app" and "Traceback" in failed["log_tail"]
    assert (sweep / REPORT_MD).exists() and "boom" in (sweep / REPORT_MD).read_text()
    monkeypatch.setattr("pf2lora_core.tools.sweep.flwr_run", FakeFlower(timeout=True))
    assert main(args) == 1  # the failed job is retried (and times out now); the finished one is skipped
    out = capsys.readouterr().out
    assert "timed out after 5 s" in out and "skipped (finished before)" in out
    failed = json.loads((sweep / "algorithm=homlora,partition.s=0.5" / FAILED_FILE).read_text())
    assert "sweep.job_timeout_s" in failed["error"]


def test_deployment_jobs_are_submitted_to_the_named_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeFlower()
    monkeypatch.setattr("pf2lora_core.tools.sweep.flwr_run", fake)
    assert main([f"output_dir={tmp_path}", "federation=deployment", "federation.connection=lab"]) == 0
    _, federation, home, connection, _ = fake.calls[0]
    assert connection == "lab" and federation is None and home is None


def test_glob_expands_through_hydras_sweeper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``algorithm='glob(*)'`` (it crashed when the sweep expanded overrides itself): one job per option."""
    fake = FakeFlower()
    monkeypatch.setattr("pf2lora_core.tools.sweep.flwr_run", fake)
    options = sorted(p.stem for p in (Path(__file__).parents[2] / "conf" / "algorithm").glob("*.yaml"))
    assert main(["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "algorithm=glob(*)", "rounds=1"]) == 0
    assert f"[{len(options)}/{len(options)}] done in" in capsys.readouterr().out
    ran = sorted(a.split("=", 1)[1] for call in fake.calls for a in call[0].split() if a.startswith("algorithm="))
    assert ran == options
    assert [j[0] for j in expand(["algorithm=glob([hom*,fedsa*])"])] == ["algorithm=fedsa_lora", "algorithm=homlora"]


def test_sweeper_params_are_swept_and_every_job_keeps_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr("pf2lora_core.tools.sweep.flwr_run", FakeFlower())
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra.sweep.dir={sweep}", "algorithm=homlora", "++hydra.sweeper.params={partition.s:'0.5,0.9'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 job(s)" in out and "[1/2] start" in out and "[2/2] done in" in out and "left" in out
    jobs = sorted(p.name for p in sweep.iterdir() if (p / JOB_FILE).exists())
    assert jobs == ["algorithm=homlora,partition.s=0.5", "algorithm=homlora,partition.s=0.9"]
    for job in jobs:  # a successful job's whole log stays in its run directory
        assert (sweep / job / JOB_LOG_FILE).read_text() == "ok"
    rows = list(csv.DictReader((sweep / REPORT_CSV).open()))
    assert sorted(r["partition.s"] for r in rows) == ["0.5", "0.9"]
    assert expand(["seed=range(0,3)"]) == [["seed=0"], ["seed=1"], ["seed=2"]]
