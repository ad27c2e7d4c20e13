"""Every shipped model config builds what its weights were trained as, checked offline against the
libraries' own published metadata (open_clip's pretrained and architecture configs, timm's
pretrained configs, the transformers configs published with the weights), and the loaders read
tags and local files into exactly that model, or say precisely why not.

A new file in configs/model/ is walked automatically: a config that contradicts its weights' metadata
fails here."""
from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from randlora.adapters import count_total, find_targets
from randlora.models import CLIP_MEAN, CLIP_STD, SourceUnavailableError, build_model
from tests.helpers import ROOT, compose_cfg
from tests.hf_cache import write_hub_repo

MODEL_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))

# Published config.json values of the causal LMs (https://huggingface.co/<id>/blob/main/config.json), the
# fields that fix the architecture and its size, and the parameter counts they give.
PUBLISHED_LMS = {
    "meta-llama/Meta-Llama-3-8B": (dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
        bos_token_id=128000, eos_token_id=128001), 8_030_261_248, 8.03e9),
    "Qwen/Qwen2-0.5B-Instruct": (dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True, sliding_window=32768,
        use_sliding_window=False, max_window_layers=24, bos_token_id=151643, eos_token_id=151645),
        494_032_768, 0.494e9),
    "microsoft/Phi-3-mini-4k-instruct": (dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu",
        tie_word_embeddings=False, sliding_window=2047, bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
        3_821_079_552, 3.82e9),
}
# the adapted modules of each model (paper §5.4: q/k/v/up/down; Phi-3's fused qkv_proj / gate_up_proj + down_proj)
ADAPTED_PER_LAYER = {"llama": 5, "qwen2": 5, "phi3": 3}

# Tags the paper's code used (RL: github.com/PaulAlbert31/RandLoRA @ 4ac565e): vision_language/src/timm_encoder.py
# "base" = vit_base_patch16_224.orig_in21k_ft_in1k; open_clip tags of §5.2-5.3; DINOv2 ViT-B/14 (LVD-142M).
PAPER_TAGS = {"vit_b16": "orig_in21k_ft_in1k", "dinov2_vitb14": "lvd142m", "clip_vitb32": "openai",
              "clip_vitl14": "openai", "clip_vith14": "laion2b_s32b_b79k"}
# Vision backbones fed CLIP's statistics instead of their weights' own, deliberately: the paper's code does so for
# every vision backbone (randlora-method.md §4.1, RL timm_encoder.py). A config not listed here must use its
# weights' published mean / std.
CLIP_STATS_BY_CHOICE = {"vit_b16", "dinov2_vitb14"}


def _model_cfg(name):
    return compose_cfg([f"model={name}"]).model


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _check_targets(model, cfg):
    found = find_targets(model, list(cfg.targets))
    names = {t.name.split(".")[-1] for t in found}
    for target in cfg.targets:  # every target pattern hits something
        assert any(target == n or target in t.name for n in names for t in found), target
    return found


# ------------------------------------------------------------------------------------ the walk
@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_builds_what_its_weights_were_trained_as(name):
    cfg = _model_cfg(name)
    for key in ("name", "family", "targets", "task"):
        assert cfg.get(key) is not None, f"{name}: model.{key} missing"
    check = {"open_clip": _check_open_clip, "timm": _check_timm, "hf_causal_lm": _check_causal_lm}[cfg.family]
    check(name, cfg)
    if name in PAPER_TAGS:
        assert cfg.pretrained == PAPER_TAGS[name], f"{name}: the paper's weights are {PAPER_TAGS[name]!r}"


