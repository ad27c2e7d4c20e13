"""Invariants every adapter method must satisfy (written once, run for each method)."""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from randlora.adapters import (adapter_state_dict, count_trainable, format_parameter_table, inject,
                               load_adapter, load_adapter_state_dict, lora_equivalent_rank,
                               merge, parameter_table, save_adapter, shared_bases, unmerge)
from randlora.adapters import REGISTRY, adapted_layers, adapter_meta, compute_paths, is_adapted
from tests.conftest import TinyNet

TARGETS = ["attn", "up", "down", "sq"]
CASES = {
    "lora": dict(r=4),
    "lora_scaled": dict(r=4, alpha=16),
    "vera": dict(r=16, seed=3),
    "vera_scaled": dict(r=16, seed=3, alpha=4),
    "randlora": dict(r=4, seed=3),
    "randlora_vision_init": dict(r=4, seed=3, init="vision", scale_sqrt_n=True),
    "randlora_sparse": dict(r=4, seed=3, distribution="sparse"),
    "randlora_merged": dict(r=3, seed=3, path="merged"),
    "randlora_factorised": dict(r=3, seed=3, path="factorised", dropout=0.0),
    "randlora_bf16bases": dict(r=4, seed=3, bases_dtype="bfloat16"),
    "dora": dict(r=4),
    "dora_full_norm_grad": dict(r=4, detach_norm=False),
    "nola": dict(r=1, k=16, seed=3),
    "dora_dr": dict(r=2),
    "nola_rank2": dict(r=2, k=8, seed=5),
    # a rank per layer (what an exact parameter budget mixes)
    "lora_layer_ranks": dict(r=4, alpha=8, layer_options={"up": {"r": 2}, "attn": {"r": 6, "alpha": 3.0}}),
    "dora_layer_ranks": dict(r=4, layer_options={"down": {"r": 3}}),
    "randlora_layer_ranks": dict(r=4, seed=3, layer_options={"up": {"r": 3}, "sq": {"r": 6}}),
}


def method_of(case):
    """The registered method a case name starts with (the longest: ``dora_dr`` is not ``dora``)."""
    return max((m for m in REGISTRY if case == m or case.startswith(m + "_")), key=len)


def test_every_registered_method_has_an_invariant_case():
    assert {method_of(c) for c in CASES} == set(REGISTRY), "add a CASES entry for every method in the registry"


def build(case, seed=0):
    torch.manual_seed(seed)
    m = TinyNet()
    if case == "full":
        return inject(m, "full")
    return inject(m, method_of(case), target_modules=TARGETS, trainable_modules=["head"], **CASES[case])


def train(model, batch, steps=3, lr=0.05):
    x, y = batch
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


ALL = ["full", *CASES]


@pytest.mark.parametrize("case", ALL)
def test_output_equals_base_at_init(case, batch):
    torch.manual_seed(0)
    base = TinyNet()
    adapted = build(case)
    torch.testing.assert_close(adapted(batch[0]), base(batch[0]), rtol=0, atol=0)


@pytest.mark.parametrize("case", ALL)
def test_only_adapter_and_listed_params_change(case, batch):
    model = build(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, batch)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    if case == "full":
        assert "up.weight" in changed and "head.weight" in changed
        return
    adapter_keys = {k for k in changed if ".update." in k and not k.endswith(("ema_score", "final_mask"))}
    assert adapter_keys, "no adapter parameter changed"
    assert changed - adapter_keys <= {"head.weight", "head.bias"}
    assert {"head.weight", "head.bias"} & changed
    # every adapted layer (attention in_proj included) received an update
    for name, _ in adapted_layers(model):
        assert any(k.startswith(name + ".update.") for k in changed), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".update." in n or n.startswith("head.") for n in trainable)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_unmerged_and_unmerge_restores(case, batch):
    model = train(build(case), batch)
    base_w = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    x = batch[0]
    with torch.no_grad():
        y = model(x)
        merge(model)
        merged_w = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
        assert any(not torch.equal(merged_w[k], base_w[k]) for k in base_w), "merge changed nothing"
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        unmerge(model)
        for k, v in model.state_dict().items():
            if k in base_w:
                torch.testing.assert_close(v, base_w[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ALL)
def test_save_load_roundtrip_exact(case, batch, tmp_path):
    model = train(build(case), batch)
    x = batch[0]
    with torch.no_grad():
        y = model(x)
    state = adapter_state_dict(model)
    torch.manual_seed(123)  # a different global seed must not matter
    fresh = TinyNet()
    # the fresh model has the same pretrained weights as the adapted one's base
    base_sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
               if ".update." not in k}
    fresh.load_state_dict(base_sd, strict=True)
    load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    # and through a safetensors file
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    fresh2 = TinyNet()
    fresh2.load_state_dict(base_sd, strict=True)
    load_adapter(fresh2, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh2(x), y, rtol=0, atol=0)


def test_state_dict_holds_only_trained_tensors_and_bases_once():
    model = build("randlora")
    state = adapter_state_dict(model)
    keys = [k for k in state if k != "__adapter_meta__"]
    assert all(k.endswith(("lambda_", "gamma")) or k.startswith("head.") for k in keys)
    assert not any(k.startswith("__bases__") for k in keys)
    torch.manual_seed(0)
    m2 = inject(TinyNet(), "randlora", target_modules=TARGETS, r=4, save_bases=True)
    keys2 = [k for k in adapter_state_dict(m2) if k.startswith("__bases__")]
    assert sorted(keys2) == ["__bases__.A", "__bases__.B"]


def test_saved_bases_are_used_on_load(batch):
    torch.manual_seed(0)
    model = inject(TinyNet(), "randlora", target_modules=TARGETS, r=4, save_bases=True)
    train(model, batch)
    with torch.no_grad():
        shared_bases(model).B.mul_(2.0)  # stored bases differ from what the seed regenerates
        y = model(batch[0])
    state = adapter_state_dict(model)
    torch.manual_seed(0)
    fresh = load_adapter_state_dict(TinyNet(), state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch[0]), y, rtol=0, atol=0)


