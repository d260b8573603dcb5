"""Nothing lost on disk: private-state generations checked on load, torn files set aside, replayed
rounds refused, per-directory lock; server checkpoints tried newest first; run directories never
reused by a fresh run."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pf2lora_core.config.keys import CONFIG_FILE, METRICS_FILE
from pf2lora_core.federation.checkpoint import SERVER_STATE_DIR, history_path, load_latest
from pf2lora_core.federation.private_store import (
    PREVIOUS_FILE,
    TORN_SUFFIX,
    PrivateState,
    PrivateStateLostError,
    PrivateStore,
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
    assert store.save(PrivateState({"c": torch.full((3,), 1.0)}, round=1, steps_total=5))
    assert store.save(PrivateState({"c": torch.full((3,), 2.0)}, round=2, steps_total=10))
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
    assert store.save(PrivateState({"c": torch.full((3,), 3.0)}, round=2, steps_total=10))  # round 2 again
    assert store.load().round == 2 and store.load(before_round=2).round == 1


def test_corrupted_private_file_fails_its_digest_and_is_set_aside(tmp_path: Path, caplog: Any) -> None:
    store = two_generations(tmp_path)
    data = bytearray(store.path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensor bytes: parses fine, digest does not match
    store.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pf2lora.client.state"):
        assert store.load().round == 1
    assert "digest of its tensors does not match" in caplog.text


def test_a_lower_round_never_overwrites_a_higher_one(tmp_path: Path, caplog: Any) -> None:
    store = two_generations(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pf2lora.client.state"):
        assert not store.save(PrivateState({"c": torch.zeros(3)}, round=1, steps_total=5))  # a replayed round 1
    assert store.load().round == 2 and torch.equal(store.load().tensors["c"], torch.full((3,), 2.0))
    assert store.load(before_round=2).round == 1 and (store.dir / PREVIOUS_FILE).exists()
    assert "not overwriting it with round 1" in caplog.text


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
    assert store.save_evaluated(PrivateState(evaluated, round=3, steps_total=15))
    assert torch.equal(store.load(before_round=4).tensors["d"], trained["d"])  # training reads its own level
    got = store.load_evaluated(3)
    assert got is not None and torch.equal(got.tensors["d"], evaluated["d"])
    assert store.load_evaluated(2) is None  # another round was not evaluated with this file
    assert not store.save_evaluated(PrivateState(trained, round=2, steps_total=10))  # a replayed older round
    path = store.dir / "private.evaluated.safetensors"
    path.write_bytes(path.read_bytes()[:20])  # torn
    with caplog.at_level("WARNING"):
        assert store.load_evaluated(3) is None
    assert "unreadable" in caplog.text and list(store.dir.glob("private.evaluated.safetensors.torn-*"))
