"""DoRA-DR: the pruning schedule, closed-form importance, final budget, hard masks, resume state."""
import math

import pytest
import torch
from torch import nn

from randlora.adapters import adapter_state_dict, inject, load_adapter_state_dict
from randlora.adapters.dora_dr import DoRADRUpdate, DynamicRankScheduler
from tests.conftest import TinyNet

TARGETS = ["attn", "up", "down", "sq"]


def build(r=4, **kw):
    torch.manual_seed(0)
    return inject(TinyNet(), "dora_dr", target_modules=TARGETS, r=r, trainable_modules=["head"], **kw)


def test_closed_form_importance_equals_brute_force():
    torch.manual_seed(0)
    u = DoRADRUpdate(7, 5, r=2, r_start=3, scaling=0.5)
    with torch.no_grad():
        u.gates.normal_()
    comps = [u.gates[i] * torch.outer(u.lora_B[:, i], u.lora_A[i]) for i in range(3)]
    total = torch.linalg.matrix_norm(sum(comps))
    brute = torch.stack([torch.linalg.matrix_norm(c) for c in comps]) / (total + 1e-8)
    torch.testing.assert_close(u.component_share(), brute.detach())
    dem = u.lora_A.var(dim=1, unbiased=True).sum() + u.lora_B.var(dim=0, unbiased=True).sum()
    torch.testing.assert_close(u.dem_term(), dem)


def test_start_rank_and_counts():
    model = build(r=4)  # r' = ceil(1.5 * 4) = 6
    ups = [m.update for m in model.modules() if isinstance(getattr(m, "update", None), DoRADRUpdate)]
    assert {u.r_start for u in ups} == {6}
    sched = DynamicRankScheduler(model, 100, r=4, r_start=6)
    c = sched.counts()
    assert c["training"] == sum(6 * (u.out_features + u.in_features + 1) for u in ups)


def test_refuses_unknown_total_steps():
    with pytest.raises(ValueError, match="total number of optimizer steps"):
        DynamicRankScheduler(build(), float("inf"), r=4, r_start=6)
    with pytest.raises(ValueError, match="total number of optimizer steps"):
        DynamicRankScheduler(build(), None, r=4, r_start=6)


def _train_with_schedule(model, sched, steps, x, y, start=1):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    log = {}
    for step in range(start, steps + 1):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        reg = sched.regularizer(step - 1)
        if reg is not None:
            loss = loss + reg
        loss.backward()
        opt.step()
        log[step] = sched.after_step(step)
    return log


def test_pruning_follows_schedule_and_ends_at_budget(batch):
    model = build(r=4)
    T = 40
    sched = DynamicRankScheduler(model, T, r=4, r_start=6, prune_interval=2)
    # t_start = 6, t_end = 20, window 14; N = 4 layers x 6 = 24 components
    assert (sched.t_start, sched.t_end, sched.n_total) == (6, 20, 24)
    assert sched.prune_count(6) == 1  # the first pruning event removes one component
    assert sched.prune_count(13) == max(1, int(24 * (2 / 6) * (7 / 14) ** 3))
    assert sched.prune_count(20) == int(24 * 2 / 6)
    x, y = batch
    log = _train_with_schedule(model, sched, T, *batch)
    assert [log[s]["phase"] for s in (5, 6, 20, 21)] == [1, 2, 2, 3]
    assert log[6]["pruned"] >= 1 and log[20]["pruned"] >= 8
    # the final number of live components equals the budget r per layer on average
    assert log[T]["live"] == 24 - 8 == 4 * 4
    c = sched.counts()
    assert c["live_components"] == 16 and c["stored"] < c["training"]


