"""Checks on a client's reply before it may enter the average (the server's reply checks, not the validation split).

Each check returns ``None`` when the reply is fine, else a one-line reason that the server logs
with the client's identity. Structure (keys, shapes, dtypes) is checked from the arrays' declared
metadata before any bytes are decoded; decoding uses numpy without pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping

import numpy as np

# the uplink's structure check lives with the algorithms (each says what a valid uplink is); re-exported
from pf2lora_core.algorithms.base import Algorithm
from pf2lora_core.algorithms.uplink import Spec
from pf2lora_core.algorithms.uplink import check_structure as check_structure
from pf2lora_core.config.schema import AUTO_NORM, FederationConfig
from pf2lora_core.federation.node_policy import LABEL_HISTOGRAM
from pf2lora_core.run.records import MAX_SINGULAR_VALUE, RANK_BOUNDS, Rank, RecordError, out_of_bounds


def check_values(arrays: Mapping[str, np.ndarray]) -> str | None:
    """Finite values (the update's norm is ``update_norm``, measured by ``ReplyChecker.bounded``)."""
    for name, arr in arrays.items():
        if not np.isfinite(arr).all():
            return f"{name}: holds NaN or Inf"
    return None


def decode_checked(
    decoders: Mapping[str, Callable[[], np.ndarray]], declared: Mapping[str, Spec]
) -> tuple[dict[str, np.ndarray], str | None]:
    """Decode each array (its decoder must refuse pickled data) and hold it to its declared spec.

    An array's metadata (checked by ``check_structure``) and its bytes travel separately; a reply
    whose bytes do not decode, or decode to another shape or dtype than declared, is malformed.
    """
    out: dict[str, np.ndarray] = {}
    for name, decode in decoders.items():
        try:
            arr = decode()
        except Exception as err:  # numpy raises ValueError for pickled data; anything else is as bad
            return {}, f"{name}: bytes do not decode as a plain array ({type(err).__name__}: {err})"
        shape, dtype = declared[name]
        if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
            return {}, (
                f"{name}: bytes hold {np.dtype(arr.dtype)} {tuple(arr.shape)}, "
                f"declared {np.dtype(dtype)} {tuple(shape)}"
            )
        out[name] = arr
    return out, None


# ------------------------------------------------------------------------------- metrics
MAX_REASON = 300  # characters of a rejection reason kept (client error text can be anything)
MAX_METRICS = 64  # scalars in one reply's MetricRecord; an honest reply has about a dozen
MAX_KEY_LENGTH = 100
MAX_DETAILS_BYTES = 1 << 20  # the details JSON: a 24-layer model's rank spectra are about 30 KB
MAX_DETAILS_DEPTH = 8  # details -> rank -> modules -> name -> singular_values is 5 deep
MAX_HISTOGRAM_LABELS = 100_000  # a label histogram's length (the head's size); far above any task here
MAX_COUNT = 10_000_000  # examples of one label in one split (federation.max_num_examples' default)


def truncate(text: str, limit: int = MAX_REASON) -> str:
    """``text`` cut to ``limit`` characters (marked), one line."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    suffix = f" ... [{len(text)} chars]"
    return text[: max(limit - len(suffix), 0)] + suffix


def check_scalars(metrics: Mapping[str, object], allow_nan: bool = False) -> str | None:
    """Every value a finite int or float (NaN too when ``allow_nan``), few keys with short names."""
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics, at most {MAX_METRICS} allowed"
    for key, value in metrics.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
            return f"metric name {truncate(repr(key), 60)} is not a short string"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {key!r} must be a number, got {type(value).__name__}"
        if not np.isfinite(value) and not (allow_nan and np.isnan(value)):
            return f"metric {key!r} must be finite, got {value!r}"
    return None


def check_required(metrics: Mapping[str, object], required: tuple[str, ...]) -> str | None:
    missing = [k for k in required if k not in metrics]
    return f"missing metric(s) {missing}" if missing else None


def check_num_examples(value: object, known: int | None, cap: int, policy: str) -> tuple[float, str | None]:
    """(the weight to use, reason to reject or None) for a declared ``num-examples``.

    Must be a finite number >= 1 and at most ``cap``; ``known`` (what the server knows this
    client holds: its partition size, or what it declared in its first round) bounds it from
    above: more is a mismatch, which ``policy`` ``"clip"`` clips to ``known`` and ``"reject"``
    rejects. Fewer is accepted (it only lowers the client's own weight).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 1:
        return 0.0, f"'num-examples' must be a finite number >= 1, got {truncate(repr(value), 60)}"
    if value > cap:
        return 0.0, f"'num-examples' {value:.4g} exceeds federation.max_num_examples={cap}"
    if known is not None and value > known:
        if policy == "reject":
            return 0.0, f"'num-examples' {value:.6g} exceeds the {known:g} examples this client holds"
        return float(known), None
    return float(value), None


def check_eval_metrics(
    flat: Mapping[str, object], metric: str, blocks: tuple[str, ...], required: tuple[str, ...],
    names: frozenset[str], scalars: frozenset[str],
) -> str | None:  # fmt: skip
    """An evaluate reply's flat metrics: ``scalars`` or ``<block>.<name>`` from the allow-lists.

    Each of the ``required`` blocks must hold ``metric`` (the task's); values finite or NaN (a
    metric the algorithm cannot measure, such as a local-only method's global accuracy).
    """
    reason = check_scalars(flat, allow_nan=True)
    if reason:
        return reason
    for key in flat:
        block, sep, name = key.partition(".")
        if key in scalars:
            continue
        if not sep or block not in blocks or name not in names:
            allowed = f"blocks {list(blocks)}, metrics {sorted(names)}"
            return f"metric name {truncate(repr(key), 60)} is not allowed ({allowed})"
    missing = [f"{b}.{metric}" for b in required if f"{b}.{metric}" not in flat]
    return f"missing metric(s) {missing}" if missing else None


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON ``text``, brackets inside strings not counted.

    Computed on the raw text before parsing (Python's JSON parser recurses, so 100k nested brackets
    would exhaust the stack). Inside a string a bracket is text: counting it would let ``"]]]"``
    hide as many real levels."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_details(
    text: object,
    num_labels: int | None = None,
    max_bytes: int = MAX_DETAILS_BYTES,
    max_depth: int = MAX_DETAILS_DEPTH,
) -> tuple[dict, str | None]:
    """The details JSON of an evaluate reply: (its dict, reason or None).

    Size and nesting depth are checked on the raw text before parsing; NaN / Infinity are refused;
    ``rank`` must have the shape of ``records.Rank`` with every number within ``RANK_BOUNDS``;
    a label histogram must have ``train`` and ``test`` (and may have ``validation``), each with one
    whole count >= 0 per label (``num_labels`` when the server knows the head's size).
    """
    if text is None or text == "":
        return {}, None
    if not isinstance(text, str):
        return {}, f"details must be a JSON string, got {type(text).__name__}"
    if len(text) > max_bytes:
        return {}, f"details of {len(text)} characters exceed the cap of {max_bytes}"
    if json_depth(text) > max_depth:
        return {}, f"details nested deeper than {max_depth} levels"

    def refuse(constant: str) -> None:
        raise ValueError(f"non-finite number {constant}")

    try:
        value = json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError) as err:
        return {}, f"details are not valid JSON ({truncate(str(err), 80)})"
    if not isinstance(value, dict):
        return {}, f"details must be a JSON object, got {type(value).__name__}"
    unknown = sorted(set(value) - {"rank", LABEL_HISTOGRAM})
    if unknown:
        return {}, f"unknown details {truncate(str(unknown), 80)}"
    reason = _check_rank(value.get("rank", {}))
    if reason is None and LABEL_HISTOGRAM in value:
        reason = _check_histograms(value[LABEL_HISTOGRAM], num_labels)
    return (value, None) if reason is None else ({}, reason)


