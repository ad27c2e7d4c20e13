"""Collect the ``results.json`` of training jobs into tables and plots.

Usage::

    python -m randlora.report logs/multiruns/2025-01-01_12-00-00_abc123 [more folders]
        [--out DIR] [--metric test/acc] [--wandb-group NAME --wandb-project [ENTITY/]PROJECT]

Every ``results.json`` under the given folders (searched recursively, schema in
``docs/results-schema.md``) is one job. Completed jobs are grouped by configuration
(method, r or budget, model, dataset, shots or fraction) and the metric is averaged over seeds
(mean and sample standard deviation, ddof=1). Failed and unfinished jobs (a job folder with
``.hydra/`` but no ``results.json``, or ``"status": "running"``) are listed in the report, never
dropped. Written to ``--out`` (default ``<first folder>/report/``): ``report.md``, ``results.csv``,
``pivot.csv``, ``acc_vs_params.png`` and, when the number of shots or the data fraction varies,
``acc_vs_shots.png``. The Markdown is also printed to stdout.

Exit status: 0 when a report was written (failed jobs included), 2 when nothing was found or the
W&B runs could not be fetched.

Importable: :func:`collect`, :func:`summarize`, :func:`pivot`, :func:`write_report`,
:func:`wandb_run_to_row`, :func:`collect_wandb`.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import re
import socket
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlparse

import numpy as np

DEFAULT_METRIC = "test/acc"
RESULTS_FILE = "results.json"
METHOD_ORDER = ["full", "lora", "vera", "randlora"]
_SKIP_DIRS = {".hydra", ".git", "__pycache__", ".pytest_cache", "wandb"}  # wandb/: W&B's local files

RESULT_COLUMNS = [
    "method", "variant", "model", "dataset", "task", "shots", "fraction", "r", "budget", "metric", "mean",
    "std", "n_seeds", "seeds", "n_runs", "trainable", "total", "ratio", "adapter_params",
    "lora_equivalent_rank", "step_time_s", "samples_per_s", "peak_memory_mb", "sweeps", "run_dirs",
]


class ReportError(Exception):
    """A problem the user can fix (nothing found, W&B unreachable); the CLI exits with status 2."""


# --------------------------------------------------------------------------------------------
# Collecting jobs
# --------------------------------------------------------------------------------------------

def _num(x: Any) -> float | None:
    """A float, or None for missing / non-numeric values (NaN is kept)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _int(x: Any) -> int | None:
    v = _num(x)
    if v is None or math.isnan(v) or math.isinf(v):
        return None
    return int(round(v))


def _normalize(raw: dict, job_dir: str, source: str, results_file: str | None) -> dict:
    """Flatten one results.json-style dict into a report row."""
    params = raw.get("params") or {}
    perf = raw.get("perf") or {}
    metrics = raw.get("metrics") or {}
    if not isinstance(params, dict):
        params = {}
    if not isinstance(perf, dict):
        perf = {}
    if not isinstance(metrics, dict):
        metrics = {}
    fraction = _num(raw.get("fraction"))
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list):
        overrides = [str(overrides)]
    status = raw.get("status")
    return {
        "status": str(status) if status is not None else "unknown",
        "error": raw.get("error"),
        "method": raw.get("method"),
        "model": raw.get("model"),
        "dataset": raw.get("dataset"),
        "task": raw.get("task"),
        "seed": raw.get("seed"),
        "r": _int(raw.get("r")),
        "budget": _num(raw.get("budget")),
        "shots": _int(raw.get("shots")),
        "fraction": 1.0 if fraction is None else fraction,
        "sweep": raw.get("sweep"),
        "trainable": _int(params.get("trainable")),
        "total": _int(params.get("total")),
        "ratio": _num(params.get("ratio")),
        "adapter_params": _int(params.get("adapter")),
        "lora_equivalent_rank": _num(params.get("lora_equivalent_rank")),
        "metrics": {str(k): _num(v) for k, v in metrics.items() if _num(v) is not None},
        "step_time_s": _num(perf.get("step_time_s")),
        "samples_per_s": _num(perf.get("samples_per_s")),
        "peak_memory_mb": _num(perf.get("peak_memory_mb")),
        "run_dir": job_dir,
        "recorded_run_dir": raw.get("run_dir"),
        "source": source,
        "results_file": results_file,
        "overrides": [str(o) for o in overrides],
    }


def _read_overrides(hydra_dir: Path) -> list[str]:
    """Hydra's overrides.yaml (a YAML list of strings), best effort."""
    path = hydra_dir / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        text = path.read_text()
    except OSError:
        return []
    try:
        import yaml

        data = yaml.safe_load(text)
        if isinstance(data, list):
            return [str(x) for x in data]
    except Exception:  # noqa: BLE001 - a malformed file must not stop the report
        pass
    return [line.strip()[2:].strip() for line in text.splitlines() if line.strip().startswith("- ")]


