"""A client's private level on disk: safetensors files per (run, client), written atomically.

The files are the ground truth across process restarts (a SuperNode killed mid-round restarts
from its last completed round); ``context.state`` is the fast copy within a run. Each file's
metadata records the round that produced it, the client's total number of local steps, the
SHA-256 digest of its tensors, whose it is (run key and client id), the seal of the generation
it followed, and its own seal (a SHA-256 over all of that), so a client can tell (and tests can
check) that its private level really carried over, and a torn, corrupted, foreign or swapped file
is recognised as such on load.

Two generations are kept: ``private.safetensors`` (the latest round) and ``private.prev.safetensors``
(the one before). A round that is run again (the server was killed after the clients finished it
and resumed from the round before) must start from the private level *before* that round, not the
one it produced the first time; ``load(before_round=r)`` picks the newest file of a round < r.
``private.head.json``, written after each save, names the generation that save wrote: a latest
file that is lost, or swapped for an older one, is told from a save cut short by a crash.

Where the algorithm re-fits the private level to the common level before evaluating (PF2LoRA),
the evaluated level goes to a third file, ``private.evaluated.safetensors`` (``save_evaluated``):
it is the client's model as evaluated, what ``pf2lora-export`` writes, and training never reads it.

Invariants (tests/fuzz/test_fuzz_private_store.py checks them on arbitrary directory contents):

* ``load()`` returns a generation whose digests verify and whose metadata names this run key and
  client, or None, or raises ``PrivateStoreError``. It never returns a generation older than the
  last one saved without a warning in that same call. A file that is not a regular file (a
  symbolic link, a FIFO, a directory), does not parse, lacks a metadata field (the digest among
  them), fails a digest, belongs to another run or client, or is not the generation the head
  record names is renamed aside (``<name>.torn-<unix time>-<n>``, kept for inspection) with a
  warning, and the previous generation is used; while the last saved generation is lost, or the
  head record is, every load says so. Without a head record, a latest file that does not follow
  the previous one raises: the store cannot tell which one is right.
* ``save()`` either writes the new latest generation or raises: a save of a round lower than the
  newest one on disk (a replayed message, or a server that resumed from before this client's
  last round) raises ``StaleRoundError`` and overwrites nothing. The client then answers with an
  error rather than carrying on from an older level.
* Nothing is created, written or followed outside the store directory: the run-key and client
  directories, the lock file and every store file are opened relative to the directory with
  ``O_NOFOLLOW``; a link in place of a directory or the lock is refused with ``PrivateStoreError``.
  The run key (sent by the server) must be one path component (``check_component``), else ``ValueError``.
* Setting a file aside never overwrites an earlier set-aside file; renames are followed by a
  directory fsync; every load and save holds the directory's lock file, so two processes sharing a
  state directory cannot interleave.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes
from torch import Tensor

log = logging.getLogger("pf2lora.client.state")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_HASH_CHARS = 12  # of a name that had to be rewritten: two keys never share a directory
_COUNT = re.compile(r"[0-9]{1,18}")
ROUND_META = "round"
STEPS_META = "local_steps_total"
DIGEST_META = "sha256"  # tensor_digest of the file's tensors
RUN_KEY_META = "run_key"  # whose file it is: the run key and client id the store was opened with
CLIENT_META = "client"
# SHA-256 over every other field: a changed round, owner or predecessor is caught like changed tensors. As it
# covers the predecessor's seal too, it names one generation in one history (a hash chain, as in git)
SEAL_META = "meta_sha256"
PREV_META = "prev_meta_sha256"  # the seal of the generation this one followed as the latest ("" for the first)
REQUIRED_META = (ROUND_META, STEPS_META, DIGEST_META, PREV_META, RUN_KEY_META, CLIENT_META, SEAL_META)
LATEST_META = "latest_meta_sha256"  # the head record: the seal of the generation the last save writes,
REPLACES_META = "replaces_meta_sha256"  # the seal of the latest it replaces,
DONE_META = "save"  # and whether it is done
STARTED, DONE = "started", "done"
HEAD_FIELDS = (ROUND_META, LATEST_META, PREV_META, REPLACES_META, DONE_META, RUN_KEY_META, CLIENT_META, SEAL_META)
LATEST_FILE = "private.safetensors"
PREVIOUS_FILE = "private.prev.safetensors"
# the private level as the client was evaluated with it (re-fitted to that round's common level,
# ``Algorithm.refits_private``): what ``pf2lora-export`` writes; never read back by training
EVALUATED_FILE = "private.evaluated.safetensors"
# the head record (JSON), written before a save touches a generation file and again once it is done: which
# generation the last save wrote, so a latest file lost or swapped for another one is told from a save cut short
HEAD_FILE = "private.head.json"
LOCK_FILE = ".lock"
TORN_SUFFIX = ".torn-"
MAX_COMPONENT_CHARS = 200  # a run key or client id; with the "client_" prefix well under NAME_MAX (255 bytes)
# O_NONBLOCK: a FIFO planted under a store name must not hang the open; it is then refused as not a regular file
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_REGULAR_ERRNOS = (errno.ENXIO, errno.EISDIR)  # opening a socket, a FIFO for writing, or a directory for writing
_HEADER_SIZE_BYTES = 8  # safetensors: a little-endian u64 header length, then the JSON header
FALLBACK = "falling back to the previous generation"  # what a refused file means, for the warning
NO_PREVIOUS = "the generation before the latest is lost"
NO_EVALUATED = "the level evaluated with is lost"


class PrivateStoreError(RuntimeError):
    """The state directory is in a state the store refuses to use; the message says what to fix."""


class PrivateStateLostError(PrivateStoreError):
    """The server says this client trained before, but no usable private level is on disk."""


class StaleRoundError(PrivateStoreError):
    """A save of a round lower than the newest one on disk: refused, nothing overwritten."""


class _UnusableFileError(Exception):
    """A store file that must not be used (the reason is the message); it is set aside."""


@dataclass
class PrivateState:
    tensors: dict[str, Tensor]
    round: int  # the round whose training produced it
    steps_total: int  # local steps this private level has been trained for, over all rounds


@dataclass(frozen=True)
class _Stored:
    """A generation as read from disk, checked."""

    state: PrivateState
    seal: str  # names this generation
    prev_seal: str  # names the one it followed
    owner: tuple[str, str]  # (run key, client id) it was written for

    @property
    def round(self) -> int:
        return self.state.round


@dataclass(frozen=True)
class _Head:
    """The head record of the last save: written before it touches a generation file, and again once it is done."""

    round: int
    seal: str  # the generation the save writes
    prev_seal: str  # the one that generation follows
    replaces_seal: str  # the latest it replaces ("" if none): still the latest until the save is done
    done: bool
    owner: tuple[str, str]

    def admits(self, latest: _Stored) -> bool:
        """Whether ``latest`` is the generation last saved (or, for a save cut short, the one it was replacing)."""
        return latest.seal == self.seal or (not self.done and latest.seal == self.replaces_seal)

    def precedes(self, previous: _Stored, latest: _Stored | None) -> bool:
        """Whether ``previous`` is the generation before the latest (the latest lost: before the head's)."""
        if latest is not None:
            return latest.prev_seal == previous.seal
        return previous.seal in (self.prev_seal, self.replaces_seal)

    def explains_missing_latest(self, previous: _Stored | None) -> bool:
        """Whether no latest file is a save cut short (between its renames, or before a first file)."""
        if self.done:
            return False
        return previous.seal == self.replaces_seal if previous is not None else self.replaces_seal == ""


_T = TypeVar("_T", _Stored, _Head)


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes (sorted by name): equal iff bitwise equal."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_component(value: object, what: str) -> str:
    """``value`` if it can name one directory under the state root, else ValueError saying why.

    The run key comes from the server: ``..``, a separator or an absolute path would put the
    store elsewhere on this node's disk. Other characters are allowed (``_dir_name``).
    """
    problem = _component_problem(value)
    if problem:
        shown = repr(value) if len(repr(value)) <= 80 else f"{repr(value)[:77]}..."
        raise ValueError(f"{what} {shown} is not one safe path component: {problem}; use a plain name such as 'run-1'")
    return str(value)


def _dir_name(key: str) -> str:
    """``key`` itself if it is made of ``[A-Za-z0-9._-]``, else that with a hash of ``key`` (one name per key)."""
    cleaned = _SAFE.sub("_", key)
    if cleaned == key:
        return key
    return f"{cleaned}-{hashlib.sha256(key.encode()).hexdigest()[:_NAME_HASH_CHARS]}"


def _component_problem(value: object) -> str:
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not text"
    if not value:
        return "it is empty"
    if value in (".", ".."):
        return "it names a directory itself, not one of its own"
    if "/" in value or "\\" in value or (os.altsep and os.altsep in value):
        return "it contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "it contains a control character (NUL, newline, ...)"
    if len(value) > MAX_COMPONENT_CHARS:
        return f"it is {len(value)} characters long, more than {MAX_COMPONENT_CHARS}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid Unicode text (a lone surrogate)"
    return ""


class PrivateStore:
    """``<root>/<run_key>/client_<id>/private.safetensors`` (+ ``private.prev.safetensors``)."""

    def __init__(self, root: str | Path, run_key: str, client: str | int) -> None:
        self.run_key = check_component(run_key, "run key")
        self.client = check_component(str(client), "client id")
        self.root = Path(root)
        self._parts = (_dir_name(self.run_key), f"client_{_dir_name(self.client)}")
        self.dir = self.root.joinpath(*self._parts)
        self.path = self.dir / LATEST_FILE
        self.previous = self.dir / PREVIOUS_FILE
        self._owner = (self.run_key, self.client)

    def exists(self) -> bool:
        return any(_is_regular_file(p) for p in (self.path, self.previous))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``<dir>/.lock`` (an advisory ``flock``; released when the process dies)."""
        with self._opened(create=True):
            yield

    def load(self, before_round: int | None = None) -> PrivateState | None:
        """The newest intact saved state (of a round < ``before_round`` when given), or None."""
        with self._opened(create=False) as dir_fd:
            if dir_fd is None:
                return None
            _, latest, previous = self._generations(dir_fd)
        for stored in (latest, previous):
            if stored is not None and (before_round is None or stored.round < before_round):
                return stored.state
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

    def check_writable(self, round_: int) -> None:
        """Raise ``StaleRoundError`` now (before any training) if a save of ``round_`` would be refused."""
        with self._opened(create=False) as dir_fd:
            if dir_fd is not None:
                self._refuse_older(self._generations(dir_fd), round_, self.path)

    def save(self, state: PrivateState) -> None:
        """Keep the latest of an earlier round as the previous generation, then write ``state``.

        Raises ``StaleRoundError`` (and writes nothing) when the store holds a higher round: a
        replayed message of an older round never overwrites newer work. The head record is
        written first (what this save writes and replaces) and marked done last, so a save cut
        short by a crash is told from a file lost or swapped afterwards.
        """
        with self._opened(create=True) as dir_fd:
            found = self._generations(dir_fd)
            self._refuse_older(found, state.round, self.path)
            _, latest, previous = found
            promoted = latest is None and previous is not None and previous.round == state.round
            replaced = previous if promoted else latest
            if replaced is None:
                prev_seal = previous.seal if previous is not None else ""
            elif replaced.round < state.round:
                prev_seal = replaced.seal
            else:  # a round run again replaces its first attempt, after the same previous generation
                prev_seal = replaced.prev_seal
            data, seal = self._encode(state, prev_seal)
            head = _Head(state.round, seal, prev_seal, replaced.seal if replaced else "", False, self._owner)
            self._write_head(dir_fd, head)
            if promoted:  # its round saved again with no latest left: it takes the latest's place
                _rename(dir_fd, PREVIOUS_FILE, LATEST_FILE)
            elif replaced is not None and replaced.round < state.round:
                _rename(dir_fd, LATEST_FILE, PREVIOUS_FILE)  # atomic; a crash here leaves the previous readable
            _atomic_write(dir_fd, LATEST_FILE, data)
            self._write_head(dir_fd, dataclasses.replace(head, done=True))

    def save_evaluated(self, state: PrivateState) -> None:
        """Write the level the client was evaluated with in ``state.round`` (``StaleRoundError`` for a lower round)."""
        with self._opened(create=True) as dir_fd:
            current = self._checked(dir_fd, EVALUATED_FILE, _parse, NO_EVALUATED)
            self._refuse_older((current,), state.round, self.dir / EVALUATED_FILE)
            _atomic_write(dir_fd, EVALUATED_FILE, self._encode(state, "")[0])

    def load_evaluated(self, round_: int) -> PrivateState | None:
        """The level the client was evaluated with after ``round_``, or None (not evaluated, or re-fit off)."""
        with self._opened(create=False) as dir_fd:
            if dir_fd is None:
                return None
            current = self._checked(dir_fd, EVALUATED_FILE, _parse, NO_EVALUATED)
        return current.state if current is not None and current.round == round_ else None

    # ------------------------------------------------------------------------ the directory
    @contextlib.contextmanager
    def _opened(self, create: bool) -> Iterator[int | None]:
        """The store directory's descriptor with its lock held; None if it does not exist and not ``create``."""
        dir_fd = self._open_dir(create)
        if dir_fd is None:
            yield None
            return
        try:
            lock_fd = self._open_lock(dir_fd)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                yield dir_fd
            finally:
                os.close(lock_fd)  # releases the flock
        finally:
            os.close(dir_fd)

    def _open_dir(self, create: bool) -> int | None:
        """Open ``<root>/<run key>/client_<id>`` one component at a time, never following a link below the root."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)  # the root is the node's own setting: links allowed
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        path = self.root
        for part in self._parts:
            path = path / part
            try:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.close(fd)
                return None
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PrivateStoreError(
                        f"{path} is a symbolic link or not a directory: the private-state store never follows a "
                        "link; move it away (the store then starts this directory afresh) or restore the real one"
                    ) from err
                raise
            os.close(fd)
            fd = child
        return fd

    def _open_lock(self, dir_fd: int) -> int:
        def refused(what: str) -> PrivateStoreError:
            return PrivateStoreError(f"{self.dir / LOCK_FILE} is {what}: remove it (the store recreates its lock file)")

        try:
            fd = os.open(LOCK_FILE, os.O_WRONLY | os.O_CREAT | _FILE_FLAGS, 0o666, dir_fd=dir_fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise refused("a symbolic link") from err
            if err.errno in _NOT_REGULAR_ERRNOS:
                raise refused("not a regular file") from err
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise refused("not a regular file")
        return fd

    # ------------------------------------------------------------------------ generations
    def _generations(self, dir_fd: int) -> tuple[_Head | None, _Stored | None, _Stored | None]:
        """The head record, the latest and the previous generation, each checked.

        A file that is unusable, or that is not the generation the head record (or the latest)
        names, is set aside with a warning; so is a lost newest generation reported, on every call.
        """
        head = self._checked(dir_fd, HEAD_FILE, _parse_head, "the next save writes a new one")
        latest = self._checked(dir_fd, LATEST_FILE, _parse, FALLBACK)
        previous = self._checked(dir_fd, PREVIOUS_FILE, _parse, NO_PREVIOUS)
        if head is None:
            self._check_unanchored(latest, previous)
            return None, latest, previous
        if latest is not None and not head.admits(latest):
            reason = f"it holds round {latest.round}, not the generation last saved (round {head.round})"
            latest = self._refuse(dir_fd, LATEST_FILE, reason, FALLBACK)
        if previous is not None and not head.precedes(previous, latest):
            reason = f"its round {previous.round} is not the generation before the latest"
            previous = self._refuse(dir_fd, PREVIOUS_FILE, reason, NO_PREVIOUS)
        if latest is None and not head.explains_missing_latest(previous):
            left = f"the newest left is round {previous.round}" if previous is not None else "no older one is left"
            log.warning("the private adapter last saved in %s (round %d) is lost; %s", self.dir, head.round, left)
        return head, latest, previous

    def _check_unanchored(self, latest: _Stored | None, previous: _Stored | None) -> None:
        """Without a head record (removed, or the first save cut short) only the pair's own chain is checked."""
        if latest is not None and previous is not None and latest.prev_seal != previous.seal:
            raise PrivateStoreError(
                f"{self.path} (round {latest.round}) does not follow {self.previous.name} (round {previous.round}) "
                f"and there is no {HEAD_FILE} to tell which is right: inspect both, keep the right one as "
                f"{LATEST_FILE} and move the other out of the directory"
            )
        if latest is not None or previous is not None:
            log.warning(
                "%s has no head record (%s): cannot tell whether round %d is the last one saved; the next save "
                "writes one", self.dir, HEAD_FILE, (latest or previous).round,
            )  # fmt: skip

    def _checked(self, dir_fd: int, name: str, parse: Callable[[bytes], _T], consequence: str) -> _T | None:
        """``parse`` of ``name`` if it is this client's; None if absent; else set aside with a warning."""
        try:
            data = _read_regular(dir_fd, name)
            if data is None:
                return None
            record = parse(data)
            if record.owner != self._owner:
                raise _UnusableFileError(f"it belongs to run key {record.owner[0]!r}, client {record.owner[1]!r}")
        except _UnusableFileError as err:
            return self._refuse(dir_fd, name, str(err), consequence)
        return record

    def _refuse(self, dir_fd: int, name: str, reason: str, consequence: str) -> None:
        aside = _set_aside(dir_fd, name)
        log.warning(
            "private adapter file %s is unreadable or not this client's (%s); moved to %s, %s",
            self.dir / name, reason[:300], aside, consequence,
        )  # fmt: skip

    def _refuse_older(self, found: Iterable[_Head | _Stored | None], round_: int, path: Path) -> None:
        """``StaleRoundError`` if a generation on disk, or the last save done (its file lost or not), is newer."""
        rounds = [r.round for r in found if r is not None and not (isinstance(r, _Head) and not r.done)]
        newest = max(rounds, default=None)
        if newest is not None and newest > round_:
            raise StaleRoundError(
                f"{path} holds round {newest}; not overwriting it with round {round_}: this client's private "
                "level is ahead of the server (a replayed message, or the server resumed from before this "
                f"client's last round). If the run really restarted from an earlier round, move {self.dir} aside"
            )

    def _encode(self, state: PrivateState, prev_seal: str) -> tuple[bytes, str]:
        """A generation file's bytes, and its seal (which names it)."""
        meta = {
            ROUND_META: str(state.round), STEPS_META: str(state.steps_total),
            DIGEST_META: tensor_digest(state.tensors), PREV_META: prev_seal,
            RUN_KEY_META: self.run_key, CLIENT_META: self.client,
        }  # fmt: skip
        meta[SEAL_META] = _seal(meta)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}
        return tensors_to_bytes(tensors, metadata=meta), meta[SEAL_META]

    def _write_head(self, dir_fd: int, head: _Head) -> None:
        record = {
            ROUND_META: str(head.round), LATEST_META: head.seal, PREV_META: head.prev_seal,
            REPLACES_META: head.replaces_seal, DONE_META: DONE if head.done else STARTED,
            RUN_KEY_META: head.owner[0], CLIENT_META: head.owner[1],
        }  # fmt: skip
        record[SEAL_META] = _seal(record)
        _atomic_write(dir_fd, HEAD_FILE, json.dumps(record, sort_keys=True).encode())