BASES_SCRIPT = """
import hashlib, torch
from randlora.adapters.randlora import make_randlora_bases
from randlora.adapters.vera import make_vera_bases
b = make_randlora_bases([(20, 12), (12, 20), (36, 12)], 4, 7)
v = make_vera_bases([(20, 12), (12, 20)], 16, 7)
h = hashlib.sha256()
for t in (b.A, b.B, v.A, v.B):
    h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


@pytest.mark.integration
def test_same_seed_same_bases_in_another_process():
    out = [subprocess.run([sys.executable, "-c", BASES_SCRIPT], capture_output=True, text=True, check=True)
           .stdout.strip() for _ in range(2)]
    from randlora.adapters.randlora import make_randlora_bases
    torch.manual_seed(999)
    b = make_randlora_bases([(20, 12), (12, 20), (36, 12)], 4, 7)
    assert out[0] == out[1] and len(out[0]) == 64
    b2 = make_randlora_bases([(20, 12), (12, 20), (36, 12)], 4, 8)
    assert not torch.equal(b.B, b2.B)


def test_parameter_counts_equal_formulas():
    shapes = {"attn": (36, 12), "up": (20, 12), "down": (12, 20), "sq": (12, 12)}
    r = 4
    for method, per in {
        "lora": lambda o, i: r * (o + i),
        "vera": lambda o, i: o + r,
        "randlora": lambda o, i: -(-min(o, i) // r) * (r + min(o, i)),
        "dora": lambda o, i: r * (o + i) + o,
        "nola": lambda o, i: 2 * 1024,
        "dora_dr": lambda o, i: 6 * (o + i + 1),  # start rank ceil(1.5 r) = 6 gated components
    }.items():
        torch.manual_seed(0)
        m = inject(TinyNet(), method, target_modules=TARGETS, r=r, trainable_modules=["head"])
        expected = sum(per(o, i) for o, i in shapes.values())
        head = 12 * 3 + 3
        assert count_trainable(m) == expected + head, method
        rows = {row["layer"]: row["trainable"] for row in parameter_table(m)}
        assert rows == {k: per(*v) for k, v in shapes.items()}
        assert lora_equivalent_rank(m) == pytest.approx(expected / sum(o + i for o, i in shapes.values()))
        assert "total" in format_parameter_table(m)
    full = inject(TinyNet(), "full")
    assert count_trainable(full) == sum(p.numel() for p in TinyNet().parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_declared_shapes_are_what_each_update_allocates(case):
    """Counts and budgets come from each method's declared shapes; they must be what is built."""
    model = build(case)
    spec = REGISTRY[method_of(case)]
    meta = adapter_meta(model)
    for name, layer in adapted_layers(model):
        opts = spec.for_layer(spec.options(**meta["options"]), meta["layer_options"].get(name))
        o, i = layer.out_features, layer.in_features
        assert {n: tuple(p.shape) for n, p in layer.update.named_parameters()} == spec.param_shapes(o, i, opts)
        stored = {n: tuple(t.shape) for n, t in layer.update.state_dict().items()}
        assert stored == spec.state_shapes(o, i, opts)
        assert sum(p.numel() for p in layer.update.parameters()) == spec.num_trainable(o, i, opts)