def _load_job(results: Path, source: str) -> dict:
    job_dir = str(results.parent.resolve())
    try:
        raw = json.loads(results.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    except (OSError, ValueError) as e:
        row = _normalize({}, job_dir, source, str(results))
        row["status"] = "unreadable"
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")
        row["overrides"] = _read_overrides(results.parent / ".hydra")
        return row
    row = _normalize(raw, job_dir, source, str(results))
    if not row["overrides"]:
        row["overrides"] = _read_overrides(results.parent / ".hydra")
    return row


def _unfinished_job(job_dir: Path, source: str) -> dict:
    row = _normalize({}, str(job_dir.resolve()), source, None)
    row["status"] = "unfinished"
    row["error"] = None
    row["overrides"] = _read_overrides(job_dir / ".hydra")
    return row


def collect(folders: Iterable[str | os.PathLike]) -> list[dict]:
    """Every job under ``folders`` (searched recursively), one dict per job.

    A job is a folder holding ``results.json`` or, when that file is missing, a Hydra ``.hydra/``
    folder (status ``"unfinished"``). Each row has the results.json fields flattened
    (``trainable``, ``lora_equivalent_rank``, ``step_time_s``, ``peak_memory_mb``, ...), the metrics
    in ``row["metrics"]``, the folder it was found in (``run_dir``) and the ``source`` folder it was
    collected from. A results.json that cannot be parsed gives status ``"unreadable"``. A folder
    that does not exist raises :class:`ReportError`. The same job reached twice is listed once.
    """
    rows: list[dict] = []
    seen: set[str] = set()
    for folder in folders:
        base = Path(folder)
        if not base.exists():
            raise ReportError(f"no such folder: {folder}")
        if base.is_file():
            if base.name != RESULTS_FILE:
                raise ReportError(f"not a folder or a {RESULTS_FILE}: {folder}")
            key = str(base.resolve())
            if key not in seen:
                seen.add(key)
                rows.append(_load_job(base, str(folder)))
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            here = Path(dirpath)
            has_hydra = ".hydra" in dirnames
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            key = str(here.resolve())
            if key in seen:
                continue
            if RESULTS_FILE in filenames:
                # a run's resumes/<time>/ folders hold each resume's own Hydra log and config, not jobs
                dirnames[:] = [d for d in dirnames if d != "resumes"]
                seen.add(key)
                rows.append(_load_job(here / RESULTS_FILE, str(folder)))
            elif has_hydra:
                seen.add(key)
                rows.append(_unfinished_job(here, str(folder)))
    return rows


# --------------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------------

def _plain(obj: Any) -> Any:
    """W&B summary / config objects as plain dicts and lists; ``{"value": x}`` wrappers unwrapped."""
    if hasattr(obj, "_json_dict") and isinstance(getattr(obj, "_json_dict"), dict):
        obj = obj._json_dict
    if isinstance(obj, dict) or (hasattr(obj, "items") and callable(obj.items)):
        d = {str(k): _plain(v) for k, v in obj.items()}
        if set(d) <= {"value", "desc"} and "value" in d:
            return d["value"]
        return d
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _lookup(sources: Sequence[dict], *keys: str) -> Any:
    """First non-None, non-mapping value of a (possibly nested) key, in key order then source order:
    ``a.b`` is looked up as ``d["a.b"]``, ``d["a/b"]`` or ``d[a][b]``."""
    for key in keys:
        parts = key.split(".")
        for src in sources:
            for c in (key, "/".join(parts)):
                if c in src and src[c] is not None and not isinstance(src[c], dict):
                    return src[c]
            node: Any = src
            for p in parts:
                node = node.get(p) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):
                return node
    return None


_WANDB_STATE = {"finished": "completed", "failed": "failed", "crashed": "failed",
                "killed": "failed", "running": "running", "pending": "running"}


