"""What every benchmark's ``--smoke`` mode shares: its checks, its one verdict line, a tiny model, results/ untouched.

A smoke run is the benchmark's own code at tiny sizes (seconds, not minutes) followed by checks
that its numbers mean something (finite, positive, the quantity measured was there to measure).
It ends with exactly one verdict line, ``SMOKE <name>: ok (<n> checks)`` or
``SMOKE <name>: FAILED: <what>; ...``, and exits 1 on failure; tests/benchmarks/test_benchmarks_smoke.py runs
every benchmark so (``make bench-smoke``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.federated import REVIEWS, Sizes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
VERDICT = "SMOKE {name}: {verdict}"


class Checks:
    """Named requirements of one smoke run, reported together at the end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.passed = 0
        self.failed: list[str] = []

    def require(self, ok: bool, what: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed.append(what)
        return ok

    def finite(self, value: Any, what: str, low: float = -math.inf, high: float = math.inf) -> bool:
        """``value`` is a finite number in ``[low, high]``."""
        ok = isinstance(value, int | float) and math.isfinite(value) and low <= value <= high
        return self.require(ok, f"{what} = {value!r} finite in [{low:g}, {high:g}]")

    def json_line(self, text: str, what: str) -> Any:
        """The parsed JSON of ``text`` (one line), or None with a failed check."""
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            self.require(False, f"{what} parses as JSON ({err})")
            return None

    def finish(self) -> int:
        """Print the verdict line; the exit status (0: every check passed)."""
        verdict = ("FAILED: " + "; ".join(self.failed)) if self.failed else f"ok ({self.passed} checks)"
        print(VERDICT.format(name=self.name, verdict=verdict), flush=True)
        return 1 if self.failed else 0


def tiny_bert(folder: Path) -> Path:
    """A 2-layer, hidden-32 random BERT saved like a Hub checkpoint with MiniLM's tokenizer (``model.source=path``).

    The same checkpoint the end-to-end tests use (tests/helpers/tiny_bert.py), so smoke runs and tests
    exercise one model.
    """
    from tests.helpers.tiny_bert import make_tiny_bert

    return make_tiny_bert(folder)


def tiny_model_overrides(folder: Path) -> list[str]:
    """Hydra overrides putting the tiny BERT of ``tiny_bert(folder)`` in place of the configured model."""
    return ["model.source=path", f"model.name={tiny_bert(folder)}"]


def tiny_sizes(folder: Path) -> TinySizes:
    """``TinySizes`` with the tiny BERT saved under ``folder``."""
    return TinySizes(model_dir=str(tiny_bert(folder / "tiny-bert")))


@dataclasses.dataclass(frozen=True)
class TinySizes(Sizes):
    """Run sizes of a smoke run of ``benchmarks.federated``: the tiny BERT of ``model_dir`` in place of MiniLM.

    ``federated.run`` applies ``Sizes.overrides`` before a job's own; these add the model after
    MiniLM's (``model=minilm`` stays the config group, so its pooling and target modules hold). A
    run log of these sizes never matches a real one (``model_dir`` is part of the sizes it records).
    """

    clients: int = 2
    examples: int = 160  # 80 snippets a client: 56 train / 8 validation / 16 test
    rounds: int = 1
    local_steps: int = 1
    model_dir: str = ""

    def overrides(self, setting: str) -> list[str]:
        extra = [] if setting == REVIEWS else ["model.source=path", f"model.name={self.model_dir}"]
        return [*super().overrides(setting), *extra]


def fingerprint(folder: Path = RESULTS) -> str:
    """A hash of every file's path, size and modification time under ``folder`` (smoke runs must not write there)."""
    digest = hashlib.sha256()
    if folder.exists():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
