"""Loggers from the ``logger`` config group.

W&B can neither fail a run nor hold it up for long, whatever the mode, API key or server:

1. ``WANDB_MODE`` set to something wandb does not accept (an empty string, a typo) is ignored with a
   note; wandb itself would stop the run with a validation traceback.
2. Online logging is tried only with credentials for the server wandb will actually use (its own
   settings: ``WANDB_BASE_URL``, the settings files, its default host), and only when that server answers
   an HTTP request within ``logger.wandb.probe_timeout`` seconds. Without network, DNS or an answer, the
   run logs offline at once (an unanswered ``wandb.init`` would wait ~100 s, then fail the run).
3. ``wandb.init`` runs here, before training, with ``init_timeout`` (and the same login timeout). If it
   fails online, the run logs offline; if offline fails too (an unwritable ``wandb/`` folder), the run
   goes on without W&B. Each fall-back prints one line; CSV metrics are written in every case.
4. ``finish_timeout`` bounds the upload at the end of an online run; what is not uploaded stays in
   ``<run dir>/wandb/`` for ``wandb sync``.

Worst case before training starts: about probe_timeout + init_timeout + 10 s (wandb's own grace period),
only when a server answers the probe and then stalls the run's creation; 0-3 s in the usual offline cases.

What a W&B run holds, so a dashboard answers the paper's questions (``wandb_init_config``,
``define_metrics``, ``publish_results``):

* grouped by sweep (``group``, else the multirun folder) and tagged ``method:``, ``budget:``, ``data:``,
  ``shots:``, ``fraction:``, ``model:``, ``seed:``, ``r:``; the name says method, budget or rank, shots;
* the config flattened to dot keys (``adapter.r``, ``optim.lr``, ``data.shots``) plus the results.json
  identifying fields (``method``, ``budget``, ``dataset`` ...) and, once the job completes, ``params.trainable``,
  ``params.adapter``, ``provenance.lr``, ``budget_match.deviation``: W&B's parallel-coordinates and scatter
  panels plot them against the metrics;
* the summary sorts: ``val/acc`` keeps its max and last, ``val/loss`` its min and last, and the job's
  results go in as ``params/*``, ``perf/*`` (``perf/step_time_s``, ``perf/peak_memory_mb``), ``status``.
"""
from __future__ import annotations

import os
import sys
import threading
from urllib.parse import urlsplit

from omegaconf import OmegaConf

from ..results import flatten

WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")
DEFAULT_BASE_URL = "https://api.wandb.ai"


def _note(text: str) -> None:
    print(f"[randlora] {text}", file=sys.stderr, flush=True)


def sanitize_wandb_mode_env() -> str | None:
    """Drop a ``WANDB_MODE`` that wandb would refuse (wandb validates it when it loads its settings,
    before any mode passed to ``wandb.init`` applies); the note to print, or None."""
    env = os.environ.get("WANDB_MODE")
    if env is None or env in WANDB_MODES:
        return None
    os.environ.pop("WANDB_MODE")
    return (f"W&B: WANDB_MODE={env!r} is not a W&B mode (online, offline, disabled) and is ignored; "
            f"unset it or set one of those")


def _settings():
    """wandb's global settings, loaded from the current environment (what ``wandb.init`` will use)."""
    from wandb.sdk import wandb_setup
    wl = wandb_setup.singleton()
    if wl.settings_if_loaded is not None and wl.did_environment_change() and not wandb_run_active():
        # settings loaded under another environment earlier in this process (a previous job of an
        # in-process sweep, a test): wandb would ignore the change, so start from the current one
        import wandb
        wandb.teardown()
        wl = wandb_setup.singleton()
    return wl.settings


def wandb_run_active() -> bool:
    import wandb
    return wandb.run is not None


def wandb_base_url() -> str:
    """The server wandb will talk to (``WANDB_BASE_URL``, the settings files or wandb's default)."""
    try:
        return str(_settings().base_url)
    except Exception:  # noqa: BLE001 - settings that do not load: the variable, else wandb's default
        try:
            from wandb.sdk.lib.urls import DEFAULT_BASE_URL as default
        except Exception:  # noqa: BLE001
            default = DEFAULT_BASE_URL
        return os.environ.get("WANDB_BASE_URL") or default