def test_the_library_imports_without_the_framework():
    """``randlora.adapters`` is pure PyTorch: no Lightning, Hydra, OmegaConf, matplotlib or model zoo."""
    code = (
        "import sys, importlib.abc\n"
        "BANNED = ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'matplotlib', 'timm', 'open_clip',"
        " 'transformers', 'datasets', 'wandb', 'torchmetrics', 'torchvision')\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BANNED:\n"
        "            raise ImportError('framework module imported by the adapter library: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "import randlora.adapters as a\n"
        "m = a.inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), 'randlora', target_modules=['0'], r=2)\n"
        "a.merge(m); a.unmerge(m); a.adapter_state_dict(m)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _delta(model, name):
    return dict(adapted_layers(model))[name].update.delta_weight().detach()


def test_randlora_update_is_full_rank_after_two_steps_lora_is_not(batch):
    torch.manual_seed(0)
    d = 32
    # float64 so that numerical rank is exact rank (the two-step singular values are tiny but real)
    rl = inject(nn.Sequential(nn.Linear(d, d), nn.Linear(d, 3)).double(), "randlora", target_modules=["0"], r=4)
    lo = inject(nn.Sequential(nn.Linear(d, d), nn.Linear(d, 3)).double(), "lora", target_modules=["0"], r=4)
    x, y = torch.randn(64, d, dtype=torch.float64), torch.randint(0, 3, (64,))
    for model in (rl, lo):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert torch.linalg.matrix_rank(_delta(rl, "0")) == d
    assert torch.linalg.matrix_rank(_delta(lo, "0")) <= 4


def _reference_delta(upd):
    """dW = s * sum_j B_j diag(lambda_j) A diag(gamma_j), written as a plain loop over bases. Column k of B_j is
    row k*n + j of the shared B stack and lambda_j = lambda_[:, j] (rank-major, PEFT's pairing), or row j*r + k
    and lambda_[j] (the basis-major layout of adapters from before)."""
    a_all, b_all = upd.bases.A, upd.bases.B
    r, n, m, big = upd.r, upd.n, upd.m, upd.big
    dw = torch.zeros(big, m, dtype=upd.lambda_.dtype)
    for j in range(n):
        rows = [k * n + j for k in range(r)] if upd.rank_major else [j * r + k for k in range(r)]
        bj = b_all[rows, :big].t().to(dw.dtype)   # (M, r)
        lam_j = upd.lambda_[:, j] if upd.rank_major else upd.lambda_[j]
        dw = dw + bj @ torch.diag(lam_j) @ a_all[:r, :m].to(dw.dtype) @ torch.diag(upd.gamma[j])
    dw = dw * upd.scaling
    return dw if upd.in_small else dw.t()


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (12, 12)])
@pytest.mark.parametrize("path", ["factorised", "merged"])
@pytest.mark.parametrize("layout", ["rank_major", "basis_major"])
def test_randlora_custom_backward_matches_autograd_float64(shape, path, layout):
    out_f, in_f = shape
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f).double()
    model = inject(nn.Sequential(lin), "randlora", target_modules=["0"], r=3, path=path, init="vision", layout=layout)
    layer = model[0]
    n = -(-min(shape) // 3)
    assert layer.update.lambda_.shape == ((3, n) if layout == "rank_major" else (n, 3))
    with torch.no_grad():
        layer.update.lambda_.normal_()
        layer.update.gamma.normal_()
    x = torch.randn(2, 7, in_f, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 7, out_f, dtype=torch.float64)
    y = model(x)
    assert layer.update.last_path == path
    gx, gl, gg = torch.autograd.grad(y, (x, layer.update.lambda_, layer.update.gamma), gy)
    # reference: plain autograd through the loop formula
    lam = layer.update.lambda_.detach().clone().requires_grad_()
    gam = layer.update.gamma.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    upd = layer.update
    orig = (upd.lambda_, upd.gamma)
    upd._parameters["lambda_"], upd._parameters["gamma"] = lam, gam  # swap in graph leaves
    try:
        w = layer.base_layer.weight + _reference_delta(upd)
    finally:
        upd._parameters["lambda_"], upd._parameters["gamma"] = orig
    y_ref = nn.functional.linear(x2, w, layer.base_layer.bias)
    rx, rl, rg = torch.autograd.grad(y_ref, (x2, lam, gam), gy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gl, rl)
    torch.testing.assert_close(gg, rg)
    torch.testing.assert_close(upd.delta_weight(), _reference_delta(upd))
    torch.autograd.gradcheck(lambda t: model(t), (torch.randn(3, in_f, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
@pytest.mark.parametrize("alpha", [None, 4.0])
def test_vera_branch_matches_formula_float64(shape, alpha):
    """VeRA's branch (M = s B * outer(b, d) built at once, then LoRA's two GEMMs) gives the outputs
    and gradients of the textbook formula diag(b) B diag(d) A, for s = 1 and s != 1."""
    out_f, in_f = shape
    torch.manual_seed(0)
    opts = dict(r=5, seed=1) if alpha is None else dict(r=5, seed=1, alpha=alpha)
    model = inject(nn.Sequential(nn.Linear(in_f, out_f).double()), "vera", target_modules=["0"], **opts)
    upd = model[0].update
    with torch.no_grad():
        upd.vera_b.normal_()
        upd.vera_d.normal_()
    x = torch.randn(2, 7, in_f, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 7, out_f, dtype=torch.float64)
    y = model(x)
    gx, gb, gd = torch.autograd.grad(y, (x, upd.vera_b, upd.vera_d), gy)
    vb = upd.vera_b.detach().clone().requires_grad_()
    vd = upd.vera_d.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    a = upd.bases.A[:, :in_f].double()
    b = upd.bases.B[:out_f, :].double()
    dw = (vb[:, None] * b) @ (vd[:, None] * a) * upd.scaling
    y_ref = nn.functional.linear(x2, model[0].base_layer.weight + dw, model[0].base_layer.bias)
    rx, rb, rd = torch.autograd.grad(y_ref, (x2, vb, vd), gy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gb, rb)
    torch.testing.assert_close(gd, rd)
    torch.testing.assert_close(upd.delta_weight(), dw.detach())
    torch.autograd.gradcheck(lambda t: model(t), (torch.randn(3, in_f, dtype=torch.float64, requires_grad=True),))


def test_randlora_auto_path_picks_by_token_count():
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Linear(64, 64)), "randlora", target_modules=["0"], r=4)
    upd = model[0].update
    model(torch.randn(2, 64))
    assert upd.last_path == "factorised"
    model(torch.randn(4096, 64))
    assert upd.last_path == "merged"
    assert compute_paths(model) == {"merged": 1}
    merge(model)  # the update folded into W0: the layer runs the base alone, whatever ran last
    model(torch.randn(2, 64))
    assert compute_paths(model) == {"weights merged": 1}
    unmerge(model)
    model(torch.randn(2, 64))
    assert compute_paths(model) == {"factorised": 1}


@pytest.mark.parametrize("dist,s,zero_frac", [("sparse", 6, 1 - 2 / 6), ("sparse", 20, 0.9),
                                              ("binary", None, 0.0), ("very_sparse", None, None)])
def test_sparse_bases_have_requested_zero_fraction(dist, s, zero_frac):
    from randlora.adapters.randlora import make_randlora_bases
    b = make_randlora_bases([(400, 256)], 4, 0, dist, s)
    if zero_frac is None:  # very_sparse: s = sqrt(min dim) = 16 -> 1 - 2/16
        zero_frac = 1 - 2 / 16
        assert b.spec["sparsity"] == 16
    frac = (b.B == 0).float().mean().item()
    assert abs(frac - zero_frac) < 0.01
    assert abs(b.B.var().item() - 1) < 0.05
    assert set(torch.unique(b.B.abs()).tolist()) <= {0.0, b.B.abs().max().item()}


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_autocast_runs(case, batch):
    model = build(case)
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".update." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method", ["lora", "vera", "randlora", "dora", "nola"])
def test_attention_in_proj_adapters_get_gradients(method, batch):
    torch.manual_seed(0)
    model = inject(TinyNet(), method, target_modules=["attn"], r=4)
    # make the update non-zero so every parameter of it sits on the gradient path
    train(model, batch, steps=1)
    model.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    grads = [p.grad for p in model.attn.update.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


MHA_METHODS = {"lora": dict(r=4), "vera": dict(r=8, seed=4),
               "randlora_factorised": dict(r=3, seed=4, path="factorised"),
               "randlora_merged": dict(r=3, seed=4, path="merged"), "randlora_auto": dict(r=3, seed=4),
               "dora": dict(r=4), "nola": dict(r=1, k=4, seed=4)}


def _mha_masks(n, length, heads):
    g = torch.Generator().manual_seed(2)
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    pad = torch.zeros(n, length, dtype=torch.bool)
    pad[0, -2:] = True
    return {
        "none": {},
        "bool_2d": {"attn_mask": causal},
        "float_2d_causal": {"attn_mask": torch.zeros(length, length, dtype=torch.float64)
                            .masked_fill(causal, float("-inf"))},  # open_clip's text mask
        "float_3d": {"attn_mask": torch.randn(n * heads, length, length, generator=g, dtype=torch.float64)},
        "padding": {"key_padding_mask": pad},
        "float_padding_and_float_2d": {  # additive float masks both
            "key_padding_mask": torch.zeros(n, length, dtype=torch.float64).masked_fill(pad, float("-inf")),
            "attn_mask": torch.randn(length, length, generator=g, dtype=torch.float64)},
    }


class _SelfAttn(nn.Module):
    def __init__(self, batch_first=True, dropout=0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, dropout=dropout)

    def forward(self, x, **kw):
        return self.attn(x, x, x, need_weights=False, **kw)[0]


def _nonzero_mha_adapter(case, batch_first=True, dropout=0.0):
    torch.manual_seed(0)
    model = _SelfAttn(batch_first, dropout).double()
    inject(model, method_of(case), target_modules=["attn"], **MHA_METHODS[case])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.attn.update.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def _materialised_reference(model, x, **kw):
    """torch's own nn.MultiheadAttention with in_proj_weight = W0 + dW (dW in the autograd graph)."""
    wrapper = model.attn
    w = wrapper.base_layer.in_proj_weight + wrapper.update.delta_weight()
    return torch.func.functional_call(wrapper.base_layer, {"in_proj_weight": w}, (x, x, x),
                                      dict(need_weights=False, **kw))[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool_2d", "float_2d_causal", "float_3d", "padding",
                                  "float_padding_and_float_2d"])
@pytest.mark.parametrize("case", list(MHA_METHODS))
def test_self_attention_path_matches_torch_mha_float64(case, mask, batch_first):
    """The self-attention path (q/k/v projection through the update's own linear, then SDPA) gives the
    output and gradients of torch's MultiheadAttention run on the materialised W0 + dW."""
    model = _nonzero_mha_adapter(case, batch_first)
    n, length = 3, 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, length, 16, generator=g, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    x.requires_grad_(True)
    kw = _mha_masks(n, length, 4)[mask]
    params = [x, *model.attn.update.parameters()]
    y = model(x, **kw)
    got = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), params)
    ref_y = _materialised_reference(model, x, **kw)
    ref = torch.autograd.grad((ref_y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), params)
    upd = model.attn.update
    if upd.chooses_path:  # RandLoRA: the projection ran one of its own paths, not the fallback
        assert upd.last_path in ("factorised", "merged")
        if upd.path != "auto":
            assert upd.last_path == upd.path
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if not batch_first:
        assert y.is_contiguous()  # (L, N, E) laid out as torch returns it: .view() works on it
    model.eval()  # inference: torch's MHA takes its own fused kernel there; same numbers
    with torch.no_grad():
        torch.testing.assert_close(model(x, **kw), _materialised_reference(model, x, **kw), rtol=1e-10, atol=1e-10)


