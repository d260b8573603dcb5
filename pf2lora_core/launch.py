"""Launch helpers: Flower's simulation size from the Hydra config, and stopping the local SuperLink.

``python -m pf2lora_core.launch federation-config [hydra overrides]`` prints the
``--federation-config`` value for ``flwr run`` (``num-supernodes=8 client-resources-num-cpus=1
...``), so the simulation size comes from the one Hydra tree (``federation.num_clients``,
``client_cpus``, ``client_gpus``) instead of being repeated by hand.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from pf2lora_core.experiment import Experiment, load


def federation_config(exp: Experiment) -> str:
    """The ``flwr run --federation-config`` string for a local simulation of ``exp``."""
    fed = exp.federation
    return (
        f"num-supernodes={fed.num_clients} client-resources-num-cpus={fed.client_cpus} "
        f"client-resources-num-gpus={fed.client_gpus}"
    )


def flwr_run(
    overrides: str,
    federation_config: str,
    flwr_home: Path,
    app_dir: Path,
    timeout: float,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``flwr run <app_dir> --stream`` in a subprocess with its own FLWR_HOME; its SuperLink is stopped after.

    The local SuperLink that ``flwr run`` starts outlives the command; it is found by its
    database path under ``flwr_home`` and stopped by PID, also when the run fails or times out.
    """
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(extra_env or {}),
    }
    cmd = ["flwr", "run", str(app_dir), "--stream", "--federation-config", federation_config,
           "--run-config", f"overrides='{overrides}'"]  # fmt: skip
    try:
        return subprocess.run(cmd, cwd=app_dir, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        stop_processes_matching(str(flwr_home))


def stop_processes_matching(pattern: str) -> int:
    """SIGTERM every process whose command line contains ``pattern`` (not this one)."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split() if int(p) != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return len(pids)


def stop_local_superlink() -> int:
    """Stop `flower-superlink` processes started by `flwr run` for local simulation; returns how many."""
    return stop_processes_matching("flower-superlink .*--simulation")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("federation-config", "stop-superlink"):
        print(
            "usage: python -m pf2lora_core.launch {federation-config [overrides...] | stop-superlink}", file=sys.stderr
        )
        return 2
    if args[0] == "stop-superlink":
        print(f"stopped {stop_local_superlink()} local SuperLink process(es)")
        return 0
    print(federation_config(load(args[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
