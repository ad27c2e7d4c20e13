"""The report itself: ``report.md``, ``report.tex`` (+ ``tables/*.tex``), CSVs and figures in one folder."""
from __future__ import annotations

import datetime as _dt
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..results import RESULTS_FILE
from .collect import ReportError, collect
from .keys import display_method, human, natural, regime_label, regime_of, setting_label
from .plots import DPI, write_plots
from .stats import (CONFIDENCE, DEFAULT_METRIC, aggregated_columns, compare_to_baseline, pivot, seed_pairs,
                    summarize, t_interval)
from .tables import (Table, comparison_table, dataset_tables, fmt, fmt_int, is_fraction_metric, latex_escape,
                     md_table, regime_tables, size_tables, task_tables, write_csv)

RESULT_COLUMNS = (["method", "variant", "label", "model", "dataset", "task", "shots", "fraction", "r", "budget",
                   "metric", "mean", "std", "ci_low", "ci_high", "n_seeds", "seeds", "n_runs"]
                  + aggregated_columns() + ["sweeps", "run_dirs"])
COMPARISON_COLUMNS = ["model", "shots", "fraction", "method", "variant", "baseline", "metric", "n", "wins", "ties",
                      "losses", "mean_diff", "ci_low", "ci_high", "test", "statistic", "p", "note", "datasets",
                      "settings"]
DEFAULT_BASELINE = "lora"


def display_path(path) -> str:
    p = str(path)
    if p.startswith(("http://", "https://", "wandb:")):
        return p
    try:
        rel = os.path.relpath(p)
        return p if rel.startswith("..") else rel
    except ValueError:
        return p


def _baseline_of(summary: Sequence[dict], comparisons: Sequence[dict]) -> dict[int, dict]:
    """{id(config): the baseline configuration it was paired with}."""
    return {id(other): base for c in comparisons for _, _, base, other in c["pairs"]}


def _delta_vs_baseline(s: dict, base: dict | None, scale: float) -> str:
    """Δ with the baseline over the seeds both ran: mean [95 % interval] (n)."""
    if base is None:
        return "-"
    pairs = seed_pairs(base, s)
    if not pairs:
        return "no common seed"
    diffs = [o - b for b, o in pairs]
    mean = sum(diffs) / len(diffs)
    lo, hi = t_interval(diffs)
    text = f"{mean * scale:+.2f}"
    text += f" [{lo * scale:+.2f}, {hi * scale:+.2f}]" if lo is not None else " (n=1)"
    return text


