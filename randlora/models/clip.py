"""open_clip CLIP models (ViT-B/32, L/14, H/14 with the paper's weights) and a tiny twin.

A model config states what its weights were trained as, and the builder builds exactly that, from a
pretrained tag and from a local file alike:

* ``quick_gelu``: the MLP activation. OpenAI's CLIPs were trained with QuickGELU, x * sigmoid(1.702 x)
  (``open_clip.get_pretrained_cfg(arch, "openai")["quick_gelu"]`` is True), LAION's ViT-H/14 with
  GELU. The plain ``ViT-B-32`` / ``ViT-L-14`` architectures build nn.GELU: open_clip >= 2.29 only
  warns about the mismatch for a tag and says nothing for a local file, so the activation is always
  passed explicitly (``force_quick_gelu``). A tag whose published activation contradicts the config
  is refused before anything is loaded.
* ``image_size``, ``context_length``: the architecture's input sizes (the datamodule reads
  ``image_size``); ``mean`` / ``std``: the normalisation statistics the weights were trained with
  (the datamodule reads them).

Weights of a tag come from the local Hugging Face cache when they are there (no network), else are
downloaded (open_clip's own download); with the hub unreachable, a tag that is not cached fails at
once (``randlora.sources.check_sources`` reports it before anything is built).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from ..hub import weights_file
from . import (CLIP_MEAN, CLIP_STD, ModelBundle, SourceUnavailableError, is_local_path, short_error, sniff_weights_file,
               weights_file_problems)


def tag_config(arch: str, tag: str) -> dict:
    """open_clip's published config of pretrained ``tag`` of ``arch`` ({} when the tag is unknown)."""
    import open_clip
    return dict(open_clip.get_pretrained_cfg(arch, tag) or {})


def tag_files(arch: str, tag: str) -> list[tuple[str, str]]:
    """The hub files (repo id, filename) open_clip fetches for a tag, in its order of preference."""
    from open_clip import pretrained as ocp
    HF_WEIGHTS_NAME = getattr(ocp, "HF_WEIGHTS_NAME", "open_clip_pytorch_model.bin")
    hf = tag_config(arch, tag).get("hf_hub", "")
    if not hf:
        return []
    # 'org/repo/' means open_clip's default file name; 'org/repo/file.bin' names the file
    repo, filename = os.path.split(hf)
    filename = filename or HF_WEIGHTS_NAME
    alternatives = list(getattr(ocp, "_get_safe_alternatives", lambda f: [])(filename))
    return [(repo, f) for f in alternatives + [filename]]


def _url_cache_path(url: str) -> str:
    # open_clip.pretrained.download_pretrained_from_url's cache (tags without a hub copy)
    return os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))


def cached_tag_file(arch: str, tag: str) -> str | None:
    """The local file of a tag's weights, if it is already cached (no network)."""
    from ..hub import cached_hub_file
    for repo, filename in tag_files(arch, tag):
        path = cached_hub_file(repo, filename)
        if path:
            return path
    url = tag_config(arch, tag).get("url", "")
    if url and os.path.isfile(_url_cache_path(url)):
        return _url_cache_path(url)
    return None


def _tag_fix(arch: str, tag: str) -> str:
    from ..hub import download_hint
    files = tag_files(arch, tag)
    if files:
        repo = files[0][0]
        return (download_hint(repo, [files[0][1]]) + f"; or pass model.pretrained=/path/to/that/file "
                f"(open_clip.create_model({arch!r}, pretrained={tag!r}) caches it)")
    return "download it on a machine with network and pass model.pretrained=/path/to/the/file"


def _activation_problem(arch: str, tag: str, quick: bool) -> str | None:
    published = bool(tag_config(arch, tag).get("quick_gelu", False))
    if published == quick:
        return None
    act = "QuickGELU" if published else "GELU"
    return (f"open_clip tag {arch}/{tag} was trained with {act} but model.quick_gelu={str(quick).lower()}; set "
            f"model.quick_gelu={str(published).lower()} (open_clip.get_pretrained_cfg({arch!r}, {tag!r}))")


def source_problems(cfg, hub) -> list[str]:
    name, arch, pretrained = cfg.get("name"), cfg.get("arch"), cfg.get("pretrained")
    what = f"weights of {name}"
    if not pretrained:
        return []
    if is_local_path(pretrained):
        return weights_file_problems(pretrained, what, cfg.get("sha256"))
    if cfg.get("tiny") or not arch:
        return [f"{what}: model.pretrained={pretrained!r} names no local file (a tiny model reads weights from a file)"]
    import open_clip
    if not tag_config(arch, pretrained):
        return [f"{what}: {pretrained!r} is neither a local file nor a pretrained tag of open_clip {arch}; known tags: "
                f"{open_clip.list_pretrained_tags_by_model(arch)}"]
    problems = []
    mismatch = _activation_problem(arch, pretrained, bool(cfg.get("quick_gelu", False)))
    if mismatch:
        problems.append(f"{what}: {mismatch}")
    if not hub.online and cached_tag_file(arch, pretrained) is None:
        files = ", ".join(f"{r}/{f}" for r, f in tag_files(arch, pretrained)) or tag_config(arch, pretrained).get("url")
        problems.append(f"{what} (open_clip {arch} tag {pretrained!r}: {files}) are not in the local cache: "
                        + _tag_fix(arch, pretrained))
    return problems


