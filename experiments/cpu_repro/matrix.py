"""E1 (equal-budget matrix fitting), E2 (update-rank ablation) and E6 on E1 (basis distributions).

A target update dW* (64 x 64, unit Frobenius norm) is fitted by minimising ||dW - dW*||_F^2 with Adam,
where dW is the update of one adapted ``nn.Linear`` whose base weight is zero. LoRA and RandLoRA go
through ``randlora.adapters.inject``; the ablation variants RandLoRA-a and RandLoRA-b are defined here.
The reported number is the residual ||dW - dW*||_F (relative error, since ||dW*||_F = 1).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from randlora.adapters import adapted_layers, count_trainable, inject
from randlora.adapters.bases import draw_basis
from randlora.analysis import effective_rank, numerical_rank, spectrum

D = 64
SPECTRA = ("flat", "gaussian", "inv", "rank8")
SPECTRUM_LABEL = {"flat": "flat (orthogonal)", "gaussian": "Gaussian", "inv": "sigma_i ~ 1/i", "rank8": "exact rank 8"}


def make_target(kind: str, seed: int, d: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)

    def orth():
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None]

    if kind == "flat":
        t = orth()
    elif kind == "gaussian":
        t = torch.randn(d, d, generator=g, dtype=torch.float64)
    elif kind == "inv":
        u, v = orth(), orth()
        t = u @ torch.diag(1.0 / torch.arange(1, d + 1, dtype=torch.float64)) @ v.t()
    elif kind == "rank8":
        t = torch.randn(d, 8, generator=g, dtype=torch.float64) @ torch.randn(8, d, generator=g, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return (t / t.norm()).float()


def eckart_young(target: torch.Tensor, rank: int) -> float:
    """Best possible residual of any rank-``rank`` update: sqrt(sum_{i > rank} sigma_i^2)."""
    s = spectrum(target)
    return float(math.sqrt((s[rank:] ** 2).sum()))


class RandSum(nn.Module):
    """Random-basis updates for the rank ablation (paper §6.3), own implementation.

    ``full`` (RandLoRA): dW = s sum_j B_j diag(lambda_j) A diag(gamma_j), one shared A; rank <= min(n r, d).
    ``a`` (RandLoRA-a):  dW = s (sum_j B_j diag(lambda_j)) (sum_j A_j diag(gamma_j)), distinct A_j; rank <= r.
    Both have n (r + d) trainable parameters; bases are i.i.d. uniform with unit variance (as the library).
    RandLoRA-b is ``full`` with fewer bases than d / r (rank n r < d) at about the same parameter count.
    """

    def __init__(self, mode: str, d_out: int, d_in: int, r: int, n: int, seed: int, alpha: float = 10.0):
        super().__init__()
        if mode not in ("full", "a"):
            raise ValueError(mode)
        self.mode, self.r, self.n, self.scaling = mode, r, n, alpha / r
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", draw_basis((n, d_out, r), g))
        n_a = 1 if mode == "full" else n
        self.register_buffer("A", draw_basis((n_a, r, d_in), g))
        self.lambda_ = nn.Parameter(torch.zeros(n, r))                # same init as the library default
        self.gamma = nn.Parameter(torch.full((n, d_in), 1.0 / d_in))

    def delta_weight(self) -> torch.Tensor:
        bl = self.B * self.lambda_[:, None, :]                         # (n, D, r): B_j diag(lambda_j)
        ag = self.A * self.gamma[:, None, :]                           # (n or n, r, d): A diag(gamma_j)
        if self.mode == "full":
            return torch.einsum("jor,jri->oi", bl, ag) * self.scaling
        return (bl.sum(0) @ ag.sum(0)) * self.scaling


def _adapter_update(method: str, r: int, seed: int, **opts):
    lin = nn.Linear(D, D, bias=False)
    nn.init.zeros_(lin.weight)
    model = nn.Sequential(lin)
    torch.manual_seed(seed)
    if method != "lora":
        opts = {"seed": seed, **opts}
    inject(model, method, target_modules=["0"], r=r, **opts)
    return adapted_layers(model)[0][1].update, count_trainable(model)


def _optimise(update: nn.Module, target: torch.Tensor, lr: float, steps: int) -> float:
    params = [p for p in update.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.zero_grad(set_to_none=True)
        loss = (update.delta_weight() - target).square().sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((update.delta_weight() - target).norm())


def fit(build, target: torch.Tensor, lrs, steps: int) -> dict:
    """Fit with each learning rate (a fresh, identically seeded update each time); keep the best."""
    best = None
    for lr in lrs:
        update, n_params = build()
        res = _optimise(update, target, lr, steps)
        if best is None or res < best["residual"]:
            with torch.no_grad():
                dw = update.delta_weight().detach()
            best = {"residual": res, "lr": lr, "params": n_params, "rank": numerical_rank(dw, rtol=1e-4),
                    "effective_rank": effective_rank(dw)}
    return best


def run_e1(cfg: dict) -> list[dict]:
    """Equal-budget fits: RandLoRA-r_R vs LoRA-r_L pairs at (nearly) matched parameter counts."""
    rows = []
    for seed in range(cfg["seeds"]):
        for kind in cfg["spectra"]:
            target = make_target(kind, seed)
            for r_rand, r_lora in cfg["pairs"]:
                for method, r in (("randlora", r_rand), ("lora", r_lora)):
                    lrs = cfg["lrs"] if method == "randlora" else cfg["lora_lrs"]
                    res = fit(lambda m=method, rr=r: _adapter_update(m, rr, seed), target, lrs, cfg["steps"])
                    rows.append({"exp": "E1", "spectrum": kind, "seed": seed, "method": method, "r": r,
                                 "pair": f"RandLoRA-{r_rand} vs LoRA-{r_lora}", **res,
                                 "ey_floor_lora": eckart_young(target, r_lora)})
    return rows


def e2_variants(budget_r: int = 4) -> list[tuple[str, int, int, str]]:
    """(label, r, n, mode) at about the same parameter count n (r + d) ~ (D / budget_r) (budget_r + D)."""
    n_full = math.ceil(D / budget_r)
    params = n_full * (budget_r + D)
    r_b = max(1, budget_r // 2)
    n_b = max(1, round(params / (r_b + D)))
    n_b = min(n_b, D // r_b // 2 if D // r_b // 2 >= 1 else 1)   # keep RandLoRA-b at half rank
    return [("RandLoRA (full rank)", budget_r, n_full, "full"),
            ("RandLoRA-b (half rank)", r_b, n_b, "full"),
            ("RandLoRA-a (rank r)", budget_r, n_full, "a")]


def run_e2(cfg: dict) -> list[dict]:
    rows = []
    for seed in range(cfg["seeds"]):
        for kind in cfg["spectra"]:
            target = make_target(kind, seed)
            for label, r, n, mode in e2_variants(cfg["budget_r"]):
                res = fit(lambda r=r, n=n, mode=mode: (RandSum(mode, D, D, r, n, seed),
                                                      n * (r + D)), target, cfg["lrs"], cfg["steps"])
                bound = min(D, n * r) if mode == "full" else r
                rows.append({"exp": "E2", "spectrum": kind, "seed": seed, "method": label, "r": r, "n": n,
                             "rank_bound": bound, "ey_floor_at_bound": eckart_young(target, bound), **res})
            for r_l in cfg["lora_ranks"]:
                res = fit(lambda rr=r_l: _adapter_update("lora", rr, seed), target, cfg["lora_lrs"], cfg["steps"])
                rows.append({"exp": "E2", "spectrum": kind, "seed": seed, "method": f"LoRA-{r_l}", "r": r_l,
                             "n": None, "rank_bound": r_l, "ey_floor_at_bound": eckart_young(target, r_l), **res})
    return rows


def run_e6_matrix(cfg: dict) -> list[dict]:
    """RandLoRA-r on the flat target with each basis distribution / sparsity."""
    rows = []
    for seed in range(cfg["seeds"]):
        for kind in cfg["spectra"]:
            target = make_target(kind, seed)
            for label, dist, s in cfg["distributions"]:
                opts = {"distribution": dist} if s is None else {"distribution": dist, "sparsity": float(s)}
                res = fit(lambda o=opts: _adapter_update("randlora", cfg["r"], seed, **o), target, cfg["lrs"],
                          cfg["steps"])
                zero_frac = None if s is None else 1 - 2 / float(s)
                rows.append({"exp": "E6-matrix", "spectrum": kind, "seed": seed, "method": label, "r": cfg["r"],
                             "sparsity_fraction": zero_frac, **res})
    return rows
