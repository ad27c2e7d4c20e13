"""Counting parameters and comparing methods at equal budgets.

The budget of an adapter is the number of its trained parameters on the adapted layers
(``trainable_modules`` such as a classification head are the same for every method and are not
part of it). Per-layer counts come from the shapes each method's ``Update`` declares.
"""
from __future__ import annotations

import copy
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from torch import nn

from .inject import META_ATTR, adapted_layers
from .options import COMMON
from .registry import get_method
from .targets import Target, find_targets


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


# ----------------------------------------------------------------------------- budgets
class BudgetWarning(UserWarning):
    """A budget was matched in a regime where "equal parameters" compares something other than it
    seems (RandLoRA at r = 1, VeRA beyond full rank, an adapter larger than the weights it adapts)."""


class ScalingWarning(BudgetWarning):
    """The adapter's scaling s = alpha / r at its rank puts the update per step far from the method's
    own convention, so a comparison measures the scaling rather than the method: VeRA with s < 0.1 on its
    Kaiming-scaled bases (the update is 1 / s times smaller than VeRA's own; at alpha = 1 and r = 246 the
    digits run equals training the head alone), RandLoRA matched to r = 1 with a fixed alpha (s = alpha,
    r times what that alpha gives at rank r; on the digits ViT the update reached 3.6x the weights).
    ``match_budget`` issues it with the other regimes (it is a ``BudgetWarning``); ``scaling_warnings``
    gives the messages for a rank set directly (no budget)."""


@dataclass(frozen=True, eq=False)
class BudgetMatch(Mapping):
    """What ``match_budget`` chose. As a mapping it is exactly ``inject``'s keyword arguments::

        match = match_budget(model, "lora", 5e3, target_modules=["qkv", "fc1", "fc2"])
        inject(model, "lora", **match)

    ``options``: those keyword arguments (the caller's options, the global ``knob`` value, and
    ``layer_options`` when some layers take the neighbouring value); ``trainable``: the adapter
    parameters they give on the targets; ``deviation``: (trainable - budget) / budget;
    ``ranks``: {layer: knob value} for every target; ``warnings``: the degenerate-regime
    messages (also issued as ``BudgetWarning`` or its subclass ``ScalingWarning``, named in
    ``warning_categories``)."""

    method: str
    budget: float
    trainable: int
    tolerance: float
    knob: str
    options: dict
    ranks: dict
    warnings: tuple = ()
    # the warning class of each message of ``warnings``, by name ("BudgetWarning" | "ScalingWarning")
    warning_categories: tuple = ()

    def __getitem__(self, key):
        return self.options[key]

    def __iter__(self):
        return iter(self.options)

    def __len__(self):
        return len(self.options)

    @property
    def deviation(self) -> float:
        return (self.trainable - self.budget) / self.budget

    @property
    def rank_counts(self) -> dict:
        """{knob value: number of layers}, most common first."""
        return dict(Counter(self.ranks.values()).most_common())

    def summary(self) -> str:
        """One line for a log, e.g. ``lora r=1 x7, r=2 x5 layers: 4,992 adapter parameters for budget
        5,000 (-0.16 %)``."""
        mix = ", ".join(f"{self.knob}={v} x{n}" for v, n in self.rank_counts.items())
        return (f"{self.method} {mix} layers: {self.trainable:,} adapter parameters for budget "
                f"{self.budget:,.0f} ({100 * self.deviation:+.2f} %)")

    def record(self) -> dict:
        """Plain data for results files: budget, trainable, deviation, tolerance, knob, the global value,
        {value: layers}, {layer: value}, warnings."""
        return {"budget": self.budget, "trainable": self.trainable, "deviation": self.deviation,
                "tolerance": self.tolerance, "knob": self.knob, "value": self.options[self.knob],
                "value_counts": {str(k): v for k, v in self.rank_counts.items()}, "ranks": dict(self.ranks),
                "warnings": list(self.warnings)}


# enumerating per-group layer counts stops past this many combinations (a model with very many
# distinct layer shapes); the budget is then refused with the nearest reachable counts
_SEARCH_CAP = 1_000_000
# a VeRA scaling below this is flagged: with Kaiming-scaled bases it shrinks the update by 1 / scaling
VERA_SMALL_SCALING = 0.1


def _same_targets(a, b) -> bool:
    norm = (lambda t: t if t is None or isinstance(t, str) else [str(x) for x in t])
    return norm(a) == norm(b)


