"""One fixed random stream per local step: same dropout masks in every pass, drawn only once.

The hypergradient differentiates one fixed stochastic objective per step (``pf2lora_core.training.solver``),
so every pass of a step (inner gradient, outer gradient, HVP probes) must see the same dropout
masks. ``SeededLoss`` re-seeds the global RNG before each pass, and ``DropoutTape`` records every
mask of the step's first pass and replays it in the later ones.

What the tape covers:

- every ``nn.Dropout`` module (hidden-state, embedding and classifier dropout);
- attention-probability dropout of transformers models whose attention goes through
  transformers' ``AttentionInterface`` (``_supports_attention_backend``: BERT, Llama, GPT-2, ...).
  That dropout happens *inside* ``scaled_dot_product_attention`` normally, where no tape can
  see it, and fused CUDA kernels (flash, memory-efficient) draw it from the Philox stream in
  their own pattern, different from the math kernel's. So during a taped pass the model's
  attention implementation is switched to ``taped_attention`` (registered as
  ``TAPED_ATTENTION``): with live attention dropout (training, ``p > 0``) it computes attention
  eagerly, ``softmax(q k^T * scale + mask) * keep / (1 - p) @ v``, drawing the keep-mask on the
  tape like any other; without dropout it calls transformers' own SDPA path, whose kernel the
  caller's ``sdpa_kernel`` context chooses (the hypergradient runs all passes of a step under
  the math kernel, ``hypergrad.math_attention``). Outside taped passes (evaluation, generation)
  the model's configured implementation is untouched.

So every pass of one step runs the same attention code on the same masks, for every HVP method
and on CPU and CUDA alike; the eager path supports double backward and forward-mode AD.

In the first pass of a seeded objective each mask is drawn as torch's CPU dropout draws it
(``empty_like(x).bernoulli_(1 - p)``), stored as a boolean keep-mask (a quarter of the float
mask's memory; also valid when a later pass runs in another precision), together with the RNG
state right after the draw; later passes multiply by ``keep / (1 - p)`` and restore that RNG state,
so any randomness the tape does not cover (a functional ``F.dropout`` in custom code, SDPA called
directly by a non-transformers model) draws from exactly the same stream position as in the
first pass. It also saves work: on MiniLM-L6 (batch 16, length 64, CPU) the 14 ``nn.Dropout``
calls of one forward cost about 11% of a forward+backward pass, all of it in ``bernoulli_``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pf2lora_core.training.hypergrad import LossFn

#: name of ``taped_attention`` in transformers' attention registry (masks are built as for SDPA)
TAPED_ATTENTION = "pf2lora_taped"
_TAPE_ATTR = "_pf2lora_dropout_tape"  # set on every module of a taped model: how attention finds its tape


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

    masks: list[Tensor] = field(default_factory=list)  # boolean keep-masks
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
            setattr(module, _TAPE_ATTR, self)
            if type(module) is nn.Dropout:  # not subclasses: their forward differs
                module.forward = _TapedForward(self, module)  # type: ignore[method-assign]
                self.modules += 1
        # configs whose attention implementation a taped pass switches to ``taped_attention``
        self.attention_configs = _attention_configs(model)

    @contextmanager
    def recording(self, rec: Recording) -> Iterator[None]:
        """One forward pass (and its backward) drawing from or replaying ``rec``."""
        if self.active is not None:
            raise RuntimeError("nested seeded passes on one model: a pass is already recording dropout masks")
        self.active, rec.cursor = rec, 0
        saved = [cfg._attn_implementation_internal for cfg in self.attention_configs]
        for cfg in self.attention_configs:  # per config object, not the setter (it recurses)
            cfg._attn_implementation_internal = TAPED_ATTENTION
        ok = False
        try:
            yield
            ok = True
        finally:
            self.active = None
            for cfg, impl in zip(self.attention_configs, saved, strict=True):
                cfg._attn_implementation_internal = impl
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
        if self.active is None or not module.training or module.p == 0.0 or x.device.type not in _RNG:
            return nn.Dropout.forward(module, x)
        return self.drop(x, module.p)

    def covers(self, x: Tensor) -> bool:
        """Whether a dropout on ``x`` now is taped (a pass is recording on a device with a saved RNG)."""
        return self.active is not None and x.device.type in _RNG

    def drop(self, x: Tensor, p: float) -> Tensor:
        """``x`` with this call's dropout mask (drawn in the first pass, replayed after); needs ``covers(x)``."""
        rec = self.active
        assert rec is not None
        if p == 1.0:
            return x * 0.0
        get_state, set_state = _RNG[x.device.type]
        if not rec.complete:  # first pass: draw as torch's CPU dropout does, and remember
            mask = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
            rec.masks.append(mask.bool())
            rec.rng_after.append(get_state(x.device))
            return x * mask.div_(1.0 - p)
        i = rec.cursor
        if i >= len(rec.masks) or rec.masks[i].shape != x.shape:
            raise RuntimeError(
                f"dropout call {i} of a replayed pass does not match the first pass (shape {tuple(x.shape)}): "
                "passes of one step must run the same forward on the same batch"
            )
        rec.cursor += 1
        set_state(rec.rng_after[i], x.device)
        return x * rec.masks[i].to(x.dtype).div_(1.0 - p)


def taped_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: Tensor | None = None,
    **kwargs: object,
) -> tuple[Tensor, Tensor | None]:
    """Attention of a taped pass (transformers' attention-function signature; see the module docstring).

    ``query`` is ``(batch, heads, q, d)``, ``key``/``value`` ``(batch, kv_heads, k, d)``;
    ``attention_mask`` is what ``sdpa_mask`` builds (None, boolean keep, or additive float).
    With ``dropout > 0`` on a taped pass: eager attention, the probabilities' dropout drawn on the
    tape; the probabilities (after dropout) are returned as the attention weights, as eager does.
    Otherwise transformers' SDPA path (under the caller's ``sdpa_kernel`` choice).
    """
    tape: DropoutTape | None = getattr(module, _TAPE_ATTR, None)
    if dropout == 0.0 or tape is None or not tape.covers(query):
        if position_bias is not None:
            kwargs["position_bias"] = position_bias
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = int(getattr(module, "num_key_value_groups", 1))
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, kv_len = query.shape[2], key.shape[2]
    # as in sdpa_attention_forward: causal only where no explicit mask was built
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    causal = causal and attention_mask is None and q_len > 1
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if position_bias is not None:  # additive bias (T5-style), masked below like the scores
        scores = scores + position_bias
    lowest = torch.finfo(scores.dtype).min
    if causal:  # bottom-right aligned: query i sees keys up to i + kv_len - q_len
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
        scores = scores.masked_fill(~keep, lowest)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, lowest)
        else:
            scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = tape.drop(probs, dropout)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register(TAPED_ATTENTION, taped_attention)
AttentionMaskInterface.register(TAPED_ATTENTION, sdpa_mask)


def _attention_configs(model: nn.Module) -> list:
    """Configs (sub-configs included) of the transformers models in ``model`` with pluggable attention."""
    found: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and getattr(module, "_supports_attention_backend", False):
            stack = [module.config]
            while stack:
                cfg = stack.pop()
                if id(cfg) in found:
                    continue
                found[id(cfg)] = cfg
                subs = (getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", {}))
                stack += [sub for sub in subs if sub is not None]
    return list(found.values())


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
