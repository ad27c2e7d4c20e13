"""Interop with Hugging Face PEFT (the installed release, checked against 0.21.2) and the low-rank conversion.

Every method (LoRA, DoRA, VeRA, RandLoRA dense / sparse / very sparse) on three model kinds built with random
weights (a plain nn.Sequential, a timm ViT, a transformers LLaMA), and RandLoRA also on a LLaMA with grouped-query
attention (layers with different numbers of bases):
ours -> export_peft -> PeftModel.from_pretrained, PEFT get_peft_model -> save_pretrained -> import_peft, and
ours -> PEFT -> ours. Outputs are compared at float32 tolerance: |a - b| <= 1e-5 + 1e-5 |b| (the two libraries
order their float32 sums differently; measured differences are ~1e-7 on outputs of size ~1).
"""
import dataclasses
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from randlora.adapters import (adapted_layers, adapter_meta, adapter_state_dict, delta_spectra, export_peft,
                               format_truncation, import_peft, inject, is_adapted, merge, overall_error,
                               rank_for_energy, to_lora, truncation)

peft = pytest.importorskip("peft")  # a dev dependency (pyproject `dev` extra); never missing in CI

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- models

def seq_model():
    torch.manual_seed(0)
    # every target has min(out, in) = 16: one number of bases (llama_gqa mixes two)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 24), nn.ReLU(),
                         nn.Linear(24, 5))


def vit_model():
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=2, num_classes=5).eval()


def llama_model(kv_heads=4):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


# name: (builder, input maker, forward, our target suffixes, head kept trainable, two target full names)
KINDS = {
    "seq": (seq_model, lambda: torch.randn(4, 16), lambda m, x: m(x), ["0", "2", "4"], "6", ["0", "2"]),
    "vit": (vit_model, lambda: torch.randn(2, 3, 32, 32), lambda m, x: m(x), ["qkv", "attn.proj", "fc1", "fc2"],
            "head", ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]),
    "llama": (llama_model, lambda: torch.randint(0, 64, (2, 8)), lambda m, x: m(input_ids=x).logits,
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None,
              ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
    # grouped-query attention (2 key/value heads of 4): k_proj / v_proj are 16 x 32, q_proj 32 x 32, up_proj 64 x 32,
    # down_proj 32 x 64, so RandLoRA's k / v layers have half the bases of the others (n = 16 / r vs 32 / r)
    "llama_gqa": (lambda: llama_model(kv_heads=2), lambda: torch.randint(0, 64, (2, 8)),
                  lambda m, x: m(input_ids=x).logits, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], None,
                  ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]),
}
MATRIX_KINDS = ["seq", "vit", "llama"]  # every method on each; llama_gqa: the RandLoRA cases below

# our side: method, options, per-layer options for the two named targets (None: that layer keeps the default)
OURS = {
    "lora": ("lora", dict(r=4, alpha=8.0), ({"r": 2, "alpha": 6.0}, {"r": 3})),
    "dora": ("dora", dict(r=4, alpha=8.0), (None, {"r": 2})),
    "vera": ("vera", dict(r=16, alpha=8.0), (None, None)),  # scaling 0.5: folded into PEFT's lambda_b
    "randlora": ("randlora", dict(r=4), (None, None)),
    "randlora_sparse": ("randlora", dict(r=8, distribution="sparse", scale_sqrt_n=True), (None, None)),
    # a layer of its own alpha: PEFT has one randlora_alpha, so that layer's ratio rides in its lambda
    "randlora_very_sparse": ("randlora", dict(r=6, distribution="very_sparse", bases_dtype="bfloat16"),
                             ({"alpha": 4.0}, None)),
}


