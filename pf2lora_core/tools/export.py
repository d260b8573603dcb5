"""``pf2lora-export RUN_DIR --client K --out DIR``: a run's adapter in PEFT's own format (see ``run.export``).

Client K's personalized model takes its private adapter from the state directory where that client
keeps it (in deployment, on its own SuperNode); ``--global`` exports the common adapter alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

from pf2lora_core.config.experiment import Experiment, from_yaml
from pf2lora_core.config.keys import COMMON, CONFIG_FILE, PRIVATE
from pf2lora_core.federation.private_store import PrivateStoreError
from pf2lora_core.run.console import quiet_libraries
from pf2lora_core.run.export import (
    MEAN_POOLING_HINT,
    POOLING_NOTE,
    ExportError,
    common_checkpoint,
    export_problem,
    save_adapter,
)


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
    except (ExportError, FileNotFoundError, PrivateStoreError) as err:  # each says what to fix: no traceback
        print(f"pf2lora-export: {err}", file=sys.stderr)
        return 2
    note = f"; the head reads mean-pooled tokens: call {MEAN_POOLING_HINT}" if (out / POOLING_NOTE).exists() else ""
    print(f"wrote {out} (load with PeftModel.from_pretrained(base_model, {str(out)!r}){note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
