"""W&B runs as report rows (``--wandb-group``).

The training loggers (``randlora.training.loggers.publish_results``) put the results.json fields into each run: the
identifying fields and the flattened resolved config into its config (``adapter.r``, ``params.trainable``),
the results into its summary (``params/trainable``, ``perf/step_time_s``, the metrics). A metric with a W&B
summary aggregate (``val/acc``: ``{"max": .., "last": ..}``) is read as its last value, like results.json.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Sequence
from urllib.parse import urlparse

from ..results import IDENTIFYING, SCHEMA
from .collect import ReportError, normalize, num


def plain(obj: Any) -> Any:
    """W&B summary / config objects as plain dicts and lists; ``{"value": x}`` wrappers unwrapped."""
    if hasattr(obj, "_json_dict") and isinstance(getattr(obj, "_json_dict"), dict):
        obj = obj._json_dict
    if isinstance(obj, dict) or (hasattr(obj, "items") and callable(obj.items)):
        d = {str(k): plain(v) for k, v in obj.items()}
        if set(d) <= {"value", "desc"} and "value" in d:
            return d["value"]
        return d
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _aggregate_value(v: Any) -> Any:
    """A summary value, or the last (else max / min) of a define_metric aggregate dict."""
    if isinstance(v, dict):
        for k in ("last", "max", "min", "mean"):
            if k in v and not isinstance(v[k], dict):
                return v[k]
        return None
    return v


def lookup_any(sources: Sequence[dict], *keys: str) -> Any:
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


WANDB_STATE = {"finished": "completed", "failed": "failed", "crashed": "failed", "killed": "failed",
               "running": "running", "pending": "running"}
# where a field is when the run was logged by an older randlora (config "adapter": {...}, the Hydra config)
_FALLBACKS = {"method": ["adapter.method"], "r": ["adapter.r"], "budget": ["adapter.budget"], "model": ["model.name"],
              "dataset": ["data.name"], "task": ["task.kind"], "shots": ["data.shots"], "fraction": ["data.fraction"],
              "sweep": ["group"]}
_SECTIONS = ("params", "perf", "provenance", "budget_match", "lowrank")


def wandb_run_to_results(run: Any) -> dict:
    """A W&B run (``wandb.Api().runs(...)`` item) as a results.json-style dict.

    The run's summary and config hold the results.json keys (summary first): nested
    (``params: {trainable: ...}``) or flattened (``params/trainable``, ``params.trainable``).
    Metrics are ``metrics`` plus the summary's top-level ``split/name`` numbers such as ``test/acc``.
    The status is the results' own ``status`` unless W&B says the run crashed, failed or is running.
    """
    summary = plain(getattr(run, "summary", {}) or {})
    config = plain(getattr(run, "config", {}) or {})
    summary = summary if isinstance(summary, dict) else {}
    config = config if isinstance(config, dict) else {}
    src = [summary, config]
    out: dict = {}
    for key in IDENTIFYING + ("error", "overrides", "run_dir"):
        out[key] = lookup_any(src, key, *_FALLBACKS.get(key, []))
    if out["sweep"] is None and getattr(run, "group", None):
        out["sweep"] = run.group
    by_name = {f.name: f for f in SCHEMA}
    for section in _SECTIONS:
        out[section] = {f.name: lookup_any(src, f"{section}.{f.name}") for f in by_name[section].fields}
    if out["provenance"]["lr"] is None:
        out["provenance"]["lr"] = lookup_any([config], "optim.lr")
    metrics: dict = {}
    for d in (config, summary):  # summary wins
        m = d.get("metrics")
        if isinstance(m, dict):
            metrics.update(m)
    for k, v in summary.items():
        head = k.split("/", 1)[0]
        v = _aggregate_value(v)
        if "/" in k and not k.startswith("_") and head not in set(_SECTIONS) | {"system", "trainer"} \
                and num(v) is not None:
            metrics[k] = v
    out["metrics"] = metrics
    state = getattr(run, "state", None)
    status = lookup_any(src, "status")
    mapped = WANDB_STATE.get(str(state)) if state is not None else None
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
    """A W&B run as a report row (the same fields as the rows of ``collect``)."""
    return normalize(wandb_run_to_results(run), _wandb_address(run), source, None)


def _offline_reason() -> str | None:
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in {"offline", "disabled", "dryrun"}:
        return f"WANDB_MODE={mode}"
    if os.environ.get("WANDB_OFFLINE", "").strip().lower() in {"1", "true", "yes"}:
        return "WANDB_OFFLINE is set"
    return None


def _base_url() -> str:
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
    reason = _offline_reason()
    if reason:
        raise ReportError(f"cannot fetch W&B group '{group}': W&B is offline ({reason}); "
                          "unset it, or report from the local run folders instead")
    base_url = _base_url()
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
