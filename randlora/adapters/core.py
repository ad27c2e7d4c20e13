"""Injection, merging, counting, budgets and adapter state dicts for every method.

Everything here is pure PyTorch and works on any ``nn.Module``::

    from randlora.adapters import inject
    inject(model, "randlora", target_modules=["qkv", "fc1", "fc2"], r=6, trainable_modules=["head"])

Every check runs before the model is touched: a bad call raises ``ValueError`` and leaves the
model exactly as it was.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .bases import SharedBases
from .layers import ADAPTED_TYPES, AdaptedLinear, AdaptedParameter
from .registry import REGISTRY

METHODS = ("full", *REGISTRY)
FORMAT_VERSION = 1
BASES_ATTR = "shared_bases"    # the SharedBases submodule, registered on the first adapted layer
META_ATTR = "_adapter_meta"    # plain attribute on the root model
META_KEY = "__adapter_meta__"  # key of the metadata entry in adapter_state_dict()
BASES_PREFIX = "__bases__."

# Per-method options and defaults (see registry.py). ``alpha=None`` means: scaling 1 (alpha = r),
# except RandLoRA: the paper's vision / vision-language preset 10 / r.
DEFAULTS = {"full": {}, **{name: spec.defaults for name, spec in REGISTRY.items()}}
COMMON = ("target_modules", "trainable_modules", "save_bases")
# Options that change what an adapter computes from its tensors (the random bases aside, which are
# compared by checksum). Others (path, dropout, init, the DoRA-DR schedule ...) may differ on resume.
FUNCTION_OPTIONS = ("r", "alpha", "scale_sqrt_n", "k", "init_rank_factor")


def _err(msg: str) -> ValueError:
    return ValueError(msg)


# ----------------------------------------------------------------------------------------- targets
def _name_matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _fused_param(module: nn.Module) -> str | None:
    """Name of a fused 2-D projection parameter used directly by ``module.forward``."""
    w = getattr(module, "in_proj_weight", None)
    if isinstance(w, nn.Parameter) and w.dim() == 2:
        return "in_proj_weight"
    return None


def _adaptable(module: nn.Module, parent: nn.Module | None) -> str | None:
    """'linear' / 'param' when we can adapt this module, else None."""
    if isinstance(module, nn.Linear):
        if isinstance(parent, nn.MultiheadAttention):
            return None  # MHA reads out_proj.weight directly; wrapping its Linear would do nothing
        return "linear"
    if _fused_param(module) is not None:
        return "param"
    return None


@dataclass
class Target:
    name: str
    kind: str       # "linear" | "param"
    out_features: int
    in_features: int


def _modules_with_parents(model: nn.Module):
    parents = {}
    for name, mod in model.named_modules():
        for cname, child in mod.named_children():
            parents[f"{name}.{cname}" if name else cname] = mod
    for name, mod in model.named_modules():
        if name:
            yield name, mod, parents.get(name)


def adaptable_modules(model: nn.Module) -> list[str]:
    """Names of every module in ``model`` that ``inject`` could adapt."""
    return [n for n, m, p in _modules_with_parents(model) if _adaptable(m, p)]


def _candidates_text(model: nn.Module, limit: int = 40) -> str:
    names = adaptable_modules(model)
    suffixes = sorted({n.split(".")[-1] for n in names})
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return (f"adaptable layer names (use a suffix such as {suffixes[:12]}, or a regex over full names): "
            f"{names[:limit]}{more}")


def find_targets(model: nn.Module, target_modules) -> list[Target]:
    """Resolve ``target_modules`` to the list of layers to adapt, or raise a clear ValueError."""
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
        raise _err("target_modules is empty: name the layers to adapt (suffixes like ['q_proj', 'v_proj'] "
                   "or a regex over full names). " + _candidates_text(model))
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise _err(f"target_modules regex {target_modules!r} is invalid: {e}") from None
    elif not all(isinstance(t, str) for t in target_modules):
        raise _err(f"target_modules must be a regex string or a list of names, got {target_modules!r}")
    out, unsupported = [], []
    for name, mod, parent in _modules_with_parents(model):
        if isinstance(mod, ADAPTED_TYPES) or ".base_layer" in f".{name}":
            continue
        if not _name_matches(name, target_modules):
            continue
        kind = _adaptable(mod, parent)
        if kind is None:
            why = ("it is the out_proj of an nn.MultiheadAttention, whose forward reads the weight "
                   "directly" if isinstance(parent, nn.MultiheadAttention) and isinstance(mod, nn.Linear)
                   else f"it is a {type(mod).__name__}")
            unsupported.append(f"{name} ({why})")
            continue
        if kind == "linear":
            out.append(Target(name, kind, mod.out_features, mod.in_features))
        else:
            o, i = getattr(mod, _fused_param(mod)).shape
            out.append(Target(name, kind, o, i))
    if out:
        paths: dict[int, list[str]] = {}
        for name, mod in model.named_modules(remove_duplicate=False):
            paths.setdefault(id(mod), []).append(name)
        places = {t.name: paths[id(model.get_submodule(t.name))] for t in out}
        shared = [f"{name} (also at {[n for n in at if n != name]})" for name, at in places.items() if len(at) > 1]
        if shared:
            raise _err(f"target_modules {target_modules!r} matched modules that sit at more than one place in the "
                       f"model: {shared[:5]}. Wrapping one place would leave the others running the plain "
                       "weight; give each place its own module, or leave these out of target_modules")
    if unsupported:
        raise _err(f"target_modules {target_modules!r} matched layers that cannot be adapted: {unsupported}. "
                   "Supported: nn.Linear and modules with a fused 2-D in_proj_weight "
                   "(nn.MultiheadAttention, open_clip attention). Narrow target_modules. " + _candidates_text(model))
    if not out:
        raise _err(f"no module matched target_modules {target_modules!r}. " + _candidates_text(model))
    return out


def _trainable_names(model: nn.Module, trainable_modules) -> list[str]:
    if not trainable_modules:
        return []
    names = [n for n, _ in model.named_modules() if n and _name_matches(n, trainable_modules)]
    if not names:
        raise _err(f"no module matched trainable_modules {trainable_modules!r}; top-level modules are "
                   f"{[n for n, _ in model.named_children()]}")
    return names


# ------------------------------------------------------------------------------------------ options
def resolve_options(method: str, options: dict) -> dict:
    """Fill defaults and validate option names and values (shape-independent checks)."""
    if method not in METHODS:
        raise _err(f"unknown adapter method {method!r}; choose one of {list(METHODS)}")
    allowed = set(DEFAULTS[method]) | set(COMMON)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise _err(f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(allowed)}")
    opts = {**DEFAULTS[method], **{k: v for k, v in options.items() if k in DEFAULTS[method]}}
    if method == "full":
        return opts
    r = opts["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise _err(f"r must be a positive integer, got {r!r}")
    if opts["alpha"] is not None and not (isinstance(opts["alpha"], (int, float)) and opts["alpha"] > 0):
        raise _err(f"alpha must be a positive number (scaling = alpha / r), got {opts['alpha']!r}")
    spec = REGISTRY[method]
    if opts["alpha"] is None:
        opts["alpha"] = spec.default_alpha(opts)
    if not (0.0 <= float(opts["dropout"]) < 1.0):
        raise _err(f"dropout must be in [0, 1), got {opts['dropout']!r}")
    if "seed" in opts and (isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int)):
        raise _err(f"seed must be an integer, got {opts['seed']!r}")
    if spec.validate is not None:
        spec.validate(opts)
    return opts


def _check_rank(method: str, opts: dict, targets: list[Target]) -> None:
    if REGISTRY[method].rank_limited:
        limit = min(min(t.out_features, t.in_features) for t in targets)
        if opts["r"] > limit:
            small = [t.name for t in targets if min(t.out_features, t.in_features) == limit][:3]
            raise _err(f"r={opts['r']} is larger than the smallest adapted layer allows "
                       f"(min(out, in) = {limit} for {small}); use r <= {limit}")


def _per_layer_count(method: str, t: Target, opts: dict) -> int:
    return REGISTRY[method].num_trainable(t.out_features, t.in_features, opts)


# ------------------------------------------------------------------------------------------- inject
def is_adapted(model: nn.Module) -> bool:
    return hasattr(model, META_ATTR)


# Modules that distributed wrappers insert between a module and its children (FSDP's units,
# activation checkpointing). They forward attribute lookups to the wrapped module, so
# ``get_submodule`` of a clean name still works on a wrapped model; only the names they add to
# ``named_modules`` must be dropped, so that adapter files and checkpoints written from a sharded
# model carry the same keys as those written from a plain one.
WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_name(name: str) -> str:
    """``name`` without the path components that FSDP / activation-checkpoint wrappers insert."""
    if "_wrapped_module" not in name:
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def adapted_layers(model: nn.Module):
    """(name, wrapper) for every adapted layer, in module order; names as in the unwrapped model."""
    return [(clean_name(n), m) for n, m in model.named_modules() if isinstance(m, ADAPTED_TYPES)]


def compute_paths(model: nn.Module) -> dict[str, int]:
    """How many adapted layers ran each compute path on their last call, for methods that choose one
    per call (RandLoRA: ``factorised`` / ``merged``; ``materialised`` is a fused-parameter call that
    built dW in full; ``not run`` a layer not called yet; ``weights merged`` a layer whose update is
    merged into W0 now, so it runs the base layer alone). Empty for other methods."""
    counts: dict[str, int] = {}
    for _, layer in adapted_layers(model):
        if hasattr(layer.update, "last_path"):
            p = "weights merged" if layer.merged else (layer.update.last_path or "not run")
            counts[p] = counts.get(p, 0) + 1
    return dict(sorted(counts.items()))


def format_paths(counts: dict[str, int]) -> str:
    """``{'factorised': 48, 'merged': 24}`` -> ``'factorised x48, merged x24'``."""
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, method: str, *, target_modules=None, trainable_modules=None,
           save_bases: bool = False, **options) -> nn.Module:
    """Adapt ``model`` in place with ``method`` and return it.

    ``target_modules``: list of names matched as module-name suffixes, or a regex string matched
    against full module names. ``trainable_modules``: modules kept fully trainable (a head).
    ``save_bases``: store the random bases once in ``adapter_state_dict`` (default: regenerated
    from the seed). Method options: see ``DEFAULTS``. After the call exactly the adapter
    parameters and ``trainable_modules`` require grad (everything for ``"full"``).
    """
    if is_adapted(model):
        raise _err(f"this model already carries a {getattr(model, META_ATTR)['method']!r} adapter; "
                   "build a fresh model (or merge and reload it) before injecting again")
    opts = resolve_options(method, options)
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = [str(t) for t in target_modules]  # lists from YAML configs become plain lists
    if trainable_modules is not None and not isinstance(trainable_modules, str):
        trainable_modules = [str(t) for t in trainable_modules]
    train_names = _trainable_names(model, trainable_modules)
    meta = {"format": FORMAT_VERSION, "method": method, "options": opts,
            "target_modules": target_modules, "trainable_modules": trainable_modules,
            "trainable_names": train_names, "save_bases": bool(save_bases), "targets": []}
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        setattr(model, META_ATTR, meta)
        return model

    targets = find_targets(model, target_modules)
    overlap = [t.name for t in targets if any(t.name == n or t.name.startswith(n + ".") for n in train_names)]
    if overlap:
        raise _err(f"layers {overlap[:5]} are both adapter targets and trainable_modules; "
                   "a layer is either adapted or fully trained, not both")
    _check_rank(method, opts, targets)
    fused = [t.name for t in targets if t.kind == "param"]
    if float(opts["dropout"]) > 0 and fused:
        raise _err(f"dropout={opts['dropout']} is not supported on fused-parameter targets {fused[:5]} "
                   "(their input is not a separate tensor); set dropout=0 or target Linear layers instead")
    shapes = [(t.out_features, t.in_features) for t in targets]
    spec = REGISTRY[method]
    bases = spec.make_bases(shapes, opts) if spec.make_bases else None
    if bases is not None and "sparsity" in bases.spec:
        opts["sparsity"] = bases.spec["sparsity"]

    # ---- from here on the model is modified; everything above validated the request
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        mod = model.get_submodule(t.name)
        ref = mod.weight if t.kind == "linear" else getattr(mod, _fused_param(mod))
        upd = spec.build(t.out_features, t.in_features, opts, bases, ref)
        # adapter parameters are float32 master weights (float64 on a float64 model, for exact tests)
        upd.to(device=ref.device, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
        if t.kind == "linear":
            wrapper = AdaptedLinear(mod, upd, float(opts["dropout"]))
        else:
            wrapper = AdaptedParameter(mod, _fused_param(mod), upd, float(opts["dropout"]))
        _set_module(model, t.name, wrapper)
        meta["targets"].append([t.name, t.kind, t.out_features, t.in_features])
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


# ----------------------------------------------------------------------------------------- counting
def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_total(model: nn.Module) -> int:
    """Number of parameters of the model (frozen and trainable; bases are buffers, not counted)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def parameter_table(model: nn.Module) -> list[dict]:
    """One row per adapted layer: name, shape, trainable count, LoRA-equivalent rank."""
    meta = getattr(model, META_ATTR, None)
    rows = []
    for name, layer in adapted_layers(model):
        n_train = sum(p.numel() for p in layer.update.parameters() if p.requires_grad)
        o, i = layer.out_features, layer.in_features
        rows.append({"layer": name, "method": meta["method"] if meta else None, "out": o, "in": i,
                     "trainable": n_train, "lora_equivalent_rank": n_train / (o + i)})
    return rows


