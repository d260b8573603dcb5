"""The prepared GPU check runs its every part on the CPU with tiny sizes (``--dry-run``) and prints one JSON line."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu
from benchmarks.step_cost import METHODS


def test_dry_run_prints_one_json_line_with_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # the tables went to stderr
    out = json.loads(lines[0])
    assert out["dry_run"] is True and out["float32_matmul_precision"] == "highest" and out["interrupted"] is None
    assert set(out["step_cost"]["float32"]) == set(METHODS)
    assert set(out["step_cost"]["bf16"]) == set(gpu.DRY.bf16_methods)
    for table in out["step_cost"].values():
        assert all(row["time_ratio"] > 0 and row["memory_ratio"] > 0 for row in table.values())
    assert all(v > 0 for v in out["peak"]["measured_tflops"].values())
    for model in ("minilm", "smollm2"):
        rows = out["mfu"][model]
        for precision in ("float32", "bf16"):
            hom, pf2, paper = (rows[name][precision] for name in ("homlora", "pf2lora", "pf2lora_paper"))
            assert hom["flops_per_step"] > 0 and hom["tflops"] > 0 and hom["mfu_vs_measured_matmul"] > 0
            # the paper's step: inner (x and y), outer and probe passes against one HOMLoRA pass;
            # the shipped one (the HVP once a round, the inner gradient reused) below it
            assert paper["flops_per_step"] > 2 * hom["flops_per_step"]
            assert hom["flops_per_step"] < pf2["flops_per_step"] < paper["flops_per_step"]
            assert all(r["step_s"] > 0 for r in (hom, pf2, paper))  # timed from the first objective call
            assert hom["mfu_vs_spec"] is None  # no datasheet peak for a CPU
    memory = out["client_memory"]
    assert memory["resident_mib"] > 0 and memory["working_set_mib"] > 0 and memory["clients_fit"] is None
    assert "dry run" in out["flwr"]["skipped"]
    assert set(out["part_seconds"]) == set(gpu.PARTS)


def test_a_failing_part_becomes_its_error_and_the_others_still_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--dry-run", "--fail", "peak", "--fail", "step_cost", "--fail", "client_memory"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["peak"] == {"error": "RuntimeError: failed on purpose (--fail peak)"}
    assert out["step_cost"]["error"].startswith("RuntimeError") and out["client_memory"]["error"].startswith("Runt")
    # the MFU rows still come, without the measured peak they would be divided by
    assert out["mfu"]["minilm"]["homlora"]["float32"]["mfu_vs_measured_matmul"] is None
    assert out["mfu"]["minilm"]["homlora"]["float32"]["tflops"] > 0
    assert "skipped" in out["flwr"] and set(out["part_seconds"]) == set(gpu.PARTS)


def test_without_cuda_the_check_still_prints_one_line_that_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 1
    out = json.loads(capsys.readouterr().out.strip())
    assert "no CUDA device" in out["error"] and "--dry-run" in out["error"]


def test_sigterm_stops_the_check_and_the_line_still_comes() -> None:
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(gpu.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--dry-run"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:  # the handler is set once a part has started
        if line.startswith("benchmarks.gpu: part step_cost"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    if proc.returncode == 0:  # the whole dry run finished first (a fast machine): nothing to interrupt
        pytest.skip("the dry run ended before the signal")
    out = json.loads(stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and out["interrupted"] == f"signal {signal.SIGTERM}"
    assert any(isinstance(v, dict) and "interrupted" in v.get("error", "") for v in out.values())
    assert out["flwr"]["skipped"].startswith("interrupted")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("NVIDIA H200", (67.0, 989.0)), ("NVIDIA H100 PCIe", (51.0, 756.0)), ("NVIDIA H100 80GB HBM3", (67.0, 989.0)),
     ("NVIDIA A100-SXM4-80GB", (19.5, 312.0)), ("Tesla T4", None)],
)  # fmt: skip
def test_datasheet_peak_matches_the_most_specific_name(name: str, expected: tuple[float, float] | None) -> None:
    assert gpu.spec_tflops(name) == expected


def test_the_flwr_part_says_why_it_is_skipped_when_its_runtime_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = gpu.importlib.util.find_spec
    monkeypatch.setattr(gpu.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    out = gpu.flwr_part(gpu.FULL, dry=False, deadline=0.0)
    assert out == {"skipped": "not installed here: ray (the demo's runtime, data and model)"}
