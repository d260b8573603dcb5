"""Synthetic rank recovery: the paper's synthetic experiment in spirit (``pf2lora-synthetic``).

Multivariate linear regression ``y = (W0 + dW_k) x + noise`` on K clients. The clients' updates
share a rank-``r`` part ``P = sum_{i<=r} sigma_i u_i v_i^T``; client k with true rank ``t_k < r``
drops the last ``r - t_k`` components of ``P``, one with ``t_k > r`` adds ``t_k - r`` components of
its own. So every ``dW_k`` is a rank-``r`` common matrix plus a rank-``<= r~`` private correction,
and ``t_k`` lies in ``[r - r~, r + r~]``.

The same algorithm objects as the Flower app (``pf2lora_core.algorithms``) train a peft-adapted
``nn.Linear`` holding ``W0``, in plain torch: PF2LoRA (common r, private r~) and HOMLoRA (rank r).
The learned rank of a client is the threshold rank of its full update; a run directory (DESIGN
contract) gets ``config.yaml``, ``summary.json`` (``algorithms.<name>.clients[i] = {client,
true_rank, learned_rank, loss}``) and ``plots/`` with each client's singular-value spectrum.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pf2lora_core.adapters import TwoLevelModel
from pf2lora_core.algorithms import REGISTRY, Algorithm, LocalContext
from pf2lora_core.algorithms.base import LoRAParams
from pf2lora_core.algorithms.pf2lora import PF2LoRAParams
from pf2lora_core.constants import COMMON, PRIVATE
from pf2lora_core.outputs import RunDir, new_run_dir
from pf2lora_core.plots import rank_spectra
from pf2lora_core.rank import singular_values, threshold_rank


@dataclass
class SyntheticConfig:
    """Defaults chosen so both algorithms converge in well under a minute on 2 CPU cores."""

    true_ranks: list[int] = field(default_factory=lambda: [2, 3, 5, 6])  # one per client, in [r-r~, r+r~]
    rank: int = 4  # r
    private_rank: int = 2  # r~
    dim: int = 24  # W0 is dim x dim
    samples: int = 256  # per client
    noise: float = 0.01
    sigma_min: float = 1.0  # singular values of the planted components, uniform in [min, max]:
    sigma_max: float = 2.0  # a 2x spread keeps every planted direction far above the threshold
    scaling: float = 1.0
    private_scaling: float = 1.0
    whiten: bool = True
    rounds: int = 60
    local_steps: int = 10
    batch_size: int = 0
    lr: float = 0.01  # beta (AdamW, common)
    lr_final: float = 0.01
    inner_lr: float = 0.5  # alpha (SGD, private)
    hvp: str = "exact"
    threshold: float = 0.1  # relative singular-value threshold of the learned rank
    seed: int = 0
    output_dir: str = "outputs"
    algorithms: list[str] = field(default_factory=lambda: ["pf2lora", "homlora"])


@dataclass
class ClientData:
    x: Tensor  # (n, dim)
    y: Tensor  # (n, dim)
    true_rank: int
    delta: Tensor  # ground-truth dW_k


def make_clients(cfg: SyntheticConfig) -> tuple[Tensor, list[ClientData]]:
    """Base weight W0 and the clients' data (see module docstring)."""
    if any(not cfg.rank - cfg.private_rank <= t <= cfg.rank + cfg.private_rank for t in cfg.true_ranks):
        raise ValueError(f"true ranks {cfg.true_ranks} must lie in [r - r~, r + r~] = "
                         f"[{cfg.rank - cfg.private_rank}, {cfg.rank + cfg.private_rank}]")  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)
    w0 = torch.randn(cfg.dim, cfg.dim, generator=gen) / cfg.dim**0.5
    extra = max(max(cfg.true_ranks) - cfg.rank, 0) * len(cfg.true_ranks)
    u, _ = torch.linalg.qr(torch.randn(cfg.dim, cfg.rank + extra, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cfg.dim, cfg.rank + extra, generator=gen))

    def sigma(n: int) -> Tensor:
        return cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * torch.rand(n, generator=gen)

    shared = sigma(cfg.rank)
    clients, next_col, next_drop = [], cfg.rank, 0
    for t in cfg.true_ranks:
        keep = torch.ones(cfg.rank, dtype=torch.bool)
        for _ in range(cfg.rank - t):
            keep[next_drop % cfg.rank] = False
            next_drop += 1
        delta = (u[:, : cfg.rank][:, keep] * shared[keep]) @ v[:, : cfg.rank][:, keep].T
        if t > cfg.rank:  # client-specific directions, orthogonal to everything else
            cols = slice(next_col, next_col + t - cfg.rank)
            delta = delta + (u[:, cols] * sigma(t - cfg.rank)) @ v[:, cols].T
            next_col += t - cfg.rank
        x = torch.randn(cfg.samples, cfg.dim, generator=gen)
        if cfg.whiten:
            x = torch.linalg.qr(x)[0] * cfg.samples**0.5
        y = x @ (w0 + delta).T + cfg.noise * torch.randn(cfg.samples, cfg.dim, generator=gen)
        clients.append(ClientData(x=x, y=y, true_rank=t, delta=delta))
    return w0, clients


