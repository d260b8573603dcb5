"""A client's private level on disk: safetensors files per (run, client), written atomically.

The files are the ground truth across process restarts (a SuperNode killed mid-round restarts
from its last completed round); ``context.state`` is the fast copy within a run. Each file's
metadata records the round that produced it and the client's total number of local steps, so a
client can tell (and tests can check) that its private level really carried over.

Two generations are kept: ``private.safetensors`` (the latest round) and ``private.prev.safetensors``
(the one before). A round that is run again (the server was killed after the clients finished it
and resumed from the round before) must start from the private level *before* that round, not the
one it produced the first time; ``load(before_round=r)`` picks the newest file of a round < r.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from pf2lora_core.outputs import atomic_save_tensors

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
ROUND_META = "round"
STEPS_META = "local_steps_total"
LATEST_FILE = "private.safetensors"
PREVIOUS_FILE = "private.prev.safetensors"


@dataclass
class PrivateState:
    tensors: dict[str, Tensor]
    round: int  # the round whose training produced it
    steps_total: int  # local steps this private level has been trained for, over all rounds


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes (sorted by name): equal iff bitwise equal."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PrivateStore:
    """``<root>/<run_key>/client_<id>/private.safetensors`` (+ ``private.prev.safetensors``)."""

    def __init__(self, root: str | Path, run_key: str, client: str | int) -> None:
        client_dir = f"client_{_SAFE.sub('_', str(client))}"
        self.dir = Path(root) / _SAFE.sub("_", run_key) / client_dir
        self.path = self.dir / LATEST_FILE
        self.previous = self.dir / PREVIOUS_FILE

    def exists(self) -> bool:
        return self.path.is_file() or self.previous.is_file()

    def load(self, before_round: int | None = None) -> PrivateState | None:
        """The newest saved state (of a round < ``before_round`` when given), or None."""
        for path in (self.path, self.previous):
            state = _read(path)
            if state is not None and (before_round is None or state.round < before_round):
                return state
        return None

    def save(self, state: PrivateState) -> None:
        """Keep the latest of an earlier round as the previous generation, then write ``state``."""
        current = _round_of(self.path)
        if current is not None and current < state.round:
            os.replace(self.path, self.previous)  # atomic; a crash here leaves the previous readable
        meta = {ROUND_META: str(state.round), STEPS_META: str(state.steps_total)}
        atomic_save_tensors(self.path, state.tensors, meta)


def _round_of(path: Path) -> int | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        return int((fh.metadata() or {}).get(ROUND_META, 0))


def _read(path: Path) -> PrivateState | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return PrivateState(
        tensors=load_file(str(path)),
        round=int(meta.get(ROUND_META, 0)),
        steps_total=int(meta.get(STEPS_META, 0)),
    )