def format_parameter_table(model: nn.Module) -> str:
    rows = parameter_table(model)
    w = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"{'layer':<{w}}  {'shape':>13}  {'trainable':>10}  {'LoRA-eq r':>9}"]
    for r in rows:
        lines.append(f"{r['layer']:<{w}}  {str((r['out'], r['in'])):>13}  {r['trainable']:>10,}  "
                     f"{r['lora_equivalent_rank']:>9.2f}")
    lines.append(f"{'total':<{w}}  {'':>13}  {sum(r['trainable'] for r in rows):>10,}  "
                 f"{lora_equivalent_rank(model):>9.2f}")
    return "\n".join(lines)


def lora_equivalent_rank(model: nn.Module) -> float:
    """The LoRA rank with the same number of adapter parameters on the same layers."""
    rows = parameter_table(model)
    denom = sum(r["out"] + r["in"] for r in rows)
    return sum(r["trainable"] for r in rows) / denom if denom else float("nan")


def match_budget(model: nn.Module, method: str, budget: float, **options) -> dict:
    """Options (the rank ``r``) whose adapter-parameter count on this model is closest to ``budget``.

    The count covers the adapter parameters of ``target_modules`` (``trainable_modules`` such as a
    head are the same for every method and are not part of the budget). Returns the options to pass
    to ``inject`` plus ``expected_trainable``. The model is not modified.
    """
    if method == "full":
        raise _err("method 'full' trains every parameter and has no rank to match a budget; "
                   "drop adapter.budget for full fine-tuning")
    if method not in METHODS:
        raise _err(f"unknown adapter method {method!r}; choose one of {list(METHODS)}")
    if not (isinstance(budget, (int, float)) and budget > 0 and math.isfinite(budget)):
        raise _err(f"budget must be a positive number of parameters, got {budget!r}")
    spec = REGISTRY[method]
    knob = spec.knob
    options = {k: v for k, v in options.items() if k != knob}
    base_opts = resolve_options(method, {**{k: v for k, v in options.items() if k not in COMMON}, knob: 1})
    targets = find_targets(model, options.get("target_modules"))
    limit = min(min(t.out_features, t.in_features) for t in targets)
    ranks = spec.knob_range(limit)

    def count(r):
        return sum(_per_layer_count(method, t, {**base_opts, knob: r}) for t in targets)

    counts = {r: count(r) for r in ranks}
    lo, hi = min(counts.values()), max(counts.values())
    if budget < lo * 0.5:
        raise _err(f"budget {budget:,.0f} is below the smallest {method} adapter on these targets "
                   f"({lo:,} parameters); raise the budget or target fewer layers")
    if budget > hi * 2:
        raise _err(f"budget {budget:,.0f} is above the largest {method} adapter on these targets "
                   f"({hi:,} parameters); lower the budget or target more layers")
    best = min(counts, key=lambda r: (abs(counts[r] - budget), r))
    return {**options, knob: best, "expected_trainable": counts[best]}


