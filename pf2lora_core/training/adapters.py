"""Two-level LoRA on any torch/transformers model through peft.

The adapted layer computes ``W0 x + s B A x + s~ D C x``: peft keeps several LoRA adapters
per layer in dicts keyed by adapter name and sums the active ones, so the common adapter
``(A, B)`` and the private adapter ``(C, D)`` are two named peft adapters (``COMMON`` and
``PRIVATE``), both active. peft initialises ``B`` and ``D`` to zero, so at initialisation the
adapted model computes exactly the base model.

A *level* is the set of trainable tensors that travel (or stay) together: the common level is
the common adapter plus, by default, the newly initialised head; the private level is the
private adapter (plus the head when ``head_level == PRIVATE``). Levels are keyed by full
parameter names, which include the adapter name, so two levels never share a key.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn

from pf2lora_core.config.keys import COMMON, LEVELS, PRIVATE
from pf2lora_core.training.dropout_tape import DropoutTape
from pf2lora_core.training.rank import LowRank

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class AdapterSpec:
    """One LoRA adapter: rank and alpha (peft's scaling is ``alpha / rank``)."""

    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class TwoLevelModel:
    """A peft model carrying a common and (optionally) a private LoRA adapter.

    Parameters
    ----------
    base:
        Any ``nn.Module`` (a transformers model or a tiny MLP).
    target_modules:
        Module-name suffixes to adapt (peft semantics), e.g. ``["query", "value"]``.
    common, private:
        Adapter specs; ``private=None`` gives a one-level model (HOMLoRA and friends).
    head_modules:
        Names of modules trained in full (the classification head). Usually the modules whose
        weights the checkpoint did not contain.
    head_level:
        Level the head belongs to: ``COMMON`` (sent to the server) or ``PRIVATE``.
    assign:
        Optional ``(name, default_level) -> level or None``: an algorithm's own split of the
        tensors into levels (FedSA-LoRA keeps ``lora_B`` private; FFA-LoRA freezes ``lora_A``
        with ``None``). By default a tensor's level is its adapter's name (or the head's level).
    """

    def __init__(
        self,
        base: nn.Module,
        target_modules: Sequence[str],
        common: AdapterSpec,
        private: AdapterSpec | None = None,
        head_modules: Sequence[str] = (),
        head_level: str = COMMON,
        assign: Callable[[str, str | None], str | None] | None = None,
    ) -> None:
        if head_level not in LEVELS:
            raise ValueError(f"head_level must be one of {LEVELS}, got {head_level!r}")
        self.specs: dict[str, AdapterSpec] = {COMMON: common}
        if private is not None:
            self.specs[PRIVATE] = private
        self.head_level = head_level
        self.head_modules = tuple(head_modules)
        self.target_modules = tuple(target_modules)
        self.model: PeftModel = get_peft_model(base, _lora_config(common, target_modules), adapter_name=COMMON)
        if private is not None:
            self.model.add_adapter(PRIVATE, _lora_config(private, target_modules))
        self.model.base_model.set_adapter(list(self.specs))
        if len(self.specs) > 1:
            for module in self.lora_modules().values():
                _fuse_active_adapters(module)
        # dropout masks drawn once per local step and replayed in its later passes (dropout_tape.py)
        self.dropout_tape = DropoutTape(self.model)
        head_names = _head_parameter_names(self.model, head_modules)
        # every parameter's level, fixed once: the names never change
        self._level: dict[str, str | None] = {}
        for name, _ in self.model.named_parameters():
            default = head_level if name in head_names else _adapter_level(name, self.specs)
            self._level[name] = assign(name, default) if assign else default
        self._refresh_trainable()

    # ------------------------------------------------------------------ parameters by level
    @property
    def levels(self) -> tuple[str, ...]:
        """Levels that hold at least one tensor, common first."""
        present = set(self._level.values())
        return tuple(level for level in LEVELS if level in present)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The peft adapters attached (named after the level they default to)."""
        return tuple(self.specs)

    def level_of(self, name: str) -> str | None:
        """The level a parameter name belongs to, or None for frozen weights."""
        return self._level.get(name)

    def parameters(self, level: str) -> dict[str, nn.Parameter]:
        """Trainable tensors of one level, by full parameter name (ordered)."""
        return {n: p for n, p in self.model.named_parameters() if self._level.get(n) == level}

    def _refresh_trainable(self) -> None:
        """requires_grad exactly on the tensors that belong to a level (peft's set_adapter resets it)."""
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._level.get(name) is not None)

    def export(self, level: str) -> StateDict:
        """Detached float32 CPU copies of one level: what may leave the client."""
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.parameters(level).items()}

    def load(self, level: str, state: Mapping[str, Tensor]) -> None:
        """Copy ``state`` into one level; keys and shapes must match exactly."""
        params = self.parameters(level)
        check_state(state, {n: tuple(p.shape) for n, p in params.items()}, what=f"{level} level")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.device, param.dtype))

    def shapes(self, level: str) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.parameters(level).items()}

    def num_parameters(self, level: str) -> int:
        return sum(p.numel() for p in self.parameters(level).values())

    # ------------------------------------------------------------------ forward modes
    @contextmanager
    def only(self, *levels: str) -> Iterator[None]:
        """Run with only the given adapters active (e.g. ``only(COMMON)`` for the global model)."""
        active = [lvl for lvl in self.specs if lvl in levels]
        self.model.base_model.set_adapter(active)
        try:
            yield
        finally:
            self.model.base_model.set_adapter(list(self.specs))
            self._refresh_trainable()

    @contextmanager
    def row_weights(self, weights: Mapping[str, Tensor]) -> Iterator[None]:
        """Run with each adapter's output scaled per input row (FedDPA's instance-wise mixing).

        ``weights[adapter]`` is a 1-D tensor with one factor per row of the batch (the first
        dimension of every adapted layer's input); row ``i`` then computes
        ``W0 x + sum_a weights[a][i] * s_a B_a A_a x``. Adapters not named keep factor 1. Needs
        the fused two-adapter forward (both adapters active, no adapter dropout).
        """
        unknown = sorted(set(weights) - set(self.specs))
        if unknown:
            raise ValueError(f"row_weights: unknown adapter(s) {unknown}; this model has {list(self.specs)}")
        modules = list(self.lora_modules().values())
        for module in modules:
            module._row_weights = dict(weights)
        try:
            yield
        finally:
            for module in modules:
                module._row_weights = None

    def to(self, device: torch.device | str) -> TwoLevelModel:
        self.model.to(device)
        return self

    # ------------------------------------------------------------------ rank analysis input
    def lora_modules(self) -> dict[str, nn.Module]:
        """Adapted (peft LoRA) modules by name."""
        return {n: m for n, m in self.model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}

    def full_updates(self, levels: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per adapted module, the dense update ``sum over levels of scaling * B @ A`` (peft's
        ``get_delta_weight``: laid out like the module's weight, transposed for GPT-2's Conv1D)."""
        use = list(self.specs) if levels is None else [lvl for lvl in levels if lvl in self.specs]
        updates: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, module in self.lora_modules().items():
                terms = [module.get_delta_weight(level).float() for level in use]
                if terms:
                    updates[name] = torch.stack(terms).sum(0).cpu()
        return updates

    def update_factors(self, levels: Sequence[str] | None = None) -> dict[str, LowRank]:
        """Per adapted module, ``full_updates`` as its factors, never formed: ``left = [s B_l ...]``
        (out x sum of ranks), ``right = [A_l; ...]`` (sum of ranks x in), ``left @ right`` the update.

        The rank analysis reads these: the singular values of a rank-k product cost a QR of each
        factor and an SVD of k x k (``rank.singular_values``), where the dense update's SVD is cubic
        in the layer width (22 ms per MiniLM module, 0.27 s per evaluated client, before this).
        The layout transpose peft applies to GPT-2's Conv1D changes no singular value.
        """
        use = list(self.specs) if levels is None else [lvl for lvl in levels if lvl in self.specs]
        factors: dict[str, LowRank] = {}
        with torch.no_grad():
            for name, module in self.lora_modules().items():
                present = [lvl for lvl in use if lvl in module.lora_A]
                if not present:
                    continue
                left = [float(module.scaling[lvl]) * module.lora_B[lvl].weight.double().cpu() for lvl in present]
                right = [module.lora_A[lvl].weight.double().cpu() for lvl in present]
                factors[name] = LowRank(torch.cat(left, dim=1), torch.cat(right, dim=0))
        return factors


SCRATCH_ADAPTER = "_pf2lora_scratch"  # a transient slot: peft computes the delta of factors held outside


def delta_weight(module: nn.Module, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``scaling * B @ A`` as peft's ``get_delta_weight`` lays it out for ``module``'s base weight.

    ``a`` is ``(rank, in)`` and ``b`` ``(out, rank)`` like ``lora_A`` / ``lora_B`` weights, of any
    rank (FLoRA's stacks). peft handles the layer's layout: GPT-2's ``Conv1D`` stores its weight
    transposed (``fan_in_fan_out``), and half-precision factors are multiplied in float32 on CPU.
    The factors sit in a scratch adapter slot of the layer only while peft computes the product.
    """
    device, dtype = module.lora_B[next(iter(module.lora_B))].weight.device, a.dtype
    slot_a = nn.Linear(a.shape[1], a.shape[0], bias=False, device="meta")
    slot_b = nn.Linear(b.shape[1], b.shape[0], bias=False, device="meta")
    slot_a.weight = nn.Parameter(a.to(device, dtype), requires_grad=False)
    slot_b.weight = nn.Parameter(b.to(device, dtype), requires_grad=False)
    module.lora_A[SCRATCH_ADAPTER], module.lora_B[SCRATCH_ADAPTER] = slot_a, slot_b
    module.scaling[SCRATCH_ADAPTER] = scaling
    try:
        return module.get_delta_weight(SCRATCH_ADAPTER)
    finally:
        del module.lora_A[SCRATCH_ADAPTER], module.lora_B[SCRATCH_ADAPTER], module.scaling[SCRATCH_ADAPTER]


def merge_into_base(module: nn.Module, a: Tensor, b: Tensor, scaling: float) -> None:
    """Add ``scaling * B @ A`` (through :func:`delta_weight`) to ``module``'s frozen base weight in place."""
    weight = module.get_base_layer().weight
    with torch.no_grad():
        weight.add_(delta_weight(module, a, b, scaling).to(weight.device, weight.dtype))


def _adapter_level(name: str, adapters: Mapping[str, AdapterSpec]) -> str | None:
    for adapter in adapters:
        if f".{adapter}." in name:
            return adapter
    return None


def _fuse_active_adapters(module: nn.Module) -> None:
    """Compute several active plain LoRA adapters of one peft ``Linear`` as one product.

    peft sums active adapters one by one: ``sum_a lora_B[a](lora_A[a](x)) * scaling[a]``, which
    reads the layer input once per adapter. The same sum is ``(x @ [A_1; A_2]^T) @ [s_1 B_1, s_2
    B_2]^T``: one rank-(r + r~) product over peft's own weights (so ``functional_call`` and
    every gradient still address ``lora_A.<level>.weight``). Measured on MiniLM-L6, 2 cores: a
    two-level forward+backward drops from +14% to about +4% over a one-adapter one. Anything the
    fused path does not cover (merged or disabled adapters, dropout, DoRA and other variants,
    mixed-batch ``adapter_names``, a single active adapter) falls through to peft's forward.
    """
    if hasattr(module, "base_layer"):
        # a bound method (not a closure): copy.deepcopy rebinds it to the copied module
        module.forward = types.MethodType(_fused_forward, module)
        module._row_weights = None  # set by TwoLevelModel.row_weights


def _fused_forward(self: nn.Module, x: Tensor, *args: object, **kwargs: object) -> Tensor:
    active = [a for a in self.active_adapters if a in self.lora_A]
    plain = (
        len(active) > 1
        and not self.merged
        and not self.disable_adapters
        and "adapter_names" not in kwargs
        and not any(a in self.lora_variant for a in active)
        and all(isinstance(self.lora_dropout[a], nn.Identity) for a in active)
    )
    rows: dict[str, Tensor] | None = self._row_weights
    if not plain:
        if rows is not None:
            raise RuntimeError("row_weights needs both adapters active, unmerged and without adapter dropout")
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    a_cat = torch.cat([self.lora_A[a].weight for a in active], dim=0)
    b_cat = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in active], dim=1)
    low = x.to(a_cat.dtype) @ a_cat.t()  # (rows, ..., r + r~)
    if rows is not None:
        low = low * _row_scale(rows, active, [self.lora_A[a].weight.shape[0] for a in active], low)
    return (result + low @ b_cat.t()).to(result.dtype)


