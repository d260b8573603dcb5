"""The config a client receives, turned into an OmegaConf config as data only: bounded, plain, never resolved.

The server sends its resolved experiment config as YAML text (``protocol.CONFIG_YAML_KEY``). To the
client that text is untrusted input, so ``parse_received_config`` takes it in four steps, each of
which refuses with a ``ConfigRejectedError`` whose message is chosen here (a rule, a line number or a
key path of the server's own text), never a parser's exception text:

1. the size is bounded before any parsing (``MAX_CONFIG_BYTES``);
2. the YAML event stream is checked before anything is built: no alias or anchor (a 275-byte
   "billion laughs" alias bomb otherwise costs seconds of CPU and tens of MiB), no tag
   (``!!python/...``, ``!x``), one document, bounded nesting depth and node count;
3. the plain data is built with a safe loader that has OmegaConf's own scalar rules, and every
   key and string value is walked: an interpolation (``${``) or OmegaConf's missing marker
   (``???``) is refused whatever escape it arrived in (``"\\u0024{oc.env:HOME}"``, ``"\\x24{"``, a
   folded scalar), because after parsing it is the same string and OmegaConf would resolve it;
4. only then is the OmegaConf config created, from that checked container, never from the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from pf2lora_core.federation.node_policy import PolicyError

# A real resolved config is about 2 KiB (``load([]).to_yaml()``); long label lists or data-file maps
# stay far below these, and the bounds keep the worst case of a hostile text well under a second.
MAX_CONFIG_BYTES = 256 * 1024
MAX_DEPTH = 32  # mappings and sequences nested; a real config nests 3 deep
MAX_NODES = 10_000  # scalars, mappings and sequences; a real config has ~150 (OmegaConf builds ~20k/s)
INTERPOLATION = "${"  # OmegaConf's interpolation and resolver syntax (``${x}``, ``${oc.env:X}``)
MISSING = "???"  # OmegaConf's mandatory-missing marker: never in a resolved config
SHOWN_PATH_CHARS = 120  # a key path quoted back to the server is cut to this length

_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
# OmegaConf 2.3's implicit float rule (omegaconf._utils.get_yaml_loader): ``1e-3`` is a float, as
# YAML 1.1 alone would not have it; kept identical so that a config reads back as OmegaConf reads it
_OMEGACONF_FLOAT = re.compile(
    r"""^(?:
     [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_PLAIN_TYPES = (str, int, float, bool, type(None))
_OPENERS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSERS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
_NODES = (yaml.ScalarEvent, *_OPENERS)


class ConfigRejectedError(PolicyError):
    """The received config is not plain, bounded YAML data. ``str()`` is chosen by this module only."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(rule, message, prefix="config rejected")


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where installed


class _PlainLoader(_BaseLoader):
    """A safe loader with OmegaConf's scalar rules (no timestamps, ``1e-3`` a float) and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:  # YAML would keep the last silently; the sender meant one
                    line = _line(key_node)
                    raise ConfigRejectedError("duplicate-key", f"a key appears twice in one mapping (line {line})")
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_PlainLoader.add_implicit_resolver(_FLOAT_TAG, _OMEGACONF_FLOAT, list("-+0123456789."))
_PlainLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
    for first, resolvers in _PlainLoader.yaml_implicit_resolvers.items()
}


def parse_received_config(text: str) -> DictConfig:
    """The received YAML text as an OmegaConf config of plain data; ``ConfigRejectedError`` if it is anything else."""
    _check_size(text)
    _check_events(text)
    data = _load(text)
    if not isinstance(data, dict):
        raise ConfigRejectedError("shape", "the config is not a YAML mapping; send OmegaConf.to_yaml of the config")
    _check_plain(data, ())
    return OmegaConf.create(data)  # the checked container: nothing in it is an interpolation


def _check_size(text: str) -> None:
    # a character is at least one byte: a long text is refused before it is encoded
    if len(text) > MAX_CONFIG_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigRejectedError("size", f"larger than {MAX_CONFIG_BYTES} bytes")


def _check_events(text: str) -> None:
    """Refuse aliases, anchors, tags, several documents, deep nesting and too many nodes, before building."""
    depth = nodes = documents = 0
    for event in _events(text):
        line = _line(event)
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ConfigRejectedError("alias", f"YAML anchor or alias at line {line}; send plain data without & or *")
        if getattr(event, "tag", None) is not None or getattr(event, "tags", None):
            raise ConfigRejectedError("tag", f"YAML tag at line {line}; send plain data without ! or !! tags")
        documents += isinstance(event, yaml.DocumentStartEvent)
        nodes += isinstance(event, _NODES)
        depth += isinstance(event, _OPENERS) - isinstance(event, _CLOSERS)
        if documents > 1:
            raise ConfigRejectedError("documents", f"a second YAML document at line {line}; send one")
        if depth > MAX_DEPTH:
            raise ConfigRejectedError("depth", f"nested deeper than {MAX_DEPTH} levels (line {line})")
        if nodes > MAX_NODES:
            raise ConfigRejectedError("nodes", f"more than {MAX_NODES} YAML nodes (line {line})")


def _events(text: str) -> Iterator[yaml.Event]:
    """The parser's events, one at a time (an alias is seen before anything is expanded)."""
    try:
        yield from yaml.parse(text, Loader=_PlainLoader)
    except yaml.MarkedYAMLError as err:
        raise ConfigRejectedError("yaml", f"not valid YAML (line {_line(err.problem_mark)})") from err
    except (yaml.YAMLError, UnicodeError) as err:  # a reader error, a lone surrogate
        raise ConfigRejectedError("yaml", "not valid YAML text (unreadable characters)") from err


def _load(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_PlainLoader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as err:  # e.g. a mapping used as a key
        raise ConfigRejectedError("yaml", f"not valid YAML data (line {_line(err.problem_mark)})") from err
    except (yaml.YAMLError, UnicodeError, ValueError) as err:  # ValueError: an int past Python's digit limit
        raise ConfigRejectedError("yaml", "not valid YAML data (a scalar could not be read)") from err


def _check_plain(value: Any, path: tuple[str, ...]) -> None:
    """Every key a string, every value plain data, and no interpolation or missing marker in any of them."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigRejectedError("key", f"a key under {_shown(path)} is not a string; quote it")
            if INTERPOLATION in key:
                raise ConfigRejectedError("interpolation", f"interpolation in a key under {_shown(path)}")
            _check_plain(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_plain(item, (*path, f"[{index}]"))
    elif not isinstance(value, _PLAIN_TYPES):
        raise ConfigRejectedError("value", f"the value at {_shown(path)} is not a string, number, boolean or null")
    elif isinstance(value, str) and INTERPOLATION in value:
        raise ConfigRejectedError(
            "interpolation", f"interpolation in the value at {_shown(path)}; send a resolved config"
        )
    elif value == MISSING:
        raise ConfigRejectedError("missing", f"the value at {_shown(path)} is the OmegaConf missing marker {MISSING}")


def _shown(path: tuple[str, ...]) -> str:
    """A key path of the server's own text, printable and short, for the refusal it gets back."""
    if not path:
        return "the top level"
    joined = ".".join(path).replace(".[", "[")
    printable = "".join(c if c.isprintable() and c != "'" else "?" for c in joined)  # one quoted span
    cut = printable if len(printable) <= SHOWN_PATH_CHARS else printable[: SHOWN_PATH_CHARS - 3] + "..."
    return f"'{cut}'"


def _line(marked: Any) -> int:
    mark = getattr(marked, "start_mark", marked)
    return int(getattr(mark, "line", -1)) + 1
