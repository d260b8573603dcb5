"""Typed schema of the experiment configuration.

The *values* live in one place, the Hydra tree under ``conf/`` (each number documented there
with its reason). These dataclasses are the schema only: every field is required, so a key
missing from ``conf/`` or an unknown key is an error, and ``parse`` turns a composed
``DictConfig`` into typed objects once, at the edge, validating values with a clear message.

Algorithm-specific options are validated by the algorithm's own ``Params`` dataclass (see
``pf2lora_core.algorithms``), so adding an algorithm never touches this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and what to fix."""


AUTO_NORM = "auto"  # federation.max_update_norm scaled to the run (federation.checks.auto_update_norm)


@dataclass
class TaskConfig:
    kind: str = MISSING  # classification | causal_lm
    source: str = MISSING  # packaged | hub | files
    name: str = MISSING  # packaged/hub dataset name (e.g. rotten_tomatoes, glue/sst2, e2e_nlg)
    data_files: dict[str, str] = field(default_factory=dict)  # files source: split -> path
    # classification: one (single) or two (pair) text columns; causal_lm: [input, target]
    text_columns: list[str] = field(default_factory=list)
    label_column: str = MISSING  # causal_lm: optional ("" = none), used by label-skewed partitions
    label_names: list[str] = field(default_factory=list)  # optional: fixes the label order
    # deployment (the server holds no data): the head's size when label_names is empty (ids 0..K-1).
    # Defaults to 0 (= from label_names or the data) so task files that predate it stay valid.
    num_labels: int = 0
    metric: str = MISSING  # accuracy | matthews_correlation; causal_lm: perplexity | bleu | rouge_l | meteor
    max_length: int = MISSING
    max_examples: int = MISSING  # subset of the pooled data before partitioning (0 = all)
    test_fraction: float = MISSING  # of each client's partition
    val_fraction: float = MISSING  # of each client's partition, carved out of what test leaves
    batch_size: int = MISSING
    eval_batch_size: int = MISSING


@dataclass
class ModelConfig:
    source: str = MISSING  # packaged | hub | path
    name: str = MISSING  # packaged name, hub id or local path
    target_modules: list[str] = field(default_factory=list)
    head_level: str = MISSING  # common | private
    head_modules: list[str] = field(default_factory=list)  # empty: modules not in the checkpoint
    pooling: str = MISSING  # classification: what the head reads, mean (over real tokens) | native
    cache_dir: str = MISSING  # converted packaged models (GGUF -> safetensors); "" = ~/.cache/pf2lora
    revision: str = ""  # hub: the commit to load (pin it; a site refuses an unpinned hub model)


@dataclass
class PartitionConfig:
    kind: str = MISSING  # s_split | dirichlet | pathological | iid
    s: float = MISSING  # s_split: fraction of each label dealt label-sorted
    alpha: float = MISSING  # dirichlet concentration
    classes_per_partition: int = MISSING  # pathological
    min_partition_size: int = MISSING  # dirichlet: resample until every client has this many
    by: str = MISSING  # natural: the column whose values are the natural ids (e.g. movie_name)
    ids_per_client: int = MISSING  # natural: natural ids (e.g. movies) dealt to each client


