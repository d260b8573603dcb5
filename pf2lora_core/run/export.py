"""Adapters in PEFT's own format: a client's personalized model, or the common adapter, as one LoRA adapter.

A client's model is ``W0 x + s B A x + s~ D C x`` (common ``(A, B)``, private ``(C, D)``). peft's
``add_weighted_adapter(..., combination_type="cat")`` writes exactly that sum as one adapter of rank
``r + r~`` (``[A; C]`` and ``[s B, s~ D]``, scaling 1), so a standard ``PeftModel.from_pretrained(base,
DIR)`` reproduces the personalized model; the trained head goes in ``modules_to_save``. The folder is
what ``save_pretrained`` writes (``adapter_config.json`` + ``adapter_model.safetensors``).

``pf2lora-export RUN_DIR --client K --out DIR`` exports client K's model (its private adapter read
from the state directory where that client keeps it: in deployment, on its own SuperNode);
``--global`` exports the common adapter alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from pf2lora_core.algorithms import Algorithm
from pf2lora_core.config.experiment import Experiment, from_yaml
from pf2lora_core.config.keys import CHECKPOINTS_DIR, COMMON, CONFIG_FILE, PRIVATE
from pf2lora_core.data.sources import CLASSIFICATION
from pf2lora_core.run.console import quiet_libraries
from pf2lora_core.training.adapters import TwoLevelModel
from pf2lora_core.training.pooling import MEAN

# A head trained on the mean over real tokens (model.pooling=mean) needs the same pooling on the base
# model the adapter is loaded into: PEFT's adapter_config has no field for it, so a note says so.
POOLING_NOTE = "pf2lora_pooling.json"
MEAN_POOLING_HINT = "pf2lora_core.training.pooling.use_mean_pooling(base_model) before PeftModel.from_pretrained"
COMBINED = "pf2lora_combined"  # transient name of the cat-combined adapter inside the copy
COMMON_FILE = re.compile(r"common_round_(\d{4,})\.safetensors$")


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


def export_run(
    run_dir: Path, out: Path, client: int | None, state_dir: Path | None = None, round_: int | None = None
) -> Path:
    """Client ``client``'s personalized adapter (None: the common adapter alone) of ``run_dir`` into ``out``.

    The private adapter is the one the client kept after ``round_`` (default: the last round with a
    common checkpoint), read from ``state_dir`` (default: the run's ``federation.state_dir``); where
    the algorithm re-fits it to the common level before evaluating (PF2LoRA), the one it was
    evaluated with after that round.
    """
    from pf2lora_core.federation.client_runtime import build_model
    from pf2lora_core.federation.private_store import PrivateStore
    from pf2lora_core.training.runtime import resolve_device

    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise ExportError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    exp: Experiment = from_yaml(config.read_text(encoding="utf-8"))
    problem = export_problem(exp.algorithm, personalized=client is not None)
    if problem:
        raise ExportError(f"cannot export a LoRA adapter: {problem}")
    round_, path = common_checkpoint(run_dir, round_)
    model, _ = build_model(exp, resolve_device("cpu"))
    model.load(COMMON, load_file(str(path)))
    adapters = [COMMON]
    if client is not None:
        if not 0 <= client < exp.federation.num_clients:
            raise ExportError(f"--client {client}: the run has clients 0..{exp.federation.num_clients - 1}")
        if PRIVATE in model.levels:
            root = state_dir or Path(exp.federation.state_dir)
            store = PrivateStore(root, run_dir.name, client)
            private = store.load(before_round=round_ + 1)
            if exp.algorithm.refits_private:  # the level the client was evaluated with, re-fitted to this x
                evaluated = store.load_evaluated(round_)
                if evaluated is None:
                    raise ExportError(
                        f"client {client} was not evaluated after round {round_} (no re-fitted private adapter "
                        f"under {store.dir}); export a round that was evaluated (eval_every, and the last round)"
                    )
                private = evaluated
            if private is None:
                raise ExportError(
                    f"no private adapter of client {client} (round <= {round_}) under {store.dir}; "
                    "run the export where that client keeps its state (--state-dir: the SuperNode's state-dir)"
                )
            model.load(PRIVATE, private.tensors)
        adapters = list(model.adapters)
    return save_adapter(model, adapters, out, exp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pf2lora-export", description="Write a run's adapter in PEFT's format (PeftModel.from_pretrained)."
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (config.yaml, checkpoints/)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--client", type=int, help="client K's personalized model (common + its private adapter)")
    which.add_argument("--global", dest="global_", action="store_true", help="the common adapter alone")
    parser.add_argument("--out", type=Path, required=True, help="the adapter folder to write")
    parser.add_argument("--state-dir", type=Path, help="where the client keeps its private adapters")
    parser.add_argument("--round", type=int, dest="round_", help="the round to export (default: the last)")
    args = parser.parse_args(argv)
    quiet_libraries()  # the same quiet console as the apps: no progress bars or known warnings
    try:
        out = export_run(args.run_dir, args.out, None if args.global_ else args.client, args.state_dir, args.round_)
    except (ExportError, FileNotFoundError) as err:
        print(f"pf2lora-export: {err}", file=sys.stderr)
        return 2
    note = f"; the head reads mean-pooled tokens: call {MEAN_POOLING_HINT}" if (out / POOLING_NOTE).exists() else ""
    print(f"wrote {out} (load with PeftModel.from_pretrained(base_model, {str(out)!r}){note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
