"""One client's tokenized train/validation/test split, cached per process, and its mini-batches."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import datasets
import numpy as np
import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from pf2lora_core.config.schema import PartitionConfig, TaskConfig
from pf2lora_core.data.columns import (
    ATTENTION_MASK,
    IGNORE_INDEX,
    INPUT_IDS,
    LABEL,
    LABELS,
    MODEL_INPUTS,
    PROMPT,
    PROMPT_LENGTH,
    ROW,
    TARGET,
    TEST,
    TRAIN,
    VALIDATION,
)
from pf2lora_core.data.partition import column, make_partitioner, partition_rows
from pf2lora_core.data.sources import CAUSAL_LM, CLASSIFICATION, label_names, load_examples, resolve_text_columns

T = TypeVar("T")
Batch = dict[str, torch.Tensor]


@dataclass
class ClientSplit:
    """A client's data: its partition split into train, validation and test, tokenized.

    Attributes
    ----------
    train, validation, test : datasets.Dataset
        Columns ``input_ids``, ``attention_mask`` (``token_type_ids`` where the tokenizer
        makes them) and ``labels``; unpadded (``collate`` pads per batch). Causal LM: ``labels``
        are the token ids with the prompt masked (``IGNORE_INDEX``), plus ``prompt_length`` and
        the ``prompt`` / ``target`` texts (generation and its references).
    label_names : list[str]
        Name of each label id.
    train_label_hist, test_label_hist, validation_label_hist : list[int]
        Number of examples per label id.
    """

    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]
    train_label_hist: list[int]
    validation_label_hist: list[int]
    test_label_hist: list[int]


@dataclass(frozen=True)
class ClientRows:
    """Rows of the pooled dataset that form one client's train, validation and test split (disjoint)."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


# Deliberate per-process caches. A Ray simulation worker serves many clients over many rounds:
# the pooled data is loaded once per (task, seed), tokenized once per (task, seed, tokenizer),
# partitioned once per (task, partition, num_clients, seed); each client's split is built once.
# Its label column is read once too: reading it costs time in the pooled size (about 10 us a row
# through ``datasets``' row formatter), far more than a client's own rows at 4096 clients.
POOLED_CACHE: dict[Hashable, datasets.Dataset] = {}
POOLED_LABELS_CACHE: dict[Hashable, np.ndarray] = {}
TOKENIZED_CACHE: dict[Hashable, datasets.Dataset] = {}
ROWS_CACHE: dict[Hashable, list[ClientRows]] = {}
SPLIT_CACHE: dict[Hashable, ClientSplit] = {}
POOLED_TRAIN_CACHE: dict[Hashable, datasets.Dataset] = {}


def clear_caches() -> None:
    """Empty every data cache of this process (tests; freeing memory)."""
    for cache in (POOLED_CACHE, POOLED_LABELS_CACHE, TOKENIZED_CACHE, ROWS_CACHE, SPLIT_CACHE, POOLED_TRAIN_CACHE):
        cache.clear()


def client_split(
    task: TaskConfig,
    partition: PartitionConfig,
    num_clients: int,
    client: int,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
) -> ClientSplit:
    """The tokenized train/validation/test split of ``client`` (cached: a second call returns the same object).

    Parameters
    ----------
    task : TaskConfig
        What data to load, ``max_length`` for truncation, ``test_fraction`` and ``val_fraction``
        of each partition.
    partition : PartitionConfig
        How the pooled data is divided among clients.
    num_clients : int
        Number of partitions.
    client : int
        This client's partition id, in ``[0, num_clients)``.
    seed : int
        Seeds the pool's order, the partition and the train/validation/test split.
    tokenizer : PreTrainedTokenizerBase
        Tokenizes one text or a text pair; cached by its class and ``name_or_path``.

    Returns
    -------
    ClientSplit
        The client's tokenized train, validation and test data with their label histograms.
    """
    if not 0 <= client < num_clients:
        raise ValueError(f"client {client} out of range: {num_clients} clients have ids 0..{num_clients - 1}")
    key = (_freeze(task), _freeze(partition), num_clients, client, seed, _tokenizer_key(tokenizer))
    return _cached(SPLIT_CACHE, key, lambda: _build_split(task, partition, num_clients, client, seed, tokenizer))


