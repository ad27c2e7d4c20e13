"""Local multiruns: each job in its own process, and the sweep's outcome at the end.

Hydra's basic launcher runs a sweep's jobs one after the other inside one process, so a job that dies
hard (the out-of-memory killer's SIGKILL, a segfault in a native kernel, ``callbacks.kill_at_step``)
ended the whole sweep: later jobs never ran. Here the launcher still composes each job and makes its
folder (``.hydra/`` included), but the job runs in a child process: the single-run entry point
re-invoked with that job's overrides and ``hydra.run.dir=<job folder>``. The parent waits, and when the
child died without recording it, writes ``"status": "failed"`` with the cause ("killed by signal 9
(SIGKILL) ...") into the job's ``results.json``, so the report lists the job. Then the next job starts.

* The child is a plain single run, so Lightning's DDP launcher re-runs the child's own command for the
  other ranks (a multirun's command line would have started a whole sweep per rank). Ranks a dead
  job leaves behind are killed with its process group.
* The job's return value (an Optuna objective: ``optimized_metric``) is read from its results.json.
* SIGTERM / SIGHUP / Ctrl-C to the sweep stop the running job's processes too (they are in another
  process group, which a terminal's or scheduler's signal would miss) and mark it failed.
* Launchers that already run each job in its own process (submitit: ``hydra/launcher=slurm``,
  ``submitit_local``) are left as they are. ``RANDLORA_INPROCESS_JOBS=1`` restores in-process jobs.

Exit status of a multirun (:class:`SweepSummary`, a Hydra callback in configs/hydra/default.yaml):
0 when at least one job completed, failed jobs included (a diverging learning rate is a result of a
sweep, and the report lists it), 1 when no job completed. After the sweep it prints each failed job with
its cause, the sweep folder and the report command.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hydra.experimental.callback import Callback

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
SWEEP_ENV = "RANDLORA_SWEEP_DIR"  # set for a job's process: the sweep it belongs to
JOB_ENV = "RANDLORA_JOB_NUM"
INPROCESS_ENV = "RANDLORA_INPROCESS_JOBS"
# the parent's hydra.* overrides that describe the sweep, not the job (the child is a single run)
_SWEEP_ONLY = ("hydra.mode", "hydra.sweep", "hydra.sweeper", "hydra/sweeper", "hydra.launcher", "hydra/launcher",
               "hydra.run", "hydra.output_subdir", "hydra.job.id", "hydra.job.num")


def _say(text: str) -> None:
    print(f"[randlora] {text}", file=sys.stderr, flush=True)


def in_job_process() -> bool:
    """Whether this process is one job of a local multirun (started by :func:`run_job_in_child`)."""
    return bool(os.environ.get(SWEEP_ENV))


def should_isolate() -> bool:
    """A multirun job under Hydra's in-process basic launcher (and not already a job's process)."""
    if in_job_process() or os.environ.get(INPROCESS_ENV) == "1":
        return False
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
        return hc.mode == RunMode.MULTIRUN and hc.launcher.get("_target_") == BASIC_LAUNCHER
    except Exception:  # noqa: BLE001 - no Hydra context (a direct call of main(cfg))
        return False


def entry_command() -> list[str]:
    """How this program was started (as Lightning re-starts it for DDP ranks): the script's absolute
    path, or ``-m <module>``."""
    import __main__
    spec = getattr(__main__, "__spec__", None)
    if spec is None:
        from hydra.utils import to_absolute_path
        return [sys.executable, to_absolute_path(sys.argv[0])]
    return [sys.executable, "-m", spec.name]


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def job_command(hc) -> list[str]:
    """The single-run command of the current multirun job (``hc``: its HydraConfig)."""
    hydra_overrides = [o for o in hc.overrides.hydra
                       if not o.lstrip("+~").split("=", 1)[0].startswith(_SWEEP_ONLY)]
    return [*entry_command(), *hc.overrides.task, *hydra_overrides,
            f"hydra.run.dir={_quote(str(hc.runtime.output_dir))}", "hydra.output_subdir=null", "hydra.mode=RUN"]


def describe_exit(returncode: int) -> str:
    """'killed by signal 9 (SIGKILL) ...' or 'exited with status N'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        text = f"killed by signal {-returncode} ({name})"
        if -returncode == signal.SIGKILL:
            text += " (the kernel's out-of-memory killer sends SIGKILL when memory runs out)"
        return text
    return f"exited with status {returncode}"


