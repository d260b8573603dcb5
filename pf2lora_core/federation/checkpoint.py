"""Server checkpoints: all a run needs to continue after round t, in one atomic safetensors file.

``<run dir>/server_state/round_XXXX.safetensors`` holds, after round t's training and evaluation:

- the algorithm's server state (the common adapter; HETLoRA / FlexLoRA / FLoRA keep more in it),
- the algorithm object's own server-side attributes (HETLoRA's per-client ranks, FLoRA's stacks,
  FlexLoRA's initial factors), found generically in ``vars(algorithm)``,
- the round number, the per-round history and the latest evaluation per client,
- the strategy's node-sampling RNG and the process RNGs (``random``, numpy, torch),
- the resolved config of the run.

Optimizer state: there is none on the server, and clients start a fresh AdamW every round by
design (``Algorithm.adamw``), so nothing of it outlives a round.

The two newest are kept (a file being replaced when the server dies is never the only one), and
``load_latest`` tries them newest first: a torn or corrupted newest checkpoint is skipped with its
reason and the one before is used. Tensors are stored as safetensors (bit-exact); the small
state as JSON in the file's metadata; the run's history (per-round records and the latest
evaluation per client, which hold text from clients and grow with the rounds) in its own file
``round_XXXX.history.json`` beside it, whose SHA-256 the checkpoint's metadata records (so the
safetensors header stays far below its 100 MB limit, and a torn history is detected). JSON goes
through a small tagged encoding (tuples, non-string dict keys, numpy dtypes and arrays). Nothing is
pickled, so a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from pf2lora_core.run.records import RoundRecord
from pf2lora_core.run.run_dir import SERVER_STATE_DIR as SERVER_STATE_DIR  # re-exported: its old home
from pf2lora_core.run.run_dir import atomic_save_tensors, atomic_write_bytes

CHECKPOINT_GLOB = "round_*.safetensors"
_ROUND = re.compile(r"^round_(\d+)\.safetensors$")
KEEP = 2  # newest checkpoints kept
META_KEY = "pf2lora.checkpoint"
FORMAT_VERSION = 2  # 2: history in its own file
HISTORY_SUFFIX = ".history.json"
STATE_PREFIX = "state/"
OBJECT_PREFIX = "obj/"
# attributes of an Algorithm that are configuration, not state (rebuilt from the config on resume)
CONFIG_ATTRIBUTES = frozenset({"params"})


def checkpoint_path(state_dir: Path, round_: int) -> Path:
    return state_dir / f"round_{round_:04d}.safetensors"


def history_path(path: Path) -> Path:
    """The history file beside checkpoint ``path`` (``round_XXXX.history.json``)."""
    return path.with_name(path.name.removesuffix(".safetensors") + HISTORY_SUFFIX)


@dataclass
class ServerCheckpoint:
    """What the server knows after ``round``; ``save`` / ``load`` round-trip it exactly."""

    round: int
    state: dict[str, Tensor]  # the algorithm's server state
    algorithm: dict[str, Any]  # the algorithm object's server-side attributes
    history: list[RoundRecord]  # metrics.jsonl records of rounds 1..round
    latest_eval: dict[int, dict[str, Any]]  # client -> its latest evaluation entry
    sampler: Any  # random.Random.getstate() of the strategy's node sampler
    rng: dict[str, Any] = field(default_factory=dict)  # process RNG states (capture_rng)
    config_yaml: str = ""  # the run's resolved config

    def save(self, state_dir: Path) -> Path:
        """Write ``round_XXXX.history.json`` then ``round_XXXX.safetensors`` atomically; keep the ``KEEP`` newest.

        The safetensors file is written last: a checkpoint exists only once its history does.
        """
        tensors: dict[str, Tensor] = {STATE_PREFIX + k: v.detach().cpu().clone() for k, v in self.state.items()}
        history = json.dumps(
            {
                "history": encode([h.to_json() for h in self.history], tensors),
                "latest_eval": encode(self.latest_eval, tensors),
            }
        )
        path = checkpoint_path(state_dir, self.round)
        atomic_write_bytes(history_path(path), history.encode())
        body = {
            "version": FORMAT_VERSION,
            "round": self.round,
            "state_keys": list(self.state),  # the algorithm's key order
            "algorithm": encode(self.algorithm, tensors),
            "history_sha256": hashlib.sha256(history.encode()).hexdigest(),
            "sampler": encode(self.sampler, tensors),
            "rng": encode(self.rng, tensors),
            "config_yaml": self.config_yaml,
        }
        atomic_save_tensors(path, tensors, {META_KEY: json.dumps(body)})
        for _, old in sorted(_rounds(state_dir))[:-KEEP]:
            old.unlink(missing_ok=True)
            history_path(old).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: Path) -> ServerCheckpoint:
        """The checkpoint in ``path``; ValueError naming the file for anything unreadable or inconsistent."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:  # safetensors' own errors on a torn header or body
            raise ValueError(f"{path} is unreadable ({type(err).__name__}: {str(err)[:200]})") from None
        if META_KEY not in meta:
            raise ValueError(f"{path} is not a server checkpoint (no '{META_KEY}' metadata)")
        body = json.loads(meta[META_KEY])
        if body.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: checkpoint format {body.get('version')}, this code reads {FORMAT_VERSION}")
        hist_file = history_path(path)
        if not hist_file.is_file():
            raise ValueError(f"{path}: its history file {hist_file.name} is missing")
        text = hist_file.read_bytes()
        if hashlib.sha256(text).hexdigest() != body["history_sha256"]:
            raise ValueError(f"{hist_file} does not match its checkpoint (torn or edited)")
        hist = json.loads(text)
        return cls(
            round=int(body["round"]),
            state={k: tensors[STATE_PREFIX + k] for k in body["state_keys"]},
            algorithm=decode(body["algorithm"], tensors),
            history=[
                RoundRecord.from_json(h, f"{hist_file}: history[{i}]")
                for i, h in enumerate(decode(hist["history"], tensors))
            ],
            latest_eval=decode(hist["latest_eval"], tensors),
            sampler=decode(body["sampler"], tensors),
            rng=decode(body["rng"], tensors),
            config_yaml=str(body["config_yaml"]),
        )


