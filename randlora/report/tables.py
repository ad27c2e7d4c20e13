"""Tables: the paper's layouts as one object rendered to Markdown and LaTeX, and the CSV files.

* :func:`dataset_tables`: one table per (model, data regime), datasets as rows, methods as columns, an
  average row (the paper's Tables 11-14);
* :func:`regime_tables`: per model, the average over datasets per data regime (Table 14's layout);
* :func:`task_tables`: commonsense per-task accuracy, methods as rows, the tasks and their average as
  columns (Table 15).

LaTeX uses booktabs rules; the best value of each row (or column, for the per-task table) is bold,
ties at the printed precision included.
"""
from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .collect import as_int, num
from .keys import (TASK_DISPLAY, column_label, display_method, human, method_rank, regime, regime_label, regime_of,
                   setting, sort_configs)
from .stats import higher_is_better, summarize


# -------------------------------------------------------------------------------------------- numbers
def is_fraction_metric(metric: str, summary: Sequence[dict]) -> bool:
    """Accuracy-like metrics stored in [0, 1] are shown in percent."""
    name = metric.rsplit("/", 1)[-1].lower()
    vals = [v for s in summary for _, v in s["values"] if v is not None and not math.isnan(v)]
    return "acc" in name and bool(vals) and all(0.0 <= v <= 1.0 for v in vals)


def fmt(x: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    v = num(x)
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    return format(v * scale, spec)


def fmt_int(x: Any) -> str:
    v = as_int(x)
    return "-" if v is None else f"{v:,}"


# -------------------------------------------------------------------------------------------- Markdown / CSV
def md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ").strip() if x is not None else "-"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ";".join(str(x) for x in v)
    return v


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow([_csv_value(row.get(c)) for c in columns])


# -------------------------------------------------------------------------------------------- tables
@dataclass
class Cell:
    mean: float | None
    std: float | None = None
    mark: str = ""  # e.g. "*": an average over fewer datasets than the table has


@dataclass
class Table:
    """A results table: ``rows`` and ``footer`` (after a rule: averages) of (label, cells)."""

    title: str
    corner: str
    columns: list[str]
    rows: list[tuple[str, list[Cell]]]
    footer: list[tuple[str, list[Cell]]] = field(default_factory=list)
    best: str = "row"  # "row" | "column" | "": where the best value is bold
    higher: bool = True
    scale: float = 1.0
    digits: int = 1
    show_std: bool = True
    notes: list[str] = field(default_factory=list)
    name: str = "table"  # file stem and LaTeX label

    def _text(self, v: float | None) -> str:
        return "-" if v is None else ("nan" if math.isnan(v) else f"{v * self.scale:.{self.digits}f}")

    def best_cells(self) -> set[tuple[int, int]]:
        """(row index over rows + footer, column index) of the bold cells: the best printed value."""
        body = [cells for _, cells in self.rows + self.footer]
        out: set[tuple[int, int]] = set()
        if not self.best or not body:
            return out
        lines = ([[(i, j) for j in range(len(self.columns))] for i in range(len(body))] if self.best == "row" else
                 [[(i, j) for i in range(len(self.rows))] for j in range(len(self.columns))])
        for line in lines:
            vals = {(i, j): float(self._text(body[i][j].mean)) for i, j in line
                    if body[i][j].mean is not None and not math.isnan(body[i][j].mean)}
            if len(vals) < 2:
                continue
            top = max(vals.values()) if self.higher else min(vals.values())
            out |= {ij for ij, v in vals.items() if v == top}
        return out

    def cell_text(self, c: Cell, latex: bool = False, bold: bool = False) -> str:
        m = self._text(c.mean)
        if latex:
            m = f"\\textbf{{{m}}}" if bold else m
            sd = f"\\,{{\\scriptsize$\\pm${self._text(c.std)}}}" if self.show_std and c.std is not None else ""
            return m + sd + (f"$^{{{c.mark}}}$" if c.mark else "")
        m = f"**{m}**" if bold else m
        sd = f" ± {self._text(c.std)}" if self.show_std and c.std is not None else ""
        return m + sd + c.mark.replace("*", "\\*")

    def markdown(self) -> str:
        bold = self.best_cells()
        body = [[lab] + [self.cell_text(c, bold=(i, j) in bold) for j, c in enumerate(cells)]
                for i, (lab, cells) in enumerate(self.rows + self.footer)]
        if self.footer:  # Markdown has no rule: the average rows in bold labels
            for k in range(len(self.rows), len(body)):
                body[k][0] = f"*{body[k][0]}*"
        out = [f"### {self.title}", "", md_table([self.corner] + self.columns, body)]
        if self.notes:
            out += [""] + [n.replace("*", "\\*") for n in self.notes]
        return "\n".join(out) + "\n"

    def latex(self) -> str:
        bold = self.best_cells()
        n = len(self.columns)
        lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{latex_escape(self.title)}}}",
                 f"\\label{{tab:{self.name}}}", "\\small"]
        wide = n > 6 or len(self.corner) + sum(len(c) for c in self.columns) > 60
        if wide:
            lines.append("\\resizebox{\\linewidth}{!}{%")
        lines += [f"\\begin{{tabular}}{{l{'r' * n}}}", "\\toprule",
                  " & ".join([latex_escape(self.corner)] + [latex_escape(c) for c in self.columns]) + " \\\\",
                  "\\midrule"]
        for i, (lab, cells) in enumerate(self.rows + self.footer):
            if self.footer and i == len(self.rows):
                lines.append("\\midrule")
            lines.append(" & ".join([latex_escape(lab)] + [self.cell_text(c, latex=True, bold=(i, j) in bold)
                                                           for j, c in enumerate(cells)]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}" + ("}" if wide else "")]
        if self.notes:
            lines.append("\\\\[2pt]{\\footnotesize " + latex_escape(" ".join(self.notes)) + "}")
        lines.append("\\end{table}")
        return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$",
                  "×": r"$\times$", "·": r"$\cdot$", "Δ": r"$\Delta$"}