class _Linear(nn.Module):
    def __init__(self, w0: Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w0)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def _algorithm(name: str, cfg: SyntheticConfig, lr: float) -> Algorithm:
    common = {"name": name, "rank": cfg.rank, "lora_alpha": cfg.scaling * cfg.rank, "lr": lr, "weight_decay": 0.0}
    cls = REGISTRY[name]
    if cls.Params is PF2LoRAParams:
        params: LoRAParams = PF2LoRAParams(
            **common, private_rank=cfg.private_rank, private_alpha=cfg.private_scaling * cfg.private_rank, inner_lr=cfg.inner_lr,
            hvp=cfg.hvp, fd_eps=1e-3, fd_scheme="forward", exact_ad="reverse", mode="bilevel",
            reuse_inner_grad=False,
        )  # fmt: skip
    else:
        params = cls.Params(**common)
    return cls(params)


def _batches(data: ClientData, batch_size: int, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        order = torch.randperm(len(data.x), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield data.x[idx], data.y[idx]


def train_federated(name: str, cfg: SyntheticConfig, w0: Tensor, clients: list[ClientData]) -> list[dict]:
    """Rounds of local training + example-weighted averaging of the common level, in process."""
    algorithm = _algorithm(name, cfg, cfg.lr)
    torch.manual_seed(cfg.seed)
    common_spec, private_spec = algorithm.adapters()
    model = TwoLevelModel(_Linear(w0), ["lin"], common_spec, private_spec)
    module = model.model

    def objective(batch: tuple[Tensor, Tensor], params: dict[str, Tensor] | None) -> Tensor:
        x, y = batch
        out = module(x) if params is None else functional_call(module, params, (x,), strict=False)
        return ((out - y) ** 2).sum(-1).mean()

    common = model.export(COMMON)
    privates = [model.export(PRIVATE) if private_spec else {} for _ in clients]
    gens = [torch.Generator().manual_seed(cfg.seed * 1000 + k) for k in range(len(clients))]
    streams = [_batches(c, cfg.batch_size or cfg.samples, g) for c, g in zip(clients, gens, strict=True)]
    for rnd in range(cfg.rounds):
        algorithm = _algorithm(name, cfg, cfg.lr * (cfg.lr_final / cfg.lr) ** (rnd / max(cfg.rounds - 1, 1)))
        states, weights = [], []
        for k, _client in enumerate(clients):
            model.load(COMMON, common)
            if private_spec:
                model.load(PRIVATE, privates[k])
            ctx = LocalContext(model, objective, streams[k], cfg.local_steps, cfg.seed + 7919 * rnd + k, torch.device("cpu"))
            algorithm.train(ctx)
            states.append(model.export(COMMON))
            weights.append(float(cfg.samples))
            if private_spec:
                privates[k] = model.export(PRIVATE)
        common = algorithm.aggregate(states, weights)
    return _evaluate(model, common, privates, clients, objective, cfg, bool(private_spec))


def _evaluate(model, common, privates, clients, objective, cfg, has_private) -> list[dict]:  # noqa: ANN001
    results = []
    for k, client in enumerate(clients):
        model.load(COMMON, common)
        if has_private:
            model.load(PRIVATE, privates[k])
        (update,) = model.full_updates().values()
        sigma = singular_values(update)
        with torch.no_grad():
            loss = float(objective((client.x, client.y), None))
        results.append(
            {
                "client": k,
                "true_rank": client.true_rank,
                "learned_rank": threshold_rank(sigma, cfg.threshold),
                "loss": loss,
                "update_error": float(torch.linalg.norm(update - client.delta) / torch.linalg.norm(client.delta)),
                "singular_values": [float(s) for s in sigma[: cfg.rank + cfg.private_rank + 2]],
            }
        )
    return results


def run(cfg: SyntheticConfig) -> tuple[Path, dict]:
    """Train every algorithm, write the run directory, return (path, summary)."""
    t0 = time.time()
    run_dir = RunDir(new_run_dir(cfg.output_dir, "synthetic"))
    run_dir.write_config(json.dumps(asdict(cfg), indent=2))  # JSON is valid YAML
    w0, clients = make_clients(cfg)
    summary: dict = {"task": "synthetic_rank_recovery", "seed": cfg.seed, "num_clients": len(clients),
                     "rounds": cfg.rounds, "rank": cfg.rank, "private_rank": cfg.private_rank,
                     "threshold": cfg.threshold, "algorithms": {}}  # fmt: skip
    for name in cfg.algorithms:
        t = time.time()
        results = train_federated(name, cfg, w0, clients)
        summary["algorithms"][name] = {"clients": results, "seconds": time.time() - t}
        rank_spectra(
            {f"client {r['client']} (true {r['true_rank']})": r["singular_values"] for r in results},
            run_dir.plots / f"spectra_{name}.png",
            f"{name}: singular values of each client's update",
            true_ranks={f"client {r['client']} (true {r['true_rank']})": r["true_rank"] for r in results},
        )
    summary["cost"] = {"seconds_total": time.time() - t0}
    run_dir.write_summary(summary)
    return run_dir.path, summary


def format_table(summary: dict) -> str:
    names = list(summary["algorithms"])
    head = f"{'client':>6} {'true':>5} " + " ".join(f"{n + ' rank':>13} {n + ' loss':>13}" for n in names)
    lines = [head, "-" * len(head)]
    per_alg = [summary["algorithms"][n]["clients"] for n in names]
    for rows in zip(*per_alg, strict=True):
        cells = " ".join(f"{r['learned_rank']:>13} {r['loss']:>13.4f}" for r in rows)
        lines.append(f"{rows[0]['client']:>6} {rows[0]['true_rank']:>5} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pf2lora-synthetic", description=__doc__.splitlines()[0])
    defaults = SyntheticConfig()
    for f in ("rounds", "local_steps", "seed", "rank", "private_rank", "dim", "samples"):
        parser.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(defaults, f))
    for f in ("lr", "inner_lr", "threshold", "noise"):
        parser.add_argument(f"--{f.replace('_', '-')}", type=float, default=getattr(defaults, f))
    parser.add_argument("--true-ranks", type=lambda s: [int(x) for x in s.split(",")], default=defaults.true_ranks)
    parser.add_argument("--hvp", default=defaults.hvp, choices=["exact", "finite_difference", "first_order"])
    parser.add_argument("--output-dir", default=defaults.output_dir)
    args = parser.parse_args(argv)
    cfg = SyntheticConfig(**{k: v for k, v in vars(args).items()})
    path, summary = run(cfg)
    print(format_table(summary))
    print(f"{summary['cost']['seconds_total']:.1f} s; results in {path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