@dataclass
class FederationConfig:
    kind: str = MISSING  # simulation | deployment
    # deployment: the SuperLink connection named in $FLWR_HOME/config.toml (`flwr run . <connection>`)
    connection: str = MISSING
    num_clients: int = MISSING
    fraction_train: float = MISSING
    fraction_evaluate: float = MISSING
    min_train_clients: int = MISSING
    client_cpus: int = MISSING  # Flower takes whole CPUs per ClientApp
    client_gpus: float = MISSING
    # simulation: "" = a local Ray of this run's own; "auto" or the head's host:port = join that Ray cluster
    ray_address: str = MISSING
    state_dir: str = MISSING  # where clients mirror their private state
    # reject replies whose update norm exceeds this: a number (0 = off) or "auto" (federation.checks.auto_update_norm)
    max_update_norm: Any = MISSING
    wait_for_nodes_s: float = MISSING  # how long the server waits for num_clients nodes
    audit_replies: bool = MISSING  # keep every reply the server receives under <run_dir>/audit/
    round_timeout_s: float = MISSING  # a round's train (and evaluate) replies are awaited this long
    query_timeout_s: float = MISSING  # a node's identity (QUERY) reply is awaited this long (at most round_timeout_s)
    # weights the server can trust: num-examples above this (or above what the client holds) is a mismatch
    max_num_examples: int = MISSING
    num_examples_mismatch: str = MISSING  # clip | reject
    update_norm_action: str = MISSING  # reject | clip: an update beyond max_update_norm
    aggregator: str = MISSING  # mean | median | trimmed_mean (robust rules: algorithms that average)
    trim_fraction: float = MISSING  # trimmed_mean: fraction cut at each end per coordinate
    max_failed_rounds: int = MISSING  # consecutive rounds in which every client failed before the run stops
    final_eval_clients: int = MISSING  # clients evaluated at the final common adapter, the headline (0 = all)
    dropout_rate: float = MISSING  # simulation: P(a sampled client does not answer a training round)
    node_keys: dict[str, int] = field(default_factory=dict)  # SuperNode public key (or its SHA-256) -> partition id
    rebind_clients: bool = MISSING  # a new node may take over an offline node's client id (no node auth)


@dataclass
class GenerationConfig:
    """Decoding and metrics of causal-LM evaluation (ignored by classification tasks)."""

    max_new_tokens: int = MISSING
    num_beams: int = MISSING  # 1 = greedy
    batch_size: int = MISSING  # prompts decoded together (left-padded)
    metrics: list[str] = field(default_factory=list)  # any of bleu, rouge_l, meteor (perplexity always)


@dataclass
class SweepConfig:
    job_timeout_s: float = MISSING  # a job (one `flwr run`) running longer is recorded as failed
    report_x: str = MISSING  # swept key on the report's x axis ("" = partition.s when swept)
    report_at: str = MISSING  # x value of the per-client / per-round / spectra plots ("" = largest)
    seeds: list[int] = MISSING  # each job runs every seed here (tuning trials); [] = the job's own seed


@dataclass
class TrackingConfig:
    """Experiment tracking of the ServerApp (conf/tracking/, pf2lora_core/run/tracking.py)."""

    kind: str = MISSING  # none | tensorboard | mlflow
    dir: str = MISSING  # under the run directory: event files / MLflow file store
    uri: str = MISSING  # mlflow: a tracking URI instead of the file store ("" = <run_dir>/<dir>)
    experiment: str = MISSING  # mlflow: the experiment name


@dataclass
class ExperimentConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: Any = MISSING  # validated by the algorithm's Params
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    name: str = MISSING  # part of the run directory's name: no path separators or ".."
    seed: int = MISSING
    rounds: int = MISSING
    local_steps: int = MISSING
    device: str = MISSING  # auto | cpu | cuda | cuda:N
    bf16: bool = MISSING
    output_dir: str = MISSING
    run_dir: str = MISSING  # empty: <output_dir>/<timestamp>-<name>
    eval_every: int = MISSING
    rank_threshold: float = MISSING  # relative singular-value threshold of the effective rank
    flops_rounds: int = MISSING  # count FLOPs of local training in the first N rounds (0 = never)
    resume: str = MISSING  # a run directory to continue from its last checkpointed round ("" = fresh run)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def schema() -> DictConfig:
    """The structured (typed, closed) schema that composed configs are merged into."""
    return OmegaConf.structured(ExperimentConfig)


def validate_structure(cfg: DictConfig) -> DictConfig:
    """Merge into the schema: unknown keys, wrong types and missing values raise ConfigError."""
    try:
        merged = OmegaConf.merge(schema(), cfg)
        missing = sorted(k for k in _missing_keys(merged))
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration: {_first_line(err)}") from None
    if missing:
        raise ConfigError(f"invalid configuration: missing value for {', '.join(missing)}")
    return merged


def _missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in cfg:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            out.append(full)
        elif isinstance(cfg[key], DictConfig):
            out.extend(_missing_keys(cfg[key], full + "."))
    return out


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return " ".join(line.strip() for line in text[:3] if line.strip())


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"invalid configuration: {key}: {message}")
