"""Synthetic rank recovery: the paper's synthetic experiment in spirit (``pf2lora-synthetic``).

Multivariate linear regression ``y = (W0 + dW_k) x + noise`` on K clients. The clients' updates
share a rank-``r`` part ``P = sum_{i<r} sigma_i u_i v_i^T``; client k with true rank ``t_k < r``
drops ``r - t_k`` components of ``P``, one with ``t_k > r`` adds ``t_k - r`` components of its own
(orthogonal to everything else). So every ``dW_k`` is the common rank-``r`` matrix ``P`` plus a
private correction of rank ``<= r~``, and ``t_k`` lies in ``[r - r~, r + r~]``.

The same algorithm objects as the Flower app (``pf2lora_core.algorithms``) train a peft-adapted
``nn.Linear`` holding ``W0``, in plain torch: PF2LoRA (common r, private r~) and HOMLoRA (rank r),
on the same budget (rounds, local steps, learning-rate schedule of the common level). The learned
rank of a client is the threshold rank of its full update ``s B A + s~ D_k C_k`` (singular values
above ``threshold * sigma_1``, the same default threshold as Flower runs: ``rank.DEFAULT_THRESHOLD``),
reported with its entropy rank and the private level's share of the update's energy. A run
directory (docs/DESIGN.md, "Run directory") gets ``config.yaml``, ``metrics.jsonl`` (per round and algorithm,
each client's loss), ``summary.json``
(``algorithms.<name>.clients[i] = {client, true_rank, learned_rank, loss, ...}``) and ``plots/``
with each client's singular-value spectrum.

Why the design converges fast (every default in ``SyntheticConfig`` says why it is what it is):

- *Isotropic design.* The inputs are whitened (``X^T X / n = I`` exactly) and the loss sums the
  squared error over output dims and averages over the (full) batch, so a client's loss is
  exactly ``||s B A + s~ D C - dW_k||_F^2`` plus the noise floor: the only curvature is the LoRA
  factors' own, the loss is the squared distance to the truth, and full batches make every step
  deterministic (Python overhead per step, not data, is what costs time).
- *Every shared direction has a majority.* Clients below ``r`` drop *different* components of
  ``P`` (round robin), so each component of ``P`` is present in most clients. The average the
  server computes then points at ``P`` from the first round, and no private adapter has to hold
  a shared direction that the common one should own. (If two clients drop the same components,
  the common adapter can settle for a lower-rank compromise that the privates patch: a local
  minimum where the client above ``r`` has no private rank left for its own directions.)
- *A spare private direction.* With ``r~ = 3`` and true ranks in ``[r - 2, r + 2]``, no client
  needs its whole private adapter. A client exactly at ``r +- r~`` has no slack: a single shared
  direction parked in its private adapter early on leaves no room for its own ones, a spurious
  minimum the run then leaves only slowly (with ``r~ = 2`` the rank-6 client still had a loss of
  0.07-0.09, 40x the noise floor, on two of five seeds after the same budget).
- *Narrow singular-value range.* Planted singular values in ``[sigma_min, sigma_max]`` with a
  small ratio keep the problem well conditioned (the slowest direction converges at rate
  ``~ sigma_min / sigma_max`` of the fastest) and far above the rank threshold.
- *Few local steps.* In the first rounds each client's AdamW pulls the common adapter towards
  its own update (client drift), and AdamW's step barely shrinks with the gradient, so the
  average is biased by ~``K beta`` per round: 3 local steps x 200 rounds reach the noise floor
  (loss ~0.002) where 20 x 30 (the same 600 steps) end 5-30x above it.
- *Step sizes.* The common level's AdamW moves every coordinate by about ``beta`` per step
  whatever the gradient's size, and its moments are reset every round, so with a constant
  ``beta`` it jitters around the solution by ``~ beta``: ``beta`` decays geometrically from
  ``lr`` to ``lr_final`` over the rounds (fast progress first, a small jitter at the end), for
  both algorithms alike. The private level takes plain SGD steps, stable for ``alpha < 2 / L``
  with ``L ~ 4 s~ sigma_max ~ 6`` near the solution (the Hessian of ``||s~ D C - R||^2`` in
  ``(C, D)`` scales with ``s~^2 (||C||^2 + ||D||^2)``, and balanced factors have
  ``s~ ||C||^2 = s~ ||D||^2 = sigma``). ``alpha`` is ~1/7 of that limit on purpose: the
  private level must not outrun the common one, or it grabs shared directions before the
  common adapter does (``alpha = 0.1`` left a client at loss 0.09-0.16 on two of five seeds); at ``alpha = 0.05`` it
  still contracts its error by ~20% a step, fast enough to track the common level.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pf2lora_core.algorithms import REGISTRY, Algorithm, LocalContext
from pf2lora_core.algorithms.base import LoRAParams
from pf2lora_core.algorithms.hetlora import HETLoRAParams
from pf2lora_core.algorithms.pf2lora import PF2LoRAParams
from pf2lora_core.config.keys import COMMON, PRIVATE
from pf2lora_core.run.plots import rank_spectra
from pf2lora_core.run.run_dir import RunDir, new_run_dir
from pf2lora_core.training.adapters import StateDict, TwoLevelModel
from pf2lora_core.training.rank import DEFAULT_THRESHOLD, entropy_rank, private_energy, singular_values, threshold_rank
from pf2lora_core.training.solver import INNER_STEPS

Batch = tuple[Tensor, Tensor]
Objective = Callable[[Batch, "dict[str, Tensor] | None"], Tensor]
RoundCallback = Callable[[int, list[float]], None]


@dataclass
class SyntheticConfig:
    """The experiment; defaults recover every rank in well under a minute on 2 CPU cores."""

    # one per client, in [r - r~, r + r~] = [1, 7]: two below r, two above, all different
    true_ranks: list[int] = field(default_factory=lambda: [2, 3, 5, 6])
    rank: int = 4  # r: the common adapter's rank (and HOMLoRA's)
    private_rank: int = 3  # r~: one private direction to spare at every client (see docstring)
    dim: int = 16  # W0 is dim x dim: room for the r + 3 orthogonal planted directions
    samples: int = 64  # per client, >= dim so that the whitened design determines W exactly
    noise: float = 0.01  # label noise: loss floor dim * noise^2 = 0.0016, residual ~100x below threshold
    sigma_min: float = 1.0  # planted singular values are uniform in [sigma_min, sigma_max]: a
    sigma_max: float = 1.5  # ratio 1.5 keeps convergence even and every direction >> threshold
    scaling: float = 1.0  # s = lora_alpha / r; under AdamW only the init's relative size matters
    private_scaling: float = 1.0  # s~: peft's init then gives s~ ||C_i||^2 ~ 1/3, near the target's ~1
    rounds: int = 200  # 600 local steps per client: loss at the noise floor for seeds 0..5
    local_steps: int = 3  # few local steps: client drift under AdamW is what slows federated LoRA
    lr: float = 0.03  # beta at round 0 (AdamW, common level; HOMLoRA too)
    lr_final: float = 0.001  # beta at the last round (geometric decay): AdamW's jitter floor
    inner_lr: float = 0.05  # alpha (SGD, private level): ~1/7 of the stability limit 2 / L ~ 0.33
    inner_step: str = "sgd"  # the private level's rule (solver.INNER_STEPS)
    hvp: str = "exact"  # exact hypergradient (reverse-over-reverse): cheap at this size
    reuse_inner_grad: bool = False  # the two-pass approximation of the solver (off: the exact rule)
    hvp_every: int = 1  # the HVP term every m-th local step, first order between (1: the exact rule)
    # lower-level steps re-fitting each private level to the common level it receives (0: the paper's
    # algorithm; Flower runs default to local_steps, see conf/algorithm/pf2lora.yaml)
    refit_steps: int = 0
    threshold: float = DEFAULT_THRESHOLD  # learned rank: singular values > 0.05 sigma_1, as in Flower runs
    seed: int = 0
    output_dir: str = "outputs"
    algorithms: list[str] = field(default_factory=lambda: ["pf2lora", "homlora", "hetlora"])
    # HETLoRA: rank r_max = r + r~ on the server (its widest client can hold every planted direction),
    # each client's assigned rank; empty: [r - 1, r, r + r~, r] repeated over the clients (follows
    # --rank: with the defaults, client 3 (true rank 6) gets 4 < 6 and, ranks only shrinking, can
    # never reach its truth). Self-pruning is on (gamma, reg) so ranks above the truth can shrink,
    # but never below r - r~, the lowest true rank the task plants, and only a tail below the rank
    # threshold (prune_tol = threshold: a tail above it holds learned directions). With the paper's
    # test alone (any tail that shrank) it fires nearly every round: every client pruned itself to
    # the floor within ~20 rounds (losses 11-17 on --rank 10 --true-ranks 8,9,11,12 --dim 64 with a
    # floor of 1, 4-7 with r - r~), a collapse the paper's "cannot grow beyond its initial rank"
    # does not describe; with prune_tol, 2.8-4.6 (rank 9) against HOMLoRA's 1.2-3.3.
    hetlora_ranks: list[int] = field(default_factory=list)
    hetlora_gamma: float = 0.75
    hetlora_reg: float = 0.01

    def hetlora_r_min(self) -> int:
        """HETLoRA's rank floor: ``r - r~`` (see ``hetlora_ranks``)."""
        return max(1, self.rank - self.private_rank)

    def hetlora_assigned(self) -> list[int]:
        """Each client's HETLoRA rank: ``hetlora_ranks``, or ``[r - 1, r, r + r~, r]`` repeated."""
        if self.hetlora_ranks:
            return list(self.hetlora_ranks)
        pattern = [max(self.rank - 1, self.hetlora_r_min()), self.rank, self.rank + self.private_rank, self.rank]
        return [pattern[k % len(pattern)] for k in range(len(self.true_ranks))]

    def beta(self, rnd: int) -> float:
        """The common level's AdamW learning rate in round ``rnd`` (geometric decay)."""
        return self.lr * (self.lr_final / self.lr) ** (rnd / max(self.rounds - 1, 1))


