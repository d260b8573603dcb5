"""Nothing lost on disk: private-state generations checked on load, torn files set aside, replayed
rounds refused, per-directory lock; server checkpoints tried newest first; run directories never
reused by a fresh run."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pf2lora_core.config.keys import ARRAYS_KEY, CONFIG_FILE, METRICS_FILE
from pf2lora_core.federation.checkpoint import SERVER_STATE_DIR, history_path, load_latest
from pf2lora_core.federation.private_store import (
    HEAD_FILE,
    PREVIOUS_FILE,
    TORN_SUFFIX,
    PrivateState,
    PrivateStateLostError,
    PrivateStore,
    PrivateStoreError,
    StaleRoundError,
)
from pf2lora_core.federation.resume import load_resume
from pf2lora_core.run.run_dir import RunDirInUseError, new_run_dir, set_aside_run
from tests.federation.test_resume import (  # noqa: F401  (flower_task_identity is an autouse fixture)
    NODES,
    FakeGrid,
    experiment,
    flower_task_identity,
    run_fresh,
)


def two_generations(tmp_path: Path) -> PrivateStore:
    store = PrivateStore(tmp_path, "run", 0)
    store.save(PrivateState({"c": torch.full((3,), 1.0)}, round=1, steps_total=5))
    store.save(PrivateState({"c": torch.full((3,), 2.0)}, round=2, steps_total=10))
    return store


def test_torn_private_file_restores_the_previous_generation_and_says_so(tmp_path: Path, caplog: Any) -> None:
    store = two_generations(tmp_path)
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) // 2])  # torn: the process died mid-write (no atomic rename)
    with caplog.at_level(logging.WARNING, logger="pf2lora.client.state"):
        state = store.load()
    assert state is not None and state.round == 1 and torch.equal(state.tensors["c"], torch.full((3,), 1.0))
    assert f"private adapter file {store.path} is unreadable" in caplog.text and "previous generation" in caplog.text
    torn = [p.name for p in store.dir.iterdir() if TORN_SUFFIX in p.name]
    assert len(torn) == 1 and not store.path.exists()  # renamed aside, kept for inspection
    store.save(PrivateState({"c": torch.full((3,), 3.0)}, round=2, steps_total=10))  # round 2 again
    assert store.load().round == 2 and store.load(before_round=2).round == 1


def test_corrupted_private_file_fails_its_digest_and_is_set_aside(tmp_path: Path, caplog: Any) -> None:
    store = two_generations(tmp_path)
    data = bytearray(store.path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensor bytes: parses fine, digest does not match
    store.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pf2lora.client.state"):
        assert store.load().round == 1
    assert "digest of its tensors does not match" in caplog.text


def test_a_lower_round_never_overwrites_a_higher_one(tmp_path: Path) -> None:
    store = two_generations(tmp_path)
    with pytest.raises(StaleRoundError, match=r"holds round 2; not overwriting it with round 1.*move .*client_0"):
        store.save(PrivateState({"c": torch.zeros(3)}, round=1, steps_total=5))  # a replayed round 1
    assert store.load().round == 2 and torch.equal(store.load().tensors["c"], torch.full((3,), 2.0))
    assert store.load(before_round=2).round == 1 and (store.dir / PREVIOUS_FILE).exists()


def test_lost_private_state_after_round_1_is_an_error_unless_the_node_allows(tmp_path: Path, caplog: Any) -> None:
    store = PrivateStore(tmp_path, "run", 4)
    assert store.load_required(before_round=1, trained_before=0, allow_fresh=False) is None  # first round: fresh
    assert store.load_required(before_round=3, trained_before=0, allow_fresh=False) is None  # never sampled yet
    with pytest.raises(PrivateStateLostError, match=r"no usable private adapter in .*client_4.* round 2.*allow-fresh"):
        store.load_required(before_round=3, trained_before=2, allow_fresh=False)
    with caplog.at_level(logging.WARNING, logger="pf2lora.client.state"):
        assert store.load_required(before_round=3, trained_before=2, allow_fresh=True) is None
    assert "starting afresh as the node allows" in caplog.text


def test_store_operations_hold_the_directory_lock(tmp_path: Path) -> None:
    store = two_generations(tmp_path)
    done: list[float] = []

    def save_in_thread() -> None:
        PrivateStore(tmp_path, "run", 0).save(PrivateState({"c": torch.zeros(3)}, round=3, steps_total=15))
        done.append(time.monotonic())

    with store.locked():
        worker = threading.Thread(target=save_in_thread)
        worker.start()
        time.sleep(0.3)
        assert not done  # blocked on the lock held here
        released = time.monotonic()
    worker.join(5)
    assert done and done[0] >= released and store.load().round == 3


# ------------------------------------------------- private state under hostile contents (issue 27 (f))
STORE_LOG = "pf2lora.client.state"


def rewrite_meta(path: Path, **changes: str | None) -> None:
    """Rewrite a generation file with metadata fields changed (None: dropped), nothing else updated."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(path))
    for key, value in changes.items():
        meta.pop(key) if value is None else meta.__setitem__(key, value)
    save_file(tensors, str(path), metadata=meta)


