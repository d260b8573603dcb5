"""The ServerApp's run directory: writes also go to the tracker, common adapters also in PEFT's format."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf
from torch import Tensor

from pf2lora_core.config.experiment import Experiment
from pf2lora_core.config.keys import COMMON
from pf2lora_core.config.schema import TrackingConfig
from pf2lora_core.run.export import export_problem, save_adapter
from pf2lora_core.run.records import RoundRecord, Summary
from pf2lora_core.run.run_dir import RunDir
from pf2lora_core.run.tracking import Tracker, make_tracker
from pf2lora_core.training.adapters import TwoLevelModel


def tracking_config(exp: Experiment) -> TrackingConfig:
    return TrackingConfig(**OmegaConf.to_container(exp.cfg.tracking, resolve=True))  # type: ignore[arg-type]


class ServerRunDir(RunDir):
    """A :class:`RunDir` whose metrics records and summary also go to ``tracker``, and whose common
    adapter of every round is also saved with ``save_pretrained`` (``checkpoints/common_round_XXXX/``)
    where the algorithm's common level is a LoRA adapter (see ``export.export_problem``)."""

    def __init__(self, path: Path, exp: Experiment, tracker: Tracker | None = None) -> None:
        super().__init__(path)
        self.exp = exp
        self.tracker = tracker or make_tracker(tracking_config(exp), path, path.name)
        self.peft_problem = export_problem(exp.algorithm, personalized=False)
        # built now, before the run seeds its RNGs (building seeds them), on CPU: only for saving
        self._model: TwoLevelModel | None = _cpu_model(exp) if self.peft_problem is None else None

    def append_metrics(self, record: RoundRecord) -> None:
        super().append_metrics(record)
        self.tracker.log_round(record)

    def write_summary(self, summary: Summary) -> None:
        super().write_summary(summary)
        self.tracker.log_summary(summary)

    def save_common(self, round_: int, tensors: Mapping[str, Tensor]) -> Path:
        path = super().save_common(round_, tensors)
        if self._model is not None:
            self._model.load(COMMON, tensors)
            save_adapter(self._model, [COMMON], path.with_suffix(""), self.exp)
        return path


def _cpu_model(exp: Experiment) -> TwoLevelModel:
    from pf2lora_core.federation.client_runtime import build_model
    from pf2lora_core.training.runtime import resolve_device

    return build_model(exp, resolve_device("cpu"))[0]