def wandb_has_credentials(base_url: str | None = None) -> bool:
    """An API key (or identity token) wandb would use for ``base_url``: the environment, ``~/.netrc``
    for that host, or the settings."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    url = base_url or wandb_base_url()
    try:
        from wandb.sdk.lib.wbauth import wbnetrc
        if wbnetrc.read_netrc_auth(host=url):
            return True
    except Exception:  # noqa: BLE001 - fall back to reading ~/.netrc for the host
        try:
            import netrc
            auth = netrc.netrc().authenticators(urlsplit(url).netloc or url)
            if auth and auth[2]:
                return True
        except Exception:  # noqa: BLE001
            pass
    try:
        return bool(_settings().api_key)
    except Exception:  # noqa: BLE001
        return False


def probe_server(url: str, timeout: float = 3.0) -> str | None:
    """None when the server at ``url`` answers an HTTP request within ``timeout`` seconds, else why
    not. Any HTTP status below 500 counts as an answer. The request runs in a thread so that a slow
    DNS lookup (which socket timeouts do not cover) is bounded too."""
    import urllib.error
    import urllib.request

    result: dict = {}

    def ask():
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=timeout) as r:
                result["status"] = r.status
        except urllib.error.HTTPError as e:
            result["status"] = e.code
        except Exception as e:  # noqa: BLE001 - any failure means: not reachable
            result["error"] = f"{type(e).__name__}: {getattr(e, 'reason', e)}"

    t = threading.Thread(target=ask, daemon=True, name="randlora-wandb-probe")
    t.start()
    t.join(timeout + 0.5)
    if "status" in result:
        return None if result["status"] < 500 else f"it answered HTTP {result['status']}"
    return result.get("error") or f"no answer within {timeout:g} s"


def reachable(url: str, timeout: float = 3.0) -> bool:
    return probe_server(url, timeout) is None


def resolve_wandb_mode(mode: str, probe_timeout: float = 3.0) -> tuple[str, str | None]:
    """(mode, reason) where mode is online / offline / disabled; the reason says why not online."""
    env = os.environ.get("WANDB_MODE")
    if mode == "auto" and env in WANDB_MODES:
        mode = env
    if mode in ("offline", "dryrun"):
        return "offline", None
    if mode == "disabled":
        return "disabled", None
    url = wandb_base_url()
    if not wandb_has_credentials(url):
        return "offline", f"no W&B API key for {url} (set WANDB_API_KEY or run `wandb login`)"
    why = probe_server(url, probe_timeout)
    if why is not None:
        return "offline", f"the W&B server {url} is not reachable ({why})"
    return "online", None


def init_wandb(mode: str, init: dict, timeouts: dict) -> tuple[object | None, str | None]:
    """``wandb.init`` in ``mode`` (online / offline), falling back to offline, then to no W&B.
    Returns (the run or None, why it is not online or None); prints one line per fall-back."""
    import wandb
    settings = {"init_timeout": float(timeouts.get("init_timeout") or 10),
                "login_timeout": float(timeouts.get("init_timeout") or 10),
                "finish_timeout": float(timeouts.get("finish_timeout") or 30)}
    why = None
    for m in (["online", "offline"] if mode == "online" else ["offline"]):
        try:
            return wandb.init(mode=m, settings=wandb.Settings(**settings), **init), why
        except Exception as e:  # noqa: BLE001 - any wandb failure: fall back, never fail the run
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"wandb.init ({m}) failed: {type(e).__name__}: {first}"[:400]
            try:
                if wandb.run is not None:
                    wandb.run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
            _note(f"W&B: {why}; " + ("logging offline instead" if m == "online" else
                                     "this run does not log to W&B (metrics are in the csv/ folder)"))
    return None, why


def wandb_init_config(cfg) -> dict:
    """The W&B config of a job at its start: the resolved config flattened to dot keys (``adapter.r``,
    ``optim.lr``), then the results.json identifying fields (``method``, ``dataset``, ``budget`` ...)."""
    from ..results import summary_fields
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - a Hydra-runtime interpolation outside a Hydra job
        resolved = OmegaConf.to_container(cfg, resolve=False)
    return {**flatten(resolved), **summary_fields(cfg)}


# metrics whose W&B summary keeps the best value next to the last (for sorting the runs table)
SUMMARY_AGGREGATES = {"val/acc": "max,last", "val/ll_acc": "max,last", "val/loss": "min,last"}


def define_metrics(run) -> None:
    """Lightning's x-axis (``trainer/global_step``: it defines it only for a run it starts itself) and the
    summary aggregates of ``SUMMARY_AGGREGATES``."""
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    for name, summary in SUMMARY_AGGREGATES.items():
        run.define_metric(name, summary=summary)


def wandb_run_name(cfg, run_name: str, r=None) -> str:
    """The W&B run name: ``run_name`` plus what tells apart the jobs of one sweep that share it (budget or
    rank, shots or fraction)."""
    parts = [run_name]
    if cfg.adapter.get("budget") is not None:
        parts.append(f"b{float(cfg.adapter.budget):g}")
    elif r is not None and cfg.adapter.get("method") != "full":
        parts.append(f"r{r}")
    if cfg.data.get("shots"):
        parts.append(f"k{cfg.data.shots}")
    elif cfg.data.get("fraction", 1.0) not in (None, 1, 1.0):
        parts.append(f"f{float(cfg.data.fraction):g}")
    return "-".join(parts)


def run_tags(cfg, r=None) -> list[str]:
    """W&B tags of a job: the user's tags plus method / rank / budget / data / model / seed."""
    tags = [str(t) for t in (cfg.get("tags") or [])]
    tags += [f"method:{cfg.adapter.method}", f"data:{cfg.data.name}", f"model:{cfg.model.name}",
             f"seed:{cfg.seed}"]
    if r is not None:
        tags.append(f"r:{r}")
    if cfg.adapter.get("budget") is not None:
        tags.append(f"budget:{float(cfg.adapter.budget):g}")
    if cfg.data.get("shots"):
        tags.append(f"shots:{cfg.data.shots}")
    if cfg.data.get("fraction", 1.0) not in (None, 1, 1.0):
        tags.append(f"fraction:{float(cfg.data.fraction):g}")
    return tags


