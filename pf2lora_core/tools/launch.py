"""Launching `flwr run`: the simulation size from the Hydra config, a private SuperLink, nothing left running.

``python -m pf2lora_core.tools.launch federation-config [hydra overrides]`` prints the
``--federation-config`` value for ``flwr run`` (``num-supernodes=8 client-resources-num-cpus=1
...``), so the simulation size comes from the one Hydra tree (``federation.num_clients``,
``client_cpus``, ``client_gpus``) instead of being repeated by hand. ``python -m pf2lora_core.tools.launch
demo [hydra overrides]`` runs an experiment as ``make demo`` does (see :func:`demo`);
``stop-superlink`` stops the local SuperLink of ``$FLWR_HOME``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pathspec
import psutil
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package (a dependency of flwr)
    import tomli as tomllib

from pf2lora_core.config.experiment import Experiment, load, preflight
from pf2lora_core.config.schema import ConfigError
from pf2lora_core.training.runtime import device_report, simulation_gpu_problem


def federation_config(exp: Experiment) -> str:
    """The ``flwr run --federation-config`` string for a local simulation of ``exp``.

    With ``resume=<run dir>``, the size of the run being continued (its recorded config).
    """
    if str(exp.cfg.resume):
        from pf2lora_core.federation.resume import recorded_experiment

        try:
            exp, _ = recorded_experiment(Path(str(exp.cfg.resume)))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"invalid configuration: resume: {err}") from None
    fed = exp.federation
    if fed.kind != "simulation":
        raise ConfigError(
            f"federation.kind={fed.kind}: no local simulation to size; submit with `flwr run . {fed.connection}`"
        )
    gpus_here = None if fed.ray_address else torch.cuda.device_count()  # a cluster's GPUs are on its nodes
    problem = simulation_gpu_problem(str(exp.cfg.device), float(fed.client_gpus), gpus_here)
    if problem:
        raise ConfigError(f"invalid configuration: {problem}")
    return (
        f"num-supernodes={fed.num_clients} client-resources-num-cpus={fed.client_cpus} "
        f"client-resources-num-gpus={fed.client_gpus}"
    )


# Where the simulation's Ray runs. Flower 1.41 cannot be told through `flwr run --federation-config`: its
# SimulationConfig (flwr/proto/federation_config.proto; flwr/cli/federation/simulation_config.py) carries
# only init-args num-cpus, num-gpus, logging-level and log-to-driver, which flwr/simulation/app.py
# (_run_simulation_settings) turns into the Ray backend's init_args. The backend
# (flwr/server/superlink/fleet/vce/backend/raybackend.py, RayBackend.init_ray) then calls ray.init() without
# an address, and ray.init() reads RAY_ADDRESS from its environment (ray/_private/worker.py), which the
# simulation process inherits from `flwr run` through the local SuperLink this launch starts for the run.
RAY_ADDRESS_ENV = "RAY_ADDRESS"
# Without an address ray.init() joins the cluster a `ray start` last recorded on this machine
# (/tmp/ray/ray_current_cluster) if there is one; "local" always starts a Ray of this run's own.
RAY_LOCAL = "local"


def simulation_env(exp: Experiment) -> dict[str, str]:
    """The environment that puts the simulation of ``exp`` on its Ray: ``{"RAY_ADDRESS": ...}``.

    ``federation.ray_address`` "" gives ``local`` (a fresh Ray for this run, whatever ``RAY_ADDRESS`` or a
    ``ray start`` on this machine says); "auto" or ``host:port`` joins that cluster. The address is
    the current config's, also with ``resume=``: a resumed run may find its cluster elsewhere.
    """
    return {RAY_ADDRESS_ENV: str(exp.federation.ray_address) or RAY_LOCAL}


def flwr_run(
    overrides: str,
    federation_config: str | None,
    flwr_home: Path | None,
    app_dir: Path,
    timeout: float | None,
    extra_env: dict[str, str] | None = None,
    connection: str | None = None,
    *,
    echo: TextIO | None = None,
) -> subprocess.CompletedProcess[str]:
    """``flwr run <app_dir> --stream`` in a subprocess; returns the finished process (its log in ``stdout``).

    Simulation (``connection`` None): with its own ``FLWR_HOME`` and fresh local SuperLink ports
    (refused with a message naming the owner if a chosen port is taken). Every process the run starts
    (the SuperLink ``flwr run`` leaves behind, its SuperExec, the simulation, Ray) inherits a launch
    mark in its environment and is stopped by it when the run ends, fails, times out or is
    interrupted. Deployment: submitted to the SuperLink ``connection`` of the user's own
    ``$FLWR_HOME/config.toml`` (nothing is started locally, nothing stopped). ``echo``: also write
    each output line there as it arrives (the demo's live console). A timeout raises
    ``subprocess.TimeoutExpired`` with the output so far.
    """
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(extra_env or {}),
    }
    mark = env.setdefault(LAUNCH_MARK, uuid.uuid4().hex)  # a caller's own mark (tests look its processes up)
    refuse_comma_paths(app_dir)
    cmd = ["flwr", "run", str(app_dir)]
    if connection is not None:
        cmd.append(connection)
    elif federation_config is None or flwr_home is None:
        raise ValueError("a simulation run needs federation_config and flwr_home")
    else:
        env["FLWR_HOME"] = str(flwr_home)
        ports = private_superlink_ports(env)
        refuse_foreign_superlink(ports)
        env.update(ports)
        cmd += ["--federation-config", federation_config]
    cmd += ["--stream", "--run-config", f"overrides='{overrides}'"]
    try:
        return _run_streaming(cmd, app_dir, env, timeout, echo)
    finally:
        if connection is None:
            stop_launched(mark)


def _run_streaming(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: float | None, echo: TextIO | None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with stdout and stderr merged, keeping (and echoing) every line; a timeout kills it."""
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo is not None:
                echo.write(line)
                echo.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc, reader)
        raise subprocess.TimeoutExpired(cmd, timeout, output="".join(lines)) from None
    except BaseException:  # Ctrl-C or SIGTERM: the caller then stops what the run started
        _kill(proc, reader)
        raise
    reader.join(timeout=30)
    return subprocess.CompletedProcess(cmd, code, stdout="".join(lines), stderr="")


