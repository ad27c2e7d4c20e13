"""Re-running a local multirun into its own sweep folder continues it.

``python train.py -m <the same overrides> hydra.sweep.dir=<the sweep's folder>`` (the default sweep folder
has a timestamp, so a re-run names it) treats each job of the sweep as follows:

* **match**: a job is matched to an existing job folder by its overrides (the folder's
  ``.hydra/overrides.yaml``), not by its number, so a re-run whose order or extent differs (a value
  added to a swept key) still finds each job. Overrides are compared as Hydra parses them (``+k=v``,
  ``++k=v`` and ``k=v`` are one override; ``1e-3`` is ``0.001``), in any order. Only overrides that change
  neither what a job computes nor what it reads (``NOT_IDENTITY``: ``callbacks.*``, ``logger``,
  ``data.num_workers``, ...) are left out of the match: ``train``, ``ckpt_path``, ``adapter.from_peft``,
  ``model.pretrained``, ``data.path`` and the rest identify a job (an evaluation is not its training, a
  job on other weights is another job).
* **skip** a matched job whose ``results.json`` says ``completed``: nothing of its folder is written, and
  its objective (an Optuna search's return value) is read from that file;
* **resume** a matched job that was interrupted (no results.json, ``running``, or ``failed`` because a
  signal killed it or the sweep was stopped) and has a checkpoint: it continues in its folder with the
  single-run resume (``resume=<job folder>``; that attempt's Hydra config and log go to
  ``<job>/resumes/<time>/``);
* **re-run** any other matched job (``failed`` by an error of its own, or interrupted before its first
  checkpoint): its earlier files move to ``<job>/reruns/<time>/`` (never deleted), then it runs afresh;
* **new**: a job without a folder gets the lowest folder number not in use.

Refused before any job runs (:class:`SweepResume`, a Hydra callback; one line, exit status 2): a sweep
folder any of whose job folders holds a config that differs from the config its recorded overrides
compose to now in anything that changes the computation (a YAML default edited between the two runs),
naming the job folder and the keys. Every job folder of the sweep is checked, not only those of the
re-run's jobs: a sweep folder holds one configuration of the config files. Also refused: a job folder
another process still writes (its lock), and a sweep folder another re-run holds (the sweep folder is
locked while a sweep runs in it).

Only Hydra's basic launcher (the default; each job in a process of its own, randlora/training/launch.py)
continues a sweep: with ``hydra/launcher=slurm`` or ``submitit_local`` a sweep folder that holds jobs is
refused as before.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback

from . import folder as rf
from .launch import BASIC_LAUNCHER, local_multirun

RERUNS = "reruns"   # <job>/reruns/<time>/: a re-run job's earlier files
ACTIONS = ("skipped", "resumed", "re-run", "new")


def _say(text: str) -> None:
    print(f"[randlora] {text}", file=sys.stderr, flush=True)


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")


# Overrides a re-run may add, drop or change and still find its job: they change neither what the job
# computes nor what it reads (kill_at_step is how a job is stopped on purpose; resume is the sweep's own).
# Every other override identifies the job. Leaving a key in costs at most a job run again; leaving one out
# that matters would skip a job on another job's results.
NOT_IDENTITY = ("resume", "callbacks", "logger", "hydra", "data.num_workers", "trainer.enable_progress_bar",
                "trainer.log_every_n_steps", "tags", "group", "task_name", "optimized_metric")


def canonical_override(override: str) -> tuple[str, str]:
    """(key, value) of one override as Hydra parses it: the ``+`` / ``++`` prefix dropped, the value in
    one spelling (``1e-3`` and ``0.001`` alike); a deletion keeps its ``~``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        ov = OverridesParser.create().parse_overrides([str(override)])[0]
    except Exception:  # noqa: BLE001 - not an override Hydra parses: compared as written
        return rf.override_key(str(override)), str(override)
    key = ov.key_or_group + (f"@{ov.package}" if ov.package else "")
    if ov.is_delete():
        return key, f"~{override}"
    value = ov.value()
    return key, value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def match_key(overrides) -> tuple:
    """What identifies a job among the folders of its sweep: its overrides but those in ``NOT_IDENTITY``,
    canonical (:func:`canonical_override`) and sorted."""
    out = []
    for o in overrides:
        key, value = canonical_override(o)
        if not any(key == p or key.startswith(p + ".") for p in NOT_IDENTITY):
            out.append(value if value.startswith("~") else f"{key}={value}")
    return tuple(sorted(out))