def _check_open_clip(name, cfg):
    import open_clip

    from randlora.models.clip import activations, create_architecture, tag_files
    for key in ("quick_gelu", "image_size", "context_length", "mean", "std"):
        assert cfg.get(key) is not None, f"{name}: model.{key} must be stated (what the weights were trained as)"
    model = create_architecture(_plain(cfg), device="meta")
    want = "QuickGELU" if cfg.quick_gelu else "GELU"
    assert activations(model) == {want}, f"{name}: built {activations(model)}, config says {want}"
    assert tuple(model.visual.image_size) == (cfg.image_size, cfg.image_size)
    assert model.context_length == cfg.context_length
    _check_targets(model, cfg)
    if cfg.get("tiny"):
        assert cfg.pretrained is None and tuple(cfg.mean) == CLIP_MEAN and tuple(cfg.std) == CLIP_STD
        return
    published = open_clip.get_pretrained_cfg(cfg.arch, cfg.pretrained)
    assert published, f"{name}: {cfg.pretrained!r} is not an open_clip tag of {cfg.arch}"
    arch = open_clip.get_model_config(cfg.arch)
    assert bool(published.get("quick_gelu", False)) == cfg.quick_gelu, f"{name}: activation differs from the tag's"
    assert tuple(published["mean"]) == tuple(cfg.mean) and tuple(published["std"]) == tuple(cfg.std)
    assert arch["vision_cfg"]["image_size"] == cfg.image_size
    assert arch["text_cfg"]["context_length"] == cfg.context_length
    # the eval transform (Resize shortest side + CenterCrop, bicubic) is what the tags publish
    assert published["interpolation"] == "bicubic" and published["resize_mode"] == "shortest"
    assert tag_files(cfg.arch, cfg.pretrained), f"{name}: the tag's weights have no hub file"


def _check_timm(name, cfg):
    import timm

    from randlora.models.vit import tag_config, tag_files
    kwargs = dict(cfg.get("kwargs") or {})
    for key in ("image_size", "mean", "std"):
        assert cfg.get(key) is not None, f"{name}: model.{key} must be stated"
    with torch.device("meta"):
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=0, **kwargs)
    assert tuple(model.patch_embed.img_size) == (cfg.image_size, cfg.image_size), f"{name}: built at another size"
    assert model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)  # features; the task owns the head
    _check_targets(model, cfg)
    if not cfg.pretrained or "/" in str(cfg.pretrained):  # random weights, or the shipped quickstart file
        assert tuple(cfg.mean) == CLIP_MEAN and tuple(cfg.std) == CLIP_STD
        return
    published = tag_config(cfg.arch, cfg.pretrained)
    assert published.get("hf_hub_id") and tag_files(cfg.arch, cfg.pretrained), f"{name}: unknown timm tag"
    if tuple(published["input_size"][1:]) != (cfg.image_size, cfg.image_size):
        # built at another size than the weights': stated explicitly (position embeddings resampled on load)
        assert kwargs.get("img_size") == cfg.image_size, f"{name}: image_size != the weights (kwargs.img_size)"
    assert published["interpolation"] == "bicubic"
    if (tuple(cfg.mean), tuple(cfg.std)) != (tuple(published["mean"]), tuple(published["std"])):
        assert name in CLIP_STATS_BY_CHOICE, f"{name}: mean/std differ from the weights' {published['mean']}"
        assert tuple(cfg.mean) == CLIP_MEAN and tuple(cfg.std) == CLIP_STD


def _check_causal_lm(name, cfg):
    from transformers import AutoConfig, AutoModelForCausalLM
    if cfg.get("tiny"):
        t = dict(cfg.tiny)
        conf = AutoConfig.for_model(t.pop("model_type", "llama"), **t)
        expected_total = None
    elif str(cfg.pretrained).startswith(str(ROOT / "assets")):  # a shipped folder: its own config.json
        conf = AutoConfig.from_pretrained(cfg.pretrained, local_files_only=True)
        assert conf.model_type == cfg.model_type, f"{name}: model.model_type must be {conf.model_type!r}"
        assert cfg.get("sha256"), f"{name}: a shipped folder's files are pinned (model.sha256)"
        expected_total = None
    else:
        assert cfg.pretrained in PUBLISHED_LMS, f"{name}: add the published config of {cfg.pretrained} above"
        values, expected_total, rounded = PUBLISHED_LMS[cfg.pretrained]
        values = dict(values)
        model_type = values.pop("model_type")
        assert cfg.model_type == model_type, f"{name}: model.model_type must be {model_type!r}"
        conf = AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    found = _check_targets(model, cfg)
    assert len(found) == conf.num_hidden_layers * ADAPTED_PER_LAYER[conf.model_type]
    if expected_total is not None:
        total = count_total(model)
        assert total == expected_total and round(total / 1e9, 3 if rounded < 1e9 else 2) == rounded / 1e9


