"""A client's private-state directory under arbitrary contents (issue 27 (f)).

Each example builds a fresh state root holding this client's store and two others (another client
of the same run, another run), then interleaves saves with what a crash, a bad disk or a hostile
neighbour can leave in the store directory: truncated files, random bytes, flipped bits, missing
metadata fields (the digest among them), symbolic links to other stores' files, copies of foreign
files, a far-future generation, the latest swapped for the previous one, removed files, FIFOs,
directories, and a linked lock file or store directory. The set-aside clock is frozen, so every
file set aside in one example shares its second. After every step the invariants stated in
``pf2lora_core/federation/private_store.py`` are checked:

* ``load`` returns None or one of this store's own generations (never another store's), with a
  verified digest; a generation older than the newest one saved is only ever returned with a
  warning in that very call; with nothing reported since the last save it is the newest one.
* ``save`` writes, or raises ``PrivateStoreError`` (``StaleRoundError`` for a lower round); right
  after a save, ``load`` returns exactly what it wrote, silently.
* no store call creates, changes or removes anything outside the store directory, and no
  set-aside file is ever overwritten; every warning that moves a file leaves a new set-aside file.
* a run key is one directory below the state root, or refused with a ValueError naming it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes

from pf2lora_core.federation import private_store as ps
from pf2lora_core.federation.private_store import (
    EVALUATED_FILE,
    HEAD_FIELDS,
    HEAD_FILE,
    LATEST_FILE,
    LOCK_FILE,
    PREVIOUS_FILE,
    REQUIRED_META,
    TORN_SUFFIX,
    PrivateState,
    PrivateStore,
    PrivateStoreError,
    StaleRoundError,
    tensor_digest,
)

RUN = "run"
CLIENT = 0
FUTURE_ROUND = 10**6
FROZEN_TIME = SimpleNamespace(time=lambda: 1_700_000_000.0)  # every set-aside of an example in one second
GENERATIONS = (LATEST_FILE, PREVIOUS_FILE)
MOVED = "moved to"  # the set-aside warning
WARNING_KINDS = {MOVED: "file set aside", "is lost": "last saved generation lost", "no head record": "no head record"}
MAX_STEPS = 6

Snapshot = dict[str, tuple[str, bytes]]


# ------------------------------------------------------------------------------- the world
@dataclass
class World:
    """One example's state root, this client's store, and what the checks compare against."""

    tmp: Path
    store: PrivateStore
    foreign: list[Path]  # intact files of other stores (another client, another run)
    own_future: Path  # an intact file of this run and client, round FUTURE_ROUND, written under another root
    outside: Path  # nothing may ever appear here
    saved: dict[str, int] = field(default_factory=dict)  # digest -> round, of every generation this store saved
    newest: PrivateState | None = None  # the last generation saved
    model: list[PrivateState] = field(default_factory=list)  # [latest, previous] while nothing was tampered with
    tampered: bool = False
    degraded: bool = False  # the store reported something (warning or error) since the last save
    counter: int = 0

    def next_state(self, round_: int) -> PrivateState:
        self.counter += 1  # every generation's tensors are distinct: a digest names one generation
        return PrivateState({"c": torch.full((3,), float(self.counter)), "d": torch.arange(2.0)}, round_, self.counter)


OTHERS = ((RUN, 1), ("other-run", CLIENT))  # another client of this run, this client id in another run
FUTURE = PrivateState({"c": torch.full((3,), -99.0)}, FUTURE_ROUND, FUTURE_ROUND)
FUTURE_DIGEST = tensor_digest(FUTURE.tensors)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The other stores' files and the far-future file, written once; each example gets a copy."""
    tmp = tmp_path_factory.mktemp("private-store")
    for run, client in OTHERS:
        other = PrivateStore(tmp / "state", run, client)
        for round_ in (1, 2):
            other.save(PrivateState({"c": torch.full((3,), -float(round_ + 10 * client))}, round_, round_))
    PrivateStore(tmp / "elsewhere", RUN, CLIENT).save(FUTURE)
    (tmp / "outside").mkdir()
    return tmp


@contextmanager
def world(template: Path, prefix: tuple[int, ...] = ()) -> Iterator[World]:
    """A fresh copy of ``template``, this client's store holding the generations of rounds ``prefix``."""
    with tempfile.TemporaryDirectory() as tmp_name, mock.patch.object(ps, "time", FROZEN_TIME):
        tmp = Path(tmp_name) / "w"
        shutil.copytree(template, tmp, symlinks=True)
        others = [PrivateStore(tmp / "state", run, client) for run, client in OTHERS]
        foreign = [path for other in others for path in (other.path, other.previous)]
        own_future = PrivateStore(tmp / "elsewhere", RUN, CLIENT).path
        w = World(tmp, PrivateStore(tmp / "state", RUN, CLIENT), foreign, own_future, tmp / "outside" / "x")
        for round_ in prefix:
            save(w, round_)
        yield w


