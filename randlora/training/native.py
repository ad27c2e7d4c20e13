"""A run's network in its model library's own form, and adapters moved between the two forms.

The framework trains a task's network (``Task.network``). For CLIP and causal LMs that network is the
library's model itself (open_clip's ``CLIP``, a transformers ``*ForCausalLM``), so its module names are
the library's. An image classifier is ``Classifier(backbone, head)``: a timm backbone built with
``num_classes=0`` and a linear head next to it, so its names read ``backbone.blocks.0.attn.qkv`` and
``head``. timm builds the same function as one model, ``timm.create_model(arch, num_classes=C)``, whose
names are ``blocks.0.attn.qkv`` and ``head`` (its ``forward_head`` pools, then applies ``head``, which
is what the backbone with ``head = Identity`` followed by our head computes).

Exported adapters and merged weights use the library's names (what a user loads with
``timm.create_model`` / ``open_clip`` / ``transformers``); :func:`native_model` builds that model from a
run's base model and :func:`move_adapter_state` renames an adapter state dict between the two forms.
"""
from __future__ import annotations

import copy

from torch import nn

from ..adapters.state import BASES_PREFIX, META_KEY

BACKBONE = "backbone."  # the prefix of the backbone's modules inside randlora.tasks.classification.Classifier


def wraps_backbone(cfg) -> bool:
    """Whether the task's network of ``cfg`` is a ``Classifier`` around a timm backbone (else it is the
    library's model itself)."""
    return cfg.task.kind == "classification"


def native_model(cfg, backbone: nn.Module, head: nn.Linear | None = None) -> nn.Module:
    """The library's model of a run: for a classifier, ``timm.create_model(arch, num_classes=C, **kwargs)``
    holding the (unadapted) backbone's weights and ``head``'s; otherwise ``backbone`` itself."""
    if not wraps_backbone(cfg):
        return backbone
    import timm
    kwargs = dict(cfg.model.get("kwargs") or {})
    model = timm.create_model(cfg.model.arch, pretrained=False, num_classes=head.out_features, **kwargs)
    state = {**backbone.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}}
    model.load_state_dict(state, strict=True)
    return model.to(next(backbone.parameters()).device).eval()


def _rename(name: str, to_native: bool) -> str:
    if to_native:
        return name[len(BACKBONE):] if name.startswith(BACKBONE) else name
    return name if name == "head" or name.startswith("head.") else BACKBONE + name


def move_adapter_state(state: dict, to_native: bool) -> dict:
    """An ``adapter_state_dict`` of the classifier's network renamed for the library's model
    (``to_native``) or back: tensor names, targets, per-layer options and trained module names. The head
    is ``head`` in both; the bases and the method's options are unchanged."""
    meta = copy.deepcopy(state[META_KEY])
    out = {}
    for k, v in state.items():
        if k == META_KEY:
            continue
        out[k if k.startswith(BASES_PREFIX) else _rename(k, to_native)] = v
    meta["targets"] = [[_rename(t[0], to_native), *t[1:]] for t in meta.get("targets") or []]
    meta["layer_options"] = {_rename(k, to_native): v for k, v in (meta.get("layer_options") or {}).items()}
    meta["trainable_names"] = [_rename(n, to_native) for n in meta.get("trainable_names") or []]
    tm = meta.get("target_modules")
    if isinstance(tm, list) and meta["targets"] and all("." in t for t in tm):  # full names, not suffixes
        meta["target_modules"] = [_rename(t, to_native) for t in tm]
    out[META_KEY] = meta
    return out
