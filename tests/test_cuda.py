"""The adapter invariants and the training entry point on a CUDA device, in fp32 and bf16.

Collected only where ``torch.cuda.is_available()`` (see conftest.py): CI has no GPU, so these run on
a GPU machine with ``make test-cuda``; the results of the last such run are recorded in
benchmarks/RESULTS.md. Each test compares the GPU against a CPU float64 reference or against
itself (merged vs unmerged, paths vs paths), so a kernel or dtype bug on CUDA fails here.
"""
import json

import pytest
import torch
from torch import nn

from randlora.adapters import (adapter_state_dict, inject, load_adapter_state_dict, merge, shared_bases,
                               unmerge)
from tests.conftest import TinyNet
from tests.helpers import train_cli

DEV = torch.device("cuda")
TARGETS = ["attn", "up", "down", "sq"]
CASES = {
    "lora": dict(r=4),
    "vera": dict(r=16, seed=3),
    "randlora_merged": dict(r=3, seed=3, path="merged"),
    "randlora_factorised": dict(r=3, seed=3, path="factorised"),
    "dora": dict(r=4),
    "nola": dict(r=1, k=16, seed=3),
}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def build(case, seed=0):
    torch.manual_seed(seed)
    return inject(TinyNet(), case.split("_")[0], target_modules=TARGETS, trainable_modules=["head"], **CASES[case])


def data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, 12, generator=g).to(DEV), torch.randint(0, 3, (n,), generator=g).to(DEV)


@pytest.mark.parametrize("case", list(CASES))
def test_invariants_on_cuda(case):
    torch.manual_seed(0)
    ref = TinyNet().to(DEV)
    model = build(case).to(DEV)
    x, y = data()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)  # identity at init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for k, v in model.state_dict().items():
        changed = not torch.equal(v, before[k])
        trained = ".update." in k or k.startswith("head.")
        if not trained:
            assert not changed, f"{k} changed on CUDA"
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if ".update." in k)
    with torch.no_grad():
        yu = model(x)
        merge(model)
        torch.testing.assert_close(model(x), yu, rtol=1e-4, atol=1e-5)
        unmerge(model)
        torch.testing.assert_close(model(x), yu, rtol=1e-4, atol=1e-5)
    # adapter tensors saved on the GPU load into a fresh CPU model and give the same outputs
    sd = {k: v.cpu() if torch.is_tensor(v) else v for k, v in adapter_state_dict(model).items()}
    fresh = build(case, seed=0)
    load_adapter_state_dict(fresh, sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x.cpu()), yu.cpu(), rtol=1e-4, atol=1e-5)


def test_bases_identical_on_cuda_and_cpu():
    cpu = build("randlora_merged")
    gpu = build("randlora_merged").to(DEV)
    for name, t in shared_bases(cpu)._buffers.items():
        g = shared_bases(gpu)._buffers[name]
        assert g.device.type == "cuda" and g.dtype == torch.float32
        assert torch.equal(g.cpu(), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(384, 128), (128, 384), (256, 256)])
def test_randlora_paths_match_float64_reference(dtype, shape):
    """Both compute paths, on CUDA, against the same layer in float64 on the CPU."""
    out_f, in_f = shape
    results = {}
    for path in ("factorised", "merged", "auto"):
        torch.manual_seed(0)
        model = inject(nn.Sequential(nn.Linear(in_f, out_f)), "randlora", target_modules=["0"], r=8,
                       path=path, init="vision", seed=1)
        upd = model[0].update
        with torch.no_grad():
            upd.lambda_.normal_()
            upd.gamma.normal_(std=0.05)
        ref = [p.detach().double() for p in (upd.lambda_, upd.gamma)]
        x = torch.randn(4, 300, in_f)
        gy = torch.randn(4, 300, out_f)
        # float64 CPU reference
        m64 = inject(nn.Sequential(nn.Linear(in_f, out_f)), "randlora", target_modules=["0"], r=8,
                     path="factorised", init="vision", seed=1)
        m64.load_state_dict(model.state_dict())
        m64 = m64.double()
        x64 = x.double().requires_grad_()
        y64 = m64(x64)
        g64 = torch.autograd.grad(y64, (x64, m64[0].update.lambda_, m64[0].update.gamma), gy.double())
        assert torch.equal(m64[0].update.lambda_.detach(), ref[0])
        # CUDA, fp32 weights; bf16 = bf16 base weights + autocast, fp32 adapter parameters
        model = model.to(DEV)
        if dtype == torch.bfloat16:
            model[0].base_layer.to(dtype)
        xd = x.to(DEV, dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = model(xd)
        grads = torch.autograd.grad(y, (xd, upd.lambda_, upd.gamma), gy.to(DEV, y.dtype))
        assert upd.lambda_.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads[1:])
        results[path] = (upd.last_path, y, grads)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        scale = lambda t: t.double().abs().max().item()  # noqa: E731
        torch.testing.assert_close(y.double().cpu() / scale(y64), y64.detach() / scale(y64), **tol)
        for g, r in zip(grads, g64):
            torch.testing.assert_close(g.double().cpu() / scale(r), r / scale(r), **tol)
    assert results["factorised"][0] == "factorised" and results["merged"][0] == "merged"
    assert results["auto"][0] == "merged"  # 1200 tokens over 128-384 wide layers: the merged path is cheaper


def test_bf16_model_training_steps_on_cuda():
    """A bf16 base model (weights cast with .to(bf16)) with RandLoRA trains: the bases stay fp32,
    lambda / gamma stay fp32 master weights, the loss falls."""
    torch.manual_seed(0)
    model = inject(TinyNet(d=64, hidden=128), "randlora", target_modules=TARGETS, trainable_modules=["head"],
                   r=8, seed=0)
    model = model.to(DEV, torch.bfloat16)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    assert all(t.dtype == torch.float32 for t in shared_bases(model)._buffers.values())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 10, 64, generator=g).to(DEV, torch.bfloat16)
    y = torch.randint(0, 3, (32,), generator=g).to(DEV)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_train_py_on_gpu_bf16(tmp_path):
    """The default quick-start job on the GPU with bf16-mixed precision, end to end."""
    out = tmp_path / "run"
    p = train_cli(["trainer=gpu", f"paths.output_dir={out}", "data.epochs=3"], timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed"
    assert res["metrics"]["test/acc"] > 0.8, res["metrics"]
    assert res["config"]["trainer"]["accelerator"] == "gpu"
    assert res["config"]["trainer"]["precision"] == "bf16-mixed"
    assert res["perf"]["peak_memory_mb"] > 0 and res["perf"]["samples_per_s"] > 0


@pytest.mark.slow
def test_train_py_fsdp_on_one_gpu(tmp_path):
    """randlora's FSDP plan on a GPU: replicated adapters on the device, sharded blocks, bf16-mixed."""
    out = tmp_path / "run"
    p = train_cli(["trainer=fsdp", "trainer.devices=1", f"paths.output_dir={out}", "data.epochs=3"], timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["metrics"]["test/acc"] > 0.8, res["metrics"]


def test_non_finite_guard_defers_on_cuda(tmp_path):
    from types import SimpleNamespace

    from randlora.training.callbacks import NonFiniteGuard
    guard = NonFiniteGuard(str(tmp_path), check_every=1000)
    trainer = SimpleNamespace(global_step=0, current_epoch=0, log_every_n_steps=1000)
    for step, v in enumerate([1.0, float("nan"), 2.0]):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(v, device=DEV)}, None, step)
    assert guard._record.device.type == "cuda"
    with pytest.raises(FloatingPointError, match="at step 1"):
        guard.on_train_epoch_end(trainer, None)
