"""Interrupted runs resume exactly, checkpoints are written atomically, bad configurations are refused
with one actionable line before anything is built, and runs are deterministic."""
from __future__ import annotations

import pytest
import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from randlora.train import run
from tests.bad_inputs import BAD
from tests.helpers import FAST, assert_same_run, compose_cfg, refused_in_one_line, results, train_cli

BASE = ["model=tiny_vit", "adapter=randlora", "trainer=cpu", "trainer.max_epochs=3", "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.deterministic=true",
        "data.batch_size=16", "seed=3"]


def _adapter_tensors(run_dir):
    from safetensors.torch import load_file
    return load_file(str(run_dir / "checkpoints" / "adapter.safetensors"))


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    """A real SIGKILL in the middle of an epoch (nothing flushed), a resume from the mid-epoch
    checkpoint before it, with dropout and max_steps: every metric, every CSV row, every trained
    tensor and the optimizer state are the uninterrupted run's, bit for bit."""
    over = [*BASE, "adapter.dropout=0.1", "++trainer.max_steps=11", "callbacks.checkpoint_every_n_train_steps=3"]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    out = train_cli([*over, f"hydra.run.dir={ref}"])
    assert out.returncode == 0, out.stderr[-2000:]
    # step 7 is in the middle of the second epoch (4 steps per epoch); the last checkpoint is step 6
    out = train_cli([*over, "callbacks.kill_at_step=7", f"hydra.run.dir={crashed}"])
    assert out.returncode == -9
    assert results(crashed)["status"] == "running"
    ck = torch.load(crashed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 6
    out = train_cli([f"resume={crashed}", f"paths.log_dir={tmp_path / 'logs'}"])  # the run's own settings
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (tmp_path / "logs").exists()  # the resume wrote only into the run's folder
    assert_same_run(ref, crashed)
    assert [a["status"] for a in results(crashed)["attempts"]] == ["interrupted", "completed"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from randlora.training import checkpoints as checkpoint_io
    io = checkpoint_io.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed during save")
    monkeypatch.setattr(checkpoint_io.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    ck = torch.load(path, weights_only=True)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    fast = [*BASE, "trainer.max_epochs=1", "callbacks.adapter_checkpoint=false"]
    def quality(res):  # everything but wall-clock timings and memory
        return {k: v for k, v in res["metrics"].items() if not k.startswith("perf/")}
    a = quality(run(compose_cfg(fast, tmp_path / "a")))
    b = quality(run(compose_cfg(fast, tmp_path / "b")))
    assert a == b and "test/acc" in a and "train/loss_epoch" in a
    c = quality(run(compose_cfg([*fast, "seed=4"], tmp_path / "c")))
    assert c != a


def test_resume_of_missing_folder_is_refused(tmp_path):
    cfg = compose_cfg([*BASE, f"resume={tmp_path / 'nope'}"], tmp_path / "run")
    with pytest.raises(Exception, match="no checkpoint"):
        run(cfg)


@pytest.mark.slow
def test_wandb_without_credentials_runs_offline(tmp_path):
    out = train_cli([*BASE, "trainer.max_epochs=1", "logger=wandb", f"hydra.run.dir={tmp_path}"],
                    extra_env={"WANDB_MODE": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "logging offline because no W&B API key" in out.stdout and "wandb sync" in out.stdout
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert results(tmp_path)["status"] == "completed"


def test_wandb_tags_and_group():
    from randlora.training.loggers import default_group, run_tags
    cfg = compose_cfg(["adapter=lora", "adapter.budget=2e4", "data.shots=4", "group=budget_sweep", "tags=[mine]"])
    tags = run_tags(cfg, r=3)
    assert {"mine", "method:lora", "data:digits", "r:3", "budget:20000", "shots:4"} <= set(tags)
    assert default_group(cfg) == "budget_sweep"


@pytest.mark.parametrize("overrides,msg", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_configuration_one_actionable_line(overrides, msg, monkeypatch):
    # the table is a CPU machine's view (trainer=gpu is refused there), also when the suite runs on a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    refused_in_one_line(overrides, msg)


@pytest.mark.parametrize("overrides,msg", [(["data=nope"], "Could not find 'data/nope'"),
                                           (["model=gpt5"], "Could not find 'model/gpt5'"),
                                           (["adapter.rr=3"], "Could not override 'adapter.rr'")])
def test_unknown_group_or_key_rejected_at_composition(overrides, msg):
    with pytest.raises((HydraException, OmegaConfBaseException)) as e:
        compose_cfg(overrides)
    assert msg in str(e.value)


def test_bad_config_fails_before_model_or_data(tmp_path, monkeypatch):
    import randlora.models as models
    import randlora.training.build as build
    built = []
    monkeypatch.setattr(models, "build_model", lambda *a, **k: built.append("model"))
    monkeypatch.setattr(build, "build_datamodule", lambda *a, **k: built.append("data"))
    with pytest.raises(ValueError):
        run(compose_cfg(["adapter.r=1000"], tmp_path))
    assert built == []
    assert results(tmp_path)["status"] == "failed"


def test_deferred_non_finite_check_names_the_first_bad_step(tmp_path):
    """The CUDA mode of NonFiniteGuard (no per-step synchronisation), exercised on the CPU with
    defer=True: the first non-finite step is remembered and reported at the next check, at epoch end
    and before a checkpoint is written."""
    from types import SimpleNamespace

    import torch

    from randlora.training.callbacks import NonFiniteGuard

    guard = NonFiniteGuard(str(tmp_path), check_every=100, defer=True)
    trainer = SimpleNamespace(global_step=0, current_epoch=1, log_every_n_steps=100)
    for step, v in enumerate([1.0, 0.5, float("nan"), float("inf"), 0.2]):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(v)}, None, step + 10)
    with pytest.raises(FloatingPointError, match=r"\(nan\) at step 2 \(epoch 1, batch 12\)"):
        guard.on_save_checkpoint(trainer, None, {})
    clean = NonFiniteGuard(str(tmp_path), check_every=2, defer=True)
    for step in range(4):
        trainer.global_step = step
        clean.on_train_batch_end(trainer, None, torch.tensor(1.0), None, step)
    clean.on_train_epoch_end(trainer, None)  # finite losses: no error
    trainer.global_step = 4
    clean.on_train_batch_end(trainer, None, torch.tensor(float("nan")), None, 4)
    trainer.global_step = 5
    with pytest.raises(FloatingPointError, match="at step 4"):  # (5 + 1) % 2 == 0: the periodic check
        clean.on_train_batch_end(trainer, None, torch.tensor(1.0), None, 5)


def test_cpu_peak_memory_resets_between_jobs():
    """Each job of a multirun reports its own peak: the CPU high-water mark is reset at train start."""
    import os

    from randlora.training.callbacks import peak_memory_mb, reset_peak_memory

    blob = torch.ones(400 * 2**20 // 4)  # 400 MB resident
    blob.add_(1)
    high = peak_memory_mb()
    del blob
    ok = reset_peak_memory(torch.device("cpu"))
    assert ok == os.path.exists("/proc/self/clear_refs")
    if ok:
        assert peak_memory_mb() < high - 300, (peak_memory_mb(), high)


def test_job_memory_is_released_when_the_job_returns(tmp_path, monkeypatch):
    """After a job, main() frees its model before returning to Hydra (the next multirun job runs in
    the same process); with automatic collection off, only that explicit release can free it."""
    import gc
    import weakref

    import randlora.train as train_mod
    import randlora.training.build as build_mod
    from tests.helpers import FAST

    refs = []
    build = build_mod.build_task

    def spy(*a, **k):
        task = build(*a, **k)
        refs.append(weakref.ref(task))
        return task

    monkeypatch.setattr(build_mod, "build_task", spy)
    cfg = compose_cfg(["model=tiny_vit", "adapter=lora", *FAST], out_dir=tmp_path / "a")
    gc.collect()
    gc.disable()
    try:
        train_mod.main(cfg)
        alive = refs[0]() is not None
    finally:
        gc.enable()
    assert refs and not alive, "the finished job's model is still referenced"


@pytest.mark.parametrize("weights_only", [False, True])
def test_deferred_guard_stops_before_any_checkpoint_of_bad_weights(tmp_path, weights_only):
    """Deferred (CUDA-mode) non-finite check with step-triggered checkpoints: the run stops before a
    checkpoint holds weights a NaN step touched, also for weights-only checkpoints (for which
    Lightning does not call the callbacks' on_save_checkpoint)."""
    import glob
    import os

    import lightning as L
    from torch import nn

    from randlora.training.callbacks import NonFiniteGuard

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def training_step(self, batch, _):
            loss = self.lin(batch[0]).pow(2).mean()
            return loss * float("nan") if self.global_step == 3 else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), 0.1)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))
            return torch.utils.data.DataLoader(data, batch_size=4)

    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_last=True,
                                             save_weights_only=weights_only)
    trainer = L.Trainer(max_epochs=1, callbacks=[ck, NonFiniteGuard(str(tmp_path), check_every=1000, defer=True)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        trainer.fit(M())
    saved = {os.path.basename(p): torch.load(p, weights_only=False) for p in glob.glob(str(tmp_path / "*.ckpt"))}
    assert saved and max(c["global_step"] for c in saved.values()) <= 3
    assert all(torch.isfinite(v).all() for c in saved.values() for v in c["state_dict"].values())


def test_reporting_failure_after_training_keeps_the_job_completed(tmp_path, monkeypatch, capsys):
    """A W&B summary or a printing problem after training is a warning: results.json stays
    'completed' and run() returns the results."""
    import randlora.training.loggers as loggers_mod
    import randlora.train as train_mod

    def boom(*_a, **_k):
        raise RuntimeError("reporting broke")
    monkeypatch.setattr(train_mod, "_print_summary", boom)
    monkeypatch.setattr(loggers_mod, "publish_results", boom)
    res = run(compose_cfg(["model=tiny_vit", "adapter=lora", *FAST], tmp_path))
    assert res["status"] == "completed"
    assert results(tmp_path)["status"] == "completed"
    err = capsys.readouterr().err
    assert "writing the W&B summary failed (RuntimeError: reporting broke)" in err
    assert "writing the summary failed" in err
