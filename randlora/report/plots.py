"""Figures sized for a paper: 3.3 in wide (one column) for one panel, 6.8 in (two columns) for more,
PNG at 300 dpi and PDF, one legend outside the panels, model / dataset / data regime in each title.

* accuracy vs trainable parameters, vs step time, vs peak memory: one line per method (and variant)
  through its sizes, error bars +- one standard deviation over seeds (methods at one budget set apart
  by at most 2 % on the x axis); a panel per (model, data regime): the
  average over datasets (configurations present on every dataset) when there are several, else the
  dataset; the per-dataset panels in a second figure (``*_per_dataset``);
* accuracy vs training data (k-shot, then fractions of the training set), per model.

Log axes carry a labelled tick at 1, 2 and 5 x each power of ten (every integer multiple where the range
is narrower), so 4e3-8e4 reads 5K, 10K, 20K, 50K; a range under 3x is drawn linear.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

from .keys import DISPLAY, display_method, human, method_rank, regime, regime_label, regime_of, setting, setting_label
from .stats import seed_average
from .tables import is_fraction_metric

SINGLE_COLUMN_IN = 3.3
DOUBLE_COLUMN_IN = 6.8
DPI = 300
STYLE = {"font.size": 7.5, "axes.titlesize": 7.5, "axes.labelsize": 7.5, "xtick.labelsize": 6.5,
         "ytick.labelsize": 6.5, "legend.fontsize": 6.5, "lines.linewidth": 1.1, "lines.markersize": 3.5,
         "axes.linewidth": 0.6, "grid.linewidth": 0.4, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
         "errorbar.capsize": 2, "pdf.fonttype": 42, "savefig.dpi": DPI}
MARKERS = "osD^v<>pX"


# -------------------------------------------------------------------------------------------- axes
def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over [lo, hi]: 1-2-5 per decade, or every multiple 1..9 when that
    gives fewer than three, or the decades when 1-2-5 gives more than eight."""
    if not (lo > 0 and hi > lo):
        return []
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    best: list[float] = []
    for subs in ((1, 2, 5), tuple(range(1, 10)), (1,)):
        ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in subs]
        ticks = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
        if 3 <= len(ticks) <= 8:
            return ticks
        if len(ticks) > len(best) and (not best or len(best) < 3):
            best = ticks
    return best


def tick_label(v: float, counts: bool = True) -> str:
    """5K, 20K, 1.5M for counts (``counts``); 0.5, 2, 40, 2000 otherwise."""
    if counts and abs(v) >= 1000:
        return human(v).replace(".0K", "K").replace(".0M", "M")
    return f"{v:g}"