def test_dora_uses_the_weight_the_model_holds_now():
    """DoRA's dW is a function of W0. When the model's weight tensor is replaced after injection
    (``load_state_dict(assign=True)``; FSDP swaps views of its flat parameter in and out), dW, the
    materialised fallback, merging and the spectra use the weight the model holds now, not the
    tensor that was there at injection."""
    from randlora.analysis import layer_spectra
    model = _nonzero_mha_adapter("dora")
    layer, u = model.attn, model.attn.update
    old = layer.base_layer.in_proj_weight
    new_w = torch.randn(old.shape, dtype=old.dtype, generator=torch.Generator().manual_seed(9))
    model.load_state_dict({**model.state_dict(), "attn.base_layer.in_proj_weight": new_w}, assign=True)
    assert layer.base_layer.in_proj_weight is not old
    with torch.no_grad():
        combined = new_w + u.lora_B @ u.lora_A * u.scaling
        expected = u.magnitude[:, None] * combined / combined.norm(dim=1, keepdim=True) - new_w
        torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-12, atol=1e-12)
        assert layer_spectra(model)["attn"]["fro_norm"] == pytest.approx(float(expected.norm()), rel=1e-9)
        x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        fast = layer(x, x, x, need_weights=False)[0]  # the self-attention path: base.weight read live
        fallback = layer(x, x, x)[0]  # need_weights=True: torch's MHA on W0 + dW (materialised)
        torch.testing.assert_close(fallback, fast, rtol=1e-10, atol=1e-10)
        merge(model)
        torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x, x, x, need_weights=False)[0], fast, rtol=1e-10, atol=1e-10)
        unmerge(model)
        torch.testing.assert_close(layer.base_layer.in_proj_weight, new_w, rtol=0, atol=1e-15)


@pytest.mark.parametrize("case", ["lora", "randlora_factorised", "randlora_merged", "dora"])
def test_self_attention_path_under_cpu_autocast(case):
    """bf16 autocast on a float32 model: the path is as close to the float64 result as torch's MHA on
    W0 + dW is (bf16 rounding, ~1 %); a float64 model, which autocast leaves alone, stays exact."""
    model = _nonzero_mha_adapter(case)
    x = torch.randn(2, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    with torch.no_grad():
        truth = _materialised_reference(model, x, attn_mask=causal)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y64 = model(x, attn_mask=causal)
        assert y64.dtype == torch.float64
        torch.testing.assert_close(y64, truth, rtol=1e-10, atol=1e-10)
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x.float(), attn_mask=causal)
            ref = _materialised_reference(model, x.float(), attn_mask=causal)
    assert y.dtype == ref.dtype == torch.bfloat16

    def err(t):
        return float((t.double() - truth).norm() / truth.norm())
    assert err(y) < 0.03 and err(y) < 1.5 * err(ref) + 1e-3, (err(y), err(ref))


