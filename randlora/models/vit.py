"""timm vision transformers (ViT-B/16, DINOv2 ViT-B/14) and a tiny random-weight twin."""
from __future__ import annotations

import os

from . import CLIP_MEAN, CLIP_STD, ModelBundle, SourceUnavailableError, offline_message


def load_state_file(path) -> dict:
    """A state dict from .safetensors, or from a torch file loaded with weights_only=True."""
    import torch
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def build_timm(cfg) -> ModelBundle:
    import timm

    kwargs = dict(cfg.get("kwargs") or {})
    pretrained = cfg.get("pretrained")
    arch = cfg.arch
    try:
        if pretrained in (None, False, "none"):
            model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        elif isinstance(pretrained, str) and (os.path.sep in pretrained or os.path.exists(pretrained)):
            if not os.path.exists(pretrained):
                raise FileNotFoundError(pretrained)
            model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
            state = load_state_file(pretrained)
            state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or
                     k in model.state_dict()}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"checkpoint does not fit {arch} with {kwargs}: missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]}")
        else:
            tag = None if pretrained is True else pretrained
            name = f"{arch}.{tag}" if tag else arch
            model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as e:  # hub unreachable, unknown tag, missing file
        raise SourceUnavailableError(offline_message(
            f"timm weights for {arch}", str(pretrained), "Download the checkpoint on a machine with network "
            "(timm.create_model(..., pretrained=True) then save its state_dict) and pass "
            "model.pretrained=/path/to/weights.safetensors, or model.pretrained=null for random weights.", e)) from None
    mean, std = CLIP_MEAN, CLIP_STD  # the paper feeds every vision backbone CLIP statistics
    if cfg.get("normalization") == "model":
        dc = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = tuple(dc.get("mean", mean)), tuple(dc.get("std", std))
    size = cfg.get("image_size") or kwargs.get("img_size") or 224
    return ModelBundle(backbone=model, kind="vision", default_targets=list(cfg.targets),
                       feature_dim=model.num_features, image_size=int(size), mean=mean, std=std)
