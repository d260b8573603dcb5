"""Typed run records: a ``metrics.jsonl`` line (``RoundRecord``) and ``summary.json`` (``Summary``).

The run writes these and every reader (the sweep report, tuning, plots, tracking, the federated
benchmark) reads them back through ``from_json``, so a key is spelled in one place and a file that
is torn, hand-edited or of another shape fails with one ``RecordError`` naming the file and the
field, instead of a ``KeyError`` deep inside a plot. The JSON shapes are those of
docs/DESIGN.md, "summary.json"; fields added later (``validation_global``, ``baselines``) are optional so files
written by earlier versions still load. A metric the run could not compute is JSON ``null`` on disk
and NaN in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pf2lora_core.config.keys import (
    ACCURACY,
    BALANCED_ACCURACY,
    BASELINES,
    BLEU,
    COMPUTE_SECONDS,
    EVAL_KINDS,
    EVAL_LOSS,
    FLOPS_PER_CLIENT_EVALUATION,
    FLOPS_PER_CLIENT_ROUND,
    FLOPS_PER_EVALUATED_ROUND,
    FLOPS_PER_STEP,
    GLOBAL,
    MCC,
    METEOR,
    PERPLEXITY,
    PERSONALIZED,
    ROUGE_L,
    TRAIN_LOSS,
    VALIDATION,
    VALIDATION_GLOBAL,
)

T = TypeVar("T")
STATS = ("mean", "weighted_mean", "worst")  # of a metric over clients (run_dir.aggregate_metric)

# ---------------------------------------------------------------------------- bounds
# The range of every number a run records (docs/DESIGN.md, "Bounds"). A reply holding a
# value outside it is rejected where it enters the server (federation.replies), so nothing in
# metrics.jsonl, summary.json, a table or a plot is beyond these, and no mean over clients can
# overflow: with at most 10M examples per client, a weighted sum stays below 1e7 x 1e18.
MAX_LOSS = 1e4  # nats per example / token; a uniform guess over a 50k vocabulary is 10.8
MAX_PERPLEXITY = 1e30  # exp of a mean token loss of 69: a diverged model still reports a number
MAX_SECONDS = 1e6  # one message's compute (11.6 days)
MAX_RANK = 1e5  # a learned rank (threshold or entropy): far above any adapter's r + r~
MAX_SINGULAR_VALUE = 1e12
ANY_NUMBER = (-1e18, 1e18)  # a metric without a bound of its own (counts, FLOPs): finite, overflow-free
METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    ACCURACY: (0.0, 1.0),
    BALANCED_ACCURACY: (0.0, 1.0),
    MCC: (-1.0, 1.0),
    BLEU: (0.0, 100.0),  # generation metrics are on 0-100 (training.generation_metrics)
    ROUGE_L: (0.0, 100.0),
    METEOR: (0.0, 100.0),
    EVAL_LOSS: (0.0, MAX_LOSS),
    TRAIN_LOSS: (0.0, MAX_LOSS),
    PERPLEXITY: (1.0, MAX_PERPLEXITY),
    COMPUTE_SECONDS: (0.0, MAX_SECONDS),
}
RANK_BOUNDS = {"effective": (0.0, MAX_RANK), "entropy": (0.0, MAX_RANK), "private_energy": (0.0, 1.0)}


def bound_of(name: str) -> tuple[float, float]:
    """The range of metric ``name`` (``ANY_NUMBER`` for one without a bound of its own)."""
    return METRIC_BOUNDS.get(name, ANY_NUMBER)


def out_of_bounds(name: str, value: float, bounds: tuple[float, float] | None = None) -> str | None:
    """Why ``value`` may not be recorded as ``name`` (not finite, or outside its bound), else None."""
    low, high = bounds or bound_of(name)
    if not math.isfinite(value):
        return f"{name} must be finite, got {value!r}"
    slack = 1e-9 * max(1.0, abs(low), abs(high))  # float rounding of a mean of per-example scores
    if not low - slack <= value <= high + slack:
        return f"{name} {value:.6g} is outside [{low:g}, {high:g}]"
    return None


class RecordError(ValueError):
    """A run record that does not have the documented shape; the message names the field."""


# ---------------------------------------------------------------------------- field readers


def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise RecordError(f"{where}: missing field '{key}'")
    return obj[key]


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _num(value: Any, where: str) -> float:
    """A JSON number or null (NaN); booleans and strings are refused."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{where}: expected a number or null, got {type(value).__name__} {str(value)[:40]!r}")
    return value if isinstance(value, int) else float(value)  # an int stays one: a re-written file is unchanged


