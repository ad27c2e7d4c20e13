"""Model builders: a backbone plus what the rest of the framework needs to know about it.

``build_model(cfg)`` dispatches on ``cfg.family`` (``timm``, ``open_clip``, ``hf_causal_lm``) and
returns a :class:`ModelBundle`. Weights come from a hub tag or a local file; when neither can be
reached the builder raises :class:`SourceUnavailableError` with one message that names the
source and how to provide it locally.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SourceUnavailableError(RuntimeError):
    """Weights or data could not be reached (offline, wrong id, missing file)."""


@dataclass
class ModelBundle:
    backbone: nn.Module
    kind: str                         # "vision" | "clip" | "causal_lm"
    default_targets: list[str]
    feature_dim: int | None = None    # vision: width of the pooled features
    image_size: int | None = None
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    tokenizer: Any = None             # clip: callable(list[str]) -> LongTensor; causal_lm: HF tokenizer
    extra: dict = field(default_factory=dict)


def offline_message(what: str, source: str, how: str, err: Exception) -> str:
    short = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return (f"could not load {what} from {source!r} ({type(err).__name__}: {short}). "
            f"This machine may be offline or the id may be wrong. {how}")


def build_model(cfg) -> ModelBundle:
    family = cfg.family
    if family == "timm":
        from .vit import build_timm
        return build_timm(cfg)
    if family == "open_clip":
        from .clip import build_open_clip
        return build_open_clip(cfg)
    if family == "hf_causal_lm":
        from .llama import build_causal_lm
        return build_causal_lm(cfg)
    raise ValueError(f"unknown model family {family!r}; choose one of ['timm', 'open_clip', 'hf_causal_lm']")


def meta_backbone(cfg):
    """The model's architecture on the ``meta`` device (no weights, no memory, no download), for
    checking adapter targets, ranks and budgets before anything real is built. None when the
    architecture itself is only available from a hub (a transformers model by id, offline)."""
    import torch
    try:
        with torch.device("meta"):
            if cfg.family == "timm":
                import timm
                return timm.create_model(cfg.arch, pretrained=False, num_classes=0, **dict(cfg.get("kwargs") or {}))
            if cfg.family == "open_clip":
                import open_clip
                if cfg.get("tiny"):
                    t = cfg.tiny
                    return open_clip.CLIP(
                        embed_dim=t.embed_dim,
                        vision_cfg=open_clip.CLIPVisionCfg(layers=t.layers, width=t.width, head_width=t.head_width,
                                                           patch_size=t.patch_size, image_size=t.image_size),
                        text_cfg=open_clip.CLIPTextCfg(context_length=t.context_length, vocab_size=49408,
                                                       width=t.width, heads=t.width // t.head_width, layers=t.layers))
                mc = open_clip.get_model_config(cfg.arch)
                return None if mc is None else open_clip.CLIP(**mc)
            if cfg.family == "hf_causal_lm":
                from transformers import AutoConfig, AutoModelForCausalLM
                if cfg.get("tiny"):
                    t = dict(cfg.tiny)
                    config = AutoConfig.for_model(t.pop("model_type", "llama"), **t)
                else:
                    config = AutoConfig.from_pretrained(cfg.pretrained)
                return AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    return None
