"""Loggers from the ``logger`` config group. W&B falls back to offline mode (never a crash) when
there is no API key or no network, and says how to sync later."""
from __future__ import annotations

import os
import socket

from omegaconf import OmegaConf


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        auth = netrc.netrc().authenticators("api.wandb.ai")
        return bool(auth and auth[2])
    except Exception:
        return False


def wandb_reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> tuple[str, str | None]:
    """(mode, reason) where mode is online / offline / disabled."""
    env = os.environ.get("WANDB_MODE")
    if mode == "auto" and env:
        mode = env
    if mode in ("offline", "disabled", "dryrun"):
        return ("offline" if mode == "dryrun" else mode), None
    if not wandb_has_credentials():
        return "offline", "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if mode == "auto" and not wandb_reachable():
        return "offline", "api.wandb.ai is not reachable"
    return "online", None


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
    return tags


def default_group(cfg) -> str | None:
    """The sweep's name: ``group`` if set, else the multirun folder, so a sweep's jobs group together."""
    if cfg.get("group"):
        return str(cfg.group)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return os.path.basename(str(hc.sweep.dir).rstrip("/"))
    except Exception:
        pass
    return None


def build_loggers(cfg, out_dir: str, run_name: str, r=None):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    lcfg = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {}
    loggers, notes = [], []
    if "csv" in lcfg or not lcfg:
        loggers.append(CSVLogger(save_dir=out_dir, name="csv", version=""))
    if "tensorboard" in lcfg:
        loggers.append(TensorBoardLogger(save_dir=out_dir, name="tensorboard", version=""))
    if "wandb" in lcfg:
        w = dict(lcfg["wandb"])
        mode, why = resolve_wandb_mode(w.pop("mode", "auto"))
        if mode != "disabled":
            if why:
                notes.append(f"W&B: logging offline because {why}; sync later with `wandb sync {out_dir}/wandb/offline-run-*`")
            os.makedirs(out_dir, exist_ok=True)
            loggers.append(WandbLogger(name=run_name, save_dir=out_dir, offline=(mode == "offline"),
                                       project=w.get("project"), entity=w.get("entity"),
                                       group=w.get("group") or default_group(cfg),
                                       tags=sorted(set(list(w.get("tags") or []) + run_tags(cfg, r)))))
    return loggers, notes


def finish_wandb():
    """Close the W&B run of this job (one run per multirun job; never merged with the next)."""
    try:
        import sys
        if "wandb" in sys.modules:
            import wandb
            if wandb.run is not None:
                wandb.finish()
    except Exception:
        pass