def test_pruned_gate_stays_zero(batch):
    model = build(r=4)
    sched = DynamicRankScheduler(model, 20, r=4, r_start=6, prune_interval=1)
    _train_with_schedule(model, sched, 20, *batch)
    masks = {n: u.final_mask.clone() for n, u in sched.layers}
    assert any(m.any() for m in masks.values())
    # more steps with a large LR try to revive the gates; phase 3 re-zeroes them after every step
    _train_with_schedule(model, sched, 30, *batch, start=21)
    for n, u in sched.layers:
        assert torch.all(u.gates[masks[n]] == 0)


def test_pruning_state_round_trips_through_state_dict(batch):
    model = build(r=4)
    sched = DynamicRankScheduler(model, 20, r=4, r_start=6, prune_interval=1)
    _train_with_schedule(model, sched, 20, *batch)
    state = adapter_state_dict(model)
    assert any(k.endswith("final_mask") for k in state) and any(k.endswith("ema_score") for k in state)
    torch.manual_seed(0)
    fresh = load_adapter_state_dict(TinyNet(), state)
    for (n, u), (_, v) in zip(sched.layers, DynamicRankScheduler(fresh, 20, r=4, r_start=6).layers):
        assert torch.equal(u.final_mask, v.final_mask) and torch.equal(u.ema_score, v.ema_score)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch[0]), model(batch[0]), rtol=0, atol=0)


def test_heatmap_image(tmp_path, batch):
    model = build(r=4)
    sched = DynamicRankScheduler(model, 20, r=4, r_start=6, prune_interval=1)
    _train_with_schedule(model, sched, 20, *batch)
    from randlora.analysis import plot_rank_heatmap
    plot_rank_heatmap(sched.rank_table(), tmp_path / "ranks.png", r_start=6, r=4)
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isclose(sum(r for _, r in sched.rank_table()) / len(sched.layers), 4.0)


@pytest.mark.integration
def test_dora_dr_through_the_framework(tmp_path):
    from randlora.train import run
    from tests.helpers import compose_cfg
    cfg = compose_cfg(["model=tiny_vit", "adapter=dora_dr", "adapter.r=4", "adapter.prune_interval=2",
                       "trainer=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=10",
                       "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"], tmp_path)
    res = run(cfg)
    assert res["status"] == "completed"
    p = res["params"]
    assert p["adapter_stored"] < p["adapter_during_training"]
    assert p["lora_equivalent_rank"] == pytest.approx(4.0, rel=0.02)
    assert (tmp_path / "dora_dr_ranks.png").is_file()
    assert res["metrics"]["dora/live_components"] == 12 * 4  # 12 adapted matrices x r = 4


@pytest.mark.slow
def test_dora_dr_kill_and_resume_reproduces_the_final_masks(tmp_path):
    """SIGKILL inside the pruning window; resuming gives the same masks and weights as no interruption."""
    from safetensors.torch import load_file

    from tests.helpers import train_cli
    base = ["model=tiny_vit", "adapter=dora_dr", "adapter.r=4", "adapter.prune_interval=2", "trainer=cpu",
            "trainer.max_epochs=4", "trainer.limit_train_batches=6", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.deterministic=true", "seed=5"]
    ref, part = tmp_path / "ref", tmp_path / "part"
    assert train_cli([*base, f"hydra.run.dir={ref}"]).returncode == 0
    # 24 steps: pruning window = steps 3..12; killed at step 8, last checkpoint at step 6
    assert train_cli([*base, "callbacks.kill_at_step=8", f"hydra.run.dir={part}"]).returncode == -9
    ck = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 6 and any(k.endswith("ema_score") for k in ck["state_dict"])
    out = train_cli([*base, f"resume={part}", f"hydra.run.dir={tmp_path / 'resumer'}"])
    assert out.returncode == 0, out.stderr[-2000:]
    a = load_file(str(ref / "checkpoints" / "adapter.safetensors"))
    b = load_file(str(part / "checkpoints" / "adapter.safetensors"))
    masks = [k for k in a if k.endswith("final_mask")]
    assert masks and any(a[k].any() for k in masks)
    assert all(torch.equal(a[k], b[k]) for k in a)