def _budget_targets(model: nn.Module, target_modules) -> tuple[list[Target], object]:
    """(the layers to count on, their target_modules). On a model that already carries an adapter: its
    adapted layers, on their base shapes, when ``target_modules`` is theirs or None."""
    meta = getattr(model, META_ATTR, None)
    if meta is None or meta["method"] == "full":
        return find_targets(model, target_modules), target_modules
    if target_modules is None or _same_targets(target_modules, meta["target_modules"]):
        return [Target(name, kind, o, i) for name, kind, o, i in meta["targets"]], meta["target_modules"]
    raise _err(f"this model carries a {meta['method']!r} adapter on target_modules {meta['target_modules']!r}; "
               f"match_budget counts on the layers of a plain model: pass those target_modules (or none) to count "
               f"on the adapted layers, or call match_budget on a fresh model")


def _refuse(method, budget, tolerance, reach, why=None, fix=None) -> ValueError:
    """``reach``: [(count, description)] of the nearest reachable counts."""
    near = " and ".join(f"{c:,} ({d}, {100 * (c - budget) / budget:+.1f} %)" for c, d in reach)
    head = why or f"budget {budget:,.0f} cannot be met within {100 * tolerance:g} % by {method} on these targets"
    return _err(f"{head}; the nearest reachable budget{'s are' if len(reach) > 1 else ' is'} {near}. "
                f"{fix or 'Use one of those, change the targets, or pass a larger tolerance'}")


def _search_mix(sizes, deltas, centre, target, slack):
    """Integer k_g in [0, sizes_g] with |sum_g k_g deltas_g - target| <= slack minimising
    sum_g |k_g - centre_g| (then the deviation, then k itself): the most proportional mix that meets
    the budget. Windows around ``centre`` grow until the optimum is provably inside one.
    Returns (k, reachable counts below / above seen) with k None when none was found."""
    sizes, deltas, centre = np.asarray(sizes), np.asarray(deltas, dtype=np.int64), np.asarray(centre, dtype=float)
    best, below, above = None, None, None
    w = 0
    while True:
        lo = np.maximum(np.floor(centre).astype(int) - w, 0)
        hi = np.minimum(np.ceil(centre).astype(int) + w, sizes)
        if math.prod(int(h - l + 1) for l, h in zip(lo, hi)) > _SEARCH_CAP:
            break
        grid = np.stack(np.meshgrid(*[np.arange(l, h + 1) for l, h in zip(lo, hi)], indexing="ij"), -1)
        grid = grid.reshape(-1, len(sizes))
        tot = grid @ deltas
        dev = np.abs(tot - target)
        ok = dev <= slack
        under, over = tot[tot <= target], tot[tot >= target]
        below = max([x for x in (below, under.max() if under.size else None) if x is not None], default=None)
        above = min([x for x in (above, over.min() if over.size else None) if x is not None], default=None)
        if ok.any():
            g, d = grid[ok], dev[ok]
            u = np.round(np.abs(g - centre).sum(1), 9)
            i = np.lexsort(tuple(g[:, ::-1].T) + (d, u))[0]
            best = g[i]
            if w >= math.ceil(u[i]):
                break
        if (lo == 0).all() and (hi == sizes).all():
            break
        w += 1
    return best, below, above


def _spread(size: int, k: int, phase: float) -> list[int]:
    """k of ``size`` positions, evenly spaced (a fraction ``phase`` of one spacing in)."""
    return [int(math.floor((j + phase) * size / k)) for j in range(k)]


def _vera_scaling_message(o, r) -> str:
    return (f"vera scaling alpha / r = {o.alpha:g} / {r} = {o.scaling:.3g}: the shared bases are Kaiming-"
            f"scaled, so B diag(d) A has the same size for every r and this update is {1 / o.scaling:.0f}x "
            f"smaller than VeRA's own (scaling 1; the RandLoRA paper's 1 / r goes with unit-variance "
            f"bases); at budgets that raise r it shrinks further (see docs/budgets.md: on the digits ViT "
            f"such a run equals training the head alone). Leave alpha unset for scaling 1")


def scaling_warnings(method: str, options: dict) -> list[str]:
    """The ``ScalingWarning`` messages of an adapter whose rank was set directly (``inject``'s options):
    VeRA with scaling alpha / r below ``VERA_SMALL_SCALING``. (``match_budget`` gives these and the
    budget-specific ones, such as RandLoRA matched to r = 1 with a fixed alpha, in ``BudgetMatch.warnings``.)"""
    if method != "vera":
        return []
    o = get_method(method).resolve({k: v for k, v in options.items() if k not in COMMON})
    return [_vera_scaling_message(o, o.r)] if o.scaling < VERA_SMALL_SCALING else []


