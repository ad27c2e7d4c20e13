"""open_clip CLIP models (ViT-B/32, L/14, H/14 with the paper's weights) and a tiny twin."""
from __future__ import annotations

import os

import torch

from . import CLIP_MEAN, CLIP_STD, ModelBundle, SourceUnavailableError, offline_message


def build_open_clip(cfg) -> ModelBundle:
    import open_clip

    pretrained = cfg.get("pretrained")
    arch = cfg.get("arch")
    try:
        if cfg.get("tiny"):
            t = cfg.tiny
            torch.manual_seed(int(cfg.get("init_seed", 0)))
            model = open_clip.CLIP(
                embed_dim=t.embed_dim,
                vision_cfg=open_clip.CLIPVisionCfg(layers=t.layers, width=t.width, head_width=t.head_width,
                                                   patch_size=t.patch_size, image_size=t.image_size),
                text_cfg=open_clip.CLIPTextCfg(context_length=t.context_length, vocab_size=49408,
                                               width=t.width, heads=t.width // t.head_width, layers=t.layers),
            )
            if pretrained:
                model.load_state_dict(_load_file(pretrained))
            context_length = t.context_length
        else:
            if isinstance(pretrained, str) and os.path.sep in pretrained and not os.path.exists(pretrained):
                raise FileNotFoundError(pretrained)
            model = open_clip.create_model(arch, pretrained=pretrained or None)
            context_length = model.context_length
    except Exception as e:
        raise SourceUnavailableError(offline_message(
            f"open_clip weights for {arch or 'tiny_clip'}", str(pretrained),
            "Download them on a machine with network (open_clip.create_model(arch, pretrained=tag) caches a "
            ".bin/.safetensors file) and pass model.pretrained=/path/to/that/file.", e)) from None
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
    size = cfg.get("image_size") or model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ModelBundle(backbone=model, kind="clip", default_targets=list(cfg.targets),
                       feature_dim=None, image_size=int(size), mean=CLIP_MEAN, std=CLIP_STD, tokenizer=tok)


def _load_file(path):
    from .vit import load_state_file
    return load_state_file(path)