def default_group(cfg) -> str | None:
    """The sweep's name: ``group`` if set, else the multirun folder, so a sweep's jobs group together."""
    if cfg.get("group"):
        return str(cfg.group)
    sweep = os.environ.get("RANDLORA_SWEEP_DIR")  # a job of a local multirun, run in its own process
    if sweep:
        return os.path.basename(sweep.rstrip("/"))
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return os.path.basename(str(hc.sweep.dir).rstrip("/"))
    except Exception:
        pass
    return None


_FLAT_LOGGER = None


def flat_wandb_logger():
    """Lightning's WandbLogger whose ``log_hyperparams`` flattens nested values to dot keys, like the
    run's config (``{"adapter": {"r": 4}}`` became a nested ``adapter`` next to ``adapter.r``)."""
    global _FLAT_LOGGER
    if _FLAT_LOGGER is None:
        from lightning.fabric.utilities.logger import _convert_params
        from lightning.pytorch.loggers import WandbLogger

        class FlatWandbLogger(WandbLogger):
            def log_hyperparams(self, params) -> None:
                super().log_hyperparams(flatten(_convert_params(params)))

        _FLAT_LOGGER = FlatWandbLogger
    return _FLAT_LOGGER


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    return getattr(rank_zero_only, "rank", 0) == 0


