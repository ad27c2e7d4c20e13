"""DoRA-DR: dynamic rank distribution (Mao et al. 2024, arXiv 2405.17357).

A LoRA of start rank r' = ceil(init_rank_factor * r) is written as r' gated rank-1 components,

    dW = s * B diag(c) A = s * sum_i c_i b_i a_i^T,      s = alpha / r'

A and B are Kaiming-uniform, the gates c start at zero (dW = 0 at init). During training a global
schedule (``DynamicRankScheduler``) prunes components across all layers by their importance — each
component's share ||c_i b_i a_i^T||_F / ||dW||_F, smoothed by an EMA — until r components per layer
remain on average:

* phase 1 (the first ``prune_start_ratio`` of training): EMA only;
* phase 2 (until ``1 - final_phase_ratio``): every ``prune_interval`` steps and at the window's end,
  zero the gates of the lowest-scoring rho(p) = ((r' - r) / r') (p / T_p)^3 fraction of components;
* phase 3: the mask frozen at the end of phase 2 is re-applied after every step.

A variance regulariser (DEM) on the rows of A and columns of B is added to the loss in phases 1-2.
Importance is computed in closed form (two r' x r' Gram matrices), never as r' x out x in tensors.
Trainable parameters per layer during training: r' (in + out + 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Update
from .options import Method, MethodOptions, function_option
from .targets import clean_name


def start_rank(r: int, factor: float) -> int:
    return int(math.ceil(factor * r))


@dataclass
class DoRADROptions(MethodOptions):
    """``r``: the target mean rank after pruning; ``init_rank_factor``: start rank r' = ceil(factor r);
    ``alpha``: scaling alpha / r' (default 8); the schedule: ``prune_start_ratio`` (end of phase 1),
    ``final_phase_ratio`` (length of phase 3), ``prune_interval`` (steps between prunings),
    ``ema_beta`` (importance EMA), ``dem_weight`` (the DEM regulariser's weight)."""

    alpha: float | None = function_option(8.0, "scaling alpha / r' (r' the start rank)")
    init_rank_factor: float = function_option(1.5, "start rank r' = ceil(init_rank_factor * r)")
    prune_start_ratio: float = 0.15
    final_phase_ratio: float = 0.5
    prune_interval: int = 100
    ema_beta: float = 0.9
    dem_weight: float = 0.1

    def default_alpha(self) -> float:
        return 8.0

    @property
    def start_rank(self) -> int:
        return start_rank(self.r, self.init_rank_factor)

    @property
    def scaling(self) -> float:
        return self.alpha / self.start_rank

    def validate(self):
        for key in ("prune_start_ratio", "final_phase_ratio"):
            if not (0 <= getattr(self, key) < 1):
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")
        if self.prune_start_ratio + self.final_phase_ratio >= 1:
            raise ValueError("prune_start_ratio + final_phase_ratio must be < 1 (the pruning window would be empty)")
        if self.init_rank_factor < 1:
            raise ValueError(f"init_rank_factor must be >= 1 (start rank >= target rank), got {self.init_rank_factor!r}")
        if not (isinstance(self.prune_interval, int) and self.prune_interval > 0):
            raise ValueError(f"prune_interval must be a positive integer, got {self.prune_interval!r}")


class DoRADRUpdate(Update):
    @staticmethod
    def param_shapes(out_features, in_features, opts):
        r0 = opts.start_rank
        return {"lora_A": (r0, in_features), "lora_B": (out_features, r0), "gates": (r0,)}

    @staticmethod
    def buffer_shapes(out_features, in_features, opts):
        r0 = opts.start_rank
        return {"ema_score": (r0,), "final_mask": (r0,)}

    @classmethod
    def build(cls, out_features, in_features, opts, bases=None, base_weight=None):
        return cls(out_features, in_features, opts.r, opts.start_rank, opts.scaling)

    def __init__(self, out_features: int, in_features: int, r: int, r_start: int, scaling: float):
        super().__init__()
        self.out_features, self.in_features, self.r, self.r_start, self.scaling = \
            out_features, in_features, r, r_start, scaling
        self.lora_A = nn.Parameter(torch.empty(r_start, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r_start))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        self.gates = nn.Parameter(torch.zeros(r_start))
        # pruning state lives in the state dict (and so in checkpoints): resume-safe
        self.register_buffer("ema_score", torch.zeros(r_start))
        self.register_buffer("final_mask", torch.zeros(r_start, dtype=torch.bool))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B * self.gates) @ self.lora_A * self.scaling

    def branch(self, x):
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A) * self.gates, self.lora_B) * self.scaling

    @torch.no_grad()
    def component_share(self, eps: float = 1e-8) -> torch.Tensor:
        """||c_i b_i a_i^T||_F / (||dW||_F + eps) for every component, in closed form (fp32)."""
        a, b, c = self.lora_A.float(), self.lora_B.float(), self.gates.float()
        norms = c.abs() * b.norm(dim=0) * a.norm(dim=1)
        total_sq = (c[:, None] * c[None, :] * (b.t() @ b) * (a @ a.t())).sum().clamp_min(0)
        return norms / (total_sq.sqrt() + eps)

    def dem_term(self) -> torch.Tensor:
        return self.lora_A.var(dim=1).sum() + self.lora_B.var(dim=0).sum()

    def live_components(self) -> int:
        return int((self.gates.detach() != 0).sum())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())


