"""The three benchmark models, built by the framework with random weights (nothing is downloaded).

Each model is what ``train.py`` trains for a shipped model config (``configs/model/``), built through
``randlora.training.build.model_network`` (``randlora.models.build_model``, then the task's network):
the same architecture, activation, head and default adapter targets. Each builder returns a
``ModelSpec``: that network, the layer names our library and PEFT adapt, what stays fully trainable
(the classifier's head), a batch factory and the training loss.

Sizes (``size=``):
* ``full``: ``vit_b16`` (timm ViT-B/16 at 224 px, a 100-class head) and ``clip_vitb32`` (open_clip
  ViT-B/32, both towers, QuickGELU as the config states) with ``pretrained=null``; a LLaMA-3-8B-width
  block stack (the ``hf_causal_lm`` family's random-weight route: hidden 4096, MLP 14336, 32 heads, 8 KV heads).
* ``tiny``: the CPU twins ``tiny_vit``, ``tiny_clip`` and ``tiny_llama`` (``--quick``, tests).
Batch size and the LLaMA depth / sequence length are chosen by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from randlora.training.build import model_network
from randlora.training.config import CONFIG_DIR

MODELS = ("vit", "clip", "llama")


@dataclass
class ModelSpec:
    key: str                      # "vit" | "clip" | "llama"
    title: str                    # one line for the report
    model: nn.Module
    targets: list[str]            # our library's target_modules
    peft_targets: list[str]       # PEFT's target_modules (differs where PEFT cannot adapt a layer)
    trainable: list[str] | None   # trainable_modules (a head), same for every adapter method
    batch: int
    make_batch: Callable[[torch.device, torch.dtype], tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    tokens: int                   # tokens per step through each adapted layer (largest tower)
    notes: list[str] = field(default_factory=list)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model_config(name: str, **overrides):
    """The shipped model config ``configs/model/<name>.yaml`` with ``overrides`` (random weights)."""
    cfg = OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml")
    return OmegaConf.merge(cfg, {"pretrained": None, **overrides})


# ---------------------------------------------------------------------------------------------- ViT
VIT_CLASSES = 100


def build_vit(size: str = "full", batch: int = 2) -> ModelSpec:
    cfg = model_config("tiny_vit" if size == "tiny" else "vit_b16")
    network, bundle = model_network(cfg, num_classes=VIT_CLASSES, seed=0)
    backbone = bundle.backbone
    img = bundle.image_size
    patch = backbone.patch_embed.patch_size[0]
    seq = backbone.patch_embed.num_patches + backbone.num_prefix_tokens

    def make_batch(device, dtype):
        g = _gen(0)
        x = torch.randn(batch, 3, img, img, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, VIT_CLASSES, (batch,), generator=g).to(device)
        return x, y

    def loss(m, b):
        x, y = b
        return F.cross_entropy(m(x).float(), y)

    title = (f"timm {cfg.arch} as model={cfg.name} ({len(backbone.blocks)} blocks, width {backbone.embed_dim}, "
             f"{img} px, patch {patch}, {seq} tokens, {VIT_CLASSES}-class head), batch {batch}")
    return ModelSpec("vit", title, network.net, list(network.targets), list(network.targets),
                     list(network.trainable_modules), batch, make_batch, loss, batch * seq)


# --------------------------------------------------------------------------------------------- CLIP
def build_clip(size: str = "full", batch: int = 4) -> ModelSpec:
    cfg = model_config("tiny_clip" if size == "tiny" else "clip_vitb32")
    network, bundle = model_network(cfg)
    model = network.net
    img, ctx = bundle.image_size, int(model.context_length)
    vocab = int(model.vocab_size)
    patch = model.visual.patch_size[0] if isinstance(model.visual.patch_size, tuple) else model.visual.patch_size
    if size == "tiny":
        title = f"open_clip CLIP as model={cfg.name} (tiny: {cfg.tiny.layers}+{cfg.tiny.layers} blocks, width {cfg.tiny.width})"
    else:
        title = (f"open_clip {cfg.arch} as model={cfg.name} (both towers: 12 x 768 image, 12 x 512 text, "
                 f"{(img // patch) ** 2 + 1} / {ctx} tokens)")

    def make_batch(device, dtype):
        g = _gen(0)
        x = torch.randn(batch, 3, img, img, generator=g).to(device=device, dtype=dtype)
        t = torch.randint(1, vocab, (batch, ctx), generator=g).to(device)
        return x, t

    def loss(m, b):
        x, t = b
        out = m(x, t)
        fi, ft, scale = out[0].float(), out[1].float(), out[2].float()
        logits = scale * fi @ ft.t()
        labels = torch.arange(len(x), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))

    targets = list(network.targets)
    spec = ModelSpec("clip", f"{title}, batch {batch}", model, targets, [t for t in targets if t != "attn"],
                     list(network.trainable_modules) or None, batch, make_batch, loss,
                     batch * max(ctx, (img // patch) ** 2 + 1))
    spec.notes.append("CLIP: ours adapts attn.in_proj_weight (the fused q/k/v of nn.MultiheadAttention), c_fc and "
                      "c_proj in both towers; PEFT's RandLoRA / VeRA accept only nn.Linear, so every PEFT row "
                      "adapts c_fc / c_proj only. The row 'ours randlora [PEFT targets]' is ours on exactly "
                      "PEFT's targets and r: that is the like-for-like PEFT comparison.")
    return spec


# -------------------------------------------------------------------------------------------- LLaMA
LLAMA_FULL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)


def build_llama(size: str = "full", batch: int = 1, layers: int = 1, seq: int = 128) -> ModelSpec:
    """``tiny_llama`` (or, ``full``, the same random-weight route at LLaMA-3-8B's width, vocabulary 256)
    with ``layers`` blocks."""
    tiny = {"num_hidden_layers": layers, "max_position_embeddings": max(seq, 64)}
    if size != "tiny":
        tiny.update(LLAMA_FULL, vocab_size=256)
    cfg = model_config("tiny_llama", tiny=tiny, gradient_checkpointing=False, dtype="float32")
    network, bundle = model_network(cfg)
    model = network.net
    c = model.config
    vocab = int(c.vocab_size)

    def make_batch(device, dtype):
        ids = torch.randint(0, vocab, (batch, seq), generator=_gen(0)).to(device)
        return (ids,)

    def loss(m, b):
        (ids,) = b
        return m(input_ids=ids, labels=ids).loss.float()

    route = f"model={cfg.name}" if size == "tiny" else f"model={cfg.name}'s route at LLaMA-3-8B width"
    title = (f"LLaMA block stack (transformers {type(model).__name__}, {route}, hidden {c.hidden_size}, MLP "
             f"{c.intermediate_size}, {c.num_attention_heads}/{c.num_key_value_heads} heads, "
             f"{layers} layer(s), vocab {vocab}), batch {batch} x {seq} tokens")
    targets = list(network.targets)
    return ModelSpec("llama", title, model, targets, targets, list(network.trainable_modules) or None, batch,
                     make_batch, loss, batch * seq)


def build(key: str, size: str, batch: int, llama_layers: int = 1, seq: int = 128) -> ModelSpec:
    if key == "vit":
        return build_vit(size, batch)
    if key == "clip":
        return build_clip(size, batch)
    if key == "llama":
        return build_llama(size, batch, llama_layers, seq)
    raise ValueError(f"unknown model {key!r}; choose from {MODELS}")
