"""Adapters in PEFT's own format: a client's personalized model, or the common adapter, as one LoRA adapter.

A client's model is ``W0 x + s B A x + s~ D C x`` (common ``(A, B)``, private ``(C, D)``). peft's
``add_weighted_adapter(..., combination_type="cat")`` writes exactly that sum as one adapter of rank
``r + r~`` (``[A; C]`` and ``[s B, s~ D]``, scaling 1), so a standard ``PeftModel.from_pretrained(base,
DIR)`` reproduces the personalized model; the trained head goes in ``modules_to_save``. The folder is
what ``save_pretrained`` writes (``adapter_config.json`` + ``adapter_model.safetensors``).

``pf2lora-export`` (``pf2lora_core.tools.export``) writes a run's adapters with these functions.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from pf2lora_core.algorithms import Algorithm
from pf2lora_core.config.keys import CHECKPOINTS_DIR
from pf2lora_core.data.sources import CLASSIFICATION
from pf2lora_core.training.adapters import TwoLevelModel
from pf2lora_core.training.pooling import MEAN

# A head trained on the mean over real tokens (model.pooling=mean) needs the same pooling on the base
# model the adapter is loaded into: PEFT's adapter_config has no field for it, so a note says so.
POOLING_NOTE = "pf2lora_pooling.json"
MEAN_POOLING_HINT = "pf2lora_core.training.pooling.use_mean_pooling(base_model) before PeftModel.from_pretrained"
COMBINED = "pf2lora_combined"  # transient name of the cat-combined adapter inside the copy
COMMON_FILE = re.compile(r"common_round_(\d{4,})\.safetensors$")


if TYPE_CHECKING:
    from pf2lora_core.config.experiment import Experiment


class ExportError(ValueError):
    """The requested adapter cannot be exported (what to fix is in the message)."""


def peft_adapter(model: TwoLevelModel, adapters: Sequence[str]) -> PeftModel:
    """A standalone ``PeftModel`` (adapter ``default``) equal to ``model`` with ``adapters`` active.

    ``model`` is left as it is (the combination happens on a copy). The head modules become the
    adapter's ``modules_to_save`` with their trained weights.
    """
    work = copy.deepcopy(model.model)
    work.add_weighted_adapter(list(adapters), [1.0] * len(adapters), adapter_name=COMBINED, combination_type="cat")
    lora = get_peft_model_state_dict(work, adapter_name=COMBINED)
    config = dataclasses.replace(work.peft_config[COMBINED], modules_to_save=list(model.head_modules) or None)
    config.inference_mode = True
    base = work.base_model.unload()  # W0 and the trained head, LoRA layers removed (not merged)
    out = get_peft_model(base, config)  # wraps the head: modules_to_save holds a copy of its trained weights
    # the head as wrapped (trained weights) plus the combined LoRA factors
    set_peft_model_state_dict(out, {**get_peft_model_state_dict(out), **lora})
    return out


def save_adapter(model: TwoLevelModel, adapters: Sequence[str], out: Path, exp: Experiment | None = None) -> Path:
    """``save_pretrained`` of :func:`peft_adapter` into ``out``, with ``exp``'s pooling note; returns ``out``."""
    peft_adapter(model, adapters).save_pretrained(str(out))
    if exp is not None and pooling_of(exp) == MEAN:
        (out / POOLING_NOTE).write_text(json.dumps({"pooling": MEAN, "apply": MEAN_POOLING_HINT}, indent=1) + "\n")
    return out


def pooling_of(exp: Experiment) -> str | None:
    """What the classifier head reads in ``exp`` (``model.pooling``); None for generation tasks."""
    return str(exp.model.pooling) if exp.task.kind == CLASSIFICATION else None


def export_problem(algorithm: Algorithm, personalized: bool) -> str | None:
    """Why ``algorithm``'s personalized (or global) model is not a LoRA adapter on the base, or None.

    Exportable: the client loads the server's common level as sent and evaluates the plain model.
    Not: server-side merges or per-client ranks (their own downlink / receive: FLoRA, HETLoRA,
    FlexLoRA), fine-tuning at evaluation (Per-FedAvg), per-instance mixing (FedDPA).
    """
    cls = type(algorithm)
    if cls.downlink is not Algorithm.downlink or cls.receive is not Algorithm.receive:
        return f"{algorithm.name} rebuilds each client's model from what the server sends (its own downlink/receive)"
    if algorithm.adapts_for_evaluation:
        return f"{algorithm.name} fine-tunes each client's model at evaluation time"
    if cls.evaluation_mixer is not Algorithm.evaluation_mixer:
        return f"{algorithm.name} mixes its adapters per input instance"
    if not personalized and not algorithm.has_global_model:
        return f"{algorithm.name} has no global model (its common level alone is not a model)"
    return None


def common_checkpoint(run_dir: Path, round_: int | None = None) -> tuple[int, Path]:
    """(round, path) of ``checkpoints/common_round_XXXX.safetensors``: ``round_``, else the newest."""
    found = {}
    for path in (run_dir / CHECKPOINTS_DIR).glob("common_round_*.safetensors"):
        match = COMMON_FILE.search(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise ExportError(f"{run_dir / CHECKPOINTS_DIR} holds no common_round_XXXX.safetensors: no round finished")
    if round_ is None:
        round_ = max(found)
    if round_ not in found:
        raise ExportError(f"no common adapter of round {round_} in {run_dir / CHECKPOINTS_DIR}; have {sorted(found)}")
    return round_, found[round_]
