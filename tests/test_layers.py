"""The package's rooms and their one-way dependencies: an import contract, checked on the source.

``pf2lora_core`` never imports Flower (``flwr``; ``flwr_datasets`` is a separate data library), and its
rooms depend downwards only, in ``LAYERS`` order: what trains knows nothing of federation, runs or
tools; a run's files know nothing of the federation that writes them; the console tools sit on top.
Imports under ``if TYPE_CHECKING:`` (annotations only) are not dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pf2lora_core"
# bottom to top; a module may import its own layer or any layer below it (longest prefix decides)
LAYERS = (
    "run.console",  # logging set-up every layer may use
    "config.schema",
    "config.keys",
    "data",
    "training",
    "algorithms",
    "run",
    "config.experiment",  # composition: reads every registry below it
    "federation",
    "analysis",
    "tools",
)


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _layer(module: str) -> int | None:
    matches = [(len(name), i) for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    return max(matches)[1] if matches else None


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> list[str]:
    out: list[str] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out += _imports(node)
    return out


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_lives_in_a_room() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside a room: {loose}"
    unplaced = [_module(p) for p in SOURCES if p.name != "__init__.py" and _layer(_module(p)) is None]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module(p))
def test_no_flower_and_dependencies_point_down(path: Path) -> None:
    imports = _imports(ast.parse(path.read_text(encoding="utf-8")))
    assert not [m for m in imports if m == "flwr" or m.startswith("flwr.")], f"{path} imports flwr"
    own = _layer(_module(path))
    if own is None:
        return
    upward = sorted(
        {m for m in imports if m.startswith("pf2lora_core.") and (_layer(m.removeprefix("pf2lora_core.")) or -1) > own}
    )
    assert not upward, f"{_module(path)} ({LAYERS[own]}) imports from layers above it: {upward}"


def test_the_contract_catches_an_upward_import(tmp_path: Path) -> None:
    tree = ast.parse("from pf2lora_core.federation.rounds import RoundLog\nimport flwr.app\n")
    imports = _imports(tree)
    assert _layer("training.solver") < _layer(imports[0].removeprefix("pf2lora_core.")) and "flwr.app" in imports
    guarded = ast.parse("if TYPE_CHECKING:\n    from pf2lora_core.tools import sweep\n")
    assert not [m for m in _imports(guarded) if m.startswith("pf2lora_core")]
