"""Which layers of a model an adapter goes into.

``target_modules`` is a list of module-name suffixes (``["qkv", "fc1"]``: every module whose name is
``qkv`` or ends in ``.qkv``) or a regex over full module names. Supported targets: ``nn.Linear`` and
modules whose forward reads a fused 2-D ``in_proj_weight`` (``nn.MultiheadAttention``). Every problem
is a ``ValueError`` that lists what in this model could be adapted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .layers import ADAPTED_TYPES


def _err(msg: str) -> ValueError:
    return ValueError(msg)


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


def _name_matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def fused_param(module: nn.Module) -> str | None:
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
    if fused_param(module) is not None:
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
            o, i = getattr(mod, fused_param(mod)).shape
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


def trainable_names(model: nn.Module, trainable_modules) -> list[str]:
    if not trainable_modules:
        return []
    names = [n for n, _ in model.named_modules() if n and _name_matches(n, trainable_modules)]
    if not names:
        raise _err(f"no module matched trainable_modules {trainable_modules!r}; top-level modules are "
                   f"{[n for n, _ in model.named_children()]}")
    return names


def exact_names(names) -> str:
    """A regex matching exactly these full module names (a list would match them as suffixes too:
    a stored ``fc`` would also pick up ``sub.fc``)."""
    return "|".join(re.escape(n) for n in names)
