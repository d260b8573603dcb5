"""Every citation of the design document in the code points at docs/DESIGN.md and a section it has."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "DESIGN.md"
# where the code and its configuration live (results/ and docs/ are prose about the code, not code)
SCOPE = ("pf2lora_core", "server_app", "client_app", "benchmarks", "tests", "conf", "docker", "scripts")
FILES = ("README.md", "Makefile", "pyproject.toml")
MENTION = re.compile(r"\bDESIGN\b")  # any mention of a design document, with or without ".md"
CITATION = re.compile(r'docs/DESIGN\.md, "([^"]+)"')  # the one accepted form


def _sections() -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", DOC.read_text(encoding="utf-8"), re.M)}


def _sources() -> list[Path]:
    paths = [ROOT / name for name in FILES]
    for folder in SCOPE:
        paths += [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [p for p in paths if p.is_file() and p != Path(__file__).resolve()]


def _mentions() -> list[tuple[str, str | None]]:
    """(where, cited section or None when the mention is not a well-formed citation), for every mention."""
    out = []
    for path in _sources():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary files cite nothing
        for m in MENTION.finditer(text):
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            cited = CITATION.match(text, m.start() - len("docs/"))
            out.append((where, cited.group(1) if cited else None))
    return out


def test_design_document_exists_with_its_sections() -> None:
    sections = _sections()
    expected = {"Layers", "The update rule", "Hypergradient", "Server averaging", "Message contracts", "Run directory"}
    assert expected <= sections


def test_every_design_citation_names_docs_design_md_and_an_existing_section() -> None:
    mentions = _mentions()
    assert len(mentions) >= 10  # the solver, hypergradient, strategy, run directory, ... cite it
    malformed = [where for where, section in mentions if section is None]
    assert not malformed, f'cite the design as docs/DESIGN.md, "<section>": {malformed}'
    sections = _sections()
    unknown = [(where, section) for where, section in mentions if section not in sections]
    assert not unknown, f"sections missing from docs/DESIGN.md: {unknown}"


def test_a_bare_or_unknown_citation_is_caught() -> None:
    text = 'see DESIGN.md; also docs/DESIGN.md, "No such section"; and docs/DESIGN.md, "Layers"'
    found = [CITATION.match(text, m.start() - len("docs/")) for m in MENTION.finditer(text)]
    assert found[0] is None and found[1].group(1) not in _sections() and found[2].group(1) == "Layers"
