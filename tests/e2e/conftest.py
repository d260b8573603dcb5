"""The one `flwr run` the end-to-end tests share: its Flower start-up (SuperLink, SuperExec, Ray) is paid once.

One 2-round, 3-client run of a tiny BERT on the packaged Rotten Tomatoes data through
``python -m pf2lora_core.tools.launch demo`` (what `make demo` calls), with reply auditing and
TensorBoard tracking on. ``test_simulation`` reads its console and files; ``test_inprocess`` runs the
same experiment through the in-process engine and compares the numbers.
"""

from __future__ import annotations

import pytest

from tests.helpers.flower_run import E2E_CLIENTS, E2E_OVERRIDES, tiny_demo_run


@pytest.fixture(scope="session")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("sim")
    run_dir, log, mark = tiny_demo_run(tmp, E2E_OVERRIDES, clients=E2E_CLIENTS)
    return {"run": run_dir, "state": tmp / "state", "log": log, "mark": mark, "tmp": tmp}
