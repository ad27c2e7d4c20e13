"""Putting an adapter into a model, folding it into the weights and back, and looking at it.

    from randlora.adapters import inject
    inject(model, "randlora", target_modules=["qkv", "fc1", "fc2"], r=6, trainable_modules=["head"])

Every check runs before the model is touched: a bad call raises ``ValueError`` and leaves the
model exactly as it was.
"""
from __future__ import annotations

import torch
from torch import nn

from .bases import SharedBases
from .layers import ADAPTED_TYPES, AdaptedLinear, AdaptedParameter
from .registry import get_method, resolve_options
from .targets import Target, clean_name, find_targets, fused_param, trainable_names

FORMAT_VERSION = 1
BASES_ATTR = "shared_bases"    # the SharedBases submodule, registered on the first adapted layer
META_ATTR = "_adapter_meta"    # plain attribute on the root model


def _err(msg: str) -> ValueError:
    return ValueError(msg)


def is_adapted(model: nn.Module) -> bool:
    return hasattr(model, META_ATTR)


def adapter_meta(model: nn.Module) -> dict:
    """What ``inject`` recorded: format, method, resolved options, targets [(name, kind, out, in)],
    trainable module names, bases spec. Stored in adapter files and checkpoints."""
    if not is_adapted(model):
        raise _err("this model has no adapter; call randlora.adapters.inject(model, method, ...) first")
    return getattr(model, META_ATTR)


def adapted_layers(model: nn.Module):
    """(name, wrapper) for every adapted layer, in module order; names as in the unwrapped model."""
    return [(clean_name(n), m) for n, m in model.named_modules() if isinstance(m, ADAPTED_TYPES)]


def shared_bases(model: nn.Module) -> SharedBases | None:
    """The frozen random bases of a VeRA / RandLoRA / NoLA model (None for other methods)."""
    for _, layer in adapted_layers(model):
        b = getattr(layer.update, "bases", None)
        if b is not None:
            return b
    return None


