"""Fuzz: the config YAML a client receives (``received_config.parse_received_config``).

For any text the parser either returns an OmegaConf config holding no interpolation anywhere, or
raises ``ConfigRejectedError`` in words of its own (one of ``SHAPES``); it never resolves anything
(a spy resolver and a planted environment variable are never read), and it answers in bounded time
(an alias bomb is refused in well under a second). Hostile strategies build ``${...}`` through every
YAML encoding that yields the same string after parsing, tags, anchors and aliases, deep nesting
and oversized texts; a differential property checks that plain data reads back exactly as
OmegaConf itself reads it, and the real default config round-trips to an equal experiment.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from pf2lora_core.config.experiment import load, parse
from pf2lora_core.federation.received_config import (
    INTERPOLATION,
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_NODES,
    ConfigRejectedError,
    parse_received_config,
)

SPY = "fuzz_spy"  # a resolver that records every call: none may happen
SPY_CALLS: list[str] = []
SECRET_ENV = "PF2LORA_FUZZ_SECRET"
SECRET = "client-side-secret-4711"
SECONDS = 3.0  # any text: refused or accepted within this (the worst valid case takes ~0.7 s here)
BOMB_SECONDS = 1.0
# Everything a refusal may say, with numbers as N and a quoted key path (the server's own text) as P
SHAPES = {
    "config rejected [size]: larger than N bytes",
    "config rejected [yaml]: not valid YAML (line N)",
    "config rejected [yaml]: not valid YAML text (unreadable characters)",
    "config rejected [yaml]: not valid YAML data (line N)",
    "config rejected [yaml]: not valid YAML data (a scalar could not be read)",
    "config rejected [alias]: YAML anchor or alias at line N; send plain data without & or *",
    "config rejected [tag]: YAML tag at line N; send plain data without ! or !! tags",
    "config rejected [documents]: a second YAML document at line N; send one",
    "config rejected [depth]: nested deeper than N levels (line N)",
    "config rejected [nodes]: more than N YAML nodes (line N)",
    "config rejected [duplicate-key]: a key appears twice in one mapping (line N)",
    "config rejected [shape]: the config is not a YAML mapping; send OmegaConf.to_yaml of the config",
    "config rejected [key]: a key under P is not a string; quote it",
    "config rejected [interpolation]: interpolation in a key under P",
    "config rejected [interpolation]: interpolation in the value at P; send a resolved config",
    "config rejected [value]: the value at P is not a string, number, boolean or null",
    "config rejected [missing]: the value at P is the OmegaConf missing marker ???",
}


@pytest.fixture(scope="module", autouse=True)
def spy_and_secret() -> Iterator[None]:
    OmegaConf.register_new_resolver(SPY, lambda *args: SPY_CALLS.append(repr(args)) or SECRET, replace=True)
    os.environ[SECRET_ENV] = SECRET
    try:
        yield
    finally:
        OmegaConf.clear_resolver(SPY)
        os.environ.pop(SECRET_ENV, None)


def shape(message: str) -> str:
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'|the top level", "P", message))


def strings(value: Any) -> Iterator[str]:
    """Every key and string value of a plain container."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


def outcome(text: str, limit: float = SECONDS) -> DictConfig | ConfigRejectedError:
    """Parse ``text`` and check the invariants every input must meet; the config or the refusal."""
    SPY_CALLS.clear()
    start = time.perf_counter()
    try:
        result: DictConfig | ConfigRejectedError = parse_received_config(text)
    except ConfigRejectedError as err:
        result = err
    elapsed = time.perf_counter() - start
    assert elapsed < limit, f"{elapsed:.2f} s for {len(text)} characters"
    assert not SPY_CALLS, SPY_CALLS
    if isinstance(result, ConfigRejectedError):
        assert shape(str(result)) in SHAPES, str(result)
        if result.__cause__ is not None and len(str(result.__cause__)) > 3:
            assert str(result.__cause__) not in str(result)
        return result
    assert isinstance(result, DictConfig)
    found = list(strings(OmegaConf.to_container(result, resolve=False)))
    assert not [s for s in found if INTERPOLATION in s or SECRET in s], found
    OmegaConf.to_container(result, resolve=True)  # nothing left to resolve: no spy call, no env read
    assert not SPY_CALLS, SPY_CALLS
    return result


def refused(text: str, *rules: str, limit: float = SECONDS) -> ConfigRejectedError:
    result = outcome(text, limit)
    assert isinstance(result, ConfigRejectedError), f"accepted: {text[:200]!r}"
    assert result.rule in rules, (result.rule, str(result))
    return result


# ------------------------------------------------------------------------------- any text at all
@given(st.text())
def test_any_text_is_a_plain_config_or_refused_in_fixed_words(text: str) -> None:
    outcome(text)


@given(st.text(alphabet="${}:!&*-[]?,#'\"\\ \n\tabx0123.|>%"))
def test_yaml_punctuation_soup_is_a_plain_config_or_refused_in_fixed_words(text: str) -> None:
    outcome(text)


