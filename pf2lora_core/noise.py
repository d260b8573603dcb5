"""One fixed random stream per local step: same dropout masks in every pass, drawn only once.

The hypergradient differentiates one fixed stochastic objective per step (``pf2lora_core.solver``),
so every pass of a step (inner gradient, outer gradient, HVP probes) must see the same dropout
masks. ``SeededLoss`` guarantees it by re-seeding the global RNG before each pass. That alone
draws the same masks two to four times per step, and on CPU drawing them is expensive: on
MiniLM-L6 (batch 16, length 64) the 14 ``nn.Dropout`` calls of one forward take about 11% of a
forward+backward pass, all of it in ``bernoulli_``.

``DropoutTape`` removes the redundant draws. Installed on a model, it wraps every ``nn.Dropout``
module: in the first pass of a seeded objective it draws each mask exactly as torch's CPU
dropout does (``empty_like(x).bernoulli_(1 - p).div_(1 - p)``, then ``x * mask``) and records
it together with the RNG state right after the draw; in every later pass of the same objective
it multiplies by the recorded mask and restores that RNG state. Restoring the state matters:
randomness the tape does not cover (attention dropout inside ``scaled_dot_product_attention``,
functional ``F.dropout`` calls) then draws from exactly the same stream position as in the first
pass, so the replay is indistinguishable from re-seeding and redrawing. It is an optimisation
only: without a tape (or for modules in eval mode) dropout runs as usual under the re-seeded RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pf2lora_core.hypergrad import LossFn


@contextmanager
def same_noise(seed: int, device: torch.device) -> Iterator[None]:
    """Run with the global RNG seeded to ``seed`` and restore it afterwards (fixed dropout masks)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


@dataclass
class Recording:
    """The dropout masks of one seeded objective, in call order, each with the RNG state after it."""

    masks: list[Tensor] = field(default_factory=list)
    rng_after: list[Tensor] = field(default_factory=list)
    complete: bool = False  # a whole pass was recorded: later passes replay
    cursor: int = 0

    def clear(self) -> None:
        self.masks.clear()
        self.rng_after.clear()
        self.complete = False


class DropoutTape:
    """Records a model's dropout masks in the first pass of an objective and replays them after.

    Attach once per model (``DropoutTape(model)``); ``SeededLoss(..., tape=tape)`` then runs
    every pass of the objective under ``tape.recording(rec)`` with that objective's own
    ``Recording``. Outside ``recording`` the wrapped modules behave exactly like ``nn.Dropout``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.active: Recording | None = None
        self.modules = 0
        for module in model.modules():
            if type(module) is nn.Dropout:  # not subclasses: their forward differs
                module.forward = _TapedForward(self, module)  # type: ignore[method-assign]
                self.modules += 1

    @contextmanager
    def recording(self, rec: Recording) -> Iterator[None]:
        """One forward pass (and its backward) drawing from or replaying ``rec``."""
        if self.active is not None:
            raise RuntimeError("nested seeded passes on one model: a pass is already recording dropout masks")
        self.active, rec.cursor = rec, 0
        ok = False
        try:
            yield
            ok = True
        finally:
            self.active = None
            if not rec.complete:
                if ok:
                    rec.complete = True
                else:
                    rec.clear()  # a failed first pass leaves nothing half-recorded behind
            elif ok and rec.cursor != len(rec.masks):
                raise RuntimeError(
                    f"a replayed pass used {rec.cursor} dropout masks where the first pass drew "
                    f"{len(rec.masks)}: passes of one step must run the same forward"
                )

    def apply(self, module: nn.Dropout, x: Tensor) -> Tensor:
        rec = self.active
        if rec is None or not module.training or module.p == 0.0 or x.device.type not in _RNG:
            return nn.Dropout.forward(module, x)
        if module.p == 1.0:
            return x * 0.0
        get_state, set_state = _RNG[x.device.type]
        if not rec.complete:  # first pass: draw as torch's CPU dropout does, and remember
            mask = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - module.p)
            mask.div_(1.0 - module.p)
            rec.masks.append(mask)
            rec.rng_after.append(get_state(x.device))
            return x * mask
        i = rec.cursor
        if i >= len(rec.masks) or rec.masks[i].shape != x.shape:
            raise RuntimeError(
                f"dropout call {i} of a replayed pass does not match the first pass (shape {tuple(x.shape)}): "
                "passes of one step must run the same forward on the same batch"
            )
        rec.cursor += 1
        set_state(rec.rng_after[i], x.device)
        return x * rec.masks[i]


class _TapedForward:
    """``nn.Dropout.forward`` routed through a tape (``deepcopy`` of the model copies both along)."""

    def __init__(self, tape: DropoutTape, module: nn.Dropout) -> None:
        self.tape, self.module = tape, module

    def __call__(self, x: Tensor) -> Tensor:
        return self.tape.apply(self.module, x)


def _cpu_state(_: torch.device) -> Tensor:
    return torch.get_rng_state()


def _cpu_set(state: Tensor, _: torch.device) -> None:
    torch.set_rng_state(state)


def _cuda_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device)


def _cuda_set(state: Tensor, device: torch.device) -> None:
    torch.cuda.set_rng_state(state, device)


# devices whose generator state the tape can save and restore
_RNG: dict[str, tuple[Callable[[torch.device], Tensor], Callable[[Tensor, torch.device], None]]] = {
    "cpu": (_cpu_state, _cpu_set),
    "cuda": (_cuda_state, _cuda_set),
}


class SeededLoss:
    """``loss`` with one fixed random stream: every call sees the same dropout masks.

    With a ``tape``, the masks of the tape's model are drawn in the first call and replayed in
    the later ones (see the module docstring); the ``recording`` lives as long as this object.
    """

    def __init__(self, loss: LossFn, seed: int, device: torch.device, tape: DropoutTape | None = None) -> None:
        self.loss, self.seed, self.device, self.tape = loss, seed, device, tape
        self.recording = Recording()

    def __call__(self, params: dict[str, Tensor] | None) -> Tensor:
        with same_noise(self.seed, self.device):
            if self.tape is None:
                return self.loss(params)
            with self.tape.recording(self.recording):
                return self.loss(params)