def _check_rank(rank: object) -> str | None:
    """A rank block the summary, table and plots can read: ``records.Rank``'s shape, numbers in bounds."""
    try:
        parsed = Rank.from_json(rank, "details rank")
    except RecordError as err:
        return truncate(str(err), 160)
    sent = rank if isinstance(rank, dict) else {}  # a value the client left out is not checked
    checks = [(f"rank.{k}", getattr(parsed, k), RANK_BOUNDS[k]) for k in RANK_BOUNDS if sent.get(k) is not None]
    for n, m in parsed.modules.items():
        checks += [(f"rank.modules.{n}.{k}", getattr(m, k), RANK_BOUNDS[k]) for k in ("effective", "entropy")]
        checks += [(f"rank.modules.{n}.singular_values", s, (0.0, MAX_SINGULAR_VALUE)) for s in m.singular_values]
    for name, value, bounds in checks:
        reason = out_of_bounds(f"details {name}", value, bounds)
        if reason is not None:
            return truncate(reason, 160)
    return None


def _check_histograms(hists: object, num_labels: int | None) -> str | None:
    """A site's opted-in label histograms: ``train`` and ``test`` (``validation`` optional), each a list
    of one whole count >= 0 per label: ``num_labels`` when known, else the same length in every split."""
    what = f"details '{LABEL_HISTOGRAM}'"
    if (
        not isinstance(hists, dict)
        or set(hists) - {"train", "validation", "test"}
        or not {"train", "test"} <= set(hists)
    ):
        return f"{what} must map train and test (and optionally validation) to label counts"
    lengths = set()
    for counts in hists.values():
        if not isinstance(counts, list) or not 0 < len(counts) <= MAX_HISTOGRAM_LABELS:
            return f"{what} entries must be lists of 1 to {MAX_HISTOGRAM_LABELS} counts"
        if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_COUNT for c in counts):
            return f"{what} counts must be whole numbers in [0, {MAX_COUNT}]"
        lengths.add(len(counts))
    if len(lengths) > 1 or (num_labels is not None and lengths != {num_labels}):
        expected = f"{num_labels}" if num_labels is not None else "the same number of"
        return f"{what} must hold {expected} counts per split (one per label), got lengths {sorted(lengths)}"
    return None