def render_markdown(rows: Sequence[dict], summary: Sequence[dict], metric: str, sources: Sequence[str],
                    plots: Sequence[tuple[str, str]] = (), tables: Sequence[Table] = (),
                    comparisons: Sequence[dict] = (), baseline: str = DEFAULT_BASELINE) -> str:
    """The report as Markdown."""
    pct = is_fraction_metric(metric, summary)
    scale = 100.0 if pct else 1.0
    unit = " (%)" if pct else ""
    status_counts = Counter(r["status"] for r in rows)
    bad = [r for r in rows if r["status"] != "completed"]
    out = ["# Results report", ""]
    out.append(f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} from "
               + ", ".join(f"`{display_path(s)}`" for s in sources) + ".")
    out.append(f"Jobs found: {len(rows)} (" + ", ".join(f"{n} {s}" for s, n in sorted(status_counts.items()))
               + f"). Metric: `{metric}`{unit}, mean ± sample std (ddof=1) over seeds, with the "
               f"{CONFIDENCE:.0%} t-interval of the mean (none for a single seed: n=1). Baseline of the paired "
               f"comparisons: `{baseline}`.")
    out.append("")

    out += ["## Results by configuration", ""]
    if summary:
        base_of = _baseline_of(summary, comparisons)
        show_lr = any(s.get("lr") is not None for s in summary)
        show_dev = any(s.get("budget_deviation") is not None for s in summary)
        header = ["Method", "Model", "Dataset", "Data", "r", "Budget", f"{metric}{unit}", f"{CONFIDENCE:.0%} CI",
                  "Seeds", f"Δ vs {baseline} (paired seeds)", "Trainable params", "LoRA-eq. rank"]
        header += ["Budget dev."] * show_dev + ["LR"] * show_lr + ["Step time (ms)", "Peak mem (MB)"]
        body = []
        for s in summary:
            acc = fmt(s["mean"], ".2f", scale)
            if s["std"] is not None:
                acc += " ± " + fmt(s["std"], ".2f", scale)
            ci = (f"[{fmt(s['ci_low'], '.2f', scale)}, {fmt(s['ci_high'], '.2f', scale)}]"
                  if s["ci_low"] is not None else ("n=1" if s["n_seeds"] == 1 else "-"))
            line = [s["label"], s["model"], s["dataset"], regime_label(s), "-" if s["r"] is None else s["r"],
                    human(s["budget"]) or "-", acc, ci, s["n_seeds"],
                    "(baseline)" if s["method"] == baseline and id(s) not in base_of else
                    _delta_vs_baseline(s, base_of.get(id(s)), scale),
                    fmt_int(s["trainable"]), fmt(s["lora_equivalent_rank"], ".2f")]
            if show_dev:
                dev = s.get("budget_deviation")
                line.append("-" if dev is None else f"{dev * 100:+.2f} %")
            if show_lr:
                line.append("-" if s.get("lr") is None else f"{s['lr']:g}")
            line += [fmt(s["step_time_s"], ".2f", 1000.0), fmt(s["peak_memory_mb"], ".0f")]
            body.append(line)
        out += [md_table(header, body), ""]
    else:
        out += ["No completed job.", ""]

    out += lowrank_section(summary)

    paired = [c for c in comparisons if c["n"]]
    if paired:
        out += [f"## Paired comparison with {baseline}", ""]
        header, body = comparison_table(paired, scale, 2)
        out += [md_table(header, body), ""]
        out += [f"Pairs: each dataset and size where both ran (a size pairs with the baseline's own, else with "
                f"the baseline's only size on that dataset); the values paired are the means over seeds. W / T / L: "
                f"the method better / within {paired[0]['tie'] * scale:g}{' points' if pct else ''} / worse. "
                f"Mean Δ: method − {baseline}, with its {CONFIDENCE:.0%} t-interval. Test: Wilcoxon signed-rank "
                "for 6 or more pairs, paired t-test for 2-5 (sign test when every difference is equal), none for "
                "one pair.", ""]

    if tables:
        out += ["## Tables (the paper's layouts)", "",
                "Bold: the best value of the row (per-task tables: of the column). LaTeX: `report.tex`, "
                "`tables/*.tex`.", ""]
        for t in tables:
            out += [t.markdown()]

    if plots:
        out += ["## Plots", ""]
        out += [f"![{title}]({name})" for name, title in plots] + [""]
        out += ["Error bars: ± one sample standard deviation over seeds (averages over datasets: over the "
                "per-seed averages); the 95 % intervals are in the tables. Methods at one budget are set apart by "
                "at most 2 % along the parameter axis. PDF versions next to each PNG.", ""]

    out += ["## Failed or unfinished jobs", ""]
    if bad:
        body = []
        for r in sorted(bad, key=lambda r: (r["status"], natural(r["run_dir"]))):
            status = r["status"] + (" (unfinished)" if r["status"] == "running" else "")
            err = r.get("error") or ("no results.json" if r["status"] == "unfinished" else
                                     "(still running or killed)" if r["status"] == "running" else
                                     "(no error recorded)")
            body.append([display_path(r["run_dir"]), status, r.get("method") or "-", r.get("dataset") or "-",
                         r.get("seed") if r.get("seed") is not None else "-",
                         " ".join(r.get("overrides") or []) or "-", err])
        out += [md_table(["Job folder", "Status", "Method", "Dataset", "Seed", "Overrides", "Error"], body), ""]
    else:
        out += ["None.", ""]

    notes = _notes(rows, summary, metric, comparisons)
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def lowrank_section(summary: Sequence[dict]) -> list[str]:
    """Markdown lines of the "full rank matters" table: per configuration, the relative Frobenius error of the
    trained update truncated to the rank of the equal-parameter LoRA (results.json ``lowrank``), mean over
    seeds; nothing when no run recorded it."""
    have = [s for s in summary if s.get("lowrank_error") is not None]
    if not have:
        return []
    body = [[s["label"], s["model"], s["dataset"], regime_label(s), "-" if s["r"] is None else s["r"],
             fmt(s["lora_equivalent_rank"], ".2f"), fmt_int(s.get("lowrank_rank")), fmt(s["lowrank_error"], ".4f"),
             fmt(s.get("lowrank_mean_error"), ".4f"), fmt(s.get("lowrank_rank99"), ".1f"), s["n_seeds"]]
            for s in have]
    header = ["Method", "Model", "Dataset", "Data", "r", "LoRA-eq. rank", "k", "Rel. error at k (all layers)",
              "Mean per-layer rel. error", "Rank for 99 % energy (mean)", "Seeds"]
    return ["## Full rank matters: the update truncated to the equal-budget LoRA rank", "",
            md_table(header, body), "",
            "k = floor(LoRA-equivalent rank): the rank of the LoRA with the same adapter parameters. Rel. error: "
            "||dW - dW_k||_F / ||dW||_F of the best rank-k approximation (truncated SVD), over all adapted layers "
            "stacked and per layer (mean); a LoRA at that budget cannot hold this part of the update. Per-layer "
            "values: `lowrank.layers` in each results.json; `python -m randlora.export <run> --format lora --rank k` "
            "writes the truncated adapter and the same errors.", ""]