def bases_checksum(model: nn.Module) -> str | None:
    """16 hex digits of SHA-256 over the shared random bases (None without bases): equal exactly when two
    models hold the same bases (same seed, distribution, shapes and storage dtype)."""
    import hashlib
    b = shared_bases(model)
    if b is None:
        return None
    h = hashlib.sha256()
    for name in sorted(b._buffers):
        h.update(b._buffers[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def compute_paths(model: nn.Module) -> dict[str, int]:
    """How many adapted layers ran each compute path on their last call, for methods that choose one
    per call (RandLoRA: ``factorised`` / ``merged``; ``materialised`` is a fused-parameter call that
    built dW in full; ``not run`` a layer not called yet; ``weights merged`` a layer whose update is
    merged into W0 now, so it runs the base layer alone). Empty for other methods."""
    counts: dict[str, int] = {}
    for _, layer in adapted_layers(model):
        if layer.update.chooses_path:
            p = "weights merged" if layer.merged else (layer.update.last_path or "not run")
            counts[p] = counts.get(p, 0) + 1
    return dict(sorted(counts.items()))


def format_paths(counts: dict[str, int]) -> str:
    """``{'factorised': 48, 'merged': 24}`` -> ``'factorised x48, merged x24'``."""
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def check_rank(method: str, opts: dict, targets: list[Target], layer_options: dict | None = None) -> None:
    """Refuse an r above min(out, in) of some target, for methods whose rank is bounded by it."""
    if not get_method(method).rank_limited:
        return
    layer_options = layer_options or {}
    if not any("r" in v for v in layer_options.values()):
        limit = min(min(t.out_features, t.in_features) for t in targets)
        if opts["r"] > limit:
            small = [t.name for t in targets if min(t.out_features, t.in_features) == limit][:3]
            raise _err(f"r={opts['r']} is larger than the smallest adapted layer allows "
                       f"(min(out, in) = {limit} for {small}); use r <= {limit}")
        return
    for t in targets:
        r = layer_options.get(t.name, {}).get("r", opts["r"])
        if r > min(t.out_features, t.in_features):
            raise _err(f"r={r} for layer {t.name} is larger than min(out, in) = "
                       f"{min(t.out_features, t.in_features)}; use r <= {min(t.out_features, t.in_features)}")


def _check_layer_options(method: str, layer_options, targets: list[Target]) -> dict:
    """``layer_options`` as {target name: {option: value}}, every name a target, every option one
    the method allows per layer, every value valid."""
    if not layer_options:
        return {}
    if not isinstance(layer_options, dict) or not all(isinstance(v, dict) for v in layer_options.values()):
        raise _err(f"layer_options must map full module names to option dicts, e.g. {{'blocks.0.fc1': {{'r': 4}}}}; "
                   f"got {layer_options!r}")
    names = {t.name for t in targets}
    unknown = sorted(set(layer_options) - names)
    if unknown:
        raise _err(f"layer_options names {unknown[:5]} that are not adapted layers; adapted: {sorted(names)[:10]}"
                   + (" ..." if len(names) > 10 else ""))
    return {name: dict(v) for name, v in layer_options.items() if v}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, method: str, *, target_modules=None, trainable_modules=None,
           save_bases: bool = False, layer_options: dict | None = None, **options) -> nn.Module:
    """Adapt ``model`` in place with ``method`` and return it.

    ``target_modules``: list of names matched as module-name suffixes, or a regex string matched
    against full module names. ``trainable_modules``: modules kept fully trainable (a head).
    ``save_bases``: store the random bases once in ``adapter_state_dict`` (default: regenerated
    from the seed). ``layer_options``: {full module name: {option: value}} for the options the method
    lets a layer set for itself (``Method.per_layer``: the rank ``r`` and ``alpha`` for LoRA, DoRA and
    RandLoRA; the scaling of such a layer is alpha / its own r, as in PEFT's ``rank_pattern``).
    Method options: the method's options class (``registry.REGISTRY[method].options``).
    After the call exactly the adapter parameters and ``trainable_modules`` require grad
    (everything for ``"full"``).
    """
    if is_adapted(model):
        raise _err(f"this model already carries a {getattr(model, META_ATTR)['method']!r} adapter; "
                   "build a fresh model (or merge and reload it) before injecting again")
    opts = resolve_options(method, options)
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = [str(t) for t in target_modules]  # lists from YAML configs become plain lists
    if trainable_modules is not None and not isinstance(trainable_modules, str):
        trainable_modules = [str(t) for t in trainable_modules]
    train_names = trainable_names(model, trainable_modules)
    meta = {"format": FORMAT_VERSION, "method": method, "options": opts,
            "target_modules": target_modules, "trainable_modules": trainable_modules,
            "trainable_names": train_names, "save_bases": bool(save_bases), "targets": [], "layer_options": {}}
    if method == "full":
        if layer_options:
            raise _err("layer_options has no meaning for full fine-tuning (every parameter trains); drop it")
        for p in model.parameters():
            p.requires_grad_(True)
        setattr(model, META_ATTR, meta)
        return model

    targets = find_targets(model, target_modules)
    overlap = [t.name for t in targets if any(t.name == n or t.name.startswith(n + ".") for n in train_names)]
    if overlap:
        raise _err(f"layers {overlap[:5]} are both adapter targets and trainable_modules; "
                   "a layer is either adapted or fully trained, not both")
    spec = get_method(method)
    typed = spec.options(**opts)
    per_layer = _check_layer_options(method, layer_options, targets)
    layer_opts = {t.name: spec.for_layer(typed, per_layer.get(t.name)) for t in targets}
    check_rank(method, opts, targets, per_layer)
    fused = [t.name for t in targets if t.kind == "param"]
    if float(opts["dropout"]) > 0 and fused:
        raise _err(f"dropout={opts['dropout']} is not supported on fused-parameter targets {fused[:5]} "
                   "(their input is not a separate tensor); set dropout=0 or target Linear layers instead")
    layers = [(t.out_features, t.in_features, layer_opts[t.name]) for t in targets]
    bases = spec.make_bases(layers, typed) if spec.make_bases else None
    if bases is not None and "sparsity" in bases.spec:
        opts["sparsity"] = bases.spec["sparsity"]  # the default sparsity made explicit in the record

    # ---- from here on the model is modified; everything above validated the request
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        mod = model.get_submodule(t.name)
        ref = mod.weight if t.kind == "linear" else getattr(mod, fused_param(mod))
        upd = spec.update.build(t.out_features, t.in_features, layer_opts[t.name], bases, ref)
        # adapter parameters are float32 master weights (float64 on a float64 model, for exact tests)
        upd.to(device=ref.device, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
        if t.kind == "linear":
            wrapper = AdaptedLinear(mod, upd, float(opts["dropout"]))
        else:
            wrapper = AdaptedParameter(mod, fused_param(mod), upd, float(opts["dropout"]))
        _set_module(model, t.name, wrapper)
        meta["targets"].append([t.name, t.kind, t.out_features, t.in_features])
    meta["layer_options"] = per_layer
    if bases is not None:
        # Registered once, on the first adapted layer (never on the root: a root nn.Sequential would
        # run it as a layer), so model.to(device) moves it; the other layers hold plain references.
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        first = adapted_layers(model)[0][1]
        first.add_module(BASES_ATTR, bases.to(device))
        meta["bases"] = bases.spec
    for name in train_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    _disable_fused_inference(model)
    setattr(model, META_ATTR, meta)
    return model


def _disable_fused_inference(model: nn.Module) -> None:
    """Turn off torch's inference fast path where it would bypass an adapted layer.

    ``nn.TransformerEncoderLayer`` in eval mode, when none of the weights it checks requires grad, reads
    ``self_attn.in_proj_weight``, ``linear1.weight`` ... as attributes and runs one fused kernel,
    without calling the submodules. Through a wrapper those reads give W0, so the update would
    vanish from every evaluation while training looked right. ``activation_relu_or_gelu`` is the
    flag only that fast path reads (the regular path calls ``self.activation``), so clearing it
    sends the layer down the regular path, which calls the wrapped modules; the encoder's
    nested-tensor conversion, which only that fast path consumes, is turned off with it."""
    for m in model.modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) and \
                any(isinstance(c, ADAPTED_TYPES) for c in m.modules()):
            if isinstance(m, nn.TransformerEncoderLayer):
                m.activation_relu_or_gelu = 0
            else:
                m.use_nested_tensor = False


def merge(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight (outputs unchanged, adapter branch skipped).

    Refused, before any weight is written, where an adapted weight is also used elsewhere (a tied
    embedding / output head): merging in place would change the other use too."""
    layers = adapted_layers(model)
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(clean_name(n))
    tied = [f"{name} (also {[n for n in names[id(layer._base_weight())] if '.base_layer.' not in f'.{n}'][:3]})"
            for name, layer in layers if not layer.merged and len(names.get(id(layer._base_weight()), ())) > 1]
    if tied:
        raise _err(f"cannot merge: the adapted weights of {tied[:5]} are tied to other parameters, and merging "
                   "in place would change those too; evaluate unmerged (the same outputs), or untie the weights "
                   "before injecting")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract the folded updates again (inverse of ``merge``). On weights stored in 16 bits this
    restores W0 to within one rounding of ``W0 + dW`` per entry, not bit for bit."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge_first: bool = True) -> nn.Module:
    """Take the adapter out of ``model`` in place: every adapted layer's own module goes back to its place and
    the adapter record is dropped, so ``model`` is a plain model of its library again (its state dict has the
    library's keys). ``merge_first`` (default) folds each update into its weight first, so the outputs stay
    the same; ``merge_first=False`` puts the base layers back as they are (a merged layer is unmerged first).
    Trained ``trainable_modules`` (a head) keep their trained weights. A full fine-tune only loses its record."""
    meta = adapter_meta(model)
    if meta["method"] != "full":
        (merge if merge_first else unmerge)(model)  # merge refuses tied weights before anything is written
        for name, layer in adapted_layers(model):
            _set_module(model, name, layer.base_layer)
    delattr(model, META_ATTR)
    return model
