"""``torch.compile`` for adapted models, by region.

At ViT-B / CLIP sizes a bf16 training step on a fast GPU is bound by the host issuing kernels, not
by arithmetic (benchmarks/RESULTS.md, sections 1 and 5): every small operator an adapter adds
costs its launch. Compiling fuses those operators (casts, scalings, the adapter's elementwise work
around its GEMMs) and removes the Python time between them.

Two scopes:

* ``blocks`` (default): compile each block of the model's innermost block stacks (the children of
  every ``nn.ModuleList`` / ``nn.Sequential`` whose children are blocks of one class: timm's
  ``blocks``, open_clip's ``resblocks`` in both towers, LLaMA's ``layers``). Blocks of one class
  share one compiled graph, so compile time does not grow with depth, and every entry point of the
  model (CLIP's ``encode_image`` / ``encode_text``, ``generate``) runs compiled blocks.
* ``model``: compile the whole module's ``forward``. Only entry points that go through ``forward``
  are compiled (not CLIP's ``encode_*``).

Compilation is in place (``nn.Module.compile``): parameter names, state dicts, adapter files and
checkpoints are the same as without it. The adapters need nothing special: the shared bases' caches
step aside while tracing, and every method traces to one graph per block (tests/test_compile.py).
"""
from __future__ import annotations

from torch import nn

SCOPES = ("blocks", "model")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Recompilations happen per block class for train vs eval (dropout), merged vs unmerged weights and
# new input shapes; a benchmark process compiles several adapter variants of one block class. The
# default limit (8 per code object) would silently fall back to eager there.
RECOMPILE_LIMIT = 64
# registered backends whose package is imported only at the first compiled call
_BACKEND_PACKAGES = {"tvm": "tvm", "openxla": "torch_xla", "openxla_eval": "torch_xla", "tensorrt": "torch_tensorrt",
                     "torch_tensorrt": "torch_tensorrt", "onnxrt": "onnxruntime", "ipex": "intel_extension_for_pytorch"}