def train(model, fwd, x, steps=3, lr=1e-2):
    """A few Adam steps on a made-up loss, so every trained tensor moves off its init."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = fwd(model, x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def ours(kind, key, train_steps=3):
    build, make_x, fwd, targets, head, named = KINDS[kind]
    method, opts, per_layer = OURS[key]
    layer_options = {n: lo for n, lo in zip(named, per_layer) if lo}
    torch.manual_seed(1)
    model = inject(build(), method, target_modules=targets, trainable_modules=[head] if head else None,
                   layer_options=layer_options or None, **opts)
    torch.manual_seed(2)
    x = make_x()
    train(model, fwd, x, train_steps)
    return model, x, fwd


def peft_load(kind, path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a clean load: no missing or unexpected keys
        return peft.PeftModel.from_pretrained(KINDS[kind][0](), str(path)).eval()


def state_equal(a, b, exact=True):
    sa, sb = adapter_state_dict(a), adapter_state_dict(b)
    assert sa.pop("__adapter_meta__") == sb.pop("__adapter_meta__")
    assert sorted(sa) == sorted(sb)
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=0), k


# ---------------------------------------------------------------------------------------------- ours -> PEFT

RANDLORA_KEYS = [k for k in OURS if OURS[k][0] == "randlora"]
MIXED_N = [("llama_gqa", k) for k in RANDLORA_KEYS]


def _mixed_n(model):
    """Two numbers of bases among the adapted layers (the case PEFT's pairing decides)."""
    return len({getattr(layer.update, "n", None) for _, layer in adapted_layers(model)}) == 2


@pytest.mark.parametrize("kind,key", [(kind, key) for key in OURS for kind in MATRIX_KINDS] + MIXED_N)
def test_export_loads_in_peft_and_back(kind, key, tmp_path):
    model, x, fwd = ours(kind, key)
    assert _mixed_n(model) == (kind == "llama_gqa")
    model.eval()
    want = fwd(model, x).detach()
    export_peft(model, tmp_path / "a", task_type="CAUSAL_LM" if kind == "llama" else None)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "dora": "LORA", "vera": "VERA"}.get(OURS[key][0], "RANDLORA")
    with torch.no_grad():
        torch.testing.assert_close(fwd(peft_load(kind, tmp_path / "a"), x), want, **TOL)
        # ... and back: the same adapter, options and tensors (bit for bit unless a factor was folded in)
        back = import_peft(KINDS[kind][0](), tmp_path / "a")
        torch.testing.assert_close(fwd(back.eval(), x), want, **TOL)
    # bit for bit unless a layer's scaling ratio rode in its lambda: its own alpha, or 1/sqrt(n) for two n
    state_equal(model, back, exact=key != "randlora_very_sparse" and not (kind == "llama_gqa" and key != "randlora"))


def test_export_records_per_layer_ranks_and_alphas_as_peft_patterns(tmp_path):
    model, x, fwd = ours("vit", "lora")
    export_peft(model, tmp_path)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (c["r"], c["lora_alpha"], c["use_dora"]) == (4, 8, False)
    assert c["rank_pattern"] == {r"blocks\.0\.attn\.qkv": 2, r"blocks\.1\.mlp\.fc2": 3}
    assert c["alpha_pattern"] == {r"blocks\.0\.attn\.qkv": 6}
    assert c["modules_to_save"] == ["head"] and len(c["target_modules"]) == 8
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tuple(t["base_model.model.blocks.0.attn.qkv.lora_A.weight"].shape) == (2, 64)
    assert tuple(t["base_model.model.blocks.1.mlp.fc2.lora_B.weight"].shape) == (64, 3)
    assert "base_model.model.head.weight" in t