def test_self_attention_path_dropout_draws_as_torch_mha():
    model = _nonzero_mha_adapter("lora", dropout=0.3)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.manual_seed(7)
    y = model(x)
    torch.manual_seed(7)
    ref = _materialised_reference(model, x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    model.eval()  # no dropout in eval: two calls agree
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["randlora_factorised", "lora"])
def test_other_attention_calls_fall_back_to_the_materialised_weight(case):
    """Attention weights, cross-attention, unbatched input and the is_causal hint go through torch's
    MultiheadAttention on W0 + dW, unchanged, and wrong mask shapes get torch's own error."""
    model = _nonzero_mha_adapter(case)
    attn, base = model.attn, model.attn.base_layer
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    mem = torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    w = base.in_proj_weight + attn.update.delta_weight()
    calls = [((x, x, x), {}),                                     # need_weights defaults to True
             ((x, mem, mem), {"need_weights": False}),            # cross-attention
             ((x[0], x[0], x[0]), {"need_weights": False}),       # unbatched
             ((x, x, x), {"need_weights": False, "attn_mask": causal, "is_causal": True})]
    for args, kw in calls:
        got = attn(*args, **kw)
        ref = torch.func.functional_call(base, {"in_proj_weight": w}, args, kw)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        assert (got[1] is None) == (ref[1] is None)
        if attn.update.chooses_path:
            assert attn.update.last_path == "materialised"
    with pytest.raises(RuntimeError, match="attn_mask"):
        attn(x, x, x, need_weights=False, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(AssertionError, match="only bool and floating"):  # torch refuses integer masks
        attn(x, x, x, need_weights=False, attn_mask=torch.zeros(5, 5, dtype=torch.float64),
             key_padding_mask=torch.zeros(3, 5, dtype=torch.long))


def test_randlora_merged_path_gives_a_hand_unfrozen_bias_its_gradient(batch):
    """The adapter never trains base biases, but a user may unfreeze one: both paths then give it
    the same gradient (the merged path used to return none)."""
    grads = {}
    for path in ("merged", "factorised"):
        torch.manual_seed(0)
        model = inject(TinyNet().double(), "randlora", target_modules=["up"], r=4, seed=1, path=path)
        model.up.base_layer.bias.requires_grad_(True)
        nn.functional.cross_entropy(model(batch[0].double()), batch[1]).backward()
        assert model.up.update.last_path == path
        grads[path] = model.up.base_layer.bias.grad
    assert grads["merged"] is not None and grads["merged"].abs().sum() > 0
    torch.testing.assert_close(grads["merged"], grads["factorised"], rtol=1e-12, atol=1e-12)


def test_randlora_in_proj_picks_its_path_by_token_count():
    """An nn.MultiheadAttention in_proj target follows RandLoRA's auto path choice like a Linear layer."""
    torch.manual_seed(0)
    model = inject(_SelfAttn(), "randlora", target_modules=["attn"], r=2, seed=1)
    upd = model.attn.update
    for tokens in (4, 4096):
        x = torch.randn(1, tokens, 16)
        model(x).sum().backward()
        assert upd.last_path == upd.choose_path(tokens, True, "cpu")
    assert {upd.choose_path(4, True), upd.choose_path(4096, True)} == {"factorised", "merged"}


def test_bases_shared_not_copied():
    model = build("randlora")
    ptrs = {layer.update.bases.B.data_ptr() for _, layer in adapted_layers(model)}
    assert len(ptrs) == 1 and ptrs == {shared_bases(model).B.data_ptr()}
    assert not any("shared_bases" in k for k in model.state_dict())


# ------------------------------------------------------------------------------- bad input
BAD = [
    (dict(method="dora_typo"), "unknown adapter method"),
    (dict(method="nola", k=0), "k \\(number of NoLA bases"),
    (dict(method="lora", r=0), "positive integer"),
    (dict(method="lora", r=-2), "positive integer"),
    (dict(method="lora", r=13), "r <= 12"),
    (dict(method="randlora", r=50), "r <= 12"),
    (dict(method="lora", alpha=-1.0), "alpha"),
    (dict(method="lora", target_modules=["q_proj"]), "no module matched"),
    (dict(method="lora", target_modules=[]), "target_modules is empty"),
    (dict(method="lora", target_modules=["attn.out_proj"]), "out_proj"),
    (dict(method="lora", target_modules="up|down|(a[)"), "regex"),
    (dict(method="randlora", distribution="cauchy"), "distribution"),
    (dict(method="randlora", sparsity=1), "sparsity"),
    (dict(method="lora", bogus=1), "unknown option"),
    (dict(method="lora", trainable_modules=["nohead"]), "trainable_modules"),
    (dict(method="lora", trainable_modules=["up"]), "both adapter targets and trainable_modules"),
]


@pytest.mark.parametrize("kwargs,msg", BAD)
def test_bad_input_raises_before_modifying(kwargs, msg):
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: (v.clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()}
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    kwargs.setdefault("target_modules", TARGETS)
    with pytest.raises(ValueError, match=msg):
        inject(model, method, **kwargs)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) and after[k].requires_grad == g for k, (v, g) in before.items())
    assert not hasattr(model, "_adapter_meta")


def test_no_match_lists_candidates():
    with pytest.raises(ValueError, match=r"adaptable layer names.*'up'"):
        inject(TinyNet(), "lora", target_modules=["q_proj"])


def test_unsupported_layer_type_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Conv2d"):
        inject(model, "lora", target_modules=["0"], r=2)