def _degenerate(spec, method, targets, ranks, opts_at, counts, fixed_alpha=True) -> list[tuple[type, str]]:
    """(warning class, message) for the regimes where matching parameters compares something unexpected."""
    out = []
    big = [t for t, c in zip(targets, counts) if c >= t.out_features * t.in_features]
    if big:
        t = big[0]
        out.append((BudgetWarning,
                    f"{method}: {len(big)} of {len(targets)} layers train at least as many adapter parameters as "
                    f"their weight has (e.g. {t.name}: {counts[targets.index(t)]:,} >= {t.out_features} x "
                    f"{t.in_features}); at this budget the comparison is with full fine-tuning, not a parameter-"
                    f"efficient regime"))
    if method == "randlora":
        ones = [t.name for t in targets if ranks[t.name] == 1]
        if ones:
            msg = (f"randlora at r=1 on {len(ones)} of {len(targets)} layers (e.g. {ones[0]}): n = min(out, in) "
                   f"rank-1 bases per layer, each lambda_j a single number redundant with gamma_j")
            a = opts_at(1).alpha
            kind = BudgetWarning
            if fixed_alpha and a != opts_at(2).alpha / 2:
                kind = ScalingWarning
                msg += (f"; the scaling alpha / r = {a:g} is r times what alpha={a:g} gives at rank r, and the update "
                        f"per step grows with it (docs/budgets.md: on the digits ViT the update reached 3.6x the "
                        f"weights and accuracy collapsed at alpha=10); pass scaling= (e.g. the paper's 10 / 6) to "
                        f"keep alpha / r fixed across budgets, or lower the budget for r >= 2")
            out.append((kind, msg))
    if method == "vera":
        r = next(iter(ranks.values()))
        o = opts_at(r)
        cap = max(min(t.out_features, t.in_features) for t in targets)
        if r > cap:
            out.append((BudgetWarning,
                        f"vera r={r} exceeds min(out, in) of every target (at most {cap}): dW = s diag(b) B diag(d) A "
                        f"has rank <= min(out, in) whatever r, so this budget buys {r - cap} more entries of d per "
                        f"layer, not rank: a VeRA curve over such budgets is expected to be flat"))
        if o.scaling < VERA_SMALL_SCALING:
            out.append((ScalingWarning, _vera_scaling_message(o, r)))
    if method == "nola":
        k = next(iter(ranks.values()))
        o = opts_at(k)
        cap = max(o.r * max(t.out_features, t.in_features) for t in targets)
        if k > cap:
            out.append((BudgetWarning,
                        f"nola k={k} exceeds r * max(out, in) = {cap} on every target: k bases of one side span at "
                        f"most that many dimensions, so the extra coefficients add nothing the others cannot express"))
    return out


