"""timm vision transformers (ViT-B/16, DINOv2 ViT-B/14) and a tiny random-weight twin.

The backbone is built as a feature extractor (``num_classes=0``: the pooled features; the task owns
the classifier) at the config's ``image_size`` (``kwargs.img_size`` when it differs from the
weights' own, e.g. DINOv2 at 224 instead of 518 px). Weights are loaded the same way from a tag and
from a local file: the state dict goes through the architecture's own checkpoint filter (timm's
``pretrained_cfg_overlay`` with the state dict), which resamples position embeddings to the built
size (a 518-px DINOv2 state dict, 1370 position rows, loads into the 224-px model, 257 rows) and
converts the original DINOv2 / OpenAI formats; the classifier of the weights is dropped; anything
else that does not fit is an error.

Normalisation: ``model.mean`` / ``model.std`` (the datamodule reads them). The paper feeds every
vision backbone CLIP's statistics, not the weights' own (randlora-method.md §4.1: the official
``timm_encoder.py`` normalises with CLIP's mean/std); the shipped configs state that explicitly.
"""
from __future__ import annotations

import os

from ..hub import weights_file
from . import (CLIP_MEAN, CLIP_STD, ModelBundle, SourceUnavailableError, is_local_path, short_error, sniff_weights_file,
               weights_file_problems)


def load_state_file(path) -> dict:
    """A state dict from .safetensors, or from a torch file loaded with weights_only=True."""
    import torch
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def _tag(cfg):
    p = cfg.get("pretrained")
    return None if p in (None, False, "none", True) or is_local_path(p) else str(p)


def tag_config(arch: str, tag: str | None) -> dict:
    """timm's published pretrained config of ``arch.tag`` ({} when unknown)."""
    import timm
    c = timm.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    return c.to_dict() if c is not None else {}


def tag_files(arch: str, tag: str) -> list[tuple[str, str]]:
    """The hub files (repo id, filename) timm fetches for a tag, in its order of preference."""
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    pc = tag_config(arch, tag)
    repo = pc.get("hf_hub_id")
    if not repo:
        return []
    if pc.get("hf_hub_filename"):
        return [(repo, pc["hf_hub_filename"])]
    return [(repo, HF_SAFE_WEIGHTS_NAME), (repo, HF_WEIGHTS_NAME)]


def _url_cache_path(url: str) -> str:
    import torch
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def cached_tag_file(arch: str, tag: str) -> str | None:
    from ..hub import cached_hub_file
    for repo, filename in tag_files(arch, tag):
        path = cached_hub_file(repo, filename)
        if path:
            return path
    url = tag_config(arch, tag).get("url")
    if url and os.path.isfile(_url_cache_path(url)):
        return _url_cache_path(url)
    return None


def _tag_fix(arch: str, tag: str) -> str:
    from ..hub import download_hint
    files = tag_files(arch, tag)
    hint = download_hint(files[0][0], [files[0][1]]) if files else "download it on a machine with network"
    return (f"{hint}; or pass model.pretrained=/path/to/weights.safetensors (timm.create_model('{arch}.{tag}', "
            "pretrained=True) then save its state_dict), or model.pretrained=null for random weights")


def source_problems(cfg, hub) -> list[str]:
    pretrained, arch = cfg.get("pretrained"), cfg.get("arch")
    what = f"weights of {cfg.get('name') or arch}"
    if pretrained in (None, False, "none"):
        return []
    if is_local_path(pretrained):
        return weights_file_problems(pretrained, what, cfg.get("sha256"))
    tag = _tag(cfg)
    if not tag_config(arch, tag):
        return [f"{what}: {pretrained!r} is neither a local file nor a pretrained tag of timm {arch}"]
    if hub.online or cached_tag_file(arch, tag):
        return []
    files = ", ".join(f"{r}/{f}" for r, f in tag_files(arch, tag)) or tag_config(arch, tag).get("url")
    return [f"{what} (timm {arch}.{tag}: {files}) are not in the local cache: " + _tag_fix(arch, tag)]


