"""Per-client train / validation / test splits: disjoint, seeded, sized as configured, for every partitioner."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pf2lora_core.config.experiment import load
from pf2lora_core.config.schema import ConfigError, PartitionConfig
from pf2lora_core.data import PARTITIONERS
from pf2lora_core.data import splits as client_module
from pf2lora_core.data.columns import LABEL, MOVIE
from pf2lora_core.data.splits import _client_rows, _pooled, train_val_test
from tests.data.test_data import make_task

PARTITIONS = {
    "s_split": PartitionConfig(kind="s_split", s=0.5, alpha=0.5, classes_per_partition=1, min_partition_size=10),
    "dirichlet": PartitionConfig(kind="dirichlet", s=0.5, alpha=0.5, classes_per_partition=1, min_partition_size=10),
    "pathological": PartitionConfig(
        kind="pathological", s=0.5, alpha=0.5, classes_per_partition=1, min_partition_size=10
    ),
    "iid": PartitionConfig(kind="iid", s=0.5, alpha=0.5, classes_per_partition=1, min_partition_size=10),
    "natural": PartitionConfig(
        kind="natural", s=0.5, alpha=0.5, classes_per_partition=1, min_partition_size=10, by=MOVIE, ids_per_client=5
    ),
}


def test_every_partitioner_is_covered() -> None:
    assert set(PARTITIONS) == set(PARTITIONERS)


def _expected(n: int, fraction: float) -> int:
    return min(max(round(fraction * n), 1), n - 1) if n >= 2 else round(fraction * n)


@pytest.mark.parametrize("kind", sorted(PARTITIONS))
def test_splits_disjoint_sized_stratified_and_seeded(kind: str) -> None:
    task, partition, num_clients = make_task(max_examples=1200), PARTITIONS[kind], 4
    labels = np.asarray(_pooled(task, 0)[LABEL])
    rows = _client_rows(task, partition, num_clients, seed=0)
    seen: set[int] = set()
    for r in rows:
        train, val, test = set(r.train.tolist()), set(r.validation.tolist()), set(r.test.tolist())
        assert not train & val and not train & test and not val & test  # disjoint within a client
        part = train | val | test
        assert not part & seen  # and across clients
        seen |= part
        n = len(part)
        assert len(test) == _expected(n, task.test_fraction)
        assert len(val) == _expected(n, task.val_fraction)
        assert len(train) == n - len(test) - len(val) >= 1
        # stratified: each label's validation share is within one row of its proportional quota
        for label in np.unique(labels[list(part)]):
            quota = (labels[list(part)] == label).mean() * len(val)
            assert abs((labels[r.validation] == label).sum() - quota) < 1 + 1e-9
    client_module.clear_caches()
    again = _client_rows(task, partition, num_clients, seed=0)
    for a, b in zip(rows, again, strict=True):  # same seed, same split (rebuilt from scratch)
        assert a.train.tolist() == b.train.tolist() and a.validation.tolist() == b.validation.tolist()
        assert a.test.tolist() == b.test.tolist()
    other = _client_rows(task, partition, num_clients, seed=1)
    assert any(a.validation.tolist() != b.validation.tolist() for a, b in zip(rows, other, strict=True))


def test_three_way_split_by_hand() -> None:
    rows, labels = np.arange(100, 120), np.array([0] * 10 + [1] * 10)
    split = train_val_test(rows, labels, 0.2, 0.1, np.random.default_rng(0))
    assert len(split.test) == 4 and len(split.validation) == 2 and len(split.train) == 14
    assert np.bincount(labels[split.test - 100]).tolist() == [2, 2]  # 2 per label
    assert np.bincount(labels[split.validation - 100]).tolist() == [1, 1]
    assert sorted([*split.train, *split.validation, *split.test]) == rows.tolist()


def test_validation_leaves_the_test_split_unchanged() -> None:
    """Test rows are drawn first: turning validation on never changes what a run is tested on."""
    rows, labels = np.arange(50), np.arange(50) % 3
    with_val = train_val_test(rows, labels, 0.2, 0.1, np.random.default_rng([0, 1]))
    without = train_val_test(rows, labels, 0.2, 0.0, np.random.default_rng([0, 1]))
    assert with_val.test.tolist() == without.test.tolist()
    assert len(without.validation) == 0
    assert sorted([*with_val.train, *with_val.validation]) == without.train.tolist()


def test_tiny_partition_keeps_a_train_row() -> None:
    split = train_val_test(np.arange(3), np.zeros(3, dtype=int), 0.4, 0.4, np.random.default_rng(0))
    assert len(split.train) == 1 and len(split.test) == 1 and len(split.validation) == 1


def test_bad_val_fraction_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_test(np.arange(10), np.zeros(10, dtype=int), 0.5, 0.5, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"task\.val_fraction"):
        load(["task.val_fraction=0.8"])


def test_val_fraction_zero_gives_no_validation_rows() -> None:
    task = dataclasses.replace(make_task(max_examples=400), val_fraction=0.0)
    assert all(len(r.validation) == 0 for r in _client_rows(task, PARTITIONS["iid"], 2, seed=0))


def test_rotten_tomatoes_3way_has_plot_as_a_third_class() -> None:
    task = make_task(name="rotten_tomatoes_3way", max_examples=0)
    pooled = _pooled(task, 0)
    labels = np.asarray(pooled[LABEL])
    assert pooled.features[LABEL].names == ["rotten", "fresh", "plot"]
    counts = np.bincount(labels, minlength=3)
    assert counts[2] > 900 and counts[0] > 4000 and counts[1] > 6000  # ~1.1k plot, 5.4k rotten, 7.4k fresh
    rows = _client_rows(dataclasses.replace(task, max_examples=1200), PARTITIONS["iid"], 4, seed=0)
    assert all(len(r.validation) and len(r.test) for r in rows)


def test_client_splits_read_the_pooled_label_column_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 28: every client's split re-read the whole pooled label column (through ``datasets``' row
    formatter, about 10 us a row), so a new client at 4096 clients x 8 rows cost 0.3 s, every round."""
    import datasets
    from transformers import AutoTokenizer

    from pf2lora_core.training.models import _packaged_dir

    task, partition, n = make_task(max_examples=600), PARTITIONS["s_split"], 20
    tokenizer = AutoTokenizer.from_pretrained(_packaged_dir("minilm-l6"))
    client_module.clear_caches()
    client_module.client_split(task, partition, n, 0, 0, tokenizer)  # pooled data, tokens, partition: once
    reads = []
    getitem = datasets.Dataset.__getitem__

    def counted(self: datasets.Dataset, key: object) -> object:
        if key == LABEL:
            reads.append(len(self))
        return getitem(self, key)

    monkeypatch.setattr(datasets.Dataset, "__getitem__", counted)
    for client in range(1, n):
        split = client_module.client_split(task, partition, n, client, 0, tokenizer)
        assert sum(split.train_label_hist) == len(split.train)
    assert reads == []  # one per client (each the whole pool) before


