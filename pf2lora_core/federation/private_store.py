"""A client's private level on disk: safetensors files per (run, client), written atomically.

The files are the ground truth across process restarts (a SuperNode killed mid-round restarts
from its last completed round); ``context.state`` is the fast copy within a run. Each file's
metadata records the round that produced it, the client's total number of local steps and the
SHA-256 digest of its tensors, so a client can tell (and tests can check) that its private level
really carried over, and a torn or corrupted file is recognised as such on load.

Two generations are kept: ``private.safetensors`` (the latest round) and ``private.prev.safetensors``
(the one before). A round that is run again (the server was killed after the clients finished it
and resumed from the round before) must start from the private level *before* that round, not the
one it produced the first time; ``load(before_round=r)`` picks the newest file of a round < r.

Where the algorithm re-fits the private level to the common level before evaluating (PF2LoRA),
the evaluated level goes to a third file, ``private.evaluated.safetensors`` (``save_evaluated``):
it is the client's model as evaluated, what ``pf2lora-export`` writes, and training never reads it.

Nothing already computed is lost: a file that does not parse or whose digest does not match is
renamed aside (``<name>.torn-<unix time>``, kept for inspection) with a warning and the previous
generation is used; a save of a round lower than the one on disk (a replayed message) never
overwrites it; renames are followed by a directory fsync; and every load and save holds the
directory's lock file, so two processes sharing a state directory cannot interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from pf2lora_core.run.run_dir import atomic_save_tensors, fsync_dir

log = logging.getLogger("pf2lora.client.state")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
ROUND_META = "round"
STEPS_META = "local_steps_total"
DIGEST_META = "sha256"  # tensor_digest of the file's tensors
LATEST_FILE = "private.safetensors"
PREVIOUS_FILE = "private.prev.safetensors"
# the private level as the client was evaluated with it (re-fitted to that round's common level,
# ``Algorithm.refits_private``): what ``pf2lora-export`` writes; never read back by training
EVALUATED_FILE = "private.evaluated.safetensors"
LOCK_FILE = ".lock"
TORN_SUFFIX = ".torn-"


class PrivateStateLostError(RuntimeError):
    """The server says this client trained before, but no usable private level is on disk."""


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

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``<dir>/.lock`` (an advisory ``flock``; released when the process dies)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_FILE, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def load(self, before_round: int | None = None) -> PrivateState | None:
        """The newest intact saved state (of a round < ``before_round`` when given), or None."""
        if not self.dir.is_dir():
            return None
        with self.locked():
            for path in (self.path, self.previous):
                state = self._read_checked(path)
                if state is not None and (before_round is None or state.round < before_round):
                    return state
        return None

    def load_required(self, before_round: int, trained_before: int, allow_fresh: bool) -> PrivateState | None:
        """``load(before_round)``, but a missing state is an error when the client trained before.

        ``trained_before``: the last round the server aggregated this client's reply (0 = never);
        then a private level of some round <= it must be here. ``allow_fresh`` (the node allows a
        fresh start, e.g. after its disk was replaced) turns the error into a warning.
        """
        state = self.load(before_round=before_round)
        if state is None and 0 < trained_before < before_round:
            message = (
                f"no usable private adapter in {self.dir} although this client trained in round {trained_before}: "
                "restore the state directory, or start the SuperNode with node config allow-fresh-private=true "
                "to start the private level afresh"
            )
            if not allow_fresh:
                raise PrivateStateLostError(message)
            log.warning("%s; starting afresh as the node allows", message.split(":")[0])
        return state

    def save(self, state: PrivateState) -> bool:
        """Keep the latest of an earlier round as the previous generation, then write ``state``.

        Returns False (and writes nothing) when the latest file holds a higher round: a replayed
        message of an older round never overwrites newer work.
        """
        with self.locked():
            current = self._read_checked(self.path)
            if current is not None and current.round > state.round:
                log.warning(
                    "%s holds round %d; not overwriting it with round %d (a replayed message?)",
                    self.path, current.round, state.round,
                )  # fmt: skip
                return False
            if current is not None and current.round < state.round:
                os.replace(self.path, self.previous)  # atomic; a crash here leaves the previous readable
                fsync_dir(self.dir)
            atomic_save_tensors(self.path, state.tensors, _meta(state))
            return True

    def save_evaluated(self, state: PrivateState) -> bool:
        """Write the level the client was evaluated with in ``state.round`` (not one of a lower round)."""
        path = self.dir / EVALUATED_FILE
        with self.locked():
            current = self._read_checked(path)
            if current is not None and current.round > state.round:
                return False
            atomic_save_tensors(path, state.tensors, _meta(state))
            return True

    def load_evaluated(self, round_: int) -> PrivateState | None:
        """The level the client was evaluated with after ``round_``, or None (not evaluated, or re-fit off)."""
        if not self.dir.is_dir():
            return None
        with self.locked():
            state = self._read_checked(self.dir / EVALUATED_FILE)
        return state if state is not None and state.round == round_ else None

    def _read_checked(self, path: Path) -> PrivateState | None:
        """The state in ``path``; None if absent; a torn or corrupted file is renamed aside."""
        if not path.is_file():
            return None
        try:
            state, digest = _read(path)
            if digest and tensor_digest(state.tensors) != digest:
                raise ValueError("digest of its tensors does not match its metadata")
        except Exception as err:  # safetensors raises its own errors on a truncated header or body
            aside = path.with_name(f"{path.name}{TORN_SUFFIX}{int(time.time())}")
            os.replace(path, aside)
            fsync_dir(self.dir)
            log.warning(
                "private adapter file %s is unreadable (%s: %s); moved to %s, using the previous generation",
                path, type(err).__name__, str(err)[:200], aside.name,
            )  # fmt: skip
            return None
        return state


def _meta(state: PrivateState) -> dict[str, str]:
    return {ROUND_META: str(state.round), STEPS_META: str(state.steps_total), DIGEST_META: tensor_digest(state.tensors)}


def _read(path: Path) -> tuple[PrivateState, str]:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    state = PrivateState(
        tensors=load_file(str(path)),
        round=int(meta.get(ROUND_META, 0)),
        steps_total=int(meta.get(STEPS_META, 0)),
    )
    return state, meta.get(DIGEST_META, "")