# --------------------------------------------------------------------------------------- state dict
def shared_bases(model: nn.Module) -> SharedBases | None:
    """The frozen random bases of a VeRA / RandLoRA model (None for other methods)."""
    for _, layer in adapted_layers(model):
        b = getattr(layer.update, "bases", None)
        if b is not None:
            return b
    return None


def adapter_meta(model: nn.Module) -> dict:
    if not is_adapted(model):
        raise _err("this model has no adapter; call randlora.adapters.inject(model, method, ...) first")
    return getattr(model, META_ATTR)


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
    out[META_KEY] = _jsonable(meta)
    return out


def _jsonable(meta: dict) -> dict:
    import json
    return json.loads(json.dumps(meta))


_COMPARED = ("method", "options", "targets", "trainable_names")


def _diff_meta(expected: dict, got: dict) -> list[str]:
    diffs = []
    for key in _COMPARED:
        a, b = expected.get(key), got.get(key)
        if key == "options":
            # an option the file predates takes its default (what the file's run used)
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
    meta = state[META_KEY]
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
                    for t in find_targets(model, _exact_names(x[0] for x in meta["targets"]))}
            bad = [f"{x[0]}: model {have.get(x[0])} vs file {x[2:]}" for x in meta["targets"]
                   if have.get(x[0]) != x[2:]]
            if bad:
                raise _err(f"the adapter file does not fit this model: layer shapes differ {bad[:5]}")
    else:
        diffs = _diff_meta(_jsonable(adapter_meta(model)), meta)
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
               target_modules=_exact_names(x[0] for x in meta["targets"]) if meta["targets"] else meta["target_modules"],
               trainable_modules=_exact_names(meta["trainable_names"]) if meta["trainable_names"] else None,
               save_bases=meta["save_bases"], **opts)
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


