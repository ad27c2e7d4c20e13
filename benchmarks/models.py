"""The three benchmark models, built with random weights (nothing is downloaded).

Each builder returns a ``ModelSpec``: the model, the layer names our library and PEFT adapt,
what stays fully trainable (a classification head), a batch factory and the training loss.

Sizes (``size=``):
* ``full``: the real shapes: timm ViT-B/16 at 224 px, open_clip ViT-B/32 (both towers),
  a LLaMA-3-8B-width block stack (hidden 4096, MLP 14336, 32 heads, 8 KV heads).
* ``tiny``: the same architectures at width 64 and 1-2 blocks (``--quick``, tests).
Batch size and the LLaMA depth / sequence length are chosen by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

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


# ---------------------------------------------------------------------------------------------- ViT
def build_vit(size: str = "full", batch: int = 2) -> ModelSpec:
    import timm

    if size == "tiny":
        kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    else:
        kw = {}
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100, **kw)
    img = kw.get("img_size", 224)
    patch = kw.get("patch_size", 16)
    seq = (img // patch) ** 2 + 1
    depth = kw.get("depth", 12)
    width = kw.get("embed_dim", 768)

    def make_batch(device, dtype):
        g = _gen(0)
        x = torch.randn(batch, 3, img, img, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, 100, (batch,), generator=g).to(device)
        return x, y

    def loss(m, b):
        x, y = b
        return F.cross_entropy(m(x).float(), y)

    title = f"timm vit_base_patch16_224 ({depth} blocks, width {width}, {img} px, {seq} tokens), batch {batch}"
    return ModelSpec("vit", title, model, ["qkv", "fc1", "fc2"], ["qkv", "fc1", "fc2"], ["head"], batch,
                     make_batch, loss, batch * seq)


# --------------------------------------------------------------------------------------------- CLIP
def build_clip(size: str = "full", batch: int = 4) -> ModelSpec:
    import open_clip

    if size == "tiny":
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
        vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
        text = CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=2, layers=2)
        model = CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)
        img, ctx, vocab, title = 32, 16, 100, "open_clip CLIP (tiny: 2+2 blocks, width 64)"
    else:
        model = open_clip.create_model("ViT-B-32", pretrained=None, pretrained_image=False,
                                       pretrained_text=False)
        img, ctx, vocab = 224, 77, 49408
        title = "open_clip ViT-B-32 (both towers: 12 x 768 image, 12 x 512 text, 50 / 77 tokens)"
    patch = model.visual.patch_size[0] if isinstance(model.visual.patch_size, tuple) else model.visual.patch_size

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

    spec = ModelSpec("clip", f"{title}, batch {batch}", model, ["attn", "c_fc", "c_proj"], ["c_fc", "c_proj"],
                     None, batch, make_batch, loss, batch * max(ctx, (img // patch) ** 2 + 1))
    spec.notes.append("CLIP: ours adapts attn.in_proj_weight (the fused q/k/v of nn.MultiheadAttention), c_fc and "
                      "c_proj in both towers; PEFT's RandLoRA / VeRA accept only nn.Linear, so every PEFT row "
                      "adapts c_fc / c_proj only. The row 'ours randlora [PEFT targets]' is ours on exactly "
                      "PEFT's targets and r: that is the like-for-like PEFT comparison.")
    return spec


# -------------------------------------------------------------------------------------------- LLaMA
def build_llama(size: str = "full", batch: int = 1, layers: int = 1, seq: int = 128) -> ModelSpec:
    from transformers import LlamaConfig, LlamaForCausalLM

    if size == "tiny":
        dims = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2)
    else:
        dims = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    vocab = 256
    cfg = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=max(seq, 64),
                      tie_word_embeddings=False, attn_implementation="sdpa", **dims)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False

    def make_batch(device, dtype):
        ids = torch.randint(0, vocab, (batch, seq), generator=_gen(0)).to(device)
        return (ids,)

    def loss(m, b):
        (ids,) = b
        return m(input_ids=ids, labels=ids).loss.float()

    title = (f"LLaMA block stack (transformers LlamaForCausalLM, hidden {dims['hidden_size']}, MLP "
             f"{dims['intermediate_size']}, {dims['num_attention_heads']}/{dims['num_key_value_heads']} heads, "
             f"{layers} layer(s), vocab {vocab}), batch {batch} x {seq} tokens")
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    return ModelSpec("llama", title, model, targets, targets, None, batch, make_batch, loss, batch * seq)


def build(key: str, size: str, batch: int, llama_layers: int = 1, seq: int = 128) -> ModelSpec:
    if key == "vit":
        return build_vit(size, batch)
    if key == "clip":
        return build_clip(size, batch)
    if key == "llama":
        return build_llama(size, batch, llama_layers, seq)
    raise ValueError(f"unknown model {key!r}; choose from {MODELS}")