def torn(store: PrivateStore) -> list[str]:
    return sorted(p.name for p in store.dir.iterdir() if TORN_SUFFIX in p.name)


def test_a_generation_without_its_digest_is_set_aside_not_loaded(tmp_path: Path, caplog: Any) -> None:
    store = two_generations(tmp_path)
    rewrite_meta(store.path, sha256=None)
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        state = store.load()
    assert state is not None and state.round == 1  # the previous generation, with a warning
    assert "lacks sha256" in caplog.text and torn(store) and not store.path.exists()


def test_an_edited_round_is_caught_by_the_metadata_digest(tmp_path: Path, caplog: Any) -> None:
    store = two_generations(tmp_path)
    rewrite_meta(store.path, round="3")  # tensors and their digest intact: only the metadata seal tells
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        assert store.load().round == 1
    assert "digest of its metadata does not match" in caplog.text


def test_a_store_file_linked_to_another_clients_is_never_followed(tmp_path: Path, caplog: Any) -> None:
    store, other = two_generations(tmp_path), PrivateStore(tmp_path, "run", 1)
    other.save(PrivateState({"c": torch.full((3,), 9.0)}, round=2, steps_total=10))
    before = other.path.read_bytes()
    store.path.unlink()
    store.path.symlink_to(other.path)
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        assert store.load().round == 1
    assert "symbolic link" in caplog.text and not store.path.exists()
    assert [p for p in store.dir.iterdir() if p.is_symlink()]  # the link itself set aside, its target untouched
    assert other.path.read_bytes() == before and other.load().round == 2


def test_a_linked_lock_is_refused_and_nothing_is_created_outside(tmp_path: Path) -> None:
    store = two_generations(tmp_path / "state")
    outside = tmp_path / "outside.txt"
    (store.dir / ".lock").unlink()
    (store.dir / ".lock").symlink_to(outside)
    for call in (store.load, lambda: store.save(PrivateState({"c": torch.zeros(3)}, 3, 15))):
        with pytest.raises(PrivateStoreError, match=r"\.lock is a symbolic link: remove it"):
            call()
    assert not outside.exists() and not outside.is_symlink()


def test_a_linked_store_directory_is_refused(tmp_path: Path) -> None:
    store, other = two_generations(tmp_path), PrivateStore(tmp_path, "run", 1)
    other.save(PrivateState({"c": torch.full((3,), 9.0)}, round=2, steps_total=10))
    store.dir.rename(tmp_path / "moved")
    store.dir.symlink_to(other.dir)
    with pytest.raises(PrivateStoreError, match=r"client_0 is a symbolic link or not a directory"):
        store.load()
    with pytest.raises(PrivateStoreError):
        store.save(PrivateState({"c": torch.zeros(3)}, 3, 15))
    assert other.load().round == 2 and not torn(other)


def test_a_far_future_round_on_disk_refuses_every_lower_save_loudly(tmp_path: Path) -> None:
    store = two_generations(tmp_path)
    store.save(PrivateState({"c": torch.full((3,), 7.0)}, round=10**6, steps_total=1))
    with pytest.raises(StaleRoundError, match=r"holds round 1000000; not overwriting it with round 3"):
        store.save(PrivateState({"c": torch.zeros(3)}, round=3, steps_total=15))
    with pytest.raises(StaleRoundError, match="holds round 1000000"):
        store.check_writable(3)  # what the train handler asks before any training
    assert store.load().round == 10**6  # nothing written