def test_dependency_floors_have_what_the_loaders_use():
    """``from_pretrained(..., dtype=)`` (randlora/models/llama.py) exists from transformers 4.56.0 (before, the
    argument was not the dtype and the model loaded in float32); open_clip's tags publish ``quick_gelu`` from
    2.29.0 (checked on both routes by randlora/models/clip.py)."""
    text = (ROOT / "pyproject.toml").read_text()
    for package, least in (("transformers", (4, 56)), ("open_clip_torch", (2, 29))):
        floor = re.search(rf'"{package}>=([0-9.]+)"', text).group(1)
        assert tuple(int(x) for x in floor.split(".")) >= least, package


# ------------------------------------------------------------------ CLIP: QuickGELU on both routes
TINY_ARCH = "RandloraTest-ViT-Tiny"
TINY_MC = {"embed_dim": 32,
           "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture
def quickgelu_tag(tmp_path, monkeypatch):
    """A small open_clip architecture with a QuickGELU-trained tag, registered in open_clip's own registries,
    its weights (random, from a reference QuickGELU model) in a fake hub cache in the exact layout."""
    import huggingface_hub.constants as hc
    import open_clip
    from open_clip import factory, pretrained
    from safetensors.torch import save
    monkeypatch.setitem(factory._MODEL_CONFIGS, TINY_ARCH, TINY_MC)
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_ARCH,
                        {"qg": pretrained._pcfg(hf_hub="randlora-test/tiny-clip-qg/", quick_gelu=True)})
    torch.manual_seed(0)
    ref = open_clip.CLIP(**TINY_MC, quick_gelu=True).eval()
    with torch.no_grad():  # LayerNorm / bias parameters start at 1 / 0: make every weight matter
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    cache = tmp_path / "hub"
    snap = write_hub_repo(cache, "randlora-test/tiny-clip-qg", {"open_clip_model.safetensors": save(state)})
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    cfg = {"name": "tiny_qg", "family": "open_clip", "arch": TINY_ARCH, "pretrained": "qg", "quick_gelu": True,
           "image_size": 16, "context_length": 16, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
           "task": "clip", "targets": ["attn", "c_fc", "c_proj"]}
    return cfg, ref, snap / "open_clip_model.safetensors"


def _features(model):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 16, 16, generator=g)
    text = torch.randint(0, 49408, (2, 16), generator=g)
    with torch.no_grad():
        return torch.cat([model.encode_image(images), model.encode_text(text)])


def test_clip_tag_and_file_routes_build_quickgelu_and_match_the_reference(quickgelu_tag):
    import open_clip

    from randlora.models.clip import activations
    from randlora.hub import hub_status
    cfg, ref, file = quickgelu_tag
    from randlora.models import source_problems
    assert source_problems(cfg, hub_status()) == []  # in the fake cache: available offline
    want = _features(ref)
    for route in ({}, {"pretrained": str(file)}):     # the tag (from the cache), then the local file
        bundle = build_model(OmegaConf.create({**cfg, **route}))
        model = bundle.backbone.eval()
        assert activations(model) == {"QuickGELU"}
        assert sum(type(m).__name__ == "QuickGELU" for m in model.modules()) == 4  # every MLP of both towers
        assert torch.equal(_features(model), want)
    # the same weights in the plain (GELU) architecture, which open_clip >= 2.29 builds for the tag, differ
    gelu = open_clip.create_model(TINY_ARCH)
    open_clip.load_checkpoint(gelu, str(file))
    assert activations(gelu) == {"GELU"} and not torch.allclose(_features(gelu.eval()), want, atol=1e-4)


