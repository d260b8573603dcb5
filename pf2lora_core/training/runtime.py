"""Device choice and seeding, parsed once from config."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


# Ray hides every GPU from an actor that reserves none (CUDA_VISIBLE_DEVICES="" unless
# RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0), so a simulated client sees a GPU only with client_gpus > 0.
RAY_GPU_HINT = "in a Ray simulation a client sees a GPU only with federation.client_gpus > 0 (e.g. 0.125: 8 per GPU)"


NVIDIA_GPUS = "/proc/driver/nvidia/gpus"  # one entry per GPU the driver knows, visible to this process or not


def machine_has_nvidia_gpu() -> bool:
    """Whether the NVIDIA driver lists a GPU on this machine, whatever this process may see."""
    return os.path.isdir(NVIDIA_GPUS) and bool(os.listdir(NVIDIA_GPUS))


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present; otherwise the device named (``cpu``, ``cuda``, ``cuda:1``)."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        # GPUs hidden from this process (Ray does that) on a machine that has some: say how to use them
        if os.environ.get("CUDA_VISIBLE_DEVICES") == "" and machine_has_nvidia_gpu():
            log.warning("device=auto: no GPU visible to this process (CUDA_VISIBLE_DEVICES is empty); %s", RAY_GPU_HINT)
        return torch.device("cpu")
    device = parse_device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device: {spec!r} asked for CUDA but torch sees no GPU (use device=auto or cpu; {RAY_GPU_HINT})"
        )
    return device


def device_report(spec: str, client_gpus: float | None) -> str:
    """Where a run's clients will compute and why, for the console at start.

    ``client_gpus``: each Ray client's GPU share in a simulation; None where clients run in this
    process (the in-process engine). The usual surprises get their cause: a CPU build of torch on
    a GPU machine, a CUDA build the driver is too old for, GPUs hidden from Ray's clients.
    """
    build = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", a CPU build")
    if spec == "cpu":
        return f"clients on the CPU (device=cpu; {build})"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if client_gpus == 0:  # only auto reaches here (preflight refuses cuda with client_gpus=0)
            return f"clients on the CPU: this machine has {name}, but federation.client_gpus=0 hides it; {RAY_GPU_HINT}"
        share = f", {client_gpus} of a GPU each" if client_gpus else ""
        return f"clients on the GPU: {name} ({build}{share})"
    if torch.version.cuda is None:
        why = "an NVIDIA GPU is here: install a CUDA build (README, On GPU)" if machine_has_nvidia_gpu() else "no GPU"
        return f"clients on the CPU ({build}; {why})"
    if machine_has_nvidia_gpu():
        return (
            f"clients on the CPU: {build} sees no GPU although the driver lists one: the driver is likely older "
            f"than CUDA {torch.version.cuda} needs (`nvidia-smi` shows the highest CUDA it supports); install the "
            "torch build for that CUDA (README, On GPU)"
        )
    return f"clients on the CPU ({build}; no GPU on this machine)"


def parse_device(spec: str) -> torch.device:
    """``spec`` as a device without asking whether this machine has it (``auto`` stays CPU here)."""
    if spec == "auto":
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"device: {spec!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {spec!r}: use auto, cpu, cuda or cuda:N")
    return device


def simulation_gpu_problem(device: str, client_gpus: float, gpus_here: int | None) -> str | None:
    """What is wrong with a local simulation's GPU settings on a machine with ``gpus_here`` GPUs, or None.

    ``device=cuda`` with ``client_gpus=0`` fails in every client (Ray hides the GPUs); ``client_gpus
    > 0`` on a machine without GPUs never starts a client (Ray waits for GPUs forever). ``gpus_here``
    None: not known here (an existing Ray cluster, whose GPUs are on its nodes).
    """
    if client_gpus < 0:
        return f"federation.client_gpus={client_gpus} must be >= 0"
    if client_gpus > 0 and gpus_here == 0:
        return (
            f"federation.client_gpus={client_gpus} but this machine has no GPU torch can see: "
            "Ray would never start a client; set federation.client_gpus=0"
        )
    if device.startswith("cuda") and client_gpus == 0:
        return f"device={device} with federation.client_gpus=0: {RAY_GPU_HINT}"
    index = device.partition(":")[2]
    if device.startswith("cuda") and index and index != "0" and client_gpus > 0:
        return (
            f"device={device} under Ray: each client process sees only the GPU Ray gives it, as cuda:0; "
            "use device=cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    return None


def free_device_memory() -> None:
    """Give the caching allocator's free blocks back after an out-of-memory error.

    ``gc.collect`` first: the failed step's tensors can sit in reference cycles (the dropout tape,
    a model's bound forward) that nothing else frees, and ``empty_cache`` releases unused blocks only.
    """
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A seed derived deterministically from integers (run seed, client, round, ...)."""
    gen = np.random.default_rng(list(parts))
    return int(gen.integers(0, 2**62))
