"""Partitioner properties on small synthetic label columns."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

from pf2lora_core.config.schema import PartitionConfig
from pf2lora_core.data.columns import LABEL
from pf2lora_core.data.partition import PARTITIONERS, SSplitPartitioner, make_partitioner

ROW = "row"


def synthetic(labels: list[int] | np.ndarray) -> datasets.Dataset:
    return datasets.Dataset.from_dict({LABEL: list(map(int, labels)), ROW: list(range(len(labels)))})


def balanced(num_labels: int, per_label: int, seed: int = 0) -> datasets.Dataset:
    labels = np.repeat(np.arange(num_labels), per_label)
    return synthetic(np.random.default_rng(seed).permutation(labels))


def partition_rows(partitioner, ds: datasets.Dataset) -> list[list[int]]:
    partitioner.dataset = ds
    return [partitioner.load_partition(k)[ROW] for k in range(partitioner.num_partitions)]


def partition_labels(partitioner, ds: datasets.Dataset) -> list[np.ndarray]:
    labels = np.asarray(ds[LABEL])
    return [labels[rows] for rows in partition_rows(partitioner, ds)]


def cfg(kind: str, **overrides: float) -> PartitionConfig:
    values = dict(kind=kind, s=0.5, alpha=0.5, classes_per_partition=1, min_partition_size=5)
    values.update(overrides)
    return PartitionConfig(**values)


CASES = [
    cfg("s_split", s=0.0),
    cfg("s_split", s=0.3),
    cfg("s_split", s=1.0),
    cfg("dirichlet"),
    cfg("pathological", classes_per_partition=2),
    cfg("iid"),
]


@pytest.mark.parametrize("config", CASES, ids=lambda c: f"{c.kind}-s{c.s}")
def test_partitions_cover_the_dataset_exactly_once(config: PartitionConfig) -> None:
    ds = synthetic(np.random.default_rng(1).integers(0, 3, size=601))
    rows = partition_rows(make_partitioner(config, num_partitions=7, seed=3), ds)
    flat = np.concatenate(rows)
    assert len(flat) == len(ds)
    assert len(np.unique(flat)) == len(ds)


def test_make_partitioner_builds_flwr_partitioners() -> None:
    assert isinstance(make_partitioner(cfg("s_split"), 4, 0), SSplitPartitioner)
    assert isinstance(make_partitioner(cfg("dirichlet"), 4, 0), DirichletPartitioner)
    assert isinstance(make_partitioner(cfg("pathological"), 4, 0), PathologicalPartitioner)
    assert isinstance(make_partitioner(cfg("iid"), 4, 0), IidPartitioner)
    assert set(PARTITIONERS) == {"s_split", "dirichlet", "pathological", "iid", "natural"}


def test_unknown_kind_names_the_valid_kinds() -> None:
    with pytest.raises(ValueError, match=r"dirichlet.*iid.*pathological.*s_split"):
        make_partitioner(cfg("shards"), 4, 0)


def test_s_zero_is_near_iid() -> None:
    ds = synthetic(np.random.default_rng(0).choice(3, size=4000, p=[0.5, 0.3, 0.2]))
    global_mix = np.bincount(ds[LABEL], minlength=3) / len(ds)
    for labels in partition_labels(SSplitPartitioner(8, s=0.0, seed=0), ds):
        # 500 examples per client: the std of a label fraction is at most sqrt(0.25 / 500) = 0.022.
        assert np.abs(np.bincount(labels, minlength=3) / len(labels) - global_mix).max() < 0.08


def test_s_one_with_two_balanced_labels_splits_clients_in_halves() -> None:
    parts = partition_labels(SSplitPartitioner(8, s=1.0, seed=0), balanced(2, 400))
    assert [set(p.tolist()) for p in parts] == [{0}] * 4 + [{1}] * 4


def test_s_one_gives_single_label_clients_when_divisible() -> None:
    parts = partition_labels(SSplitPartitioner(8, s=1.0, seed=5), balanced(4, 250))
    assert [sorted(set(p.tolist())) for p in parts] == [[0], [0], [1], [1], [2], [2], [3], [3]]


def test_s_one_unbalanced_clients_straddle_at_most_one_boundary() -> None:
    ds = synthetic(np.random.default_rng(2).choice(3, size=997, p=[0.6, 0.3, 0.1]))
    for labels in partition_labels(SSplitPartitioner(6, s=1.0, seed=0), ds):
        present = sorted(set(labels.tolist()))
        assert len(present) <= 2 and present[-1] - present[0] <= 1


@pytest.mark.parametrize("s", [0.25, 0.5, 0.75])
def test_intermediate_s_mixes_sorted_and_iid_shares(s: float) -> None:
    # Client 0 gets its sorted chunk from label 0 only, and half of its iid share is label 0.
    parts = partition_labels(SSplitPartitioner(8, s=s, seed=0), balanced(2, 2000))
    expected = s + (1 - s) * 0.5
    assert abs(np.mean(parts[0] == 0) - expected) < 0.06
    assert abs(np.mean(parts[-1] == 1) - expected) < 0.06


@pytest.mark.parametrize("config", CASES, ids=lambda c: f"{c.kind}-s{c.s}")
def test_same_seed_same_partitions(config: PartitionConfig) -> None:
    ds = balanced(3, 200)
    first = partition_rows(make_partitioner(config, 6, seed=11), ds)
    again = partition_rows(make_partitioner(config, 6, seed=11), ds)
    assert first == again


@pytest.mark.parametrize("config", [c for c in CASES if c.kind != "iid"], ids=lambda c: f"{c.kind}-s{c.s}")
def test_different_seed_different_partitions(config: PartitionConfig) -> None:
    ds = balanced(3, 200)
    assert partition_rows(make_partitioner(config, 6, seed=1), ds) != partition_rows(
        make_partitioner(config, 6, seed=2), ds
    )


@pytest.mark.parametrize("s", [-0.1, 1.5])
def test_invalid_s_raises(s: float) -> None:
    with pytest.raises(ValueError, match=r"s must lie in \[0, 1\]"):
        SSplitPartitioner(4, s=s)


def test_invalid_partition_requests_raise() -> None:
    with pytest.raises(ValueError, match="positive"):
        SSplitPartitioner(0, s=0.5)
    partitioner = SSplitPartitioner(4, s=0.5)
    partitioner.dataset = balanced(2, 10)
    with pytest.raises(ValueError, match="partition_id 4"):
        partitioner.load_partition(4)
    too_many = SSplitPartitioner(30, s=0.5)
    too_many.dataset = balanced(2, 10)
    with pytest.raises(ValueError, match="30 partitions"):
        too_many.load_partition(0)