def test_torn_files_set_aside_in_the_same_second_keep_distinct_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    from pf2lora_core.federation import private_store

    monkeypatch.setattr(private_store, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.0))
    store = two_generations(tmp_path)
    contents = []
    for round_ in (3, 4):
        store.save(PrivateState({"c": torch.full((3,), float(round_))}, round=round_, steps_total=round_))
        contents.append(store.path.read_bytes()[:-4])
        store.path.write_bytes(contents[-1])  # torn, differently each time
        store.load()
    assert torn(store) == ["private.safetensors.torn-1700000000-1", "private.safetensors.torn-1700000000-2"]
    assert [(store.dir / name).read_bytes() for name in torn(store)] == contents  # the first not overwritten


@pytest.mark.parametrize("key", ["", ".", "..", "a/b", "/etc", "../up", "a\\b", "a\x00b", "new\nline", "x" * 201])
def test_a_run_key_must_be_one_path_component(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match=r"run key .* is not one safe path component") as err:
        PrivateStore(tmp_path, key, 0)
    assert repr(key)[:40] in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_run_keys_that_clean_to_one_name_keep_their_own_directories(tmp_path: Path) -> None:
    spaced, plain, dots = (PrivateStore(tmp_path, key, 0) for key in ("a b", "a_b", "..."))
    assert len({spaced.dir, plain.dir}) == 2 and plain.dir == tmp_path / "a_b" / "client_0"
    assert all(s.dir.parent.parent == tmp_path for s in (spaced, plain, dots))
    with pytest.raises(ValueError, match="not valid Unicode"):  # could not be recorded in a file's metadata
        PrivateStore(tmp_path, "\ud800", 0)


def test_a_foreign_generation_is_refused_with_or_without_the_head_record(tmp_path: Path, caplog: Any) -> None:
    store, other = two_generations(tmp_path), PrivateStore(tmp_path, "other-run", 0)
    other.save(PrivateState({"c": torch.full((3,), 9.0)}, round=2, steps_total=10))
    (store.dir / HEAD_FILE).unlink()  # the owner recorded in the file is checked on its own
    store.path.write_bytes(other.path.read_bytes())
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        state = store.load()
    assert state is not None and state.round == 1
    assert "belongs to run key 'other-run', client '0'" in caplog.text


def test_a_latest_swapped_for_an_older_generation_is_never_used_silently(tmp_path: Path, caplog: Any) -> None:
    """Found by the fuzz suite: the previous file copied over the latest, then the previous torn. The old
    copy alone looked like a first generation; the head record says which one the last save wrote."""
    store = two_generations(tmp_path)
    store.path.write_bytes(store.previous.read_bytes())
    store.previous.write_bytes(b"")
    for _ in range(2):  # every load says so, not just the first
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=STORE_LOG):
            assert store.load(before_round=3) is None
        assert "last saved in" in caplog.text and "(round 2) is lost" in caplog.text
    with pytest.raises(PrivateStateLostError):
        store.load_required(before_round=3, trained_before=2, allow_fresh=False)


def test_without_the_head_record_an_inconsistent_pair_raises(tmp_path: Path) -> None:
    store = two_generations(tmp_path)
    (store.dir / HEAD_FILE).unlink()
    store.path.write_bytes(store.previous.read_bytes())
    with pytest.raises(PrivateStoreError, match=r"does not follow .* no private.head.json to tell which is right"):
        store.load()


def test_a_removed_latest_is_reported_on_every_load(tmp_path: Path, caplog: Any) -> None:
    store = two_generations(tmp_path)
    store.path.unlink()
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=STORE_LOG):
            assert store.load().round == 1
        assert "(round 2) is lost; the newest left is round 1" in caplog.text


def test_a_fifo_in_place_of_a_generation_is_set_aside_without_blocking(tmp_path: Path, caplog: Any) -> None:
    store = two_generations(tmp_path)
    store.path.unlink()
    os.mkfifo(store.path)
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        assert store.load().round == 1
    assert "not a regular file" in caplog.text and not store.path.exists()