# ------------------------------------------------------------------------------- observing a call
@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None
    warnings: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def snapshot(top: Path, skip: Path | None = None) -> Snapshot:
    """Every entry under ``top`` (not following links): kind and content."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if skip is not None and path == skip:
                continue
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path).encode())
            elif path.is_file():
                out[str(path)] = ("file", path.read_bytes())
            else:
                out[str(path)] = ("dir" if path.is_dir() else "other", b"")
        dirnames[:] = [d for d in dirnames if skip is None or Path(dirpath) / d != skip]
    return out


def set_aside(w: World) -> Snapshot:
    if w.store.dir.is_symlink() or not w.store.dir.is_dir():
        return {}
    return {k: v for k, v in snapshot(w.store.dir).items() if TORN_SUFFIX in Path(k).name}


def call(w: World, fn: Callable[[], Any]) -> Outcome:
    """Run one store call; check nothing outside the store changed and no set-aside file was lost."""
    outside, aside = snapshot(w.tmp, skip=w.store.dir), set_aside(w)
    handler, out = _Collect(), Outcome()
    logger = logging.getLogger("pf2lora.client.state")
    logger.addHandler(handler)
    try:
        out.value = fn()
    except PrivateStoreError as err:
        assert str(err), "an error must say what is wrong"
        out.error = err
    finally:
        logger.removeHandler(handler)
    out.warnings = handler.messages
    event(type(out.error).__name__ if out.error is not None else "returned")
    for message in out.warnings:
        event("warning: " + next((kind for key, kind in WARNING_KINDS.items() if key in message), "other"))
    assert snapshot(w.tmp, skip=w.store.dir) == outside, "a store call touched something outside its directory"
    assert not w.outside.exists()
    after = set_aside(w)
    assert all(after.get(k) == v for k, v in aside.items()), "a set-aside file was overwritten or removed"
    assert len(after) - len(aside) == sum(MOVED in m for m in out.warnings), (after.keys(), out.warnings)
    if out.error is not None or out.warnings:
        w.degraded = True
    return out


# ------------------------------------------------------------------------------- the checks
def check_load(w: World, before: int | None) -> None:
    out = call(w, lambda: w.store.load(before_round=before))
    if out.error is not None:
        return  # raised loudly: allowed
    state: PrivateState | None = out.value
    newest = w.newest
    expects_newest = newest is not None and (before is None or newest.round < before)
    if state is not None:
        digest = tensor_digest(state.tensors)
        if digest == FUTURE_DIGEST:  # this client's own file, but from another history: never silently
            assert out.warnings and state.round == FUTURE_ROUND, out.warnings
        else:
            assert w.saved.get(digest) == state.round, f"load returned a generation this store never saved: {state}"
        assert before is None or state.round < before
        if expects_newest and digest != tensor_digest(newest.tensors) and state.round <= newest.round:
            assert out.warnings, f"silently returned round {state.round} after round {newest.round} was saved"
    elif expects_newest:
        assert w.degraded, f"silently lost round {newest.round}"
    if not w.tampered:  # nothing but saves happened: exactly the model's answer
        picked = next((g for g in w.model if before is None or g.round < before), None)
        assert (state is None) == (picked is None) and not out.warnings
        assert state is None or tensor_digest(state.tensors) == tensor_digest(picked.tensors)


def check_all_loads(w: World) -> None:
    check_load(w, None)
    if w.newest is not None:
        check_load(w, w.newest.round + 1)  # the next round's training
        check_load(w, w.newest.round)  # the newest round run again


def save(w: World, round_: int) -> None:
    state = w.next_state(round_)
    out = call(w, lambda: w.store.save(state))
    stale = w.newest is not None and w.newest.round > round_
    event("save of a lower round" if stale else "save")
    if not w.tampered:
        assert isinstance(out.error, StaleRoundError) if stale else out.error is None, out.error
    elif not w.degraded and not stale:
        assert not isinstance(out.error, StaleRoundError), out.error
    if out.error is not None:
        return
    w.saved[tensor_digest(state.tensors)] = round_
    w.newest, w.degraded = state, False
    w.model = [state] + (w.model[:1] if w.model and w.model[0].round < round_ else w.model[1:2])
    loaded = call(w, lambda: w.store.load())
    assert loaded.error is None and not loaded.warnings, (loaded.error, loaded.warnings)
    assert loaded.value is not None and tensor_digest(loaded.value.tensors) == tensor_digest(state.tensors)


# ------------------------------------------------------------------------------- what a disk can hold
def replace(path: Path, make: Callable[[Path], None]) -> None:
    if path.is_symlink() or path.is_file() or path.is_fifo():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    make(path)


def rewritten(data: bytes, key: str, value: str | None) -> bytes | None:
    """The same file with field ``key`` set to ``value`` or dropped (None: it does not parse).

    Nothing else is updated: a hand-edited or bit-rotted header, not one the store wrote.
    """
    try:
        if data.startswith(b"{"):  # the head record
            record = json.loads(data)
            return json.dumps(edited(record, key, value)).encode()
        size = int.from_bytes(data[:8], "little")
        meta = dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})
        return tensors_to_bytes(tensors_from_bytes(data), metadata=edited(meta, key, value))
    except Exception:
        return None


def edited(fields: dict[str, str], key: str, value: str | None) -> dict[str, str]:
    if value is None:
        fields.pop(key, None)
    else:
        fields[key] = value
    return fields


def tamper(w: World, op: tuple) -> None:
    kind, target, arg = op
    event(f"tamper: {kind}")
    path = w.store.dir / target
    if not w.store.dir.is_dir() or w.store.dir.is_symlink():
        return  # the directory itself is already a link: every call raises from now on
    regular = path.is_file() and not path.is_symlink()
    if kind == "truncate" and regular:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * arg)])
    elif kind == "garbage":
        replace(path, lambda p: p.write_bytes(arg))
    elif kind == "flip" and regular and path.stat().st_size:
        data = bytearray(path.read_bytes())
        where, xor = arg
        data[where % len(data) if where >= 0 else max(len(data) + where, 0)] ^= xor  # < 0: the tensor bytes
        path.write_bytes(bytes(data))
    elif kind == "edit" and regular and (data := rewritten(path.read_bytes(), *arg)) is not None:
        path.write_bytes(data)
    elif kind == "link":
        targets = [*w.foreign, w.store.dir / PREVIOUS_FILE, w.outside]
        replace(path, lambda p: p.symlink_to(targets[arg % len(targets)]))
    elif kind == "foreign":
        sources = [f.with_name(HEAD_FILE) for f in w.foreign] if target == HEAD_FILE else w.foreign
        replace(path, lambda p: shutil.copyfile(sources[arg % len(sources)], p))
    elif kind == "future" and target != HEAD_FILE:  # this client's own file of a far-future round, another history
        replace(path, lambda p: shutil.copyfile(w.own_future, p))
    elif kind == "rollback" and (w.store.dir / PREVIOUS_FILE).is_file():
        replace(w.store.dir / LATEST_FILE, lambda p: shutil.copyfile(w.store.dir / PREVIOUS_FILE, p))
    elif kind == "delete" and os.path.lexists(path):
        replace(path, lambda p: None)
        w.degraded = True  # a removal leaves nothing for the store to notice
    elif kind == "fifo":
        replace(path, os.mkfifo)
    elif kind == "directory":
        replace(path, lambda p: (p.mkdir(), (p / "x").write_bytes(b"x")))
    elif kind == "lock_link":
        replace(w.store.dir / LOCK_FILE, lambda p: p.symlink_to(w.outside))
    elif kind == "dir_link":
        w.store.dir.rename(w.store.dir.with_name("moved_away"))
        w.store.dir.symlink_to(w.foreign[0].parent)
    else:
        return  # nothing to do to what is there
    w.tampered = True


TARGET = st.sampled_from((*GENERATIONS, HEAD_FILE))
FLIP = st.tuples(st.integers(-24, -1) | st.integers(0, 4096), st.integers(1, 255))  # (where, xor)
# a field of a generation or of the head record dropped (the digest among them) or changed to a plausible value
META_EDIT = st.tuples(
    st.sampled_from(sorted({*REQUIRED_META, *HEAD_FIELDS})),
    st.none() | st.sampled_from(["", "0", "1", "3", "7", RUN, "a" * 64, "done", "started"]),
)
TAMPER = st.one_of(
    st.tuples(st.just("truncate"), TARGET, st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("garbage"), TARGET, st.binary(max_size=64)),
    st.tuples(st.just("flip"), TARGET, FLIP),
    st.tuples(st.just("edit"), TARGET, META_EDIT),
    st.tuples(st.just("link"), TARGET, st.integers(0, 5)),
    st.tuples(st.just("foreign"), TARGET, st.integers(0, 3)),
    st.tuples(st.just("future"), TARGET, st.none()),
    st.tuples(st.just("rollback"), st.just(LATEST_FILE), st.none()),
    st.tuples(st.just("delete"), TARGET, st.none()),
    st.tuples(st.just("fifo"), TARGET, st.none()),
    st.tuples(st.just("directory"), TARGET, st.none()),
    st.tuples(st.just("lock_link"), st.just(LOCK_FILE), st.none()),
    st.tuples(st.sampled_from(["fifo", "directory"]), st.just(LOCK_FILE), st.none()),
    st.tuples(st.just("dir_link"), st.just(""), st.none()),
)
ROUND = st.integers(0, 8) | st.just(FUTURE_ROUND)
STEP = st.tuples(st.none() | ROUND, st.lists(TAMPER, max_size=2))
PREFIX = st.sampled_from([(), (1,), (1, 2), (2, 3), (1, 4)])  # the saves an example starts from


@given(prefix=PREFIX, steps=st.lists(STEP, min_size=1, max_size=MAX_STEPS))
def test_load_never_rolls_back_silently_and_nothing_leaves_the_store(
    template: Path, prefix: tuple[int, ...], steps: list[tuple]
) -> None:
    with world(template, prefix) as w:
        for round_, ops in steps:
            if round_ is not None:
                save(w, round_)
            for op in ops:
                tamper(w, op)
            check_all_loads(w)
            event(f"the store {'was tampered with' if w.tampered else 'only saved'}")


# ------------------------------------------------------------------------------- the evaluated level
EVAL_TAMPER = st.one_of(
    st.tuples(st.just("truncate"), st.just(EVALUATED_FILE), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.just(EVALUATED_FILE), FLIP),
    st.tuples(st.just("edit"), st.just(EVALUATED_FILE), META_EDIT),
    st.tuples(st.just("link"), st.just(EVALUATED_FILE), st.integers(0, 5)),
    st.tuples(st.just("foreign"), st.just(EVALUATED_FILE), st.integers(0, 3)),
    st.tuples(st.just("fifo"), st.just(EVALUATED_FILE), st.none()),
)


@given(steps=st.lists(st.tuples(st.none() | ROUND, st.none() | EVAL_TAMPER), min_size=1, max_size=MAX_STEPS))
def test_evaluated_level_is_this_clients_and_of_the_asked_round(template: Path, steps: list[tuple]) -> None:
    with world(template) as w:
        evaluated: dict[str, int] = {}
        last: PrivateState | None = None
        for round_, op in steps:
            if round_ is not None:
                state = w.next_state(round_)
                out = call(w, lambda state=state: w.store.save_evaluated(state))
                if last is not None and last.round > round_ and not w.tampered:
                    assert isinstance(out.error, StaleRoundError), out.error
                if out.error is None:
                    evaluated[tensor_digest(state.tensors)], last, w.degraded = round_, state, False
            if op is not None:
                tamper(w, op)
            for asked in {0, 1, FUTURE_ROUND} | ({last.round} if last else set()):
                got = call(w, lambda asked=asked: w.store.load_evaluated(asked))
                assert got.error is None, got.error  # one file: anything wrong with it is set aside
                if got.value is not None:
                    assert evaluated.get(tensor_digest(got.value.tensors)) == asked == got.value.round
                elif last is not None and last.round == asked:
                    assert w.degraded, f"the level evaluated in round {asked} silently lost"


# ------------------------------------------------------------------------------- run keys
BAD_KEYS = ["", ".", "..", "a/b", "/etc", "../x", "a\\b", "a\x00b", "\n", "x" * 201, "\ud800"]


@given(key=st.text(max_size=230) | st.sampled_from(BAD_KEYS), client=st.integers(0, 10**6) | st.text(max_size=20))
def test_a_run_key_is_one_directory_below_the_root_or_refused(key: str, client: int | str) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        root = Path(tmp_name) / "state"
        try:
            store = PrivateStore(root, key, client)
        except ValueError as err:
            assert ("run key" in str(err) and repr(key)[:40] in str(err)) or "client id" in str(err), err
            return
        assert store.dir.parent.parent == root and store.dir.parent.name not in (".", "..")
        state = PrivateState({"c": torch.ones(2)}, 1, 1)
        store.save(state)
        created = [Path(p) for p in snapshot(Path(tmp_name))]
        assert all(p in (root, store.dir.parent) or store.dir in (p, *p.parents) for p in created), created
        loaded = store.load()
        assert loaded is not None and torch.equal(loaded.tensors["c"], state.tensors["c"])
