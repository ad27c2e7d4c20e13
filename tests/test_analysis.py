"""Tests of randlora.analysis (CKA, loss plane, spectra) and a smoke run of experiments.cpu_repro."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from randlora.adapters import adapted_layers, inject
from randlora.analysis import (cka_per_layer, effective_rank, layer_activations, layer_spectra, linear_cka,
                               loss_path, loss_plane, merged_state_dict, mix_state, numerical_rank,
                               plane_coefficients, plot_cka, plot_loss_plane, plot_spectra, spectrum,
                               state_delta)

ROOT = Path(__file__).resolve().parents[1]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orth(d, seed=0):
    q, _ = torch.linalg.qr(_rand(d, d, seed=seed))
    return q


# ------------------------------------------------------------------------------------------- CKA
def test_cka_self_is_one():
    x = _rand(30, 200)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("p,n", [(20, 200), (300, 50)])  # feature-space and Gram-space code paths
def test_cka_invariant_to_rotation_scaling_and_shift(p, n):
    x = _rand(p, n, seed=1)
    y = 3.7 * _orth(p, seed=2) @ x + 5.0       # rotation, isotropic scale, constant offset
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-10)


def test_cka_both_code_paths_agree():
    x, y = _rand(40, 30, seed=3), _rand(25, 30, seed=4)
    # p1*p2 > n^2 -> Gram form; transposing to make features cheap is not possible, so compare to a
    # direct HSIC computation
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    direct = (yc @ xc.t()).square().sum() / ((xc @ xc.t()).norm() * (yc @ yc.t()).norm())
    assert linear_cka(x, y) == pytest.approx(float(direct), rel=1e-10)


def test_cka_independent_noise_small_and_bounds():
    x, y = _rand(10, 2000, seed=5), _rand(10, 2000, seed=6)
    val = linear_cka(x, y)
    assert 0.0 <= val < 0.05
    # a partially shared signal lies strictly between
    z = x + _rand(10, 2000, seed=7)
    assert 0.2 < linear_cka(x, z) < 0.9


def test_cka_not_invariant_to_general_linear_maps():
    x = _rand(20, 500, seed=8)
    a = torch.diag(torch.logspace(-2, 2, 20, dtype=torch.float64))
    assert linear_cka(x, a @ x) < 0.9


def test_cka_numpy_input_and_errors():
    x = np.random.default_rng(0).normal(size=(5, 40))
    assert linear_cka(x, x) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cka(x, x[:, :30])
    assert linear_cka(np.ones((3, 10)), x[:, :10]) == 0.0    # constant representation


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))


def test_layer_activations_and_cka_per_layer():
    torch.manual_seed(0)
    a = _Net()
    x = torch.randn(50, 6)
    acts = layer_activations(a, x, ["l1", "l2"], batch_size=16)
    assert acts["l1"].shape == (50, 8)
    torch.testing.assert_close(acts["l1"], a.l1(x).detach())
    assert a.training                                      # mode restored
    b = _Net()
    b.load_state_dict(a.state_dict())
    cka = cka_per_layer(a, b, x, ["l1", "l2", "head"])
    assert list(cka) == ["l1", "l2", "head"]
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in cka.values())
    with torch.no_grad():                                   # change only the last layer
        b.head.weight.add_(torch.randn_like(b.head.weight))
    cka = cka_per_layer(a, b, x, ["l1", "l2", "head"])
    assert cka["l1"] == pytest.approx(1.0, abs=1e-6) and cka["head"] < 0.99
    with pytest.raises(ValueError, match="no submodule"):
        layer_activations(a, x, ["nope"])


def test_cka_on_adapted_model_hooks_the_wrapper():
    torch.manual_seed(0)
    base = _Net()
    x = torch.randn(40, 6)
    adapted = _Net()
    adapted.load_state_dict(base.state_dict())
    inject(adapted, "lora", target_modules=["l1", "l2"], r=2)
    with torch.no_grad():
        for _, layer in adapted_layers(adapted):
            layer.update.lora_B.normal_()
    acts = layer_activations(adapted, x, ["l2"])
    torch.testing.assert_close(acts["l2"], adapted.l2(torch.relu(adapted.l1(x))).detach())
    assert cka_per_layer(adapted, base, x, ["l2"])["l2"] < 0.999


# ------------------------------------------------------------------------------------ loss plane
def test_plane_coefficients_are_barycentric():
    pts = [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0)]
    for i, (x, y) in enumerate(pts):
        c = plane_coefficients(x, y)
        assert c == tuple(1.0 if j == i else 0.0 for j in range(3))
    for x, y in [(0.3, 0.4), (-0.5, 1.5), (1.2, -0.3)]:
        c = plane_coefficients(x, y)
        assert sum(c) == pytest.approx(1.0)
        px = sum(ci * p[0] for ci, p in zip(c, pts))
        py = sum(ci * p[1] for ci, p in zip(c, pts))
        assert (px, py) == (pytest.approx(x), pytest.approx(y))


def _plane_setup():
    torch.manual_seed(0)
    net = _Net()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    sols = []
    for s in range(3):
        g = torch.Generator().manual_seed(10 + s)
        sols.append({k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    deltas = {n: state_delta(sol, base) for n, sol in zip(("LoRA", "RandLoRA", "FT"), sols)}

    def loss_fn(state):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(functional_call(net, state, (x,)), y))

    return base, sols, deltas, loss_fn


def test_loss_plane_reproduces_endpoints_exactly():
    base, sols, deltas, loss_fn = _plane_setup()
    res = loss_plane(base, deltas, loss_fn, grid=([-0.5, 0.0, 0.5, 1.0, 1.5], [0.0, 0.5, 1.0]))
    loss = np.array(res["loss"])
    assert loss.shape == (3, 5)
    xs, ys = res["xs"], res["ys"]
    for name, (px, py) in res["points"].items():
        at_grid = loss[ys.index(py), xs.index(px)]
        exact = loss_fn(mix_state(base, [deltas[name]], [1.0]))
        assert at_grid == exact                                    # bit-exact: W0 + 1*dW_i
        assert res["endpoint_losses"][name] == exact
        sol = sols[list(deltas).index(name)]
        assert exact == pytest.approx(loss_fn(sol), abs=1e-5)     # = loss of the solution itself
    assert res["min_loss"] == pytest.approx(loss.min())
    assert list(res["points"].values()) == [[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]]


def test_loss_plane_midpoint_and_validation():
    base, sols, deltas, loss_fn = _plane_setup()
    res = loss_plane(base, deltas, loss_fn, grid=([0.5], [0.0]))     # midpoint of LoRA--RandLoRA edge
    mid = {k: 0.5 * (sols[0][k] + sols[1][k]) for k in base}
    assert res["loss"][0][0] == pytest.approx(loss_fn(mid), abs=1e-5)
    path = loss_path(base, deltas["LoRA"], deltas["FT"], loss_fn, steps=5)
    assert path["loss"][0] == res["endpoint_losses"]["LoRA"] and len(path["t"]) == 5
    assert path["barrier"] >= -1e-12 or path["barrier"] < 0   # defined
    with pytest.raises(ValueError, match="exactly 3"):
        loss_plane(base, {"a": deltas["LoRA"]}, loss_fn, grid=3)
    with pytest.raises(ValueError, match="missing from base_state"):
        loss_plane(base, {"a": {"zzz": torch.zeros(1)}, "b": {}, "c": {}}, loss_fn, grid=3)


def test_merged_state_dict_matches_adapted_model():
    torch.manual_seed(0)
    net = _Net()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    adapted = _Net()
    adapted.load_state_dict(base)
    inject(adapted, "randlora", target_modules=["l1", "l2"], trainable_modules=["head"], r=2, seed=1)
    with torch.no_grad():
        for _, layer in adapted_layers(adapted):
            layer.update.lambda_.normal_()
    x = torch.randn(10, 6)
    merged = merged_state_dict(adapted)
    assert set(merged) == set(base)
    plain = _Net()
    torch.testing.assert_close(functional_call(plain, merged, (x,)), adapted(x), rtol=1e-5, atol=1e-5)
    assert not adapted_layers(adapted)[0][1].merged                # original untouched
    d = state_delta(merged, base)
    torch.testing.assert_close(d["l1.weight"], adapted_layers(adapted)[0][1].update.delta_weight().detach())


# -------------------------------------------------------------------------------------- spectra
@pytest.mark.parametrize("k", [1, 3, 8])
def test_effective_rank_of_equal_singular_values_is_k(k):
    u, v = _orth(20, 1)[:, :k], _orth(16, 2)[:, :k]
    m = 2.5 * u @ v.t()
    assert numerical_rank(m) == k
    assert effective_rank(m) == pytest.approx(k, rel=1e-9)


def test_effective_rank_properties():
    s = np.array([10.0, 1.0, 0.1, 0.0])
    e = effective_rank(s, is_spectrum=True)
    assert e > 1.0 and e < 3.0
    assert effective_rank(torch.zeros(4, 5)) == 0.0
    m = _rand(30, 12)
    sv = spectrum(m)
    assert sv.shape == (12,) and np.all(np.diff(sv) <= 1e-12)
    assert effective_rank(m) == pytest.approx(effective_rank(sv, is_spectrum=True))
    assert effective_rank(3 * m) == pytest.approx(effective_rank(m))   # scale invariant
    with pytest.raises(ValueError):
        spectrum(torch.zeros(2, 2, 2))


def test_layer_spectra_randlora_full_rank_lora_rank_r():
    torch.manual_seed(0)
    lora = inject(_Net(), "lora", target_modules=["l2"], r=2)
    rand = inject(_Net(), "randlora", target_modules=["l2"], r=2, seed=0)
    with torch.no_grad():
        adapted_layers(lora)[0][1].update.lora_B.normal_()
        upd = adapted_layers(rand)[0][1].update
        upd.lambda_.normal_()
        upd.gamma.normal_()
    sl, sr = layer_spectra(lora)["l2"], layer_spectra(rand)["l2"]
    assert sl["rank"] == 2 and sr["rank"] == 8
    assert sr["effective_rank"] > sl["effective_rank"]
    assert sl["shape"] == [8, 8] and len(sl["singular_values"]) == 8
    d = layer_spectra({"w": torch.eye(5), "b": torch.ones(5)})
    assert list(d) == ["w"] and d["w"]["effective_rank"] == pytest.approx(5.0)


def test_plots_write_png(tmp_path):
    plot_cka({"LoRA": {"a": 0.5, "b": 0.7}, "RandLoRA": [0.6, 0.9]}, tmp_path / "cka.png",
             errors={"LoRA": [0.01, 0.02]})
    base, _, deltas, loss_fn = _plane_setup()
    plot_loss_plane(loss_plane(base, deltas, loss_fn, grid=4), tmp_path / "plane.png")
    plot_spectra({"x": [3.0, 2.0, 1.0]}, tmp_path / "s.png")
    for f in ("cka.png", "plane.png", "s.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- the CPU reproduction
def test_cpu_repro_randsum_full_matches_library_formula():
    """The experiment's own RandLoRA (full mode) equals sum_j B_j diag(l_j) A diag(g_j) computed by hand,
    and the '-a' variant is the product of sums with rank <= r."""
    from experiments.cpu_repro.matrix import RandSum

    torch.manual_seed(0)
    full = RandSum("full", 12, 10, r=2, n=5, seed=0)
    a = RandSum("a", 12, 10, r=2, n=5, seed=0)
    for m in (full, a):
        with torch.no_grad():
            m.lambda_.normal_()
            m.gamma.normal_()
    ref = sum(full.B[j] @ torch.diag(full.lambda_[j]) @ full.A[0] @ torch.diag(full.gamma[j]) for j in range(5))
    torch.testing.assert_close(full.delta_weight(), ref * full.scaling)
    assert numerical_rank(full.delta_weight().detach()) == 10
    assert numerical_rank(a.delta_weight().detach()) == 2


class _CommittedTinyViT(nn.Module):
    """The network experiments/cpu_repro's committed results (results/, REPORT.md) were computed with, as
    it was defined there before E4 switched to the framework-built timm ViT: kept here, and only here, to
    show the switch changed no bit."""

    class Block(nn.Module):
        def __init__(self, dim, heads, mlp_ratio):
            super().__init__()
            self.heads = heads
            self.norm1 = nn.LayerNorm(dim)
            self.attn = nn.Module()
            self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, dim * mlp_ratio), nn.Linear(dim * mlp_ratio, dim)

        def forward(self, x):
            b, t, c = x.shape
            h = self.norm1(x)
            q, k, v = self.attn.qkv(h).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            x = x + self.attn.proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))

    def __init__(self, num_classes, dim, depth, heads, mlp_ratio, image=8, patch=2):
        super().__init__()
        self.image, self.patch = image, patch
        self.patch_embed = nn.Linear(patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([self.Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # x: (N, 64) pixels
        b, p, g = x.shape[0], self.patch, self.image // self.patch
        t = self.patch_embed(x.reshape(b, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(b, g * g, p * p))
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1) + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        return self.head(self.norm(t)[:, 0])


def test_cpu_repro_vit_is_bit_identical_to_the_network_of_the_committed_results():
    """E4's framework-built timm ViT against the experiment's former own ViT, same seed: the same state dict
    (names, shapes, values), the RNG left in the same state, the same outputs and, after training steps
    (AdamW, clipping, every parameter trained: the patch embedding's gradient included), the same
    weights, all bit for bit."""
    from experiments.cpu_repro.config import FULL
    from experiments.cpu_repro.vit import build_vit, patches, train

    cfg = FULL["vit"]
    torch.manual_seed(0)
    old = _CommittedTinyViT(5, cfg["dim"], cfg["depth"], cfg["heads"], cfg["mlp_ratio"])
    after_old = torch.rand(3)
    torch.manual_seed(0)
    new = build_vit(cfg, num_classes=5)
    assert torch.equal(torch.rand(3), after_old)
    so, sn = old.state_dict(), new.state_dict()
    assert set(so) == set(sn)
    assert all(torch.equal(so[k], sn[k]) for k in so), [k for k in so if not torch.equal(so[k], sn[k])]
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(96, 64, generator=g) * 2 - 1, torch.randint(0, 5, (96,), generator=g)
    assert torch.equal(old(x), new(patches(x)))
    start = {k: v.clone() for k, v in so.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the experiment runs
    try:
        lo = train(old, x, y, steps=4, lr=3e-3, batch=32, seed=0)
        ln = train(new, patches(x), y, steps=4, lr=3e-3, batch=32, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert lo == ln
    so, sn = old.state_dict(), new.state_dict()
    assert all(not torch.equal(so[k], start[k]) for k in ("patch_embed.weight", "blocks.0.attn.qkv.weight", "head.bias"))
    assert all(torch.equal(so[k], sn[k]) for k in so), [k for k in so if not torch.equal(so[k], sn[k])]
    assert type(new).__module__.startswith("timm.")  # timm's VisionTransformer, not a copy of it


@pytest.mark.integration
def test_cpu_repro_quick_mode_writes_report(tmp_path):
    """``python -m experiments.cpu_repro --quick`` end to end (run in-process to share the torch import)."""
    from experiments.cpu_repro.__main__ import main

    out = tmp_path / "repro"
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = (out / "REPORT.md").read_text()
    assert "QUICK MODE" in report and "## Claims at a glance" in report
    for section in ("E1", "E2", "E4", "E6"):
        assert f"## {section}" in report
    res = out / "results"
    for f in ("e1_matrix_fit.csv", "e2_rank_ablation.csv", "e4_vit.csv", "e6_vit_bases.csv",
              "e6_matrix_bases.csv", "e4_analyses.json", "all_results.json", "e1_matrix_fit.png",
              "e4_vit_accuracy.png", "cka_perm.png", "loss_plane_perm.png"):
        assert (res / f).stat().st_size > 0, f
    raw = json.loads((res / "all_results.json").read_text())
    assert raw["quick"] is True and raw["results"]["E1"] and raw["results"]["E4"]
    assert all(math.isfinite(r["test_acc"]) for r in raw["results"]["E4"])
    plane = raw["results"]["analyses"][0]["plane"]
    assert set(plane["endpoint_losses"]) == set(raw["results"]["analyses"][0]["plane_methods"])


def test_cpu_repro_cli_help():
    proc = subprocess.run([sys.executable, "-m", "experiments.cpu_repro", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout
