"""ServerApp: compose the experiment, run common-only FedAvg, write the run directory.

In deployment the server never loads client data: the label set comes from config
(``task.label_names`` / ``task.num_labels``) and label histograms only from sites that opt in.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid, ServerApp

from pf2lora_core import data
from pf2lora_core.config.experiment import Experiment, load, preflight, split_overrides
from pf2lora_core.config.keys import COMMON, PRIVATE
from pf2lora_core.config.schema import ConfigError, FederationConfig
from pf2lora_core.data.site import config_label_names
from pf2lora_core.data.sources import CLASSIFICATION
from pf2lora_core.federation.checkpoint import ServerCheckpoint
from pf2lora_core.federation.checks import resolved_federation
from pf2lora_core.federation.client_runtime import DEPLOYMENT, build_model
from pf2lora_core.federation.node_policy import LABEL_HISTOGRAM
from pf2lora_core.federation.protocol import CONFIG_YAML_KEY, RUN_KEY
from pf2lora_core.federation.resume import load_resume
from pf2lora_core.federation.server_run_dir import ServerRunDir
from pf2lora_core.run.console import quiet_libraries
from pf2lora_core.run.plots import write_run_plots
from pf2lora_core.run.records import Summary
from pf2lora_core.run.run_dir import RunDir, RunDirInUseError, new_run_dir
from pf2lora_core.run.summary import build_summary, format_client_table
from pf2lora_core.training.runtime import seed_everything
from server_app.strategy import CommonAdapterFedAvg, RoundPlan

log = logging.getLogger("pf2lora.server")
app = ServerApp()
quiet_libraries()  # at import: the simulation starts Ray (and its tip) beside this app's main


class ToFlowerLogger(logging.Handler):
    """Hands each record to Flower's logger: our lines take Flower's console format and go wherever
    Flower sends its own (the console of ``flwr run --stream``, ``flwr log``, Flower's log files)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FLOWER_LOGGER.isEnabledFor(record.levelno):  # Flower's own level applies to our lines too
            FLOWER_LOGGER.handle(record)


def _setup_logging() -> None:
    if not any(isinstance(h, ToFlowerLogger) for h in log.handlers):
        log.addHandler(ToFlowerLogger())
        log.setLevel(logging.INFO)
        log.propagate = False  # Flower's logger passes records on to the root itself


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context)


def serve(grid: Grid, context: Context) -> Path:
    """The ServerApp's work on ``grid``: compose, preflight, run every round, write the run directory.

    ``main`` (under ``flwr run``) and the in-process engine (``server_app.inprocess``) both call it;
    returns the run directory.
    """
    _setup_logging()
    overrides = str(context.run_config.get("overrides", ""))
    exp = load(overrides)  # ConfigError before any work
    checkpoint = None
    if str(exp.cfg.resume):
        exp, run, checkpoint = prepare_resume(str(exp.cfg.resume), overrides)
    found = preflight(exp)  # before any node is awaited or any directory is made: one clear error
    if checkpoint is None:
        try:
            run = RunDir(new_run_dir(str(exp.cfg.output_dir), str(exp.cfg.name), str(exp.cfg.run_dir)))
        except RunDirInUseError as err:
            raise ConfigError(f"invalid configuration: {err}") from None
        run.write_config(exp.to_yaml())
    log.info("run directory: %s", run.path.resolve())
    run = ServerRunDir(run.path, exp)  # tracking and PEFT-format adapters beside the run directory's files
    run.tracker.log_config(exp.to_yaml())
    try:
        summary = run_experiment(grid, exp, run, checkpoint, known_examples=found.sizes)
    finally:
        run.tracker.close()
    print(format_client_table(summary), flush=True)
    log.info("results in %s", run.path.resolve())
    return run.path


def prepare_resume(run_dir: str, overrides: str) -> tuple[Experiment, RunDir, ServerCheckpoint]:
    """The recorded experiment, run directory and latest checkpoint of a run to continue.

    The run continues with the config it recorded (its checkpoint holds it), so a resumed run is the
    same experiment; any other override given with ``resume`` is ignored, with a warning.
    metrics.jsonl keeps the rounds the checkpoint covers (a round that finished after its last
    checkpoint is run again).
    """
    try:
        exp, run, ckpt = load_resume(Path(run_dir))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"invalid configuration: resume: {err}") from None
    # federation.ray_address is the launch's (where Ray runs this time: pf2lora_core.tools.launch.simulation_env)
    kept = ("resume=", "+resume=", "++resume=", "federation.ray_address=")
    ignored = [o for o in split_overrides(overrides) if not o.startswith(kept)]
    if ignored:
        log.warning("resume: ignoring overrides %s; a resumed run keeps its recorded config", ignored)
    log.info("resuming %s after round %d of %d", run.path, ckpt.round, exp.rounds)
    return exp, run, ckpt


