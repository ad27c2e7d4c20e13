"""Model builders: a backbone plus what the rest of the framework needs to know about it.

``build_model(cfg)`` dispatches on ``cfg.family`` (``timm``, ``open_clip``, ``hf_causal_lm``) and
returns a :class:`ModelBundle`. Weights come from a hub tag / id or a local file. A model config
states what its weights were trained as (activation, image size, normalisation statistics, context
length, model type); the builders build exactly that on every route (tests/test_model_fidelity.py
checks each shipped config against the libraries' published metadata).

``source_problems(cfg, hub)`` lists, before anything is downloaded, the sources of a model config
that cannot be read (a missing or unreadable local file, a hub source absent from the local cache
while the hub is unreachable); ``randlora.training.preflight.check_sources`` reports them together with the
data's. A load that fails anyway raises :class:`SourceUnavailableError` naming what is really wrong
(offline, not a weights file, weights of another architecture).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import SourceUnavailableError, short_error  # noqa: F401  (re-exported: the loaders' error)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


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


def is_local_path(source) -> bool:
    """Whether a ``pretrained`` value names a local file or folder rather than a tag or a hub id
    (``org/name``): it exists, is absolute or explicitly relative, has a weights suffix or more than
    one path separator."""
    s = str(source)
    if s.startswith(("http://", "https://")):
        return False
    return os.path.exists(os.path.expanduser(s)) or s.startswith(("/", "~", ".")) or s.endswith(WEIGHT_SUFFIXES) \
        or s.count("/") >= 2


def sniff_weights_file(path, what: str, sha256=None) -> None:
    """Refuse, in one line, a local weights path that does not exist, is a folder or is not a weights
    file (safetensors, or a PyTorch zip / pickle file), and one whose SHA-256 is not ``sha256`` (the model
    config's ``sha256``, when it pins the file); cheap: only the file's header is read, and the file is
    hashed only when a sum is pinned."""
    p = os.path.expanduser(str(path))
    if not os.path.exists(p):
        raise SourceUnavailableError(f"{what}: local file {p!r} does not exist; pass model.pretrained=<an existing "
                                     "weights file> (.safetensors / .bin / .pt)")
    if os.path.isdir(p):
        raise SourceUnavailableError(f"{what}: {p!r} is a folder; pass model.pretrained=<the weights file inside it> "
                                     "(.safetensors / .bin / .pt)")
    problem = _weights_file_problem(p)
    if problem:
        raise SourceUnavailableError(f"{what}: {p!r} is not a weights file ({problem}); pass model.pretrained=<a "
                                     "state dict saved with safetensors.torch.save_file or torch.save>")
    problem = checksum_problem(p, sha256)
    if problem:
        raise SourceUnavailableError(f"{what}: {problem}")


def file_sha256(path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_problem(path: str, sha256) -> str | None:
    """Why ``path`` does not match the sums ``sha256`` ({file name: hex digest}, a model config's
    ``model.sha256``) pins; None if it does or nothing is pinned. A folder must hold every file named; a
    single file is checked when its name is pinned (another file, e.g. a run's merged export loaded with
    the same model config, is not the pinned asset)."""
    if not sha256:
        return None
    pins = dict(sha256)
    if os.path.isdir(path):
        pairs = [(os.path.join(path, name), want) for name, want in pins.items()]
    elif os.path.basename(path) in pins:
        pairs = [(path, pins[os.path.basename(path)])]
    else:
        return None
    for f, want in pairs:
        if not os.path.isfile(f):
            return f"{path!r} has no {os.path.basename(f)} (its SHA-256 is recorded in the model config)"
        got = file_sha256(f)
        if got != str(want).lower():
            return (f"{f!r} has SHA-256 {got[:16]}..., not the {str(want)[:16]}... the model config records: the file "
                    "is damaged or was replaced; restore it (git checkout -- <file>), or, if it was remade on purpose "
                    "or is another model's, record its sum in model.sha256 (model.sha256=null checks nothing)")
    return None


def weights_file_problems(path, what: str, sha256=None) -> list[str]:
    """``sniff_weights_file``'s refusal as a preflight problem list ([] for a readable weights file)."""
    try:
        sniff_weights_file(path, what, sha256)
    except SourceUnavailableError as e:
        return [str(e)]
    return []


def _weights_file_problem(path: str) -> str | None:
    import zipfile
    if path.endswith(".safetensors"):
        try:
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                if not list(f.keys()):
                    return "a safetensors file with no tensors"
        except Exception as e:  # noqa: BLE001 - any header error: not a safetensors file
            return f"unreadable as safetensors: {short_error(e, 120)}"
        return None
    if zipfile.is_zipfile(path):
        return None  # torch.save's format (and TorchScript archives)
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return None  # a legacy pickle-based torch.save file
    return "neither safetensors nor a torch.save zip / pickle file"


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
    architecture itself is only available from a hub (a transformers model by id, not cached while
    the hub is unreachable)."""
    import torch
    try:
        with torch.device("meta"):
            if cfg.family == "timm":
                import timm
                return timm.create_model(cfg.arch, pretrained=False, num_classes=0, **dict(cfg.get("kwargs") or {}))
            if cfg.family == "open_clip":
                from .clip import create_architecture
                return create_architecture(cfg, device="meta")
            if cfg.family == "hf_causal_lm":
                from transformers import AutoConfig, AutoModelForCausalLM
                if cfg.get("tiny"):
                    t = dict(cfg.tiny)
                    config = AutoConfig.for_model(t.pop("model_type", "llama"), **t)
                else:
                    from ..hub import hub_status
                    local = is_local_path(cfg.pretrained)
                    config = AutoConfig.from_pretrained(os.path.expanduser(str(cfg.pretrained)),
                                                        local_files_only=local or not hub_status().online)
                return AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    return None


def source_problems(cfg, hub) -> list[str]:
    """The sources of model config ``cfg`` (weights, tokenizer) that cannot be read, one line each
    with its fix: a local path that does not exist or is not a weights file / model folder, or a hub
    source that is not in the local cache while ``hub`` (``randlora.sources.hub_status()``) is offline."""
    family = cfg.get("family")
    if family == "open_clip":
        from .clip import source_problems as problems
    elif family == "timm":
        from .vit import source_problems as problems
    elif family == "hf_causal_lm":
        from .llama import source_problems as problems
    else:
        return []
    return problems(cfg, hub)
