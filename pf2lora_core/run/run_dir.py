"""The run directory (docs/DESIGN.md, "Run directory"): config, per-round metrics, summary, checkpoints."""

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

from pf2lora_core.config.keys import (
    AUDIT_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOWER_IS_BETTER,
    METRICS_FILE,
    PLOTS_DIR,
    SUMMARY_FILE,
)
from pf2lora_core.run.records import RoundRecord, Summary

SERVER_STATE_DIR = "server_state"  # beside checkpoints/: the server's checkpoints (pf2lora_core.federation.checkpoint)


class RunDirInUseError(ValueError):
    """A fresh run was pointed at a run directory that already holds files."""


def new_run_dir(output_dir: str, name: str, fixed: str = "") -> Path:
    """``fixed`` if given, else ``<output_dir>/<timestamp>-<name>`` (made unique).

    A fresh run never writes into a directory holding another run: its metrics.jsonl would be appended to
    another run's and the checkpoint rotation would delete one run's checkpoints for the other's.
    Raises ``RunDirInUseError`` for a ``fixed`` directory that holds a run's files (continue it with
    ``resume=<dir>`` instead); files that are not a run's (a sweep's ``job.json``) are left alone.
    """
    if fixed:
        path = Path(fixed)
        if path.exists() and (not path.is_dir() or holds_run(path)):
            raise RunDirInUseError(
                f"run_dir={fixed!r} already holds a run: give a new run_dir, remove it, "
                f"or continue that run with resume={fixed}"
            )
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


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds any of a run directory's own files (docs/DESIGN.md, "Run directory")."""
    if any((path / name).exists() for name in RUN_FILES):
        return True
    return any(any((path / sub).iterdir()) for sub in RUN_SUBDIRS if (path / sub).is_dir())


def set_aside_run(path: Path) -> Path | None:
    """Move a run's files out of ``path`` into ``path/attempt-<timestamp>/`` (a retry starts clean).

    Returns the new folder, or None when ``path`` held no run. Nothing is deleted.
    """
    if not path.is_dir() or not holds_run(path):
        return None
    aside = path / f"attempt-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        n += 1
        aside = path / f"attempt-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    aside.mkdir()
    for name in (*RUN_FILES, *RUN_SUBDIRS):
        if (path / name).exists():
            os.replace(path / name, aside / name)
    fsync_dir(path)
    return aside


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
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: the directory entry lives in the directory's inode)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform whose directories cannot be opened (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (tmpfs variants, network mounts) refuse fsync on directories
    finally:
        os.close(fd)


def atomic_save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (tensors made contiguous on CPU)."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)
RUN_SUBDIRS = (CHECKPOINTS_DIR, SERVER_STATE_DIR, AUDIT_DIR, PLOTS_DIR)
# A reply kept by federation.audit_replies may be at most this big: a structurally valid reply is
# the downlink's size (a 7B model's rank-16 LoRA is ~80 MB in float32), so 1 GiB only stops abuse.
AUDIT_MAX_BYTES = 1 << 30


class RunDir:
    """Writer for one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write_config(self, yaml_text: str) -> None:
        atomic_write_bytes(self.path / CONFIG_FILE, yaml_text.encode())

    def append_metrics(self, record: RoundRecord) -> None:
        self.append_metrics_json(record.to_json())

    def write_summary(self, summary: Summary) -> None:
        self.write_summary_json(summary.to_json())

    def append_metrics_json(self, record: Mapping[str, Any]) -> None:
        """A metrics.jsonl line of another shape (the synthetic task's); a federated run's is a RoundRecord."""
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
            fh.flush()

    def write_summary_json(self, summary: Mapping[str, Any]) -> None:
        """A summary.json of another shape (the synthetic task's); a federated run's is a Summary."""
        atomic_write_bytes(self.path / SUMMARY_FILE, json.dumps(_jsonable(summary), indent=2).encode())

    def save_common(self, round_: int, tensors: Mapping[str, Tensor]) -> Path:
        path = self.path / CHECKPOINTS_DIR / f"common_round_{round_:04d}.safetensors"
        atomic_save_tensors(path, tensors, {"round": str(round_)})
        return path

    def audit(self, round_: int, name: str, arrays: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
        """Keep one received reply as it arrived: ``audit/round_XXXX/<name>.safetensors`` + ``.json``.

        Raises ValueError (the caller rejects the reply) when the reply is over ``AUDIT_MAX_BYTES``.
        """
        size = sum(t.numel() * t.element_size() for t in arrays.values())
        text = json.dumps(_jsonable(info), sort_keys=True).encode()
        if size + len(text) > AUDIT_MAX_BYTES:
            raise ValueError(f"reply of {size + len(text)} bytes is over the audit cap of {AUDIT_MAX_BYTES} bytes")
        folder = self.path / AUDIT_DIR / f"round_{round_:04d}"
        if arrays:
            atomic_save_tensors(folder / f"{name}.safetensors", arrays)
        atomic_write_bytes(folder / f"{name}.json", text)

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


__all__ = [
    "RunDir",
    "RunDirInUseError",
    "aggregate_metric",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "fsync_dir",
    "holds_run",
    "new_run_dir",
    "set_aside_run",
]
