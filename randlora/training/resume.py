"""Where a job starts: from scratch, from its own run folder (``resume=<run folder>``), or from a
checkpoint file (``resume=<file>``, or ``train=false ckpt_path=<file>`` to evaluate one).

The checkpoint is read weights-only and verified before anything is built; a resume continues with
the run's recorded settings (a new override that changes what it computes is refused:
``randlora.training.folder.resume_config``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import folder as rf
from .checkpoints import load_checkpoint_file, newest_checkpoint, remove_stale_temporaries


def resume_dir(cfg) -> Path | None:
    """The earlier run's folder when ``resume=<run folder>`` (the run continues there), else None."""
    return Path(cfg.resume).resolve() if cfg.get("resume") and Path(cfg.resume).is_dir() else None


def output_dir(cfg) -> Path:
    """The run folder this job writes into: the resumed run's own, else Hydra's run folder (which
    Lightning hands to its DDP children with the command line)."""
    return resume_dir(cfg) or Path(cfg.paths.output_dir).resolve()


def checkpoint_path(cfg) -> str | None:
    """The checkpoint to start from: for ``resume=<run folder>`` the newest complete checkpoint in its
    ``checkpoints/`` (``last.ckpt``, or a newer top-k file when a kill came between the two saves);
    ``resume=<file>`` or ``ckpt_path=<file>`` that file; None for a fresh run."""
    if cfg.get("resume"):
        run = Path(cfg.resume)
        if run.is_dir():
            remove_stale_temporaries(run / "checkpoints")
            remove_stale_temporaries(run)
            ckpt = newest_checkpoint(run / "checkpoints")
            if ckpt is None:
                raise UserError(f"resume={cfg.resume}: no checkpoint at {run / 'checkpoints' / 'last.ckpt'} (a run "
                                "folder must contain checkpoints/last.ckpt)")
            if ckpt.name != "last.ckpt":
                print(f"[randlora] resuming from {ckpt.name}: the newest complete checkpoint of the run",
                      file=sys.stderr, flush=True)
            return str(ckpt)
        if not run.is_file():
            raise UserError(f"resume={cfg.resume}: no checkpoint at {run} (a run folder must contain "
                            "checkpoints/last.ckpt)")
        return str(run)
    if cfg.get("ckpt_path"):
        if not Path(cfg.ckpt_path).is_file():
            raise UserError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return str(cfg.ckpt_path)
    return None


@dataclass
class Start:
    """A job's starting point: ``cfg`` to run with (a resume's recorded settings), its ``overrides``, and,
    when it starts from a checkpoint, the checkpoint's path, contents and run record."""

    cfg: object
    overrides: list[str]
    ckpt: str | None = None
    state: dict | None = None
    record: dict | None = None
    resumed_from: dict | None = None
    in_own_folder: bool = False   # resume=<run folder>: the run continues where it was
    epoch: int | None = None      # ExactResume's epoch of the checkpoint
    global_step: int = 0          # of the checkpoint

    @property
    def resume_step(self) -> int | None:
        """The global step a training resume in the run's own folder continues from (its CSV rows after
        it are replayed), else None."""
        if self.ckpt is None or not self.cfg.train or not self.in_own_folder:
            return None
        return self.global_step


def plan(cfg, overrides: list[str]) -> Start:
    """Where ``cfg`` starts. ``overrides``: this command's Hydra overrides."""
    ckpt = checkpoint_path(cfg)
    if ckpt is None:
        return Start(cfg, [o for o in overrides if not rf.is_attempt(rf.override_key(o))])
    state = load_checkpoint_file(ckpt)
    record = state.get("randlora_run")
    resuming = bool(cfg.get("resume")) or bool(cfg.train)
    run_dir = resume_dir(cfg)
    previous = rf.read_results(run_dir / "results.json") if run_dir is not None else None
    recorded_config = (record or {}).get("config") or (previous or {}).get("config")
    recorded_overrides = rf.recorded_overrides(run_dir, record, previous)
    current = rf.current_overrides()
    kept = [o for o in (current or []) if not rf.is_attempt(rf.override_key(o))]
    if resuming and recorded_config:
        from .config import resolve  # the record holds the resolved config: compare like with like
        cfg, kept = rf.resume_config(resolve(cfg), recorded_config, recorded_overrides, current,
                                     compose=rf.hydra_compose if current is not None else None)
    elif resuming:
        print(f"[randlora] warning: {ckpt} holds no record of its run's settings (written by an older randlora); "
              "the settings, base model and dataset of this resume are not checked against it", file=sys.stderr,
              flush=True)
    resumed = (state.get("callbacks") or {}).get("ExactResume") or {}
    epoch = resumed.get("epoch", state.get("epoch"))
    return Start(cfg, kept, ckpt=ckpt, state=state, record=record, in_own_folder=run_dir is not None,
                 resumed_from={"checkpoint": str(ckpt), "global_step": int(state.get("global_step", 0)),
                               "epoch": epoch},
                 epoch=resumed.get("epoch"), global_step=int(state.get("global_step", 0)))
