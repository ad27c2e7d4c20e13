"""Local multiruns: each job in its own process, and the sweep's outcome at the end.

Hydra's basic launcher runs a sweep's jobs one after the other inside one process, so a job that dies
hard (the out-of-memory killer's SIGKILL, a segfault in a native kernel, ``callbacks.kill_at_step``)
ended the whole sweep: later jobs never ran. Here the launcher still composes each job and makes its
folder (``.hydra/`` included), but the job runs in a process of its own: the single-run entry point with
that job's overrides and ``hydra.run.dir=<job folder>``. The sweep's process waits, and when the job
died without recording it, writes ``"status": "failed"`` with the cause ("killed by signal 9 (SIGKILL)
...") into the job's ``results.json``, so the report lists the job. Then the next job starts.

* A job process is a plain single run, so Lightning's DDP launcher re-runs that job's command for the
  other ranks (a multirun's command line would have started a whole sweep per rank). Ranks and loader
  workers a dead job leaves behind are killed with its process group.
* The job's return value (an Optuna objective: ``optimized_metric``) is read from its results.json.
* SIGTERM / SIGHUP / Ctrl-C to the sweep stop the running job's processes too (they are in another
  process group, which a terminal's or scheduler's signal would miss) and mark it failed.
* Start-up cost. Importing torch, Lightning and timm takes seconds per process. On Linux one helper
  process (:class:`ForkServer`) imports them once, then forks each job from that state: the job then
  runs exactly as if started with its command line, minus the imports. The helper forks only while it
  is single-threaded and has not initialised CUDA (what makes a fork unsafe); otherwise, elsewhere than
  on Linux, or with ``RANDLORA_JOB_FORKS=0``, each job starts from its command line.
* Launchers that already run each job in its own process (submitit: ``hydra/launcher=slurm``,
  ``submitit_local``) are left as they are. ``RANDLORA_INPROCESS_JOBS=1`` restores in-process jobs.

Exit status of a multirun (:class:`SweepSummary`, a Hydra callback in configs/hydra/default.yaml):
0 when at least one job completed, failed jobs included (a diverging learning rate is a result of a
sweep, and the report lists it), 1 when no job completed. After the sweep it prints each failed job with
its cause, the sweep folder, the report command and the command that continues the sweep (re-run into
its folder: randlora/training/sweep.py).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import queue
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
FORKS_ENV = "RANDLORA_JOB_FORKS"
SERVER_ENV = "RANDLORA_FORK_SERVER_FD"  # set for the fork server: its control pipe
# what every job imports before its first step (none of them starts a thread or touches CUDA)
PREIMPORT = ("torch", "lightning.pytorch", "torchmetrics", "timm", "randlora.train", "randlora.training.callbacks",
             "randlora.training.checkpoints", "randlora.training.loggers", "randlora.models", "randlora.training.config",
             "randlora.data.images", "randlora.tasks.classification", "randlora.tasks.clip")
# the parent's hydra.* overrides that describe the sweep, not the job (the job is a single run)
_SWEEP_ONLY = ("hydra.mode", "hydra.sweep", "hydra.sweeper", "hydra/sweeper", "hydra.launcher", "hydra/launcher",
               "hydra.run", "hydra.output_subdir", "hydra.job.id", "hydra.job.num")


def _say(text: str) -> None:
    print(f"[randlora] {text}", file=sys.stderr, flush=True)


def in_job_process() -> bool:
    """Whether this process is one job of a local multirun (started by :func:`run_job_in_child`)."""
    return bool(os.environ.get(SWEEP_ENV))


def local_multirun():
    """This Hydra job's HydraConfig when it is a job of a multirun under Hydra's basic launcher (a local
    sweep), else None (a single run, another launcher, or no Hydra context: a direct call of main(cfg))."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
        return hc if hc.mode == RunMode.MULTIRUN and hc.launcher.get("_target_") == BASIC_LAUNCHER else None
    except Exception:  # noqa: BLE001
        return None


