"""Exact resume: a run interrupted after a checkpoint and resumed computes what the uninterrupted run
computes, bit for bit (every metric, every CSV row, every trained tensor, the optimizer state), from
epoch-end and mid-epoch checkpoints, with max_steps or max_epochs, for every method, with dropout.

The per-method tests run in-process: the interruption raises from ``KillAtStep`` (instead of its
SIGKILL) so that pytest survives; what the resume sees is the same (the last checkpoint on disk,
nothing saved at the interruption). ``test_reliability.py`` has the SIGKILL version."""
from __future__ import annotations


import pytest
import torch

from randlora.train import run
from tests.helpers import Interrupted, assert_same_run, compose_cfg, results

TINY = ["model=tiny_vit", "trainer=cpu", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1", "data.batch_size=16", "seed=3"]


def kill_and_resume(tmp_path, overrides, kill_at, expect_step):
    ref, part = tmp_path / "ref", tmp_path / "part"
    run(compose_cfg(overrides, ref))
    with pytest.raises(Interrupted):
        run(compose_cfg([*overrides, f"callbacks.kill_at_step={kill_at}"], part))
    ck = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == expect_step
    run(compose_cfg([*overrides, f"resume={part}"], tmp_path / "unused"))
    assert not (tmp_path / "unused").exists()  # the resume writes into the run it continues, only there
    return ref, part


METHODS = {"lora": ["adapter.dropout=0.1"], "vera": ["adapter.dropout=0.1"], "randlora": ["adapter.dropout=0.1"],
           "dora": ["adapter.dropout=0.1"], "nola": ["adapter.dropout=0.1", "adapter.k=16"],
           "dora_dr": ["adapter.dropout=0.1", "adapter.r=4", "adapter.prune_interval=2"],
           "full": ["+model.kwargs.proj_drop_rate=0.1", "adapter.lr=1e-3"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_mid_epoch_kill_and_resume_is_exact_for_every_method(method, tmp_path, interrupt):
    """Checkpoints every 3 steps (4 batches per epoch): killed at step 7, resumed from the step-6
    checkpoint, in the middle of the second epoch; max_steps=10 ends training in the third epoch.
    Dropout is on, so the resumed steps must draw the uninterrupted run's random numbers."""
    over = [*TINY, f"adapter={method}", *METHODS[method], "trainer.max_epochs=3", "++trainer.max_steps=10",
            "callbacks.checkpoint_every_n_train_steps=3"]
    ref, part = kill_and_resume(tmp_path, over, kill_at=7, expect_step=6)
    assert_same_run(ref, part)


@pytest.mark.parametrize("max_steps", [None, 10], ids=["max_epochs", "max_steps"])
def test_epoch_end_kill_and_resume_is_exact(max_steps, tmp_path, interrupt):
    """Killed in the second epoch, resumed from the first epoch's end. With max_steps the resumed run
    trained its second epoch on the third epoch's order and stopped one epoch early with max_epochs
    (Lightning 2.6 counts the epoch twice when it restarts an iteration-based run from an epoch-end
    checkpoint): the default job with ++trainer.max_steps=60 ended at test/acc 0.8357 instead of 0.8468."""
    over = [*TINY, "adapter=randlora", "adapter.dropout=0.1", "trainer.max_epochs=3"]
    if max_steps:
        over.append(f"++trainer.max_steps={max_steps}")
    ref, part = kill_and_resume(tmp_path, over, kill_at=6, expect_step=4)
    assert_same_run(ref, part)


def test_default_job_with_max_steps_resumes_exactly(tmp_path, interrupt):
    """The issue's case, shortened: the default job (tiny_vit_digits on digits) with max_steps, killed
    after its first epoch-end checkpoint and resumed."""
    over = ["trainer.limit_train_batches=5", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
            "++trainer.max_steps=12"]
    ref, part = kill_and_resume(tmp_path, over, kill_at=7, expect_step=5)
    assert_same_run(ref, part)


def test_resume_from_a_checkpoint_at_an_epoch_end_step(tmp_path, interrupt):
    """A step-triggered checkpoint that falls on an epoch's last batch (every 2 steps, 4 batches):
    the resume starts the next epoch at its first batch."""
    over = [*TINY, "adapter=lora", "adapter.dropout=0.1", "trainer.max_epochs=3",
            "callbacks.checkpoint_every_n_train_steps=2"]
    ref, part = kill_and_resume(tmp_path, over, kill_at=5, expect_step=4)
    assert_same_run(ref, part)


def test_two_interruptions(tmp_path, interrupt):
    """Killed twice (mid-epoch both times): the run folder ends as the uninterrupted run's, with both
    interrupted attempts in its history."""
    over = [*TINY, "adapter=randlora", "adapter.dropout=0.1", "trainer.max_epochs=3",
            "callbacks.checkpoint_every_n_train_steps=3"]
    ref, part = tmp_path / "ref", tmp_path / "part"
    run(compose_cfg(over, ref))
    with pytest.raises(Interrupted):
        run(compose_cfg([*over, "callbacks.kill_at_step=4"], part))
    with pytest.raises(Interrupted):
        run(compose_cfg([*over, "callbacks.kill_at_step=8", f"resume={part}"], tmp_path / "x"))
    run(compose_cfg([*over, f"resume={part}"], tmp_path / "x"))
    assert_same_run(ref, part)
    history = results(part)["attempts"]
    assert [a["status"] for a in history] == ["failed", "failed", "completed"]
    assert [(a["resumed_from"] or {}).get("global_step") for a in history] == [None, 3, 6]


def test_sampler_position_and_ranks():
    """The sampler's share of an epoch, split across ranks as Lightning's wrapper split it, and a pass
    that starts in the middle: the rest of the uninterrupted pass, then the next epochs in order."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from randlora.data.samplers import EpochSeededSampler
    n, seed = 23, 5
    for world in (1, 2, 3):
        for rank in range(world):
            mine = EpochSeededSampler(n, seed, num_replicas=world, rank=rank)
            plain = EpochSeededSampler(n, seed, num_replicas=1, rank=0)
            for epoch in (0, 1):
                mine.set_epoch(epoch)
                plain.set_epoch(epoch)
                wrapped = DistributedSamplerWrapper(plain, num_replicas=world, rank=rank, shuffle=False)
                assert list(mine) == list(wrapped)
    s = EpochSeededSampler(n, seed)
    s.set_epoch(2)
    full2 = list(s)
    s.set_epoch(3)
    full3 = list(s)
    r = EpochSeededSampler(n, seed)
    r.resume_at(2, 7)
    r.set_epoch(9)  # Lightning's number after a restart is ignored: the sampler counts its passes
    assert list(r) == full2[7:]
    r.set_epoch(11)
    assert list(r) == full3
    assert len(r) == n