def wandb_run_to_results(run: Any) -> dict:
    """A W&B run (``wandb.Api().runs(...)`` item) as a results.json-style dict.

    The run's summary and config hold the results.json keys (summary first): nested
    (``params: {trainable: ...}``) or flattened (``params/trainable``, ``params.trainable``).
    Metrics are ``metrics`` plus the summary's top-level ``split/name`` numbers such as ``test/acc``.
    The status is the results' own ``status`` unless W&B says the run crashed, failed or is running.
    """
    summary = _plain(getattr(run, "summary", {}) or {})
    config = _plain(getattr(run, "config", {}) or {})
    summary = summary if isinstance(summary, dict) else {}
    config = config if isinstance(config, dict) else {}
    src = [summary, config]
    out: dict = {}
    # results.json keys first, then where the training loggers put them (config "adapter": {...},
    # the resolved Hydra config's model.name / data.name) and the run's own group
    fallbacks = {"method": ["adapter.method"], "r": ["adapter.r"], "budget": ["adapter.budget"],
                 "model": ["model.name"], "dataset": ["data.name"], "task": ["task.kind"],
                 "shots": ["data.shots"], "fraction": ["data.fraction"], "sweep": ["group"]}
    for key in ["method", "model", "dataset", "task", "seed", "r", "budget", "shots", "fraction",
                "sweep", "error", "overrides", "run_dir"]:
        out[key] = _lookup(src, key, *fallbacks.get(key, []))
    if out["sweep"] is None and getattr(run, "group", None):
        out["sweep"] = run.group
    out["params"] = {k: _lookup(src, f"params.{k}") for k in
                     ["trainable", "total", "ratio", "adapter", "lora_equivalent_rank"]}
    out["perf"] = {k: _lookup(src, f"perf.{k}") for k in ["step_time_s", "samples_per_s", "peak_memory_mb"]}
    metrics: dict = {}
    for d in (config, summary):  # summary wins
        m = d.get("metrics")
        if isinstance(m, dict):
            metrics.update(m)
    for k, v in summary.items():
        head = k.split("/", 1)[0]
        if "/" in k and not k.startswith("_") and head not in {"params", "perf", "system"} \
                and _num(v) is not None:
            metrics[k] = v
    out["metrics"] = metrics
    state = getattr(run, "state", None)
    status = _lookup(src, "status")
    mapped = _WANDB_STATE.get(str(state)) if state is not None else None
    if mapped in ("failed", "running") or status is None:
        status = mapped or "unknown"
    out["status"] = status
    if status == "failed" and not out.get("error"):
        out["error"] = f"W&B run state: {state}"
    return out


def _wandb_address(run: Any) -> str:
    url = getattr(run, "url", None)
    if url:
        return str(url)
    path = getattr(run, "path", None)
    if isinstance(path, (list, tuple)):
        path = "/".join(str(p) for p in path)
    return f"wandb:{path or getattr(run, 'id', '?')}"


def wandb_run_to_row(run: Any, source: str = "wandb") -> dict:
    """A W&B run as a report row (the same fields as the rows of :func:`collect`)."""
    return _normalize(wandb_run_to_results(run), _wandb_address(run), source, None)


def _wandb_offline_reason() -> str | None:
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in {"offline", "disabled", "dryrun"}:
        return f"WANDB_MODE={mode}"
    if os.environ.get("WANDB_OFFLINE", "").strip().lower() in {"1", "true", "yes"}:
        return "WANDB_OFFLINE is set"
    return None


def _wandb_base_url() -> str:
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url
    try:
        from wandb.sdk.lib import urls

        return urls.DEFAULT_BASE_URL
    except Exception:  # noqa: BLE001
        return "https://api.wandb.ai"


def collect_wandb(group: str, project: str, entity: str | None = None, timeout: float = 5.0) -> list[dict]:
    """Rows for every run of W&B group ``group`` in ``project`` (``entity/project`` accepted).

    Raises :class:`ReportError` with one line when W&B is offline, unreachable, without
    credentials, or the query fails.
    """
    reason = _wandb_offline_reason()
    if reason:
        raise ReportError(f"cannot fetch W&B group '{group}': W&B is offline ({reason}); "
                          "unset it, or report from the local run folders instead")
    base_url = _wandb_base_url()
    host = urlparse(base_url).hostname or base_url
    port = urlparse(base_url).port or (80 if base_url.startswith("http://") else 443)
    behind_proxy = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "WANDB__PROXIES"))
    try:  # fail fast: wandb.Api() retries for minutes when there is no network
        if not behind_proxy:
            with socket.create_connection((host, port), timeout=timeout):
                pass
    except OSError as e:
        raise ReportError(f"cannot fetch W&B group '{group}': {base_url} is unreachable "
                          f"({type(e).__name__}: {e}); are you offline?") from None
    try:
        import wandb

        api = wandb.Api(timeout=int(max(timeout, 10)))
        path = project if (entity is None or "/" in project) else f"{entity}/{project}"
        runs = list(api.runs(path, filters={"group": group}))
    except Exception as e:  # noqa: BLE001 - no credentials, unknown project, network errors...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ReportError(f"cannot fetch W&B group '{group}' of project '{project}': "
                          f"{type(e).__name__}: {msg}") from None
    return [wandb_run_to_row(r, source=f"wandb:{project}/{group}") for r in runs]


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------