@pytest.mark.parametrize("other", [dict(method="lora", r=4), dict(method="randlora", r=4, seed=4),
                                   dict(method="randlora", r=3, seed=3)])
def test_loading_mismatched_adapter_is_refused(other):
    src = build("randlora")
    state = adapter_state_dict(src)
    torch.manual_seed(0)
    dst = inject(TinyNet(), other.pop("method"), target_modules=TARGETS, trainable_modules=["head"], **other)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match="does not match"):
        load_adapter_state_dict(dst, state)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_loading_into_model_of_other_shape_is_refused():
    state = adapter_state_dict(build("lora"))
    with pytest.raises(ValueError, match="shapes differ"):
        load_adapter_state_dict(TinyNet(hidden=24), state)


def test_truncated_adapter_file_is_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(build("lora"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fresh = TinyNet()
    with pytest.raises(ValueError, match="cannot read adapter file"):
        load_adapter(fresh, path)
    assert not hasattr(fresh, "_adapter_meta")


def _nonzero(model):
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for p in layer.update.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.3)
    return model


@pytest.mark.parametrize("targets", [["self_attn"], ["linear1", "linear2"]])
@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_transformer_encoder_eval_runs_the_update(method, targets):
    """nn.TransformerEncoderLayer's inference fast path reads the submodules' weights as attributes and
    runs one fused kernel: through a wrapper it read W0, and every eval output was the base model's.
    Eval (also through nn.TransformerEncoder's nested-tensor path, with a padding mask) must equal
    train mode without dropout, and the merged model."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    base = copy.deepcopy(enc).eval()
    _nonzero(inject(enc, method, target_modules=targets, r=4))
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": pad}):
            enc.train()
            y_train = enc(x, **kw)
            enc.eval()
            y_eval = enc(x, **kw)
            if y_eval.is_nested:
                y_eval = y_eval.to_padded_tensor(0.0)
            keep = ~pad[..., None] if kw else torch.ones(1, dtype=torch.bool)
            torch.testing.assert_close(y_eval * keep, y_train * keep, rtol=1e-5, atol=1e-5)
            assert (y_train - base(x, **kw)).abs().max() > 1e-2  # the update is not a no-op
            merge(enc)
            torch.testing.assert_close(enc(x, **kw) * keep, y_train * keep, rtol=1e-5, atol=1e-5)
            unmerge(enc)


def test_loading_into_a_merged_model_is_refused():
    src = _nonzero(build("lora"))
    state = adapter_state_dict(src)
    dst = build("lora")
    merge(dst)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"merged into its weights .* unmerge\(model\) first"):
        load_adapter_state_dict(dst, state)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_merging_a_tied_weight_is_refused():
    """An adapted output head tied to the embedding: merging in place would change the embedding too."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.lm_head.weight = self.emb.weight

        def forward(self, t):
            return self.lm_head(torch.tanh(self.fc(self.emb(t))))

    torch.manual_seed(0)
    model = _nonzero(inject(LM(), "lora", target_modules=["lm_head", "fc"], r=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge: .*lm_head \(also \['emb.weight'\]\)"):
        merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # fc not merged either
    assert not any(layer.merged for _, layer in adapted_layers(model))


def test_a_module_at_two_places_is_refused_as_a_target():
    shared = nn.Linear(6, 6)
    model = nn.ModuleDict({"enc": nn.Sequential(shared), "dec": nn.Sequential(shared)})
    with pytest.raises(ValueError, match=r"more than one place in the model: \[\"enc.0 \(also at \['dec.0'\]\)\"\]"):
        inject(model, "lora", target_modules=["0"], r=2)
    assert not is_adapted(model) and all(p.requires_grad for p in model.parameters())


def test_a_failed_injection_leaves_the_model_untouched():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.attn = nn.Linear(8, 8), nn.MultiheadAttention(8, 2)
    model = M()
    with pytest.raises(ValueError, match=r"dropout=0.1 is not supported on fused-parameter targets \['attn'\]"):
        inject(model, "lora", target_modules=["fc", "attn"], r=2, dropout=0.1)
    assert isinstance(model.fc, nn.Linear) and not is_adapted(model)
    assert all(p.requires_grad for p in model.parameters())


def test_loading_into_a_fresh_model_matches_stored_names_exactly():
    """A fresh model is injected from the file's full names; as suffixes, ``fc`` and ``head`` would also
    have picked up ``sub.fc`` and ``sub.head``."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
            self.sub = nn.ModuleDict({"fc": nn.Linear(6, 6), "head": nn.Linear(6, 6)})

        def forward(self, x):
            return self.head(self.sub["head"](self.sub["fc"](self.fc(x))))

    torch.manual_seed(0)
    src = _nonzero(inject(Net(), "lora", target_modules=r"fc", trainable_modules=r"head", r=2))
    torch.manual_seed(0)
    dst = load_adapter_state_dict(Net(), adapter_state_dict(src))
    assert [n for n, _ in adapted_layers(dst)] == ["fc"]
    trained = sorted(n for n, p in dst.named_parameters() if p.requires_grad)
    assert trained == sorted(n for n, p in src.named_parameters() if p.requires_grad)
    x = torch.randn(4, 6)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_dora_is_the_identity_at_init_on_a_float64_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48)).double()
    x = torch.randn(5, 32, dtype=torch.float64)
    y0 = base(x)
    model = inject(base, "dora", target_modules=["0"], r=4)
    torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-14)


def test_double_injection_is_refused():
    model = build("lora")
    with pytest.raises(ValueError, match="already carries"):
        inject(model, "randlora", target_modules=TARGETS)


def test_sparse_bases_keep_full_rank():
    """With very sparse ternary bases the shared A (only r rows) must not have all-zero columns,
    which would zero whole lines of every dW (found by the CPU reproduction, E6)."""
    from randlora.adapters.randlora import make_randlora_bases
    b = make_randlora_bases([(64, 64)], 6, 0, "sparse", 100)
    assert not (b.A == 0).all(dim=0).any() and not (b.B == 0).all(dim=0).any()
    assert (b.B == 0).float().mean() > 0.95
    torch.manual_seed(0)
    d = 64
    model = inject(nn.Sequential(nn.Linear(d, d)).double(), "randlora", target_modules=["0"], r=6,
                   distribution="sparse", sparsity=20)
    x, y = torch.randn(128, d, dtype=torch.float64), torch.randn(128, d, dtype=torch.float64)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert torch.linalg.matrix_rank(_delta(model, "0")) == d


@pytest.mark.parametrize("case", ["vera", "randlora", "randlora_merged", "nola"])
def test_evaluation_under_inference_mode_first_then_training(case, batch):
    """Lightning validates under torch.inference_mode: a bf16 copy of the shared bases first made
    there must not poison the autograd of a later training step (it did, for VeRA, before the fix)."""
    model = build(case)
    x, y = batch
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "head" not in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_randlora_auto_path_weighs_the_device():
    """On CUDA the factorised GEMMs run at about half the merged ones' FLOP rate (H100 measurement):
    a LLaMA-width layer at 2,048 tokens is merged there and factorised on the CPU; tiny T stays factorised."""
    from randlora.adapters.randlora import FACTORISED_COST, RandLoRAUpdate, make_randlora_bases
    bases = make_randlora_bases([(4096, 4096)], 66, 0)
    upd = RandLoRAUpdate(4096, 4096, 66, 66.0, bases)
    assert FACTORISED_COST["cuda"] > FACTORISED_COST["cpu"] == 1.0
    assert upd.choose_path(2048, True, "cpu") == "factorised"
    assert upd.choose_path(2048, True, "cuda") == "merged"
    assert upd.choose_path(128, True, "cuda") == "factorised"
    assert upd.choose_path(16384, True, "cpu") == "merged"
    wide = RandLoRAUpdate(14336, 4096, 29, 29.0, make_randlora_bases([(14336, 4096)], 29, 0))
    assert wide.choose_path(2048, True, "cuda") == "merged"  # measured 3.5 ms merged vs 4.0 factorised
    assert wide.choose_path(2048, True, "cpu") == "factorised"


@pytest.mark.parametrize("case", ["vera", "nola", "randlora_factorised", "randlora_merged"])
def test_shared_basis_methods_trace_without_graph_breaks(case):
    """The bases' cast and corner caches key on data_ptr(), which torch.compile cannot trace: under
    compilation they step aside, so an adapted model compiles to one graph."""
    model = build(case)
    explained = torch._dynamo.explain(model)(torch.randn(3, 5, 12))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_randlora_16bit_bases_are_the_float32_draw_rounded_and_keep_their_dtype():
    ref = shared_bases(build("randlora"))
    model = build("randlora_bf16bases")
    b = shared_bases(model)
    assert b.spec["dtype"] == "bfloat16" and b.A.dtype == b.B.dtype == torch.bfloat16
    assert torch.equal(b.B, ref.B.to(torch.bfloat16)) and torch.equal(b.A, ref.A.to(torch.bfloat16))
    for cast in (lambda m: m.double(), lambda m: m.float(), lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        cast(model)
        assert shared_bases(model).B.dtype == torch.bfloat16  # never widened, never re-rounded
    assert shared_bases(build("randlora")).B.dtype == torch.float32
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        m = build("randlora")
        cast(m)
        assert shared_bases(m).B.dtype == torch.float32  # float32 bases are never rounded by a model cast


def test_randlora_bf16_bases_bf16_step_keeps_no_copy_of_b(batch):
    """In a bf16 model the GEMMs read the bf16 B in place: no cast cache entry for B (with float32
    bases, a bf16 copy of B is cached next to the fp32 one)."""
    x, y = batch
    sizes = {}
    for case in ("randlora", "randlora_bf16bases"):
        for path in ("merged", "factorised"):
            torch.manual_seed(0)
            model = inject(TinyNet(), "randlora", target_modules=TARGETS, trainable_modules=["head"],
                           **{**CASES[case], "path": path}).to(torch.bfloat16)
            nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
            b = shared_bases(model)
            cached_b = [v for k, v in b._cast_cache.items() if k[0] == "B"]
            sizes[case, path] = (b.B.element_size() * b.B.numel(), sum(t.element_size() * t.numel() for t in cached_b))
            assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), (case, path)
    for path in ("merged", "factorised"):
        fp32_store, fp32_cache = sizes["randlora", path]
        bf16_store, bf16_cache = sizes["randlora_bf16bases", path]
        assert fp32_cache == bf16_store == fp32_store // 2 and bf16_cache == 0, (path, sizes)


def test_adapter_file_from_before_an_option_existed_still_loads(batch):
    """Options added later (here RandLoRA's bases_dtype) take their default for older files."""
    model = train(build("randlora"), batch)
    state = adapter_state_dict(model)
    state["__adapter_meta__"]["options"].pop("bases_dtype")
    with torch.no_grad():
        y = model(batch[0])
    load_adapter_state_dict(model, state)  # into the adapted model: no spurious option mismatch
    torch.manual_seed(0)
    fresh = TinyNet()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                           if ".update." not in k})
    load_adapter_state_dict(fresh, state)  # into a fresh model: injected with the default (float32)
    assert shared_bases(fresh).B.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch[0]), y, rtol=0, atol=0)
    other = adapter_state_dict(build("randlora_bf16bases"))
    with pytest.raises(ValueError, match="options.bases_dtype: model has 'float32', file has 'bfloat16'"):
        load_adapter_state_dict(model, other)


