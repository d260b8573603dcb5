"""Fuzzing the server's reply entry point (issue 27): for *any* train or evaluate reply,

(a) no exception escapes the strategy, the round record, the checkpoint or the end-of-run code
    (summary, client table, plots' input) because of the reply's content;
(b) the round's aggregate equals the aggregate of the replies it accepted, computed alone;
(c) every number that reaches metrics.jsonl or summary.json is finite and inside its bound
    (``records.METRIC_BOUNDS``);
(d) a reply counts only for the message this round sent to its own node.

Replies are real Flower records (``ArrayRecord`` of ``Array`` bytes, ``MetricRecord``,
``ConfigRecord``) on a duck-typed message, through the real ``CommonAdapterFedAvg`` hooks.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import assume, given
from hypothesis import strategies as st

from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import (
    ARRAYS_KEY,
    COMPUTE_SECONDS,
    EVAL_BLOCKS,
    EVAL_METRIC_NAMES,
    METRICS_KEY,
    NUM_EXAMPLES,
    NUM_VALIDATION,
    TRAIN_LOSS,
)
from pf2lora_core.federation.checkpoint import ServerCheckpoint
from pf2lora_core.federation.checks import json_depth, parse_details
from pf2lora_core.federation.node_policy import LABEL_HISTOGRAM
from pf2lora_core.federation.protocol import CLIENT_KEY, DETAILS_KEY
from pf2lora_core.run.records import METRIC_BOUNDS, RoundRecord, Summary
from pf2lora_core.run.summary import build_summary, format_client_table
from tests.federation.test_strategy import SENT, FakeMsg, _Meta, good, strategy

HONEST = (1, 2)
TARGET = 5  # the node (and client) whose reply is fuzzed
NAMES = [*SENT, "x.lora_A.private.weight", "", "b\x00", "a" * 200]
DTYPES = ["float32", "float16", "float64", "int64", "uint8", "bool", "complex64", "object", "<U3", "V8"]
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e6, max_value=1e6),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 1e300, 1.7e308, 9_999_999, 0.5]),
)


@st.composite
def arrays(draw: st.DrawFn) -> dict[str, Array]:
    """An uplink: right or wrong keys, shapes, dtypes, values, or bytes that are no array at all."""
    out = {}
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=4, unique=True)) or list(SENT):
        shape = (
            SENT[name].shape
            if name in SENT and draw(st.booleans())
            else tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        )
        kind = draw(st.sampled_from(["values", "bytes"]))
        if kind == "bytes":  # declared shape and dtype with arbitrary bytes behind them
            dtype = draw(st.sampled_from(DTYPES))
            out[name] = Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray", data=draw(st.binary(max_size=64)))
            continue
        dtype = draw(st.sampled_from(["float32", "float32", "float16", "float64", "int64"]))
        values = draw(st.lists(NUMBERS.filter(lambda v: isinstance(v, float)), min_size=1, max_size=4))
        arr = np.resize(np.array(values, dtype=np.float64), shape)
        with np.errstate(all="ignore"):
            out[name] = Array(np.ascontiguousarray(arr.astype(dtype)))
    return out


def metric_record(draw: st.DrawFn, keys: list[str]) -> MetricRecord:
    """A MetricRecord of the given and random keys with any number Flower can carry."""
    names = draw(st.lists(st.sampled_from(keys) | st.text(max_size=12), max_size=8, unique=True))
    values = {k: draw(NUMBERS | st.lists(st.floats(allow_nan=False, width=32), max_size=3)) for k in names}
    try:
        return MetricRecord(values)
    except Exception:  # Flower refuses it at the sender: it could never arrive
        assume(False)
        raise


TRAIN_KEYS = [CLIENT_KEY, NUM_EXAMPLES, TRAIN_LOSS, COMPUTE_SECONDS, "examples_seen", "flops_per_local_step"]


@st.composite
def train_replies(draw: st.DrawFn) -> FakeMsg:
    content: dict[str, Any] = {ARRAYS_KEY: ArrayRecord(draw(arrays()))}
    metrics = metric_record(draw, TRAIN_KEYS)
    if draw(st.booleans()):  # mostly the right client and a plausible count, so the deeper checks run
        metrics[CLIENT_KEY] = TARGET
        metrics[NUM_EXAMPLES] = draw(st.sampled_from([10, 1, 0, 1e9, float("inf")]))
        metrics[TRAIN_LOSS] = draw(NUMBERS.filter(lambda v: isinstance(v, float)))
    content[METRICS_KEY] = metrics
    if draw(st.booleans()):
        content[draw(st.sampled_from(["config", "extra", METRICS_KEY + "2"]))] = ConfigRecord({"k": "v" * 10})
    msg = FakeMsg(RecordDict(content), TARGET)
    msg.metadata = _Meta(TARGET, draw(st.sampled_from(["", "msg-5", "msg-1", "msg-old"])))
    return msg


def _accepted_alone(tmp_path: Path, s: Any, msgs: list[FakeMsg]) -> Any:
    """The aggregate of the replies ``s`` accepted, computed by a fresh strategy from those alone."""
    accepted = set(s.current.train)
    alone = strategy(tmp_path / "alone")
    arrays, _ = alone.aggregate_train(1, [m for m in msgs if m.metadata.src_node_id in accepted])
    return arrays


@given(bad=train_replies())
def test_any_train_reply_leaves_the_aggregate_of_the_accepted_ones(tmp_path_factory, bad: FakeMsg) -> None:
    tmp = tmp_path_factory.mktemp("train")
    s = strategy(tmp)
    msgs = [good(1, 1.0, n=10), bad, good(2, 3.0, n=30)]
    arrays, _ = s.aggregate_train(1, msgs)  # (a): never raises
    assert set(s.current.train) >= set(HONEST)
    alone = _accepted_alone(tmp, s, msgs)
    for (_, got), (_, want) in zip(sorted(arrays.items()), sorted(alone.items()), strict=True):  # (b)
        assert np.array_equal(got.numpy(), want.numpy())
    if TARGET in s.current.train:  # accepted: it answered this round's message, within every bound
        assert bad.metadata.reply_to_message_id == "msg-5"  # (d)
        assert all(math.isfinite(v) for v in s.current.train[TARGET].values())
    line = s.current.record(0.0, "accuracy").to_json()
    json.dumps(line, allow_nan=False)  # (c): nothing unbounded or non-finite reaches metrics.jsonl


# ------------------------------------------------------------------------------ evaluate

EVAL_KEYS = [f"{b}.{m}" for b in EVAL_BLOCKS for m in sorted(EVAL_METRIC_NAMES)]


@st.composite
def details_text(draw: st.DrawFn) -> str | None:
    """The details JSON: well-formed, wrong shapes and types, deep nesting, brackets inside strings."""
    kind = draw(st.sampled_from(["none", "json", "deep", "text"]))
    if kind == "none":
        return None
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "deep":
        n = draw(st.integers(5, 700))
        hide = draw(st.booleans())
        return ('{"rank": {"x": "' + "]" * n + '"}, "y": ' if hide else "") + "[" * n + "]" * n + ("}" if hide else "")
    leaf = st.one_of(
        NUMBERS.filter(lambda v: not isinstance(v, float) or math.isfinite(v)), st.text(max_size=5), st.none()
    )
    value = st.recursive(
        leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=10
    )
    rank = st.fixed_dictionaries(
        {"effective": value, "entropy": value},
        optional={
            "private_energy": value,
            "modules": st.dictionaries(
                st.text(max_size=4),
                st.fixed_dictionaries({"effective": value, "entropy": value, "singular_values": value}),
                max_size=2,
            ),
        },
    )
    hist = st.dictionaries(
        st.sampled_from(["train", "validation", "test", "other"]),
        st.lists(st.integers(-1, 5), max_size=4) | value,
        max_size=3,
    )
    body = draw(
        st.fixed_dictionaries({}, optional={"rank": rank | value, LABEL_HISTOGRAM: hist | value, "extra": value})
    )
    return json.dumps(body)


@st.composite
def evaluate_replies(draw: st.DrawFn) -> FakeMsg:
    metrics = metric_record(draw, [CLIENT_KEY, NUM_EXAMPLES, NUM_VALIDATION, COMPUTE_SECONDS, *EVAL_KEYS])
    if draw(st.booleans()):
        metrics[CLIENT_KEY] = TARGET
        metrics[NUM_EXAMPLES] = draw(st.sampled_from([10, 5, 1e7, 0]))
        for key in ("personalized.accuracy", "global.accuracy"):
            metrics[key] = draw(st.sampled_from([0.5, 1.0, 0.0, float("nan"), -0.1, 1e300]))
    content: dict[str, Any] = {METRICS_KEY: metrics}
    text = draw(details_text())
    if text is not None:
        content[DETAILS_KEY] = ConfigRecord({DETAILS_KEY: text})
    msg = FakeMsg(RecordDict(content), TARGET)
    msg.metadata = _Meta(TARGET, draw(st.sampled_from(["msg-5", "msg-5", "msg-2", ""])))
    return msg


def honest_eval(node: int) -> FakeMsg:
    metrics = {CLIENT_KEY: node, NUM_EXAMPLES: 10, NUM_VALIDATION: 4, "personalized.accuracy": 0.75,
               "global.accuracy": 0.5, COMPUTE_SECONDS: 1.0}  # fmt: skip
    details = json.dumps({"rank": {"effective": 2.0, "entropy": 1.5, "modules": {}},
                          LABEL_HISTOGRAM: {"train": [3, 7], "validation": [2, 2], "test": [4, 6]}})  # fmt: skip
    return FakeMsg(
        RecordDict({METRICS_KEY: MetricRecord(metrics), DETAILS_KEY: ConfigRecord({DETAILS_KEY: details})}), node
    )


@functools.cache
def _experiment() -> Any:
    return load(["federation.num_clients=6"])


@given(bad=evaluate_replies())
def test_any_evaluate_reply_keeps_the_run_and_its_output_whole(tmp_path_factory, bad: FakeMsg) -> None:
    tmp = tmp_path_factory.mktemp("eval")
    s = strategy(tmp)
    s.checker.num_labels = 2  # the head's size, as the ServerApp sets it from the model
    s.aggregate_evaluate(1, [honest_eval(1), bad, honest_eval(2)])  # (a): never raises; writes the round and checkpoint
    assert {1, 2} <= set(s.latest_eval)
    (line,) = [json.loads(x) for x in (s.run.path / "metrics.jsonl").read_text().splitlines()]
    RoundRecord.from_json(line)
    exp = _experiment()
    hists = [s.latest_eval.get(c, {}).get(LABEL_HISTOGRAM) for c in range(6)]
    summary = build_summary(exp, s.history, s.latest_eval, hists, {"common": 7}, 1.0)  # (a) at the end of the run
    written = json.dumps(summary.to_json(), allow_nan=False)  # (c): finite or null, never NaN / Infinity
    format_client_table(Summary.from_json(json.loads(written)))
    for client in summary.clients:  # (c): every recorded number inside its bound
        for results in client.results.values():
            for name, value in results.items():
                low, high = METRIC_BOUNDS.get(name, (-math.inf, math.inf))
                assert math.isnan(value) or low <= value <= high, (name, value)
    ServerCheckpoint.load(next((s.run.path / "server_state").glob("round_*.safetensors")))  # the checkpoint reads back


# ------------------------------------------------------------------------------ details JSON


@given(text=st.text(alphabet='[]{}"\\ab,:', max_size=400))
def test_depth_is_counted_outside_strings_and_parsing_never_recurses_too_deep(text: str) -> None:
    details, reason = parse_details(text)  # never raises, whatever the text
    if reason is None:
        assert json_depth(json.dumps(details)) <= 8


def test_brackets_inside_a_string_do_not_hide_nesting() -> None:
    """Found by the property above (kept as a case): 600 ']' in a string used to cancel 600 real levels."""
    hidden = '{"rank": {"x": "' + "]" * 600 + '"}, "y": ' + "[" * 600 + "]" * 600 + "}"
    assert json_depth(hidden) == 601
    assert parse_details(hidden)[1] == "details nested deeper than 8 levels"


@pytest.mark.parametrize(
    ("details", "reason"),
    [
        ({"rank": {"effective": "high"}}, "rank.effective"),
        ({"rank": {"effective": 2, "entropy": 1, "modules": {"q": 3}}}, "rank.modules.q"),
        ({"rank": {"effective": 1e308, "entropy": 1}}, "outside"),
        ({LABEL_HISTOGRAM: {"validation": [1, 2], "test": [1, 2]}}, "train and test"),
        ({LABEL_HISTOGRAM: {"train": [1, 2, 3], "test": [1, 2, 3]}}, "must hold 2 counts"),
    ],
)
def test_details_that_used_to_pass_and_crash_the_end_of_the_run(details: dict, reason: str) -> None:
    assert reason in (parse_details(json.dumps(details), num_labels=2)[1] or "")