def recorded_job_overrides(job_dir: Path) -> list[str] | None:
    """The overrides a job folder's ``.hydra/overrides.yaml`` records; None when there is none, or it is not
    a list (an empty or half-written file matches no job)."""
    p = Path(job_dir) / ".hydra" / "overrides.yaml"
    if not p.is_file():
        return None
    from omegaconf import ListConfig, OmegaConf
    try:
        recorded = OmegaConf.load(p)
    except Exception:  # noqa: BLE001 - an unreadable record matches no job
        return None
    return [str(o) for o in recorded] if isinstance(recorded, ListConfig) else None


def job_state(job_dir: Path) -> str:
    """``completed``, ``interrupted`` (stopped from outside, with a checkpoint to continue from) or
    ``failed`` (an error of its own, or stopped before its first checkpoint)."""
    from .checkpoints import newest_checkpoint
    path = Path(job_dir) / "results.json"
    res = rf.read_results(path)
    if res is None and path.exists():
        return "failed"  # a damaged record: nothing says where the job stood (run again, the file kept in reruns/)
    res = res or {}
    status = res.get("status")
    if status == "completed":
        return "completed"
    stopped = status in (None, "running") or (
        status == "failed" and (bool((res.get("exit") or {}).get("signal"))
                                or str(res.get("error") or "").startswith("stopped:")))
    try:
        ckpt = newest_checkpoint(Path(job_dir) / "checkpoints")
    except Exception:  # noqa: BLE001 - an unreadable checkpoint: run the job again
        ckpt = None
    return "interrupted" if stopped and ckpt is not None else "failed"