# ------------------------------------------------------------------------- update norms
AUTO = AUTO_NORM  # federation.max_update_norm: scaled to the run (auto_update_norm)
# The measured honest update norm the auto bound is scaled from: `python -m benchmarks.update_norm` on
# the default setting (MiniLM-L6, Rotten Tomatoes, 8 clients, AdamW lr 0.002, 5 local steps, 74,498
# common parameters): largest over clients and rounds 1-2, HOMLoRA 1.96 (PF2LoRA 1.63).
REFERENCE_NORM, REFERENCE_LR, REFERENCE_STEPS, REFERENCE_PARAMS = 1.96, 0.002, 5, 74_498
AUTO_HEADROOM = 5.0


def auto_update_norm(lr: float, local_steps: int, common_params: int) -> float:
    """The auto bound on ``||update||_2``: ``HEADROOM * n_ref * (lr K sqrt(P)) / (lr_ref K_ref sqrt(P_ref))``.

    AdamW moves every coordinate by about ``lr`` per step, so an honest update's norm grows like
    ``lr * K * sqrt(P)`` (K local steps, P common parameters); the bound is the measured honest norm
    ``n_ref`` scaled to this run, with 5x headroom (10 at the reference setting, 9.8 exactly).
    """
    scale = (lr * local_steps * math.sqrt(common_params)) / (
        REFERENCE_LR * REFERENCE_STEPS * math.sqrt(REFERENCE_PARAMS)
    )
    return AUTO_HEADROOM * REFERENCE_NORM * scale


def auto_bound(algorithm: Algorithm, local_steps: int, num_clients: int, common_params: int) -> float:
    """``auto_update_norm`` of a run of ``algorithm``: the pooled reference's one node takes
    ``local_steps x num_clients`` steps a round (``client_runtime``), so its honest update is that long."""
    steps = local_steps * (num_clients if algorithm.pooled_training else 1)
    return auto_update_norm(algorithm.params.lr, steps, common_params)


def resolved_federation(
    fed: FederationConfig, algorithm: Algorithm, local_steps: int, common_params: int
) -> FederationConfig:
    """``fed`` with ``max_update_norm=auto`` replaced by the number it means for this run (else ``fed`` itself)."""
    if fed.max_update_norm != AUTO:
        return fed
    bound = auto_bound(algorithm, local_steps, fed.num_clients, common_params)
    return dataclasses.replace(fed, max_update_norm=bound)


def _padded(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``a`` zero-padded (never cropped) to ``shape`` (same number of dimensions), as float64."""
    out = np.zeros(shape, np.float64)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def update_reference(
    arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], fresh: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """What each uplink tensor is an update *of*: the downlink's tensor of that name, else the
    fresh (seeded initial) adapter's, else zeros.

    A reference of another shape (HETLoRA: the client pruned its rank below the rank it was sent;
    FLoRA: the downlink holds stacks, the uplink a fresh LoRA) is compared on the zero-padded
    common shape, so a pruned component counts as moved to zero. Never skipped.
    """
    out = {}
    for name, a in arrays.items():
        ref = sent.get(name)
        if ref is None or ref.ndim != a.ndim:
            ref = fresh.get(name)
        if ref is None or ref.ndim != a.ndim:
            ref = np.zeros(a.shape, a.dtype)
        out[name] = ref
    return out


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """``||arrays - reference||_2`` over all tensors, each pair zero-padded to their common shape."""
    sq = 0.0
    for name, a in arrays.items():
        ref = reference[name]
        shape = tuple(max(x, y) for x, y in zip(a.shape, ref.shape, strict=True))
        sq += float(np.sum((_padded(a, shape) - _padded(ref, shape)) ** 2))
    return sq**0.5


def clip_update(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], bound: float
) -> dict[str, np.ndarray]:
    """``reference + (arrays - reference) * min(1, bound / ||arrays - reference||)``, shapes and dtypes kept."""
    norm = update_norm(arrays, reference)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    out = {}
    for name, a in arrays.items():
        ref = reference[name]
        shape = tuple(max(x, y) for x, y in zip(a.shape, ref.shape, strict=True))
        ref_p = _padded(ref, shape)
        moved = ref_p + scale * (_padded(a, shape) - ref_p)
        out[name] = moved[tuple(slice(0, n) for n in a.shape)].astype(a.dtype)
    return out