# ---------------------------------------------------------------------------- files
def _read_regular(dir_fd: int, name: str) -> bytes | None:
    """The bytes of ``name``; None if absent; ``_UnusableFileError`` for a link or anything but a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _UnusableFileError("it is a symbolic link, and the store never follows one") from err
        if err.errno in _NOT_REGULAR_ERRNOS:
            raise _UnusableFileError("it is not a regular file") from err
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _UnusableFileError("it is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (``{}`` if none)."""
    size = int.from_bytes(data[:_HEADER_SIZE_BYTES], "little")
    if len(data) < _HEADER_SIZE_BYTES or size > len(data) - _HEADER_SIZE_BYTES:
        raise ValueError("the header is cut short")
    header = json.loads(data[_HEADER_SIZE_BYTES : _HEADER_SIZE_BYTES + size])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("its metadata is not a map of strings")
    return meta


def _parse(data: bytes) -> _Stored:
    """A checked generation: parses, has every metadata field, and its digest matches its tensors."""
    try:
        meta = _metadata(data)
        tensors = tensors_from_bytes(data)
    except Exception as err:  # anything the parser raises on these bytes means the file is not a valid one
        raise _UnusableFileError(f"it does not parse as safetensors: {type(err).__name__}: {str(err)[:200]}") from err
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise _UnusableFileError(
            f"its metadata lacks {', '.join(missing)} (not written by this store, or by an older version)"
        )
    if not _COUNT.fullmatch(meta[ROUND_META]) or not _COUNT.fullmatch(meta[STEPS_META]):
        raise _UnusableFileError(
            f"its round {meta[ROUND_META][:40]!r} or step count {meta[STEPS_META][:40]!r} is not a count"
        )
    if _seal(meta) != meta[SEAL_META]:
        raise _UnusableFileError("the digest of its metadata does not match (a field was changed)")
    if tensor_digest(tensors) != meta[DIGEST_META]:
        raise _UnusableFileError("the digest of its tensors does not match its metadata")
    state = PrivateState(tensors=tensors, round=int(meta[ROUND_META]), steps_total=int(meta[STEPS_META]))
    return _Stored(state, meta[SEAL_META], meta[PREV_META], (meta[RUN_KEY_META], meta[CLIENT_META]))


