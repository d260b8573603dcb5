"""A SuperNode's own policy (its node config): what the server may ask of this client, checked first.

In deployment the resolved config that arrives with every message is the *server's* request. A site
decides for itself, in its ``flower-supernode --node-config``, which data it trains on, where it
keeps state and caches, which models it loads, which modules it trains and sends, and how much work
one round may be. ``NodePolicy.from_node_config`` parses those keys once; ``check_request`` refuses a
request outside them before any file is opened or any model is loaded, with a ``PolicyError``
that names the rule (never a data value); ``localize`` then replaces the server's choices of data,
state and cache with the node's own.

No flwr import: the ClientApp passes ``context.node_config`` (a plain mapping) in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# --- node-config keys (flower-supernode --node-config "key=value ...") ------------------------
DATA_PATH = "data-path"  # this site's own data file (any format task=files reads)
STATE_DIR = "state-dir"  # where private adapters are kept (required in deployment)
CACHE_DIR = "cache-dir"  # converted models (else $PF2LORA_CACHE, else ~/.cache/pf2lora)
ALLOW_MODELS = "allow-models"  # comma-separated: packaged names, hub ids [@revision], paths [#sha256=HEX]
TRAINABLE_MODULES = "trainable-modules"  # comma-separated modules allowed besides LoRA factors and the head
MAX_LOCAL_STEPS = "max-local-steps"
MAX_LENGTH = "max-length"  # task.max_length (tokens per example)
MAX_NEW_TOKENS = "max-new-tokens"  # generation.max_new_tokens
MAX_EXAMPLES_PER_ROUND = "max-examples-per-round"  # local_steps x task.batch_size
SHARE_DATA_STATS = "share-data-stats"  # opt in: exact split sizes and label histograms go to the server
SHARE_SPECTRA = "share-spectra"  # opt in: per-module singular values (they include the private level)
# start the private level afresh when it is lost although the server says this client trained
# before (default false: that is an error naming the state directory; client_app._private)
ALLOW_FRESH_PRIVATE = "allow-fresh-private"
NODE_KEYS = (
    DATA_PATH, STATE_DIR, CACHE_DIR, ALLOW_MODELS, TRAINABLE_MODULES, MAX_LOCAL_STEPS, MAX_LENGTH,
    MAX_NEW_TOKENS, MAX_EXAMPLES_PER_ROUND, SHARE_DATA_STATS, SHARE_SPECTRA, ALLOW_FRESH_PRIVATE,
)  # fmt: skip
FLOWER_NODE_KEYS = ("partition-id", "num-partitions")

# --- error codes of a client's error reply (Flower's own codes are small integers) -----------
POLICY_REFUSED = 4001  # the request is outside this node's policy; the reason names the rule
CLIENT_FAILED = 4002  # the client failed; details only in the SuperNode's own log

LABEL_HISTOGRAM = "label_histogram"  # evaluation details key: a site's label counts (share-data-stats)
HASH_MARK = "#sha256="
LORA_MARK = "lora_"  # peft's LoRA parameters: lora_A / lora_B (and lora_embedding_*)


class PolicyError(Exception):
    """A request outside the node's policy. ``str()`` names the rule and numbers only, never data."""

    def __init__(self, rule: str, message: str, prefix: str = "refused by node policy") -> None:
        super().__init__(f"{prefix} [{rule}]: {message}")
        self.rule = rule


@dataclass(frozen=True)
class AllowedModel:
    name: str  # packaged name, hub id, or resolved local path
    revision: str = ""  # hub: the pinned revision this node accepts ("" = the request must pin one)
    sha256: str = ""  # path: the model.safetensors digest this node accepts ("" = any)