def config_diffs(recorded: dict, composed: dict) -> list[str]:
    """The keys that change what a job computes on which two task configs (unresolved) differ."""
    a, b = rf.computed_config(recorded), rf.computed_config(composed)
    missing = object()
    return [k for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def move_to_reruns(job_dir: Path) -> Path:
    """Move everything of ``job_dir`` but its earlier re-runs (and its lock) into ``<job>/reruns/<time>/``."""
    dest = job_dir / RERUNS / _stamp()
    dest.mkdir(parents=True)
    for p in sorted(job_dir.iterdir()):
        if p.name not in (RERUNS, ".lock"):
            os.replace(p, dest / p.name)
    return dest


@dataclass
class Job:
    folder: Path
    action: str  # one of ACTIONS


class Sweep:
    """The job folders of one sweep folder, as found when the sweep started, and what this process does
    with each job."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.found: dict[tuple, list[Path]] = {}  # match key -> job folders, by number
        dirs = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        for p in sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
            ov = recorded_job_overrides(p)
            if ov is not None:
                self.found.setdefault(match_key(ov), []).append(p)
        self.taken = {p.name for p in folder.iterdir()} if folder.is_dir() else set()  # files too
        self.jobs: dict[int, Job] = {}  # by Hydra's job number
        self.counts = dict.fromkeys(ACTIONS, 0)

    def folders(self) -> list[Path]:
        return [p for ps in self.found.values() for p in ps]

    def job(self, num: int, overrides) -> Job:
        """The folder and action of job ``num`` (decided once; a re-run job's earlier files are moved here)."""
        if num in self.jobs:
            return self.jobs[num]
        claimed = {j.folder.name for j in self.jobs.values()}
        candidates = [p for p in self.found.get(match_key(overrides), []) if p.name not in claimed]
        if candidates:
            folder = candidates[0]
            state = job_state(folder)
            action = {"completed": "skipped", "interrupted": "resumed"}.get(state, "re-run")
            label = " ".join(map(str, overrides))
            if action == "skipped":
                _say(f"job {folder.name} ({label}): completed earlier, skipped")
            elif action == "resumed":
                _say(f"job {folder.name} ({label}): interrupted, resuming it from its checkpoint")
            else:
                dest = move_to_reruns(folder)
                _say(f"job {folder.name} ({label}): failed earlier, running it again (its earlier files: {dest})")
        else:
            n = 0
            while str(n) in self.taken:
                n += 1
            folder, action = self.folder / str(n), "new"
        self.taken.add(folder.name)
        self.jobs[num] = Job(folder, action)
        self.counts[action] += 1
        return self.jobs[num]


_SWEEPS: dict[str, Sweep] = {}


def _sweep(folder) -> Sweep:
    key = str(Path(str(folder)).resolve())
    if key not in _SWEEPS:
        _SWEEPS[key] = Sweep(Path(key))
    return _SWEEPS[key]


def _local_multirun_job():
    """(HydraConfig, Sweep) of the current job of a local multirun, else None."""
    hc = local_multirun()
    return None if hc is None else (hc, _sweep(hc.sweep.dir))


def current_job() -> Job | None:
    """The folder and action of the current job of a local multirun, else None."""
    found = _local_multirun_job()
    if found is None:
        return None
    hc, sweep = found
    return sweep.job(int(hc.job.num), list(hc.overrides.task))


def job_subdir() -> str:
    """``hydra.sweep.subdir`` (configs/hydra/default.yaml): the job's folder in its sweep; for a resumed
    job, ``<job>/resumes/<time>`` (that attempt's Hydra config and log). Outside a local multirun (a
    submitit launcher) the job number."""
    job = current_job()
    if job is None:
        from hydra.core.hydra_config import HydraConfig
        return str(HydraConfig.get().job.num)
    if job.action == "resumed":
        return f"{job.folder.name}/{rf.RESUMES}/{_stamp()}"
    return job.folder.name


def job_output_subdir():
    """``hydra.output_subdir``: ``.hydra``, or nothing for a skipped job (its folder stays as it was)."""
    job = current_job()
    return None if job is not None and job.action == "skipped" else ".hydra"


def skipped_objective(cfg, job: Job):
    """A skipped job's return value: its results.json metrics[``optimized_metric``]."""
    metric = cfg.get("optimized_metric")
    res = rf.read_results(job.folder / "results.json") or {}
    return (res.get("metrics") or {}).get(metric) if metric else None


def counts(sweep) -> dict[str, int] | None:
    """{action: jobs} of the sweep in ``sweep`` this process ran, or None."""
    s = _SWEEPS.get(str(Path(str(sweep)).resolve()))
    return dict(s.counts) if s is not None else None


def resume_command(sweep) -> str:
    """The command that continues the sweep in ``sweep``: this command with ``hydra.sweep.dir=<sweep>``."""
    import __main__
    spec = getattr(__main__, "__spec__", None)
    prog = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    args = [a for a in sys.argv[1:] if not a.startswith("hydra.sweep.dir=")]
    return " ".join(["python", *map(shlex.quote, [*prog, *args]), shlex.quote(f"hydra.sweep.dir={sweep}")])


def check_sweep_folder(config) -> None:
    """RunFolderError before any job runs when the sweep folder cannot be continued (module docstring)."""
    sweep = Path(str(config.hydra.sweep.dir)).resolve()
    if config.hydra.launcher.get("_target_") != BASIC_LAUNCHER:
        if sweep.is_dir() and any(sweep.glob("*/results.json")):
            raise rf.RunFolderError(f"{sweep} already holds a sweep's jobs: a new sweep would overwrite them, and "
                                    "only the local launcher (the default) continues a sweep in its folder; "
                                    "choose another hydra.sweep.dir")
        return
    if rf.lock_holder(sweep):
        rf.acquire(sweep)  # refused, naming the process that continues this sweep now
    state = _sweep(sweep)
    from omegaconf import OmegaConf
    problems = []
    for job in state.folders():
        rec = job / ".hydra" / "config.yaml"
        if rec.is_file():
            overrides = recorded_job_overrides(job)
            now = OmegaConf.to_container(rf.hydra_compose(overrides), resolve=False)
            diffs = config_diffs(OmegaConf.to_container(OmegaConf.load(rec), resolve=False), now)
            if diffs:
                problems.append(f"job folder {job} ({' '.join(match_key(overrides)) or 'no overrides'}) was run "
                                f"with {', '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''} other than the "
                                "config files give now (a default edited since)")
                continue
        who = rf.lock_holder(job) if job_state(job) != "completed" else None
        if who:
            problems.append(f"job folder {job} is in use by process {who['pid']} on {who['host']} (since "
                            f"{who['since']}): wait for it to end, or stop it (kill {who['pid']})")
    if problems:
        raise rf.RunFolderError(f"cannot continue the sweep in {sweep}: " + "; ".join(problems[:4])
                                + ("; ..." if len(problems) > 4 else "")
                                + "; restore the config files, or run the sweep in a new folder (another "
                                "hydra.sweep.dir)")
    rf.acquire(sweep)  # one process continues a sweep at a time; held until this process ends
    record = sweep / "multirun.yaml"
    if record.is_file():  # Hydra writes the sweep's own record again: keep the earlier run's
        os.replace(record, sweep / f"multirun-{_stamp()}.yaml")


class SweepResume(Callback):
    """Hydra callback (configs/hydra/default.yaml): checks a sweep folder a multirun continues, before any
    job runs (:func:`check_sweep_folder`)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) > 0:
            return
        try:
            check_sweep_folder(config)
        except rf.RunFolderError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
