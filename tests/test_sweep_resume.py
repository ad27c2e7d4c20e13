"""Sweep resume (randlora/training/sweep.py): a multirun re-run into its own folder skips completed jobs
(their files untouched), resumes an interrupted one (a real SIGKILL) to the uninterrupted run's numbers,
re-runs a failed one with its earlier files kept under reruns/, runs only the jobs a re-run adds, and is
refused, before any job runs, when the config files changed under a job folder.

One sweep folder is shared by the tests below (module fixture); they run in file order."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from randlora.training.sweep import Sweep, job_state, match_key, recorded_job_overrides
from tests.helpers import CONFIGS, assert_same_run, compose_cfg, results, train_cli

TINY = ["model=tiny_vit", "trainer=cpu", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1"]


def _snapshot(folder: Path) -> dict:
    """{relative path: (bytes, mtime_ns)} of every file under ``folder``, and each folder's entries."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else sorted(x.name for x in p.iterdir())
    return out


def _sweep(log_dir: Path, sweep: Path, values: str, *extra):
    return train_cli(["-m", *TINY, f"trainer.max_epochs={values}", *extra, f"paths.log_dir={log_dir}",
                      f"hydra.sweep.dir={sweep}"], timeout=600)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The first run: jobs max_epochs=1 (completes), 3 (SIGKILLed at step 5, after its step-4 checkpoint)
    and -5 (refused: fails); then the uninterrupted max_epochs=3 run as a reference."""
    base = tmp_path_factory.mktemp("sweep")
    sweep = base / "s"
    first = _sweep(base, sweep, "1,3,-5", "callbacks.kill_at_step=5")
    assert first.returncode == 0, first.stderr[-3000:]
    from randlora.train import run
    run(compose_cfg([*TINY, "trainer.max_epochs=3"], base / "ref"))
    return {"base": base, "sweep": sweep, "first": first, "ref": base / "ref"}


@pytest.mark.integration
def test_first_run_state(swept):
    s = swept["sweep"]
    assert [results(s / n)["status"] for n in "012"] == ["completed", "failed", "failed"]
    assert results(s / "1")["exit"]["signal"] == 9
    assert [job_state(s / n) for n in "012"] == ["completed", "interrupted", "failed"]
    assert "to resume this sweep: python " in swept["first"].stdout
    assert f"sweep folder  {s}" in swept["first"].stdout
    assert f"report        python -m randlora.report {s}" in swept["first"].stdout
    assert f"hydra.sweep.dir={s}" in swept["first"].stdout
    assert "this run: 0 skipped, 0 resumed, 0 re-run, 3 new" in swept["first"].stdout


@pytest.mark.integration
def test_rerun_skips_resumes_and_reruns(swept):
    """The same sweep in another order: the completed job is skipped (not a byte or mtime changed), the
    killed one resumed from its checkpoint ends as the uninterrupted run, the failed one runs again."""
    s = swept["sweep"]
    done, failed = _snapshot(s / "0"), _snapshot(s / "2")
    out = _sweep(swept["base"], s, "-5,3,1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "this run: 1 skipped, 1 resumed, 1 re-run, 0 new" in out.stdout
    assert _snapshot(s / "0") == done
    assert_same_run(swept["ref"], s / "1")
    attempts = results(s / "1")["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert attempts[1]["resumed_from"]["global_step"] == 4
    assert len(list((s / "1" / "resumes").iterdir())) == 1
    (kept,) = (s / "2" / "reruns").iterdir()
    assert _snapshot(kept) == {k: v for k, v in failed.items() if k != ".lock"}
    again = results(s / "2")
    assert again["status"] == "failed" and "max_epochs=-5" in again["error"]
    # run afresh with this command (the first run's job had callbacks.kill_at_step=5)
    assert "kill_at_step" in (kept / ".hydra" / "overrides.yaml").read_text()
    assert "kill_at_step" not in (s / "2" / ".hydra" / "overrides.yaml").read_text()
    from randlora.report import collect
    assert sorted(Path(r["run_dir"]).name for r in collect([s])) == ["0", "1", "2"]  # reruns/ is no job


@pytest.mark.integration
def test_rerun_with_an_extra_job_runs_only_that_job(swept):
    s = swept["sweep"]
    before = {n: _snapshot(s / n) for n in "012"}
    out = _sweep(swept["base"], s, "1,3,2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "this run: 2 skipped, 0 resumed, 0 re-run, 1 new" in out.stdout
    assert {n: _snapshot(s / n) for n in "012"} == before
    assert results(s / "3")["status"] == "completed" and results(s / "3")["config"]["trainer"]["max_epochs"] == 2


@pytest.mark.integration
def test_changed_config_is_refused_before_any_job_runs(swept, tmp_path):
    """A default edited in the config files since the jobs ran (here: a copy of configs/ with
    optim.min_lr_ratio changed): refused, naming the job folders and the key; nothing written."""
    s = swept["sweep"]
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    train = configs / "train.yaml"
    text = train.read_text()
    assert "  min_lr_ratio: 0.01\n" in text
    train.write_text(text.replace("  min_lr_ratio: 0.01\n", "  min_lr_ratio: 0.02\n"))
    before = _snapshot(s)
    out = train_cli(["--config-path", str(configs), "-m", *TINY, "trainer.max_epochs=1,3,2",
                     f"paths.log_dir={swept['base']}", f"hydra.sweep.dir={s}"], timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "optim.min_lr_ratio" in err[0] and f"job folder {s / '0'}" in err[0], out.stderr
    assert "Traceback" not in out.stderr
    assert _snapshot(s) == before


def test_match_key_ignores_order_and_what_does_not_change_the_computation():
    a = match_key(["seed=1", "adapter=lora", "callbacks.kill_at_step=3", "logger=wandb", "data.num_workers=4"])
    assert a == match_key(["adapter=lora", "seed=1"]) == ("adapter=lora", "seed=1")
    assert match_key(["seed=2", "adapter=lora"]) != a
    # one override however it is spelt: the add / force-add prefix, a number's notation
    assert match_key(["++trainer.max_epochs=1", "optim.lr=1e-3"]) == match_key(["optim.lr=0.001",
                                                                                "trainer.max_epochs=1"])


@pytest.mark.parametrize("a,b", [(["seed=1", "train=false"], ["seed=1"]),                   # an evaluation
                                 (["ckpt_path=/r/a.ckpt", "train=false"], ["ckpt_path=/r/b.ckpt", "train=false"]),
                                 (["adapter.from_peft=/p/a", "train=false"], ["adapter.from_peft=/p/b", "train=false"]),
                                 (["model.pretrained=/w/a.safetensors"], ["model.pretrained=/w/b.safetensors"]),
                                 (["data.path=/d/a"], ["data.path=/d/b"])])
def test_jobs_that_do_or_read_something_else_are_other_jobs(a, b):
    """A job is not matched to the folder of a job that evaluated instead of trained, or read other weights,
    another checkpoint, adapter or data: that folder's "completed" says nothing of this job."""
    assert match_key(a) != match_key(b)