def test_clip_tag_whose_activation_contradicts_the_config_is_refused(quickgelu_tag):
    from randlora.models import source_problems
    from randlora.hub import hub_status
    cfg, _, _ = quickgelu_tag
    bad = {**cfg, "quick_gelu": False}
    with pytest.raises(ValueError, match=r"trained with QuickGELU but model.quick_gelu=false; set model.quick_gelu=tr"):
        build_model(OmegaConf.create(bad))
    assert any("QuickGELU" in p for p in source_problems(bad, hub_status()))


@pytest.mark.parametrize("name", ["clip_vitb32", "clip_vitl14"])
def test_openai_clips_build_quickgelu_for_the_tag_and_for_a_file(name, tmp_path):
    """The real architectures (meta device): the activation follows the config on both routes."""
    from randlora.models.clip import activations, create_architecture
    cfg = _plain(_model_cfg(name))
    for pretrained in ("openai", str(tmp_path / "ViT.safetensors")):
        assert activations(create_architecture({**cfg, "pretrained": pretrained}, device="meta")) == {"QuickGELU"}


# --------------------------------------------------------------------------- timm: DINOv2 sizes
SMALL = {"depth": 1, "embed_dim": 64, "num_heads": 2}


def _dinov2_518_state(tmp_path, original_format=False):
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=518, **SMALL)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    assert state["pos_embed"].shape[1] == 1370  # 37 x 37 + 1: what a saved default-size DINOv2 holds
    if original_format:  # facebookresearch/dinov2's own checkpoint (torch.hub) has a mask token
        state["mask_token"] = torch.zeros(1, SMALL["embed_dim"])
    else:  # and a file saved from a model with a classifier (as timm's 1000-class tags) keeps it
        state["head.weight"], state["head.bias"] = torch.randn(1000, SMALL["embed_dim"]), torch.zeros(1000)
    path = tmp_path / ("dinov2_orig.pth" if original_format else "dinov2_518.safetensors")
    torch.save(state, path) if original_format else save_file(state, str(path))
    return state, path


@pytest.mark.parametrize("original_format", [False, True])
def test_dinov2_518px_state_dict_loads_at_224px(tmp_path, original_format):
    from timm.layers import resample_abs_pos_embed
    state, path = _dinov2_518_state(tmp_path, original_format)
    cfg = compose_cfg(["model=dinov2_vitb14", f"model.pretrained={path}",
                       "+model.kwargs.depth=1", "+model.kwargs.embed_dim=64", "+model.kwargs.num_heads=2"]).model
    bundle = build_model(cfg)
    model = bundle.backbone
    assert model.pos_embed.shape[1] == 257 and bundle.image_size == 224
    want = resample_abs_pos_embed(state["pos_embed"], (16, 16), num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.data, want)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept around
    assert isinstance(model.head, torch.nn.Identity)  # the weights' classifier is dropped
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 64)


# ------------------------------------------------------------------ errors that say what is wrong
def test_a_damaged_copy_of_the_shipped_digits_vit_is_refused_before_loading(tmp_path):
    """model=tiny_vit_digits pins its asset's SHA-256 (by file name): a byte flipped inside a tensor (the file
    still parses as safetensors) is refused by the preflight and the builder, naming the fix; an intact copy
    loads, and model.sha256=null checks nothing (a file of another name, e.g. a merged export, is not the
    pinned asset: tests/test_export.py loads one with this config)."""
    import shutil

    from randlora.hub import HubStatus
    from randlora.models import source_problems
    asset = ROOT / "assets" / "tiny_vit_digits04.safetensors"
    (tmp_path / "intact").mkdir()
    (tmp_path / "damaged").mkdir()
    intact, damaged = tmp_path / "intact" / asset.name, tmp_path / "damaged" / asset.name
    shutil.copy(asset, intact)
    data = bytearray(asset.read_bytes())
    data[-5] ^= 0x01
    damaged.write_bytes(bytes(data))
    cfg = compose_cfg(["model=tiny_vit_digits", f"model.pretrained={damaged}"]).model
    [problem] = source_problems(cfg, HubStatus(online=False, reason="test"))
    assert "SHA-256" in problem and "model.sha256" in problem
    with pytest.raises(SourceUnavailableError, match="SHA-256 .* the model config records"):
        build_model(cfg)
    build_model(compose_cfg(["model=tiny_vit_digits", f"model.pretrained={intact}"]).model)
    build_model(compose_cfg(["model=tiny_vit_digits", f"model.pretrained={damaged}", "model.sha256=null"]).model)