def _notes(rows, summary, metric, comparisons) -> list[str]:
    notes = []
    missing = [r for r in rows if r["status"] == "completed" and metric not in r["metrics"]]
    if missing:
        avail = sorted({k for r in missing for k in r["metrics"]})
        shown = sorted((display_path(r["run_dir"]) for r in missing), key=natural)
        more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
        notes.append(f"{len(missing)} completed job(s) have no `{metric}` metric (excluded from the means"
                     + (f"; they have: {', '.join(avail)}" if avail else "") + "): "
                     + ", ".join(f"`{p}`" for p in shown[:10]) + more)
    for s in summary:
        if s["duplicate_seeds"]:
            notes.append(f"{s['label']} / {s['model']} / {s['dataset']} / {setting_label(s)} / "
                         f"{regime_label(s)}: seed(s) {', '.join(s['duplicate_seeds'])} appear more than once "
                         "(re-runs or another hyper-parameter that is not part of the configuration key); "
                         "all runs are averaged")
        if isinstance(s["r"], str):
            notes.append(f"{s['label']} / {s['dataset']} / {setting_label(s)}: the rank differs between "
                         f"seeds (r = {s['r']})")
    shared = {v for s in summary for v in s["variant"].split()} - {v for s in summary for v in s["shown_variant"].split()}
    if shared:
        notes.append("Left out of the labels, as every configuration of its model has them: "
                     + ", ".join(f"`{v}`" for v in sorted(shared)) + ".")
    for c in comparisons:  # the unpaired, also of methods with no pair at all
        if c["unpaired"]:
            notes.append(f"{c['label']} / {c['model']} / {regime_label(regime_of(c['regime']))}: "
                         f"{len(c['unpaired'])} configuration(s) with no {c['baseline']} size to pair with "
                         "(the baseline ran several other sizes on that dataset)")
    return notes