def _rounds(state_dir: Path) -> list[tuple[int, Path]]:
    return [(int(m.group(1)), p) for p in state_dir.glob(CHECKPOINT_GLOB) if (m := _ROUND.match(p.name))]


def latest_checkpoint(state_dir: Path) -> Path | None:
    """The checkpoint of the highest round in ``state_dir`` (None if there is none)."""
    found = _rounds(state_dir)
    return max(found)[1] if found else None


def load_latest(state_dir: Path) -> tuple[ServerCheckpoint | None, list[str]]:
    """The newest checkpoint in ``state_dir`` that loads, and why each newer one did not.

    Returns ``(None, reasons)`` when none loads (or there is none: ``reasons`` is then empty).
    """
    skipped: list[str] = []
    for _, path in sorted(_rounds(state_dir), reverse=True):
        try:
            return ServerCheckpoint.load(path), skipped
        except (ValueError, KeyError, json.JSONDecodeError) as err:
            skipped.append(str(err))
    return None, skipped


# --------------------------------------------------------------------------- algorithm state
def algorithm_state(algorithm: object) -> dict[str, Any]:
    """The algorithm object's attributes other than its configuration (deep copies of tensors)."""
    return {k: v for k, v in vars(algorithm).items() if k not in CONFIG_ATTRIBUTES}


def restore_algorithm_state(algorithm: object, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(algorithm, name, value)


# ------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(rng: dict[str, Any]) -> None:
    if "python" in rng:
        random.setstate(rng["python"])
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])


# ------------------------------------------------------------------------- tagged encoding
def encode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """A JSON-able form of ``obj``; tensors move to ``tensors`` (by reference name). No pickle.

    Supported: None, bool, int, float, str, list, tuple, dict (any encodable keys), torch tensors,
    numpy arrays, scalars and dtypes. Anything else raises TypeError naming the type.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, Tensor):
        name = f"{OBJECT_PREFIX}{len(tensors)}"
        tensors[name] = obj.detach().cpu().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.dtype):
        return {"__dtype__": obj.str}
    if isinstance(obj, np.generic):
        return {"__npscalar__": obj.item(), "dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors) for k, v in obj.items()}
        return {"__dict__": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(
        f"cannot checkpoint a {type(obj).__name__} without pickle; add it to pf2lora_core.federation.checkpoint"
    )


def decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of ``encode``."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    if "__dtype__" in obj:
        return np.dtype(obj["__dtype__"])
    if "__npscalar__" in obj:
        return np.dtype(obj["dtype"]).type(obj["__npscalar__"])
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
