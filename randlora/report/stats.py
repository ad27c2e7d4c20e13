"""Statistics over seeds and datasets: means, 95 % intervals, paired comparisons with a baseline.

* Over the seeds of one configuration: mean, sample standard deviation (ddof=1) and the 95 % t-interval
  mean +- t(0.975, n-1) s / sqrt(n). With one seed there is neither (None): the report says "n=1".
* Against a baseline method: pairs of configurations on the same (model, data regime, dataset, size
  setting); the size setting pairs with the baseline's own when it has it (a budget sweep), else with the
  baseline's only setting on that dataset (LoRA-32 vs RandLoRA-6, the paper's tables). Per method:
  wins / ties / losses (a tie: |difference| <= ``tie``), the mean difference with its 95 % t-interval,
  and a paired test: Wilcoxon signed-rank for n >= 6 pairs, the paired t-test for 2-5 pairs (the sign
  test when every difference is the same, where t is undefined), none for one pair.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

from ..results import report_fields
from .collect import num
from .keys import config_key, label, method_rank, minimal_variants, regime, setting, setting_label

DEFAULT_METRIC = "test/acc"
CONFIDENCE = 0.95
WILCOXON_MIN_PAIRS = 6


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not len(values):
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """The two-sided t-interval of the mean; (None, None) for fewer than two values."""
    vals = np.asarray([v for v in values if v is not None], dtype=float)
    if vals.size < 2:
        return None, None
    from scipy import stats
    m, s = float(vals.mean()), float(vals.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, vals.size - 1)) * s / math.sqrt(vals.size)
    return m - half, m + half


def higher_is_better(metric: str) -> bool:
    name = metric.rsplit("/", 1)[-1].lower()
    return not any(w in name for w in ("loss", "error", "perplexity", "ppl", "time", "memory"))


def paired_test(diffs: Sequence[float]) -> dict:
    """The paired test of the differences ``diffs`` (other - baseline) against 0.

    Returns ``{"test": "wilcoxon" | "t" | "sign" | None, "statistic", "p", "note"}``."""
    from scipy import stats
    d = np.asarray(diffs, dtype=float)
    n = d.size
    if n < 2:
        return {"test": None, "statistic": None, "p": None, "note": f"{n} pair{'s' if n != 1 else ''}: no test"}
    if not np.any(d):
        return {"test": None, "statistic": None, "p": 1.0, "note": "every difference is 0"}
    if n >= WILCOXON_MIN_PAIRS:
        res = stats.wilcoxon(d)
        return {"test": "wilcoxon", "statistic": float(res.statistic), "p": float(res.pvalue), "note": ""}
    if np.all(d == d[0]):  # no spread: t is undefined; the sign test still counts the directions
        pos, neg = int((d > 0).sum()), int((d < 0).sum())
        res = stats.binomtest(pos, pos + neg, 0.5)
        return {"test": "sign", "statistic": float(pos), "p": float(res.pvalue), "note": "all differences equal"}
    res = stats.ttest_1samp(d, 0.0)
    return {"test": "t", "statistic": float(res.statistic), "p": float(res.pvalue), "note": ""}


def compare(pairs: Sequence[tuple[float, float]], tie: float = 0.0, higher: bool = True) -> dict:
    """Wins / ties / losses, mean difference with its 95 % interval and the paired test of
    ``pairs`` = [(baseline, other), ...]; a win is other better than baseline by more than ``tie``."""
    d = np.asarray([o - b for b, o in pairs], dtype=float)
    sign = 1.0 if higher else -1.0
    wins = int((sign * d > tie).sum())
    losses = int((sign * d < -tie).sum())
    lo, hi = t_interval(d.tolist())
    return {"n": int(d.size), "wins": wins, "ties": int(d.size) - wins - losses, "losses": losses,
            "mean_diff": float(d.mean()) if d.size else None, "ci_low": lo, "ci_high": hi, **paired_test(d)}


def common(values: Iterable[Any]) -> Any:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return Counter(vals).most_common(1)[0][0]


def _mean(values: Iterable[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _max(values: Iterable[Any]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(max(vals)) if vals else None


AGGREGATES = {"common": common, "mean": _mean, "max": _max}


def _seed_sort_key(seed: Any) -> tuple:
    v = num(seed)
    return (0, v, "") if v is not None else (1, 0.0, str(seed))


def aggregated_columns() -> list[str]:
    """The report columns the schema says how to combine over seeds (``Field.aggregate``)."""
    return [f.column for _, f in report_fields() if f.aggregate]


def summarize(rows: Sequence[dict], metric: str = DEFAULT_METRIC) -> list[dict]:
    """One dict per configuration of the completed rows: ``metric`` over seeds.

    Keys: method, variant (the overrides that make it its own experiment), shown_variant (the part of
    it that differs between the configurations of its model), label, model, dataset, task, shots, fraction, r,
    budget, metric, mean, std, ci_low / ci_high (95 % t-interval; None for one seed), n_seeds (runs
    with the metric), seeds, n_runs, the schema's aggregated columns (trainable, step_time_s,
    peak_memory_mb, lr, budget_deviation ...: the most common value, the mean or the max over seeds,
    as ``randlora.results`` says), sweeps, run_dirs, values (``[(seed, value), ...]``) and
    duplicate_seeds (seeds seen more than once in this configuration)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "completed":
            groups[config_key(row)].append(row)
    by_model: dict[str, list[str]] = defaultdict(list)
    for k in groups:
        by_model[k[1]].append(k[5])
    shown_in = {m: minimal_variants(vs) for m, vs in by_model.items()}  # labels compare within a model
    out = []
    for key, runs in groups.items():
        shown = shown_in[key[1]]
        values = [(r.get("seed"), r["metrics"][metric]) for r in runs if metric in r.get("metrics", {})]
        mean, std = mean_std([v for _, v in values])
        lo, hi = t_interval([v for _, v in values])
        seed_counts = Counter(str(r.get("seed")) for r in runs)
        rs = sorted({r["r"] for r in runs if r.get("r") is not None})
        first = runs[0]
        s = {"method": first.get("method"), "variant": key[5], "shown_variant": shown[key[5]],
             "label": label(first.get("method"), shown[key[5]]), "model": first.get("model"),
             "dataset": first.get("dataset"), "task": common(r.get("task") for r in runs),
             "shots": first.get("shots"), "fraction": None if first.get("shots") is not None else regime(first)[1],
             "r": rs[0] if len(rs) == 1 else ("/".join(str(x) for x in rs) if rs else None),
             "budget": first.get("budget"), "metric": metric, "mean": mean, "std": std, "ci_low": lo, "ci_high": hi,
             "n_seeds": len(values), "seeds": sorted((r.get("seed") for r in runs), key=_seed_sort_key),
             "n_runs": len(runs)}
        for _, f in report_fields():
            if f.aggregate:
                s[f.column] = AGGREGATES[f.aggregate](r.get(f.column) for r in runs)
        s.update(sweeps=sorted({str(r["sweep"]) for r in runs if r.get("sweep") is not None}),
                 run_dirs=[r.get("run_dir") for r in runs], values=values,
                 duplicate_seeds=sorted(k for k, c in seed_counts.items() if c > 1),
                 tasks=next((r["tasks"] for r in runs if r.get("tasks")), None), _key=key)
        out.append(s)
    out.sort(key=lambda s: (str(s["model"]), str(s["dataset"]), s["_key"][4], method_rank(s["method"]),
                            s["shown_variant"], s["trainable"] if s["trainable"] is not None else -1, s["_key"][3]))
    for s in out:
        del s["_key"]
    return out