def test_a_short_name_that_would_catch_a_longer_one_is_written_exactly(tmp_path):
    """PEFT matches rank_pattern keys and list targets as suffixes: `fc` would also catch `sub.fc`."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.sub = nn.Module()
            self.sub.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.sub.fc(self.fc(x))

    def build():
        torch.manual_seed(0)
        return M()

    m = inject(build(), "lora", target_modules=["fc"], r=4, layer_options={"fc": {"r": 2}})
    train(m, lambda mm, x: mm(x), torch.randn(3, 8))
    export_peft(m, tmp_path)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(c["rank_pattern"]) == [r"sub\.fc", "fc"]  # every target, the longest first
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(build(), str(tmp_path))(x), m(x), **TOL)
    # only `sub.fc` adapted: the list ['sub.fc'] selects it alone, but ['fc'] would take both
    m2 = inject(build(), "lora", target_modules="fc", r=2)
    export_peft(m2, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["target_modules"] == "fc"


def test_a_peft_resave_of_our_export_imports_to_the_same_outputs(tmp_path):
    """PEFT rewrites the file without our record: the plain translation still gives PEFT's outputs."""
    model, x, fwd = ours("seq", "randlora_sparse")
    export_peft(model, tmp_path / "a")
    pm = peft_load("seq", tmp_path / "a")
    pm.save_pretrained(str(tmp_path / "b"))
    back = import_peft(seq_model(), tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(fwd(back, x), fwd(model.eval(), x), **TOL)
    assert adapter_meta(back)["options"]["scale_sqrt_n"] is False  # PEFT has no such option: folded into alpha


def test_one_projection_copy_loads_the_same_in_peft(tmp_path):
    model, x, fwd = ours("seq", "randlora")
    export_peft(model, tmp_path / "every")
    export_peft(model, tmp_path / "one", projection_per_layer=False)
    small = (tmp_path / "one" / "adapter_model.safetensors").stat().st_size
    assert small < (tmp_path / "every" / "adapter_model.safetensors").stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the per-layer keys it did not find
        pm = peft.PeftModel.from_pretrained(seq_model(), str(tmp_path / "one"))
    with torch.no_grad():
        torch.testing.assert_close(fwd(pm, x), fwd(model.eval(), x), **TOL)


def test_export_works_on_a_merged_model(tmp_path):
    model, x, fwd = ours("seq", "dora")
    model.eval()
    want = fwd(model, x).detach()
    merge(model)
    export_peft(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fwd(peft_load("seq", tmp_path), x), want, **TOL)


# ---------------------------------------------------------------------------------------------- PEFT -> ours

def _peft_configs(kind):
    _, _, _, targets, head, named = KINDS[kind]
    tail = named[1].split(".")[-1] if kind != "seq" else "2"
    mts = [head] if head else None
    task = "CAUSAL_LM" if kind == "llama" else None  # PeftModelForCausalLM: the same file layout
    return {k: dataclasses.replace(c, task_type=task) for k, c in {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={tail: 2},
                                alpha_pattern={tail: 5}, modules_to_save=mts),
        "lora_rslora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True,
                                       rank_pattern={tail: 2}),
        "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, rank_pattern={tail: 2}),
        "vera": peft.VeraConfig(r=16, target_modules=targets, modules_to_save=mts),
        "vera_no_projection": peft.VeraConfig(r=16, target_modules=targets, save_projection=False),
        "randlora": peft.RandLoraConfig(r=4, randlora_alpha=16, target_modules=targets, modules_to_save=mts),
        "randlora_sparse": peft.RandLoraConfig(r=8, randlora_alpha=32, target_modules=targets, sparse=True),
        "randlora_very_sparse": peft.RandLoraConfig(r=6, randlora_alpha=24, target_modules=targets, very_sparse=True),
    }.items()}


def test_every_peft_config_is_exercised():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(_peft_configs("seq")) == PEFT_KEYS


PEFT_KEYS = ["lora", "lora_rslora", "dora", "vera", "vera_no_projection", "randlora", "randlora_sparse",
             "randlora_very_sparse"]


@pytest.mark.parametrize("kind,key", [(kind, key) for key in PEFT_KEYS for kind in MATRIX_KINDS] + MIXED_N)
def test_peft_trained_adapter_imports_with_equal_outputs(kind, key, tmp_path):
    build, make_x, fwd, *_ = KINDS[kind]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False warns
        pm = peft.get_peft_model(build(), _peft_configs(kind)[key])
    torch.manual_seed(2)
    x = make_x()
    train(pm, fwd, x)
    pm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path))
    assert type(pm).__name__ == ("PeftModelForCausalLM" if kind == "llama" else "PeftModel")
    with torch.no_grad():
        want = fwd(pm, x)
        model = import_peft(build(), tmp_path)
        torch.testing.assert_close(fwd(model.eval(), x), want, **TOL)
    meta = adapter_meta(model)
    assert meta["method"] == {"lora": "lora", "lora_rslora": "lora", "dora": "dora"}.get(key, key.split("_")[0])
    assert _mixed_n(model) == (kind == "llama_gqa")
    if key == "lora" and kind != "llama":
        assert meta["trainable_names"] == [KINDS[kind][4]]


