"""Equal budgets: every algorithm's round of K local steps reads exactly K minibatches of task.batch_size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pf2lora_core.algorithms import REGISTRY
from pf2lora_core.algorithms.flora import redraw_lora_a
from pf2lora_core.algorithms.perfedavg import slice_batch
from pf2lora_core.config.experiment import load
from pf2lora_core.config.keys import BATCHES_SEEN, COMMON, EXAMPLES_SEEN, GRADIENT_PASSES, LORA_A, PRIVATE
from pf2lora_core.data import splits as data_client
from pf2lora_core.data.columns import LABELS
from pf2lora_core.federation.client_runtime import ClientRuntime
from tests.helpers.tiny_bert import make_tiny_bert

K, BATCH, CLIENTS = 3, 8, 2
CONF = Path(__file__).resolve().parents[2] / "conf" / "algorithm"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("m") / "tiny-bert")


class Handed:
    """Counts the minibatches ``Batches`` hands out (the data loader itself, below every algorithm)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        original = data_client.Batches._generate

        def counting(batches: data_client.Batches, order) -> Iterator[dict[str, torch.Tensor]]:
            for batch in original(batches, order):
                self.sizes.append(int(batch[LABELS].shape[0]))
                yield batch

        monkeypatch.setattr(data_client.Batches, "_generate", counting)


def _runtime(model: Path, algorithm: str) -> ClientRuntime:
    # 2 clients x 120 rows: 84 train rows each (168 pooled), so K (or K x clients) full batches of 8 fit
    return ClientRuntime(load([f"algorithm={algorithm}", "model.source=path", f"model.name={model}",
                               f"federation.num_clients={CLIENTS}", f"local_steps={K}", "task.max_examples=240",
                               f"task.batch_size={BATCH}", "flops_rounds=0"]))  # fmt: skip


@pytest.mark.parametrize("algorithm", sorted(REGISTRY))
def test_one_round_reads_k_minibatches_of_the_batch_size(
    algorithm: str, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(tiny_bert, algorithm)
    algo = rt.exp.algorithm
    down = algo.downlink(algo.server_init(rt.model.export(COMMON)), 0)
    handed = Handed(monkeypatch)
    out = rt.train(0, 1, down, None)
    steps = K * (CLIENTS if algo.pooled_training else 1)  # centralized: the federation's K x N steps
    # round 1 starts from the private initialization (PF2LoRA's ``refit_initial`` is off by default)
    assert not algo.refits_initial
    assert handed.sizes == [BATCH] * steps
    assert out.metrics[BATCHES_SEEN] == steps and out.metrics[EXAMPLES_SEEN] == steps * BATCH
    assert out.metrics[GRADIENT_PASSES] >= steps
    if algo.refits_private:  # a trained private level with no evaluation's re-fit at hand: J more, counted
        handed.sizes.clear()
        out = rt.train(0, 2, down, out.private)
        steps += algo.params.refit_steps
        assert handed.sizes == [BATCH] * steps
        assert out.metrics[BATCHES_SEEN] == steps and out.metrics[EXAMPLES_SEEN] == steps * BATCH


def test_paper_schedules_stay_behind_their_flags(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-FedAvg (HF) with independent batches reads 3K, FedDPA with fresh batches per phase 2K."""
    for algorithm, flag, factor in (("perfedavg", "algorithm.one_batch_per_step=false", 3),
                                    ("feddpa", "algorithm.one_batch_per_step=false", 2)):  # fmt: skip
        rt = ClientRuntime(load([f"algorithm={algorithm}", "model.source=path", f"model.name={tiny_bert}",
                                 f"federation.num_clients={CLIENTS}", f"local_steps={K}", "task.max_examples=240",
                                 "task.batch_size=4", "flops_rounds=0", flag]))  # fmt: skip
        handed = Handed(monkeypatch)
        rt.train(0, 1, rt.model.export(COMMON), None)
        assert len(handed.sizes) == factor * K, algorithm


def test_perfedavg_slices_are_disjoint_and_cover_the_batch() -> None:
    batch = {LABELS: torch.arange(16), "input_ids": torch.arange(32).reshape(16, 2)}
    parts = slice_batch(batch, 3)
    assert [len(p[LABELS]) for p in parts] == [6, 5, 5]
    assert torch.equal(torch.cat([p[LABELS] for p in parts]), batch[LABELS])
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    tiny = slice_batch({LABELS: torch.arange(2)}, 3)  # too few rows to cut: the batch whole, thrice
    assert all(torch.equal(p[LABELS], torch.arange(2)) for p in tiny)


def test_local_head_follows_head_level(tiny_bert: Path) -> None:
    common = _runtime(tiny_bert, "local")
    sent = set(common.model.export(COMMON))
    assert sent and not any(".lora_" in n for n in sent)  # only the head travels
    assert all(".lora_" in n for n in common.model.export(PRIVATE))
    private = ClientRuntime(load(["algorithm=local", "model.source=path", f"model.name={tiny_bert}",
                                  "model.head_level=private", "task.max_examples=240"]))  # fmt: skip
    assert private.model.export(COMMON) == {} and private.model.levels == (PRIVATE,)


def test_flora_draws_a_fresh_a_every_round(tiny_bert: Path) -> None:
    rt = _runtime(tiny_bert, "flora")
    params = rt.model.parameters(COMMON)
    redraw_lora_a(params, seed=1)
    first = {n: p.detach().clone() for n, p in params.items() if LORA_A in n}
    redraw_lora_a(params, seed=2)
    assert all(not torch.equal(first[n], params[n]) for n in first)
    redraw_lora_a(params, seed=1)
    assert all(torch.equal(first[n], params[n]) for n in first)  # seeded: a re-run round draws the same A
    algo = rt.exp.algorithm
    down = algo.downlink(algo.server_init(rt.model.export(COMMON)), 0)
    r1 = rt.train(0, 1, down, None)
    r2 = rt.train(0, 2, down, r1.private)
    a1 = {k: v for k, v in r1.common.items() if LORA_A in k}
    assert a1 and all(not torch.equal(a1[k], r2.common[k]) for k in a1)


def test_default_alphas_and_max_ranks_match_homlora() -> None:
    """One alpha for every LoRA algorithm; HETLoRA's / FlexLoRA's largest rank at least HOMLoRA's r."""
    hom = OmegaConf.load(CONF / "homlora.yaml")
    for name in ("ffa_lora", "fedsa_lora", "local", "perfedavg", "feddpa", "pf2lora", "flora", "centralized"):
        assert OmegaConf.load(CONF / f"{name}.yaml").lora_alpha == hom.lora_alpha, name
    for name in ("hetlora", "flexlora"):
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert cfg.rank >= hom.rank and all(r <= cfg.rank for r in cfg.client_ranks), name


def test_offline_compare_preset() -> None:
    exp = load(["experiment=offline_compare", "algorithm=pf2lora"])
    assert (exp.cfg.rounds, exp.cfg.local_steps, exp.cfg.eval_every) == (8, 8, 4)
    assert (exp.task.name, exp.task.max_examples, exp.task.val_fraction) == ("rotten_tomatoes", 3200, 0.1)
    assert (exp.partition.kind, exp.partition.s, exp.federation.num_clients) == ("s_split", 0.5, 8)
    assert exp.model.name == "minilm-l6" and exp.model.pooling == "mean"