def latex_escape(text: Any) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def file_stem(*parts: Any) -> str:
    """A file name of the parts: 100% -> 100pct, anything but letters, digits, . _ - -> '-'."""
    parts = tuple(str(p).replace("%", "pct") for p in parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(str(p) for p in parts)).strip("-")


# -------------------------------------------------------------------------------------------- layouts
def _config_id(s: dict) -> tuple:
    return (method_rank(s["method"]), s["shown_variant"], setting(s))


def _columns(configs: Sequence[dict]) -> tuple[list[tuple], list[str], str]:
    """(column ids, labels, what all columns share for the title) of the configurations of a table."""
    seen: dict[tuple, dict] = {}
    for s in sort_configs(configs):
        seen.setdefault(_config_id(s), s)
    ids = list(seen)
    budgets = {setting(s) for s in seen.values()}
    shared = ""
    one_budget = len(budgets) == 1 and next(iter(budgets))[0] == "budget"
    if one_budget:
        shared = f"budget {human(next(iter(budgets))[1])}"
    return ids, [column_label(seen[i], show_setting=not one_budget) for i in ids], shared


def _shape(metric: str, summary: Sequence[dict]) -> dict:
    pct = is_fraction_metric(metric, summary)
    return {"scale": 100.0 if pct else 1.0, "digits": 1 if pct else 3, "higher": higher_is_better(metric)}


def _unit(metric: str, shape: dict) -> str:
    return f"{metric} (%)" if shape["scale"] == 100.0 else metric