def png_width_in(path: Path) -> float:
    """A PNG's width in inches at the figures' 300 dpi (its IHDR header); 0 when unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
        return int.from_bytes(head[16:20], "big") / DPI
    except OSError:
        return 0.0


def render_latex(tables: Sequence[Table], comparisons: Sequence[dict], plots: Sequence[tuple[str, str]],
                 out: Path) -> str:
    """``report.tex``: every table (``\\input`` from ``tables/``) and figure, a document that compiles
    with pdflatex (booktabs, graphicx)."""
    lines = ["\\documentclass[10pt]{article}", "\\usepackage[margin=2cm]{geometry}", "\\usepackage{booktabs}",
             "\\usepackage{graphicx}", "\\usepackage[T1]{fontenc}", "\\begin{document}", ""]
    for t in tables:
        lines.append(f"\\input{{tables/{t.name}.tex}}")
    if comparisons:
        lines.append("\\input{tables/comparisons.tex}")
    for name, title in plots:
        pdf = Path(name).with_suffix(".pdf").name
        # one-column figures at their own 3.3 in, wider ones at the text width (capped in height)
        size = "" if png_width_in(out / name) <= 4 else "[width=\\linewidth,height=0.8\\textheight,keepaspectratio]"
        lines += ["\\begin{figure}[t]", "\\centering", f"\\includegraphics{size}{{{pdf}}}",
                  "\\caption{" + latex_escape(f"{title}; error bars: ± one standard deviation over seeds.") + "}",
                  "\\end{figure}"]
    lines += ["", "\\end{document}"]
    return "\n".join(lines) + "\n"


def comparisons_latex(comparisons: Sequence[dict], scale: float, baseline: str) -> str:
    header, body = comparison_table(comparisons, scale, 2)
    cols = "lll" + "l" + "rrrlr"
    lines = ["\\begin{table}[t]", "\\centering",
             "\\caption{" + latex_escape(f"Paired comparison with {display_method(baseline)}: wins / ties / losses "
                                          f"over datasets and sizes, mean difference with its {CONFIDENCE:.0%} "
                                          "t-interval, paired test.") + "}",
             "\\label{tab:comparisons}", "\\small", "\\resizebox{\\linewidth}{!}{%",
             f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(latex_escape(h) for h in header) + " \\\\",
             "\\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + " \\\\" for row in body]
    lines += ["\\bottomrule", "\\end{tabular}}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def write_report(folders: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                 metric: str = DEFAULT_METRIC, rows: Sequence[dict] | None = None,
                 baseline: str = DEFAULT_BASELINE, plots: bool = True) -> str:
    """Collect ``folders`` (plus any extra ``rows``, e.g. from W&B), write the report to ``out``
    (default ``<first folder>/report/``) and return its Markdown.

    Written: ``report.md``, ``report.tex`` and ``tables/*.tex``, ``results.csv`` (one row per
    configuration), ``pivot.csv`` (method x dataset), ``comparisons.csv`` (paired comparisons with
    ``baseline``) and the figures (PNG + PDF). Raises :class:`ReportError` when no job was found."""
    folders = [str(f) for f in folders]
    all_rows = collect(folders) + list(rows or [])
    if not all_rows:
        where = ", ".join(folders) if folders else "the given W&B group"
        raise ReportError(f"no {RESULTS_FILE} and no job folder (with .hydra/) found under: {where}")
    if out is None:
        if not folders:
            raise ReportError("--out is required when no folder is given")
        base = Path(folders[0])
        out = (base.parent if base.is_file() else base) / "report"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(all_rows, metric)
    write_csv(out / "results.csv", RESULT_COLUMNS, summary)
    datasets, prow = pivot(summary)
    write_csv(out / "pivot.csv", ["model", "shots", "fraction", "label", "method", "r", "budget"] + datasets
              + ["average", "n_datasets"], prow)
    every = compare_to_baseline(summary, baseline)
    comparisons = [c for c in every if c["n"]]
    write_csv(out / "comparisons.csv", COMPARISON_COLUMNS,
              [dict(c, shots=c["regime"][1] if c["regime"][0] == 0 else None,
                    fraction=c["regime"][1] if c["regime"][0] == 1 else None, variant=c["shown_variant"])
               for c in comparisons])
    tables = (size_tables(summary, metric) + dataset_tables(summary, metric) + regime_tables(summary, metric)
              + task_tables(all_rows, summary, metric))
    scale = 100.0 if is_fraction_metric(metric, summary) else 1.0
    tex_dir = out / "tables"
    tex_dir.mkdir(exist_ok=True)
    for stale in tex_dir.glob("*.tex"):  # an earlier report of other data
        stale.unlink()
    for t in tables:
        (tex_dir / f"{t.name}.tex").write_text(t.latex())
    if comparisons:
        (tex_dir / "comparisons.tex").write_text(comparisons_latex(comparisons, scale, baseline))
    figures = write_plots(summary, out, metric) if plots else []
    (out / "report.tex").write_text(render_latex(tables, comparisons, figures, out))
    sources = folders + sorted({r["source"] for r in (rows or [])})
    md = render_markdown(all_rows, summary, metric, sources, figures, tables, every, baseline)
    (out / "report.md").write_text(md)
    return md


