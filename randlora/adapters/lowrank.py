"""Any adapter's update as a rank-k LoRA, by truncated SVD, with the cost of the truncation per layer.

For each adapted layer with update dW (out x in; DoRA's and every other method's, as ``delta_weight()``
gives it against the current W0) and singular values s_1 >= s_2 >= ... (float64):

    dW_k = U_k diag(s_1..s_k) V_k^T                        (the best rank-k approximation: Eckart-Young)
    B = U_k diag(sqrt(s)), A = diag(sqrt(s)) V_k^T          (LoRA factors, scaling 1: alpha = k)
    rel_error = ||dW - dW_k||_F / ||dW||_F = sqrt(sum_{i>k} s_i^2 / sum_i s_i^2)
    energy    = sum_{i<=k} s_i^2 / sum_i s_i^2             (= 1 - rel_error^2)

So a full-rank RandLoRA can be served by LoRA-only servers (``to_lora`` then ``export_peft``), and the
error at k measures how much of the update lies beyond rank k (the RandLoRA paper's "full rank matters").
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .inject import adapted_layers, adapter_meta, inject, unload
from .targets import exact_names


def _err(msg: str) -> ValueError:
    return ValueError(msg)


@dataclass(frozen=True)
class LayerTruncation:
    """One layer of a low-rank conversion: ``rank`` singular directions kept of ``full_rank`` = min(out, in)."""

    name: str
    shape: tuple[int, int]
    rank: int
    full_rank: int
    norm: float        # ||dW||_F
    rel_error: float   # ||dW - dW_k||_F / ||dW||_F (0 for dW = 0)
    energy: float      # share of ||dW||_F^2 kept (1 for dW = 0)

    def as_dict(self) -> dict:
        return asdict(self)


def _deltas(model: nn.Module) -> list[tuple[str, nn.Module]]:
    meta = adapter_meta(model)
    if meta["method"] == "full":
        raise _err("to_lora: a full fine-tune has no adapter update to convert (its dW needs the original weights); "
                   "compute W - W0 yourself or export the merged model")
    layers = adapted_layers(model)
    if not layers:  # pragma: no cover - inject always adapts at least one layer
        raise _err("to_lora: the model has no adapted layers")
    return layers


@torch.no_grad()
def delta_spectra(model: nn.Module) -> dict[str, torch.Tensor]:
    """The singular values (float64, descending, on the CPU) of every adapted layer's dW."""
    return {name: torch.linalg.svdvals(layer.delta_weight().detach().double()).cpu()
            for name, layer in _deltas(model)}


