"""trainer=fsdp: frozen weights sharded per block, trained tensors replicated, and a sharded run that
computes what a DDP run computes (the adapter file, the metrics, the parameter counts), resumes
exactly, and writes files that load into a plain model. On the CPU through trainer=fsdp_cpu (gloo)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from randlora.adapters import inject, load_adapter, save_adapter
from randlora.adapters import adapter_state_dict, clean_name
from randlora.training.distributed import fsdp_strategy, replicated_parameters
from randlora.models import build_model
from randlora.training.build import build_datamodule, build_task
from randlora.training.checkpoints import TrainedTensors, check_checkpoint
from randlora.training.config import validate_config
from tests.helpers import compose_cfg, results, train_cli


def _task(*overrides):
    cfg = compose_cfg(["trainer=cpu", *overrides])
    dm = build_datamodule(cfg)
    dm.setup()
    return build_task(cfg, build_model(cfg.model), dm)


def test_clean_name_drops_only_wrapper_components():
    assert clean_name("net.blocks.0._fsdp_wrapped_module.attn.qkv") == "net.blocks.0.attn.qkv"
    assert clean_name("a._fsdp_wrapped_module._checkpoint_wrapped_module.b") == "a.b"
    assert clean_name("net.my_wrapped_module_x.fc") == "net.my_wrapped_module_x.fc"


def test_strategy_shards_blocks_and_replicates_what_trains():
    task = _task("model=tiny_clip", "adapter=randlora")
    s = fsdp_strategy(task, "cpu")
    policy = s.kwargs["auto_wrap_policy"]
    assert {c.__name__ for c in policy._module_classes} == {"ResidualAttentionBlock"}  # both towers
    trained, frozen = replicated_parameters(task)
    assert {id(p) for p in trained} == {id(p) for p in task.parameters() if p.requires_grad}
    assert [p.dim() for p in frozen] == [0]  # CLIP's logit scale: FSDP cannot flatten a scalar
    assert {id(p) for p in s.kwargs["ignored_states"]} == {id(p) for p in trained + frozen}
    mp = s.mixed_precision  # nothing cast by FSDP: autocast does the compute casts
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (None, None, None)
    assert s.kwargs["use_orig_params"] and s.on_cpu and not s.shards_trained

    full = _task("model=tiny_vit", "adapter=full")
    s = fsdp_strategy(full, "gpu")
    assert s.shards_trained and s.replicated == [] and "ignored_states" not in s.kwargs and not s.on_cpu


def test_strategy_needs_repeated_blocks():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no repeated blocks .* use trainer.strategy=ddp"):
        fsdp_strategy(Flat(), "cpu")


@pytest.mark.parametrize("overrides, match", [
    (["compile.enabled=true"], "compile.enabled=true is not supported with trainer.strategy=fsdp"),
    (["trainer.precision=bf16-mixed"], "would run in float32 .* use trainer.precision=32-true"),
    (["model=tiny_llama", "data=commonsense_tiny", "task.merge_for_test=true"], "task.merge_for_test=true folds"),
])
def test_unsupported_fsdp_settings_are_refused_up_front(overrides, match):
    cfg = compose_cfg(["trainer=fsdp_cpu", "adapter=randlora", *overrides])
    with pytest.raises(ValueError, match=match):
        validate_config(cfg)


def _one_rank_group(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)


def test_files_from_a_wrapped_model_carry_plain_names(tmp_path):
    """FSDP inserts `_fsdp_wrapped_module` into module paths; the adapter file and the checkpoint's
    trained keys written from a wrapped model must be those of the plain model."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    task = _task("model=tiny_vit", "adapter=randlora")
    task.net.backbone.blocks[0].norm1.requires_grad_(True)  # a trained tensor inside an FSDP unit
    plain_keys = set(adapter_state_dict(task.net))
    plain_trained = {n for n, p in task.named_parameters() if p.requires_grad}
    with torch.no_grad():  # distinct values, so a swapped tensor would show
        for i, p in enumerate(p for p in task.parameters() if p.requires_grad):
            p.copy_(torch.randn_like(p) + i)
    s = fsdp_strategy(task, "cpu")
    _one_rank_group(tmp_path)
    try:
        wrapped = FSDP(task, device_id=torch.device("cpu"), **s.kwargs)
        assert any("_fsdp_wrapped_module" in n for n, _ in task.named_parameters())
        assert set(adapter_state_dict(task.net)) == plain_keys
        # Lightning's full state dict under FSDP has plain names; the trained ones (the head too) are kept
        ck = {"state_dict": {clean_name(n): p.detach() for n, p in task.named_parameters()}}
        TrainedTensors().on_save_checkpoint(None, task, ck)
        assert set(ck["state_dict"]) == plain_trained
        assert {"net.head.weight", "net.backbone.blocks.0.norm1.weight"} <= plain_trained
        save_adapter(task.net, tmp_path / "a.safetensors")
        del wrapped
    finally:
        dist.destroy_process_group()
    fresh = _task("model=tiny_vit", "adapter=randlora")
    load_adapter(fresh.net, tmp_path / "a.safetensors")
    saved = load_file(str(tmp_path / "a.safetensors"))
    for k, v in adapter_state_dict(fresh.net).items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, saved[k]), k


class _AttnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):  # need_weights=True: the wrapper's materialised fallback, not its SDPA path
        return self.attn(x, x, x)[0]