@pytest.mark.parametrize("crash_at", ["rotated", "written"])
def test_a_save_cut_short_is_no_false_alarm(tmp_path: Path, caplog: Any, crash_at: str) -> None:
    """A crash between the renames of a save (or before its head record is done) leaves a state that loads
    silently: the last completed save's generation, or the new one."""
    from pf2lora_core.federation import private_store

    store = two_generations(tmp_path)
    write = private_store._atomic_write

    def crash(dir_fd: int, name: str, data: bytes) -> None:
        if name == private_store.LATEST_FILE and crash_at == "rotated":
            raise KeyboardInterrupt  # the process dies after the rotation, before the new file
        write(dir_fd, name, data)
        if name == private_store.LATEST_FILE:
            raise KeyboardInterrupt  # ... or after it, before the head record is marked done

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(private_store, "_atomic_write", crash)
        with pytest.raises(KeyboardInterrupt):
            store.save(PrivateState({"c": torch.full((3,), 3.0)}, round=3, steps_total=15))
    with caplog.at_level(logging.WARNING, logger=STORE_LOG):
        assert store.load().round == (2 if crash_at == "rotated" else 3)
        assert store.load(before_round=3).round == 2
        store.save(PrivateState({"c": torch.full((3,), 3.0)}, round=3, steps_total=15))  # the round run again
        assert store.load().round == 3 and store.load(before_round=3).round == 2
    assert caplog.text == ""