def _kill(proc: subprocess.Popen[str], reader: threading.Thread) -> None:
    proc.kill()
    proc.wait()
    reader.join(timeout=5)


# Every process a launch starts carries this variable (a fresh id per launch) in its environment; the
# processes are found by it afterwards, whatever they are called and whoever their parent now is.
LAUNCH_MARK = "PF2LORA_LAUNCH_ID"


def launched_processes(mark: str) -> list[psutil.Process]:
    """Processes (other than this one) whose environment carries ``LAUNCH_MARK=mark``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(LAUNCH_MARK) == mark:
                found.append(proc)
    return found


def stop_launched(mark: str, grace_s: float = 10.0, passes: int = 3) -> int:
    """SIGTERM every process of launch ``mark``, SIGKILL those still there after ``grace_s``; how many.

    Looked up again after each pass: a process may start another while it is being stopped (Ray).
    """
    stopped = 0
    for _ in range(passes):
        procs = launched_processes(mark)
        if not procs:
            break
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        stopped += len(procs)
    return stopped


class LaunchError(RuntimeError):
    """The run cannot start as asked (e.g. another process holds its SuperLink port)."""


# The files `flwr run` packs into the app's FAB, selected as flwr 1.41 selects them
# (flwr/cli/build.py build_fab_from_files): not excluded by the app's .gitignore, of a FAB type
# (flwr/common/constant.py FAB_INCLUDE_PATTERNS), inside the app's own [tool.flwr.app] fab-include
# and outside its fab-exclude (get_filtered_fab_paths), and outside Flower's built-in
# FAB_EXCLUDE_PATTERNS (which drop pyproject.toml only to write it back themselves).
FAB_SUFFIXES = (".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl")
FAB_ROOT_FILES = ("LICENSE",)
FLOWER_FAB_EXCLUDES = (
    ".flwr/**", "**/__pycache__/**", "pyproject.toml", "**/*_test.py", "**/test_*.py", "build/**", "eggs/**",
    ".eggs/**", "lib/**", "lib64/**", "parts/**", "*.egg", ".venv/**", "env/**", "venv/**", "ENV/**",
    "env.bak/**", "venv.bak/**",
)  # fmt: skip
FAB_INCLUDE_KEY, FAB_EXCLUDE_KEY = "fab-include", "fab-exclude"  # [tool.flwr.app] in pyproject.toml


def fab_paths(app_dir: Path) -> list[str]:
    """Paths (relative to ``app_dir``, sorted) that Flower packs into the app's FAB besides pyproject.toml."""
    include, exclude = _app_fab_patterns(app_dir)
    built_in = pathspec.GitIgnoreSpec.from_lines(FLOWER_FAB_EXCLUDES)
    return [
        rel
        for rel in _fab_typed_files(app_dir)
        if (include is None or include.match_file(rel))
        and (exclude is None or not exclude.match_file(rel))
        and not built_in.match_file(rel)
    ]