def test_layer_options_set_a_rank_and_scaling_per_layer(batch):
    model = build("lora_layer_ranks")
    rows = {row["layer"]: row["trainable"] for row in parameter_table(model)}
    assert rows == {"attn": 6 * (36 + 12), "up": 2 * (20 + 12), "down": 4 * (12 + 20), "sq": 4 * (12 + 12)}
    layers = dict(adapted_layers(model))
    # alpha is resolved once (8 here); a layer with its own rank is scaled by alpha / its r, as PEFT does
    assert layers["up"].update.scaling == 8 / 2 and layers["sq"].update.scaling == 8 / 4
    assert layers["attn"].update.scaling == 3.0 / 6
    rl = build("randlora_layer_ranks")
    assert dict(adapted_layers(rl))["up"].update.lambda_.shape == (3, 4)  # rank 3, n = ceil(12 / 3) bases
    assert dict(adapted_layers(rl))["sq"].update.lambda_.shape == (6, 2)


def test_one_rank_everywhere_draws_the_same_bases_with_or_without_per_layer_ranks():
    from randlora.adapters.randlora import make_randlora_bases
    shapes = [(20, 12), (12, 20), (36, 12)]
    a = make_randlora_bases(shapes, 4, 7)
    b = make_randlora_bases([(o, i, 4) for o, i in shapes], 4, 7)
    assert all(torch.equal(a._buffers[k], b._buffers[k]) for k in ("A", "B"))