def _method_rank(method: Any) -> tuple:
    m = str(method).split(" [")[0]  # a variant's label: "randlora [adapter.distribution=binary]"
    return (METHOD_ORDER.index(m), "") if m in METHOD_ORDER else (len(METHOD_ORDER), m)


def _regime(row: dict) -> tuple:
    """Sortable data regime: k-shot first (by k), then fractions of the training set."""
    if row.get("shots") is not None:
        return (0, float(row["shots"]))
    f = row.get("fraction")
    return (1, 1.0 if f is None else float(f))


def regime_label(row: dict) -> str:
    kind, v = _regime(row)
    return f"{v:g}-shot" if kind == 0 else f"{v * 100:g}%"


def _setting(row: dict) -> tuple:
    """The size setting: the budget if one was given, else the rank (None for full)."""
    if row.get("budget") is not None:
        return ("budget", float(row["budget"]))
    r = _num(row.get("r"))
    if r is not None:
        return ("r", r)
    return ("none", 0.0)


# Overrides that do not change the experiment: the seed (what the report averages over), where and
# how the job ran, and the choices the rest of the key already holds.
_NOT_EXPERIMENT = ("seed", "trainer", "trainer.devices", "trainer.num_nodes", "trainer.accelerator",
                   "trainer.strategy", "data.num_workers", "data.eval_batch_size", "logger", "wandb", "callbacks",
                   "resume", "ckpt_path", "group", "paths", "output_dir", "compile", "model", "data",
                   "adapter.r", "adapter.budget", "data.shots", "data.fraction")
_NOT_EXPERIMENT_PREFIXES = ("hydra.", "paths.", "logger.", "wandb.", "callbacks.")


def variant(row: dict) -> str:
    """The command-line overrides that make this run another experiment than its method / model /
    dataset / size / regime say (``adapter.distribution=binary``, ``task.loss=...``, another learning
    rate ...), sorted; "" for none. Seeds of one experiment share it, so they are averaged together,
    and runs that differ otherwise are never averaged as if they were seeds."""
    out = []
    for o in row.get("overrides") or []:
        key, eq, value = str(o).lstrip("+~").partition("=")
        if not eq or key in _NOT_EXPERIMENT or key.startswith(_NOT_EXPERIMENT_PREFIXES):
            continue
        if key == "adapter" and value == str(row.get("method")):
            continue
        out.append(f"{key}={value}")
    return " ".join(sorted(out))


def config_key(row: dict) -> tuple:
    """(method, model, dataset, r-or-budget, shots-or-fraction, variant): the rows averaged over seeds."""
    return (str(row.get("method")), str(row.get("model")), str(row.get("dataset")),
            _setting(row), _regime(row), variant(row))


def _common(values: Iterable[Any]) -> Any:
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