def _opt_num(value: Any, where: str) -> float | None:
    return None if value is None else _num(value, where)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecordError(f"{where}: expected an integer, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _opt_int(value: Any, where: str) -> int | None:
    return None if value is None else _int(value, where)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _metrics(value: Any, where: str) -> dict[str, float]:
    """A ``{metric: number | null}`` block (a client's results of one kind); absent = empty."""
    if value is None:
        return {}
    return {str(k): _num(v, f"{where}.{k}") for k, v in _mapping(value, where).items()}


def _optional(obj: Mapping[str, Any], key: str, read: Callable[[Any, str], T], where: str) -> T | None:
    value = obj.get(key)
    return None if value is None else read(value, f"{where}.{key}")


def json_number(value: float | None) -> float | None:
    """NaN and infinities are not JSON: written as null."""
    return None if value is None or not math.isfinite(value) else value


def _metrics_json(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: json_number(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------- aggregate blocks


@dataclass(frozen=True)
class Stats:
    """Mean, example-weighted mean and worst of a metric over clients (NaN: no client had it)."""

    mean: float = math.nan
    weighted_mean: float = math.nan
    worst: float = math.nan

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Stats:
        obj = _mapping(obj, where)
        return cls(*(_num(obj.get(s), f"{where}.{s}") for s in STATS))

    def to_json(self) -> dict[str, float | None]:
        return {s: json_number(getattr(self, s)) for s in STATS}


@dataclass(frozen=True)
class Aggregate:
    """``{metric, mean, weighted_mean, worst[, balanced_accuracy]}``: one evaluated kind over clients."""

    metric: str
    stats: Stats = field(default_factory=Stats)
    balanced: Stats | None = None  # balanced accuracy (classification), same statistics

    @property
    def mean(self) -> float:
        return self.stats.mean

    @property
    def weighted_mean(self) -> float:
        return self.stats.weighted_mean

    @property
    def worst(self) -> float:
        return self.stats.worst

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Aggregate:
        obj = _mapping(obj, where)
        return cls(
            metric=_str(_field(obj, "metric", where), f"{where}.metric"),
            stats=Stats.from_json(obj, where),
            balanced=_optional(obj, BALANCED_ACCURACY, Stats.from_json, where),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, **self.stats.to_json()}
        if self.balanced is not None:
            out[BALANCED_ACCURACY] = self.balanced.to_json()
        return out


def _kinds_from_json(obj: Mapping[str, Any], where: str, required: Sequence[str]) -> dict[str, Aggregate]:
    """The aggregate block of every evaluated kind present (``required`` ones must be)."""
    out = {}
    for kind in EVAL_KINDS:
        if kind in required or obj.get(kind) is not None:
            out[kind] = Aggregate.from_json(_field(obj, kind, where), f"{where}.{kind}")
    return out


# ---------------------------------------------------------------------------- the learned rank


@dataclass(frozen=True)
class ModuleRank:
    effective: float
    entropy: float
    singular_values: tuple[float, ...] = ()

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ModuleRank:
        obj = _mapping(obj, where)
        values = _list(obj.get("singular_values", []), f"{where}.singular_values")
        return cls(
            effective=_num(obj.get("effective"), f"{where}.effective"),
            entropy=_num(obj.get("entropy"), f"{where}.entropy"),
            singular_values=tuple(_num(v, f"{where}.singular_values[{i}]") for i, v in enumerate(values)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "effective": json_number(self.effective),
            "entropy": json_number(self.entropy),
            "singular_values": [json_number(v) for v in self.singular_values],
        }


@dataclass(frozen=True)
class Rank:
    """A client's learned update rank (training.rank.rank_report): means over modules, and per module."""

    effective: float = math.nan
    entropy: float = math.nan
    private_energy: float | None = None  # None: the algorithm has no private level
    modules: dict[str, ModuleRank] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Rank:
        obj = _mapping({} if obj is None else obj, where)
        modules = _mapping({} if obj.get("modules") is None else obj["modules"], f"{where}.modules")
        return cls(
            effective=_num(obj.get("effective"), f"{where}.effective"),
            entropy=_num(obj.get("entropy"), f"{where}.entropy"),
            private_energy=_opt_num(obj.get("private_energy"), f"{where}.private_energy"),
            modules={str(k): ModuleRank.from_json(m, f"{where}.modules.{k}") for k, m in modules.items()},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"effective": json_number(self.effective), "entropy": json_number(self.entropy)}
        if self.private_energy is not None:
            out["private_energy"] = json_number(self.private_energy)
        out["modules"] = {k: m.to_json() for k, m in self.modules.items()}
        return out

    def mean_spectrum(self) -> list[float]:
        """Singular values averaged over modules, index by index (up to the shortest module's)."""
        spectra = [m.singular_values for m in self.modules.values() if m.singular_values]
        # strict=False: modules may keep different numbers of singular values; the common prefix is averaged.
        return [sum(col) / len(col) for col in zip(*spectra, strict=False)] if spectra else []


# ---------------------------------------------------------------------------- summary.json


Histogram = dict[str, list[int]]  # split -> examples per label id


def _histogram(value: Any, where: str) -> Histogram:
    hist = _mapping(value, where)
    return {
        str(s): [_int(n, f"{where}.{s}[{i}]") for i, n in enumerate(_list(c, f"{where}.{s}"))] for s, c in hist.items()
    }


@dataclass(frozen=True)
class ClientResult:
    """One client's row of ``summary.json``: its latest evaluation and what it trained on."""

    client: int
    num_train: int | None
    num_validation: int | None
    num_test: int | None
    results: dict[str, dict[str, float]]  # evaluated kind (EVAL_KINDS) -> metric -> value
    rank: Rank = field(default_factory=Rank)
    label_histogram: Histogram | None = None  # only where the site shares it
    baselines: dict[str, dict[str, float] | None] | None = None  # client_majority / global_majority
    rounds_trained: int | None = None  # rounds whose aggregate included this client (0: never trained)

    def value(self, kind: str, metric: str) -> float:
        """``results[kind][metric]``; NaN where this client has none."""
        return self.results.get(kind, {}).get(metric, math.nan)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ClientResult:
        obj = _mapping(obj, where)
        hist = obj.get("label_histogram")
        base = obj.get(BASELINES)
        return cls(
            client=_int(_field(obj, "client", where), f"{where}.client"),
            num_train=_opt_int(obj.get("num_train"), f"{where}.num_train"),
            num_validation=_opt_int(obj.get("num_validation"), f"{where}.num_validation"),
            num_test=_opt_int(obj.get("num_test"), f"{where}.num_test"),
            results={kind: _metrics(obj.get(kind), f"{where}.{kind}") for kind in EVAL_KINDS},
            rank=Rank.from_json(obj.get("rank") or {}, f"{where}.rank"),
            label_histogram=None if hist is None else _histogram(hist, f"{where}.label_histogram"),
            baselines=None
            if base is None
            else {
                str(k): None if v is None else _metrics(v, f"{where}.{BASELINES}.{k}")
                for k, v in _mapping(base, f"{where}.{BASELINES}").items()
            },
            rounds_trained=_opt_int(obj.get("rounds_trained"), f"{where}.rounds_trained"),
        )

    def to_json(self) -> dict[str, Any]:
        rounds = {} if self.rounds_trained is None else {"rounds_trained": self.rounds_trained}
        return {
            "client": self.client,
            **rounds,
            "num_train": self.num_train,
            "num_validation": self.num_validation,
            "num_test": self.num_test,
            **{kind: _metrics_json(self.results.get(kind, {})) for kind in EVAL_KINDS},
            "rank": self.rank.to_json(),
            "label_histogram": self.label_histogram,
            BASELINES: None
            if self.baselines is None
            else {k: None if v is None else _metrics_json(v) for k, v in self.baselines.items()},
        }


@dataclass(frozen=True)
class Communication:
    params_common: int = 0
    params_private: int = 0
    bytes_up_per_round: float = math.nan
    bytes_down_per_round: float = math.nan

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Communication:
        obj = _mapping(obj or {}, where)
        return cls(
            params_common=_int(obj.get("params_common", 0), f"{where}.params_common"),
            params_private=_int(obj.get("params_private", 0), f"{where}.params_private"),
            bytes_up_per_round=_num(obj.get("bytes_up_per_round"), f"{where}.bytes_up_per_round"),
            bytes_down_per_round=_num(obj.get("bytes_down_per_round"), f"{where}.bytes_down_per_round"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "params_common": self.params_common,
            "params_private": self.params_private,
            "bytes_up_per_round": json_number(self.bytes_up_per_round),
            "bytes_down_per_round": json_number(self.bytes_down_per_round),
        }


COST_FIELDS = (
    "seconds_total",
    "seconds_per_round",
    FLOPS_PER_STEP,  # mean over the clients' counted rounds (``flops_rounds``); None when none was counted
    FLOPS_PER_CLIENT_ROUND,
    FLOPS_PER_CLIENT_EVALUATION,  # mean over the counted evaluations (both models, re-fit included)
    FLOPS_PER_EVALUATED_ROUND,  # training + one evaluation, per client: an evaluated round's cost
    "flops_per_round",  # one round, all its clients (filled in by the report from the config when absent)
    "examples_per_round",  # summed over a round's clients, mean over rounds
    "gradient_passes_per_round",
    "examples_per_client_round",  # per client and round: the equal-budget check
    "batches_per_client_round",
    "gradient_passes_per_client_round",
)


@dataclass(frozen=True)
class Cost:
    """What the run spent. A value the run could not count is None."""

    values: dict[str, float | None] = field(default_factory=dict)

    def get(self, name: str) -> float | None:
        if name not in COST_FIELDS:
            raise KeyError(f"no cost field {name!r}; the fields are {COST_FIELDS}")
        return self.values.get(name)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Cost:
        obj = _mapping(obj or {}, where)
        return cls({k: _opt_num(obj.get(k), f"{where}.{k}") for k in COST_FIELDS if k in obj})

    def to_json(self) -> dict[str, float | None]:
        return {k: json_number(v) for k, v in self.values.items()}


@dataclass(frozen=True)
class Summary:
    """``summary.json``: each client's latest evaluation, their aggregates, the priors and the cost."""

    algorithm: str
    task: str
    model: str
    seed: int
    num_clients: int
    rounds: int
    partition: dict[str, Any]
    clients: list[ClientResult]
    kinds: dict[str, Aggregate]  # evaluated kind -> aggregate block (personalized always; the run writes all four)
    baselines: dict[str, Aggregate] | None  # client_majority / global_majority (classification)
    label_histograms: list[Histogram | None]
    rejected: list[dict[str, Any]]
    communication: Communication
    cost: Cost

    @property
    def metric(self) -> str:
        return self.kinds[PERSONALIZED].metric

    @property
    def personalized(self) -> Aggregate:
        return self.kinds[PERSONALIZED]

    @property
    def global_(self) -> Aggregate:
        """The global model's block (NaN where a summary has none)."""
        return self.kinds.get(GLOBAL) or Aggregate(self.metric)

    @property
    def validation(self) -> Aggregate | None:
        return self.kinds.get(VALIDATION)

    @property
    def validation_global(self) -> Aggregate | None:
        return self.kinds.get(VALIDATION_GLOBAL)

    @classmethod
    def from_json(cls, obj: Any, where: str = "summary.json") -> Summary:
        obj = _mapping(obj, where)
        base = obj.get(BASELINES)
        hists = _list(obj.get("label_histograms") or [], f"{where}.label_histograms")
        return cls(
            algorithm=_str(_field(obj, "algorithm", where), f"{where}.algorithm"),
            task=_str(obj.get("task", ""), f"{where}.task"),
            model=_str(obj.get("model", ""), f"{where}.model"),
            seed=_int(obj.get("seed", 0), f"{where}.seed"),
            num_clients=_int(obj.get("num_clients", 0), f"{where}.num_clients"),
            rounds=_int(obj.get("rounds", 0), f"{where}.rounds"),
            partition=dict(_mapping(obj.get("partition") or {}, f"{where}.partition")),
            clients=[
                ClientResult.from_json(c, f"{where}.clients[{i}]")
                for i, c in enumerate(_list(obj.get("clients") or [], f"{where}.clients"))
            ],
            kinds=_kinds_from_json(obj, where, (PERSONALIZED,)),
            baselines=None
            if base is None
            else {
                str(k): Aggregate.from_json(v, f"{where}.{BASELINES}.{k}")
                for k, v in _mapping(base, f"{where}.{BASELINES}").items()
            },
            label_histograms=[
                None if h is None else _histogram(h, f"{where}.label_histograms[{i}]") for i, h in enumerate(hists)
            ],
            rejected=[dict(_mapping(r, f"{where}.rejected")) for r in _list(obj.get("rejected") or [], "rejected")],
            communication=Communication.from_json(obj.get("communication"), f"{where}.communication"),
            cost=Cost.from_json(obj.get("cost"), f"{where}.cost"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "task": self.task,
            "model": self.model,
            "seed": self.seed,
            "num_clients": self.num_clients,
            "rounds": self.rounds,
            "partition": self.partition,
            "clients": [c.to_json() for c in self.clients],
            # personalized / global: test split; validation / validation_global: the same models on the
            # validation split (what any choice reads)
            **{kind: agg.to_json() for kind, agg in self.kinds.items()},
            # constant predictors on the same test splits (classification; None otherwise)
            BASELINES: None if self.baselines is None else {k: v.to_json() for k, v in self.baselines.items()},
            "label_histograms": self.label_histograms,
            "rejected": self.rejected,
            "communication": self.communication.to_json(),
            "cost": self.cost.to_json(),
        }

    @classmethod
    def read(cls, path: Path) -> Summary:
        """Load ``path``; a torn or malformed file raises ``RecordError`` naming the file and field."""
        return cls.from_json(_load_json(path), str(path))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not JSON ({e}); a run killed while writing it leaves it torn") from e


# ---------------------------------------------------------------------------- metrics.jsonl


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``metrics.jsonl``: what one round trained, rejected, sent and (maybe) evaluated."""

    round: int
    seconds: float
    elapsed: float
    train_loss: float | None
    clients_trained: int
    aggregated: bool
    rejected: list[dict[str, Any]]
    missing: list[dict[str, Any]]  # sampled clients that did not reply in time (or at all)
    bytes_down: int  # serialised arrays of this round's training messages, all clients together
    bytes_up: int
    train: dict[int, dict[str, float]]  # client -> its train metrics (the trusted ones)
    client_compute_s: float  # the clients' own work this round (train + evaluate)
    kinds: dict[str, Aggregate] = field(default_factory=dict)  # empty: the round was not evaluated
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)  # client -> its results, "rank"
    server_check_s: float = 0.0  # the server's checks of this round's replies (decode, bounds, norms)

    @property
    def evaluated(self) -> bool:
        return PERSONALIZED in self.kinds

    def train_total(self, key: str) -> float | None:
        """``key`` summed over this round's clients that report it (None: none does)."""
        values = [m[key] for m in self.train.values() if key in m]
        return sum(values) if values else None

    @classmethod
    def from_json(cls, obj: Any, where: str = "metrics.jsonl") -> RoundRecord:
        obj = _mapping(obj, where)
        train = _mapping(obj.get("train") or {}, f"{where}.train")
        clients = _mapping(obj.get("clients") or {}, f"{where}.clients")
        return cls(
            round=_int(_field(obj, "round", where), f"{where}.round"),
            seconds=_num(obj.get("seconds"), f"{where}.seconds"),
            elapsed=_num(obj.get("elapsed"), f"{where}.elapsed"),
            train_loss=_opt_num(obj.get(TRAIN_LOSS), f"{where}.{TRAIN_LOSS}"),
            clients_trained=_int(obj.get("clients_trained", len(train)), f"{where}.clients_trained"),
            aggregated=bool(obj.get("aggregated", False)),
            rejected=[dict(_mapping(r, f"{where}.rejected")) for r in _list(obj.get("rejected") or [], where)],
            missing=[dict(_mapping(r, f"{where}.missing")) for r in _list(obj.get("missing") or [], where)],
            bytes_down=_int(obj.get("bytes_down", 0), f"{where}.bytes_down"),
            bytes_up=_int(obj.get("bytes_up", 0), f"{where}.bytes_up"),
            train={_int_key(c, f"{where}.train"): _metrics(m, f"{where}.train.{c}") for c, m in train.items()},
            client_compute_s=_num(obj.get("client_compute_s", 0.0), f"{where}.client_compute_s"),
            kinds=_kinds_from_json(obj, where, ()),
            clients={
                _int_key(c, f"{where}.clients"): dict(_mapping(v, f"{where}.clients.{c}")) for c, v in clients.items()
            },
            server_check_s=_num(obj.get("server_check_s", 0.0), f"{where}.server_check_s"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "round": self.round,
            "seconds": json_number(self.seconds),
            "elapsed": json_number(self.elapsed),
            TRAIN_LOSS: json_number(self.train_loss),
            "clients_trained": self.clients_trained,
            "aggregated": self.aggregated,
            "rejected": self.rejected,
            "missing": self.missing,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "train": {str(c): _metrics_json(m) for c, m in sorted(self.train.items())},
            "client_compute_s": json_number(self.client_compute_s),
        }
        if self.server_check_s:
            out["server_check_s"] = json_number(self.server_check_s)
        if self.kinds:
            out.update({kind: agg.to_json() for kind, agg in self.kinds.items()})
            out["clients"] = {str(c): v for c, v in sorted(self.clients.items())}
        return out


def _int_key(key: Any, where: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise RecordError(f"{where}: client key {str(key)[:40]!r} is not a client id") from None


def read_metrics(path: Path) -> list[RoundRecord]:
    """Every round of a ``metrics.jsonl``; a last line cut off by a killed run is skipped, any
    other malformed line raises ``RecordError`` with its line number."""
    if not Path(path).is_file():
        return []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break  # torn last line: the round it would record did not finish writing
            raise RecordError(f"{path}:{i}: not JSON ({e})") from e
        records.append(RoundRecord.from_json(obj, f"{path}:{i}"))
    return records


__all__ = [
    "STATS",
    "Aggregate",
    "ClientResult",
    "Communication",
    "Cost",
    "ModuleRank",
    "Rank",
    "RecordError",
    "RoundRecord",
    "Stats",
    "Summary",
    "json_number",
    "read_metrics",
]