@dataclass(frozen=True)
class NodePolicy:
    """What this SuperNode allows; parsed once from its node config.

    ``site`` is True when the node config names any of our keys: such a node is a real site (its
    own data, its own state directory), never a simulated partition of pooled data.
    """

    site: bool
    data_path: str = ""
    state_dir: str = ""
    cache_dir: str = ""
    allow_models: tuple[AllowedModel, ...] = ()
    trainable_modules: tuple[str, ...] = ()
    max_local_steps: int = 0  # 0 = no cap
    max_length: int = 0
    max_new_tokens: int = 0
    max_examples_per_round: int = 0
    share_data_stats: bool = False
    share_spectra: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """Parse the node config; an unknown key or a malformed value is a ``PolicyError``."""
        unknown = sorted(set(node_config) - set(NODE_KEYS) - set(FLOWER_NODE_KEYS))
        if unknown:
            raise PolicyError("node-config", f"unknown node-config key(s) {unknown}; valid: {list(NODE_KEYS)}")
        get = node_config.get
        return cls(
            site=any(k in node_config for k in NODE_KEYS),
            data_path=str(get(DATA_PATH, "")),
            state_dir=str(get(STATE_DIR, "")),
            cache_dir=str(get(CACHE_DIR, "")),
            allow_models=tuple(_allowed_model(e) for e in _items(get(ALLOW_MODELS, ""))),
            trainable_modules=tuple(_items(get(TRAINABLE_MODULES, ""))),
            max_local_steps=_cap(node_config, MAX_LOCAL_STEPS),
            max_length=_cap(node_config, MAX_LENGTH),
            max_new_tokens=_cap(node_config, MAX_NEW_TOKENS),
            max_examples_per_round=_cap(node_config, MAX_EXAMPLES_PER_ROUND),
            share_data_stats=_flag(node_config, SHARE_DATA_STATS),
            share_spectra=_flag(node_config, SHARE_SPECTRA),
        )

    def reported_count(self, n: int) -> int:
        """A count as it may leave this node: exact with ``share-data-stats``, else to 2 significant digits.

        FedAvg weights by it, so it stays close; the exact size of a site's data does not leave.
        """
        if self.share_data_stats or n <= 0:
            return n
        return max(10, int(float(f"{n:.2g}")))


def is_site(policy: NodePolicy, cfg: DictConfig) -> bool:
    """A real site: its node config names our keys, or the server says deployment.

    Either is enough: a server cannot make a site read the server's data paths by calling the run a
    simulation, and a SuperNode without node-config keys in a deployment is refused, not trusted.
    """
    return policy.site or str(cfg.federation.kind) == "deployment"


def check_request(policy: NodePolicy, cfg: DictConfig) -> None:
    """Refuse a request (the server's resolved config) outside the node's policy, before any work."""
    if not is_site(policy, cfg):
        return
    if not policy.state_dir:
        raise PolicyError(
            "state-dir",
            f"this SuperNode has no {STATE_DIR}; start it with "
            f'--node-config \'{DATA_PATH}="/data/site.csv" {STATE_DIR}="/var/lib/pf2lora" ...\'',
        )
    if not policy.data_path:
        raise PolicyError(
            "data-path", f"this SuperNode has no {DATA_PATH}; start it with --node-config '{DATA_PATH}=\"/data/...\"'"
        )
    cache = str(cfg.model.cache_dir)
    if cache and cache != policy.cache_dir:
        raise PolicyError("cache-dir", f"model.cache_dir is set by this node ({CACHE_DIR}) or its environment only")
    _check_model(policy, cfg)
    _check_modules(policy, cfg)
    _check_caps(policy, cfg)
    if str(cfg.algorithm.name) == "centralized":
        raise PolicyError("algorithm", "centralized trains on every site's data pooled; not run on a site")