def match_budget(model: nn.Module, method: str, budget: float, *, tolerance: float = 0.02,
                 scaling: float | None = None, **options) -> BudgetMatch:
    """The adapter of ``method`` on ``options['target_modules']`` whose parameter count is within
    ``tolerance`` (relative) of ``budget``, as inject's keyword arguments (see ``BudgetMatch``).

    The count covers the adapter parameters of the targets (``trainable_modules`` such as a head
    are the same for every method and are not part of it). Counting is arithmetic on the targets'
    shapes: the model is not touched and may live on the meta device; on a model that already
    carries an adapter it counts on the adapted layers' base shapes.

    The most uniform assignment that meets the budget wins:

    1. one value of the method's knob (``Method.knob``: the rank r; NoLA's k) on every layer, the
       one whose count is nearest the budget, if it is within tolerance;
    2. otherwise, for methods that allow a per-layer rank (``Method.per_layer``: LoRA, DoRA,
       RandLoRA), that rank r on most layers and a neighbouring rank r' on a subset (given as
       ``layer_options``), the same fraction of every group of same-count layers as far as the
       budget allows, spread evenly over depth; r' is the rank nearest r whose count lies on the
       other side of the budget (r + 1 for LoRA and DoRA; RandLoRA's count n (r + m) with
       n = ceil(m / r) falls as r grows and is not monotone, so r' may be r - 1 or r + 1).
       Where the caller left ``alpha`` unset and the method's default alpha follows r (LoRA, DoRA:
       alpha = r), the r' layers get their own default alpha too, so the scaling stays the
       method's default on every layer.
    3. VeRA's r and NoLA's k add one parameter per layer (two for NoLA) per unit: one global value
       is already fine-grained. DoRA-DR allows no per-layer rank (its schedule redistributes rank
       across layers itself), so only a single r is considered.

    ``scaling``: keep the method's scaling s = alpha / r fixed at this value on every layer whatever
    rank the budget gives (alpha = scaling x r, per layer; DoRA-DR: x its start rank; RandLoRA's
    optional 1 / sqrt(n) still multiplies on top). A sweep over budgets then compares the same
    update size per step at every budget (docs/budgets.md); with a fixed ``alpha`` instead, s moves
    as 1 / r (RandLoRA at alpha = 10: s = 10 at r = 1, 0.63 at r = 16).

    A budget that none of these meets within ``tolerance`` is refused with the nearest reachable
    counts. Degenerate regimes (``_degenerate``) are returned in ``warnings`` and issued as
    ``BudgetWarning``, those of the scaling as its subclass ``ScalingWarning`` (``warning_categories``).
    """
    if method == "full":
        raise _err("method 'full' trains every parameter and has no rank to match a budget; "
                   "drop adapter.budget for full fine-tuning")
    if not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0
            and math.isfinite(budget)):
        raise _err(f"budget must be a positive number of parameters, got {budget!r}")
    if not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and 0 <= tolerance < 1):
        raise _err(f"tolerance must be a fraction in [0, 1) (0.02: within 2 %), got {tolerance!r}")
    spec = get_method(method)
    knob = spec.knob
    if knob in options:
        raise _err(f"match_budget chooses {knob} itself; drop {knob}={options[knob]!r} from its options")
    if "layer_options" in options:
        raise _err("match_budget chooses layer_options itself; drop layer_options from its options")
    if scaling is not None:
        if not (isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling > 0
                and math.isfinite(scaling)):
            raise _err(f"scaling must be a positive number (alpha / r on every layer), got {scaling!r}")
        if options.get("alpha") is not None:
            raise _err(f"give alpha or scaling, not both: scaling={scaling!r} sets alpha = scaling x r on every layer")
    targets, options["target_modules"] = _budget_targets(model, options.get("target_modules"))
    method_opts = {k: v for k, v in options.items() if k not in COMMON}
    base = spec.resolve({**method_opts, knob: 1})  # option names and values checked here, once

    def opts_at(v):
        """The options at knob value v (alpha = scaling x r when ``scaling`` is given)."""
        o = spec.resolve({**method_opts, knob: v})
        if scaling is None:
            return o
        return spec.resolve({**method_opts, knob: v, "alpha": scaling * o.alpha / o.scaling})

    def layer_count(shape, v):
        o = copy.copy(base)
        setattr(o, knob, v)  # the count reads only shapes and the knob: no re-validation needed
        return spec.num_trainable(shape[0], shape[1], o)

    limit = spec.knob_max or min(min(t.out_features, t.in_features) for t in targets)
    shapes = Counter((t.out_features, t.in_features) for t in targets)
    per_shape = {s: np.array([layer_count(s, v) for v in range(1, limit + 1)], dtype=np.int64) for s in shapes}
    totals = sum(per_shape[s] * n for s, n in shapes.items())  # totals[v - 1]
    slack = tolerance * budget
    values = np.arange(1, limit + 1)

    def desc(v):
        return f"{knob}={v} on all {len(targets)} layers"

    def reach_single():
        below = values[totals <= budget]
        above = values[totals >= budget]
        pick = []
        if below.size:
            v = int(below[np.argmax(totals[below - 1])])
            pick.append((int(totals[v - 1]), desc(v)))
        if above.size:
            v = int(above[np.argmin(totals[above - 1])])
            pick.append((int(totals[v - 1]), desc(v)))
        return pick

    lo_v, hi_v = int(values[np.argmin(totals)]), int(values[np.argmax(totals)])
    if totals.max() < budget - slack:
        raise _refuse(method, budget, tolerance, [(int(totals.max()), desc(hi_v))],
                      f"budget {budget:,.0f} is above the largest {method} adapter on these targets "
                      f"({int(totals.max()):,} parameters)", "Lower the budget or target more layers")
    if totals.min() > budget + slack:
        raise _refuse(method, budget, tolerance, [(int(totals.min()), desc(lo_v))],
                      f"budget {budget:,.0f} is below the smallest {method} adapter on these targets "
                      f"({int(totals.min()):,} parameters)", "Raise the budget or target fewer layers")

    dev = np.abs(totals - budget)
    single = int(values[np.lexsort((values, dev))[0]])
    ranks = {t.name: single for t in targets}
    layer_opts: dict = {}
    if dev[single - 1] > slack:
        if knob != "r" or "r" not in spec.per_layer:
            raise _refuse(method, budget, tolerance, reach_single(),
                          f"budget {budget:,.0f} cannot be met within {100 * tolerance:g} % by {method} on these "
                          f"targets: one {knob} for every layer moves the count in steps, and {method} allows no "
                          f"per-layer {knob}")
        ranks, layer_opts = _mix(targets, single, totals, per_shape, values, budget, slack, method, tolerance,
                                 reach_single)
        if options.get("alpha") is None:  # alpha follows r (a default of r, or scaling x r): per layer too
            for lo in layer_opts.values():
                a = opts_at(lo["r"]).alpha
                if a != opts_at(single).alpha:
                    lo["alpha"] = a
    counts = [int(per_shape[(t.out_features, t.in_features)][ranks[t.name] - 1]) for t in targets]
    result = {**options, knob: single}
    if scaling is not None:
        result["alpha"] = opts_at(single).alpha
    if layer_opts:
        result["layer_options"] = layer_opts
    found = _degenerate(spec, method, targets, ranks, opts_at, counts, fixed_alpha=scaling is None)
    for kind, m in found:
        warnings.warn(m, kind, stacklevel=2)
    return BudgetMatch(method=method, budget=float(budget), trainable=sum(counts), tolerance=float(tolerance),
                       knob=knob, options=result, ranks=ranks, warnings=tuple(m for _, m in found),
                       warning_categories=tuple(k.__name__ for k, _ in found))