# ----------------------------------------------------------- interpolation in any encoding
TARGETS = st.sampled_from([f"oc.env:{SECRET_ENV}", f"{SPY}:x", "task.name", f"oc.env:{SECRET_ENV},d"])
ESCAPES = {
    "plain": lambda t: f"${{{t}}}",
    "single-quoted": lambda t: f"'${{{t}}}'",
    "double-quoted": lambda t: f'"${{{t}}}"',
    "\\u0024": lambda t: f'"\\u0024{{{t}}}"',
    "\\x24": lambda t: f'"\\x24{{{t}}}"',
    "\\U00000024": lambda t: f'"\\U00000024{{{t}}}"',
    "\\x24 and \\x7b": lambda t: f'"\\x24\\x7b{t}}}"',
    "escaped line break": lambda t: f'"$\\\n    {{{t}}}"',
    "literal block": lambda t: f"|\n    ${{{t}}}",
    "folded block": lambda t: f">-\n    ${{{t}}}",
    "flow list": lambda t: f"[a, '${{{t}}}']",
}


@st.composite
def interpolated(draw: st.DrawFn) -> str:
    """A config with ``${...}`` in one value or key, written in one of the encodings above."""
    target, encoding = draw(TARGETS), draw(st.sampled_from(sorted(ESCAPES)))
    scalar = ESCAPES[encoding](target)
    prefix = draw(st.sampled_from(["", "a: 1\n", "model:\n  x: 2\n"]))
    if draw(st.booleans()) or encoding in ("literal block", "folded block", "escaped line break", "flow list"):
        return f"{prefix}task:\n  name: {scalar}\n"
    key = scalar if encoding not in ("plain",) else f'"{scalar}"'
    return f"{prefix}task:\n  {key}: 1\n"


@given(interpolated())
def test_interpolation_in_any_encoding_is_refused_unresolved(text: str) -> None:
    assert any(INTERPOLATION in s for s in strings(yaml.safe_load(text))), text  # the escape does work
    err = refused(text, "interpolation")
    assert SECRET_ENV not in str(err) and SPY not in str(err)  # where, never what: no value is echoed


# ------------------------------------------------------------------------ tags, anchors, aliases
TAGGED = st.sampled_from(
    [
        "!!python/object/apply:os.system ['true']",
        "!!python/name:os.system",
        "!!binary aGVsbG8=",
        "!!str 1",
        "!!set {a, b}",
        "!custom x",
        "! x",
        "!<tag:yaml.org,2002:str> x",
        "!!python/object/apply:pathlib.Path ['/etc/passwd']",
    ]
)


@given(TAGGED, st.sampled_from(["value", "key", "mapping", "sequence"]))
def test_any_tag_is_refused(tagged: str, where: str) -> None:
    text = {
        "value": f"a: {tagged}\n",
        "key": f"? {tagged}\n: 1\n",
        "mapping": "a: !!map {b: 1}\n",
        "sequence": "a: !!seq [1]\n",
    }[where]
    refused(text, "tag")


@st.composite
def alias_bombs(draw: st.DrawFn) -> str:
    """'Billion laughs': each level a list of aliases to the level below (fan-out ** levels strings)."""
    fan_out, levels = draw(st.integers(2, 12)), draw(st.integers(1, 12))
    lines = [f"l0: &l0 [{', '.join(['lol'] * fan_out)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan_out)}]" for i in range(1, levels + 1)]
    if draw(st.booleans()):  # as a merge key, or in flow style
        lines.append(f"top: {{<<: *l{levels}}}" if draw(st.booleans()) else f"top: *l{levels}")
    return "\n".join(lines) + "\n"


@given(alias_bombs())
def test_alias_bombs_are_refused_before_expansion(text: str) -> None:
    refused(text, "alias", limit=BOMB_SECONDS)


def test_the_275_byte_billion_laughs_is_refused_fast() -> None:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    assert len(text) < 400
    refused(text, "alias", limit=BOMB_SECONDS)


@given(st.sampled_from(["a: &x 1\n", "a: &x {b: 1}\n", "a: &x [1]\n", "&x a: 1\n", "a: [&x 1, 2]\n"]))
def test_an_anchor_alone_is_refused(text: str) -> None:
    refused(text, "alias")


# ---------------------------------------------------------------------- depth, size, node count
@given(st.integers(MAX_DEPTH + 1, 3 * MAX_DEPTH), st.sampled_from(["flow-list", "flow-map", "block"]))
def test_deep_nesting_is_refused(depth: int, style: str) -> None:
    text = {
        "flow-list": "a: " + "[" * depth + "1" + "]" * depth,
        "flow-map": "a: " + "{b: " * depth + "1" + "}" * depth,
        "block": "".join("  " * i + "a:\n" for i in range(depth)) + "  " * depth + "b: 1\n",
    }[style]
    refused(text, "depth")


