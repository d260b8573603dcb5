"""The run directory of the DESIGN contract: config, per-round metrics, summary, checkpoints."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from pf2lora_core.constants import (
    AUDIT_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOWER_IS_BETTER,
    METRICS_FILE,
    PLOTS_DIR,
    SUMMARY_FILE,
)


def new_run_dir(output_dir: str, name: str, fixed: str = "") -> Path:
    """``fixed`` if given, else ``<output_dir>/<timestamp>-<name>`` (made unique)."""
    if fixed:
        path = Path(fixed)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(output_dir) / f"{stamp}-{name}"
        n = 1
        while path.exists():
            n += 1
            path = Path(output_dir) / f"{stamp}-{name}-{n}"
    (path / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    (path / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (tensors made contiguous on CPU)."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


class RunDir:
    """Writer for one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write_config(self, yaml_text: str) -> None:
        atomic_write_bytes(self.path / CONFIG_FILE, yaml_text.encode())

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
            fh.flush()

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.path / SUMMARY_FILE, json.dumps(_jsonable(summary), indent=2).encode())

    def save_common(self, round_: int, tensors: Mapping[str, Tensor]) -> Path:
        path = self.path / CHECKPOINTS_DIR / f"common_round_{round_:04d}.safetensors"
        atomic_save_tensors(path, tensors, {"round": str(round_)})
        return path

    def audit(self, round_: int, name: str, arrays: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
        """Keep one received reply as it arrived: ``audit/round_XXXX/<name>.safetensors`` + ``.json``."""
        folder = self.path / AUDIT_DIR / f"round_{round_:04d}"
        if arrays:
            atomic_save_tensors(folder / f"{name}.safetensors", arrays)
        atomic_write_bytes(folder / f"{name}.json", json.dumps(_jsonable(info), sort_keys=True).encode())

    @property
    def plots(self) -> Path:
        return self.path / PLOTS_DIR


def aggregate_metric(values: Sequence[float], weights: Sequence[float], metric: str = "") -> dict[str, float]:
    """Mean, example-weighted mean and worst of per-client values (NaNs skipped).

    The worst is the minimum, or the maximum for a metric where lower is better (perplexity).
    """
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None and not math.isnan(v)]
    if not pairs:
        return {"mean": float("nan"), "weighted_mean": float("nan"), "worst": float("nan")}
    vals = [v for v, _ in pairs]
    total_w = sum(w for _, w in pairs)
    return {
        "mean": sum(vals) / len(vals),
        "weighted_mean": sum(v * w for v, w in pairs) / total_w if total_w > 0 else float("nan"),
        "worst": max(vals) if metric in LOWER_IS_BETTER else min(vals),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


__all__ = ["RunDir", "aggregate_metric", "atomic_save_tensors", "atomic_write_bytes", "new_run_dir"]