def _mix(targets, ra, totals, per_shape, values, budget, slack, method, tolerance, reach_single):
    """Rank ``ra`` on most layers and a neighbouring rank on an evenly spread subset (see
    ``match_budget``, step 2). Returns ({layer: r}, layer_options)."""
    ta = int(totals[ra - 1])
    others = [int(v) for v in values if (int(totals[v - 1]) - budget) * (ta - budget) < 0]
    others.sort(key=lambda v: (abs(v - ra), abs((budget - ta) / (int(totals[v - 1]) - ta)), v))
    near = []
    for rb in others[:8]:
        tb = int(totals[rb - 1])
        frac = (budget - ta) / (tb - ta)
        # groups of layers whose counts at (ra, rb) are equal, in module order of their first layer
        groups: dict = {}
        for idx, t in enumerate(targets):
            s = (t.out_features, t.in_features)
            key = (int(per_shape[s][ra - 1]), int(per_shape[s][rb - 1]))
            groups.setdefault(key, []).append(idx)
        keys = list(groups)
        moving = [k for k in keys if k[1] != k[0]]
        k_best, below, above = _search_mix([len(groups[k]) for k in moving], [k[1] - k[0] for k in moving],
                                           [frac * len(groups[k]) for k in moving], budget - ta, slack)
        if below is not None:
            near.append((ta + int(below), f"r={ra} with some layers at r={rb}"))
        if above is not None:
            near.append((ta + int(above), f"r={ra} with some layers at r={rb}"))
        if k_best is None:
            continue
        take = dict(zip(moving, (int(x) for x in k_best)))
        ranks = {t.name: ra for t in targets}
        layer_opts = {}
        for gi, key in enumerate(keys):
            # one layer type after another (``blocks.#.attn.qkv`` ...), each in depth order, so that an even
            # spread over the group is an even spread over depth within every type
            members = sorted(groups[key], key=lambda i: (re.sub(r"\d+", "#", targets[i].name), i))
            k = take.get(key, int(round(frac * len(members))))
            for p in _spread(len(members), k, (gi + 0.5) / len(keys)) if k else []:
                name = targets[members[p]].name
                ranks[name] = rb
                layer_opts[name] = {"r": rb}
        return ranks, layer_opts
    seen = set(near) | set(reach_single())
    below = [x for x in seen if x[0] <= budget]
    above = [x for x in seen if x[0] >= budget]
    best = ([max(below)] if below else []) + ([min(above)] if above else [])
    raise _refuse(method, budget, tolerance, best,
                  f"budget {budget:,.0f} cannot be met within {100 * tolerance:g} % by {method} on these targets: "
                  f"no mix of r={ra} with a neighbouring r on some layers reaches it")