def resolve_tag(arch: str, tag: str, hub) -> str:
    """The local file of a tag's weights: from the cache, else downloaded (hub reachable), else an error."""
    def download():
        files = tag_files(arch, tag)
        if files:
            from huggingface_hub import hf_hub_download
            last = None
            for repo, filename in files:
                try:
                    return hf_hub_download(repo, filename)
                except Exception as e:  # noqa: BLE001 - try the next file name
                    last = e
            raise last
        import torch
        url = tag_config(arch, tag)["url"]
        torch.hub.download_url_to_file(url, _url_cache_path(url))
        return _url_cache_path(url)
    return weights_file(f"timm weights {arch}.{tag}", cached_tag_file(arch, tag), download, _tag_fix(arch, tag), hub)


def load_into_architecture(arch: str, tag: str | None, state: dict, kwargs: dict, what: str, source: str):
    """``timm.create_model(arch, num_classes=0, **kwargs)`` with ``state`` loaded through the
    architecture's checkpoint filter (position embeddings resampled to the built size, original
    formats converted), the weights' classifier dropped, everything else strict."""
    import timm
    pc = tag_config(arch, tag)
    classifiers = pc.get("classifier") or "head"
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    state = {k: v for k, v in state.items() if not any(k in (f"{c}.weight", f"{c}.bias") for c in classifiers)}
    name = f"{arch}.{tag}" if tag else arch
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs,
                                  pretrained_cfg_overlay={"state_dict": state, "num_classes": 0, "file": None,
                                                          "hf_hub_id": None, "url": None})
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise SourceUnavailableError(
            f"{what}: {source!r} holds weights of another architecture than timm {arch} with {kwargs} "
            f"({' '.join(lines[:3])[:400]}); pass the weights of {arch} or change model.arch / model.kwargs") from None
    # the overlay keeps a reference to the state dict: drop it (memory) from the model's record
    for attr in ("pretrained_cfg", "default_cfg"):
        c = getattr(model, attr, None)
        if isinstance(c, dict):
            c.pop("state_dict", None)
    return model


def build_timm(cfg) -> ModelBundle:
    import timm

    from ..hub import hub_status

    kwargs = dict(cfg.get("kwargs") or {})
    pretrained, arch = cfg.get("pretrained"), cfg.get("arch")
    what = f"weights of {cfg.get('name') or arch}"
    if pretrained in (None, False, "none"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        source, tag = None, None
    else:
        if is_local_path(pretrained):
            source, tag = os.path.expanduser(str(pretrained)), None
            sniff_weights_file(source, what, cfg.get("sha256"))
        else:
            tag = _tag(cfg)
            if not tag_config(arch, tag):
                raise SourceUnavailableError(f"{what}: {pretrained!r} is neither a local file nor a pretrained tag "
                                             f"of timm {arch}; known: {timm.list_pretrained(arch + '*')[:8]}")
            source = resolve_tag(arch, tag, hub_status())
        try:
            state = load_state_file(source)
        except Exception as e:  # noqa: BLE001
            raise SourceUnavailableError(
                f"{what}: could not read {source!r} as a state dict ({short_error(e)})") from None
        if not isinstance(state, dict):
            raise SourceUnavailableError(f"{what}: {source!r} holds a {type(state).__name__}, not a state dict")
        model = load_into_architecture(arch, tag, state, kwargs, what, source)
    size = cfg.get("image_size") or kwargs.get("img_size") or 224
    return ModelBundle(backbone=model, kind="vision", default_targets=list(cfg.get("targets")),
                       feature_dim=model.num_features, image_size=int(size),
                       mean=tuple(cfg.get("mean") or CLIP_MEAN), std=tuple(cfg.get("std") or CLIP_STD),
                       extra={"weights_file": source})