class DynamicRankScheduler:
    """The global pruning schedule, driven only by the optimizer step count (resume-safe: the rest
    of its state is the EMA scores and final masks stored in each layer's buffers).

    It is DoRA-DR's ``Method.schedule``; the training framework drives any method schedule through
    ``for_model``, ``regularizer`` (added to the loss, logged as ``regularizer_name``), ``after_step``
    (after each optimizer step; ``log_values`` of its result are logged), ``state_digest`` (what every
    data-parallel rank must agree on after training) and, since it redistributes rank across layers,
    ``rank_table`` (drawn as a heatmap at the end of training).
    """

    regularizer_name = "train/dem"
    redistributes_rank = True

    def __init__(self, model: nn.Module, total_steps, r: int, r_start: int, prune_start_ratio: float = 0.15,
                 final_phase_ratio: float = 0.5, prune_interval: int = 100, ema_beta: float = 0.9,
                 dem_weight: float = 0.1):
        if total_steps is None or not math.isfinite(float(total_steps)) or int(total_steps) <= 0:
            raise ValueError(f"DoRA-DR needs the total number of optimizer steps to place its pruning schedule, "
                             f"got {total_steps!r}; set trainer.max_epochs or trainer.max_steps")
        self.layers = [(clean_name(n), m.update) for n, m in model.named_modules()
                       if isinstance(getattr(m, "update", None), DoRADRUpdate)]
        if not self.layers:
            raise ValueError("no DoRA-DR layers in this model")
        self.total = int(total_steps)
        self.r, self.r_start = r, r_start
        self.t_start = int(prune_start_ratio * self.total)
        self.t_end = int((1.0 - final_phase_ratio) * self.total)
        self.window = max(1, self.t_end - self.t_start)
        self.interval, self.beta, self.dem_weight = int(prune_interval), float(ema_beta), float(dem_weight)
        self.n_total = len(self.layers) * r_start
        self.threshold = None

    @classmethod
    def for_model(cls, model: nn.Module, total_steps) -> "DynamicRankScheduler":
        """The schedule of an injected DoRA-DR model, with the options stored at injection."""
        o = DoRADROptions(**getattr(model, "_adapter_meta")["options"])
        return cls(model, total_steps, r=o.r, r_start=o.start_rank, prune_start_ratio=o.prune_start_ratio,
                   final_phase_ratio=o.final_phase_ratio, prune_interval=o.prune_interval, ema_beta=o.ema_beta,
                   dem_weight=o.dem_weight)

    def phase(self, step: int) -> int:
        return 1 if step < self.t_start else (2 if step <= self.t_end else 3)

    def prune_count(self, step: int) -> int:
        """Components pruned after optimizer step ``step`` (phase 2), per the cubic schedule."""
        p = step - self.t_start
        rho = (self.r_start - self.r) / self.r_start * (min(p, self.window) / self.window) ** 3
        return max(1, int(self.n_total * rho))

    def dem_loss(self) -> torch.Tensor:
        terms = [u.dem_term() for _, u in self.layers]
        return self.dem_weight * torch.stack(terms).sum() / (len(self.layers) * 2 * self.r_start)

    def regularizer(self, step: int):
        return self.dem_loss() if self.phase(step) <= 2 else None

    @torch.no_grad()
    def after_step(self, step: int, broadcast=None) -> dict:
        """Call once after each optimizer step; ``step`` = optimizer steps completed so far."""
        ph = self.phase(step)
        info = {"phase": ph}
        if ph <= 2:
            for _, u in self.layers:
                u.ema_score.mul_(self.beta).add_((1 - self.beta) * u.component_share())
        if ph == 2 and ((step - self.t_start) % self.interval == 0 or step == self.t_end):
            scores = torch.cat([u.ema_score for _, u in self.layers])
            k = self.prune_count(step)
            thr = torch.kthvalue(scores.float().cpu(), k).values.to(scores.device)
            masks = [u.ema_score <= thr for _, u in self.layers]
            if broadcast is not None:  # identical masks on every rank, even with float ties
                masks = [broadcast(m) for m in masks]
            for (_, u), m in zip(self.layers, masks):
                u.gates.data[m] = 0
                if step == self.t_end:
                    u.final_mask.copy_(m)
            self.threshold = float(thr)
            info.update(pruned=int(sum(m.sum() for m in masks)), threshold=self.threshold)
        if ph == 3 or step == self.t_end:
            for _, u in self.layers:
                u.gates.data[u.final_mask] = 0
        info["live"] = sum(u.live_components() for _, u in self.layers)
        return info

    def counts(self) -> dict:
        """Parameters during training, stored after pruning (kept components), LoRA-equivalent rank."""
        training = sum(u.num_trainable() for _, u in self.layers)
        kept = [(u, int((~u.final_mask).sum()) if u.final_mask.any() else u.live_components()) for _, u in self.layers]
        stored = sum(k * (u.out_features + u.in_features + 1) for u, k in kept)
        lora_eq = stored / sum(u.out_features + u.in_features for _, u in self.layers)
        return {"training": training, "stored": stored, "lora_equivalent_rank": lora_eq,
                "live_components": sum(k for _, k in kept)}

    @staticmethod
    def log_values(info: dict) -> dict:
        """The metrics of one ``after_step`` result."""
        out = {"dora/live_components": float(info["live"])}
        if "threshold" in info:
            out["dora/threshold"] = float(info["threshold"])
        return out

    def state_digest(self) -> torch.Tensor:
        """The final masks of every layer as one tensor: identical on every data-parallel rank."""
        return torch.cat([u.final_mask.flatten().float() for _, u in self.layers])

    def rank_table(self) -> list[tuple[str, int]]:
        return [(n, int((~u.final_mask).sum()) if u.final_mask.any() else u.live_components()) for n, u in self.layers]


METHOD = Method("dora_dr", DoRADROptions, DoRADRUpdate, schedule=DynamicRankScheduler)
