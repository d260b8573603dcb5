"""Label heterogeneity across clients, as flwr-datasets ``Partitioner`` subclasses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from pf2lora_core.config.schema import PartitionConfig
from pf2lora_core.data.columns import LABEL

# "deterministic" gives client k the labels k, k+1, ... (mod the number of labels): every label
# is used and equally often. flwr's default, "random", draws each client's labels independently,
# so with few clients some labels may go unused (it only warns) and the partitions are lopsided.
PATHOLOGICAL_MODE = "deterministic"


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """Column ``name`` of ``ds`` (its indices mapping applied) as a numpy array, straight from Arrow.

    ``np.asarray(ds[name])`` goes through ``datasets``' row formatter, about 10 us a row.
    """
    return ds.with_format("arrow")[name].to_numpy()


@runtime_checkable
class RowIndexed(Protocol):
    """A partitioner that can say which rows of its dataset form a partition without building it."""

    def partition_indices(self, partition_id: int) -> np.ndarray: ...


def partition_rows(partitioner: Partitioner, row_column: str) -> list[np.ndarray]:
    """Every partition's values of ``row_column`` (int64), each in its partition's order.

    A ``RowIndexed`` partitioner answers from its index arrays; any other builds each partition
    (``load_partition``: a ``datasets`` select, about 1 ms a client).
    """
    n = partitioner.num_partitions
    if isinstance(partitioner, RowIndexed):
        rows = column(partitioner.dataset, row_column).astype(np.int64)
        return [rows[partitioner.partition_indices(k)] for k in range(n)]
    return [column(partitioner.load_partition(k), row_column).astype(np.int64) for k in range(n)]


class SSplitPartitioner(Partitioner):
    """The s-split of the PF2LoRA paper: a fraction ``s`` of every label is dealt label-sorted.

    For each label, a seeded random fraction ``s`` of its examples joins a pool sorted by
    label; the pool is cut into ``num_partitions`` contiguous, equal-size chunks, chunk k to
    client k. The remaining ``1 - s`` of all examples is shuffled and dealt evenly. So ``s = 0``
    is iid and ``s = 1`` is fully label-sorted: every client holds one label or straddles
    the boundary between two neighbouring ones (with 2 balanced labels and 8 clients,
    clients 0-3 hold label 0 only and clients 4-7 label 1 only).

    Parameters
    ----------
    num_partitions : int
        Number of clients.
    s : float
        Fraction of each label dealt label-sorted, in [0, 1].
    partition_by : str
        Column holding the labels.
    seed : int
        Seeds which examples are sorted, the deal of the rest, and the order inside each
        partition (shuffled so that a partition is not label-sorted internally).
    """

    def __init__(self, num_partitions: int, s: float, partition_by: str = LABEL, seed: int = 0) -> None:
        super().__init__()
        if num_partitions <= 0:
            raise ValueError(f"num_partitions must be positive, got {num_partitions}")
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"s-split: s must lie in [0, 1] (0 = iid, 1 = label-sorted), got {s}")
        self._num_partitions = num_partitions
        self._s = s
        self._partition_by = partition_by
        self._seed = seed
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Total number of partitions."""
        return self._num_partitions

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """Rows of partition ``partition_id`` (all partitions are computed on the first call)."""
        return self.dataset.select(self.partition_indices(partition_id))

    def partition_indices(self, partition_id: int) -> np.ndarray:
        """Row numbers of partition ``partition_id`` in ``dataset`` (``load_partition`` without the select)."""
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(f"partition_id {partition_id} not in [0, {self._num_partitions})")
        if self._indices is None:
            self._indices = self._assign()
        return self._indices[partition_id]

    def _assign(self) -> list[np.ndarray]:
        if self._num_partitions > self.dataset.num_rows:
            raise ValueError(f"{self._num_partitions} partitions for only {self.dataset.num_rows} rows")
        rng = np.random.default_rng(self._seed)
        labels = column(self.dataset, self._partition_by)
        sorted_pool, rest = [], []
        for label in np.unique(labels):  # ascending labels: the pool comes out label-sorted
            members = rng.permutation(np.flatnonzero(labels == label))
            cut = round(self._s * len(members))
            sorted_pool.append(members[:cut])
            rest.append(members[cut:])
        sorted_chunks = np.array_split(np.concatenate(sorted_pool), self._num_partitions)
        rest_chunks = np.array_split(rng.permutation(np.concatenate(rest)), self._num_partitions)
        return [rng.permutation(np.concatenate(pair)) for pair in zip(sorted_chunks, rest_chunks, strict=True)]