def run_experiment(
    grid: Grid,
    exp: Experiment,
    run: RunDir,
    checkpoint: ServerCheckpoint | None = None,
    known_examples: dict[int, tuple[int, int]] | None = None,
) -> Summary:
    """Run all rounds (after ``checkpoint``'s, when given) on ``grid``; write summary and plots.

    ``known_examples``: every client's (train, test) sizes where the server knows them
    (simulation; ``preflight`` computes them), which bound the clients' declared numbers.
    """
    fed = exp.federation
    deployment = fed.kind == DEPLOYMENT
    if deployment:  # the server holds no client data: the head's size comes from config (ConfigError now)
        config_label_names(exp.task)
    wait_for_nodes(grid, fed.num_clients, fed.wait_for_nodes_s)
    seed_everything(exp.seed)
    random.seed(exp.seed)  # the seeded global RNG (the strategy samples with its own, see NodeDirectory)
    model, _ = build_model(exp, device=_cpu())
    num_labels = int(getattr(model.model.config, "num_labels", 0)) if exp.task.kind == CLASSIFICATION else 0
    initial = model.export(COMMON)
    params = {level: model.num_parameters(level) for level in (COMMON, PRIVATE) if level in model.levels}
    del model
    fed = resolved_update_norm(exp, fed, params.get(COMMON, 0))
    plan = RoundPlan(exp.rounds, int(exp.cfg.eval_every), exp.task.metric, exp.seed, exp.to_yaml(), num_labels or None)
    strategy = CommonAdapterFedAvg(
        algorithm=exp.algorithm, run=run, federation=fed, plan=plan, known_examples=known_examples
    )
    shared = ConfigRecord({CONFIG_YAML_KEY: exp.to_yaml(), RUN_KEY: run.path.name})
    t0 = time.time()
    strategy.start_state(initial, {})  # nodes are identified when round 1 samples them
    first_round = 1
    if checkpoint is not None:
        strategy.restore(checkpoint)  # common adapter, algorithm state, history, sampler and RNGs
        first_round = checkpoint.round + 1
    strategy.start(
        grid, ArrayRecord(strategy.state), num_rounds=exp.rounds, timeout=fed.round_timeout_s,
        train_config=shared, first_round=first_round,
    )  # fmt: skip
    seconds = time.time() - t0 + strategy.elapsed_before
    hists = site_histograms(strategy.latest_eval, fed.num_clients) if deployment else pooled_histograms(exp)
    # the headline is the final evaluation alone: every client (or the stated sample) at the final
    # common adapter; the per-round evaluations of sampled clients stay in metrics.jsonl as curves
    if not strategy.final_eval:
        log.warning("no client answered the final evaluation: summary.json lists no client")
    summary = build_summary(exp, strategy.history, strategy.final_eval, hists, params, seconds)
    run.write_summary(summary)
    try:
        write_run_plots(run, strategy.history, summary)
    except Exception as err:  # the plots are a view of files already written: never lose the run over them
        log.warning(
            "plots not written (%s: %s); summary.json and metrics.jsonl hold every number", type(err).__name__, err
        )
    return summary


def resolved_update_norm(exp: Experiment, fed: FederationConfig, common_params: int) -> FederationConfig:
    """``federation.max_update_norm=auto`` as the number it means for this run (logged once)."""
    resolved = resolved_federation(fed, exp.algorithm, exp.local_steps, common_params)
    if resolved is fed:
        return fed
    log.info(
        "federation.max_update_norm=auto: %.4g (%d common parameters; 5x the honest norm measured on the "
        "default setting, scaled by lr x local steps x sqrt(common parameters))",
        resolved.max_update_norm, common_params,
    )  # fmt: skip
    return resolved


def pooled_histograms(exp: Experiment) -> list[dict[str, list[int]]]:
    """Simulation: every client's label histograms, from the pooled data this process can read."""
    return data.partition_label_histograms(exp.task, exp.partition, exp.federation.num_clients, exp.seed)


def site_histograms(latest_eval: dict[int, dict], num_clients: int) -> list[dict[str, list[int]] | None]:
    """Deployment: the label histograms that sites chose to report (``share-data-stats``), else None."""
    return [latest_eval.get(c, {}).get(LABEL_HISTOGRAM) for c in range(num_clients)]


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
