"""Simulated availability (issue 28, item 2): a sampled client misses a training round at
``federation.dropout_rate``, seeded; the server records it as missing, the round goes on with the
others, and the dropped client's private level stays as it was."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import METRICS_FILE, SUMMARY_FILE
from pf2lora_core.config.schema import ConfigError
from pf2lora_core.federation.availability import drops_out
from pf2lora_core.federation.private_store import PrivateStore
from pf2lora_core.run.records import Summary, read_metrics
from tests.helpers.flower_run import tiny_inprocess_run

CLIENTS, ROUNDS, RATE, SEED = 4, 3, 0.5, 3


def test_the_draw_is_seeded_independent_and_at_the_rate() -> None:
    pairs = [(c, r) for c in range(100) for r in range(1, 41)]
    draws = [drops_out(0, c, r, 0.3) for c, r in pairs]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03  # 4000 draws: 4.6 standard errors
    assert draws == [drops_out(0, c, r, 0.3) for c, r in pairs]  # the same on a resumed run
    assert draws != [drops_out(1, c, r, 0.3) for c, r in pairs]  # another seed, other clients
    assert not any(drops_out(0, c, r, 0.0) for c, r in pairs)


def test_a_dropout_rate_outside_simulation_or_range_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"federation.dropout_rate.*\[0, 1\)"):
        load(["federation.dropout_rate=1.0"])
    with pytest.raises(ConfigError, match=r"federation.dropout_rate.*simulations only"):
        load(["federation=deployment", "federation.dropout_rate=0.1"])


def test_dropped_clients_are_missing_and_keep_their_private_level(tmp_path: Path) -> None:
    dropped = {r: {c for c in range(CLIENTS) if drops_out(SEED, c, r, RATE)} for r in range(1, ROUNDS + 1)}
    assert all(len(d) < CLIENTS for d in dropped.values()) and any(dropped.values())  # (the seed's draws)
    overrides = (
        f"algorithm=pf2lora rounds={ROUNDS} local_steps=1 seed={SEED} federation.dropout_rate={RATE} "
        "federation.min_train_clients=1 eval_every=10 flops_rounds=0"
    )
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir = tiny_inprocess_run(tmp_path, overrides, clients=CLIENTS)
    history = read_metrics(run_dir / METRICS_FILE)
    for record in history:
        gone = dropped[record.round]
        assert sorted(record.train) == sorted(set(range(CLIENTS)) - gone)
        assert record.rejected == []
        missing = [m for m in record.missing if m["phase"] == "training"]
        assert sorted(int(m["client"].split()[1]) for m in missing) == sorted(gone)
        assert all("simulated drop-out, federation.dropout_rate=0.5" in m["reason"] for m in missing)
    summary = Summary.read(run_dir / SUMMARY_FILE)
    assert len(summary.clients) == CLIENTS  # the final evaluation is never dropped
    for c in summary.clients:
        trained = [r for r in range(1, ROUNDS + 1) if c.client not in dropped[r]]
        assert c.rounds_trained == len(trained)
        stored = PrivateStore(tmp_path / "state", run_dir.name, c.client).load()
        # the private level on disk is the one of the last round the client trained (0: never saved)
        assert (stored.round if stored else 0) == max(trained, default=0)
