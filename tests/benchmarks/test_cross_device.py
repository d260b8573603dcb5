"""The cross-device benchmark measures the preset it names, and groups clients by how often they trained."""

from __future__ import annotations

from benchmarks.cross_device import BUCKETS, CrossDeviceSizes, bucket_values
from benchmarks.federated import setting_overrides
from pf2lora_core.config.experiment import load


def test_the_recorded_sizes_are_the_presets() -> None:
    """A run's sizes (its log key) are what experiment=cross_device sets, and its overrides change nothing of it."""
    preset = load(["experiment=cross_device"])
    sizes = CrossDeviceSizes()
    fed = preset.federation
    assert (sizes.clients, sizes.examples) == (fed.num_clients, preset.cfg.task.max_examples)
    assert (sizes.rounds, sizes.local_steps) == (preset.rounds, preset.local_steps)
    assert (sizes.fraction_train, sizes.min_train_clients) == (fed.fraction_train, fed.min_train_clients)
    assert sizes.max_length == preset.cfg.task.max_length
    run = load([*setting_overrides("rt2_s0.5"), *sizes.overrides("rt2_s0.5"), "algorithm=homlora"])
    assert run.federation.num_clients == 64 and run.federation.fraction_train == 0.1
    assert run.cfg.partition.s == 0.5 and run.cfg.name == "cross_device"


def test_buckets_cover_every_count_once_and_skip_missing_values() -> None:
    run = {"rounds_trained": [0, 1, 2, 5, 0, None], "test": [0.5, 0.6, 0.7, 0.8, None, 0.9]}
    got = {label: bucket_values(run, "test", lo, hi) for label, lo, hi in BUCKETS}
    assert got == {"never trained": [0.5], "trained once": [0.6], "trained 2+ times": [0.7, 0.8]}
    assert bucket_values({"test": [0.5]}, "test", 0, 0) == []  # an old row without rounds_trained