class _AttnStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_AttnBlock(), _AttnBlock()])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("method, opts", [("lora", dict(r=2)), ("dora", dict(r=2)), ("randlora", dict(r=2))])
def test_materialised_fallback_keeps_the_update_inside_an_fsdp_unit(tmp_path, method, opts):
    """During an FSDP unit's forward (use_orig_params) a plain attribute holding the gathered weight
    shadows the registered Parameter. The fallback once swapped only the Parameter, so the module
    read W0 and the update vanished (no gradient, LoRA's output = the base's); DoRA's dW was also
    taken against the shard. Outputs and gradients must be the plain model's."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    def build():
        torch.manual_seed(0)
        net = inject(_AttnStack().double(), method, target_modules=["attn"], **opts)
        with torch.no_grad():  # a non-zero update
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        return net

    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = build()
    ref(x).square().sum().backward()
    net = build()
    trained = [p for p in net.parameters() if p.requires_grad]
    _one_rank_group(tmp_path)
    try:
        wrapped = FSDP(net, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({_AttnBlock}),
                       ignored_states=trained, use_orig_params=True)
        y = wrapped(x)
        y.square().sum().backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(y, ref(x), rtol=1e-12, atol=1e-12)
    got = {clean_name(n): p.grad for n, p in net.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and all(g is not None for g in got.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)


# ------------------------------------------------------------------ end to end: 2 gloo ranks, CPU
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
         "trainer.limit_test_batches=2", "data.batch_size=16", "seed=3"]


def _run(tmp_path, name, strategy, *overrides):
    out = train_cli([f"trainer={strategy}", *SHORT, *overrides, f"hydra.run.dir={tmp_path / name}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return results(tmp_path / name), load_file(str(tmp_path / name / "checkpoints" / "adapter.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("overrides, exact", [
    (["model=tiny_vit", "adapter=randlora", "optim.lr=1e-2"], True),  # norm clipping at 1.0 (the default)
    (["model=tiny_clip", "adapter=vera"], True),                       # both towers, a frozen 0-d parameter
    (["model=tiny_llama", "data=commonsense_tiny", "adapter=randlora", "data.fraction=0.2", "data.val_size=8",
      "data.max_test_per_task=3", "task.max_new_tokens=8"], True),  # generation through the sharded blocks
    (["model=tiny_vit", "adapter=full", "optim.lr=1e-3"], False),   # everything sharded, FSDP's norm
])
def test_fsdp_run_computes_what_a_ddp_run_computes(tmp_path, overrides, exact):
    rf, af = _run(tmp_path, "fsdp", "fsdp_cpu", *overrides)
    rd, ad = _run(tmp_path, "ddp", "ddp_cpu", *overrides)
    assert rf["status"] == rd["status"] == "completed"
    assert rf["params"] == rd["params"]  # whole-model counts, not one rank's shards
    assert af.keys() == ad.keys()
    moved = 0
    for k in af:
        assert af[k].shape == ad[k].shape and af[k].dtype == ad[k].dtype, k
        if exact:  # replicated tensors, the same all-reduce of the same gradients: bit for bit
            assert torch.equal(af[k], ad[k]), k
        else:  # reduce-scatter vs all-reduce: the same sums in another order. Adam divides by the
            # gradient's running RMS, so an element whose gradient is ~0 moves by up to lr x (order noise):
            # 1.2e-6 seen at lr 1e-3 (rtol is meaningless near zero there)
            torch.testing.assert_close(af[k], ad[k], rtol=1e-5, atol=1e-5)
        moved += 1
    assert moved == len(af) > 0
    quality = sorted(k for k in rd["metrics"] if not k.startswith("perf/"))  # losses, accuracies
    assert quality == sorted(k for k in rf["metrics"] if not k.startswith("perf/")) and "train/loss_epoch" in quality
    for k in quality:
        if exact:
            assert rf["metrics"][k] == rd["metrics"][k], k
        else:
            assert rf["metrics"][k] == pytest.approx(rd["metrics"][k], rel=1e-5), k


@pytest.mark.slow
def test_fsdp_kill_9_then_resume_matches_uninterrupted_and_loads_unsharded(tmp_path):
    base = ["model=tiny_vit", "adapter=randlora", "trainer=fsdp_cpu", "trainer.max_epochs=3",
            "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
            "data.batch_size=16", "seed=3", "optim.lr=1e-2"]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert train_cli([*base, f"hydra.run.dir={ref}"]).returncode == 0
    out = train_cli([*base, "callbacks.kill_at_step=6", f"hydra.run.dir={crashed}"])  # both ranks killed
    assert out.returncode == -9
    out = train_cli([*base, f"resume={crashed}", f"hydra.run.dir={tmp_path / 'resumer'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = results(ref), results(crashed)
    assert b["status"] == "completed"
    for k in ("test/acc", "test/loss", "val/loss", "train/loss_epoch"):
        assert a["metrics"][k] == b["metrics"][k], k
    ta = load_file(str(ref / "checkpoints" / "adapter.safetensors"))
    tb = load_file(str(crashed / "checkpoints" / "adapter.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # the sharded run's Lightning checkpoint holds whole tensors under plain names
    ck = torch.load(ref / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    task = _task("model=tiny_vit", "adapter=randlora", "seed=3")
    check_checkpoint(task.net, ck)
    trained = {n: p for n, p in task.named_parameters() if p.requires_grad}
    assert set(ck["state_dict"]) == set(trained)
    load_adapter(task.net, ref / "checkpoints" / "adapter.safetensors")  # the same tensors as the adapter file
    assert all(torch.equal(ck["state_dict"][n], p) for n, p in trained.items())
