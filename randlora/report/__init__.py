"""Collect the ``results.json`` of training jobs into tables, paired comparisons and paper figures.

Usage::

    python -m randlora.report logs/multiruns/2025-01-01_12-00-00_abc123 [more folders]
        [--out DIR] [--metric test/acc] [--baseline lora] [--no-plots]
        [--wandb-group NAME --wandb-project [ENTITY/]PROJECT]

Every ``results.json`` under the given folders (searched recursively; its schema is
``randlora.results``, docs/results-schema.md) is one job. Completed jobs are grouped by configuration
(method, r or budget, model, dataset, shots or fraction, and any other override that changes the
experiment) and the metric is summarised over seeds: mean, sample std and 95 % t-interval. Every method
is compared with ``--baseline`` over datasets and sizes (wins / ties / losses, mean difference with its
interval, a paired test). Failed and unfinished jobs are listed, never dropped. Written to ``--out``
(default ``<first folder>/report/``): ``report.md`` (also printed), ``report.tex`` with ``tables/*.tex``
(booktabs), ``results.csv``, ``pivot.csv``, ``comparisons.csv`` and the figures (PNG 300 dpi + PDF).

Exit status: 0 when a report was written (failed jobs included), 2 when nothing was found or the
W&B runs could not be fetched.

Modules: ``collect`` (finding and reading jobs), ``wandb_runs`` (W&B runs as rows), ``keys`` (which jobs
are one experiment, order, labels), ``stats`` (over seeds, against the baseline), ``tables`` (Markdown,
LaTeX, CSV), ``plots`` (figures), ``document`` (the report), ``cli``.
"""
from .cli import main
from .collect import ReportError, collect
from .document import RESULT_COLUMNS, render_markdown, write_report
from .keys import regime_label, setting_label, variant
from .stats import DEFAULT_METRIC, compare, compare_to_baseline, mean_std, paired_test, pivot, summarize, t_interval
from .wandb_runs import collect_wandb, wandb_run_to_results, wandb_run_to_row

__all__ = ["DEFAULT_METRIC", "RESULT_COLUMNS", "ReportError", "collect", "collect_wandb", "compare",
           "compare_to_baseline", "main", "mean_std", "paired_test", "pivot", "regime_label", "render_markdown",
           "setting_label", "summarize", "t_interval", "variant", "wandb_run_to_results", "wandb_run_to_row",
           "write_report"]