def localize(policy: NodePolicy, cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """The request with the node's own data, state and cache in place of the server's; what was ignored.

    Returns a copy; ``ignored`` lists the server's keys replaced (for one log line).
    """
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if not is_site(policy, cfg):
        return out, []
    ignored = ["task.data_files"] if cfg.task.data_files else []
    if str(cfg.task.source) != "files":
        ignored.append(f"task.source={cfg.task.source}")
    ignored.append("partition")  # a site's data is its own: nothing is partitioned
    out.task.source, out.task.name = "files", "files"
    out.task.data_files = {"train": policy.data_path}
    out.task.max_examples = 0
    out.model.cache_dir = policy.cache_dir
    out.federation.state_dir = policy.state_dir
    out.federation.kind = "deployment"
    return out, ignored


def check_uplink(policy: NodePolicy, keys: Iterable[str], head_modules: Iterable[str]) -> None:
    """Second line of defence after training: every array about to leave is a LoRA factor or the head."""
    allowed = tuple(head_modules) + policy.trainable_modules
    bad = [k for k in keys if LORA_MARK not in k and not any(_in_module(k, m) for m in allowed)]
    if bad:
        raise PolicyError("trainable-modules", f"{len(bad)} array(s) outside LoRA factors and the task head")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- rules ---------------------------------------------------------------------------------------


def _check_model(policy: NodePolicy, cfg: DictConfig) -> None:
    source, name, revision = str(cfg.model.source), str(cfg.model.name), str(cfg.model.get("revision", ""))
    if source == "hub" and not revision:
        raise PolicyError("model-revision", "a hub model must be pinned: set model.revision to a commit hash")
    if source == "packaged" and not policy.allow_models:
        return  # the packaged models ship with the code this site installed
    key = str(Path(name).expanduser().resolve()) if source == "path" else name
    match = next((m for m in policy.allow_models if m.name == key), None)
    if match is None:
        raise PolicyError("allow-models", f"model.source={source}: the requested model is not in {ALLOW_MODELS}")
    if source == "hub" and match.revision and match.revision != revision:
        raise PolicyError("model-revision", f"model.revision differs from the one {ALLOW_MODELS} pins")
    if source == "path" and match.sha256:
        weights = Path(key) / "model.safetensors"
        if not weights.is_file() or file_sha256(weights) != match.sha256:
            raise PolicyError("model-hash", "model.safetensors does not have the sha256 this node allows")


def _check_modules(policy: NodePolicy, cfg: DictConfig) -> None:
    extra = [m for m in cfg.model.head_modules if str(m) not in policy.trainable_modules]
    if extra:
        raise PolicyError(
            "trainable-modules", f"model.head_modules names {len(extra)} module(s) this node does not allow"
        )


def _check_caps(policy: NodePolicy, cfg: DictConfig) -> None:
    requested = {
        MAX_LOCAL_STEPS: int(cfg.local_steps),
        MAX_LENGTH: int(cfg.task.max_length),
        MAX_NEW_TOKENS: int(cfg.generation.max_new_tokens) if str(cfg.task.kind) == "causal_lm" else 0,
        MAX_EXAMPLES_PER_ROUND: int(cfg.local_steps) * int(cfg.task.batch_size),
    }
    caps = {
        MAX_LOCAL_STEPS: policy.max_local_steps,
        MAX_LENGTH: policy.max_length,
        MAX_NEW_TOKENS: policy.max_new_tokens,
        MAX_EXAMPLES_PER_ROUND: policy.max_examples_per_round,
    }
    for rule, cap in caps.items():
        if cap and requested[rule] > cap:
            raise PolicyError(rule, f"requested {requested[rule]} > this node's cap {cap}")


# --- parsing -----------------------------------------------------------------------------------


def _items(value: Any) -> list[str]:
    return [item.strip() for item in str(value).split(",") if item.strip()]


def _allowed_model(entry: str) -> AllowedModel:
    name, _, digest = entry.partition(HASH_MARK)
    if name.startswith(("/", ".", "~")):
        return AllowedModel(str(Path(name).expanduser().resolve()), sha256=digest.lower())
    base, _, revision = name.partition("@")
    return AllowedModel(base, revision=revision)


def _cap(node_config: Mapping[str, Any], key: str) -> int:
    value = node_config.get(key, 0)
    try:
        cap = int(value)
    except (TypeError, ValueError):
        raise PolicyError("node-config", f"{key} must be a whole number") from None
    if cap < 0:
        raise PolicyError("node-config", f"{key} must be >= 0 (0 = no cap)")
    return cap


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    value = node_config.get(key, False)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", ""):
        return False
    raise PolicyError("node-config", f"{key} must be true or false")


def _in_module(key: str, module: str) -> bool:
    """``key`` is a parameter of ``module`` (``classifier`` holds ``classifier.weight``, not ``classifier2.x``)."""
    return f".{module}." in f".{key}"
