"""The methods ``inject`` knows, one line each. A method is one file (options class, ``Update``,
bases) ending in ``METHOD = Method(...)``; adding one is that file, a line here and its YAML in
``configs/adapter/``. ``full`` (every parameter trains) is not an adapter and has no entry."""
from __future__ import annotations

import dataclasses

from . import dora, dora_dr, lora, nola, randlora, vera
from .options import Method

REGISTRY: dict[str, Method] = {m.name: m for m in (
    lora.METHOD,
    dora.METHOD,
    vera.METHOD,
    randlora.METHOD,
    dora_dr.METHOD,
    nola.METHOD,
)}
METHODS = ("full", *REGISTRY)
# each method's options with their declared defaults (alpha None: the method's default alpha)
DEFAULTS = {"full": {}, **{name: {f.name: f.default for f in dataclasses.fields(m.options)}
                           for name, m in REGISTRY.items()}}
# options that change what an adapter computes from its tensors, over all methods (compared on resume)
FUNCTION_OPTIONS = tuple(sorted({n for m in REGISTRY.values() for n in m.options.function_names()}))


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        extra = " ('full' trains every parameter: it has no adapter options)" if name == "full" else ""
        raise ValueError(f"unknown adapter method {name!r}; choose one of {list(METHODS)}{extra}")
    return REGISTRY[name]


def resolve_options(method: str, options: dict) -> dict:
    """Fill defaults and validate option names and values (shape-independent checks); the options as
    a plain dict (what adapter metadata stores)."""
    if method == "full":
        unknown = sorted(set(options) - {"target_modules", "trainable_modules", "save_bases"})
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method 'full'; it takes no adapter options")
        return {}
    return get_method(method).resolve(options).as_dict()
