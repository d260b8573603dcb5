"""PF2LoRA: two-level LoRA trained by bilevel optimisation (Hao et al., arXiv 2503.03920).

Every client k holds the common adapter x = (A, B) of rank r, averaged by the server, and a
private adapter y_k = (C_k, D_k) of rank r~ that never leaves it. Each local step is the
one-step-unrolled bilevel update of ``pf2lora_core.training.solver`` (docs/DESIGN.md, "The update rule"):
a step of size alpha on y (plain SGD with ``inner_step=sgd``, as in the paper; RMS-scaled per
tensor by default, see the solver's docstring), the exact hypergradient of that unroll for x,
AdamW on x with lr beta. The server averages x weighted by examples (FedAvg). A client's update
``s B A + s~ D_k C_k`` can have any rank in ``[r - r~, r + r~]``, learned from its data.

Ours, beyond the paper (``refit_steps``; 0 turns it off): a client re-fits y to each x it
receives, ``refit_steps`` lower-level steps at that fixed x (``solver.refit_lower_level``), once:
the evaluation of round r re-fits y to the x round r produced, and round r + 1's bilevel steps
start from that re-fit (``ClientRuntime.refit`` makes it from one seeded stream per x, so it is
the same re-fit wherever it is made: a node that restarted, or a round not evaluated, makes it
again before training; a client's first round starts from the initialization unless
``refit_initial``). The evaluated y is the client's model (``refit_private``; what
``pf2lora-export`` writes). ``train`` called on its own (benchmarks) re-fits on the round's own K
minibatches unless ``LocalContext.private_fitted`` says the runtime did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pf2lora_core.algorithms.base import Algorithm, LocalContext, LoRAParams, _positive
from pf2lora_core.config.keys import COMMON, GRADIENT_PASSES, PRIVATE, TRAIN_LOSS
from pf2lora_core.training.adapters import AdapterSpec
from pf2lora_core.training.hypergrad import EXACT_AD, HVP_METHODS, make_hvp
from pf2lora_core.training.solver import INNER_STEPS, MODES, SGD, BilevelSolver, refit_lower_level

# dropout streams of the re-fit steps: apart from the bilevel steps' (0..K-1) of the same seed
REFIT_SEED_OFFSET = 1 << 16


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
    # m: the hypergradient's HVP term at every m-th local step, dropped (first order) between
    # (solver module docstring, "hvp_every"); 1 = every step, the exact rule
    hvp_every: int = 1
    # J: lower-level steps re-fitting the private level to each common level the client receives,
    # before a round's bilevel steps and before evaluating (0: never, the paper's algorithm)
    refit_steps: int = 0
    # re-fit the private initialization before a client's first bilevel steps too (pf2lora_exact,
    # PF2LoRA before issue 29); false: the first round starts from the initialization, as the paper's
    # rule does every round, so round 1 costs what a later round does (each later one starts from
    # its evaluation's re-fit)
    refit_initial: bool = False

    def validate(self) -> None:
        super().validate()
        _positive(self, "private_rank", "private_alpha", "inner_lr", "fd_eps", "hvp_every")
        if self.refit_steps < 0:
            raise ValueError(f"algorithm.refit_steps must be >= 0 (0 = no re-fit), got {self.refit_steps}")
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
            hvp_every=p.hvp_every,
        )

    @property
    def refits_private(self) -> bool:  # type: ignore[override]
        return self.params.refit_steps > 0

    @property
    def refits_initial(self) -> bool:  # type: ignore[override]
        return self.refits_private and self.params.refit_initial

    def refit_private(self, ctx: LocalContext, batches: list | None = None) -> int:
        """``refit_steps`` lower-level steps at the loaded common level, x fixed (``solver.refit_lower_level``).

        ``batches``: the minibatches to use (cycled); default: the next ones of ``ctx.batches``.
        """
        p = self.params
        source = iter(batches * p.refit_steps) if batches else ctx.batches
        losses = (ctx.loss_for(next(source), REFIT_SEED_OFFSET + j) for j in range(p.refit_steps))
        return refit_lower_level(ctx.model.parameters(PRIVATE), losses, p.inner_lr, p.inner_step)

    def train(self, ctx: LocalContext) -> dict[str, float]:
        solver = self.solver(ctx)
        losses, passes = [], 0
        batches = [next(ctx.batches) for _ in range(ctx.steps)]  # the round's K minibatches
        # y fitted to the x just received; not twice to one x: the runtime re-fits (or loads the
        # evaluation's re-fit) and says so; a direct call (benchmarks) re-fits on the round's minibatches
        if self.params.refit_steps > 0 and not ctx.private_fitted:
            passes += self.refit_private(ctx, batches)
        for step in range(ctx.steps):
            stats = solver.step(ctx.loss_for(batches[step], step))
            losses.append(stats.loss_tensor)  # read once, after the round (no GPU sync a step)
            passes += stats.passes
            ctx.step_done()
        values = torch.stack(losses).tolist()  # one transfer for the round
        return {TRAIN_LOSS: sum(values) / len(values), GRADIENT_PASSES: float(passes)}
