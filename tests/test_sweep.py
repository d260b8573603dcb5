"""pf2lora-sweep: planning and validation (fast), and a real multirun through Flower (slow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pf2lora_core.constants import FAILED_FILE, JOB_FILE, REPORT_CSV, REPORT_MD, SUMMARY_FILE
from pf2lora_core.sweep import expand, experiment_overrides, main, slug
from tests.tiny_bert import make_tiny_bert

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
    swept = ["algorithm=homlora,fedsa_lora", "partition.s=0.5,0.9"]
    # the broken model comes first in every (algorithm, s) pair: the real run after it must still happen
    assert main(["-m", *common, *swept, f"model.name={broken},{tiny}"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED") == 4 and out.count("done in") == 4 and "[8/8]" in out
    jobs = [p for p in sweep_dir.iterdir() if (p / JOB_FILE).exists()]
    finished = [p for p in jobs if (p / SUMMARY_FILE).exists()]
    failed = [p for p in jobs if (p / FAILED_FILE).exists()]
    assert len(jobs) == 8 and len(finished) == 4 and len(failed) == 4
    for p in failed:
        record = json.loads((p / FAILED_FILE).read_text())
        assert record["error"] and str(broken) in " ".join(record["overrides"])
    rows = list(csv.DictReader((sweep_dir / REPORT_CSV).open()))
    assert len(rows) == 4
    assert {(r["algorithm"], r["partition.s"]) for r in rows} == {
        (a, s) for a in ("homlora", "fedsa_lora") for s in ("0.5", "0.9")
    }
    report = (sweep_dir / REPORT_MD).read_text()
    assert "Failed" in report and str(broken) in report
    for p in finished:  # cost accounting reached every summary
        cost = json.loads((p / SUMMARY_FILE).read_text())["cost"]
        assert cost["flops_per_local_step"] > 0 and cost["seconds_per_round"] > 0

    stamps = {p: (p / SUMMARY_FILE).stat().st_mtime_ns for p in finished}
    assert main(["-m", *common, *swept, f"model.name={tiny}"]) == 0  # the same sweep again
    out = capsys.readouterr().out
    assert out.count("skipped (finished before)") == 4 and "done in" not in out
    assert all((p / SUMMARY_FILE).stat().st_mtime_ns == t for p, t in stamps.items())