def _seed_sort_key(seed: Any) -> tuple:
    v = _num(seed)
    return (0, v, "") if v is not None else (1, 0.0, str(seed))


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not values:
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def summarize(rows: Sequence[dict], metric: str = DEFAULT_METRIC) -> list[dict]:
    """One dict per configuration of the completed rows: ``metric`` mean / std over seeds.

    Keys: method, model, dataset, task, shots, fraction, r, budget, metric, mean, std (sample std,
    ddof=1, None for one seed), n_seeds (runs with the metric), seeds, n_runs, trainable, total,
    ratio, adapter_params, lora_equivalent_rank (the most common value over seeds), step_time_s and
    samples_per_s (mean over seeds), peak_memory_mb (max over seeds), sweeps, run_dirs, values
    (``[(seed, value), ...]``) and duplicate_seeds (seeds seen more than once in this configuration).
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "completed":
            groups[config_key(row)].append(row)
    out = []
    for key, runs in groups.items():
        values = [(r.get("seed"), r["metrics"][metric]) for r in runs if metric in r.get("metrics", {})]
        mean, std = mean_std([v for _, v in values])
        seeds = [r.get("seed") for r in runs]
        seed_counts = Counter(str(s) for s in seeds)
        rs = sorted({r["r"] for r in runs if r.get("r") is not None})
        first = runs[0]
        label = first.get("method") if not key[5] else f"{first.get('method')} [{key[5]}]"
        out.append({
            "method": label, "variant": key[5], "model": first.get("model"), "dataset": first.get("dataset"),
            "task": _common(r.get("task") for r in runs),
            "shots": first.get("shots") if first.get("shots") is not None else None,
            "fraction": None if first.get("shots") is not None else _regime(first)[1],
            "r": rs[0] if len(rs) == 1 else ("/".join(str(x) for x in rs) if rs else None),
            "budget": first.get("budget"),
            "metric": metric, "mean": mean, "std": std, "n_seeds": len(values),
            "seeds": sorted(seeds, key=_seed_sort_key),
            "n_runs": len(runs),
            "trainable": _common(r.get("trainable") for r in runs),
            "total": _common(r.get("total") for r in runs),
            "ratio": _common(r.get("ratio") for r in runs),
            "adapter_params": _common(r.get("adapter_params") for r in runs),
            "lora_equivalent_rank": _common(r.get("lora_equivalent_rank") for r in runs),
            "step_time_s": _mean(r.get("step_time_s") for r in runs),
            "samples_per_s": _mean(r.get("samples_per_s") for r in runs),
            "peak_memory_mb": _max(r.get("peak_memory_mb") for r in runs),
            "sweeps": sorted({str(r["sweep"]) for r in runs if r.get("sweep") is not None}),
            "run_dirs": [r.get("run_dir") for r in runs],
            "values": values,
            "duplicate_seeds": sorted(s for s, c in seed_counts.items() if c > 1),
            "_key": key,
        })
    out.sort(key=lambda s: (str(s["model"]), str(s["dataset"]), s["_key"][4], _method_rank(s["method"]),
                            s["trainable"] if s["trainable"] is not None else -1, s["_key"][3]))
    for s in out:
        del s["_key"]
    return out


def _pivot_row_key(s: dict) -> tuple:
    return (str(s["model"]), _regime(s), _method_rank(s["method"]), str(s["method"]), _setting(s))


def setting_label(s: dict) -> str:
    if s.get("budget") is not None:
        return f"budget {_human(s['budget'])}"
    if s.get("r") is not None:
        return f"r={s['r']}"
    return "-"


def pivot(summary: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """Method x dataset table of mean metric, like the paper's tables.

    Returns ``(datasets, rows)``; one row per (model, shots/fraction, method, r or budget) with
    one key per dataset (mean, or None), ``average`` (mean over the datasets present) and
    ``n_datasets``.
    """
    datasets = sorted({str(s["dataset"]) for s in summary})
    rows: dict[tuple, dict] = {}
    for s in summary:
        k = _pivot_row_key(s)
        row = rows.setdefault(k, {"model": s["model"], "shots": s["shots"], "fraction": s["fraction"],
                                  "method": s["method"], "r": s["r"], "budget": s["budget"],
                                  "setting": setting_label(s), **{d: None for d in datasets}})
        row[str(s["dataset"])] = s["mean"]
    out = []
    for k in sorted(rows, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
        row = rows[k]
        vals = [row[d] for d in datasets if row[d] is not None]
        row["average"] = float(np.mean(vals)) if vals else None
        row["n_datasets"] = len(vals)
        out.append(row)
    return datasets, out


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def _human(x: Any) -> str:
    v = _num(x)
    if v is None:
        return ""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _is_fraction_metric(metric: str, summary: Sequence[dict]) -> bool:
    """Accuracy-like metrics stored in [0, 1] are shown in percent."""
    name = metric.rsplit("/", 1)[-1].lower()
    vals = [v for s in summary for _, v in s["values"] if v is not None and not math.isnan(v)]
    return "acc" in name and bool(vals) and all(0.0 <= v <= 1.0 for v in vals)


def _fmt(x: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    v = _num(x)
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    return format(v * scale, spec)


def _fmt_int(x: Any) -> str:
    v = _int(x)
    return "-" if v is None else f"{v:,}"


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ").strip() if x is not None else "-"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _display_path(path: Any) -> str:
    p = str(path)
    if p.startswith(("http://", "https://", "wandb:")):
        return p
    try:
        rel = os.path.relpath(p)
        return p if rel.startswith("..") else rel
    except ValueError:
        return p


def _natural(text: Any) -> list:
    """Sort key that puts job 2 before job 10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(text)) if t]


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


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, no pyplot state)
# --------------------------------------------------------------------------------------------

def _seed_average(entries: Sequence[dict]) -> tuple[float | None, float | None]:
    """Average over datasets, error over seeds: per-seed averages over the entries' datasets
    (seeds present in every entry), then their mean and std; mean of means if no seed is common."""
    per_seed = [dict((str(s), v) for s, v in e["values"]) for e in entries]
    common = set(per_seed[0]).intersection(*per_seed[1:]) if per_seed else set()
    if common:
        avgs = [float(np.mean([d[s] for d in per_seed])) for s in sorted(common)]
        return mean_std(avgs)
    means = [e["mean"] for e in entries if e["mean"] is not None]
    return (float(np.mean(means)) if means else None), None