def truncation(singular_values: torch.Tensor, k: int) -> tuple[float, float]:
    """(relative Frobenius error, energy kept) of keeping the top ``k`` of ``singular_values``."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0.0, 1.0
    tail = float(sq[k:].sum())
    return math.sqrt(tail / total), 1.0 - tail / total


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k (>= 1) whose top-k singular values keep at least ``energy`` of ||dW||_F^2."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    # a tolerance of a few units in the last place, so that energy=1.0 does not ask for the numerically zero tail
    k = int((kept < energy - 1e-12).sum()) + 1
    return max(1, min(k, len(singular_values)))


def _check_request(rank, energy, layer_ranks, names):
    if rank is not None and energy is not None:
        raise _err("to_lora: rank and energy both given; choose one")
    if rank is None and energy is None and not layer_ranks:
        raise _err("to_lora: give exactly one of rank=k (one rank for every layer) or energy=e (per layer, the "
                   "smallest rank keeping that share of ||dW||_F^2), optionally with layer_ranks={name: k}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise _err(f"to_lora: rank must be a positive integer, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < float(energy) <= 1.0):
        raise _err(f"to_lora: energy must be in (0, 1], got {energy!r}")
    layer_ranks = dict(layer_ranks or {})
    unknown = sorted(set(layer_ranks) - set(names))
    if unknown:
        raise _err(f"to_lora: layer_ranks names {unknown[:5]} that are not adapted layers; adapted: {names[:10]}")
    bad = {k: v for k, v in layer_ranks.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise _err(f"to_lora: layer_ranks values must be positive integers, got {bad}")
    if rank is None and energy is None and set(layer_ranks) != set(names):
        missing = sorted(set(names) - set(layer_ranks))[:5]
        raise _err(f"to_lora: layer_ranks alone must name every adapted layer; missing {missing}")
    return layer_ranks


@torch.no_grad()
def to_lora(model: nn.Module, rank: int | None = None, *, energy: float | None = None,
            layer_ranks: dict[str, int] | None = None, inplace: bool = False
            ) -> tuple[nn.Module, list[LayerTruncation]]:
    """Convert the adapter of ``model`` (any method) to a LoRA by truncated SVD of each layer's dW.

    ``rank``: k for every layer, or ``energy``: per layer the smallest k keeping that share of ||dW||_F^2;
    ``layer_ranks``: {layer name: k} overrides either (or, alone, gives every layer's k). k is capped at
    min(out, in), where the conversion is exact. Returns the LoRA-adapted model (a copy, unless ``inplace``:
    then ``model`` itself, its old adapter replaced; use that for models too big to hold twice) and one
    ``LayerTruncation`` per layer. The LoRA has scaling 1 (alpha = k per layer), the original dropout, the
    same targets and ``trainable_modules``; ``export_peft`` writes it for any LoRA server.
    """
    layers = _deltas(model)
    names = [n for n, _ in layers]
    layer_ranks = _check_request(rank, energy, layer_ranks, names)
    meta = adapter_meta(model)
    factors, report = {}, []
    for name, layer in layers:
        dw = layer.delta_weight().detach().double()
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        full = min(dw.shape)
        k = layer_ranks.get(name) or (rank if rank is not None else rank_for_energy(s, energy))
        k = min(k, full)
        root = s[:k].sqrt()
        factors[name] = ((u[:, :k] * root).float(), (root[:, None] * vh[:k]).float())
        err, kept = truncation(s, k)
        report.append(LayerTruncation(name, tuple(dw.shape), k, full, float(s.norm()), err, kept))
    work = model if inplace else copy.deepcopy(model)
    unload(work, merge_first=False)  # the original layers back (a merged layer's weight holds W0 + dW: unmerged)
    ks = {row.name: row.rank for row in report}
    r0 = Counter(ks.values()).most_common(1)[0][0]
    trainable = meta.get("trainable_names") or []
    inject(work, "lora", target_modules=exact_names(names),
           trainable_modules=exact_names(trainable) if trainable else None,
           layer_options={n: {"r": k, "alpha": float(k)} for n, k in ks.items() if k != r0} or None,
           r=r0, alpha=float(r0), dropout=float(meta["options"].get("dropout", 0.0)))
    for name, layer in adapted_layers(work):
        b, a = factors[name]
        layer.update.lora_B.copy_(b.to(layer.update.lora_B.device))
        layer.update.lora_A.copy_(a.to(layer.update.lora_A.device))
    adapter_meta(work)["converted_from"] = {"method": meta["method"], "options": meta["options"],
                                            "layer_options": meta.get("layer_options") or {},
                                            "rel_error": {row.name: row.rel_error for row in report}}
    return work, report


def overall_error(report: list[LayerTruncation]) -> float:
    """||dW - dW_k||_F / ||dW||_F over all layers together (the updates stacked)."""
    total = sum(row.norm ** 2 for row in report)
    if total == 0.0:
        return 0.0
    return math.sqrt(sum((row.rel_error * row.norm) ** 2 for row in report) / total)


def format_truncation(report: list[LayerTruncation]) -> str:
    """The per-layer report as a fixed-width table, with the overall error last."""
    w = max([len("layer")] + [len(r.name) for r in report])
    lines = [f"{'layer':<{w}}  {'shape':>11}  {'rank':>9}  {'rel. error':>10}  {'energy':>8}"]
    for r in report:
        shape = f"{r.shape[0]}x{r.shape[1]}"
        lines.append(f"{r.name:<{w}}  {shape:>11}  {f'{r.rank}/{r.full_rank}':>9}  {r.rel_error:>10.4f}  "
                     f"{r.energy:>8.4f}")
    lines.append(f"{'all layers':<{w}}  {'':>11}  {'':>9}  {overall_error(report):>10.4f}")
    return "\n".join(lines)