def test_peft_bin_file_imports(tmp_path):
    torch.manual_seed(1)
    pm = peft.get_peft_model(seq_model(), peft.LoraConfig(r=4, target_modules=["0", "2"]))
    x = torch.randn(4, 16)
    train(pm, lambda m, v: m(v), x)
    pm.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    with torch.no_grad():
        torch.testing.assert_close(import_peft(seq_model(), tmp_path)(x), pm(x), **TOL)


def test_vera_regenerated_projections_match_peft():
    """save_projection=False: the importer draws PEFT's projections from projection_prng_key itself."""
    from randlora.adapters.peft import _vera_regenerated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(seq_model(), peft.VeraConfig(r=16, target_modules=["0", "2", "4"],
                                                              projection_prng_key=7, save_projection=False))
    a, b = _vera_regenerated({"r": 16, "projection_prng_key": 7}, 32, 32)
    assert torch.equal(a, pm.base_model.vera_A["default"]) and torch.equal(b, pm.base_model.vera_B["default"])


# ---------------------------------------------------------------------------------------------- refusals

def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _untouched(model, snap):
    now = model.state_dict()
    return sorted(now) == sorted(snap) and all(torch.equal(now[k], snap[k]) for k in snap)


def _refused_export(model, folder, match):
    folder.mkdir(exist_ok=True)
    (folder / "keep.txt").write_text("earlier result")
    snap, meta = _snapshot(model), json.dumps(adapter_meta(model), sort_keys=True) if is_adapted(model) else None
    with pytest.raises(ValueError, match=match):
        export_peft(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert (folder / "keep.txt").read_text() == "earlier result"
    assert _untouched(model, snap)
    if meta is not None:
        assert json.dumps(adapter_meta(model), sort_keys=True) == meta


@pytest.mark.parametrize("method", ["nola", "dora_dr"])
def test_export_refuses_methods_peft_lacks(method, tmp_path):
    model = inject(seq_model(), method, target_modules=["0", "2"], r=2)
    _refused_export(model, tmp_path / "out", f"no method that computes '{method}'.*to_lora")


def test_export_refuses_full_fine_tuning_and_plain_models(tmp_path):
    _refused_export(inject(seq_model(), "full"), tmp_path / "a", "full fine-tune has no adapter")
    _refused_export(seq_model(), tmp_path / "b", "has no adapter")


@pytest.mark.parametrize("method", ["dora", "vera", "randlora"])
def test_export_refuses_multihead_attention_in_proj_but_for_lora(method, tiny, tmp_path):
    model = inject(tiny, method, target_modules=["attn", "up"], r=2)
    _refused_export(model, tmp_path / "out", "in_proj_weight.*LoRA only.*to_lora")


def _tiny():
    from conftest import TinyNet
    torch.manual_seed(0)
    return TinyNet()


def test_lora_on_multihead_attention_goes_to_peft_and_back(tmp_path):
    """PEFT's LoRA on nn.MultiheadAttention adapts in_proj and out_proj: out_proj is written with B = 0."""
    torch.manual_seed(1)
    model = inject(_tiny(), "lora", target_modules=["attn", "up"], r=3, layer_options={"attn": {"r": 2}})
    x = torch.randn(2, 5, 12)
    train(model, lambda m, v: m(v), x)
    model.eval()
    export_peft(model, tmp_path / "a")
    with torch.no_grad():
        pm = peft.PeftModel.from_pretrained(_tiny(), str(tmp_path / "a")).eval()
        torch.testing.assert_close(pm(x), model(x), **TOL)
        back = import_peft(_tiny(), tmp_path / "a")
        torch.testing.assert_close(back(x), model(x), **TOL)
    state_equal(model, back)
    # a PEFT-trained LoRA there has trained out_proj too, which nn.MultiheadAttention reads directly: refused
    pm = peft.get_peft_model(_tiny(), peft.LoraConfig(r=2, target_modules=["attn", "up"]))
    train(pm, lambda m, v: m(v), x)
    pm.save_pretrained(str(tmp_path / "b"))
    _refused_import(tmp_path / "b", "also trained its out_proj", model=_tiny())


def test_export_refuses_randlora_per_layer_ranks(tmp_path):
    model = inject(seq_model(), "randlora", target_modules=["0", "2"], r=4, layer_options={"2": {"r": 2}})
    _refused_export(model, tmp_path / "out", "one rank for every layer.*to_lora")


def test_basis_major_randlora_exports_when_every_layer_has_one_n_and_imports_rank_major(tmp_path):
    """An adapter of the layout from before PEFT's pairing was ours (layout="basis_major", what older files load as):
    PEFT's B columns are our B-stack rows reordered and lambda is transposed; import gives the rank-major layout."""
    torch.manual_seed(1)
    model = inject(seq_model(), "randlora", target_modules=["0", "2", "4"], r=4, layout="basis_major")
    x = torch.randn(4, 16)
    train(model, lambda m, v: m(v), x)
    model.eval()
    export_peft(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(peft_load("seq", tmp_path)(x), model(x), **TOL)
        back = import_peft(seq_model(), tmp_path)
        torch.testing.assert_close(back(x), model(x), **TOL)
    assert adapter_meta(back)["options"]["layout"] == "rank_major"
    for (name, old), (_, new) in zip(adapted_layers(model), adapted_layers(back)):
        assert torch.equal(new.update.lambda_, old.update.lambda_.t()), name


def test_export_refuses_basis_major_randlora_layers_with_different_numbers_of_bases(tmp_path):
    """GQA: k_proj is 16 x 32 (n = 4 at r = 4), q_proj 32 x 32 (n = 8): PEFT's one B holds the rank-major pairing
    for both, the basis-major one for neither."""
    model = inject(llama_model(kv_heads=2), "randlora", target_modules=["q_proj", "k_proj"], r=4, layout="basis_major")
    _refused_export(model, tmp_path / "out", "basis-major layout.*different numbers of bases.*Re-train.*to_lora")
    # r = 1 pairs every column with its own basis whatever n is: exportable, and exact
    model = inject(llama_model(kv_heads=2), "randlora", target_modules=["q_proj", "k_proj"], r=1, layout="basis_major")
    x = torch.randint(0, 64, (2, 8))
    train(model, lambda m, v: m(input_ids=v).logits, x)
    export_peft(model, tmp_path / "r1")
    with torch.no_grad():
        pm = peft.PeftModel.from_pretrained(llama_model(kv_heads=2), str(tmp_path / "r1"))
        torch.testing.assert_close(pm(input_ids=x).logits, model.eval()(input_ids=x).logits, **TOL)


def test_export_refuses_modules_to_save_peft_would_widen(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.mlp_head = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.mlp_head(self.body(x)))

    model = inject(M(), "lora", target_modules=["body"], r=2, trainable_modules="head")
    _refused_export(model, tmp_path / "out", "also wrap \\['mlp_head'\\]")


def test_export_does_not_overwrite_an_adapter_unless_asked(tmp_path):
    model, _, _ = ours("seq", "lora")
    export_peft(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    other, _, _ = ours("seq", "vera")
    with pytest.raises(ValueError, match="already holds an adapter"):
        export_peft(other, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    export_peft(other, tmp_path, overwrite=True)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "VERA"


def _lora_folder(tmp_path, **edits):
    model, _, _ = ours("seq", "lora")
    export_peft(model, tmp_path)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    c.update(edits)
    (tmp_path / "adapter_config.json").write_text(json.dumps(c))
    return tmp_path


def _refused_import(folder, match, model=None):
    model = model if model is not None else seq_model()
    snap, modules = _snapshot(model), [type(m) for m in model.modules()]
    meta = json.dumps(adapter_meta(model), sort_keys=True) if is_adapted(model) else None
    with pytest.raises(ValueError, match=match):
        import_peft(model, folder)
    assert _untouched(model, snap) and [type(m) for m in model.modules()] == modules
    assert (json.dumps(adapter_meta(model), sort_keys=True) if is_adapted(model) else None) == meta


@pytest.mark.parametrize("edit,match", [
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"bias": "all"}, "bias='all'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"peft_type": "IA3"}, "PEFT type 'IA3'"),
    ({"rank_pattern": {}}, "rank 2"),  # the tensors disagree with the config
])
def test_import_refuses_configs_it_cannot_represent(edit, match, tmp_path):
    _refused_import(_lora_folder(tmp_path, **edit), match)


def test_import_refuses_other_peft_types_and_unsaved_randlora_projections(tmp_path):
    pm = peft.get_peft_model(seq_model(), peft.LoHaConfig(r=2, target_modules=["0"]))
    pm.save_pretrained(str(tmp_path / "loha"))
    _refused_import(tmp_path / "loha", "PEFT type 'LOHA'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(seq_model(), peft.RandLoraConfig(r=4, target_modules=["0"], save_projection=False))
        pm.save_pretrained(str(tmp_path / "rl"))
    _refused_import(tmp_path / "rl", "save_projection=False")


def test_import_refuses_another_model_and_an_adapted_one(tmp_path):
    folder = _lora_folder(tmp_path)
    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 24), nn.ReLU(),
                          nn.Linear(24, 5))  # layer 2 is 8 x 32, not 16 x 32
    _refused_import(folder, "do not fit it", model=other)
    _refused_import(folder, "does not have", model=nn.Sequential(nn.Linear(16, 32)))
    adapted = inject(seq_model(), "vera", target_modules=["0"], r=4)
    _refused_import(folder, "already carries an adapter", model=adapted)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        import_peft(seq_model(), tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- to_lora

ALL_METHODS = {"lora": dict(r=3), "dora": dict(r=3), "vera": dict(r=16, alpha=8.0), "randlora": dict(r=4),
               "nola": dict(r=2, k=8), "dora_dr": dict(r=3)}


def _trained(method):
    torch.manual_seed(1)
    model = inject(seq_model(), method, target_modules=["0", "2", "4"], trainable_modules=["6"],
                   **ALL_METHODS[method])
    torch.manual_seed(2)
    x = torch.randn(8, 16)
    with torch.no_grad():  # random trained-looking values: every dW is generic (full rank where it can be)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval(), x


@pytest.mark.parametrize("method", list(ALL_METHODS))
def test_to_lora_at_full_rank_reproduces_every_update(method):
    model, x = _trained(method)
    before = {n: layer.delta_weight().detach().clone() for n, layer in adapted_layers(model)}
    lora, report = to_lora(model, rank=10**6)
    assert adapter_meta(lora)["method"] == "lora" and adapter_meta(model)["method"] == method  # a copy
    for row in report:
        assert row.rank == row.full_rank == min(row.shape) and row.rel_error < 1e-6 and row.energy > 1 - 1e-9
    for name, layer in adapted_layers(lora):
        torch.testing.assert_close(layer.delta_weight(), before[name], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), model(x), **TOL)


@pytest.mark.parametrize("method", ["randlora", "dora", "vera"])
def test_to_lora_is_the_best_rank_k_approximation(method):
    model, _ = _trained(method)
    spectra = delta_spectra(model)
    deltas = {n: layer.delta_weight().detach().double() for n, layer in adapted_layers(model)}
    errors = []
    for k in (1, 2, 4, 8, 16):
        lora, report = to_lora(model, rank=k)
        errors.append([row.rel_error for row in report])
        got = {n: layer.delta_weight().detach().double() for n, layer in adapted_layers(lora)}
        for row in report:
            s = spectra[row.name]
            # Eckart-Young: the truncation error is the root of the tail of the squared singular values
            assert math.isclose(row.rel_error, math.sqrt(float((s[k:] ** 2).sum() / (s ** 2).sum())), rel_tol=1e-9,
                                abs_tol=1e-12)
            dw, dk = deltas[row.name], got[row.name]
            measured = float((dw - dk).norm() / dw.norm())
            assert math.isclose(measured, row.rel_error, rel_tol=1e-4, abs_tol=1e-6)
            u, sv, vh = torch.linalg.svd(dw, full_matrices=False)
            torch.testing.assert_close(dk, (u[:, :k] * sv[:k]) @ vh[:k], rtol=1e-5, atol=1e-6)
    for layer_errors in zip(*errors):
        assert all(a >= b - 1e-12 for a, b in zip(layer_errors, layer_errors[1:]))
        assert layer_errors[0] > 0.1 and layer_errors[-1] < 1e-6  # rank 1 loses a lot; 16 = full rank loses nothing


def test_to_lora_picks_ranks_by_energy_or_per_layer(tmp_path):
    model, x = _trained("randlora")
    spectra = delta_spectra(model)
    lora, report = to_lora(model, energy=0.9)
    for row in report:
        s = spectra[row.name]
        assert row.energy >= 0.9 and (row.rank == 1 or truncation(s, row.rank - 1)[1] < 0.9)
        assert row.rank == rank_for_energy(s, 0.9) == dict(adapted_layers(lora))[row.name].update.r
    lora, report = to_lora(model, rank=2, layer_ranks={"2": 5})
    assert {r.name: r.rank for r in report} == {"0": 2, "2": 5, "4": 2}
    text = format_truncation(report)
    assert "32x16" in text and "5/16" in text and "all layers" in text
    assert 0 < overall_error(report) < 1
    # the converted LoRA is what LoRA-only servers load
    export_peft(lora, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(peft_load("seq", tmp_path)(x), lora(x), **TOL)


def test_to_lora_in_place_replaces_the_adapter():
    model, x = _trained("dora")
    with torch.no_grad():
        want = model(x)
    merge(model)
    lora, _ = to_lora(model, rank=16, inplace=True)
    assert lora is model and adapter_meta(model)["method"] == "lora"
    assert adapter_meta(model)["converted_from"]["method"] == "dora"
    assert [n for n, _ in adapted_layers(model)] == ["0", "2", "4"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, **TOL)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        *(f"{n}.update.lora_{s}" for n in ("0", "2", "4") for s in "AB"), "6.weight", "6.bias"}


def test_to_lora_refusals():
    model, _ = _trained("lora")
    for kwargs, match in [({}, "exactly one of"), ({"rank": 2, "energy": 0.5}, "both given"),
                          ({"rank": 0}, "positive integer"), ({"energy": 1.5}, r"\(0, 1\]"),
                          ({"rank": 2, "layer_ranks": {"9": 2}}, "not adapted layers"),
                          ({"layer_ranks": {"0": 2}}, "every adapted layer")]:
        with pytest.raises(ValueError, match=match):
            to_lora(model, **kwargs)
    with pytest.raises(ValueError, match="full fine-tune"):
        to_lora(inject(seq_model(), "full"), rank=2)


# ---------------------------------------------------------------------------------------------- no peft needed

def test_writing_needs_neither_peft_nor_the_framework(tmp_path):
    code = (
        "import sys, importlib.abc\n"
        "BANNED = ('peft', 'accelerate', 'lightning', 'hydra', 'omegaconf', 'transformers', 'timm')\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BANNED:\n"
        "            raise ImportError('imported: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "import randlora.adapters as a\n"
        "m = a.inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), 'randlora', target_modules=['0'], r=2)\n"
        f"a.export_peft(m, {str(tmp_path / 'x')!r})\n"
        f"a.export_peft(a.to_lora(m, rank=2)[0], {str(tmp_path / 'y')!r})\n"
        f"a.import_peft(torch.nn.Sequential(torch.nn.Linear(8, 8)), {str(tmp_path / 'x')!r})\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