def dataset_tables(summary: Sequence[dict], metric: str) -> list[Table]:
    """One table per (model, data regime): datasets as rows, configurations as columns, mean +- std over
    seeds, and the average over datasets (marked * where a column lacks some of the datasets)."""
    shape = _shape(metric, summary)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in summary:
        if s["mean"] is not None:
            groups[(str(s["model"]), regime(s))].append(s)
    out = []
    for (model, reg), configs in sorted(groups.items()):
        ids, labels, shared = _columns(configs)
        datasets = sorted({str(s["dataset"]) for s in configs})
        if len(datasets) == 1 and len({s["budget"] for s in configs if s.get("budget") is not None}) > 1:
            continue  # one dataset, several budgets: size_tables shows it budget by budget
        cell = {(str(s["dataset"]), _config_id(s)): s for s in configs}
        rows = [(ds, [Cell(cell[(ds, i)]["mean"], cell[(ds, i)]["std"]) if (ds, i) in cell else Cell(None)
                      for i in ids]) for ds in datasets]
        avg, partial = [], False
        for i in ids:
            vals = [cell[(ds, i)]["mean"] for ds in datasets if (ds, i) in cell]
            mark = "*" if len(vals) < len(datasets) else ""
            partial |= bool(mark)
            avg.append(Cell(float(np.mean(vals)) if vals else None, None, mark))
        title = f"{model}, {regime_label(regime_of(reg))}" + (f", {shared}" if shared else "") + \
            f": {_unit(metric, shape)}, mean ± std over seeds"
        notes = ["* average over the datasets this column has results for."] if partial else []
        out.append(Table(title, "Dataset", labels, rows, [("Average", avg)] if len(datasets) > 1 else [],
                         notes=notes, name=file_stem("datasets", model, regime_label(regime_of(reg))), **shape))
    return out


def regime_tables(summary: Sequence[dict], metric: str) -> list[Table]:
    """Per model with more than one data regime: the average over datasets per regime (rows) and
    configuration (columns); a configuration missing a dataset of its regime is marked *."""
    shape = _shape(metric, summary)
    by_model: dict[str, list[dict]] = defaultdict(list)
    for s in summary:
        if s["mean"] is not None:
            by_model[str(s["model"])].append(s)
    out = []
    for model, configs in sorted(by_model.items()):
        regs = sorted({regime(s) for s in configs})
        if len(regs) < 2:
            continue
        ids, labels, shared = _columns(configs)
        rows, partial = [], False
        for reg in regs:
            here = [s for s in configs if regime(s) == reg]
            datasets = {str(s["dataset"]) for s in here}
            cells = []
            for i in ids:
                vals = [s["mean"] for s in here if _config_id(s) == i]
                mark = "*" if vals and len(vals) < len(datasets) else ""
                partial |= bool(mark)
                cells.append(Cell(float(np.mean(vals)) if vals else None, None, mark))
            rows.append((regime_label(regime_of(reg)), cells))
        title = f"{model}" + (f", {shared}" if shared else "") + f": {_unit(metric, shape)}, average over datasets"
        notes = ["* average over the datasets this configuration has results for."] if partial else []
        out.append(Table(title, "Data", labels, rows, notes=notes, name=file_stem("regimes", model), **shape))
    return out


def size_tables(summary: Sequence[dict], metric: str) -> list[Table]:
    """Per (model, dataset, regime) where a method ran several budgets (a budget sweep): budgets as rows,
    methods (and variants) as columns; full fine-tuning, which has no budget, in a note."""
    shape = _shape(metric, summary)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in summary:
        if s["mean"] is not None:
            groups[(str(s["model"]), str(s["dataset"]), regime(s))].append(s)
    out = []
    for (model, ds, reg), configs in sorted(groups.items()):
        sized = [s for s in configs if s.get("budget") is not None]
        budgets = sorted({float(s["budget"]) for s in sized})
        if len(budgets) < 2:
            continue
        methods: dict[tuple, str] = {}
        for s in sort_configs(sized):
            methods.setdefault((method_rank(s["method"]), s["shown_variant"]),
                               display_method(s["method"]) + (f" [{s['shown_variant']}]" if s["shown_variant"] else ""))
        cell = {(float(s["budget"]), (method_rank(s["method"]), s["shown_variant"])): s for s in sized}
        rows = [(human(b), [Cell(cell[(b, m)]["mean"], cell[(b, m)]["std"]) if (b, m) in cell else Cell(None)
                                        for m in methods]) for b in budgets]
        notes = [f"{display_method(s['method'])}: {s['mean'] * shape['scale']:.{shape['digits']}f}"
                 + (f" ± {s['std'] * shape['scale']:.{shape['digits']}f}" if s["std"] is not None else "")
                 + (f" ({human(s['trainable'])} trainable parameters)" if s.get("trainable") else "")
                 for s in sort_configs([s for s in configs if s.get("budget") is None])]
        title = f"{model}, {ds}, {regime_label(regime_of(reg))}: {_unit(metric, shape)} per adapter budget, " \
            "mean ± std over seeds"
        out.append(Table(title, "Budget", list(methods.values()), rows, notes=notes,
                         name=file_stem("budgets", model, ds, regime_label(regime_of(reg))), **shape))
    return out