def set_axis(ax, values: Sequence[float], which: str = "x", counts: bool = True) -> None:
    """Log scale with readable ticks when the values span 3x or more, else linear with padding."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    lim = ax.set_xlim if which == "x" else ax.set_ylim
    vals = [v for v in values if v is not None and v > 0]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    if hi / lo >= 3:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        pad = (hi / lo) ** 0.06
        lo, hi = lo / pad, hi * pad
        lim(lo, hi)
        axis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v, counts)))
        axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
        axis.set_minor_formatter(NullFormatter())
    else:
        # at least +-10 % around the middle: near-equal values (matched budgets) are not magnified
        mid = (hi + lo) / 2
        span = max(hi - lo, 0.2 * abs(mid)) or 1.0
        lim(mid - 0.62 * span, mid + 0.62 * span)
        axis.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v, counts)))


# -------------------------------------------------------------------------------------------- figures
def new_figure(n_panels: int, height: float | None = None):
    """A figure of ``n_panels`` panels: one column wide for one, two columns wide (2-3 per row) for
    more; the Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(1, n_panels)
    ncols = 1 if n == 1 else (2 if n in (2, 4) else 3)
    nrows = math.ceil(n / ncols)
    width = SINGLE_COLUMN_IN if ncols == 1 else DOUBLE_COLUMN_IN
    panel_h = height or (2.4 if ncols == 1 else 2.1)
    fig = Figure(figsize=(width, panel_h * nrows + 0.45), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def method_styles(entries: Sequence[dict]) -> dict[str, dict]:
    """One colour per method, fixed by its place in the adapter registry (tab10), so a method has the
    same colour in every panel, figure and report."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {str(e["method"]): {"color": cmap(method_rank(e["method"])[0] % 10)} for e in entries}


def save(fig, path: Path) -> list[Path]:
    """``path`` (.png, 300 dpi) and the same figure as .pdf; the paths written."""
    from matplotlib import rc_context

    pdf = path.with_suffix(".pdf")
    with rc_context(STYLE):
        fig.savefig(path, dpi=DPI)
        fig.savefig(pdf)
    return [path, pdf]


def _legend(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    by_name = {v: k for k, v in DISPLAY.items()}

    def order(lab: str) -> tuple:  # the registry's order, whichever panel drew the method first
        name = lab.split(" [")[0].split(" (")[0]
        return method_rank(by_name.get(name, name)), lab
    labels.sort(key=order)
    if labels:
        # as many columns as fit the figure's width (about 0.05 in per character at 6.5 pt, 0.45 in of handle)
        entry = 0.45 + 0.05 * max(len(lab) for lab in labels)
        ncols = max(1, min(len(labels), 4, int(fig.get_size_inches()[0] / entry)))
        fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center",
                   ncols=ncols, frameon=False, handlelength=1.8, columnspacing=1.2)


def panel_title(model: str | None, dataset: str, reg: tuple | None) -> str:
    parts = ([model] if model else []) + [dataset] + ([regime_label(regime_of(reg))] if reg is not None else [])
    return " · ".join(parts)


def set_titles(fig, axes, keys: Sequence[tuple]) -> None:
    """Each panel titled model · dataset · regime; when several panels share one model, the model is
    the figure's title and the panels name the rest (long titles overran two-column panels)."""
    models = {k[0] for k in keys}
    if len(keys) > 1 and len(models) == 1:
        fig.suptitle(next(iter(models)), fontsize=STYLE["axes.titlesize"] + 0.5)
        for ax, k in zip(axes, keys):
            ax.set_title(panel_title(None, k[1], k[2]))
    else:
        for ax, k in zip(axes, keys):
            ax.set_title(panel_title(*k))


def _line_key(s: dict) -> tuple:
    return (method_rank(s["method"]), s["shown_variant"])


def _line_label(s: dict) -> str:
    name = display_method(s["method"])
    return name + (f" [{s['shown_variant']}]" if s["shown_variant"] else "")


def _averaged(configs: Sequence[dict], n_datasets: int) -> list[dict]:
    """Configurations present on every one of ``n_datasets`` datasets, averaged over them."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for s in configs:
        by[(str(s["method"]), s["shown_variant"], setting(s))].append(s)
    out = []
    for entries in by.values():
        if len(entries) != n_datasets:
            continue
        avg = dict(entries[0], **seed_average(entries))
        for k in ("trainable", "step_time_s", "peak_memory_mb"):
            vals = [e[k] for e in entries if e.get(k) is not None]
            avg[k] = sum(vals) / len(vals) if vals else None
        out.append(avg)
    return out


def _panels(summary: Sequence[dict], x: str, per_dataset: bool) -> list[tuple[tuple, list[dict]]]:
    """((model, dataset, regime), configurations) per panel: per (model, regime) the average over datasets (several) or the
    dataset (one); with ``per_dataset``, one panel per (model, regime, dataset) instead (several only)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in summary:
        if s["mean"] is not None and s.get(x) is not None:
            groups[(str(s["model"]), regime(s))].append(s)
    out = []
    for (model, reg), configs in sorted(groups.items()):
        datasets = sorted({str(s["dataset"]) for s in configs})
        if per_dataset:
            if len(datasets) > 1:
                out += [((model, ds, reg), [s for s in configs if str(s["dataset"]) == ds])
                        for ds in datasets]
        elif len(datasets) == 1:
            out.append(((model, datasets[0], reg), configs))
        else:
            avg = _averaged(configs, len(datasets))
            if avg:
                out.append(((model, f"mean of {len(datasets)} datasets", reg), avg))
    return out


def metric_label(metric: str, pct: bool) -> str:
    """``test/acc`` -> "test accuracy (%)"; other metrics as they are named."""
    stage, _, name = metric.rpartition("/")
    words = {"acc": "accuracy", "ll_acc": "log-likelihood accuracy", "loss": "loss"}
    stage = {"val": "validation"}.get(stage, stage)
    text = f"{stage} {words[name]}".strip() if name in words else metric
    return text + (" (%)" if pct else "")


def _x_unit(x: str, configs: Sequence[dict]) -> tuple[float, str]:
    """(scale, axis label) of a column: step times in ms, or in s when a step takes a second or more."""
    if x == "step_time_s":
        slow = max((s[x] for s in configs if s.get(x) is not None), default=0) >= 1.0
        return (1.0, "step time (s, median over steps)") if slow else (1000.0, "step time (ms, median over steps)")
    return 1.0, XLABEL.get(x, x)


XLABEL = {"trainable": "trainable parameters", "step_time_s": "step time (ms, median over steps)",
          "peak_memory_mb": "peak memory (MB)"}


def _informative(x: str, configs: Sequence[dict]) -> bool:
    """A parameters panel says something when a method has two sizes or the counts differ by 1.5x;
    at one budget every point sits at the same x. Time and memory always differ in a useful way."""
    if x != "trainable":
        return True
    sizes: dict[tuple, set] = defaultdict(set)
    for s in configs:
        sizes[_line_key(s)].add(setting(s))
    xs = [s[x] for s in configs if s["method"] != "full"]
    return any(len(v) > 1 for v in sizes.values()) or (bool(xs) and max(xs) >= 1.5 * min(xs))


def _errors(es: Sequence[dict], scale: float) -> list[float]:
    """+- one standard deviation over seeds (0 for one seed). The 95 % intervals are in the tables: with
    two or three seeds t(0.975) is 12.7 or 4.3, and such bars hid the curves."""
    return [(e["std"] or 0.0) * scale for e in es]


def _dodge(n: int, i: int) -> float:
    """The factor that sets the i-th of n methods apart at one x on a log axis (+-2 % at most), so
    error bars at equal budgets do not cover each other."""
    return 10 ** (0.009 * (i - (n - 1) / 2)) if n > 1 else 1.0


def metric_vs_figure(summary: Sequence[dict], x: str, metric: str, per_dataset: bool = False,
                     max_panels: int = 24):
    """The figure of ``metric`` against ``x`` (a summary column: trainable, step_time_s,
    peak_memory_mb), or None when there is nothing to plot. Against trainable parameters, full
    fine-tuning is a horizontal line (its count, orders of magnitude above the adapters', is named in
    the legend)."""
    panels = [p for p in _panels(summary, x, per_dataset) if _informative(x, p[1])][:max_panels]
    if not panels:
        return None
    from matplotlib import rc_context

    pct = is_fraction_metric(metric, summary)
    scale = 100.0 if pct else 1.0
    xs, xlabel = _x_unit(x, [c for _, cs in panels for c in cs])
    styles = method_styles(summary)
    with rc_context(STYLE):
        fig, axes = new_figure(len(panels))
        for ax, (_, configs) in zip(axes, panels):
            lines: dict[tuple, list[dict]] = defaultdict(list)
            for s in configs:
                lines[_line_key(s)].append(s)
            variants: dict[int, list[str]] = defaultdict(list)
            for rank, shown in sorted(lines):
                variants[rank].append(shown)
            drawn = []
            for key in sorted(lines):
                es = sorted(lines[key], key=lambda e: (e.get("trainable") or 0, setting(e)))
                first = es[0]
                color = styles[str(first["method"])]["color"]
                style = "-" if not key[1] else (0, (4, 1.5))
                if x == "trainable" and first["method"] == "full":
                    for e in es:
                        y = e["mean"] * scale
                        ax.axhline(y, color=color, linestyle=(0, (5, 2)), linewidth=0.9,
                                   label=f"{_line_label(e)} ({human(e['trainable'])} params)")
                        if e.get("std"):
                            ax.axhspan((e["mean"] - e["std"]) * scale, (e["mean"] + e["std"]) * scale, color=color,
                                       alpha=0.12, lw=0)
                    continue
                drawn += es
                shift = _dodge(len(lines), sorted(lines).index(key)) if x == "trainable" else 1.0
                ax.errorbar([e[x] * xs * shift for e in es], [e["mean"] * scale for e in es], yerr=_errors(es, scale),
                            marker=MARKERS[variants[key[0]].index(key[1]) % len(MARKERS)], label=_line_label(first),
                            color=color, linestyle=style)
            set_axis(ax, [e[x] * xs for e in drawn or configs], "x", counts=x == "trainable")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric_label(metric, pct))
            ax.grid(True, which="major", alpha=0.35)
        set_titles(fig, axes, [k for k, _ in panels])
        _legend(fig, axes)
    return fig