def normalise_options(opts) -> dict | None:
    """A ``compile`` config value -> None (off) or a dict of checked options.

    Accepts ``False``/``None`` (off), ``True`` (defaults) or a mapping with ``enabled``, ``scope``,
    ``mode``, ``backend``, ``fullgraph`` and ``dynamic``. Raises ``ValueError`` naming the bad field.
    """
    if opts is None or opts is False:
        return None
    if opts is True:
        opts = {}
    if not isinstance(opts, dict):
        raise ValueError(f"compile={opts!r} must be true, false or a mapping (compile.enabled=true)")
    known = {"enabled", "scope", "mode", "backend", "fullgraph", "dynamic"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"compile.{unknown[0]} is not an option; choose from {sorted(known)}")
    enabled = opts.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"compile.enabled={enabled!r} must be true or false")
    if not enabled:
        return None
    scope = opts.get("scope") or "blocks"
    if scope not in SCOPES:
        raise ValueError(f"compile.scope={scope!r} is unknown; choose one of {list(SCOPES)}")
    mode = opts.get("mode")
    if mode is not None and mode not in MODES:
        raise ValueError(f"compile.mode={mode!r} is unknown; choose one of {list(MODES)} or null")
    backend = opts.get("backend") or "inductor"
    if not isinstance(backend, str):
        raise ValueError(f"compile.backend={backend!r} must be a backend name (e.g. inductor)")
    import torch._dynamo
    backends = set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor"}
    if backend not in backends:
        raise ValueError(f"compile.backend={backend!r} is not registered; choose one of {sorted(backends)}")
    need = _BACKEND_PACKAGES.get(backend)
    if need is not None:
        import importlib.util
        if importlib.util.find_spec(need) is None:
            raise ValueError(f"compile.backend={backend!r} needs the package {need!r}, which is not installed; "
                             "use compile.backend=inductor")
    if mode is not None and backend != "inductor":
        raise ValueError(f"compile.mode={mode!r} applies to the inductor backend only (compile.backend={backend!r}); "
                         "set compile.mode=null")
    fullgraph = opts.get("fullgraph", False)
    if not isinstance(fullgraph, bool):
        raise ValueError(f"compile.fullgraph={fullgraph!r} must be true or false")
    dynamic = opts.get("dynamic")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise ValueError(f"compile.dynamic={dynamic!r} must be true, false or null (automatic)")
    return {"scope": scope, "mode": mode, "backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}


def _is_block(module: nn.Module) -> bool:
    """A block holds several layers (a transformer block: attention and MLP projections); a layer
    (Linear, an adapted layer, an attention module with one projection) is not one."""
    from .adapters.layers import AdapterWrapper
    if isinstance(module, (nn.Linear, AdapterWrapper, nn.ModuleList, nn.Sequential)):
        return False
    return sum(isinstance(m, (nn.Linear, AdapterWrapper)) for m in module.modules()) >= 2


def _stack(mod: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The blocks of ``mod`` if it is a stack (a ModuleList / Sequential whose children, ignoring
    nn.Identity padding, are blocks of one class), else None."""
    if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
        return None
    kids = [(k, c) for k, c in mod.named_children() if not isinstance(c, nn.Identity)]
    if len(kids) < (1 if isinstance(mod, nn.ModuleList) else 2):
        return None
    if len({type(c) for _, c in kids}) != 1 or not _is_block(kids[0][1]):
        return None
    return kids


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of the model's innermost block stacks: the children of every ModuleList (>= 1
    block) or Sequential (>= 2 blocks) whose children are blocks of one class (nn.Identity padding
    ignored). A stack of stages (Swin, ConvNeXt) gives the blocks inside each stage, not the stages."""
    stacks = {name: kids for name, mod in model.named_modules() if (kids := _stack(mod)) is not None}
    found: list[tuple[str, nn.Module]] = []
    for name, kids in stacks.items():
        prefix = f"{name}." if name else ""
        inner = [other for other in stacks if other != name and other.startswith(prefix)]
        if inner:
            continue  # its blocks hold stacks of their own: compile those instead
        found += [(prefix + k, kid) for k, kid in kids]
    return found


def compile_model(model: nn.Module, opts) -> dict:
    """Compile ``model`` in place as ``opts`` (see ``normalise_options``) says.

    Returns what was done: ``{"scope", "mode", "backend", "compiled": [module names], ...}``.
    Raises ``ValueError`` when the scope finds nothing to compile.
    """
    o = normalise_options(opts)
    if o is None:
        return {"enabled": False}
    import torch._dynamo.config as dc
    dc.recompile_limit = max(dc.recompile_limit, RECOMPILE_LIMIT)  # process-wide; never lowered
    kw = {"backend": o["backend"], "fullgraph": o["fullgraph"], "dynamic": o["dynamic"]}
    if o["mode"] is not None:
        kw["mode"] = o["mode"]
    if o["scope"] == "model":
        targets = [("", model)]
    else:
        targets = repeated_blocks(model)
        if not targets:
            raise ValueError(f"compile.scope=blocks found no repeated blocks in {type(model).__name__} (no "
                             "ModuleList or Sequential of blocks of one class); use compile.scope=model")
    for _, mod in targets:
        mod.compile(**kw)
    classes = sorted({type(m).__name__ for _, m in targets})
    from .adapters import adapted_layers
    inside = {id(m) for _, t in targets for m in t.modules()}
    outside = [n for n, layer in adapted_layers(model) if id(layer) not in inside]
    return {"enabled": True, **o, "compiled": [n or "<model>" for n, _ in targets], "classes": classes,
            "adapted_layers_not_compiled": outside}


def is_compiled(module: nn.Module) -> bool:
    """True when ``module`` or one of its submodules was compiled in place."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


__all__ = ["SCOPES", "MODES", "normalise_options", "repeated_blocks", "compile_model", "is_compiled"]