def _exact_names(names) -> str:
    """A regex matching exactly these full module names (a list would match them as suffixes too:
    a stored ``fc`` would also pick up ``sub.fc``)."""
    return "|".join(re.escape(n) for n in names)


def _expected_shapes(model: nn.Module, meta: dict) -> dict:
    """Keys and shapes an adapter_state_dict of ``meta`` has on ``model``, without modifying it."""
    method, opts = meta["method"], meta["options"]
    if method == "full":
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = {}
    spec = REGISTRY[method]
    for name, _, o, i in meta["targets"]:
        shapes = {**spec.param_shapes(o, i, opts), **(spec.buffer_shapes(o, i, opts) if spec.buffer_shapes else {})}
        for pname, shape in shapes.items():
            out[f"{name}.{pname}"] = tuple(shape)
    for tname in meta["trainable_names"]:
        try:
            sub = model.get_submodule(tname)
        except AttributeError:
            raise _err(f"trainable module {tname!r} stored in the adapter file does not exist in this model") from None
        for k, v in sub.state_dict().items():
            out[f"{tname}.{k}"] = tuple(v.shape)
    return out


def save_adapter(model: nn.Module, path, tensors: dict | None = None) -> None:
    """Write ``adapter_state_dict`` to a safetensors file (metadata as JSON in the header).

    ``tensors`` replaces the model's tensors where they were gathered elsewhere (full fine-tuning
    under FSDP: the full state dict, which every rank must help build). Written to a temporary
    file and renamed, so an interrupted save never leaves a corrupt file.
    """
    import json
    import os
    from safetensors.torch import save_file

    if tensors is None:
        state = adapter_state_dict(model)
        meta = state.pop(META_KEY)
    else:
        state, meta = dict(tensors), _jsonable(adapter_meta(model))
    state = {k: v.contiguous() for k, v in state.items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(state, tmp, metadata={"adapter": json.dumps(meta), CHECKSUM_META: json.dumps(tensor_crcs(state))})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


CHECKSUM_META = "tensor_crc32"  # safetensors metadata: {name: CRC-32 of the tensor's bytes} (files before it: none)


def tensor_crcs(tensors: dict) -> dict:
    """{name: CRC-32 (hex) of the tensor's raw bytes}: flipped bytes inside a tensor change it."""
    import zlib
    out = {}
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous().reshape(-1)
        out[k] = f"{zlib.crc32(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b''):08x}"
    return out


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Read a file written by ``save_adapter`` and load it (see ``load_adapter_state_dict``)."""
    import json
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
    return load_adapter_state_dict(model, tensors)