@pytest.mark.parametrize("method,extra,layer_options,msg", [
    ("lora", {}, {"nope": {"r": 2}}, "not adapted layers"),
    ("randlora", {"seed": 1}, {"up": {"seed": 2}}, "cannot be set per layer"),
    ("vera", {"r": 8}, {"up": {"r": 2}}, "cannot be set per layer"),
    ("lora", {}, {"sq": {"r": 13}}, "larger than min"),
    ("lora", {}, {"sq": {"r": 0}}, "positive integer"),
    ("lora", {}, {"sq": 3}, "option dicts"),
])
def test_bad_layer_options_are_refused_before_the_model_changes(method, extra, layer_options, msg):
    torch.manual_seed(0)
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=msg):
        inject(model, method, target_modules=TARGETS, layer_options=layer_options, **extra)
    assert not is_adapted(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) in (nn.MultiheadAttention, nn.Linear, TinyNet, nn.modules.linear.NonDynamicallyQuantizableLinear)
               for m in model.modules())


# ------------------------------------------------------------------ RandLoRA adapters from before the rank-major layout
LEGACY = __import__("pathlib").Path(__file__).parent / "fixtures"


def _legacy_base():
    """The fixture's base model (its integer weights) and the tensors the old library computed."""
    from safetensors.torch import load_file
    want = load_file(str(LEGACY / "legacy_randlora_expected.safetensors"))
    base = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    base.load_state_dict({k[len("base."):]: v for k, v in want.items() if k.startswith("base.")})
    return base, want


def _legacy_model():
    base, want = _legacy_base()
    return load_adapter(base, LEGACY / "legacy_randlora.safetensors"), want


def test_randlora_file_from_before_the_layout_option_computes_what_it_computed():
    """tests/fixtures/legacy_randlora.safetensors was written by the library at a1f8901 (lambda (n, r), basis-major
    pairing, no ``layout`` in the record; see tests/fixtures/make_legacy_randlora.py), with what that library computed
    from it. Exact dyadic numbers in float64: outputs, dW and every gradient must be equal bit for bit, on both paths."""
    model, want = _legacy_model()
    assert adapter_meta(model)["options"]["layout"] == "basis_major"
    layers = adapted_layers(model)
    assert [tuple(layer.update.lambda_.shape) for _, layer in layers] == [(3, 2), (3, 2), (2, 2)]  # (n, r)
    for name, layer in layers:
        assert torch.equal(layer.update.delta_weight().detach(), want[f"dw.{name}"]), name
    for path in ("factorised", "merged"):
        for _, layer in layers:
            layer.update.path = path
        x = want["x"].clone().requires_grad_()
        y = model(x)
        assert all(layer.update.last_path == path for _, layer in layers)
        params = [p for _, layer in layers for p in (layer.update.lambda_, layer.update.gamma)]
        grads = torch.autograd.grad(y, [x, *params], want["gy"])
        assert torch.equal(y, want[f"{path}.y"]) and torch.equal(grads[0], want[f"{path}.gx"]), path
        for (name, _), gl, gg in zip(layers, grads[1::2], grads[2::2]):
            assert torch.equal(gl, want[f"{path}.g_lambda.{name}"]), (path, name)
            assert torch.equal(gg, want[f"{path}.g_gamma.{name}"]), (path, name)
    # the same seed still draws the same bases (the file carries its own, overwritten ones)
    fresh = inject(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 4)),
                   "randlora", target_modules=["0", "2", "4"], r=2, seed=5)
    assert torch.equal(shared_bases(fresh).A, want["drawn_A"]) and torch.equal(shared_bases(fresh).B, want["drawn_B"])


def test_legacy_randlora_layout_is_kept_on_save_and_refused_against_a_new_adapter(tmp_path):
    model, want = _legacy_model()
    save_adapter(model, tmp_path / "again.safetensors")  # now with layout recorded explicitly
    again = load_adapter(_legacy_base()[0], tmp_path / "again.safetensors")
    assert adapter_meta(again)["options"]["layout"] == "basis_major"
    with torch.no_grad():
        assert torch.equal(again(want["x"]), model(want["x"]))
    # an adapter of the new layout is another adapter: the file (and a checkpoint's record) is refused against it
    new = inject(_legacy_base()[0], "randlora", target_modules=["0", "2", "4"], r=2, alpha=2.0, seed=5, save_bases=True)
    with pytest.raises(ValueError, match="options.layout: model has 'rank_major', file has 'basis_major'"):
        load_adapter(new, LEGACY / "legacy_randlora.safetensors")
    assert "layout" in REGISTRY["randlora"].options.function_names()  # so a resume from such a checkpoint is refused


def test_randlora_layout_option_is_checked():
    with pytest.raises(ValueError, match="unknown RandLoRA layout 'row_major'"):
        inject(TinyNet(), "randlora", target_modules=["up"], r=2, layout="row_major")