@dataclass
class ClientData:
    x: Tensor  # (n, dim), whitened: x^T x / n = I
    y: Tensor  # (n, dim)
    true_rank: int
    delta: Tensor  # ground-truth dW_k


def check_ranks(cfg: SyntheticConfig) -> None:
    """Raise ValueError unless every true rank lies in ``[r - r~, r + r~]`` and the design fits."""
    low, high = cfg.rank - cfg.private_rank, cfg.rank + cfg.private_rank
    bad = [t for t in cfg.true_ranks if not low <= t <= high]
    if bad:
        raise ValueError(
            f"true ranks {bad} lie outside [r - r~, r + r~] = [{low}, {high}] (r={cfg.rank}, r~={cfg.private_rank})"
        )
    r_max, assigned = cfg.rank + cfg.private_rank, cfg.hetlora_assigned()
    if "hetlora" in cfg.algorithms and (
        len(assigned) != len(cfg.true_ranks) or not all(cfg.hetlora_r_min() <= a <= r_max for a in assigned)
    ):
        raise ValueError(
            f"HETLoRA ranks {assigned} need one per client ({len(cfg.true_ranks)}), each in "
            f"[r - r~, r + r~] = [{cfg.hetlora_r_min()}, {r_max}]; omit --hetlora-ranks to derive them from --rank"
        )
    needed = cfg.rank + sum(max(t - cfg.rank, 0) for t in cfg.true_ranks)
    if needed > cfg.dim:
        raise ValueError(f"{needed} orthogonal directions are planted but dim is only {cfg.dim}")
    if cfg.samples < cfg.dim:
        raise ValueError(f"samples={cfg.samples} < dim={cfg.dim}: the inputs cannot be whitened")


