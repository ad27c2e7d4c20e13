"""Adapter state: the trained tensors plus the metadata needed to rebuild the adapter.

``adapter_state_dict`` / ``load_adapter_state_dict`` work in memory; ``save_adapter`` /
``load_adapter`` write and read one safetensors file (metadata as JSON in its header). Loading
into a fresh model injects the stored adapter first; loading into an adapted one checks that it is
the same adapter. Every check runs before any tensor is written.
"""
from __future__ import annotations

import json

import torch
from torch import nn

from .bases import SharedBases
from .inject import FORMAT_VERSION, META_ATTR, adapted_layers, adapter_meta, inject, is_adapted, shared_bases
from .registry import DEFAULTS, REGISTRY, get_method
from .targets import exact_names, find_targets

META_KEY = "__adapter_meta__"  # key of the metadata entry in adapter_state_dict()
BASES_PREFIX = "__bases__."


def _err(msg: str) -> ValueError:
    return ValueError(msg)


def adapter_state_dict(model: nn.Module) -> dict:
    """Trained tensors plus metadata: ``{name: tensor, ..., '__adapter_meta__': {...}}``.

    Holds the adapter parameters of every adapted layer, every parameter of ``trainable_modules``
    (all parameters for ``"full"``), and, if ``save_bases`` was set, the random bases once.
    """
    meta = adapter_meta(model)
    out = {}
    if meta["method"] == "full":
        for k, v in model.state_dict().items():
            out[k] = v.detach().clone()
    else:
        for name, layer in adapted_layers(model):
            for pname, p in layer.update.state_dict().items():  # parameters + persistent buffers
                out[f"{name}.{pname}"] = p.detach().clone()
        for tname in meta["trainable_names"]:
            for k, v in model.get_submodule(tname).state_dict().items():
                out[f"{tname}.{k}"] = v.detach().clone()
        if meta["save_bases"] and shared_bases(model) is not None:
            for k, v in shared_bases(model)._buffers.items():
                out[BASES_PREFIX + k] = v.detach().clone()
    out[META_KEY] = jsonable(meta)
    return out


def jsonable(meta: dict) -> dict:
    return json.loads(json.dumps(meta))


COMPARED = ("method", "options", "targets", "trainable_names", "layer_options")


def stored_meta(meta: dict) -> dict:
    """``meta`` as read from a file or checkpoint, an option it predates set to what its run computed with:
    the method's ``LEGACY`` value where the default has changed since (RandLoRA's ``layout``)."""
    spec = REGISTRY.get(meta.get("method"))
    if spec is None or not spec.options.LEGACY or not isinstance(meta.get("options"), dict):
        return meta
    return {**meta, "options": spec.options.stored(meta["options"])}


def diff_meta(expected: dict, got: dict) -> list[str]:
    diffs = []
    got = stored_meta(got)
    for key in COMPARED:
        a, b = expected.get(key), got.get(key)
        if key == "options":
            # an option the file predates takes its default (its LEGACY value was filled in above)
            defaults = DEFAULTS.get(expected.get("method"), {})
            b = {**{k: defaults[k] for k in a if k not in b and k in defaults}, **b}
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"options.{k}: model has {a.get(k)!r}, file has {b.get(k)!r}")
        elif key == "targets":
            if [list(x) for x in a] != [list(x) for x in b]:
                sa, sb = {x[0]: x[2:] for x in a}, {x[0]: x[2:] for x in b}
                miss = sorted(set(sb) - set(sa))[:3]
                shape = [f"{k}: model {sa[k]} vs file {sb[k]}" for k in sb if k in sa and sa[k] != sb[k]][:3]
                diffs.append(f"targets differ (missing in model: {miss}; shape mismatches: {shape})")
        elif key == "layer_options":
            if (a or {}) != (b or {}):  # files from before per-layer options have none
                diffs.append(f"layer_options: model has {a or {}!r}, file has {b or {}!r}")
        elif a != b:
            diffs.append(f"{key}: model has {a!r}, file has {b!r}")
    return diffs