def task_names(rows: Sequence[dict], metric: str) -> list[str]:
    """The per-task metrics ``<metric>_<task>`` of the completed rows, in the data config's task order
    (``config.data.tasks``), else the paper's, else alphabetical."""
    found = {k[len(metric) + 1:] for r in rows if r.get("status") == "completed"
             for k in r.get("metrics", {}) if k.startswith(metric + "_")}
    if not found:
        return []
    order = next((r["tasks"] for r in rows if r.get("tasks")), None) or list(TASK_DISPLAY)
    return [t for t in order if t in found] + sorted(found - set(order))


def task_tables(rows: Sequence[dict], summary: Sequence[dict], metric: str) -> list[Table]:
    """Per (model, dataset, regime) with per-task metrics: configurations as rows, the tasks and
    their average (``metric``) as columns; the best of each column in bold."""
    tasks = task_names(rows, metric)
    if not tasks:
        return []
    per_task = {t: {(s["label"], str(s["model"]), str(s["dataset"]), regime(s), setting(s)): s
                    for s in summarize(rows, f"{metric}_{t}")} for t in tasks}
    shape = _shape(metric, summary)
    shape["digits"] = 2 if shape["scale"] == 100.0 else 3
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in summary:
        groups[(str(s["model"]), str(s["dataset"]), regime(s))].append(s)
    out = []
    for (model, ds, reg), configs in sorted(groups.items()):
        ids, labels, shared = _columns(configs)
        first = {}
        for s in sort_configs(configs):
            first.setdefault(_config_id(s), s)
        body = []
        for i, lab in zip(ids, labels):
            s = first[i]
            key = (s["label"], model, ds, reg, setting(s))
            cells = [Cell(per_task[t][key]["mean"], None) if key in per_task[t] else Cell(None) for t in tasks]
            body.append((lab, cells + [Cell(s["mean"], None)]))
        if not any(c.mean is not None for _, cells in body for c in cells[:-1]):
            continue
        title = f"{model}, {ds}, {regime_label(regime_of(reg))}" + (f", {shared}" if shared else "") + \
            f": {_unit(metric, shape)} per task, mean over seeds"
        out.append(Table(title, "Method", [TASK_DISPLAY.get(t, t) for t in tasks] + ["Average"], body, best="column",
                         show_std=False, name=file_stem("tasks", model, ds, regime_label(regime_of(reg))), **shape))
    return out


def comparison_table(comparisons: Sequence[dict], scale: float, digits: int) -> tuple[list[str], list[list]]:
    """Header and rows of the paired comparisons with the baseline (Markdown cells)."""
    header = ["Model", "Data", "Method", "vs", "Pairs", "W / T / L", "Mean Δ (95 % CI)", "Test", "p"]
    body = []
    for c in comparisons:
        d = f"{c['mean_diff'] * scale:+.{digits}f}"
        if c["ci_low"] is not None:
            d += f" [{c['ci_low'] * scale:+.{digits}f}, {c['ci_high'] * scale:+.{digits}f}]"
        test = {"wilcoxon": "Wilcoxon", "t": "paired t", "sign": "sign"}.get(c["test"], c["note"] or "-")
        body.append([c["model"], regime_label(regime_of(c["regime"])), display_method(c["method"])
                     + (f" [{c['shown_variant']}]" if c["shown_variant"] else ""), display_method(c["baseline"]),
                     c["n"], f"{c['wins']} / {c['ties']} / {c['losses']}", d, test,
                     "-" if c["p"] is None else f"{c['p']:.3g}"])
    return header, body
