"""The end of a run (issue 28, item 1): every client evaluated at the final common adapter is the
headline, whatever fraction_evaluate sampled per round; each client's rounds trained is recorded, and
a client that never trained is marked so, not as having no data."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from pf2lora_core.config.keys import METRICS_FILE, SUMMARY_FILE
from pf2lora_core.run.records import Summary, read_metrics
from pf2lora_core.run.summary import format_client_table
from tests.helpers.flower_run import tiny_inprocess_run

CLIENTS = 6
# 1 of 6 clients trains per round (min 1) for 2 rounds: at least 4 clients never train; 1 of 6 is
# evaluated per round, so per-round evaluations alone would leave most clients out of the table
SPARSE = (
    "rounds=2 local_steps=1 federation.fraction_train=0.1 federation.min_train_clients=1 "
    "federation.fraction_evaluate=0.1 flops_rounds=0"
)


def test_every_client_is_evaluated_at_the_end_with_its_rounds_trained(tmp_path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir = tiny_inprocess_run(tmp_path, SPARSE, clients=CLIENTS)
    summary = Summary.read(run_dir / SUMMARY_FILE)
    history = read_metrics(run_dir / METRICS_FILE)
    assert [c.client for c in summary.clients] == list(range(CLIENTS))  # all of them, one evaluation each
    final = history[-1]
    assert sorted(final.clients) == list(range(CLIENTS))  # ... the final round's, so nothing mixes rounds
    assert summary.personalized.mean == final.kinds["personalized"].mean
    trained = {c: sum(1 for r in history if r.aggregated and c in r.train) for c in range(CLIENTS)}
    assert {c.client: c.rounds_trained for c in summary.clients} == trained
    never = [c for c in summary.clients if c.rounds_trained == 0]
    assert len(never) >= CLIENTS - 2 and all(c.num_train is None for c in never)
    raw = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert [c["rounds_trained"] for c in raw["clients"]] == [trained[c] for c in range(CLIENTS)]
    table = format_client_table(summary).splitlines()
    rows = [line.split() for line in table[3 : 3 + CLIENTS]]
    assert all(row[1] == "never" and row[2] == "-" for row in rows if int(row[0]) in {c.client for c in never})


def test_a_stated_sample_of_clients_is_evaluated_at_the_end(tmp_path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir = tiny_inprocess_run(tmp_path, f"{SPARSE} federation.final_eval_clients=2", clients=CLIENTS)
    summary = Summary.read(run_dir / SUMMARY_FILE)
    assert len(summary.clients) == 2
    assert sorted(read_metrics(run_dir / METRICS_FILE)[-1].clients) == [c.client for c in summary.clients]