def pooled_train(
    task: TaskConfig,
    partition: PartitionConfig,
    num_clients: int,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
) -> datasets.Dataset:
    """All clients' training splits in one dataset (centralized training; validation and test untouched)."""
    key = ("pooled-train", _freeze(task), _freeze(partition), num_clients, seed, _tokenizer_key(tokenizer))
    return _cached(
        POOLED_TRAIN_CACHE,
        key,
        lambda: datasets.concatenate_datasets(
            [client_split(task, partition, num_clients, k, seed, tokenizer).train for k in range(num_clients)]
        ),
    )


def task_label_names(task: TaskConfig, seed: int) -> list[str]:
    """Label names of the pooled dataset (fixes the classifier's number of outputs)."""
    return label_names(_pooled(task, seed))


def partition_label_histograms(
    task: TaskConfig, partition: PartitionConfig, num_clients: int, seed: int
) -> list[dict[str, list[int]]]:
    """Every client's train, validation and test label histogram, without tokenizing (for summary.json).

    Returns
    -------
    list[dict[str, list[int]]]
        One ``{"train": [...], "validation": [...], "test": [...]}`` per client: counts per label id.
    """
    labels, num_labels = _pooled_labels(task, seed), len(label_names(_pooled(task, seed)))
    return [
        {
            TRAIN: _histogram(labels[rows.train], num_labels),
            VALIDATION: _histogram(labels[rows.validation], num_labels),
            TEST: _histogram(labels[rows.test], num_labels),
        }
        for rows in _client_rows(task, partition, num_clients, seed)
    ]


def collate(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict[str, Any]]], Batch]:
    """Collate function: pads a list of tokenized rows to the batch's longest, as torch tensors."""
    pad = DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")

    def collate_rows(rows: list[dict[str, Any]]) -> Batch:
        return dict(pad(rows))

    return collate_rows


def collate_causal(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict[str, Any]]], Batch]:
    """Causal-LM collate: right-pads ``input_ids`` (pad token), ``attention_mask`` (0), ``labels`` (ignored)."""
    pads = {INPUT_IDS: int(tokenizer.pad_token_id), ATTENTION_MASK: 0, LABELS: IGNORE_INDEX}

    def collate_rows(rows: list[dict[str, Any]]) -> Batch:
        width = max(len(r[INPUT_IDS]) for r in rows)
        return {
            key: torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows], dtype=torch.long)
            for key, value in pads.items()
        }

    return collate_rows


# Task kind -> collate function factory (``task.kind``).
COLLATORS: dict[str, Callable[[PreTrainedTokenizerBase], Callable[[list[dict[str, Any]]], Batch]]] = {
    CLASSIFICATION: collate,
    CAUSAL_LM: collate_causal,
}


