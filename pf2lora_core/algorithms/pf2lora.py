"""PF2LoRA: two-level LoRA trained by bilevel optimisation (Hao et al., arXiv 2503.03920).

Every client k holds the common adapter x = (A, B) of rank r, averaged by the server, and a
private adapter y_k = (C_k, D_k) of rank r~ that never leaves it. Each local step is the
one-step-unrolled bilevel update of ``pf2lora_core.solver`` (DESIGN.md): a step of size alpha
on y (plain SGD with ``inner_step=sgd``, as in the paper and DESIGN.md; RMS-scaled per tensor
by default, see the solver's docstring), the exact hypergradient of that unroll for x, AdamW on
x with lr beta. The server averages x
weighted by examples (FedAvg). A client's update ``s B A + s~ D_k C_k`` can have any rank in
``[r - r~, r + r~]``, learned from its data.
"""

from __future__ import annotations

from dataclasses import dataclass

from pf2lora_core.adapters import AdapterSpec
from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams, _positive
from pf2lora_core.constants import COMMON, GRADIENT_PASSES, PRIVATE, TRAIN_LOSS
from pf2lora_core.hypergrad import EXACT_AD, HVP_METHODS, make_hvp
from pf2lora_core.solver import INNER_STEPS, MODES, SGD, BilevelSolver


@dataclass
class PF2LoRAParams(LoRAParams):
    private_rank: int  # r~
    private_alpha: float  # scaling s~ = private_alpha / private_rank
    inner_lr: float  # alpha, the private level's step (per entry for rms, relative for trust)
    hvp: str  # exact | finite_difference | first_order
    fd_eps: float  # finite difference: delta = fd_eps / ||v||
    fd_scheme: str  # forward | central
    exact_ad: str  # reverse (reverse-over-reverse) | forward (forward-over-reverse)
    mode: str  # bilevel | joint
    reuse_inner_grad: bool
    inner_step: str = SGD  # the private level's preconditioner (solver.INNER_STEPS)

    def validate(self) -> None:
        super().validate()
        _positive(self, "private_rank", "private_alpha", "inner_lr", "fd_eps")
        if self.private_rank >= self.rank:
            raise ValueError(f"algorithm.private_rank (r~={self.private_rank}) must be < rank (r={self.rank})")
        choices = {
            "hvp": HVP_METHODS,
            "exact_ad": EXACT_AD,
            "mode": MODES,
            "fd_scheme": ("forward", "central"),
            "inner_step": INNER_STEPS,
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"algorithm.{key}={getattr(self, key)!r}: choose one of {sorted(valid)}")


class PF2LoRA(Algorithm):
    name = "pf2lora"
    Params = PF2LoRAParams
    params: PF2LoRAParams

    def adapters(self) -> tuple[AdapterSpec, AdapterSpec]:
        p = self.params
        return AdapterSpec(p.rank, p.lora_alpha), AdapterSpec(p.private_rank, p.private_alpha)

    def solver(self, ctx: LocalContext) -> BilevelSolver:
        p = self.params
        x = ctx.model.parameters(COMMON)
        return BilevelSolver(
            x=x,
            y=ctx.model.parameters(PRIVATE),
            hvp=make_hvp(p.hvp, eps=p.fd_eps, scheme=p.fd_scheme, exact_ad=p.exact_ad),
            inner_lr=p.inner_lr,
            outer_optimizer=self.adamw(x),
            mode=p.mode,
            reuse_inner_grad=p.reuse_inner_grad,
            inner_step=p.inner_step,
        )

    def train(self, ctx: LocalContext) -> dict[str, float]:
        solver = self.solver(ctx)
        losses, passes = [], 0
        for step in range(ctx.steps):
            stats = solver.step(ctx.loss_for(next(ctx.batches), step))
            losses.append(stats.loss)
            passes += stats.passes
        return {TRAIN_LOSS: sum(losses) / len(losses), GRADIENT_PASSES: float(passes)}