def pivot(summary: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """Method x dataset table of mean metric, one row per (model, regime, method, variant, setting).

    Returns ``(datasets, rows)``: each row has one key per dataset (mean, or None), ``average`` (mean
    over the datasets present) and ``n_datasets``."""
    datasets = sorted({str(s["dataset"]) for s in summary})
    rows: dict[tuple, dict] = {}
    for s in summary:
        k = (str(s["model"]), regime(s), method_rank(s["method"]), s["shown_variant"], setting(s))
        row = rows.setdefault(k, {"model": s["model"], "shots": s["shots"], "fraction": s["fraction"],
                                  "method": s["method"], "label": s["label"], "r": s["r"], "budget": s["budget"],
                                  "setting": setting_label(s), **{d: None for d in datasets}})
        row[str(s["dataset"])] = s["mean"]
    out = []
    for k in sorted(rows):
        row = rows[k]
        vals = [row[d] for d in datasets if row[d] is not None]
        row["average"] = float(np.mean(vals)) if vals else None
        row["n_datasets"] = len(vals)
        out.append(row)
    return datasets, out


def seed_average(entries: Sequence[dict]) -> dict:
    """Average over datasets, spread over seeds: per-seed averages over the entries' datasets (the
    seeds every entry has), then their mean, std and 95 % interval; the mean of means (no spread) when
    no seed is common. Returns {"mean", "std", "ci_low", "ci_high", "n_seeds"}."""
    per_seed = [dict((str(s), v) for s, v in e["values"]) for e in entries]
    shared = set(per_seed[0]).intersection(*per_seed[1:]) if per_seed else set()
    if shared:
        avgs = [float(np.mean([d[s] for d in per_seed])) for s in sorted(shared)]
        mean, std = mean_std(avgs)
        lo, hi = t_interval(avgs)
        return {"mean": mean, "std": std, "ci_low": lo, "ci_high": hi, "n_seeds": len(avgs)}
    means = [e["mean"] for e in entries if e["mean"] is not None]
    return {"mean": float(np.mean(means)) if means else None, "std": None, "ci_low": None, "ci_high": None,
            "n_seeds": 0}


def _pairing(summary: Sequence[dict], baseline: str) -> dict:
    """{(model, regime): {"base": {(dataset, setting): config}, "others": {(method, shown variant):
    {(dataset, setting): config}}}} of the configurations with a mean."""
    groups: dict = defaultdict(lambda: {"base": {}, "others": defaultdict(dict), "base_variants": Counter()})
    for s in summary:
        if s["mean"] is None:
            continue
        g = groups[(str(s["model"]), regime(s))]
        if s["method"] == baseline:
            g["base_variants"][s["shown_variant"]] += 1
    for s in summary:
        if s["mean"] is None:
            continue
        g = groups[(str(s["model"]), regime(s))]
        main = g["base_variants"].most_common(1)[0][0] if g["base_variants"] else None
        unit = (str(s["dataset"]), setting(s))
        if s["method"] == baseline and s["shown_variant"] == main:
            g["base"][unit] = s
        else:
            g["others"][(str(s["method"]), s["shown_variant"])][unit] = s
    return groups


def compare_to_baseline(summary: Sequence[dict], baseline: str = "lora", tie: float | None = None) -> list[dict]:
    """One comparison per (model, regime, method, variant) against ``baseline`` (see the module
    docstring; ``n`` = 0 where no configuration of the method could be paired): the ``compare`` dict plus model, regime, method, shown_variant, label, datasets,
    settings, unpaired (configurations without a baseline to pair with) and the pairs
    ``[(dataset, setting label, baseline config, other config), ...]``.

    ``tie``: the largest |difference| counted as a tie, in the metric's units (default: 0.0005, a tie
    when the difference rounds to 0.0 in percent with one decimal for accuracies, 0 otherwise)."""
    out = []
    for (model, reg), g in sorted(_pairing(summary, baseline).items()):
        if not g["base"]:
            continue
        metric = next(iter(g["base"].values()))["metric"]
        higher = higher_is_better(metric)
        t = tie if tie is not None else (0.0005 if "acc" in metric.rsplit("/", 1)[-1] else 0.0)
        base_settings: dict[str, list] = defaultdict(list)
        for ds, st in g["base"]:
            base_settings[ds].append(st)
        for (method, shown), configs in sorted(g["others"].items(), key=lambda kv: (method_rank(kv[0][0]), kv[0][1])):
            pairs, unpaired = [], []
            for (ds, st), s in sorted(configs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
                if (ds, st) in g["base"]:
                    b = g["base"][(ds, st)]
                elif len(base_settings.get(ds, [])) == 1:
                    b = g["base"][(ds, base_settings[ds][0])]
                else:
                    unpaired.append(s)
                    continue
                pairs.append((ds, setting_label(s), b, s))
            res = compare([(b["mean"], s["mean"]) for _, _, b, s in pairs], tie=t, higher=higher) if pairs else {
                "n": 0, "wins": 0, "ties": 0, "losses": 0, "mean_diff": None, "ci_low": None, "ci_high": None,
                "test": None, "statistic": None, "p": None, "note": "no pair"}
            out.append({"model": model, "regime": reg, "method": method, "shown_variant": shown,
                        "label": label(method, shown), "baseline": baseline, "metric": metric,
                        "datasets": sorted({p[0] for p in pairs}), "settings": sorted({p[1] for p in pairs}),
                        "unpaired": unpaired, "pairs": pairs, "tie": t, **res})
    return out


def seed_pairs(base: dict, other: dict) -> list[tuple[float, float]]:
    """(baseline, other) values of the seeds both configurations ran (the same seed: the same data order
    and head initialisation)."""
    b = {str(k): v for k, v in base["values"]}
    return [(b[str(k)], v) for k, v in other["values"] if str(k) in b]