class Batches:
    """Re-iterable mini-batches of a tokenized dataset.

    Each pass over it uses a new order when ``shuffle``; pass ``e`` always uses the order
    seeded by ``(seed, e)``, so a run is reproducible from its seed.
    """

    def __init__(
        self,
        ds: datasets.Dataset,
        batch_size: int,
        tokenizer: PreTrainedTokenizerBase,
        shuffle: bool,
        seed: int,
        kind: str = CLASSIFICATION,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._ds = ds.select_columns([c for c in ds.column_names if c in MODEL_INPUTS])
        self._batch_size = batch_size
        self._collate = COLLATORS[kind](tokenizer)
        self._shuffle = shuffle
        self._seed = seed
        self._epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self._ds) / self._batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self._ds)
        order = np.random.default_rng([self._seed, self._epoch]).permutation(n) if self._shuffle else np.arange(n)
        self._epoch += 1
        return self._generate(order)

    def _generate(self, order: np.ndarray) -> Iterator[Batch]:
        for start in range(0, len(order), self._batch_size):
            columns = self._ds[order[start : start + self._batch_size]]
            yield self._collate(
                [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
            )


class CountedBatches:
    """An iterator of batches that counts what it hands out (the per-round budget accounting).

    ``batches`` is the number of minibatches drawn so far and ``examples`` their rows (the
    leading dimension of ``labels``, or of ``input_ids`` where a batch has no labels).
    """

    def __init__(self, source: Iterator[Batch]) -> None:
        self._source = source
        self.batches = 0
        self.examples = 0

    def __iter__(self) -> CountedBatches:
        return self

    def __next__(self) -> Batch:
        batch = next(self._source)
        self.batches += 1
        rows = batch.get(LABELS, batch.get(INPUT_IDS))
        self.examples += int(rows.shape[0]) if rows is not None else 0
        return batch


def batches(
    ds: datasets.Dataset,
    batch_size: int,
    tokenizer: PreTrainedTokenizerBase,
    shuffle: bool,
    seed: int,
    kind: str = CLASSIFICATION,
) -> Batches:
    """Re-iterable mini-batches of ``ds`` (see ``Batches``), collated for a task of ``kind``."""
    return Batches(ds, batch_size, tokenizer, shuffle, seed, kind)


# --- building blocks (each cached) --------------------------------------------------------


def _build_split(
    task: TaskConfig,
    partition: PartitionConfig,
    num_clients: int,
    client: int,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
) -> ClientSplit:
    pooled = _pooled(task, seed)
    tokenized = _tokenized(task, seed, tokenizer)
    rows = _client_rows(task, partition, num_clients, seed)[client]
    names = label_names(pooled)
    labels = _pooled_labels(task, seed)  # (never re-read per client: see POOLED_LABELS_CACHE)
    return ClientSplit(
        train=tokenized.select(rows.train),
        test=tokenized.select(rows.test),
        label_names=names,
        train_label_hist=_histogram(labels[rows.train], len(names)),
        test_label_hist=_histogram(labels[rows.test], len(names)),
        validation=tokenized.select(rows.validation),
        validation_label_hist=_histogram(labels[rows.validation], len(names)),
    )


def _pooled(task: TaskConfig, seed: int) -> datasets.Dataset:
    return _cached(POOLED_CACHE, (_freeze(task), seed), lambda: load_examples(task, seed))


def _pooled_labels(task: TaskConfig, seed: int) -> np.ndarray:
    """The pooled label column as an array, read once per (task, seed)."""
    return _cached(POOLED_LABELS_CACHE, (_freeze(task), seed), lambda: column(_pooled(task, seed), LABEL))


def _tokenized(task: TaskConfig, seed: int, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    key = (_freeze(task), seed, _tokenizer_key(tokenizer))
    return _cached(TOKENIZED_CACHE, key, lambda: _tokenize(_pooled(task, seed), task, tokenizer, key))


def _tokenize(
    pooled: datasets.Dataset, task: TaskConfig, tokenizer: PreTrainedTokenizerBase, key: Hashable
) -> datasets.Dataset:
    """Tokenize for the task's kind, truncated to ``task.max_length``; padding is per batch."""
    if task.kind == CAUSAL_LM:
        encode, keep = causal_encoder(tokenizer, task.max_length), {PROMPT, TARGET}
    else:
        text_columns = resolve_text_columns(task)

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            return dict(tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=task.max_length))

        keep = {LABEL}
    tokenized = pooled.map(
        encode,
        batched=True,
        remove_columns=[c for c in pooled.column_names if c not in keep],
        keep_in_memory=True,
        # Our own fingerprint: hashing the closure (tokenizer included) is slow and may fail.
        new_fingerprint=hashlib.sha256(repr(key).encode()).hexdigest()[:32],
        desc="tokenizing",
    )
    return tokenized if task.kind == CAUSAL_LM else tokenized.rename_column(LABEL, LABELS)


def causal_encoder(
    tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """Batched encoder of causal-LM rows: ``prompt + target + eos``, the loss on target tokens only.

    The prompt is tokenized with the tokenizer's special tokens (a BOS where it adds one), the
    target without, followed by the end-of-sequence token so the model learns to stop. Labels
    are ``IGNORE_INDEX`` on the prompt; a too-long row keeps its prompt (up to ``max_length - 1``
    tokens) and truncates the target.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token")

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = tokenizer(batch[PROMPT], truncation=True, max_length=max_length - 1)[INPUT_IDS]
        targets = tokenizer(batch[TARGET], add_special_tokens=False)[INPUT_IDS]
        out: dict[str, list[Any]] = {INPUT_IDS: [], ATTENTION_MASK: [], LABELS: [], PROMPT_LENGTH: []}
        for prompt, target in zip(prompts, targets, strict=True):
            target = [*target, eos][: max_length - len(prompt)]
            out[INPUT_IDS].append([*prompt, *target])
            out[ATTENTION_MASK].append([1] * (len(prompt) + len(target)))
            out[LABELS].append([IGNORE_INDEX] * len(prompt) + target)
            out[PROMPT_LENGTH].append(len(prompt))
        return out

    return encode


def _client_rows(task: TaskConfig, partition: PartitionConfig, num_clients: int, seed: int) -> list[ClientRows]:
    key = (_freeze(task), _freeze(partition), num_clients, seed)
    return _cached(ROWS_CACHE, key, lambda: _assign_rows(task, partition, num_clients, seed))


def _assign_rows(task: TaskConfig, partition: PartitionConfig, num_clients: int, seed: int) -> list[ClientRows]:
    """Partition the pooled rows with the configured partitioner, then split each into train/validation/test."""
    pooled = _pooled(task, seed)
    labels = _pooled_labels(task, seed)
    partitioner = make_partitioner(partition, num_clients, seed)
    # The partitioner sees only labels (and the natural-id column) and row numbers: cheap, and the
    # rows come back out.
    columns = [LABEL, *([partition.by] if partition.by in pooled.column_names and partition.by != LABEL else [])]
    partitioner.dataset = pooled.select_columns(columns).add_column(ROW, list(range(len(pooled))))
    parts = partition_rows(partitioner, ROW)
    rngs = [np.random.default_rng([seed, k]) for k in range(num_clients)]
    return [
        train_val_test(rows, labels[rows], task.test_fraction, task.val_fraction, rng)
        for rows, rng in zip(parts, rngs, strict=True)
    ]


def train_val_test(
    rows: np.ndarray, labels: np.ndarray, test_fraction: float, val_fraction: float, rng: np.random.Generator
) -> ClientRows:
    """Stratified three-way split of one partition: test, validation and train, disjoint.

    Each label gives its share to test and to validation (largest-remainder apportionment), so both
    mirror the partition's label mix. Sizes: ``round(test_fraction * n)`` test rows and
    ``round(val_fraction * n)`` validation rows, each at least one when its fraction is positive,
    and at least one row is left to train. Test is drawn first, exactly as the two-way split did,
    so adding validation leaves every test split unchanged; validation comes out of the rest.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"task.test_fraction must lie in [0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0 or test_fraction + val_fraction >= 1.0:
        raise ValueError(
            f"task.val_fraction must lie in [0, 1) with test_fraction + val_fraction < 1, "
            f"got val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    test_rows = _stratified_pick(rows, labels, _test_size(len(rows), test_fraction), rng)
    rest = ~np.isin(rows, test_rows)
    val_size = min(_test_size(len(rows), val_fraction), max(int(rest.sum()) - 1, 0))
    val_rows = _stratified_pick(rows[rest], labels[rest], val_size, rng)
    train = np.setdiff1d(rows, np.concatenate([test_rows, val_rows]))
    return ClientRows(train=train, test=test_rows, validation=val_rows)


def _stratified_pick(rows: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` rows drawn per label in proportion to the label counts (sorted row numbers)."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = _apportion(counts, size)
    picks = [rng.permutation(rows[labels == c])[:q] for c, q in zip(classes, per_class, strict=True)]
    return np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.empty(0, dtype=np.int64)


def _test_size(n: int, test_fraction: float) -> int:
    """Rounded share of ``n``; at least one held-out and one train example when there are two."""
    size = round(test_fraction * n)
    return min(max(size, 1), n - 1) if test_fraction > 0 and n >= 2 else size


def _apportion(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder method)."""
    if total == 0 or counts.sum() == 0:
        return np.zeros_like(counts)
    quotas = counts * total / counts.sum()
    shares = np.floor(quotas).astype(np.int64)
    leftover = total - int(shares.sum())
    shares[np.argsort(-(quotas - shares), kind="stable")[:leftover]] += 1
    return shares


def _histogram(labels: np.ndarray, num_labels: int) -> list[int]:
    return np.bincount(labels, minlength=num_labels).astype(int).tolist()


def _cached(cache: dict[Hashable, T], key: Hashable, build: Callable[[], T]) -> T:
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    return type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", ""))


def _freeze(value: Any) -> Hashable:
    """A hashable copy of a config value (dataclass, mapping, list) for cache keys."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple((f.name, _freeze(getattr(value, f.name))) for f in dataclasses.fields(value))
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_freeze(v) for v in value)
    return value