def test_a_refused_save_makes_the_train_reply_an_error_before_any_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A far-future generation on disk: the client answers with an error and trains nothing, and its
    context.state is left as it was (no later round builds on a level it could not keep)."""
    import uuid
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    import client_app.app as client
    from pf2lora_core.federation.node_policy import CLIENT_FAILED, NodePolicy
    from pf2lora_core.federation.protocol import RUN_KEY

    store = two_generations(tmp_path)
    store.save(PrivateState({"c": torch.full((3,), 7.0)}, round=10**6, steps_total=1))
    trained: list[int] = []
    runtime = SimpleNamespace(has_private=True, train=lambda *args: trained.append(args[1]))
    monkeypatch.setattr(client, "_setup", lambda msg, ctx: (runtime, 0, store, NodePolicy(site=False), False))
    config = ConfigRecord({RUN_KEY: "run", client.SERVER_ROUND_KEY: 3})
    content = RecordDict({"config": config, ARRAYS_KEY: ArrayRecord({})})
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    context = Context(run_id=42, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = client.train(msg, context)
    # the server hears fixed words (issue 27 e); the store's own error stays in the SuperNode's log
    assert reply.has_error() and reply.error.code == CLIENT_FAILED
    assert reply.error.reason == "the client failed on train; the details are in that SuperNode's log"
    assert trained == [] and not context.state.array_records
    assert store.load().round == 10**6


# ------------------------------------------------------------------------------- server state
def test_torn_newest_checkpoint_resumes_from_the_one_before(tmp_path: Path, caplog: Any) -> None:
    exp = experiment("homlora", "rounds=2 federation.fraction_train=1.0")
    run_dir = tmp_path / "run"
    run_fresh(exp, new_run_dir("", "", str(run_dir)), FakeGrid(dict(NODES)))
    newest = run_dir / SERVER_STATE_DIR / "round_0002.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="pf2lora.server"):
        _, _, ckpt = load_resume(run_dir)
    assert ckpt.round == 1 and len(ckpt.history) == 1
    assert "resume: skipping checkpoint" in caplog.text and "round_0002.safetensors is unreadable" in caplog.text
    assert [json.loads(x)["round"] for x in (run_dir / METRICS_FILE).read_text().splitlines()] == [1]


def test_checkpoint_with_a_torn_history_file_falls_back(tmp_path: Path) -> None:
    exp = experiment("homlora", "rounds=2 federation.fraction_train=1.0")
    run_dir = new_run_dir("", "", str(tmp_path / "run"))
    run_fresh(exp, run_dir, FakeGrid(dict(NODES)))
    state_dir = run_dir / SERVER_STATE_DIR
    hist = history_path(state_dir / "round_0002.safetensors")
    hist.write_text(hist.read_text()[:-10])
    ckpt, skipped = load_latest(state_dir)
    assert ckpt is not None and ckpt.round == 1 and "does not match its checkpoint" in skipped[0]
    # the history is beside the checkpoint, not in its header: the header stays small as rounds grow
    assert (state_dir / "round_0002.safetensors").stat().st_size < 64_000


def test_fresh_run_into_a_used_run_dir_is_refused(tmp_path: Path) -> None:
    used = new_run_dir("", "", str(tmp_path / "run"))
    (used / CONFIG_FILE).write_text("name: first\n")
    with pytest.raises(RunDirInUseError, match=r"already holds a run.*resume="):
        new_run_dir("", "", str(used))
    other = tmp_path / "job"
    other.mkdir()
    (other / "job.json").write_text("{}")  # a sweep's own file is not a run
    assert new_run_dir("", "", str(other)) == other


def test_a_sweep_retry_sets_the_failed_attempt_aside(tmp_path: Path) -> None:
    job = new_run_dir("", "", str(tmp_path / "job"))
    (job / METRICS_FILE).write_text('{"round": 1}\n')
    aside = set_aside_run(job)
    assert aside is not None and (aside / METRICS_FILE).read_text() == '{"round": 1}\n'
    assert new_run_dir("", "", str(job)) == job  # the retry may now start there


def test_server_app_refuses_a_used_run_dir(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from pf2lora_core.config.schema import ConfigError
    from server_app.app import main

    used = new_run_dir("", "", str(tmp_path / "run"))
    (used / METRICS_FILE).write_text('{"round": 1}\n')

    class NoNodes:
        def get_node_ids(self) -> Any:
            raise AssertionError("waited for nodes")

    context = Context(0, 0, {}, RecordDict(), {"overrides": f"run_dir={used} federation.num_clients=2"})
    with pytest.raises(ConfigError, match="already holds a run"):
        main(NoNodes(), context)
    assert (used / METRICS_FILE).read_text() == '{"round": 1}\n'  # untouched


def test_evaluated_private_level_is_kept_apart_from_training_state(tmp_path: Path, caplog: Any) -> None:
    """``save_evaluated`` is never what training loads; ``load_evaluated`` is per round; a torn file is set aside."""
    store = PrivateStore(tmp_path, "run", 0)
    trained, evaluated = {"d": torch.zeros(2)}, {"d": torch.ones(2)}
    store.save(PrivateState(trained, round=3, steps_total=15))
    store.save_evaluated(PrivateState(evaluated, round=3, steps_total=15))
    assert torch.equal(store.load(before_round=4).tensors["d"], trained["d"])  # training reads its own level
    got = store.load_evaluated(3)
    assert got is not None and torch.equal(got.tensors["d"], evaluated["d"])
    assert store.load_evaluated(2) is None  # another round was not evaluated with this file
    with pytest.raises(StaleRoundError, match="holds round 3"):
        store.save_evaluated(PrivateState(trained, round=2, steps_total=10))  # a replayed older round
    path = store.dir / "private.evaluated.safetensors"
    path.write_bytes(path.read_bytes()[:20])  # torn
    with caplog.at_level("WARNING"):
        assert store.load_evaluated(3) is None
    assert "unreadable" in caplog.text and list(store.dir.glob("private.evaluated.safetensors.torn-*"))


def test_an_out_of_memory_error_frees_the_cache_and_says_what_to_lower(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 30: an OOM in a round left the allocator full, so every later round on that node failed
    the same way; the reply now names what to lower, after the cache is freed (the failed step's
    tensors released with the traceback first)."""
    import uuid

    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    import client_app.app as client
    from pf2lora_core.federation.node_policy import CLIENT_FAILED
    from pf2lora_core.training import runtime

    held: list[torch.Tensor] = []
    freed: list[int] = []

    def out_of_memory(msg: Message, context: Context) -> Message:
        held.append(torch.zeros(4))  # a tensor the failed step held, gone with the traceback
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runtime, "free_device_memory", lambda: freed.append(1))
    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    context = Context(run_id=42, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = client.guarded(out_of_memory)(msg, context)
    assert reply.has_error() and reply.error.code == CLIENT_FAILED and freed == [1]
    assert "out of GPU memory" in reply.error.reason and "task.batch_size" in reply.error.reason
    assert "2.00 GiB" not in reply.error.reason  # fixed words only, as for every failure

    def other(msg: Message, context: Context) -> Message:
        raise ValueError("boom")

    reply = client.guarded(other)(msg, context)
    assert reply.error.reason == client.FAILED_REASON.format(handler="other") and freed == [1]
