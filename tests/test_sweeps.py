"""Multiruns end to end: every job writes results.json, the report turns a sweep into tables, a
failing job does not stop the sweep, sweep folders never collide, launchers and Optuna work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, compose_cfg, env, train_cli

FAST = ["model=tiny_vit", "trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "callbacks.adapter_checkpoint=false"]


def jobs(log_dir: Path):
    sweeps = sorted((log_dir / "multiruns").iterdir())
    assert len(sweeps) == 1
    return sweeps[0], sorted((p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def test_methods_x_budgets_multirun_and_report(tmp_path):
    out = train_cli(["-m", "adapter=lora,randlora", "adapter.budget=5000,20000", *FAST, f"paths.log_dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    sweep, dirs = jobs(tmp_path)
    assert len(dirs) == 4
    res = [json.loads((d / "results.json").read_text()) for d in dirs]
    assert all(r["status"] == "completed" for r in res)
    assert {(r["method"], r["budget"]) for r in res} == {(m, b) for m in ("lora", "randlora") for b in (5000.0, 20000.0)}
    for r in res:  # the picked rank lands near the budget
        assert abs(r["params"]["adapter"] - r["budget"]) / r["budget"] < 0.3
    rep = subprocess.run([sys.executable, "-m", "randlora.report", str(sweep)], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    csv_rows = (sweep / "report" / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 4
    for r in res:
        assert str(r["params"]["trainable"]) in (sweep / "report" / "results.csv").read_text()
    assert (sweep / "report" / "acc_vs_params.png").stat().st_size > 1000


def test_failing_job_does_not_stop_the_sweep(tmp_path):
    out = train_cli(["-m", "adapter=full", "adapter.lr=1e-3,1e12", "trainer.gradient_clip_val=null", *FAST,
                     f"paths.log_dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    sweep, dirs = jobs(tmp_path)
    res = [json.loads((d / "results.json").read_text()) for d in dirs]
    assert [r["status"] for r in res] == ["completed", "failed"]
    assert "non-finite training loss" in res[1]["error"] and "last good checkpoint" in res[1]["error"]
    rep = subprocess.run([sys.executable, "-m", "randlora.report", str(sweep)], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0
    assert "non-finite training loss" in (sweep / "report" / "report.md").read_text()


def test_sweep_folders_never_collide():
    from hydra.core.utils import setup_globals
    setup_globals()
    dirs = set()
    for _ in range(5):  # composed within the same second
        cfg = compose_cfg([])
        from hydra import compose, initialize_config_dir
        from tests.helpers import CONFIGS
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            c = compose(config_name="train", return_hydra_config=True)
        dirs.add(str(c.hydra.sweep.dir))
        assert cfg is not None
    assert len(dirs) == 5


def test_named_sweeps_and_launchers_compose():
    for name in ("budget_sweep", "rank_sweep", "shots_sweep", "fig1_dinov2", "fig1_clip", "fig2_vision",
                 "fig3_clip_vl"):
        out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"sweep={name}", "--cfg", "hydra"], cwd=ROOT,
                             env=env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "mode: MULTIRUN" in out.stdout and "adapter:" in out.stdout
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import setup_globals

    from tests.helpers import CONFIGS
    setup_globals()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        c = compose(config_name="train", return_hydra_config=True,
                    overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = c.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 2)


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs(tmp_path):
    out = train_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "adapter=lora,randlora",
                     *FAST, f"paths.log_dir={tmp_path}"], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    _, dirs = jobs(tmp_path)
    res = [json.loads((d / "results.json").read_text()) for d in dirs]
    assert [r["status"] for r in res] == ["completed", "completed"]


@pytest.mark.slow
def test_optuna_hparams_search(tmp_path):
    out = train_cli(["hparams_search=lr_alpha_optuna", "hydra.sweeper.n_trials=2", "adapter=randlora", *FAST,
                     f"paths.log_dir={tmp_path}"], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep, dirs = jobs(tmp_path)
    assert len(dirs) == 2
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "optim.lr" in best
    import yaml  # each job ran in its own process: its objective reached Optuna from its results.json
    vals = [json.loads((d / "results.json").read_text())["metrics"]["val/acc"] for d in dirs]
    assert yaml.safe_load(best)["best_value"] == max(vals)