class NaturalGroupPartitioner(Partitioner):
    """Natural partitioning: each client gets whole groups of rows sharing a natural id.

    flwr-datasets' ``NaturalIdPartitioner`` makes one partition per distinct value of
    ``partition_by`` (a movie, a speaker, a hospital); there are usually more ids than clients.
    The ids are put in a seeded random order and dealt in blocks of ``ids_per_client``: client k
    gets ids ``k*m .. k*m + m - 1``, the rest are unused. ``ids_per_client = 0`` deals every id
    round robin (client k gets ids k, k + N, k + 2N, ...).

    Parameters
    ----------
    num_partitions : int
        Number of clients.
    partition_by : str
        Column holding the natural id of each row.
    ids_per_client : int
        Natural ids per client (0 = all ids, round robin).
    seed : int
        Seeds the order in which ids are dealt.
    """

    def __init__(self, num_partitions: int, partition_by: str, ids_per_client: int, seed: int = 0) -> None:
        super().__init__()
        if num_partitions <= 0:
            raise ValueError(f"num_partitions must be positive, got {num_partitions}")
        if ids_per_client < 0:
            raise ValueError(f"partition.ids_per_client must be >= 0 (0 = all ids), got {ids_per_client}")
        self._num_partitions = num_partitions
        self._by = partition_by
        self._per_client = ids_per_client
        self._seed = seed
        self._groups: list[list[int]] | None = None
        self._natural: NaturalIdPartitioner | None = None

    @property
    def num_partitions(self) -> int:
        """Total number of partitions."""
        return self._num_partitions

    def natural_ids(self, partition_id: int) -> list[object]:
        """The natural ids (e.g. movies) dealt to ``partition_id``."""
        groups = self._assign()
        assert self._natural is not None
        return [self._natural.partition_id_to_natural_id[g] for g in groups[partition_id]]

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """Rows of every natural id dealt to ``partition_id`` (ids are dealt on the first call)."""
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(f"partition_id {partition_id} not in [0, {self._num_partitions})")
        groups = self._assign()
        assert self._natural is not None
        parts = [self._natural.load_partition(g) for g in groups[partition_id]]
        return datasets.concatenate_datasets(parts)

    def _assign(self) -> list[list[int]]:
        if self._groups is not None:
            return self._groups
        if self._by not in self.dataset.column_names:
            raise ValueError(
                f"partition.by={self._by!r} is not a column of the data; available: {self.dataset.column_names}"
            )
        natural = NaturalIdPartitioner(partition_by=self._by)
        natural.dataset = self.dataset
        natural.num_partitions  # noqa: B018 (flwr builds its id map lazily, on this first access)
        mapping = natural.partition_id_to_natural_id
        # sorted by id first: the deal depends on the seed only, not on row order
        ordered = sorted(mapping, key=lambda pid: str(mapping[pid]))
        ids = [ordered[i] for i in np.random.default_rng(self._seed).permutation(len(ordered))]
        n, m = self._num_partitions, self._per_client
        needed = n * max(m, 1)
        if len(ids) < needed:
            raise ValueError(
                f"natural partition by {self._by!r}: {len(ids)} distinct ids, but {n} clients x "
                f"{max(m, 1)} ids need {needed}; lower federation.num_clients or partition.ids_per_client"
            )
        self._groups = [ids[k * m : (k + 1) * m] for k in range(n)] if m else [ids[k::n] for k in range(n)]
        self._natural = natural
        return self._groups


PartitionerFactory = Callable[[PartitionConfig, int, int, str], Partitioner]


def _s_split(cfg: PartitionConfig, num_partitions: int, seed: int, label_column: str) -> Partitioner:
    return SSplitPartitioner(num_partitions, cfg.s, partition_by=label_column, seed=seed)


def _dirichlet(cfg: PartitionConfig, num_partitions: int, seed: int, label_column: str) -> Partitioner:
    # self_balancing off: flwr's balancing stops feeding clients above the mean size, which
    # skews the label mix of labels processed last away from Dir(alpha).
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by=label_column,
        alpha=float(cfg.alpha),
        min_partition_size=cfg.min_partition_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )


def _pathological(cfg: PartitionConfig, num_partitions: int, seed: int, label_column: str) -> Partitioner:
    return PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by=label_column,
        num_classes_per_partition=cfg.classes_per_partition,
        class_assignment_mode=PATHOLOGICAL_MODE,
        shuffle=True,
        seed=seed,
    )


def _iid(cfg: PartitionConfig, num_partitions: int, seed: int, label_column: str) -> Partitioner:
    # flwr's IidPartitioner shards contiguously without shuffling: it is iid only on a
    # randomly ordered dataset, which ``load_examples`` guarantees (seeded shuffle).
    return IidPartitioner(num_partitions=num_partitions)


def _natural(cfg: PartitionConfig, num_partitions: int, seed: int, label_column: str) -> Partitioner:
    return NaturalGroupPartitioner(num_partitions, cfg.by, cfg.ids_per_client, seed=seed)


PARTITIONERS: dict[str, PartitionerFactory] = {
    "natural": _natural,
    "s_split": _s_split,
    "dirichlet": _dirichlet,
    "pathological": _pathological,
    "iid": _iid,
}


def make_partitioner(cfg: PartitionConfig, num_partitions: int, seed: int, label_column: str = LABEL) -> Partitioner:
    """A fresh partitioner (flwr's accept a dataset only once) of kind ``cfg.kind``.

    Parameters
    ----------
    cfg : PartitionConfig
        ``kind`` picks from ``PARTITIONERS``; the kind's own parameters are read from it.
    num_partitions : int
        Number of clients.
    seed : int
        Seeds the partitioner's randomness.
    label_column : str
        Column the label-skewed partitioners split by.

    Returns
    -------
    Partitioner
        Assign ``.dataset`` (a randomly ordered one: see ``_iid``), then ``load_partition(k)``.
    """
    if cfg.kind not in PARTITIONERS:
        raise ValueError(f"unknown partition kind {cfg.kind!r}; valid kinds: {sorted(PARTITIONERS)}")
    return PARTITIONERS[cfg.kind](cfg, num_partitions, seed, label_column)
