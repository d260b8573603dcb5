"""The prepared GPU check runs its every part on the CPU with tiny sizes (``--dry-run``) and prints one JSON line."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu
from benchmarks.step_cost import METHODS


def test_dry_run_prints_one_json_line_with_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    gpu.main(["--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1  # the tables went to stderr
    out = json.loads(lines[0])
    assert out["dry_run"] is True and out["float32_matmul_precision"] == "highest"
    assert set(out["step_cost"]["float32"]) == set(METHODS)
    assert set(out["step_cost"]["bf16"]) == set(gpu.DRY.bf16_methods)
    for table in out["step_cost"].values():
        assert all(row["time_ratio"] > 0 and row["memory_ratio"] > 0 for row in table.values())
    assert all(v > 0 for v in out["peak"]["measured_tflops"].values())
    for model in ("minilm", "smollm2"):
        rows = out["mfu"][model]
        for precision in ("float32", "bf16"):
            hom, pf2 = rows["homlora"][precision], rows["pf2lora"][precision]
            assert hom["flops_per_step"] > 0 and hom["tflops"] > 0 and hom["mfu_vs_measured_matmul"] > 0
            # forward finite difference: inner (x and y), outer and probe passes against one HOMLoRA pass
            assert pf2["flops_per_step"] > 2 * hom["flops_per_step"]
            assert hom["mfu_vs_spec"] is None  # no datasheet peak for a CPU
    assert out["client_memory"]["peak_allocated_mib"] > 0 and out["client_memory"]["clients_fit"] is None
    assert "dry run" in out["flwr"]["skipped"]
    assert set(out["part_seconds"]) == {"step_cost", "mfu", "client_memory", "flwr"}


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