def make_clients(cfg: SyntheticConfig) -> tuple[Tensor, list[ClientData]]:
    """Base weight W0 and the clients' data (see module docstring)."""
    check_ranks(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    w0 = torch.randn(cfg.dim, cfg.dim, generator=gen) / cfg.dim**0.5
    u = _orthonormal(cfg.dim, cfg.dim, gen)
    v = _orthonormal(cfg.dim, cfg.dim, gen)

    def sigma(n: int) -> Tensor:
        return cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * torch.rand(n, generator=gen)

    shared = sigma(cfg.rank)
    clients, next_own, next_drop = [], cfg.rank, 0
    for t in cfg.true_ranks:
        cols = [i for i in range(cfg.rank) if (i - next_drop) % cfg.rank >= cfg.rank - t]  # round-robin drops
        sigmas = shared[cols]
        next_drop += max(cfg.rank - t, 0)
        if t > cfg.rank:  # the client's own directions, orthogonal to everything else
            cols += list(range(next_own, next_own + t - cfg.rank))
            sigmas = torch.cat([sigmas, sigma(t - cfg.rank)])
            next_own += t - cfg.rank
        delta = (u[:, cols] * sigmas) @ v[:, cols].T
        x = _orthonormal(cfg.samples, cfg.dim, gen) * cfg.samples**0.5
        y = x @ (w0 + delta).T + cfg.noise * torch.randn(cfg.samples, cfg.dim, generator=gen)
        clients.append(ClientData(x=x, y=y, true_rank=t, delta=delta))
    return w0, clients


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    """A random ``rows x cols`` matrix with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q


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
            **common, private_rank=cfg.private_rank, private_alpha=cfg.private_scaling * cfg.private_rank,
            inner_lr=cfg.inner_lr, hvp=cfg.hvp, fd_eps=1e-3, fd_scheme="forward", exact_ad="reverse",
            mode="bilevel", reuse_inner_grad=cfg.reuse_inner_grad, inner_step=cfg.inner_step,
            refit_steps=cfg.refit_steps, hvp_every=cfg.hvp_every,
        )  # fmt: skip
    elif cls.Params is HETLoRAParams:
        r_max = cfg.rank + cfg.private_rank
        params = HETLoRAParams(
            **{**common, "rank": r_max, "lora_alpha": cfg.scaling * r_max}, r_min=cfg.hetlora_r_min(),
            gamma=cfg.hetlora_gamma, reg=cfg.hetlora_reg, rank_seed=cfg.seed, client_ranks=cfg.hetlora_assigned(),
            prune_tol=cfg.threshold,  # prune only a tail below the rank threshold: no learned direction
        )  # fmt: skip
    else:
        params = cls.Params(**common)
    return cls(params)


def _objective(module: nn.Module) -> Objective:
    """Squared error summed over output dims, averaged over the batch (= ``||M - W_k||_F^2 + noise``)."""

    def objective(batch: Batch, params: dict[str, Tensor] | None) -> Tensor:
        x, y = batch
        out = module(x) if params is None else functional_call(module, params, (x,), strict=False)
        return ((out - y) ** 2).sum(-1).mean()

    return objective


def train_federated(
    name: str, cfg: SyntheticConfig, w0: Tensor, clients: list[ClientData], on_round: RoundCallback | None = None
) -> list[dict]:
    """Rounds of full-batch local training + example-weighted averaging of the common level.

    Its own small loop, not the in-process engine (``server_app.inprocess``): the task is a bare
    ``nn.Linear`` on in-memory tensors, which no ClientApp can load (the apps build a Hugging Face
    model and tokenized data from the Hydra tree), it runs hundreds of rounds of a tiny full-batch
    step, where one message round trip through the apps (config parse, record copies, checkpoint,
    metrics line) would cost more than the step, and ``pf2lora_core`` cannot import the engine (it is
    Flower). What it shares with the apps is what decides the numbers: the same ``Algorithm``
    objects, ``downlink`` / ``receive`` / ``train`` / ``uplink`` / ``server_update``.
    """
    torch.manual_seed(cfg.seed)  # peft's initialisation of both levels
    algorithm = _algorithm(name, cfg, cfg.lr)  # one object: it keeps server-side state (HETLoRA's ranks)
    common_spec, private_spec = algorithm.adapters()
    model = TwoLevelModel(_Linear(w0), ["lin"], common_spec, private_spec, assign=algorithm.assign_level)
    objective = _objective(model.model)
    state = algorithm.server_init(model.export(COMMON))
    privates = [model.export(PRIVATE) for _ in clients]  # {} where the algorithm has no private level
    weights = [float(len(c.x)) for c in clients]
    for rnd in range(cfg.rounds):
        algorithm.params.lr = cfg.beta(rnd)  # AdamW is built afresh each round from params.lr
        uplinks = []
        for k, client in enumerate(clients):
            _load(model, algorithm, state, k, privates[k])
            batches = itertools.repeat((client.x, client.y))
            seed = cfg.seed + 7919 * rnd + k
            algorithm.train(LocalContext(model, objective, batches, cfg.local_steps, seed, torch.device("cpu")))
            uplinks.append(algorithm.uplink(model))
            privates[k] = model.export(PRIVATE)
        state = algorithm.server_update(state, uplinks, weights, list(range(len(clients))))
        if on_round is not None:
            losses = [
                _loss(model, algorithm, state, k, p, c, objective)
                for k, (p, c) in enumerate(zip(privates, clients, strict=True))
            ]
            on_round(rnd, losses)
    return _evaluate(model, algorithm, state, privates, clients, objective, cfg)


def _load(model: TwoLevelModel, algorithm: Algorithm, state: StateDict, client: int, private: StateDict) -> None:
    """What client ``client`` holds: the server's downlink for it, and its own private level."""
    algorithm.receive(model, algorithm.downlink(state, client))
    if private:
        model.load(PRIVATE, private)


def _loss(
    model: TwoLevelModel,
    algorithm: Algorithm,
    state: StateDict,
    k: int,
    private: StateDict,
    client: ClientData,
    objective: Objective,
) -> float:
    _load(model, algorithm, state, k, private)
    with torch.no_grad():
        return float(objective((client.x, client.y), None))


def _evaluate(
    model: TwoLevelModel,
    algorithm: Algorithm,
    state: StateDict,
    privates: list[StateDict],
    clients: list[ClientData],
    objective: Objective,
    cfg: SyntheticConfig,
) -> list[dict]:
    """Per client: true and learned rank, loss, relative error of the update, leading singular values."""
    results = []
    for k, client in enumerate(clients):
        if algorithm.refits_private:  # the client's model: its private level re-fitted to the final x
            _load(model, algorithm, state, k, privates[k])
            batches = itertools.repeat((client.x, client.y))
            algorithm.refit_private(LocalContext(model, objective, batches, 1, cfg.seed + k, torch.device("cpu")))
            privates[k] = model.export(PRIVATE)
        loss = _loss(model, algorithm, state, k, privates[k], client, objective)
        (update,) = model.full_updates().values()  # s B A + s~ D_k C_k
        sigma = singular_values(update)
        energy = private_energy(model.full_updates([COMMON]), model.full_updates([PRIVATE]))
        results.append(
            {
                "client": k,
                "true_rank": client.true_rank,
                "learned_rank": threshold_rank(sigma, cfg.threshold),
                "entropy_rank": entropy_rank(sigma),
                "private_energy": energy,  # ||s~ D C||^2 / (||s B A||^2 + ||s~ D C||^2); 0 without a private level
                "loss": loss,
                "update_error": float(torch.linalg.norm(update - client.delta) / torch.linalg.norm(client.delta)),
                # ||M - dW_k||_F^2: with whitened rows, a fresh sample's loss is this + dim * noise^2
                "update_error_sq": float(torch.linalg.norm(update - client.delta) ** 2),
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

        def log(rnd: int, losses: list[float], name: str = name) -> None:
            run_dir.append_metrics_json({"algorithm": name, "round": rnd + 1, "beta": cfg.beta(rnd), "losses": losses})

        results = train_federated(name, cfg, w0, clients, log)
        summary["algorithms"][name] = {"clients": results, "seconds": time.time() - t}
        labels = {f"client {r['client']} (true {r['true_rank']})": r for r in results}
        rank_spectra(
            {label: r["singular_values"] for label, r in labels.items()},
            run_dir.plots / f"spectra_{name}.png",
            f"{name}: singular values of each client's update",
            true_ranks={label: r["true_rank"] for label, r in labels.items()},
        )
    summary["cost"] = {"seconds_total": time.time() - t0}
    run_dir.write_summary_json(summary)
    return run_dir.path, summary


def format_table(summary: dict) -> str:
    """One line per client: true rank, then learned rank and loss per algorithm."""
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
    for f in ("rounds", "local_steps", "seed", "rank", "private_rank", "dim", "samples", "refit_steps", "hvp_every"):
        parser.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(defaults, f))
    for f in (
        "lr",
        "lr_final",
        "inner_lr",
        "threshold",
        "noise",
        "sigma_min",
        "sigma_max",
        "scaling",
        "private_scaling",
    ):
        parser.add_argument(f"--{f.replace('_', '-')}", type=float, default=getattr(defaults, f))
    parser.add_argument("--true-ranks", type=lambda s: [int(x) for x in s.split(",")], default=defaults.true_ranks)
    parser.add_argument("--hvp", default=defaults.hvp, choices=["exact", "finite_difference", "first_order"])
    parser.add_argument("--reuse-inner-grad", action="store_true", help="two gradient passes per step")
    parser.add_argument("--algorithms", type=lambda s: s.split(","), default=defaults.algorithms)
    parser.add_argument(
        "--hetlora-ranks", type=lambda s: [int(x) for x in s.split(",")], default=[], help="default: follow --rank"
    )
    parser.add_argument("--inner-step", default=defaults.inner_step, choices=sorted(INNER_STEPS))
    parser.add_argument("--output-dir", default=defaults.output_dir)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation overhead
    cfg = SyntheticConfig(**vars(args))
    try:
        check_ranks(cfg)
    except ValueError as err:
        parser.error(str(err))
    path, summary = run(cfg)
    print(format_table(summary))
    print(f"{summary['cost']['seconds_total']:.1f} s; results in {path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