def test_a_damaged_folder_is_run_again_not_trusted(tmp_path):
    """A results.json that does not parse is a failed job (run again, the file moved to reruns/), not an
    interrupted one resumed from its last checkpoint; an empty overrides.yaml matches no job; a file with a
    job's number keeps that number taken."""
    job = tmp_path / "s" / "0"
    (job / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 4, "epoch": 1}, job / "checkpoints" / "last.ckpt")
    (job / "results.json").write_text('{"status": "comple')
    assert job_state(job) == "failed"
    (job / ".hydra").mkdir()
    (job / ".hydra" / "overrides.yaml").write_text("")
    assert recorded_job_overrides(job) is None
    (tmp_path / "s" / "1").write_text("notes")
    assert Sweep(tmp_path / "s").job(0, ["seed=1"]).folder.name == "2"


def test_job_state(tmp_path):
    """completed; interrupted only when stopped from outside and a checkpoint exists; else failed."""
    def job(name, res, ckpt):
        d = tmp_path / name
        (d / "checkpoints").mkdir(parents=True)
        if res is not None:
            (d / "results.json").write_text(json.dumps(res))
        if ckpt:
            torch.save({"global_step": 4, "epoch": 1}, d / "checkpoints" / "last.ckpt")
        return d
    killed = {"status": "failed", "error": "killed by signal 9 (SIGKILL)", "exit": {"signal": 9}}
    assert job_state(job("a", {"status": "completed"}, False)) == "completed"
    assert job_state(job("b", {"status": "running"}, True)) == "interrupted"
    assert job_state(job("c", None, True)) == "interrupted"
    assert job_state(job("d", killed, True)) == "interrupted"
    assert job_state(job("e", {"status": "failed", "error": "stopped: the sweep received SIGTERM"}, True)) \
        == "interrupted"
    assert job_state(job("f", killed, False)) == "failed"  # nothing to continue from
    assert job_state(job("g", {"status": "failed", "error": "ValueError: x", "exit": {"signal": None}}, True)) \
        == "failed"
