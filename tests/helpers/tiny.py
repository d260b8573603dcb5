"""Tiny models for tests (a two-layer MLP with a head; built in any dtype)."""

from __future__ import annotations

import torch
from torch import nn

from pf2lora_core.config.keys import COMMON
from pf2lora_core.training.adapters import AdapterSpec, TwoLevelModel


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, d_hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def two_level_mlp(
    seed: int = 0, dtype: torch.dtype = torch.float64, head_level: str = COMMON, private: bool = True
) -> TwoLevelModel:
    torch.manual_seed(seed)
    model = TwoLevelModel(
        MLP().to(dtype),
        target_modules=["fc1", "fc2"],
        common=AdapterSpec(rank=4, alpha=8),
        private=AdapterSpec(rank=2, alpha=4) if private else None,
        head_modules=["head"],
        head_level=head_level,
    )
    model.model.to(dtype)
    return model


def randomize_adapters(model: TwoLevelModel, seed: int = 1, scale: float = 0.3) -> None:
    """Give B and D non-zero values so second-order terms are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for level in model.levels:
            for p in model.parameters(level).values():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def regression_problem(head_level: str = COMMON):
    """A float64 two-level MLP with non-zero adapters and an MSE loss over a fixed batch."""
    from torch.func import functional_call

    model = two_level_mlp(head_level=head_level)
    randomize_adapters(model)
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    target = torch.randn(16, 3, generator=gen, dtype=torch.float64)

    def loss(params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        out = model.model(inputs) if params is None else functional_call(model.model, params, (inputs,), strict=False)
        return ((out - target) ** 2).mean()

    return model, loss
