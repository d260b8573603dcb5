"""Causal-LM (generation) task: prompt masking, loss oracle, metrics against hand-computed values,
left-padded batched generation, generation data sources, natural partitions, tiny GPT-2 and Llama
through the client runtime with two-level LoRA."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import COMMON, PERPLEXITY, PRIVATE
from pf2lora_core.config.schema import ConfigError, GenerationConfig, TaskConfig
from pf2lora_core.data import load_examples
from pf2lora_core.data import splits as data_client
from pf2lora_core.data.columns import IGNORE_INDEX, INPUT_IDS, LABEL, LABELS, PROMPT, PROMPT_LENGTH, TARGET
from pf2lora_core.data.partition import NaturalGroupPartitioner
from pf2lora_core.data.sources import linearize_mr, linearize_triples, review_prompt, webnlg_rows
from pf2lora_core.training import generation_metrics as nlg_metrics
from pf2lora_core.training.tasks import CausalLMTask, group_references, left_pad, token_cross_entropy
from tests.helpers.tiny_lm import make_tiny_lm

ARCHS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm")
    return {arch: make_tiny_lm(root / arch, arch) for arch in ARCHS}


def lm_overrides(model: Path, *extra: str) -> list[str]:
    return [
        "task=rt_reviews", "model=smollm2", "model.source=path", f"model.name={model}", "partition=natural",
        "partition.ids_per_client=2", "federation.num_clients=2", "local_steps=2", "generation.max_new_tokens=8",
        "device=cpu", *extra,
    ]  # fmt: skip


# --- tokenization: the prompt is masked from the loss ---------------------------------------------


def test_prompt_tokens_are_masked_and_target_ends_with_eos(tiny: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    encode = data_client.causal_encoder(tok, max_length=64)
    out = encode({PROMPT: ["Movie: x\nVerdict: fresh\nReview:"], TARGET: [" Great fun."]})
    ids, labels, n = out[INPUT_IDS][0], out[LABELS][0], out[PROMPT_LENGTH][0]
    prompt_ids = tok("Movie: x\nVerdict: fresh\nReview:").input_ids
    target_ids = tok(" Great fun.", add_special_tokens=False).input_ids
    assert n == len(prompt_ids) and ids == [*prompt_ids, *target_ids, tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * n + [*target_ids, tok.eos_token_id]
    long = {PROMPT: ["Movie: x\nVerdict: fresh\nReview:"], TARGET: [" a b c d e f g h i j k l m n"]}
    cut = data_client.causal_encoder(tok, max_length=n + 3)(long)
    assert len(cut[INPUT_IDS][0]) == n + 3 and cut[PROMPT_LENGTH][0] == n  # the target is cut, not the prompt


def test_token_cross_entropy_matches_hand_computed_mean_over_targets() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1, 6], [IGNORE_INDEX, 2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    logp = torch.log_softmax(logits, dim=-1)
    terms = [-logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 5) if labels[b, t] != IGNORE_INDEX]
    expected = torch.stack(terms).mean()
    assert torch.allclose(token_cross_entropy(logits, labels), expected)
    # the logits at prompt positions that predict prompt tokens do not matter
    changed = logits.clone()
    changed[0, 0] += 100.0  # predicts position 1, a prompt token
    assert torch.allclose(token_cross_entropy(changed, labels), expected)


def test_causal_collate_right_pads_with_ignored_labels(tiny: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    rows = [{INPUT_IDS: [5, 6, 7], "attention_mask": [1, 1, 1], LABELS: [IGNORE_INDEX, 6, 7]},
            {INPUT_IDS: [8], "attention_mask": [1], LABELS: [8]}]  # fmt: skip
    batch = data_client.collate_causal(tok)(rows)
    pad = tok.pad_token_id
    assert batch[INPUT_IDS].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch[LABELS].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


# --- metrics against hand-computed values -----------------------------------------------------------


def test_bleu_hand_computed() -> None:
    # p1..p4 = 6/7, 5/6, 4/5, 3/4; hypothesis longer than the reference: no brevity penalty
    expected = 100 * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25
    assert nlg_metrics.bleu(["the cat sat on the mat today"], [["the cat sat on the mat"]]) == pytest.approx(expected)
    # n-grams clip against any reference; the closest reference length sets the brevity penalty
    assert nlg_metrics.bleu(["a b c d e"], [["a b c d e f g h", "a b c d x"]]) == pytest.approx(100.0)


def test_rouge_l_hand_computed() -> None:
    # LCS "the cat sat" = 3: P = 3/3, R = 3/4, F = 2PR / (P + R) = 6/7; the best reference counts
    assert nlg_metrics.rouge_l(["the cat sat"], [["the cat was sat", "dog"]]) == pytest.approx(100 * 6 / 7)
    assert nlg_metrics.rouge_l(["a b", "c"], [["a b"], ["d"]]) == pytest.approx(50.0)


def test_meteor_hand_computed() -> None:
    # identical 6 words: Fmean = 1, one chunk: penalty 0.5 * (1/6)^3
    assert nlg_metrics.meteor(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(
        100 * (1 - 0.5 / 216)
    )
    # 3 of 6 reference words: P = 1, R = 1/2, Fmean = PR / (0.9 P + 0.1 R); one chunk of 3 matches
    fmean = 0.5 / (0.9 + 0.05)
    expected = 100 * fmean * (1 - 0.5 * (1 / 3) ** 3)
    assert nlg_metrics.meteor(["the cat sat"], [["the cat sat on a mat"]]) == pytest.approx(expected)


def test_perplexity_and_bad_metric_input() -> None:
    assert nlg_metrics.perplexity(2 * math.log(5.0), 2) == pytest.approx(5.0)
    assert math.isnan(nlg_metrics.perplexity(0.0, 0))
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        nlg_metrics.bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no reference"):
        nlg_metrics.rouge_l(["a"], [[]])


def test_missing_wordnet_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import nltk

    def no_nltk_wordnet(name: str) -> None:
        raise LookupError(name)

    monkeypatch.setattr(nltk.data, "find", no_nltk_wordnet)
    monkeypatch.setenv(nlg_metrics.WORDNET_ENV, str(tmp_path / "empty"))
    nlg_metrics.wordnet.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="apt-get install wordnet-base"):
            nlg_metrics.meteor(["a"], [["a"]])
    finally:
        nlg_metrics.wordnet.cache_clear()


# --- generation -------------------------------------------------------------------------------------


def test_left_pad_and_group_references() -> None:
    batch = left_pad([[4, 5, 6], [7]], pad_id=0)
    assert batch[INPUT_IDS].tolist() == [[4, 5, 6], [0, 0, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    ds = datasets.Dataset.from_dict({
        INPUT_IDS: [[1, 2, 9], [3, 8], [1, 2, 7]], PROMPT_LENGTH: [2, 1, 2],
        PROMPT: ["p", "q", "p"], TARGET: [" x ", "y", "z"],
    })  # fmt: skip
    prompts, refs = group_references(ds)
    assert prompts == [([1, 2], "p"), ([3], "q")] and refs == [["x", "z"], ["y"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_left_padded_generation_equals_one_by_one(arch: str, tiny: dict[str, Path]) -> None:
    """Greedy decoding of a left-padded batch gives each prompt the continuation it gets alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny[arch]).eval()
    prompts = ["Movie: a walk to remember\nVerdict: fresh\nReview:", "Movie: up\nVerdict: rotten\nReview:"]
    encode = data_client.causal_encoder(tok, max_length=64)
    ds = datasets.Dataset.from_dict(encode({PROMPT: prompts, TARGET: [" good", " bad"]}))
    ds = ds.add_column(PROMPT, prompts).add_column(TARGET, [" good", " bad"])
    task = _task(tok, GenerationConfig(max_new_tokens=6, num_beams=1, batch_size=2, metrics=["bleu"]))
    together, refs = task.generate(model, ds)
    task.generation = GenerationConfig(max_new_tokens=6, num_beams=1, batch_size=1, metrics=["bleu"])
    alone, _ = task.generate(model, ds)
    assert together == alone and refs == [["good"], ["bad"]]
    assert len(set(len(tok(p).input_ids) for p in prompts)) == 2  # the batch really needed padding