def test_a_text_file_is_reported_as_not_a_weights_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes, not weights\n")
    for model in ("tiny_vit", "tiny_clip", "clip_vitb32", "dinov2_vitb14"):
        cfg = compose_cfg([f"model={model}", f"model.pretrained={notes}"]).model
        with pytest.raises(SourceUnavailableError, match="is not a weights file") as e:
            build_model(cfg)
        assert "offline" not in str(e.value)


def test_weights_of_another_architecture_are_reported_as_such(tmp_path):
    import open_clip
    import timm
    from safetensors.torch import save_file
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    for model in ("tiny_vit", "tiny_clip"):
        cfg = compose_cfg([f"model={model}", f"model.pretrained={tmp_path / 'other.safetensors'}"]).model
        with pytest.raises(SourceUnavailableError, match="holds weights of another architecture") as e:
            build_model(cfg)
        assert "offline" not in str(e.value)
    clip = open_clip.CLIP(**TINY_MC)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(SourceUnavailableError, match="another architecture than timm vit_tiny_patch16_224"):
        build_model(compose_cfg(["model=tiny_vit", f"model.pretrained={tmp_path / 'clip.safetensors'}"]).model)


def test_a_causal_lm_folder_of_another_model_or_no_model_is_reported(tmp_path):
    from transformers import AutoConfig
    other = tmp_path / "gpt2"
    other.mkdir()
    AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2).save_pretrained(other)
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(SourceUnavailableError, match="holds a 'gpt2' model, not the 'llama' architecture"):
        build_model(compose_cfg(["model=llama3_8b", f"model.pretrained={other}"]).model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceUnavailableError, match="has no config.json: not a save_pretrained folder"):
        build_model(compose_cfg(["model=llama3_8b", f"model.pretrained={empty}"]).model)
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(SourceUnavailableError, match="is a file, not a save_pretrained folder"):
        build_model(compose_cfg(["model=qwen2_0_5b", f"model.pretrained={notes}"]).model)


def test_a_causal_lm_in_the_local_cache_loads_offline(tmp_path, monkeypatch):
    """A hub model in the exact cache layout is read offline (no network), as the config's architecture."""
    import huggingface_hub.constants as hc
    from safetensors.torch import save
    from transformers import AutoConfig, AutoModelForCausalLM

    from randlora.models.tiny_tokenizer import tiny_tokenizer
    tok = tiny_tokenizer(512)
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    conf = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(conf)
    files = {f.name: f.read_bytes() for f in tok_dir.iterdir()}
    files["config.json"] = conf.to_json_string()
    files["model.safetensors"] = save({k: v.contiguous() for k, v in ref.state_dict().items()})
    write_hub_repo(tmp_path / "hub", "meta-llama/Meta-Llama-3-8B", files)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from randlora.models import source_problems
    from randlora.hub import hub_status
    cfg = compose_cfg(["model=llama3_8b", "model.gradient_checkpointing=false"]).model
    assert source_problems(_plain(cfg), hub_status()) == []
    bundle = build_model(cfg)
    assert bundle.backbone.dtype == torch.bfloat16 and bundle.tokenizer.eos_token_id == tok.eos_token_id
    got, want = bundle.backbone.model.layers[1].mlp.up_proj.weight, ref.model.layers[1].mlp.up_proj.weight
    assert torch.equal(got, want.bfloat16())
