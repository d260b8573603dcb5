"""A client's private level on disk: one safetensors file per (run, client), written atomically.

The file is the ground truth across process restarts (a SuperNode killed mid-round restarts
from its last completed round); ``context.state`` is the fast copy within a run. The file's
metadata records the round that produced it and the client's total number of local steps, so a
client can tell (and tests can check) that its private level really carried over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from pf2lora_core.outputs import atomic_save_tensors

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
ROUND_META = "round"
STEPS_META = "local_steps_total"


@dataclass
class PrivateState:
    tensors: dict[str, Tensor]
    round: int  # the round whose training produced it
    steps_total: int  # local steps this private level has been trained for, over all rounds


class PrivateStore:
    """``<root>/<run_key>/client_<id>/private.safetensors``."""

    def __init__(self, root: str | Path, run_key: str, client: str | int) -> None:
        client_dir = f"client_{_SAFE.sub('_', str(client))}"
        self.path = Path(root) / _SAFE.sub("_", run_key) / client_dir / "private.safetensors"

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> PrivateState | None:
        if not self.exists():
            return None
        with safe_open(str(self.path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return PrivateState(
            tensors=load_file(str(self.path)),
            round=int(meta.get(ROUND_META, 0)),
            steps_total=int(meta.get(STEPS_META, 0)),
        )

    def save(self, state: PrivateState) -> None:
        meta = {ROUND_META: str(state.round), STEPS_META: str(state.steps_total)}
        atomic_save_tensors(self.path, state.tensors, meta)