def _app_fab_patterns(app_dir: Path) -> tuple[pathspec.GitIgnoreSpec | None, pathspec.GitIgnoreSpec | None]:
    """The app's own fab-include / fab-exclude patterns (None where pyproject.toml sets none)."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        return None, None
    app = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("tool", {}).get("flwr", {}).get("app", {})
    specs = [app.get(key) for key in (FAB_INCLUDE_KEY, FAB_EXCLUDE_KEY)]
    include, exclude = (pathspec.GitIgnoreSpec.from_lines(p) if p else None for p in specs)
    return include, exclude


def _fab_typed_files(app_dir: Path) -> list[str]:
    """Files of a FAB type that the app's .gitignore does not exclude; ignored directories are not walked."""
    gitignore = app_dir / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8", errors="replace").splitlines() if gitignore.is_file() else []
    ignored = pathspec.GitIgnoreSpec.from_lines(lines)
    found: list[str] = []
    for root, dirs, files in os.walk(app_dir):
        rel_root = Path(root).relative_to(app_dir).as_posix()
        prefix = "" if rel_root == "." else f"{rel_root}/"
        dirs[:] = sorted(d for d in dirs if d != ".flwr" and not ignored.match_file(f"{prefix}{d}/"))
        for name in sorted(files):
            rel = f"{prefix}{name}"
            if (Path(root) / name).is_symlink():  # Flower packs no symlinks
                continue
            typed = name.endswith(FAB_SUFFIXES) or rel in FAB_ROOT_FILES
            if typed and not ignored.match_file(rel):
                found.append(rel)
    return sorted(found)


def fab_comma_paths(app_dir: Path) -> list[str]:
    """Paths (relative to ``app_dir``) that Flower would pack into the FAB and that hold a comma.

    Flower writes the FAB's manifest as ``path,sha256,bits`` lines and splits them on commas, so one
    such file (a sweep's run directory ``a=1,b=2`` copied into ``conf/``, or into any folder of an
    app without a ``fab-include``) makes every ``flwr run`` fail with ``too many values to unpack``.
    """
    return [rel for rel in fab_paths(app_dir) if "," in rel]


def refuse_comma_paths(app_dir: Path) -> None:
    """Raise LaunchError naming the files whose comma would break Flower's packaging of the app."""
    found = fab_comma_paths(app_dir)
    if found:
        shown = "\n  ".join(found[:10]) + (f"\n  ... and {len(found) - 10} more" if len(found) > 10 else "")
        raise LaunchError(
            f"`flwr run` cannot package the app in {app_dir}: Flower's FAB manifest is comma-separated, and "
            f"{len(found)} file(s) it would include have a comma in their path:\n  {shown}\n"
            "move them out of the app directory, rename them, pack them (tar) or list them in .gitignore"
        )


def port_owner(port: int) -> psutil.Process | None:
    """The process listening on TCP ``port`` of this machine, if any (None also if it is not ours to see)."""
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    return None


def describe_process(proc: psutil.Process) -> str:
    """``pid N (command), started in <cwd>, Python <executable>``: enough to tell whose it is."""
    parts = [f"pid {proc.pid}"]
    with contextlib.suppress(psutil.Error):
        parts.append(f"({' '.join(proc.cmdline()[:3])[:160]})")
    with contextlib.suppress(psutil.Error):
        parts.append(f"started in {proc.cwd()}")
    with contextlib.suppress(psutil.Error):
        home = proc.environ().get("FLWR_HOME")
        if home:
            parts.append(f"FLWR_HOME={home}")
    with contextlib.suppress(psutil.Error, IndexError):  # the interpreter as started (a venv's bin/python)
        parts.append(f"environment {Path(proc.cmdline()[0]).parent.parent}")
    return ", ".join(parts)