def _task(tok: Any, gen: GenerationConfig, metric: str = PERPLEXITY) -> CausalLMTask:
    from contextlib import nullcontext

    return CausalLMTask(metric, torch.device("cpu"), nullcontext, tok, 4, 8, gen)


def test_task_rejects_metrics_it_does_not_compute(tiny: dict[str, Path]) -> None:
    gen = GenerationConfig(max_new_tokens=4, num_beams=1, batch_size=2, metrics=["bleu"])
    with pytest.raises(ValueError, match=r"add it to generation\.metrics"):
        _task(None, gen, metric="meteor")
    with pytest.raises(ValueError, match="reports one of"):
        _task(None, gen, metric="accuracy")


# --- data sources and partitions ------------------------------------------------------------------


def test_linearization_of_structured_inputs() -> None:
    assert linearize_mr("name[The Vaults], eatType[pub], priceRange[more than £30]") == (
        "name: The Vaults | eatType: pub | priceRange: more than £30"
    )
    with pytest.raises(ValueError, match="meaning representation"):
        linearize_mr("no slots here")
    assert linearize_triples(["Aarhus_Airport | cityServed | Aarhus", "Aarhus | country | Denmark"]) == (
        "Aarhus Airport | cityServed | Aarhus ; Aarhus | country | Denmark"
    )
    assert review_prompt("about_a_boy", "fresh") == "Movie: about a boy\nVerdict: fresh\nReview:"


