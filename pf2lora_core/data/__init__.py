"""Data: sources pooled into one dataset, label-skewed partitions, per-client tokenized splits."""

from __future__ import annotations

from pf2lora_core.data.partition import PARTITIONERS, SSplitPartitioner, make_partitioner
from pf2lora_core.data.sources import (
    SOURCES,
    default_metric,
    label_names,
    load_examples,
    resolve_text_columns,
)
from pf2lora_core.data.splits import (
    Batches,
    ClientSplit,
    CountedBatches,
    batches,
    clear_caches,
    client_split,
    collate,
    partition_label_histograms,
    pooled_train,
    task_label_names,
)

__all__ = [
    "PARTITIONERS",
    "SOURCES",
    "Batches",
    "ClientSplit",
    "CountedBatches",
    "SSplitPartitioner",
    "batches",
    "clear_caches",
    "client_split",
    "collate",
    "default_metric",
    "label_names",
    "load_examples",
    "make_partitioner",
    "partition_label_histograms",
    "pooled_train",
    "resolve_text_columns",
    "task_label_names",
]