def _parse_head(data: bytes) -> _Head:
    """The head record: a JSON map of strings with every field, its seal matching."""
    try:
        record = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise _UnusableFileError(f"it is not JSON: {type(err).__name__}") from err
    if not isinstance(record, dict) or not all(isinstance(v, str) for v in record.values()):
        raise _UnusableFileError("it is not a map of strings")
    missing = [key for key in HEAD_FIELDS if key not in record]
    if missing:
        raise _UnusableFileError(f"it lacks {', '.join(missing)}")
    if _seal(record) != record[SEAL_META]:
        raise _UnusableFileError("its digest does not match (a field was changed)")
    if not _COUNT.fullmatch(record[ROUND_META]) or record[DONE_META] not in (DONE, STARTED):
        raise _UnusableFileError(
            f"its round {record[ROUND_META][:40]!r} or state {record[DONE_META][:40]!r} is invalid"
        )
    owner = (record[RUN_KEY_META], record[CLIENT_META])
    seals = (record[LATEST_META], record[PREV_META], record[REPLACES_META])
    return _Head(int(record[ROUND_META]), *seals, record[DONE_META] == DONE, owner)


def _atomic_write(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``name`` atomically: a fresh temp file (never through a link), fsync, rename, directory fsync."""
    tmp = f".{name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    _sync(dir_fd)


def _seal(meta: Mapping[str, str]) -> str:
    """SHA-256 over every metadata field but the seal itself, in a fixed order."""
    fields = {key: value for key, value in meta.items() if key != SEAL_META}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _set_aside(dir_fd: int, name: str) -> str:
    """Rename ``name`` to a ``.torn-<unix time>-<n>`` name no entry has yet (under the lock: no race)."""
    stamp = int(time.time())
    aside = next(a for n in itertools.count(1) if not _lexists(dir_fd, a := f"{name}{TORN_SUFFIX}{stamp}-{n}"))
    _rename(dir_fd, name, aside)
    return aside


def _rename(dir_fd: int, src: str, dst: str) -> None:
    os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # renames a link itself, never its target
    _sync(dir_fd)


def _lexists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _sync(dir_fd: int) -> None:
    """Make a rename in the directory durable (POSIX: the entry lives in the directory's inode)."""
    with contextlib.suppress(OSError):  # some filesystems (tmpfs variants, network mounts) refuse it
        os.fsync(dir_fd)
