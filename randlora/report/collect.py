"""Finding jobs and reading their ``results.json`` into report rows.

A row is one job: the fields ``randlora.results.report_fields()`` names (flattened: ``trainable``,
``step_time_s``, ``lr`` ...), ``metrics`` (name -> number), ``status`` / ``error``, the job's folder
(``run_dir``), the folder it was collected from (``source``) and its command-line ``overrides``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from ..results import RESULTS_FILE, lookup, report_fields

SKIP_DIRS = {".hydra", ".git", "__pycache__", ".pytest_cache", "wandb"}  # wandb/: W&B's local files


class ReportError(Exception):
    """A problem the user can fix (nothing found, W&B unreachable); the CLI exits with status 2."""


def num(x: Any) -> float | None:
    """A float, or None for missing / non-numeric values (NaN is kept)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def as_int(x: Any) -> int | None:
    v = num(x)
    if v is None or math.isnan(v) or math.isinf(v):
        return None
    return int(round(v))


def _coerce(value: Any, type_: str) -> Any:
    types = type_.split("|")
    if "integer" in types:
        return as_int(value)
    if "number" in types:
        return num(value)
    if "array" in types:
        if value is None:
            return []
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return value


def normalize(raw: dict, job_dir: str, source: str, results_file: str | None) -> dict:
    """One results.json-style dict as a report row (see the module docstring)."""
    row: dict = {}
    for path, f in report_fields():
        row[f.column] = _coerce(lookup(raw, path), f.type)
    metrics = raw.get("metrics") if isinstance(raw.get("metrics"), dict) else {}
    row["status"] = str(row["status"]) if row["status"] is not None else "unknown"
    row["fraction"] = 1.0 if row["fraction"] is None else row["fraction"]
    row["metrics"] = {str(k): num(v) for k, v in metrics.items() if num(v) is not None}
    tasks = lookup(raw, "config.data.tasks")
    row["tasks"] = [str(t) for t in tasks] if isinstance(tasks, list) else None
    row.update(run_dir=job_dir, source=source, results_file=results_file)
    return row


def read_overrides(hydra_dir: Path) -> list[str]:
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
        row = normalize({}, job_dir, source, str(results))
        row["status"] = "unreadable"
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")
        row["overrides"] = read_overrides(results.parent / ".hydra")
        return row
    row = normalize(raw, job_dir, source, str(results))
    if not row["overrides"]:
        row["overrides"] = read_overrides(results.parent / ".hydra")
    return row


def _unfinished_job(job_dir: Path, source: str) -> dict:
    row = normalize({}, str(job_dir.resolve()), source, None)
    row["status"] = "unfinished"
    row["error"] = None
    row["overrides"] = read_overrides(job_dir / ".hydra")
    return row


def collect(folders: Iterable[str | os.PathLike]) -> list[dict]:
    """Every job under ``folders`` (searched recursively), one row per job.

    A job is a folder holding ``results.json`` or, when that file is missing, a Hydra ``.hydra/``
    folder (status ``"unfinished"``). A results.json that cannot be parsed gives status
    ``"unreadable"``. A folder that does not exist raises :class:`ReportError`. The same job reached
    twice is listed once.
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
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            key = str(here.resolve())
            if key in seen:
                continue
            if RESULTS_FILE in filenames or has_hydra:
                # a run's resumes/<time>/ folders hold each resume's own Hydra log and config, and a re-run
                # sweep job's reruns/<time>/ its earlier files: not jobs
                dirnames[:] = [d for d in dirnames if d not in ("resumes", "reruns")]
            if RESULTS_FILE in filenames:
                seen.add(key)
                rows.append(_load_job(here / RESULTS_FILE, str(folder)))
            elif has_hydra:
                seen.add(key)
                rows.append(_unfinished_job(here, str(folder)))
    return rows