@given(st.integers(100_000, 2_000_000), st.sampled_from(["[", "{a: ", "- "]))
def test_unbalanced_nesting_of_any_depth_is_refused(depth: int, opener: str) -> None:
    refused(opener * (depth // len(opener)), "depth", "yaml", "size")


@given(st.integers(MAX_CONFIG_BYTES + 1, 4 * MAX_CONFIG_BYTES), st.sampled_from(["x", "é", "\U0001f600"]))
def test_oversized_text_is_refused_before_parsing(size: int, char: str) -> None:
    text = "a: " + char * size
    assert len(text.encode()) > MAX_CONFIG_BYTES
    refused(text, "size", limit=0.5)


def test_one_byte_over_the_bound_is_refused_and_the_bound_itself_is_accepted() -> None:
    at_bound = "a: " + "x" * (MAX_CONFIG_BYTES - 3)
    assert isinstance(outcome(at_bound), DictConfig)
    refused(at_bound + "x", "size")
    refused("a: " + "é" * (MAX_CONFIG_BYTES // 2), "size")  # bytes count, not characters


def test_too_many_nodes_are_refused_and_the_most_allowed_stays_fast() -> None:
    refused("a: [" + ",".join(["1"] * MAX_NODES) + "]", "nodes")
    largest = "a: [" + ",".join(["x" * 20] * (MAX_NODES - 3)) + "]"  # ~200 KiB, mapping, key and list: MAX_NODES
    assert isinstance(outcome(largest), DictConfig)


# ------------------------------------------------------------------------ other malformed inputs
@given(
    st.sampled_from(
        [
            ("a: 1\n---\nb: 2\n", "documents"),
            ("a: 1\na: 2\n", "duplicate-key"),
            ("- 1\n- 2\n", "shape"),
            ("just a string\n", "shape"),
            ("", "shape"),
            ("1: a\n", "key"),
            ("null: a\n", "key"),
            ("a: {1.5: x}\n", "key"),
            ("0E0: x\n", "key"),  # found by the plain-data property: OmegaConf's float rule reads 0E0 as 0.0
            ("a: ???\n", "missing"),
            ("? [a, b]\n: 1\n", "yaml"),
            ("a: " + "9" * 5000 + "\n", "yaml"),
            ("a: \x00\n", "yaml"),
            ("a: \ud800\n", "yaml"),
            ("a: [1\n", "yaml"),
            ("%TAG ! tag:example.com,2000:\n---\na: 1\n", "tag"),
        ]
    )
)
def test_malformed_configs_are_refused_by_rule(case: tuple[str, str]) -> None:
    text, rule = case
    refused(text, rule)


# --------------------------------------------------------------- plain data reads as OmegaConf reads it
KEYS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: INTERPOLATION not in s
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False),
    st.sampled_from(["1e-3", "1e3", "2001-01-01", "0o17", "0x1f", "1_000", "yes", "off", "~", ".inf", "1:30"]),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
).filter(lambda v: not (isinstance(v, str) and (INTERPOLATION in v or v == "???")))
PLAIN = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=25
)


@given(st.dictionaries(KEYS, PLAIN, min_size=1, max_size=6), st.sampled_from(["omegaconf", "block", "flow"]))
def test_plain_data_reads_back_exactly_as_omegaconf_reads_it(data: dict, style: str) -> None:
    """What the server sends (OmegaConf.to_yaml) is accepted; any plain YAML reads as OmegaConf reads it.

    PyYAML's dumper does not know OmegaConf's float rule: it writes a key ``0E0`` unquoted, which
    OmegaConf reads as the float 0.0; such a key is refused (keys are strings), never read otherwise.
    """
    if style == "omegaconf":
        text = OmegaConf.to_yaml(OmegaConf.create(data))
    else:
        text = yaml.safe_dump(data, default_flow_style=style == "flow", allow_unicode=True)
    ours = outcome(text)
    theirs = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    if isinstance(ours, ConfigRejectedError):
        assert style != "omegaconf" and ours.rule == "key", str(ours)
        assert not all(isinstance(k, str) for k in _keys(theirs)), theirs
    else:
        assert OmegaConf.to_container(ours, resolve=False) == theirs


def _keys(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


# ------------------------------------------------------------------------------- the real config
@pytest.mark.parametrize("overrides", [[], ["algorithm=homlora"], ["federation=deployment", "federation.connection=x"]])
def test_a_real_config_round_trips_to_an_equal_experiment(overrides: list[str]) -> None:
    exp = load(overrides)
    text = exp.to_yaml()
    assert len(text.encode()) * 50 < MAX_CONFIG_BYTES  # the bound is generous for real configs
    again = parse(parse_received_config(text))
    assert again.to_yaml() == text
    assert (again.task, again.model, again.partition, again.federation, again.generation) == (
        exp.task, exp.model, exp.partition, exp.federation, exp.generation,
    )  # fmt: skip
    assert type(again.algorithm) is type(exp.algorithm) and again.algorithm.params == exp.algorithm.params
