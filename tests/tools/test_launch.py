"""Launching: private SuperLink ports, a foreign SuperLink refused, every process of a launch stopped."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pf2lora_core.config.schema import ConfigError
from pf2lora_core.tools.launch import (
    LAUNCH_MARK,
    LOCAL_PORT_VARS,
    LaunchError,
    fab_comma_paths,
    fab_paths,
    flwr_run,
    join_overrides,
    launched_processes,
    main,
    private_superlink_ports,
    refuse_foreign_superlink,
    sigterm_as_interrupt,
    stop_launched,
)
from tests.helpers.tiny_bert import make_tiny_bert


def test_fresh_distinct_free_ports_unless_chosen() -> None:
    ports = private_superlink_ports({})
    assert set(ports) == set(LOCAL_PORT_VARS)
    assert len(set(ports.values())) == len(LOCAL_PORT_VARS)
    for port in ports.values():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", int(port)))  # nothing listens there
    chosen = private_superlink_ports({LOCAL_PORT_VARS[1]: "40123"})
    assert chosen[LOCAL_PORT_VARS[1]] == "40123" and chosen[LOCAL_PORT_VARS[0]] != "40123"


def _listener(tmp_path: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    """A process (not ours to reuse) listening on a fresh port, started in ``tmp_path``."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "print(s.getsockname()[1], flush=True); time.sleep(120)\n"
    )
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_a_foreign_superlink_port_is_refused_naming_its_owner(tmp_path: Path) -> None:
    proc, port = _listener(tmp_path)
    try:
        with pytest.raises(LaunchError) as err:
            refuse_foreign_superlink({LOCAL_PORT_VARS[1]: str(port)})
        message = str(err.value)
        assert f"pid {proc.pid}" in message and f"started in {tmp_path}" in message
        assert f"kill {proc.pid}" in message and LOCAL_PORT_VARS[1] in message
        assert f"environment {Path(sys.executable).parent.parent}" in message
    finally:
        proc.kill()
        proc.wait()
    refuse_foreign_superlink({LOCAL_PORT_VARS[1]: str(port)})  # free again: no error


def test_every_marked_process_is_stopped_and_no_other(tmp_path: Path) -> None:
    marked, _ = _listener(tmp_path, {LAUNCH_MARK: "test-mark"})
    other, _ = _listener(tmp_path, {LAUNCH_MARK: "another-launch"})
    try:
        assert [p.pid for p in launched_processes("test-mark")] == [marked.pid]
        assert stop_launched("test-mark") == 1
        assert marked.wait(timeout=10) is not None
        assert launched_processes("test-mark") == [] and other.poll() is None
    finally:
        for proc in (marked, other):
            proc.kill()
            proc.wait()


def test_demo_refuses_bad_overrides_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "rounds=0"]) == 2
    assert "rounds" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="double quotes"):
        join_overrides(["name='x'"])
    assert join_overrides(["a=1", "task.name=two words"]) == 'a=1 "task.name=two words"'


def test_sigterm_unwinds_like_ctrl_c_inside_the_block_and_the_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives before this ends
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_stops_its_job_and_every_process_of_it(tmp_path: Path) -> None:
    """``kill <pf2lora-sweep>`` (a scheduler, a CI timeout) stops the running job's SuperLink,
    simulation and Ray too, says so, and exits 130; before, they outlived the sweep."""
    model = make_tiny_bert(tmp_path / "tiny-bert")
    mark = uuid.uuid4().hex
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", LAUNCH_MARK: mark}
    cmd = [sys.executable, "-m", "pf2lora_core.tools.sweep", "-m", "model.source=path", f"model.name={model}",
           "federation.num_clients=2", "task.max_examples=160", "rounds=200", f"output_dir={tmp_path / 'out'}",
           "seed=0"]  # fmt: skip
    sweep = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline and sweep.poll() is None:
            names = " ".join(" ".join(p.cmdline()) for p in launched_processes(mark))
            if "flwr-simulation" in names:  # the job's SuperLink and simulation are up
                break
            time.sleep(1)
        assert sweep.poll() is None, sweep.communicate()[1][-3000:]
        assert launched_processes(mark), "the job started no process"
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=120)
        assert sweep.returncode == 130, err[-3000:]
        assert "interrupted" in err and "resumes" in err
        deadline = time.time() + 30
        while launched_processes(mark) and time.time() < deadline:
            time.sleep(1)
        assert launched_processes(mark) == []
    finally:
        if sweep.poll() is None:
            sweep.kill()
        stop_launched(mark)


def _app_with_comma_paths(root: Path, fab_include: bool = False) -> None:
    """An app tree: a run directory named after overrides in a committed folder, one in an ignored one.

    ``fab_include``: this project's pyproject.toml, whose fab-include packs the apps, the library
    and conf/ only; else the same file without it (Flower's defaults, as for any app).
    """
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    own = pyproject if fab_include else re.sub(r"(?m)^fab-include = .*\n", "", pyproject)
    (root / "pyproject.toml").write_text(own)
    (root / ".gitignore").write_text("outputs/\n*.log\n")
    for rel in (
        "app/main.py",
        "client_app/app.py",
        "server_app/app.py",
        "pf2lora_core/core.py",
        "conf/config.yaml",
        "conf/sweep/a=1,b=2.yaml",  # packed either way
        "results/lr=0.1,seed=0/summary.json",  # packed by Flower's defaults: breaks the manifest
        "results/lr=0.1,seed=0/metrics.jsonl",
        "results/lr=0.1,seed=0/runs.tar.gz",  # not a FAB type
        "results/lr=0.1,seed=0/job.log",  # ignored by pattern
        "outputs/lr=0.1,seed=0/summary.json",  # ignored directory
        "docs/a,b.md",
        "tests/test_x.py",  # Flower's built-in exclusion
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}")


@pytest.mark.parametrize(
    ("fab_include", "expected"),
    [
        (False, ["conf/sweep/a=1,b=2.yaml", "docs/a,b.md", "results/lr=0.1,seed=0/metrics.jsonl",
                 "results/lr=0.1,seed=0/summary.json"]),
        (True, ["conf/sweep/a=1,b=2.yaml"]),
    ],
)  # fmt: skip
def test_comma_paths_flower_would_pack_are_found_as_flower_selects_them(
    tmp_path: Path, fab_include: bool, expected: list[str]
) -> None:
    import tomllib
    from flwr.cli.build import get_filtered_fab_paths
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    _app_with_comma_paths(tmp_path, fab_include)
    config = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    packed = get_filtered_fab_paths(filter_paths_for_publish(collect_files(tmp_path)), config)
    assert fab_paths(tmp_path) == sorted(packed)
    oracle = sorted(p for p in packed if "," in p)
    assert oracle == expected
    assert fab_comma_paths(tmp_path) == oracle
    assert fab_comma_paths(Path(__file__).parents[2]) == []  # this checkout packs cleanly


def test_flwr_run_refuses_an_app_with_comma_paths_before_starting_anything(tmp_path: Path) -> None:
    _app_with_comma_paths(tmp_path)
    with pytest.raises(LaunchError) as err:
        flwr_run("", "num-supernodes=1", tmp_path / "flwr_home", tmp_path, timeout=5)
    message = str(err.value)
    assert "results/lr=0.1,seed=0/summary.json" in message and "comma" in message and ".gitignore" in message
    assert "outputs/" not in message and not (tmp_path / "flwr_home").exists()
