"""ServerApp: compose the experiment, run common-only FedAvg, write the run directory."""

from __future__ import annotations

import logging
import random
import sys
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from pf2lora_core import data
from pf2lora_core.client import build_model
from pf2lora_core.constants import COMMON, METRICS_KEY, PRIVATE
from pf2lora_core.experiment import Experiment, load
from pf2lora_core.outputs import RunDir, new_run_dir
from pf2lora_core.plots import write_run_plots
from pf2lora_core.protocol import CLIENT_KEY, CONFIG_YAML_KEY, RUN_KEY
from pf2lora_core.runtime import seed_everything
from pf2lora_core.summary import build_summary, format_client_table
from server_app.strategy import CommonOnlyFedAvg

log = logging.getLogger("pf2lora.server")
app = ServerApp()


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s pf2lora %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    exp = load(str(context.run_config.get("overrides", "")))  # ConfigError before any work
    run = RunDir(new_run_dir(str(exp.cfg.output_dir), str(exp.cfg.name), str(exp.cfg.run_dir)))
    run.write_config(exp.to_yaml())
    log.info("run directory: %s", run.path.resolve())
    summary = run_experiment(grid, exp, run)
    print(format_client_table(summary), flush=True)
    log.info("results in %s", run.path.resolve())


def run_experiment(grid: Grid, exp: Experiment, run: RunDir) -> dict:
    """Run all rounds on ``grid`` and write summary and plots; returns the summary."""
    fed = exp.federation
    wait_for_nodes(grid, fed.num_clients, fed.wait_for_nodes_s)
    seed_everything(exp.seed)
    random.seed(exp.seed)  # FedAvg samples nodes with `random`
    model, _ = build_model(exp, device=_cpu())
    initial = model.export(COMMON)
    params = {level: model.num_parameters(level) for level in (COMMON, PRIVATE) if level in model.levels}
    del model
    strategy = CommonOnlyFedAvg(
        algorithm=exp.algorithm,
        run=run,
        num_clients=fed.num_clients,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_clients=fed.min_train_clients,
        max_update_norm=fed.max_update_norm,
        audit_replies=fed.audit_replies,
        eval_every=int(exp.cfg.eval_every),
        num_rounds=exp.rounds,
        metric=exp.task.metric,
    )
    shared = ConfigRecord({CONFIG_YAML_KEY: exp.to_yaml(), RUN_KEY: run.path.name})
    clients = identify_clients(grid, shared, fed.num_clients)
    t0 = time.time()
    strategy.start(
        grid=grid,
        initial_arrays=strategy.start_state(initial, clients),
        num_rounds=exp.rounds,
        train_config=shared,
        evaluate_config=ConfigRecord(dict(shared)),
    )
    seconds = time.time() - t0
    hists = data.partition_label_histograms(exp.task, exp.partition, fed.num_clients, exp.seed)
    summary = build_summary(exp, strategy.history, strategy.latest_eval, hists, params, seconds)
    run.write_summary(summary)
    write_run_plots(run, strategy.history, summary)
    return summary


def identify_clients(grid: Grid, shared: ConfigRecord, num_clients: int, timeout: float = 600) -> dict[int, int]:
    """Ask every connected node for its partition id (a QUERY message); node id -> client.

    The server needs the map to send each client its own downlink (per-client ranks, FlexLoRA's
    truncation) and to check that a reply comes from the client it claims to be.
    """
    nodes = sorted(grid.get_node_ids())
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord(dict(shared))}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in nodes
    ]
    clients: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to identify itself: {reply.error.reason}")
        clients[reply.metadata.src_node_id] = int(reply.content[METRICS_KEY][CLIENT_KEY])
    taken: dict[int, int] = {}
    for node, client in clients.items():
        if client in taken:
            raise RuntimeError(f"nodes {taken[client]} and {node} both have partition-id {client}")
        taken[client] = node
    missing = sorted(set(range(num_clients)) - set(taken))
    if missing or len(clients) != len(nodes):
        raise RuntimeError(f"clients {missing} did not identify themselves ({len(clients)}/{len(nodes)} nodes replied)")
    return clients


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> None:
    """Wait until ``expected`` nodes are connected; a clear error (not a hang) after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < expected:
        if time.time() > deadline:
            raise RuntimeError(
                f"{connected} SuperNode(s) connected after {timeout_s:.0f} s but federation.num_clients={expected}: "
                "start that many SuperNodes, or run the simulation with "
                '--federation-config "num-supernodes=<federation.num_clients>" (make demo does this)'
            )
        time.sleep(1.0)


def _cpu():
    import torch

    return torch.device("cpu")
