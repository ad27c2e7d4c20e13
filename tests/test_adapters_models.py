"""The adapters on the real model families the framework uses, built small with random weights."""
import pytest
import torch
from torch import nn

from randlora.adapters import (adapter_state_dict, adapted_layers, count_trainable, inject,
                               load_adapter_state_dict, merge, unmerge)
from tests.tiny_models import tiny_clip, tiny_llama, tiny_phi3, tiny_vit


def _clip_loss(model):
    img = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    txt = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))
    f_img, f_txt, scale = model(img, txt)
    logits = scale * f_img @ f_txt.t()
    return nn.functional.cross_entropy(logits, torch.arange(3)), (img, txt)


@pytest.mark.parametrize("method", ["lora", "vera", "randlora"])
def test_open_clip_in_proj_and_mlp_train_in_both_towers(method):
    base = tiny_clip()
    loss0, inputs = _clip_loss(base)
    model = inject(tiny_clip(), method, target_modules=["attn", "c_fc", "c_proj"], r=4)
    names = [n for n, _ in adapted_layers(model)]
    assert sum(n.startswith("visual.") and n.endswith(".attn") for n in names) == 2
    assert sum(n.startswith("transformer.") and n.endswith(".attn") for n in names) == 2
    loss, _ = _clip_loss(model)
    torch.testing.assert_close(loss, loss0)
    # a step makes every update non-zero; after it, each attention in_proj adapter has a gradient
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss.backward()
    opt.step()
    model.zero_grad()
    _clip_loss(model)[0].backward()
    for name, layer in adapted_layers(model):
        if name.endswith(".attn"):
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.update.parameters()), name
    with torch.no_grad():
        y = model(*inputs)[0]
        merge(model)
        torch.testing.assert_close(model(*inputs)[0], y, rtol=1e-4, atol=1e-5)
        unmerge(model)


@pytest.mark.parametrize("method", ["lora", "vera", "randlora"])
def test_timm_vit_fused_qkv(method):
    base = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    model = inject(tiny_vit(), method, target_modules=["qkv", "fc1", "fc2"], r=4, trainable_modules=["head"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))
    assert len(adapted_layers(model)) == 6
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert model.head.weight.grad is not None
    state = adapter_state_dict(model)
    assert all(".update." not in k for k in state)  # keys are relative to the adapted layer name
    fresh = load_adapter_state_dict(tiny_vit(), state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_llama_and_phi3_targets(method):
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    for build, targets in ((tiny_llama, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
                           (tiny_phi3, ["qkv_proj", "gate_up_proj", "down_proj"])):
        base = build()
        model = inject(build(), method, target_modules=targets, r=4)
        assert len(adapted_layers(model)) == 2 * len(targets)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, base(ids).logits)
        out = model(ids, labels=ids)
        out.loss.backward()
        assert count_trainable(model) == sum(p.numel() for n, p in model.named_parameters() if ".update." in n)
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_bf16_llama_with_fp32_adapters():
    model = tiny_llama().to(torch.bfloat16)
    inject(model, "randlora", target_modules=["q_proj", "v_proj", "down_proj"], r=4)
    ups = [layer.update for _, layer in adapted_layers(model)]
    assert all(p.dtype == torch.float32 for u in ups for p in u.parameters())
    assert ups[0].bases.B.dtype == torch.float32
    ids = torch.randint(0, 64, (2, 10))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for u in ups for p in u.parameters())


def test_llama_gradient_checkpointing_still_trains_adapters():
    from omegaconf import OmegaConf

    from randlora.models.llama import build_causal_lm
    from tests.helpers import ROOT
    cfg = OmegaConf.load(ROOT / "configs" / "model" / "tiny_llama.yaml")
    cfg.gradient_checkpointing = True
    model = build_causal_lm(cfg).backbone
    inject(model, "randlora", target_modules=list(cfg.targets), r=4)
    model.train()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    # lambda = 0 at init, so the first gradient reaches every lambda (gamma's is zero at this step)
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("lambda_")]
    assert len(grads) == 10 and all(g is not None and g.abs().sum() > 0 for g in grads)