def should_isolate() -> bool:
    """A multirun job under Hydra's in-process basic launcher (and not already a job's process)."""
    if in_job_process() or os.environ.get(INPROCESS_ENV) == "1":
        return False
    return local_multirun() is not None


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


def job_arguments(hc) -> list[str]:
    """The single-run command-line arguments of the current multirun job (``hc``: its HydraConfig)."""
    hydra_overrides = [o for o in hc.overrides.hydra
                       if not o.lstrip("+~").split("=", 1)[0].startswith(_SWEEP_ONLY)]
    return [*hc.overrides.task, *hydra_overrides,
            f"hydra.run.dir={_quote(str(hc.runtime.output_dir))}", "hydra.output_subdir=null", "hydra.mode=RUN"]


def job_command(hc) -> list[str]:
    return [*entry_command(), *job_arguments(hc)]


def describe_exit(returncode: int | None) -> str:
    """'killed by signal 9 (SIGKILL) ...' or 'exited with status N'."""
    if returncode is None:
        return "ended with an unknown status (the process that started it died)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        text = f"killed by signal {-returncode} ({name})"
        if -returncode == signal.SIGKILL:
            text += "; the kernel's out-of-memory killer sends it when memory runs out"
        return text
    return f"exited with status {returncode}"


def _read_results(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _kill_group(pgid: int, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _new_group() -> dict:
    return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


class _Tee:
    """Pass a process's stderr through to ours, keeping its last lines (a crash's cause)."""

    def __init__(self, stream):
        self.tail: collections.deque = collections.deque(maxlen=20)
        self.thread = threading.Thread(target=self._copy, args=(stream,), daemon=True)
        self.thread.start()

    def _copy(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                self.tail.append(line.rstrip())
        stream.close()


class ColdJob:
    """A job started from its command line (its own process group)."""

    def __init__(self, args: list[str], cwd: str, env: dict):
        self.proc = subprocess.Popen([*entry_command(), *args], cwd=cwd, env=env, stderr=subprocess.PIPE,
                                     **_new_group())
        self.pid = self.proc.pid
        self.tee = _Tee(self.proc.stderr)

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (negative: the signal); ``subprocess.TimeoutExpired`` after ``timeout``."""
        return self.proc.wait(timeout=timeout)

    def tail(self):
        self.tee.thread.join(timeout=10)
        return self.tee.tail


class ForkedJob:
    """A job forked by the fork server; its status comes over the server's control pipe."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int | None:
        msg = self.server.receive(timeout)
        if msg is None:  # the server died: wait for the job's group to be gone, status unknown
            while _group_alive(self.pid):
                time.sleep(0.5)
            return None
        return msg["returncode"]

    def tail(self):
        time.sleep(0.3)  # the server's stderr is shared by its jobs: let the last lines through
        return self.server.tee.tail


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class ForkServer:
    """A process that imports what every job imports once, then forks each job from that state (see
    the module docstring). Protocol: one JSON line per job on its stdin ({"args", "env"}); JSON lines
    back on a control pipe: {"ready"} or {"unsafe": why} once, then {"pid"} and {"returncode"} per job."""

    def __init__(self, cwd: str, env: dict):
        r, w = os.pipe()
        self.proc = subprocess.Popen(entry_command(), cwd=cwd, env={**env, SERVER_ENV: str(w)}, pass_fds=(w,),
                                     stdin=subprocess.PIPE, stderr=subprocess.PIPE, **_new_group())
        os.close(w)
        self.tee = _Tee(self.proc.stderr)
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(os.fdopen(r, "rb"),), daemon=True).start()
        self.usable = True

    def _read(self, stream) -> None:
        for line in stream:
            try:
                self.messages.put(json.loads(line))
            except ValueError:
                pass
        self.messages.put(None)  # EOF: the server has exited

    def receive(self, timeout: float | None = None):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise subprocess.TimeoutExpired("fork server", timeout) from None

    def start(self, args: list[str], env: dict) -> ForkedJob | None:
        """Fork a job; None when the server cannot (then start the job cold)."""
        if not self.usable:
            return None
        try:
            self.proc.stdin.write((json.dumps({"args": args, "env": env}) + "\n").encode())
            self.proc.stdin.flush()
            msg = self.receive(timeout=600)  # the first job waits for the server's imports
            if msg is not None and msg.get("ready"):
                msg = self.receive(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            msg = None
        if not msg or "pid" not in msg:
            if msg and msg.get("unsafe"):
                _say(f"jobs start from their command line: {msg['unsafe']}")
            self.close()
            return None
        self.tee.tail.clear()
        return ForkedJob(self, int(msg["pid"]))

    def close(self) -> None:
        self.usable = False
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        _kill_group(self.proc.pid)


_server: ForkServer | None = None


def _fork_server(cwd: str, env: dict) -> ForkServer | None:
    global _server
    if os.environ.get(FORKS_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    if _server is None:
        _server = ForkServer(cwd, env)
        atexit.register(close_fork_server)
    return _server if _server.usable else None


def close_fork_server() -> None:
    global _server
    if _server is not None:
        _server.close()
        _server = None


def _fork_unsafe() -> str | None:
    """Why forking this process now would be unsafe (other threads: locks held in the child; CUDA
    initialised: unusable in the child), or None."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        return "cannot count this process's threads"
    if threads > 1:
        return f"the fork server runs {threads} threads after its imports"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "the fork server initialised CUDA during its imports"
    return None


def await_job() -> None:
    """Called first by the entry points. In the fork server (started by :class:`ForkServer`): import
    what every job imports, then fork one process per job; this returns in each forked process, with
    the job's command line as ``sys.argv`` (as if started with it: Lightning's DDP launcher re-runs that
    command for the other ranks). Returns at once in any other process."""
    fd = os.environ.pop(SERVER_ENV, None)
    if fd is None:
        return
    import importlib
    for name in PREIMPORT:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the job imports it again and reports the problem itself
            pass
    control = os.fdopen(int(fd), "w", buffering=1)

    def send(**msg):
        control.write(json.dumps(msg) + "\n")

    why = _fork_unsafe()
    send(**({"unsafe": why} if why else {"ready": True}))
    if why:
        os._exit(0)
    for line in sys.stdin:
        spec = json.loads(line)
        why = _fork_unsafe()
        if why:
            send(unsafe=why)
            os._exit(0)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the job: its own process group, no stdin, default signal handling
            os.setpgid(0, 0)
            control.close()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            sys.stdin = open(os.devnull)  # noqa: SIM115
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.environ.update(spec["env"])
            sys.argv[1:] = list(spec["args"])
            return
        send(pid=pid)
        _, status = os.waitpid(pid, 0)
        send(returncode=os.waitstatus_to_exitcode(status))
    os._exit(0)


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
    """Run the current multirun job in a process of its own; record a crash; return the job's objective
    (``results.json`` metrics[``optimized_metric``]; NaN for a failed job, as in-process jobs do)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd
    from .resume import resume_dir
    hc = HydraConfig.get()
    # a resumed job (resume=<job folder>) writes into its folder; Hydra's output is <job>/resumes/<time>/
    resumed = resume_dir(cfg)
    results_path = (resumed or Path(str(hc.runtime.output_dir)).resolve()) / "results.json"
    cwd = get_original_cwd()
    env = {**os.environ, SWEEP_ENV: str(Path(str(hc.sweep.dir)).resolve())}
    job_env = {JOB_ENV: str(hc.job.num)}
    args = job_arguments(hc)
    if resumed is not None and not any(o.startswith("resume=") for o in hc.overrides.task):
        args.append(f"resume={_quote(str(resumed))}")  # a resumed job of a re-run sweep (sweep.py)
    t0 = time.monotonic()
    server = _fork_server(cwd, env)
    job = server.start(args, job_env) if server is not None else None
    if job is None:
        job = ColdJob(args, cwd, {**env, **job_env})
    try:
        with _stop_job_on_termination():
            returncode = job.wait()
    except BaseException as e:  # Ctrl-C / SIGTERM reach the sweep only (other process group): pass them on
        _kill_group(job.pid, signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _group_alive(job.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _kill_group(job.pid)
        close_fork_server()
        why = "was interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else _received(e)
        _record_failure(cfg, hc, results_path, f"stopped: the sweep {why}", None, t0, keep_error=False)
        raise
    _kill_group(job.pid)  # DDP ranks or loader workers of a job that died hard
    tail = job.tail()
    res = _read_results(results_path) or {}
    metric = cfg.get("optimized_metric")
    if res.get("status") == "completed":
        if returncode != 0:  # the record is complete; the process failed afterwards (e.g. at exit)
            _say(f"job {hc.job.num}: {describe_exit(returncode)} after writing its results; kept as completed")
        return res.get("metrics", {}).get(metric) if metric else None
    cause = describe_exit(returncode)
    if returncode is not None and returncode > 0 and tail:  # a traceback's last line is the exception
        cause += f": {tail[-1].strip()[:300]}"
    cause = _record_failure(cfg, hc, results_path, cause, returncode, t0,
                            keep_error=returncode is not None and returncode > 0)
    _say(f"job {hc.job.num} failed ({cause}); the sweep goes on. Details: {results_path}")
    return float("nan")


def _record_failure(cfg, hc, results_path: Path, cause: str, returncode: int | None, t0: float,
                    keep_error: bool) -> str:
    """Mark the job failed in its results.json (unless it completed), keeping an error the job recorded
    itself when ``keep_error``; returns the error the file holds."""
    from .folder import config_record, write_json_atomic
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
                     "config": config_record(cfg)}
    signalled = returncode is not None and returncode < 0
    record.update(status="failed", error=cause,
                  exit={"returncode": returncode, "signal": -returncode if signalled else None,
                        "after_s": round(time.monotonic() - t0, 1)})
    attempts = record.get("attempts")
    if isinstance(attempts, list) and attempts and isinstance(attempts[-1], dict) \
            and attempts[-1].get("status") == "running":  # the attempt the job could not close itself
        from .folder import now
        attempts[-1].update(status="failed", error=cause, ended=now())
    try:
        write_json_atomic(results_path, record)
    except OSError as e:  # a full disk: say so, the sweep goes on
        _say(f"could not write {results_path} ({e})")
    return cause


def sweep_outcome(sweep_dir) -> dict:
    """{'completed': [...rows], 'failed': [...rows]} of the jobs under ``sweep_dir`` (report rows)."""
    from ..report import collect
    rows = collect([sweep_dir]) if Path(sweep_dir).is_dir() else []
    done = [r for r in rows if r["status"] == "completed"]
    return {"completed": done, "failed": [r for r in rows if r["status"] != "completed"]}


class SweepSummary(Callback):
    """After a multirun: the failed jobs with their causes, how many jobs this run skipped / resumed /
    re-ran / added (randlora/training/sweep.py), the sweep folder, the report command and the command
    that continues the sweep; exit status 1 when no job completed (see the module docstring)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        close_fork_server()
        sweep = Path(str(config.hydra.sweep.dir)).resolve()
        out = sweep_outcome(sweep)
        done, failed = out["completed"], out["failed"]
        lines = ["", f"== sweep: {len(done) + len(failed)} jobs, {len(done)} completed, {len(failed)} failed"]
        for r in failed:
            job = os.path.relpath(r["run_dir"], sweep)
            lines.append(f"   job {job} {r['status']}: {r.get('error') or 'no results.json'}"[:400])
        from .sweep import counts, resume_command
        this_run = counts(sweep)
        if this_run is not None:
            lines.append("   this run: " + ", ".join(f"{n} {what}" for what, n in this_run.items())
                         + " (skipped: completed earlier)")
        lines += [f"sweep folder  {sweep}", f"report        python -m randlora.report {sweep}",
                  f"to resume this sweep: {resume_command(sweep)}"]
        print("\n".join(lines), flush=True)
        if not done:
            print("error: no job of the sweep completed (see the causes above)", file=sys.stderr, flush=True)
            sys.exit(1)
