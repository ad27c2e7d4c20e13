"""Local multiruns (randlora/training/launch.py): each job in its own process, so a job killed with SIGKILL
(what the out-of-memory killer sends; injected with callbacks.kill_at_step) leaves the others running
and is recorded as failed with its cause; the sweep's exit status and closing summary; DDP jobs."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import CONFIGS, ROOT, env, train_cli

FAST = ["model=tiny_vit", "trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "callbacks.adapter_checkpoint=false"]


def _sweep(log_dir):
    (sweep,) = (log_dir / "multiruns").iterdir()
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return sweep, jobs, [json.loads((j / "results.json").read_text()) for j in jobs]


def test_describe_exit():
    from randlora.training.launch import describe_exit
    assert describe_exit(-9).startswith("killed by signal 9 (SIGKILL)")
    assert "out-of-memory killer" in describe_exit(-9)
    assert describe_exit(-11) == "killed by signal 11 (SIGSEGV)"
    assert describe_exit(2) == "exited with status 2"


def test_job_command_is_the_single_run_of_that_job():
    """The child's command: the job's overrides, the user's hydra settings that shape a job (not the
    sweep's), and the job's folder as the run folder, in a form Hydra parses back exactly."""
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import setup_globals

    from randlora.training.launch import job_command
    hc = OmegaConf.create({
        "overrides": {"task": ["adapter=lora", "seed=3", "tags=[a,b]"],
                      "hydra": ["hydra.sweeper.n_trials=2", "hydra/launcher=basic", "hydra.mode=MULTIRUN",
                                "hydra.sweep.dir=/s", "hydra.job.chdir=false", "hydra.verbose=true"]},
        "runtime": {"output_dir": '/tmp/a sweep "x"/0'}})
    cmd = job_command(hc)
    assert cmd[0] == sys.executable
    args = cmd[cmd.index("adapter=lora"):]
    assert args[:3] == ["adapter=lora", "seed=3", "tags=[a,b]"]
    assert "hydra.job.chdir=false" in args and "hydra.verbose=true" in args
    assert not any(a.startswith(("hydra.sweeper", "hydra/launcher", "hydra.sweep.", "hydra.mode=MULTIRUN"))
                   for a in args)
    setup_globals()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        c = compose(config_name="train", overrides=args, return_hydra_config=True)
    assert c.hydra.run.dir == '/tmp/a sweep "x"/0'
    assert c.hydra.mode.name == "RUN" and c.hydra.output_subdir is None
    assert c.adapter.method == "lora" and c.seed == 3 and list(c.tags) == ["a", "b"]


def test_fork_refused_while_other_threads_run():
    """The fork server forks only while it is single-threaded (a lock held by another thread would
    stay locked in the child forever)."""
    import threading

    from randlora.training.launch import _fork_unsafe
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert "threads" in _fork_unsafe()
    finally:
        stop.set()
        t.join()


def test_not_isolated_outside_a_hydra_multirun(monkeypatch):
    from randlora.training.launch import should_isolate
    assert should_isolate() is False  # no Hydra context (main(cfg) called directly, tests)


@pytest.mark.slow
@pytest.mark.parametrize("forks", ["1", "0"], ids=["forked", "cold"])
def test_killed_job_is_recorded_and_the_sweep_goes_on(tmp_path, forks):
    """Job 0 is SIGKILLed at its first step: job 1 still runs, job 0's results.json says failed,
    'killed by signal 9', the report lists it, and the sweep ends with its folder and report command.
    (In one process, the kill ended the sweep: exit -9, job 1 never ran.) Jobs forked by the fork
    server, and started from their command line (RANDLORA_JOB_FORKS=0, the fall-back)."""
    out = train_cli(["-m", *FAST, "callbacks.kill_at_step=1,null", f"paths.log_dir={tmp_path}"], timeout=600,
                    extra_env={"RANDLORA_JOB_FORKS": forks})
    assert out.returncode == 0, out.stderr[-3000:]
    sweep, jobs, res = _sweep(tmp_path)
    assert [r["status"] for r in res] == ["failed", "completed"]
    assert res[0]["error"].startswith("killed by signal 9 (SIGKILL)")
    assert res[0]["exit"]["signal"] == 9
    last = res[0]["attempts"][-1]
    assert "callbacks.kill_at_step=1" in last["command_overrides"]
    assert last["status"] == "failed" and last["error"] == res[0]["error"] and last["ended"]
    assert (jobs[0] / ".hydra" / "overrides.yaml").is_file()
    assert f"sweep folder  {sweep}" in out.stdout
    assert f"report        python -m randlora.report {sweep}" in out.stdout
    assert "1 completed, 1 failed" in out.stdout
    rep = subprocess.run([sys.executable, "-m", "randlora.report", str(sweep)], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    md = (sweep / "report" / "report.md").read_text()
    assert "killed by signal 9 (SIGKILL)" in md and str(jobs[0]) in md


@pytest.mark.slow
def test_sweep_whose_jobs_all_failed_exits_non_zero(tmp_path):
    """Every job refused (adapter.r=0 and -1): exit status 1 and the summary (it was 0)."""
    out = train_cli(["-m", *FAST, "adapter.r=0,-1", f"paths.log_dir={tmp_path}"], timeout=600)
    assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
    assert "error: no job of the sweep completed" in out.stderr
    assert "Traceback" not in out.stderr
    sweep, jobs, res = _sweep(tmp_path)
    assert [r["status"] for r in res] == ["failed", "failed"]
    assert "r must be a positive integer" in res[0]["error"]
    assert "0 completed, 2 failed" in out.stdout and f"python -m randlora.report {sweep}" in out.stdout


@pytest.mark.slow
def test_ddp_jobs_in_a_multirun(tmp_path):
    """trainer=ddp_cpu in a multirun: Lightning starts rank 1 from the job's own command, so the job
    trains on two processes and writes one results.json in its folder. (In one process, rank 1 re-ran
    the multirun's command line: a second, stray sweep folder.)"""
    out = train_cli(["-m", *FAST, "trainer=ddp_cpu", "seed=1", f"paths.log_dir={tmp_path}"], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep, jobs, res = _sweep(tmp_path)
    assert [r["status"] for r in res] == ["completed"] and res[0]["seed"] == 1
    assert res[0]["config"]["trainer"]["devices"] == 2
    assert sorted(p.name for p in (tmp_path / "multiruns").iterdir()) == [sweep.name]  # no stray sweep


def _processes_with_env(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text.encode() in (p / "environ").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_sigterm_to_the_sweep_stops_the_running_job(tmp_path):
    """A scheduler's SIGTERM to the sweep (the job runs in another process group, which the signal
    would miss): the job's processes stop too, its results.json says why, and no later job starts."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *FAST, "trainer.max_epochs=500",
                             "trainer.limit_train_batches=null", "seed=1,2", f"paths.log_dir={tmp_path}"],
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    results = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("multiruns/*/0/results.json"))
        if found and '"running"' in found[0].read_text():
            results = found[0]
            break
        time.sleep(0.5)
    assert results is not None, "job 0 never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    rec = json.loads(results.read_text())
    assert rec["status"] == "failed" and rec["error"] == "stopped: the sweep received SIGTERM"
    assert not (results.parent.parent / "1").exists()
    assert _processes_with_env(str(results.parent.parent)) == []