def load_adapter_state_dict(model: nn.Module, state: dict) -> nn.Module:
    """Load ``adapter_state_dict`` output into ``model``.

    A model without adapters is injected first from the stored metadata (same method, options,
    seed and targets); an adapted model must match the stored metadata exactly. Every check runs
    before any tensor is written, and a mismatch raises a ValueError naming the differing field.
    """
    if META_KEY not in state:
        raise _err("this state dict has no adapter metadata; it was not written by adapter_state_dict()")
    meta = stored_meta(state[META_KEY])
    if meta.get("format") != FORMAT_VERSION:
        raise _err(f"adapter format {meta.get('format')} is not supported (expected {FORMAT_VERSION})")
    tensors = {k: v for k, v in state.items() if k != META_KEY}
    fresh = not is_adapted(model)
    merged = [n for n, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise _err(f"the model's updates are merged into its weights ({merged[:3]}); loading new adapter tensors "
                   "now would make unmerge() subtract an update that was never added. Call unmerge(model) first, "
                   "load, then merge(model) again")
    if fresh:
        if meta["method"] != "full":
            have = {t.name: [t.out_features, t.in_features]
                    for t in find_targets(model, exact_names(x[0] for x in meta["targets"]))}
            bad = [f"{x[0]}: model {have.get(x[0])} vs file {x[2:]}" for x in meta["targets"]
                   if have.get(x[0]) != x[2:]]
            if bad:
                raise _err(f"the adapter file does not fit this model: layer shapes differ {bad[:5]}")
    else:
        diffs = diff_meta(jsonable(adapter_meta(model)), meta)
        if diffs:
            raise _err("the adapter state does not match this model's adapter: " + "; ".join(diffs))
    # expected keys and shapes, computed without touching the model when it is fresh
    expected = _expected_shapes(model, meta) if fresh else {
        k: tuple(v.shape) for k, v in adapter_state_dict(model).items() if k != META_KEY}
    base_keys = {k for k in tensors if k.startswith(BASES_PREFIX)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - base_keys)
    if missing or unexpected:
        raise _err(f"adapter state keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]} "
                   "(was it saved from another model or method?)")
    wrong = [f"{k}: expected {expected[k]}, file {tuple(tensors[k].shape)}" for k in expected
             if tuple(tensors[k].shape) != tuple(expected[k])]
    if wrong:
        raise _err(f"adapter tensor shapes differ: {wrong[:5]}")
    if fresh:
        opts = dict(meta["options"])
        inject(model, meta["method"],
               target_modules=exact_names(x[0] for x in meta["targets"]) if meta["targets"] else meta["target_modules"],
               trainable_modules=exact_names(meta["trainable_names"]) if meta["trainable_names"] else None,
               save_bases=meta["save_bases"], layer_options=meta.get("layer_options") or None, **opts)
        getattr(model, META_ATTR)["target_modules"] = meta["target_modules"]
        getattr(model, META_ATTR)["trainable_modules"] = meta["trainable_modules"]
    with torch.no_grad():
        if meta["method"] == "full":
            model.load_state_dict({k: v for k, v in tensors.items()}, strict=True)
        else:
            params = {}
            for name, layer in adapted_layers(model):
                for pname, p in layer.update.state_dict(keep_vars=True).items():
                    params[f"{name}.{pname}"] = p
            for tname in meta["trainable_names"]:
                for k, v in model.get_submodule(tname).state_dict(keep_vars=True).items():
                    params[f"{tname}.{k}"] = v
            for k, p in params.items():
                p.copy_(tensors[k].to(p.dtype))
            if base_keys and shared_bases(model) is not None:
                bases: SharedBases = shared_bases(model)
                for k in base_keys:
                    buf = bases._buffers[k[len(BASES_PREFIX):]]
                    buf.copy_(tensors[k].to(buf.dtype))
                bases.invalidate()
    return model


def _expected_shapes(model: nn.Module, meta: dict) -> dict:
    """Keys and shapes an adapter_state_dict of ``meta`` has on ``model``, without modifying it."""
    method, opts = meta["method"], meta["options"]
    if method == "full":
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = {}
    spec = get_method(method)
    typed = spec.options(**opts)
    per_layer = meta.get("layer_options") or {}
    for name, _, o, i in meta["targets"]:
        for pname, shape in spec.state_shapes(o, i, spec.for_layer(typed, per_layer.get(name))).items():
            out[f"{name}.{pname}"] = tuple(shape)
    for tname in meta["trainable_names"]:
        try:
            sub = model.get_submodule(tname)
        except AttributeError:
            raise _err(f"trainable module {tname!r} stored in the adapter file does not exist in this model") from None
        for k, v in sub.state_dict().items():
            out[f"{tname}.{k}"] = tuple(v.shape)
    return out


CHECKSUM_META = "tensor_crc32"  # safetensors metadata: {name: CRC-32 of the tensor's bytes} (files before it: none)


def tensor_crcs(tensors: dict) -> dict:
    """{name: CRC-32 (hex) of the tensor's raw bytes}: flipped bytes inside a tensor change it."""
    import zlib
    out = {}
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous().reshape(-1)
        out[k] = f"{zlib.crc32(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b''):08x}"
    return out


def save_adapter(model: nn.Module, path, tensors: dict | None = None) -> None:
    """Write ``adapter_state_dict`` to a safetensors file (metadata as JSON in the header, with a
    CRC-32 of every tensor that ``load_adapter`` verifies).

    ``tensors`` replaces the model's tensors where they were gathered elsewhere (full fine-tuning
    under FSDP: the full state dict, which every rank must help build). Written to a temporary
    file and renamed, so an interrupted save never leaves a corrupt file (nor the temporary file).
    """
    import os
    from safetensors.torch import save_file

    if tensors is None:
        state = adapter_state_dict(model)
        meta = state.pop(META_KEY)
    else:
        state, meta = dict(tensors), jsonable(adapter_meta(model))
    state = {k: v.contiguous() for k, v in state.items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(state, tmp, metadata={"adapter": json.dumps(meta), CHECKSUM_META: json.dumps(tensor_crcs(state))})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_adapter_file(path) -> dict:
    """The state dict in a file written by ``save_adapter`` (metadata under ``META_KEY``), every tensor's
    checksum verified; nothing is loaded into a model (``load_adapter_state_dict`` does that)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # truncated or not a safetensors file
        raise _err(f"cannot read adapter file {path}: {e} (truncated or not written by save_adapter?)") from None
    if "adapter" not in header:
        raise _err(f"{path} has no adapter metadata; it was not written by randlora.adapters.save_adapter")
    if CHECKSUM_META in header:  # files written before checksums existed load unverified
        saved, now = json.loads(header[CHECKSUM_META]), tensor_crcs(tensors)
        bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if bad:
            raise _err(f"adapter file {path} is corrupt: tensor {bad[0]} does not match its checksum"
                       + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") + "; it was not loaded")
    tensors[META_KEY] = json.loads(header["adapter"])
    return tensors


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Read a file written by ``save_adapter``, verify its checksums and load it (see
    ``load_adapter_state_dict``)."""
    return load_adapter_state_dict(model, read_adapter_file(path))
