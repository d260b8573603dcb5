"""Deployment data: a site's own file split into train/validation/test, and the label set fixed by config.

In deployment nothing is pooled or partitioned: a SuperNode reads only the file its node config
names (``policy.localize`` puts it in ``task.data_files``) and splits it, stratified, into train,
validation and test as a simulated client splits its partition. The label set (the head's size)
cannot come from data, since the server has none and each site has only its own: it comes from
``task.label_names`` or ``task.num_labels``. Kept apart from the simulation path (``client.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import numpy as np
from transformers import PreTrainedTokenizerBase

from pf2lora_core.config.schema import ConfigError, TaskConfig
from pf2lora_core.data.columns import LABEL
from pf2lora_core.data.sources import CAUSAL_LM, NO_LABEL, load_examples
from pf2lora_core.data.splits import (
    ClientSplit,
    _cached,
    _freeze,
    _histogram,
    _tokenize,
    _tokenizer_key,
    train_val_test,
)

SITE_CACHE: dict[Hashable, ClientSplit] = {}


def config_label_names(task: TaskConfig) -> list[str]:
    """The label set from config alone: ``task.label_names``, else ``0 .. task.num_labels - 1``.

    Generation tasks have one (unused) label unless a label column is named.
    """
    if task.label_names:
        return list(task.label_names)
    if task.num_labels > 0:
        return [str(i) for i in range(task.num_labels)]
    if task.kind == CAUSAL_LM and not task.label_column:
        return [NO_LABEL]
    raise ConfigError(
        "invalid configuration: task.label_names: in deployment the server holds no data, so the label set "
        "comes from config: set task.label_names=[...] (string labels) or task.num_labels=K (ids 0..K-1)"
    )


def site_split(task: TaskConfig, seed: int, tokenizer: PreTrainedTokenizerBase) -> ClientSplit:
    """This site's tokenized train/test split of ``task.data_files`` (its own file), cached per process.

    The labels are mapped onto ``config_label_names(task)``, identical on every site, so that
    label id k means the same class everywhere even where a site has no example of it.
    """
    names = config_label_names(task)
    fixed = dataclasses.replace(task, label_names=[] if names == [NO_LABEL] else names)
    key = ("site", _freeze(fixed), seed, _tokenizer_key(tokenizer))
    return _cached(SITE_CACHE, key, lambda: _build(fixed, names, seed, tokenizer, key))


def _build(
    task: TaskConfig, names: list[str], seed: int, tokenizer: PreTrainedTokenizerBase, key: Hashable
) -> ClientSplit:
    examples = load_examples(task, seed)
    labels = np.asarray(examples[LABEL])
    rng = np.random.default_rng([seed, 0])
    rows = train_val_test(np.arange(len(examples)), labels, task.test_fraction, task.val_fraction, rng)
    tokenized = _tokenize(examples, task, tokenizer, key)
    return ClientSplit(
        train=tokenized.select(rows.train),
        validation=tokenized.select(rows.validation),
        test=tokenized.select(rows.test),
        label_names=names,
        train_label_hist=_histogram(labels[rows.train], len(names)),
        validation_label_hist=_histogram(labels[rows.validation], len(names)),
        test_label_hist=_histogram(labels[rows.test], len(names)),
    )