def _row_scale(rows: Mapping[str, Tensor], active: Sequence[str], ranks: Sequence[int], low: Tensor) -> Tensor:
    """Per row, each adapter's factor repeated over its rank components, shaped to broadcast on ``low``."""
    n = low.shape[0]
    ones = torch.ones(n, dtype=low.dtype, device=low.device)
    cols = []
    for adapter, rank in zip(active, ranks, strict=True):
        w = rows.get(adapter, ones).to(low.device, low.dtype)
        if w.shape != (n,):
            raise ValueError(f"row_weights[{adapter!r}] has shape {tuple(w.shape)}; the batch has {n} rows")
        cols.append(w[:, None].expand(n, rank))
    scale = torch.cat(cols, dim=1)
    return scale.view(n, *([1] * (low.dim() - 2)), scale.shape[1])


def _lora_config(spec: AdapterSpec, target_modules: Sequence[str]) -> LoraConfig:
    if spec.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {spec.rank}")
    # lora_dropout=0: the hypergradient differentiates one fixed stochastic objective per
    # step; extra adapter-level dropout would only add variance to the finite differences.
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(target_modules), lora_dropout=0.0)


def _head_parameter_names(model: nn.Module, head_modules: Sequence[str]) -> set[str]:
    """Full parameter names under the head modules (matched as dotted-name suffixes)."""
    names: set[str] = set()
    found: set[str] = set()
    for mod_name, module in model.named_modules():
        for head in head_modules:
            if mod_name == head or mod_name.endswith("." + head):
                found.add(head)
                names.update(f"{mod_name}.{p}" if mod_name else p for p, _ in module.named_parameters())
    missing = set(head_modules) - found
    if missing:
        raise ValueError(f"head module(s) {sorted(missing)} not found in the model")
    return {n for n in names if ".lora_" not in n}


def check_state(state: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise ValueError naming what is wrong when ``state`` does not match ``shapes``."""
    missing = sorted(set(shapes) - set(state))
    extra = sorted(set(state) - set(shapes))
    if missing or extra:
        raise ValueError(f"{what}: missing keys {missing[:3]}, unexpected keys {extra[:3]}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{what}: {name} has shape {tuple(state[name].shape)}, expected {shape}")
