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
import socket
import subprocess
import sys
from pathlib import Path

from pf2lora_core.config import ConfigError
from pf2lora_core.experiment import Experiment, load, preflight


def federation_config(exp: Experiment) -> str:
    """The ``flwr run --federation-config`` string for a local simulation of ``exp``.

    With ``resume=<run dir>``, the size of the run being continued (its recorded config).
    """
    if str(exp.cfg.resume):
        from pf2lora_core.resume import recorded_experiment

        try:
            exp, _ = recorded_experiment(Path(str(exp.cfg.resume)))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"invalid configuration: resume: {err}") from None
    fed = exp.federation
    if fed.kind != "simulation":
        raise ConfigError(
            f"federation.kind={fed.kind}: no local simulation to size; submit with `flwr run . {fed.connection}`"
        )
    return (
        f"num-supernodes={fed.num_clients} client-resources-num-cpus={fed.client_cpus} "
        f"client-resources-num-gpus={fed.client_gpus}"
    )


def flwr_run(
    overrides: str,
    federation_config: str | None,
    flwr_home: Path | None,
    app_dir: Path,
    timeout: float,
    extra_env: dict[str, str] | None = None,
    connection: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``flwr run <app_dir> --stream`` in a subprocess; returns the finished process.

    Simulation (``connection`` None): with its own ``FLWR_HOME``; the local SuperLink that
    ``flwr run`` starts outlives the command, so it is found by its database path under
    ``flwr_home`` and stopped by PID, also when the run fails or times out. Deployment: submitted
    to the SuperLink ``connection`` of the user's own ``$FLWR_HOME/config.toml``.
    """
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(extra_env or {}),
    }
    cmd = ["flwr", "run", str(app_dir)]
    if connection is not None:
        cmd.append(connection)
    elif federation_config is None or flwr_home is None:
        raise ValueError("a simulation run needs federation_config and flwr_home")
    else:
        env["FLWR_HOME"] = str(flwr_home)
        env.update(private_superlink_ports(env))
        cmd += ["--federation-config", federation_config]
    cmd += ["--stream", "--run-config", f"overrides='{overrides}'"]
    try:
        return subprocess.run(cmd, cwd=app_dir, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        if connection is None and flwr_home is not None:
            stop_processes_matching(str(flwr_home))


# Flower's CLI reads these to place the local SuperLink it starts for simulation (defaults 39091 and
# 39093, the same for every checkout on a machine: a second run would reuse the first one's
# SuperLink, and with it the first one's environment).
LOCAL_PORT_VARS = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_superlink_ports(env: dict[str, str]) -> dict[str, str]:
    """Fresh ports for this run's own local SuperLink, unless the caller chose them in ``env``."""
    chosen = {var: env[var] for var in LOCAL_PORT_VARS if env.get(var)}
    for var in LOCAL_PORT_VARS:
        while var not in chosen:
            port = str(free_port())
            if port not in chosen.values():
                chosen[var] = port
    return chosen


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
    try:
        exp = load(args[1:])
        preflight(exp)  # what would fail only after the server waited for nodes fails here, now
        print(federation_config(exp))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
