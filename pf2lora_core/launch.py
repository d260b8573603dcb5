"""Launch helpers: Flower's simulation size from the Hydra config, and stopping the local SuperLink.

``python -m pf2lora_core.launch federation-config [hydra overrides]`` prints the
``--federation-config`` value for ``flwr run`` (``num-supernodes=8 client-resources-num-cpus=1
...``), so the simulation size comes from the one Hydra tree (``federation.num_clients``,
``client_cpus``, ``client_gpus``) instead of being repeated by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from pf2lora_core.experiment import Experiment, load


def federation_config(exp: Experiment) -> str:
    """The ``flwr run --federation-config`` string for a local simulation of ``exp``."""
    fed = exp.federation
    return (
        f"num-supernodes={fed.num_clients} client-resources-num-cpus={fed.client_cpus} "
        f"client-resources-num-gpus={fed.client_gpus}"
    )


def stop_local_superlink() -> int:
    """Stop `flower-superlink` processes started by `flwr run` for local simulation; returns how many."""
    out = subprocess.run(["pgrep", "-f", "flower-superlink .*--simulation"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    return len(pids)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("federation-config", "stop-superlink"):
        print("usage: python -m pf2lora_core.launch {federation-config [overrides...] | stop-superlink}", file=sys.stderr)
        return 2
    if args[0] == "stop-superlink":
        print(f"stopped {stop_local_superlink()} local SuperLink process(es)")
        return 0
    print(federation_config(load(args[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