@pytest.mark.parametrize("kind", sorted(PARTITIONS))
def test_partition_rows_equal_the_partitions_rows(kind: str) -> None:
    """``partition_rows`` (index arrays where the partitioner has them) gives what ``load_partition`` holds."""
    from pf2lora_core.data.columns import ROW
    from pf2lora_core.data.partition import RowIndexed, make_partitioner, partition_rows

    pooled = _pooled(make_task(max_examples=600), 0)

    def fresh() -> object:
        p = make_partitioner(PARTITIONS[kind], 5, seed=0)
        columns = [LABEL, *([MOVIE] if kind == "natural" else [])]
        p.dataset = pooled.select_columns(columns).add_column(ROW, list(range(len(pooled))))
        return p

    expected = [list(fresh().load_partition(k)[ROW]) for k in range(5)]
    assert [r.tolist() for r in partition_rows(fresh(), ROW)] == expected
    assert isinstance(fresh(), RowIndexed) == (kind == "s_split")


def test_s_split_rows_never_build_a_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 28: the rows of N clients came from N ``datasets`` selects (about 1 ms each) in every process."""
    from pf2lora_core.data.partition import SSplitPartitioner

    built = []
    monkeypatch.setattr(SSplitPartitioner, "load_partition", lambda self, k: built.append(k))
    client_module.clear_caches()
    rows = _client_rows(make_task(max_examples=600), PARTITIONS["s_split"], 30, seed=0)
    assert len(rows) == 30 and built == []