def resolve_tag(arch: str, tag: str, hub) -> str:
    """The local file of a tag's weights: from the cache, else downloaded (hub reachable), else an error."""
    def download():
        import open_clip
        return open_clip.download_pretrained(tag_config(arch, tag))
    return weights_file(f"open_clip weights {arch}/{tag}", cached_tag_file(arch, tag), download, _tag_fix(arch, tag), hub)


@contextlib.contextmanager
def _no_random_init_warning():
    # create_model without weights logs "Model initialized randomly" (root logger); the weights follow
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def create_architecture(cfg, device: str = "cpu"):
    """The CLIP of ``cfg`` with random weights and the activation, image size and context length the
    config states (what its weights were trained as)."""
    import open_clip
    quick = bool(cfg.get("quick_gelu", False))
    if cfg.get("tiny"):
        t = cfg.get("tiny")
        with torch.device(device):
            return open_clip.CLIP(
                embed_dim=t["embed_dim"], quick_gelu=quick,
                vision_cfg=open_clip.CLIPVisionCfg(layers=t["layers"], width=t["width"], head_width=t["head_width"],
                                                   patch_size=t["patch_size"], image_size=t["image_size"]),
                text_cfg=open_clip.CLIPTextCfg(context_length=t["context_length"], vocab_size=49408, width=t["width"],
                                               heads=t["width"] // t["head_width"], layers=t["layers"]))
    arch = cfg.get("arch")
    mc = open_clip.get_model_config(arch)
    if mc is None:
        raise ValueError(f"model.arch={arch!r} is not an open_clip architecture; see open_clip.list_models()")
    kwargs = {}
    if quick:
        kwargs["force_quick_gelu"] = True
    elif mc.get("quick_gelu"):
        kwargs["quick_gelu"] = False  # a *-quickgelu architecture with model.quick_gelu=false
    size, ctx = cfg.get("image_size"), cfg.get("context_length")
    if size and size != mc["vision_cfg"].get("image_size"):
        kwargs["force_image_size"] = int(size)
    if ctx and ctx != mc["text_cfg"].get("context_length"):
        kwargs["force_context_length"] = int(ctx)
    with _no_random_init_warning(), torch.device(device):
        return open_clip.create_model(arch, pretrained=None, device=device, **kwargs)


def activations(model) -> set[str]:
    """The class names of the MLP activations in a CLIP (``QuickGELU`` / ``GELU``)."""
    return {type(m).__name__ for m in model.modules() if type(m).__name__ in ("QuickGELU", "GELU")}


def load_weights(model, path: str, what: str, arch: str | None) -> None:
    """Load a CLIP state dict file into ``model`` (open_clip's loader: format conversions, position
    embeddings resized), strictly; the error says whether the file is unreadable or does not fit."""
    import open_clip
    sniff_weights_file(path, what)
    try:
        open_clip.load_checkpoint(model, os.path.expanduser(str(path)), strict=True)
    except RuntimeError as e:
        text = str(e)
        if "state_dict" in text or "size mismatch" in text or "Missing key" in text:
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            raise SourceUnavailableError(
                f"{what}: {path!r} holds weights of another architecture than open_clip {arch or 'tiny CLIP'} "
                f"({' '.join(lines[:3])[:400]}); pass the file of {arch or 'this model'} or change model.arch"
            ) from None
        raise SourceUnavailableError(f"{what}: could not read {path!r} ({short_error(e)})") from None
    except Exception as e:  # noqa: BLE001 - unpickling / safetensors / format errors
        raise SourceUnavailableError(
            f"{what}: could not read {path!r} as a CLIP state dict ({short_error(e)})") from None


def build_open_clip(cfg) -> ModelBundle:
    import open_clip

    from ..hub import hub_status

    pretrained, arch = cfg.get("pretrained"), cfg.get("arch")
    quick = bool(cfg.get("quick_gelu", False))
    what = f"weights of {cfg.get('name') or arch or 'tiny_clip'}"
    path = None
    if pretrained:
        if is_local_path(pretrained):
            path = os.path.expanduser(str(pretrained))
            sniff_weights_file(path, what, cfg.get("sha256"))
        elif cfg.get("tiny") or not arch:
            raise SourceUnavailableError(f"{what}: model.pretrained={pretrained!r} names no local file")
        else:
            if not tag_config(arch, pretrained):
                raise SourceUnavailableError(
                    f"{what}: {pretrained!r} is neither a local file nor a pretrained tag of open_clip {arch}; "
                    f"known tags: {open_clip.list_pretrained_tags_by_model(arch)}")
            mismatch = _activation_problem(arch, pretrained, quick)
            if mismatch:
                raise ValueError(mismatch)
            path = resolve_tag(arch, pretrained, hub_status())
    torch.manual_seed(int(cfg.get("init_seed", 0)))
    model = create_architecture(cfg)
    if path:
        load_weights(model, path, what, arch)
    want = "QuickGELU" if quick else "GELU"
    if activations(model) != {want}:  # the invariant this module exists for
        raise RuntimeError(f"built CLIP has activations {sorted(activations(model))}, config says {want}")
    context_length = int(model.context_length)
    tok = open_clip.get_tokenizer(arch or "ViT-B-32", context_length=context_length)
    size = cfg.get("image_size") or model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ModelBundle(backbone=model, kind="clip", default_targets=list(cfg.get("targets")),
                       feature_dim=None, image_size=int(size), mean=tuple(cfg.get("mean") or CLIP_MEAN),
                       std=tuple(cfg.get("std") or CLIP_STD), tokenizer=tok,
                       extra={"weights_file": path, "quick_gelu": quick})