def metric_vs_data_figure(summary: Sequence[dict], metric: str, per_dataset: bool = False, max_panels: int = 24):
    """The figure of ``metric`` against the data regime (1/2/4/16 shots, then 50 % / 100 %), one line
    per configuration (method, variant, size); None when no model has more than one regime."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in summary:
        if s["mean"] is not None:
            groups[str(s["model"])].append(s)
    panels: list[tuple[tuple, list[dict]]] = []
    for model, configs in sorted(groups.items()):
        if len({regime(s) for s in configs}) < 2:
            continue
        datasets = sorted({str(s["dataset"]) for s in configs})
        if per_dataset:
            if len(datasets) > 1:
                panels += [((model, ds, None), [s for s in configs if str(s["dataset"]) == ds])
                           for ds in datasets]
        elif len(datasets) == 1:
            panels.append(((model, datasets[0], None), configs))
        else:
            avg = []
            for reg in sorted({regime(s) for s in configs}):
                here = [s for s in configs if regime(s) == reg]
                avg += _averaged(here, len({str(s["dataset"]) for s in here}))
            if avg:
                panels.append(((model, f"mean of {len(datasets)} datasets", None), avg))
    panels = [p for p in panels if len({regime(s) for s in p[1]}) > 1][:max_panels]
    if not panels:
        return None
    from matplotlib import rc_context

    pct = is_fraction_metric(metric, summary)
    scale = 100.0 if pct else 1.0
    styles = method_styles(summary)
    with rc_context(STYLE):
        fig, axes = new_figure(len(panels))
        for ax, (_, configs) in zip(axes, panels):
            regs = sorted({regime(s) for s in configs})
            pos = {r: i for i, r in enumerate(regs)}
            lines: dict[tuple, list[dict]] = defaultdict(list)
            for s in configs:
                lines[(method_rank(s["method"]), s["shown_variant"], setting(s))].append(s)
            sizes: dict[tuple, list] = defaultdict(list)
            for key in sorted(lines):
                sizes[key[:2]].append(key[2])
            for key in sorted(lines):
                es = sorted(lines[key], key=regime)
                first = es[0]
                several = len(sizes[key[:2]]) > 1
                lab = _line_label(first) + (f" ({setting_label(first)})" if several else "")
                ax.errorbar([pos[regime(e)] for e in es], [e["mean"] * scale for e in es], yerr=_errors(es, scale),
                            marker=MARKERS[sizes[key[:2]].index(key[2]) % len(MARKERS)], label=lab,
                            color=styles[str(first["method"])]["color"], linestyle="-" if not key[1] else "--")
            ax.set_xticks(range(len(regs)))
            ax.set_xticklabels([f"{v:g}" if kind == 0 else f"{v * 100:g}%" for kind, v in regs])
            ax.set_xlim(-0.3, len(regs) - 0.7)
            ax.set_xlabel("shots per class, or % of the data")
            ax.set_ylabel(metric_label(metric, pct))
            ax.grid(True, alpha=0.35)
        set_titles(fig, axes, [k for k, _ in panels])
        _legend(fig, axes)
    return fig


# name: (function giving the figure, its options, caption, whether a per-dataset twin is drawn too)
PLOTS: dict[str, tuple[Callable[..., Any], dict[str, Any], str, bool]] = {
    "acc_vs_params": (metric_vs_figure, {"x": "trainable"}, "vs trainable parameters", True),
    "acc_vs_step_time": (metric_vs_figure, {"x": "step_time_s"}, "vs step time", False),
    "acc_vs_memory": (metric_vs_figure, {"x": "peak_memory_mb"}, "vs peak memory", False),
    "acc_vs_shots": (metric_vs_data_figure, {}, "vs training data", True),
}


def write_plots(summary: Sequence[dict], out: Path, metric: str) -> list[tuple[str, str]]:
    """Every figure of the report into ``out`` (and the per-dataset twins); [(png file name, caption)].
    Figures of an earlier report that this data no longer gives are removed."""
    written = []
    for name, (fn, kw, what, twin) in PLOTS.items():
        for per_dataset in (False, True):
            if per_dataset and not twin:
                continue
            stem = name + ("_per_dataset" if per_dataset else "")
            target = out / f"{stem}.png"
            fig = fn(summary, metric=metric, per_dataset=per_dataset, **kw)
            if fig is not None:
                save(fig, target)
                written.append((target.name, f"{metric} {what}" + (", per dataset" if per_dataset else "")))
            else:
                for stale in (target, target.with_suffix(".pdf")):
                    if stale.exists():
                        stale.unlink()
    return written
