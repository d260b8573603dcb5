"""PF2LoRA fits its private level to one common adapter once (issue 29, item 2): the re-fit an
evaluation made is where the next round's training starts, at that same common adapter."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from pf2lora_core.config.keys import GRADIENT_PASSES, METRICS_FILE
from pf2lora_core.run.records import read_metrics
from tests.helpers.flower_run import tiny_inprocess_run

K = 2  # local_steps, and J = refit_steps (pf2lora_exact's); a forward-difference bilevel step is 3 passes


@pytest.mark.parametrize(
    ("eval_every", "refits", "initial"),
    [
        (1, {1: K, 2: 0, 3: 0}, "true"),
        (2, {1: K, 2: K, 3: 0}, "true"),
        (2, {1: 0, 2: K, 3: 0}, "false"),  # the default: round 1 starts from the private initialization
    ],
)
def test_training_reuses_the_refit_of_the_evaluation_at_the_same_common_adapter(
    tmp_path: Path, eval_every: int, refits: dict[int, int], initial: str
) -> None:
    """Round r + 1 skips its re-fit exactly when round r was evaluated (its evaluation re-fitted the
    private level to the common adapter round r + 1 trains from); rounds after an unevaluated one
    re-fit, and round 1 re-fits the initialization only with ``refit_initial`` (pf2lora_exact's)."""
    overrides = (
        f"algorithm=pf2lora_exact algorithm.refit_initial={initial} rounds=3 local_steps={K} "
        f"eval_every={eval_every} flops_rounds=0"
    )
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir = tiny_inprocess_run(tmp_path, overrides, clients=2)
    for record in read_metrics(run_dir / METRICS_FILE):
        for client, metrics in record.train.items():
            assert metrics[GRADIENT_PASSES] == refits[record.round] + 3 * K, (record.round, client)
