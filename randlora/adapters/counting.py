"""Counting parameters and comparing methods at equal budgets.

The budget of an adapter is the number of its trained parameters on the adapted layers
(``trainable_modules`` such as a classification head are the same for every method and are not
part of it). Per-layer counts come from the shapes each method's ``Update`` declares.
"""
from __future__ import annotations

import dataclasses
import math

from torch import nn

from .inject import META_ATTR, adapted_layers
from .options import COMMON
from .registry import get_method
from .targets import find_targets


def _err(msg: str) -> ValueError:
    return ValueError(msg)


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_total(model: nn.Module) -> int:
    """Number of parameters of the model (frozen and trainable; bases are buffers, not counted)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parameter_table(model: nn.Module) -> list[dict]:
    """One row per adapted layer: name, shape, trainable count, LoRA-equivalent rank."""
    meta = getattr(model, META_ATTR, None)
    rows = []
    for name, layer in adapted_layers(model):
        n_train = sum(p.numel() for p in layer.update.parameters() if p.requires_grad)
        o, i = layer.out_features, layer.in_features
        rows.append({"layer": name, "method": meta["method"] if meta else None, "out": o, "in": i,
                     "trainable": n_train, "lora_equivalent_rank": n_train / (o + i)})
    return rows


def format_parameter_table(model: nn.Module) -> str:
    rows = parameter_table(model)
    w = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"{'layer':<{w}}  {'shape':>13}  {'trainable':>10}  {'LoRA-eq r':>9}"]
    for r in rows:
        lines.append(f"{r['layer']:<{w}}  {str((r['out'], r['in'])):>13}  {r['trainable']:>10,}  "
                     f"{r['lora_equivalent_rank']:>9.2f}")
    lines.append(f"{'total':<{w}}  {'':>13}  {sum(r['trainable'] for r in rows):>10,}  "
                 f"{lora_equivalent_rank(model):>9.2f}")
    return "\n".join(lines)


def lora_equivalent_rank(model: nn.Module) -> float:
    """The LoRA rank with the same number of adapter parameters on the same layers."""
    rows = parameter_table(model)
    denom = sum(r["out"] + r["in"] for r in rows)
    return sum(r["trainable"] for r in rows) / denom if denom else float("nan")


def match_budget(model: nn.Module, method: str, budget: float, **options) -> dict:
    """Options (the rank ``r``) whose adapter-parameter count on this model is closest to ``budget``.

    The count covers the adapter parameters of ``target_modules`` (``trainable_modules`` such as a
    head are the same for every method and are not part of the budget). Returns the options to pass
    to ``inject`` plus ``expected_trainable``. The model is not modified.
    """
    if method == "full":
        raise _err("method 'full' trains every parameter and has no rank to match a budget; "
                   "drop adapter.budget for full fine-tuning")
    if not (isinstance(budget, (int, float)) and budget > 0 and math.isfinite(budget)):
        raise _err(f"budget must be a positive number of parameters, got {budget!r}")
    spec = get_method(method)
    knob = spec.knob
    options = {k: v for k, v in options.items() if k != knob}
    base = spec.resolve({**{k: v for k, v in options.items() if k not in COMMON}, knob: 1})
    targets = find_targets(model, options.get("target_modules"))
    limit = spec.knob_max or min(min(t.out_features, t.in_features) for t in targets)
    ranks = range(1, limit + 1)

    def count(r):
        opts = dataclasses.replace(base, **{knob: r})
        return sum(spec.num_trainable(t.out_features, t.in_features, opts) for t in targets)

    counts = {r: count(r) for r in ranks}
    lo, hi = min(counts.values()), max(counts.values())
    if budget < lo * 0.5:
        raise _err(f"budget {budget:,.0f} is below the smallest {method} adapter on these targets "
                   f"({lo:,} parameters); raise the budget or target fewer layers")
    if budget > hi * 2:
        raise _err(f"budget {budget:,.0f} is above the largest {method} adapter on these targets "
                   f"({hi:,} parameters); lower the budget or target more layers")
    best = min(counts, key=lambda r: (abs(counts[r] - budget), r))
    return {**options, knob: best, "expected_trainable": counts[best]}