def _method_colors(entries: Iterable[dict]) -> dict[str, Any]:
    """One colour per method, the same in every panel."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    methods = sorted({str(e["method"]) for e in entries}, key=_method_rank)
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _new_figure(n_panels: int, width: float = 4.6, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, max(1, n_panels))
    nrows = math.ceil(max(1, n_panels) / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _panel_title(model: str, dataset: str, regime: str | None, show_model: bool, show_regime: bool) -> str:
    parts = [dataset]
    if show_model:
        parts.append(model)
    if show_regime and regime:
        parts.append(regime)
    return ", ".join(parts)


def plot_acc_vs_params(summary: Sequence[dict], path: Path, metric: str, max_panels: int = 24) -> bool:
    """Metric vs trainable parameters (log x), one line per method, error bars over seeds; one
    panel per (dataset, model, data regime) plus an average-over-datasets panel. False if nothing
    to plot."""
    pts = [s for s in summary if s["trainable"] and s["mean"] is not None]
    if not pts:
        return False
    scale = 100.0 if _is_fraction_metric(metric, summary) else 1.0
    models = {str(s["model"]) for s in pts}
    regimes = {_regime(s) for s in pts}
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for s in pts:
        panels[(str(s["model"]), _regime(s), str(s["dataset"]))].append(s)
    # averaged panel per (model, regime) over its datasets; configs present on every dataset
    by_group: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for (model, reg, ds), entries in panels.items():
        by_group[(model, reg)][ds] = entries
    avg_panels: dict[tuple, list[dict]] = {}
    for (model, reg), per_ds in by_group.items():
        if len(per_ds) < 2:
            continue
        cfgs: dict[tuple, list[dict]] = defaultdict(list)
        for ds, entries in per_ds.items():
            for e in entries:
                cfgs[(str(e["method"]), _setting(e))].append(e)
        items = []
        for (method, _), entries in cfgs.items():
            if len(entries) != len(per_ds):
                continue
            mean, std = _seed_average(entries)
            items.append({"method": method, "trainable": float(np.mean([e["trainable"] for e in entries])),
                          "mean": mean, "std": std})
        if items:
            avg_panels[(model, reg, "average")] = items
    order = sorted(panels, key=lambda k: (k[0], k[1], k[2])) + sorted(avg_panels)
    order = order[:max_panels]
    colors = _method_colors(pts)
    fig, axes = _new_figure(len(order))
    from matplotlib.ticker import NullFormatter

    unit = " (%)" if scale == 100.0 else ""
    for ax, k in zip(axes, order):
        entries = panels.get(k) or avg_panels[k]
        model, reg, ds = k
        lines: dict[str, list[dict]] = defaultdict(list)
        for e in entries:
            lines[str(e["method"])].append(e)
        for method in sorted(lines, key=_method_rank):
            es = sorted(lines[method], key=lambda e: e["trainable"])
            x = [e["trainable"] for e in es]
            y = [e["mean"] * scale for e in es]
            err = [(e["std"] or 0.0) * scale for e in es]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method, color=colors[method])
        ax.set_xscale("log")
        xs = [e["trainable"] for e in entries]
        if max(xs) / min(xs) < 10:  # make sure a decade tick is in view, no crowded minor labels
            ax.set_xlim(min(xs) / 3.2, max(xs) * 3.2)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ds_title = "average over datasets" if ds == "average" else ds
        ax.set_title(_panel_title(model, ds_title, regime_label({"shots": reg[1]} if reg[0] == 0 else
                                                                  {"fraction": reg[1]}),
                                  len(models) > 1, len(regimes) > 1))
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(metric + unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return True


def plot_acc_vs_shots(summary: Sequence[dict], path: Path, metric: str, max_panels: int = 24) -> bool:
    """Metric vs data regime (1/2/4/16 shots, then 50 %/100 % of the data), one line per method;
    one panel per (dataset, model) whose regime varies, plus an average panel. False when no
    dataset has more than one regime."""
    pts = [s for s in summary if s["mean"] is not None]
    scale = 100.0 if _is_fraction_metric(metric, summary) else 1.0
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for s in pts:
        panels[(str(s["model"]), str(s["dataset"]))].append(s)
    panels = {k: v for k, v in panels.items() if len({_regime(e) for e in v}) > 1}
    if not panels:
        return False
    models = {k[0] for k in panels}
    avg: dict[tuple, list[dict]] = {}
    for model in sorted(models):
        dss = [k for k in panels if k[0] == model]
        if len(dss) < 2:
            continue
        cfgs: dict[tuple, list[dict]] = defaultdict(list)
        for k in dss:
            for e in panels[k]:
                cfgs[(str(e["method"]), _setting(e), _regime(e))].append(e)
        items = []
        for (method, setting, reg), entries in cfgs.items():
            if len(entries) != len(dss):
                continue
            mean, std = _seed_average(entries)
            first = entries[0]
            items.append({**{f: first[f] for f in ("method", "budget", "r", "shots", "fraction")},
                          "mean": mean, "std": std})
        if items:
            avg[(model, "average")] = items
    order = (sorted(panels) + sorted(avg))[:max_panels]
    colors = _method_colors(pts)
    markers = "osD^v<>"
    fig, axes = _new_figure(len(order))
    unit = " (%)" if scale == 100.0 else ""
    for ax, k in zip(axes, order):
        entries = panels.get(k) or avg[k]
        regs = sorted({_regime(e) for e in entries})
        xpos = {r: i for i, r in enumerate(regs)}
        settings_per_method: dict[str, set] = defaultdict(set)
        for e in entries:
            settings_per_method[str(e["method"])].add(_setting(e))
        lines: dict[tuple, list[dict]] = defaultdict(list)
        for e in entries:
            lines[(str(e["method"]), _setting(e))].append(e)
        for (method, setting) in sorted(lines, key=lambda ms: (_method_rank(ms[0]), ms[1])):
            es = sorted(lines[(method, setting)], key=_regime)
            n_before = sorted(settings_per_method[method]).index(setting)
            label = method if len(settings_per_method[method]) == 1 else f"{method} ({setting_label(es[0])})"
            ax.errorbar([xpos[_regime(e)] for e in es], [e["mean"] * scale for e in es],
                        yerr=[(e["std"] or 0.0) * scale for e in es], marker=markers[n_before % len(markers)],
                        capsize=3, label=label, color=colors[method])
        ax.set_xticks(range(len(regs)))
        ax.set_xticklabels([regime_label({"shots": v} if kind == 0 else {"fraction": v}) for kind, v in regs])
        model, ds = k
        ds_title = "average over datasets" if ds == "average" else ds
        ax.set_title(_panel_title(model, ds_title, None, len(models) > 1, False))
        ax.set_xlabel("training data (shots per class, or fraction)")
        ax.set_ylabel(metric + unit)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return True


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def render_markdown(rows: Sequence[dict], summary: Sequence[dict], metric: str, sources: Sequence[str],
                    plots: Sequence[tuple[str, str]] = ()) -> str:
    """The report as Markdown (tables, plot links, failed/unfinished jobs, notes)."""
    scale = 100.0 if _is_fraction_metric(metric, summary) else 1.0
    unit = " (%)" if scale == 100.0 else ""
    status_counts = Counter(r["status"] for r in rows)
    bad = [r for r in rows if r["status"] != "completed"]
    out = ["# Results report", ""]
    out.append(f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} from "
               + ", ".join(f"`{_display_path(s)}`" for s in sources) + ".")
    out.append(f"Jobs found: {len(rows)} (" + ", ".join(f"{n} {s}" for s, n in sorted(status_counts.items()))
               + f"). Metric: `{metric}`{unit}, mean ± sample std (ddof=1) over seeds.")
    out.append("")

    out += ["## Results by configuration", ""]
    if summary:
        header = ["Method", "Model", "Dataset", "Data", "r", "Budget", f"{metric}{unit}", "Seeds",
                  "Trainable params", "LoRA-eq. rank", "Step time (ms)", "Peak mem (MB)"]
        body = []
        for s in summary:
            acc = _fmt(s["mean"], ".2f", scale)
            if s["std"] is not None:
                acc += " ± " + _fmt(s["std"], ".2f", scale)
            body.append([s["method"], s["model"], s["dataset"], regime_label(s),
                         "-" if s["r"] is None else s["r"], _human(s["budget"]) or "-", acc,
                         s["n_seeds"], _fmt_int(s["trainable"]), _fmt(s["lora_equivalent_rank"], ".2f"),
                         _fmt(s["step_time_s"], ".2f", 1000.0), _fmt(s["peak_memory_mb"], ".0f")])
        out += [_md_table(header, body), ""]
    else:
        out += ["No completed job.", ""]

    datasets, prow = pivot(summary)
    if prow:
        out += [f"## Method × dataset (mean {metric}{', %' if unit else ''})", ""]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for p in prow:
            groups[(str(p["model"]), regime_label(p))].append(p)
        partial = False
        for (model, reg), ps in groups.items():
            ds_here = [d for d in datasets if any(p[d] is not None for p in ps)]
            out += [f"### {model}, {reg}", ""]
            body = []
            for p in ps:
                avg = _fmt(p["average"], ".2f", scale)
                if p["n_datasets"] < len(ds_here):
                    avg += "*"
                    partial = True
                body.append([p["method"], p["setting"]] + [_fmt(p[d], ".2f", scale) for d in ds_here] + [avg])
            out += [_md_table(["Method", "r / budget"] + ds_here + ["Average"], body), ""]
        if partial:
            out += ["\\* average over the datasets this configuration has results for.", ""]

    if plots:
        out += ["## Plots", ""]
        out += [f"![{title}]({name})" for name, title in plots] + [""]

    out += ["## Failed or unfinished jobs", ""]
    if bad:
        body = []
        for r in sorted(bad, key=lambda r: (r["status"], _natural(r["run_dir"]))):
            status = r["status"] + (" (unfinished)" if r["status"] == "running" else "")
            err = r.get("error") or ("no results.json" if r["status"] == "unfinished" else
                                     "(still running or killed)" if r["status"] == "running" else
                                     "(no error recorded)")
            body.append([_display_path(r["run_dir"]), status, r.get("method") or "-", r.get("dataset") or "-",
                         r.get("seed") if r.get("seed") is not None else "-",
                         " ".join(r.get("overrides") or []) or "-", err])
        out += [_md_table(["Job folder", "Status", "Method", "Dataset", "Seed", "Overrides", "Error"], body), ""]
    else:
        out += ["None.", ""]

    notes = []
    missing = [r for r in rows if r["status"] == "completed" and metric not in r["metrics"]]
    if missing:
        avail = sorted({k for r in missing for k in r["metrics"]})
        shown = sorted((_display_path(r["run_dir"]) for r in missing), key=_natural)
        more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
        notes.append(f"{len(missing)} completed job(s) have no `{metric}` metric (excluded from the means"
                     + (f"; they have: {', '.join(avail)}" if avail else "") + "): "
                     + ", ".join(f"`{p}`" for p in shown[:10]) + more)
    for s in summary:
        if s["duplicate_seeds"]:
            notes.append(f"{s['method']} / {s['model']} / {s['dataset']} / {setting_label(s)} / "
                         f"{regime_label(s)}: seed(s) {', '.join(s['duplicate_seeds'])} appear more than once "
                         "(re-runs or another hyper-parameter that is not part of the configuration key); "
                         "all runs are averaged")
        if isinstance(s["r"], str):
            notes.append(f"{s['method']} / {s['dataset']} / {setting_label(s)}: the rank differs between "
                         f"seeds (r = {s['r']})")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def write_report(folders: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                 metric: str = DEFAULT_METRIC, rows: Sequence[dict] | None = None) -> str:
    """Collect ``folders`` (plus any extra ``rows``, e.g. from W&B), write the report to ``out``
    (default ``<first folder>/report/``) and return its Markdown.

    Raises :class:`ReportError` when no job (no results.json, no job folder) was found.
    """
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
    write_csv(out / "pivot.csv", ["model", "shots", "fraction", "method", "r", "budget"] + datasets
              + ["average", "n_datasets"], prow)
    plots = []
    for name, fn, title in (("acc_vs_params.png", plot_acc_vs_params, f"{metric} vs trainable parameters"),
                            ("acc_vs_shots.png", plot_acc_vs_shots, f"{metric} vs training data")):
        target = out / name
        if fn(summary, target, metric):
            plots.append((name, title))
        elif target.exists():  # stale plot from an earlier report of other data
            target.unlink()
    sources = folders + sorted({r["source"] for r in (rows or [])})
    md = render_markdown(all_rows, summary, metric, sources, plots)
    (out / "report.md").write_text(md)
    return md


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m randlora.report",
                                description="Tables and plots from the results.json of training jobs.")
    p.add_argument("folders", nargs="*", help="run or multirun folders, searched recursively")
    p.add_argument("--out", default=None, help="output folder (default: <first folder>/report/)")
    p.add_argument("--metric", default=DEFAULT_METRIC, help=f"metric to tabulate (default: {DEFAULT_METRIC})")
    p.add_argument("--wandb-group", default=None, help="also pull the runs of this W&B group")
    p.add_argument("--wandb-project", default=None, help="W&B project ([entity/]project) of --wandb-group")
    p.add_argument("--wandb-entity", default=None, help="W&B entity (optional)")
    args = p.parse_args(argv)
    if not args.folders and not args.wandb_group:
        p.print_usage(sys.stderr)
        print("error: give at least one folder or --wandb-group", file=sys.stderr)
        return 2
    try:
        extra = []
        if args.wandb_group:
            if not args.wandb_project:
                raise ReportError("--wandb-group needs --wandb-project")
            extra = collect_wandb(args.wandb_group, args.wandb_project, args.wandb_entity)
        md = write_report(args.folders, args.out, args.metric, rows=extra)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    out = args.out or ((Path(args.folders[0]).parent if Path(args.folders[0]).is_file()
                        else Path(args.folders[0])) / "report")
    print(f"\nReport written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