def _read_results(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _tee(stream, sink, tail: collections.deque) -> None:
    """Copy the child's stderr through to ours, keeping its last lines (the cause of a crash)."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sink.write(line)
        sink.flush()
        if line.strip():
            tail.append(line.rstrip())
    stream.close()


def _kill_group(pgid: int, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def _stop_job_on_termination():
    """SIGTERM / SIGHUP to the sweep (a scheduler's time limit, a closed terminal) stop the running job
    too: they end the wait with an exception, and the caller stops the job's process group."""
    def handler(signum, frame):
        _say(f"received {signal.Signals(signum).name}: stopping the running job and the sweep")
        raise SystemExit(128 + signum)
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave the handlers alone
        pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _received(e: BaseException) -> str:
    code = getattr(e, "code", None)
    try:
        return f"received {signal.Signals(int(code) - 128).name}"
    except (TypeError, ValueError):
        return f"stopped ({type(e).__name__})"


def run_job_in_child(cfg):
    """Run the current multirun job in a child process; record a crash; return the job's objective
    (``results.json`` metrics[``optimized_metric``]; NaN for a failed job, as in-process jobs do)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd
    hc = HydraConfig.get()
    job_dir = Path(str(hc.runtime.output_dir)).resolve()
    results_path = job_dir / "results.json"
    env = {**os.environ, SWEEP_ENV: str(Path(str(hc.sweep.dir)).resolve()), JOB_ENV: str(hc.job.num)}
    tail: collections.deque = collections.deque(maxlen=20)
    t0 = time.monotonic()
    # its own process group: ranks and workers a dead job leaves behind can be stopped together
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(job_command(hc), cwd=get_original_cwd(), env=env, stderr=subprocess.PIPE, **group)
    reader = threading.Thread(target=_tee, args=(proc.stderr, sys.stderr, tail), daemon=True)
    reader.start()
    try:
        with _stop_job_on_termination():
            returncode = proc.wait()
    except BaseException as e:  # Ctrl-C / SIGTERM reach the parent only (other process group): pass them on
        _kill_group(proc.pid, signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc.pid)
        returncode = proc.wait()
        why = "was interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else _received(e)
        _record_failure(cfg, hc, results_path, f"stopped: the sweep {why}", returncode, t0, keep_error=False)
        raise
    _kill_group(proc.pid)  # DDP ranks or loader workers of a job that died hard
    reader.join(timeout=10)
    res = _read_results(results_path) or {}
    metric = cfg.get("optimized_metric")
    if res.get("status") == "completed":
        if returncode != 0:  # the record is complete; the process failed afterwards (e.g. at exit)
            _say(f"job {hc.job.num}: {describe_exit(returncode)} after writing its results; kept as completed")
        return res.get("metrics", {}).get(metric) if metric else None
    cause = describe_exit(returncode)
    if returncode > 0 and tail:  # the last line the job printed (a traceback ends with the exception)
        cause += f": {tail[-1].strip()[:300]}"
    cause = _record_failure(cfg, hc, results_path, cause, returncode, t0, keep_error=returncode > 0)
    _say(f"job {hc.job.num} failed ({cause}); the sweep goes on. Details: {results_path}")
    return float("nan")


def _record_failure(cfg, hc, results_path: Path, cause: str, returncode: int, t0: float, keep_error: bool) -> str:
    """Mark the job failed in its results.json (unless it completed), keeping an error the job recorded
    itself when ``keep_error``; returns the error the file holds."""
    from .train import _config_record, write_json_atomic
    res = _read_results(results_path)
    if res and res.get("status") == "completed":
        return "completed"
    if res and res.get("status") == "failed" and res.get("error") and keep_error:
        return res["error"]  # run() recorded the error itself
    record = res or {"method": cfg.adapter.get("method"), "model": cfg.model.get("name"),
                     "dataset": cfg.data.get("name"), "task": cfg.task.get("kind"), "seed": cfg.get("seed"),
                     "r": cfg.adapter.get("r"), "budget": cfg.adapter.get("budget"),
                     "shots": cfg.data.get("shots"), "fraction": cfg.data.get("fraction", 1.0),
                     "sweep": cfg.get("group"), "params": {}, "metrics": {}, "perf": {},
                     "run_dir": str(results_path.parent), "overrides": list(hc.overrides.task),
                     "config": _config_record(cfg)}
    record.update(status="failed", error=cause,
                  exit={"returncode": returncode, "signal": -returncode if returncode < 0 else None,
                        "after_s": round(time.monotonic() - t0, 1)})
    try:
        write_json_atomic(results_path, record)
    except OSError as e:  # a full disk: say so, the sweep goes on
        _say(f"could not write {results_path} ({e})")
    return cause


def sweep_outcome(sweep_dir) -> dict:
    """{'completed': [...rows], 'failed': [...rows]} of the jobs under ``sweep_dir`` (report rows)."""
    from .report import collect
    rows = collect([sweep_dir]) if Path(sweep_dir).is_dir() else []
    done = [r for r in rows if r["status"] == "completed"]
    return {"completed": done, "failed": [r for r in rows if r["status"] != "completed"]}


class SweepSummary(Callback):
    """After a multirun: the failed jobs with their causes, the sweep folder, the report command; exit
    status 1 when no job completed (see the module docstring)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(str(config.hydra.sweep.dir)).resolve()
        out = sweep_outcome(sweep)
        done, failed = out["completed"], out["failed"]
        lines = ["", f"== sweep: {len(done) + len(failed)} jobs, {len(done)} completed, {len(failed)} failed"]
        for r in failed:
            job = os.path.relpath(r["run_dir"], sweep)
            lines.append(f"   job {job} {r['status']}: {r.get('error') or 'no results.json'}"[:400])
        lines += [f"sweep folder  {sweep}", f"report        python -m randlora.report {sweep}"]
        print("\n".join(lines), flush=True)
        if not done:
            print("error: no job of the sweep completed (see the causes above)", file=sys.stderr, flush=True)
            sys.exit(1)
