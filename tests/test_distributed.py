"""DDP and the constant buffers: the random bases (and other non-persistent buffers) are not broadcast by
DDP at every step, persistent state (BatchNorm statistics) still is, and ranks that built different
bases are caught at fit start instead of silently taking rank 0's."""
from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from randlora.adapters import inject, shared_bases
from randlora.buffers import check_static_buffers, static_buffer_names, static_buffers_digest
from randlora.models import build_model
from randlora.tasks.classification import ClassificationTask
from randlora.training.build import build_datamodule, build_task
from tests.helpers import FAST, compose_cfg


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Linear(8, 4)
        self.register_buffer("table", torch.arange(4.0), persistent=False)

    def forward(self, x):
        return self.b(self.bn(self.a(x))) + self.table


def _adapted(method="randlora", seed=0):
    net = _Net()
    inject(net, method, r=2, target_modules=["a", "b"], seed=seed)
    return net


def _task(adapter="randlora", *extra):
    cfg = compose_cfg(["model=tiny_vit", f"adapter={adapter}", "trainer=cpu", *extra])
    dm = build_datamodule(cfg)
    dm.setup()
    return build_task(cfg, build_model(cfg.model), dm)


def test_static_buffer_names_lists_bases_and_constants_but_no_persistent_state():
    net = _adapted()
    names = static_buffer_names(net)
    bases = shared_bases(net)
    by_id = {id(b): n for n, b in net.named_buffers()}
    assert names == sorted([by_id[id(bases.A)], by_id[id(bases.B)], "table"])
    assert not any(n.startswith("bn.") for n in names)  # running_mean / running_var / num_batches_tracked


def test_task_tells_ddp_to_skip_the_bases(tmp_path):
    task = _task()
    ignored = set(task._ddp_params_and_buffers_to_ignore)
    bases = {n for n, b in task.named_buffers() if any(b is t for t in shared_bases(task.net)._buffers.values())}
    assert bases and bases <= ignored
    # a real DDP wrapper (one gloo process) then has no buffer to broadcast before each forward
    # names assigned the documented way (torch's _set_params_and_buffers_to_ignore_for_model) add to ours
    DDP._set_params_and_buffers_to_ignore_for_model(task, ["net.head.weight"])
    assert set(task._ddp_params_and_buffers_to_ignore) == ignored | {"net.head.weight"}
    task._ddp_params_and_buffers_to_ignore = []
    assert set(task._ddp_params_and_buffers_to_ignore) == ignored
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = DDP(task)
        assert ddp.modules_buffers == []
        assert not ddp.will_sync_module_buffers()
        # persistent state (running statistics) of a task is still synchronised
        task.register_buffer("running_stat", torch.zeros(3))
        ddp = DDP(task)
        assert [id(b) for b in ddp.modules_buffers] == [id(task.running_stat)] and ddp.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()


def test_check_static_buffers_names_what_differs():
    net, same, other_seed = _adapted(seed=0), _adapted(seed=0), _adapted(seed=1)
    gather_with = lambda peer: (lambda t: torch.stack([t, torch.tensor([float(d) for d in static_buffers_digest(peer)],
                                                                          dtype=torch.float64)]))
    check_static_buffers(net, gather_with(same))  # identical: no error
    with pytest.raises(RuntimeError, match=r"the random bases differ across DDP ranks \(rank\(s\) \[1\]"):
        check_static_buffers(net, gather_with(other_seed))
    changed = _adapted(seed=0)
    changed.table += 1
    with pytest.raises(RuntimeError, match="non-persistent buffers .* differ across DDP ranks"):
        check_static_buffers(net, gather_with(changed))
    # the digest sees values, dtype and shape; persistent buffers (training state) are not part of it
    net.bn.running_mean += 1
    assert static_buffers_digest(net) == static_buffers_digest(same)


def _rank_main(rank, path, out):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = _adapted(seed=rank)  # rank 1 draws other bases, as a misconfigured launch would
        net._ddp_params_and_buffers_to_ignore = static_buffer_names(net)
        before = static_buffers_digest(net)
        ddp = DDP(net)
        ddp(torch.randn(4, 8)).sum().backward()
        after = static_buffers_digest(net)
        try:
            check_static_buffers(net, lambda t: _gather(t))
            msg = None
        except RuntimeError as e:
            msg = str(e)
        torch.save({"before": before, "after": after, "msg": msg,
                    "grad": [p.grad.clone() for p in net.parameters() if p.requires_grad]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _gather(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.stack(parts)


@pytest.mark.slow
def test_two_ranks_with_different_bases_are_caught_not_overwritten(tmp_path):
    out = str(tmp_path / "res")
    mp.start_processes(_rank_main, args=(str(tmp_path / "init"), out), nprocs=2, start_method="spawn")
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["before"] != r1["before"]
    # DDP left each rank's bases alone (it used to overwrite rank 1's with rank 0's at wrap time) ...
    assert r0["after"] == r0["before"] and r1["after"] == r1["before"]
    # ... so the fit-start check sees the mismatch on every rank
    assert r0["msg"] and "the random bases differ across DDP ranks (rank(s) [1]" in r0["msg"]
    assert r1["msg"] == r0["msg"]
    # gradients were still all-reduced (averaged) across the two ranks
    for g0, g1 in zip(r0["grad"], r1["grad"]):
        torch.testing.assert_close(g0, g1)


class _SkewedTask(ClassificationTask):
    """A task whose rank 1 holds other bases, as a launch with another adapter seed on one rank would."""

    def setup(self, stage):
        if self.global_rank == 1:
            with torch.no_grad():
                shared_bases(self.net).B.add_(1.0)
            shared_bases(self.net).invalidate()


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["fit", "test"])
def test_framework_stops_when_ranks_hold_other_bases(entry, tmp_path):
    """DDP no longer overwrites rank 1's bases with rank 0's, so the framework checks them itself (its
    ConstantBuffersCheck callback, which every train.py run has), in a training run (fit start) and in an
    evaluation-only run (test start) alike."""
    from randlora.train import _trainer
    from randlora.training.callbacks import ConstantBuffersCheck
    cfg = compose_cfg(["model=tiny_vit", "adapter=randlora", "optim.lr=1e-3", *FAST], tmp_path)
    dm = build_datamodule(cfg)
    task = build_task(cfg, build_model(cfg.model), dm)
    framework, _ = _trainer(cfg, task, tmp_path / "run", [], {}, {})
    assert any(isinstance(cb, ConstantBuffersCheck) for cb in framework.callbacks)
    task.__class__ = _SkewedTask
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, limit_val_batches=1,
                        limit_test_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[ConstantBuffersCheck()])
    with pytest.raises(Exception, match=r"the random bases differ across DDP ranks \(rank\(s\) \[1\]"):
        getattr(trainer, entry)(task, datamodule=dm)