def build_loggers(cfg, out_dir: str, run_name: str, r=None):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    lcfg = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {}
    loggers, notes = [], []
    if "csv" in lcfg or not lcfg:
        loggers.append(CSVLogger(save_dir=out_dir, name="csv", version=""))
    if "tensorboard" in lcfg:
        loggers.append(TensorBoardLogger(save_dir=out_dir, name="tensorboard", version=""))
    if "wandb" in lcfg:
        w = dict(lcfg["wandb"] or {})
        bad_env = sanitize_wandb_mode_env()
        if bad_env and _is_rank_zero():
            _note(bad_env)
        mode, why = resolve_wandb_mode(w.pop("mode", "auto") or "auto", float(w.get("probe_timeout") or 3))
        if mode != "disabled":
            init = dict(name=wandb_run_name(cfg, run_name, r), dir=out_dir, project=w.get("project"),
                        entity=w.get("entity"), group=w.get("group") or default_group(cfg),
                        tags=sorted(set(list(w.get("tags") or []) + run_tags(cfg, r))), config=wandb_init_config(cfg))
            os.makedirs(out_dir, exist_ok=True)
            if not _is_rank_zero():  # other ranks log nothing (WandbLogger gives them a dummy run)
                loggers.append(WandbLogger(save_dir=out_dir, project=init["project"], offline=mode == "offline"))
                return loggers, notes
            if why:
                _note(f"W&B: logging offline because {why}")
            run, failed = init_wandb(mode, init, w)
            if run is not None:
                try:
                    define_metrics(run)
                except Exception as e:  # noqa: BLE001 - the dashboard's sorting must never fail a run
                    _note(f"W&B: define_metric failed ({type(e).__name__}: {e}); summaries keep the last values")
            if run is None:
                notes.append(f"W&B: not logged ({failed}); the metrics are in {out_dir}/csv")
            else:
                offline = run.settings.mode in ("offline", "dryrun")
                why = why or failed
                if offline and why:
                    notes.append(f"W&B: logging offline because {why}; sync later with "
                                 f"`wandb sync {out_dir}/wandb/offline-run-*`")
                loggers.append(flat_wandb_logger()(experiment=run, save_dir=out_dir, project=init["project"],
                                                   offline=offline))
    return loggers, notes


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def results_config(record: dict) -> dict:
    """The W&B config keys of a results.json record: its identifying fields, ``params.*``, the learning
    rate it trained with (``provenance.lr``) and the budget match (``budget_match.achieved`` / ``deviation``)."""
    from ..results import IDENTIFYING
    out = {k: record.get(k) for k in IDENTIFYING}
    out.update({f"params.{k}": v for k, v in (record.get("params") or {}).items() if _scalar(v)})
    lr = (record.get("provenance") or {}).get("lr")
    if lr is not None:
        out["provenance.lr"] = lr
    match = record.get("budget_match") or {}
    out.update({f"budget_match.{k}": match[k] for k in ("achieved", "deviation") if k in match})
    return out


def results_summary(record: dict, logged=()) -> dict:
    """The W&B summary keys of a results.json record: ``status`` (and ``error``), ``params/*``, the scalar
    ``perf/*``, the budget deviation, the scalar ``lowrank/*`` ("full rank matters") and the metrics not already in the summary (``logged``: those the trainer logged keep the
    summary W&B made of them, e.g. val/acc's max and last)."""
    out = {"status": record.get("status")}
    if record.get("error"):
        out["error"] = record["error"]
    out.update({f"params/{k}": v for k, v in (record.get("params") or {}).items() if _scalar(v) and v is not None})
    out.update({f"perf/{k}": v for k, v in (record.get("perf") or {}).items() if _scalar(v) and v is not None})
    logged = set(logged)
    out.update({k: v for k, v in (record.get("metrics") or {}).items() if k not in logged})
    match = record.get("budget_match") or {}
    if "deviation" in match:
        out["budget_match/deviation"] = match["deviation"]
    out.update({f"lowrank/{k}": v for k, v in (record.get("lowrank") or {}).items() if _scalar(v) and v is not None})
    return out


def publish_results(loggers, record: dict) -> None:
    """Put a job's results.json ``record`` into its W&B run (config: ``results_config``; summary:
    ``results_summary``), so the runs table sorts by accuracy and the panels plot it against trainable
    parameters and step time. Loggers that are not W&B, and the placeholder run of DDP ranks other than
    0, are skipped. Call after the record is final; a failure here is the caller's to report (a
    finished job stays finished)."""
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.loggers.logger import DummyExperiment
    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        run = lg.experiment
        if isinstance(run, DummyExperiment):
            continue
        run.config.update(results_config(record), allow_val_change=True)
        try:
            logged = list(run.summary.keys())
        except Exception:  # noqa: BLE001 - a summary that cannot list its keys: write every metric
            logged = []
        run.summary.update(results_summary(record, logged))


def finish_wandb():
    """Close the W&B run of this job (one run per multirun job; never merged with the next)."""
    try:
        if "wandb" in sys.modules:
            import wandb
            if wandb.run is not None:
                wandb.finish()
    except Exception:
        pass


def lightning_lines_once() -> None:
    """Lightning's package logger (``lightning``) prints its lines ("GPU available ...") with a console
    handler of its own and also passes them to the root logger, whose handlers (Hydra's: stdout and the
    run's ``train.log``) print them again: every line appeared twice. When the root logger has handlers,
    Lightning's own console handlers are removed and its lines go through the root's only."""
    import logging
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:
                lg.removeHandler(h)
        lg.propagate = True


def to_log_files(text: str) -> None:
    """Append ``text`` to the files the root logger writes (the run's ``train.log``), not to the console
    (where it has been printed already)."""
    import logging
    record = logging.LogRecord("randlora", logging.INFO, __file__, 0, text, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)