def test_webnlg_rows_one_per_english_text() -> None:
    ds = datasets.Dataset.from_list([
        {"category": "Airport", "modified_triple_sets": {"mtriple_set": [["A | b | C"]]},
         "lex": {"text": ["A b C.", "C is A's b.", "A б C"], "lang": ["en", "", "ru"]}},
    ])  # fmt: skip
    rows = webnlg_rows(ds)
    assert rows[PROMPT] == ["Data: A | b | C\nText:"] * 2
    assert rows[TARGET] == [" A b C.", " C is A's b."] and rows["category"] == ["Airport"] * 2


def _e2e_task(**overrides: Any) -> TaskConfig:
    exp = load(["task=e2e_nlg"])
    task = exp.task
    for key, value in overrides.items():
        setattr(task, key, value)
    return task


def test_e2e_hub_loader_linearizes_and_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    def split(n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({
            "meaning_representation": [f"name[R{i}], food[Thai]" for i in range(n)],
            "human_reference": [f"R{i} serves Thai food." for i in range(n)],
        })  # fmt: skip

    calls: list[tuple[Any, ...]] = []

    def fake_load(*args: Any, **kwargs: Any) -> datasets.DatasetDict:
        calls.append((*args, kwargs.get("revision")))
        return datasets.DatasetDict({"train": split(3), "validation": split(2), "test": split(1)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_examples(_e2e_task(), seed=0)
    assert calls == [("tuetschek/e2e_nlg", "refs/convert/parquet")]
    assert len(ds) == 6 and set(ds.column_names) == {PROMPT, TARGET, LABEL}
    assert "Data: name: R0 | food: Thai\nText:" in ds[PROMPT] and " R0 serves Thai food." in ds[TARGET]


def test_web_nlg_hub_loader_explodes_texts_and_labels_by_category(monkeypatch: pytest.MonkeyPatch) -> None:
    def split(category: str, n: int) -> datasets.Dataset:
        return datasets.Dataset.from_list([
            {"category": category, "modified_triple_sets": {"mtriple_set": [[f"E{i} | p | O"]]},
             "lex": {"text": [f"E{i} p O.", f"O is p of E{i}."], "lang": ["en", "en"]}}
            for i in range(n)
        ])  # fmt: skip

    calls: list[tuple[Any, ...]] = []

    def fake_load(*args: Any, **kwargs: Any) -> datasets.DatasetDict:
        calls.append((*args, kwargs.get("revision")))
        return datasets.DatasetDict({"train": split("Airport", 2), "dev": split("Astronaut", 1)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_examples(load(["task=web_nlg", "task.name=web_nlg:release_v2"]).task, seed=0)
    assert calls == [("webnlg-challenge/web_nlg", "release_v2", "refs/convert/parquet")]
    assert len(ds) == 6 and ds.features[LABEL].names == ["Airport", "Astronaut"]
    assert "Data: E0 | p | O\nText:" in ds[PROMPT]


def test_local_jsonl_prompt_target_pairs(tmp_path: Path) -> None:
    import json

    path = tmp_path / "pairs.jsonl"
    rows = [{"input": f"Q{i}?", "output": f"A{i}.", "site": "ab"[i % 2]} for i in range(6)] + [
        {"input": "", "output": "x"}
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    base = ["task=files_lm", f"+task.data_files.train={path}", "task.text_columns=[input,output]"]
    ds = load_examples(load(base).task, seed=0)
    assert len(ds) == 6 and set(ds.column_names) == {PROMPT, TARGET, LABEL}  # the empty input is dropped
    assert sorted(ds[PROMPT]) == [f"Q{i}?" for i in range(6)] and ds.features[LABEL].names == ["all"]
    labelled = load_examples(load([*base, "task.label_column=site"]).task, seed=0)
    assert labelled.features[LABEL].names == ["a", "b"]
    with pytest.raises(ConfigError, match=r"\[input_column, target_column\]"):
        load([*base, "task.text_columns=[input]"])


def test_generation_dataset_needs_causal_kind() -> None:
    with pytest.raises(ConfigError, match=r"set task\.kind=causal_lm"):
        load_examples(_e2e_task(kind="classification"), seed=0)


def test_packaged_review_writing_task() -> None:
    ds = load_examples(load(["task=rt_reviews"]).task, seed=0)
    assert {PROMPT, TARGET, "movie_name", LABEL} <= set(ds.column_names)
    assert ds.features[LABEL].names == ["rotten", "fresh"]
    row = ds[0]
    verdict = ds.features[LABEL].names[row[LABEL]]
    assert row[PROMPT] == review_prompt(row["movie_name"], verdict) and row[TARGET].startswith(" ")


def test_natural_partition_deals_whole_groups() -> None:
    movies = [f"m{i % 7}" for i in range(70)]
    ds = datasets.Dataset.from_dict({"movie_name": movies, "row": list(range(70))})
    part = NaturalGroupPartitioner(3, "movie_name", ids_per_client=2, seed=1)
    part.dataset = ds
    groups = [set(part.natural_ids(k)) for k in range(3)]
    assert all(len(g) == 2 for g in groups) and not (groups[0] & groups[1] or groups[1] & groups[2])
    for k in range(3):
        rows = part.load_partition(k)
        assert set(rows["movie_name"]) == groups[k] and len(rows) == 20  # every row of its movies
    again = NaturalGroupPartitioner(3, "movie_name", ids_per_client=2, seed=1)
    again.dataset = ds.shuffle(seed=5)  # the deal does not depend on row order
    assert [set(again.natural_ids(k)) for k in range(3)] == groups
    too_many = NaturalGroupPartitioner(4, "movie_name", ids_per_client=2)
    too_many.dataset = ds
    with pytest.raises(ValueError, match="7 distinct ids, but 4 clients x 2 ids need 8"):
        too_many.load_partition(0)
    missing = NaturalGroupPartitioner(2, "speaker", ids_per_client=1)
    missing.dataset = ds
    with pytest.raises(ValueError, match=r"partition\.by='speaker' is not a column"):
        missing.load_partition(0)


def test_config_errors_for_generation() -> None:
    with pytest.raises(ConfigError, match=r"task\.metric"):
        load(["task=rt_reviews", "task.metric=accuracy"])
    with pytest.raises(ConfigError, match=r"generation\.metrics"):
        load(["task=rt_reviews", "generation.metrics=[bleu,cider]"])
    with pytest.raises(ConfigError, match=r"generation\.num_beams"):
        load(["task=rt_reviews", "generation.num_beams=0"])
    with pytest.raises(ConfigError, match=r"partition\.ids_per_client"):
        load(["partition=natural", "partition.ids_per_client=-1"])


# --- tiny decoders through the client runtime --------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_two_level_lora_on_tiny_decoders(arch: str, tiny: dict[str, Path]) -> None:
    """PF2LoRA trains both levels of a GPT-2 / Llama decoder (default targets) and evaluates it."""
    from pf2lora_core.federation.client_runtime import ClientRuntime

    exp = load(lm_overrides(tiny[arch], "algorithm=pf2lora", "algorithm.inner_lr=0.5"))
    rt = ClientRuntime(exp)
    targets = {"gpt2": ".c_attn.", "llama": ".q_proj."}[arch]
    assert any(targets in name for name in rt.model.parameters(COMMON))
    assert rt.model.num_parameters(PRIVATE) > 0
    common = rt.model.export(COMMON)
    out = rt.train(0, 1, common, None)
    assert math.isfinite(out.metrics["train_loss"])
    assert any(not torch.equal(out.common[k], common[k]) for k in common)
    assert any(not torch.equal(out.private[k], rt.initial_private[k]) for k in out.private)
    ev = rt.evaluate(0, out.common, out.private)
    for result in (ev.personalized, ev.global_):
        assert set(result) >= {PERPLEXITY, "bleu", "rouge_l", "meteor", "eval_loss"}
        assert result[PERPLEXITY] == pytest.approx(math.exp(result["eval_loss"]))
    assert ev.personalized != ev.global_  # the private adapter changes the model
    assert ev.rank["effective"] > 0


@pytest.mark.slow
def test_packaged_smollm2_is_dequantized_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GGUF checkpoint becomes a float32 safetensors directory once; later starts only load it."""
    import json

    import transformers

    from pf2lora_core.training.models import load_causal_lm, resolve_model

    cfg = load(["model=smollm2", f"model.cache_dir={tmp_path}"]).model
    converted = Path(resolve_model(cfg))
    assert converted.is_relative_to(tmp_path) and (converted / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())

    real = transformers.AutoModelForCausalLM.from_pretrained

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if "gguf_file" in kwargs:
            raise AssertionError("the GGUF checkpoint was converted again")
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", guarded)
    assert Path(resolve_model(cfg)) == converted
    loaded = load_causal_lm(cfg)
    assert loaded.model.config.model_type == "llama" and loaded.target_modules == ["q_proj", "v_proj"]
    assert loaded.tokenizer.eos_token is not None and loaded.tokenizer.pad_token is not None
