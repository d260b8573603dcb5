"""The app bundle (FAB) `flwr run` sends holds the app's code and configuration only.

A copy of this checkout, with a site's data, results, keys, certificates, a run and notes planted
where an operator might leave them (also inside the packed folders, with other file types), is
packed by the real ``flwr build``; the bundle holds pyproject.toml, the two apps, the library and the
Hydra tree, nothing planted, and exactly what ``launch.fab_paths`` says Flower packs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pf2lora_core.tools.launch import fab_paths

ROOT = Path(__file__).resolve().parents[2]
FLWR = Path(sys.executable).parent / "flwr"
APP_NAME = "pf2lora"  # flwr build wants the app's folder named like an app: a letter, then letters, digits, -
PACKED_DIRS = {"client_app": ".py", "server_app": ".py", "pf2lora_core": ".py", "conf": ".yaml"}
WRITTEN_BY_FLOWER = {"pyproject.toml", ".info/CONTENT"}
PLANTED = (
    "data/site.jsonl",
    "data/site.csv",
    "results/x.json",
    "results/README.md",
    "certs/server.key",
    "certs/server.pem",
    "certs/ca.crt",
    "keys/node.key",
    "outputs/run/summary.json",
    "outputs/run/config.yaml",
    ".state/run/client_0/private.json",
    "runs/lr=0.1,seed=0/metrics.jsonl",
    "notes.md",
    "site.yaml",
    "docs/site.md",
    "benchmarks/site.py",
    "tests/helpers/site.py",
    "conf/site.jsonl",  # inside a packed folder, not of its type
    "conf/secrets.json",
    "pf2lora_core/site.jsonl",
    "client_app/server.key",
    "server_app/notes.md",
)


def _copy_checkout(dest: Path) -> None:
    """The checkout's files as git sees them (tracked and untracked, not ignored); else the tree without .git/.venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=False
    )
    if listed.returncode != 0:
        ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "outputs", ".state", ".flwr_home", "*.fab")
        shutil.copytree(ROOT, dest, ignore=ignore)
        return
    for rel in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / rel
        if source.is_file() and not source.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)


@pytest.fixture(scope="module")
def fab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The app folder (a planted copy of the checkout) and the names inside the FAB ``flwr build`` made of it."""
    work = tmp_path_factory.mktemp("fab")
    app = work / APP_NAME
    _copy_checkout(app)
    for rel in PLANTED:
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text("SITE-SECRET\n")
    built = subprocess.run([str(FLWR), "build", "--app", str(app)], cwd=work, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    (bundle,) = work.glob("*.fab")
    with zipfile.ZipFile(bundle) as z:
        return app, z.namelist()


def test_the_fab_holds_the_apps_the_library_and_conf_only(fab: tuple[Path, list[str]]) -> None:
    _, names = fab
    outside = [n for n in names if n not in WRITTEN_BY_FLOWER and n.split("/")[0] not in PACKED_DIRS]
    assert not outside, outside
    wrong_type = [n for n in names if n not in WRITTEN_BY_FLOWER and not n.endswith(PACKED_DIRS[n.split("/")[0]])]
    assert not wrong_type, wrong_type
    assert {"client_app/app.py", "server_app/app.py", "conf/config.yaml", "pyproject.toml"} <= set(names)


def test_nothing_planted_is_packed(fab: tuple[Path, list[str]]) -> None:
    _, names = fab
    assert not set(PLANTED) & set(names), sorted(set(PLANTED) & set(names))


def test_the_fab_is_what_launch_says_flower_packs(fab: tuple[Path, list[str]]) -> None:
    app, names = fab
    assert sorted(set(names) - WRITTEN_BY_FLOWER) == fab_paths(app)