def refuse_foreign_superlink(ports: dict[str, str]) -> None:
    """Raise LaunchError naming the owner if any of this run's SuperLink ports is already taken.

    ``flwr run`` would otherwise hand the app to whatever SuperLink answers there, which runs it in
    the environment (and checkout) that SuperLink was started from.
    """
    for var, port in ports.items():
        if not _port_taken(int(port)):
            continue
        owner = port_owner(int(port))
        who = describe_process(owner) if owner else "a process this user cannot inspect"
        stop = f"stop it with `kill {owner.pid}`" if owner else "stop it"
        raise LaunchError(
            f"port {port} ({var}) is taken by {who}: that is not this run's SuperLink, and `flwr run` would run "
            f"the app in its environment; {stop} (or `make stop-superlink` in its checkout), or unset {var} so "
            "that this run picks free ports"
        )


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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


def stop_local_superlink(flwr_home: Path | None = None) -> int:
    """Stop the local simulation SuperLink(s) of ``flwr_home`` (default: ``$FLWR_HOME``) and what they started.

    Only processes of that Flower home, found by ``FLWR_HOME`` in their environment or the home's
    path on their command line (a SuperLink's ``--database`` lies under it), so that another
    checkout's SuperLink is left alone. For a SuperLink left by a run that was killed with SIGKILL.
    """
    home = str((flwr_home or _flwr_home()).resolve())
    procs = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("FLWR_HOME") == home or any(home in arg for arg in proc.cmdline()):
                procs.append(proc)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(procs)


def _flwr_home() -> Path:
    """Flower's home as the CLI resolves it: ``$FLWR_HOME`` or ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def demo(overrides: list[str], app_dir: Path, flwr_home: Path) -> int:
    """``flwr run`` of the composed experiment, its output live, and nothing left running afterwards.

    The simulation size comes from the config; the local SuperLink is this run's own (fresh ports,
    ``flwr_home``) and is stopped with everything it started when the run ends, fails, or is
    interrupted (Ctrl-C, SIGTERM). A deployment experiment is submitted to its SuperLink connection.
    Returns the exit status of ``flwr run`` (2 for a config or launch problem, 130 when interrupted).
    """
    text = join_overrides(overrides)
    try:
        exp = load(overrides)
        fed = exp.federation
        fed_config = federation_config(exp) if fed.kind != "deployment" else None
        where = device_report(str(exp.cfg.device), float(fed.client_gpus)) if fed_config else None
        print(f"device: {where or 'each SuperNode resolves device=' + str(exp.cfg.device) + ' where it trains'}")
        with sigterm_as_interrupt():
            if fed.kind == "deployment":
                proc = flwr_run(text, None, None, app_dir, timeout=None, connection=fed.connection, echo=sys.stdout)
            else:
                proc = flwr_run(text, fed_config, flwr_home, app_dir, None, simulation_env(exp), echo=sys.stdout)
    except (ConfigError, LaunchError) as err:
        print(err, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run and the SuperLink it started are stopped", file=sys.stderr)
        return 130
    if proc.returncode < 0:  # not a failure of the app: something outside stopped `flwr run`
        name = signal.Signals(-proc.returncode).name
        print(f"`flwr run` was stopped by {name} from outside; the run's processes are stopped", file=sys.stderr)
        return 128 - proc.returncode
    return proc.returncode


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM unwinds like Ctrl-C (``KeyboardInterrupt``), so the ``finally`` of
    :func:`flwr_run` stops every process of the running job: ``kill``, a scheduler or a CI timeout
    otherwise ends Python at once and leaves the SuperLink, the simulation and Ray running. The
    previous handler is restored after (signals can only be set from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def join_overrides(overrides: list[str]) -> str:
    """One override string for the app's run config (``shlex``-splittable; double quotes where needed)."""
    for item in overrides:
        if "'" in item:
            raise ConfigError(f"invalid configuration: override {item!r}: use double quotes, not single quotes")
    return " ".join(f'"{o}"' if any(c.isspace() for c in o) else o for o in overrides)


USAGE = (
    "usage: python -m pf2lora_core.tools.launch "
    "{demo [overrides...] | federation-config [overrides...] | stop-superlink}"
)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("demo", "federation-config", "stop-superlink"):
        print(USAGE, file=sys.stderr)
        return 2
    if args[0] == "stop-superlink":
        print(f"stopped {stop_local_superlink()} process(es) of the local SuperLink under {_flwr_home()}")
        return 0
    if args[0] == "demo":
        from pf2lora_core.config.experiment import conf_dir

        return demo(args[1:], conf_dir().parent, _flwr_home())
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
