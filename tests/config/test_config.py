"""The Hydra tree composes, validates once, and names the key on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from pf2lora_core.algorithms import HOMLoRA, PF2LoRA
from pf2lora_core.config.experiment import conf_dir, from_yaml, load
from pf2lora_core.config.schema import ConfigError

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in conf_dir().iterdir() if p.is_dir()}


def test_default_composes_to_the_demo() -> None:
    exp = load()
    assert isinstance(exp.algorithm, PF2LoRA)
    assert exp.federation.num_clients == 4 and exp.partition.s == 0.5 and exp.cfg.rounds == 5
    assert exp.model.name == "minilm-l6" and exp.task.name == "rotten_tomatoes_3way"


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group: str, option: str) -> None:
    exp = load([f"{group}={option}"])
    if group == "experiment":  # presets are global packages: they set the run's name
        assert exp.cfg.name == option
    elif group == "tune":  # search spaces are global too: they set the tuning seeds (and hydra.sweeper)
        assert list(exp.cfg.sweep.seeds)
    else:
        assert exp.cfg[group] is not None


def test_presets_set_their_settings() -> None:
    quick = load(["experiment=offline_quick", "algorithm=hetlora"])
    assert (quick.cfg.rounds, quick.cfg.local_steps, quick.task.max_examples) == (4, 3, 1600)
    assert quick.algorithm.name == "hetlora" and quick.model.name == "minilm-l6"
    paper = load(["experiment=paper_glue", "task=glue_cola"])
    assert (paper.model.name, paper.task.name) == ("roberta-base", "glue/cola")
    assert paper.task.metric == "matthews_correlation"
    assert (paper.cfg.local_steps, paper.federation.num_clients, paper.algorithm.params.rank) == (10, 8, 8)
    assert paper.algorithm.params.private_rank == 2
    with pytest.raises(ConfigError, match="experiment"):
        load(["experiment=nope"])


def test_override_string_and_round_trip() -> None:
    exp = load("algorithm=homlora partition.s=0.5 'name=my run'")
    assert isinstance(exp.algorithm, HOMLoRA) and exp.partition.s == 0.5 and exp.cfg.name == "my run"
    again = from_yaml(exp.to_yaml())
    assert again.to_yaml() == exp.to_yaml()


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["algorithm.inner_lr=-1"], "inner_lr"),
        (["partition.s=1.5"], "partition.s"),
        (["+nonsense=1"], "nonsense"),
        (["algorithm.not_a_key=1"], "not_a_key"),
        (["algorithm=nope"], "algorithm/nope"),
        (["rounds=zero"], "rounds"),
        (["rounds=0"], "rounds"),
        (["algorithm.hvp=newton"], "hvp"),
        (["algorithm.private_rank=8"], "private_rank"),
        (["federation.min_train_clients=9"], "min_train_clients"),
        (["model.head_level=middle"], "head_level"),
    ],
)
def test_invalid_config_is_one_clear_error(overrides: list[str], names: str) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as err:
        load(overrides)
    assert names in str(err.value)


def test_private_head_on_a_one_adapter_algorithm_is_allowed() -> None:
    exp = load(["algorithm=homlora", "model.head_level=private"])  # FedPer-style: the head stays home
    assert exp.model.head_level == "private"


def test_conf_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PF2LORA_CONF", str(tmp_path))
    with pytest.raises(ConfigError, match="no Hydra config tree"):
        conf_dir()


def test_pf2lora_steps_follow_the_common_step_and_the_round() -> None:
    """inner_lr defaults to lr / 4 (the private level moves a quarter as far per entry), hvp_every to
    local_steps (one exact hypergradient step a round) and refit_steps to 3; pf2lora_exact has J = K
    and every step exact.
    Each can be set on its own, and what a client receives is resolved (no interpolation left)."""
    exp = load(["algorithm.lr=0.005", "local_steps=7"])
    p = exp.algorithm.params
    assert (p.inner_lr, p.refit_steps, p.hvp_every, p.reuse_inner_grad) == (0.00125, 3, 7, True)
    p = load(["algorithm=pf2lora_exact", "local_steps=7"]).algorithm.params
    assert (p.refit_steps, p.hvp_every, p.reuse_inner_grad, p.inner_step) == (7, 1, False, "rms")
    assert p.inner_lr == p.lr  # pf2lora.yaml before issue 29, as results/ ran it
    exp = load(["algorithm.lr=0.005", "algorithm.inner_lr=0.001", "algorithm.refit_steps=0"])
    assert (exp.algorithm.params.lr, exp.algorithm.params.inner_lr, exp.algorithm.params.refit_steps) == (
        0.005,
        0.001,
        0,
    )
    assert "${" not in exp.to_yaml()
    with pytest.raises(ConfigError, match="refit_steps"):
        load(["algorithm.refit_steps=-1"])
