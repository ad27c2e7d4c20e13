"""Adapters to and from the Hugging Face PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

    export_peft(model, "out/")        # PeftModel.from_pretrained(fresh_base, "out/") gives the same outputs
    import_peft(fresh_base, "dir/")   # a PEFT adapter folder -> the model adapted by our own methods

Supported: LoRA, DoRA (PEFT ``use_dora``), VeRA and RandLoRA (any basis distribution: the bases travel
in PEFT's projection keys) on ``nn.Linear`` targets, LoRA also on ``nn.MultiheadAttention``, with
``trainable_modules`` as PEFT's ``modules_to_save``. The two libraries write the same updates in
different conventions, so tensors are translated, never copied blindly; every translation is listed in
``docs/peft-interop.md`` with the PEFT version it was checked against (``PEFT_VERSION``). What PEFT
cannot express is refused before anything is written or any module is touched.

Neither direction imports ``peft``: the format is plain JSON + safetensors.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .inject import adapted_layers, adapter_meta, is_adapted, shared_bases
from .layers import ADAPTED_TYPES, AdaptedParameter
from .randlora import num_bases
from .registry import get_method, resolve_options
from .state import BASES_PREFIX, META_KEY, jsonable, load_adapter_state_dict
from .targets import clean_name, find_targets, exact_names

PEFT_VERSION = "0.21.2"          # the PEFT release every convention below was checked against
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."      # PeftModel -> its tuner (base_model) -> the wrapped model (model)
HEADER_KEY = "randlora_adapter"   # our own adapter record, in the safetensors header (PEFT ignores it)
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "vera": "VERA", "randlora": "RANDLORA"}
ALTERNATIVES = ("alternatives: randlora.adapters.to_lora(model, rank) converts any adapter to a LoRA that "
                "export_peft writes (with a per-layer truncation error), or merge(model) and save the merged "
                "weights in the model's own format")


def _err(msg: str) -> ValueError:
    return ValueError(msg)


# ---------------------------------------------------------------------------------------------------------
# PEFT's name-matching rules, reimplemented (checked against peft 0.21.2)

def _peft_targets_match(target_modules, name: str) -> bool:
    """Does PEFT's ``target_modules`` select ``name``? A string is ``re.fullmatch``-ed against the full
    dotted name; a list matches a name equal to an entry or ending in ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key (in order) that, as a regex, matches
    the end of ``name`` at a component boundary; ``default`` when none does."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _modules_to_save_match(entries, name: str) -> bool:
    """PEFT wraps every module whose name ends with an entry of ``modules_to_save`` (a plain string suffix,
    not at a component boundary)."""
    return any(name.endswith(e) for e in entries)


def _plain_names(model: nn.Module) -> list[str]:
    """The module names of ``model`` as they are without our adapter (what PEFT sees in a fresh base model):
    a wrapper stands at its layer's name, its base layer's children below it, its own parts nowhere."""
    out = []

    def walk(mod, prefix):
        if prefix:
            out.append(clean_name(prefix))
        children = mod.base_layer.named_children() if isinstance(mod, ADAPTED_TYPES) else mod.named_children()
        for n, c in children:
            walk(c, f"{prefix}.{n}" if prefix else n)

    walk(model, "")
    return [n for n in out if n]


def _num(x: float):
    """An integral float as an int (PEFT annotates its alphas as int; JSON keeps either)."""
    return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------------------------------------------
# export

def _check_exportable(model: nn.Module) -> dict:
    """Refuse what PEFT cannot hold; the adapter metadata when it can."""
    if not is_adapted(model):
        raise _err("export_peft: this model has no adapter; inject one (randlora.adapters.inject) or load one "
                   "(load_adapter) first")
    meta = adapter_meta(model)
    method = meta["method"]
    if method == "full":
        raise _err("export_peft: a full fine-tune has no adapter for PEFT to load; save the merged model in its own "
                   "format instead")
    if method not in PEFT_TYPES:
        raise _err(f"export_peft: PEFT {PEFT_VERSION} has no method that computes {method!r}'s update "
                   f"(supported: {sorted(PEFT_TYPES)}); {ALTERNATIVES}")
    fused = [name for name, layer in adapted_layers(model) if isinstance(layer, AdaptedParameter)]
    if fused and method != "lora":
        raise _err(f"export_peft: {fused[:3]} are fused 2-D parameters (nn.MultiheadAttention.in_proj_weight); "
                   f"PEFT {PEFT_VERSION} adapts nn.MultiheadAttention with LoRA only, never with {method}; "
                   f"{ALTERNATIVES}")
    odd = [name for name, layer in adapted_layers(model) if isinstance(layer, AdaptedParameter)
           and not _peft_mha(layer.base_layer)]
    if odd:
        raise _err(f"export_peft: {odd[:3]} adapt a fused in_proj_weight of a module PEFT cannot wrap (PEFT's LoRA "
                   f"takes an nn.MultiheadAttention with one embedding size for q, k, v and a Linear out_proj); "
                   f"{ALTERNATIVES}")
    return meta


def _peft_mha(module: nn.Module) -> bool:
    """An nn.MultiheadAttention that PEFT's LoRA wraps (its ``lora.MultiheadAttention``)."""
    return (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
            and isinstance(module.out_proj, nn.Linear))


def _target_modules_entry(targets: list[str], names: list[str]):
    """``target_modules`` for the config: the list of full names when PEFT's suffix rule selects exactly
    these modules of the model, otherwise an anchored regex of exactly these names."""
    wanted = set(targets)
    if {n for n in names if _peft_targets_match(targets, n)} == wanted:
        return sorted(wanted)
    return exact_names(sorted(wanted))


def _patterns(values: dict[str, float], default) -> dict:
    """A ``rank_pattern`` / ``alpha_pattern`` that PEFT resolves to ``values[name]`` for every target:
    escaped full names for the layers off ``default``; if a short name would also catch a longer one, every
    target is listed, longest first (PEFT takes the first key that matches)."""
    odd = {re.escape(n): v for n, v in values.items() if v != default}
    if all(_pattern_value(odd, n, default) == v for n, v in values.items()):
        return odd
    every = {re.escape(n): values[n] for n in sorted(values, key=len, reverse=True)}
    bad = [n for n, v in values.items() if _pattern_value(every, n, default) != v]
    if bad:  # pragma: no cover - a full name always matches itself first
        raise _err(f"export_peft: cannot write a rank/alpha pattern that PEFT resolves correctly for {bad[:3]}")
    return every


def _modules_to_save(meta: dict, names: list[str]) -> list[str] | None:
    train = meta.get("trainable_names") or []
    if not train:
        return None
    top = sorted(n for n in train if not any(n.startswith(o + ".") for o in train if o != n))
    # PEFT wraps every module whose name ends with an entry; with full names that is these modules plus any
    # module whose name happens to end with one of them, which would then be trained and saved as well
    extra = sorted(n for n in names if _modules_to_save_match(top, n) and n not in top)
    if extra:
        raise _err(f"export_peft: trainable_modules {top} cannot be written as PEFT's modules_to_save: PEFT matches "
                   f"those entries as plain name suffixes, so it would also wrap {extra[:3]}; rename or drop those "
                   f"modules from trainable_modules, or save the merged model instead")
    return top


def _lora_plan(model, meta, names, targets):
    layers = dict(adapted_layers(model))
    opts = meta["options"]
    r0, a0 = int(opts["r"]), float(opts["alpha"])
    ranks = {n: layers[n].update.r for n in targets}
    # each layer's alpha as given (PEFT's scaling alpha / r is ours, also per layer: a layer with its own r
    # and no alpha of its own has scaling alpha / its r in both)
    alphas = {n: float(meta.get("layer_options", {}).get(n, {}).get("alpha", a0)) for n in targets}
    config = {
        "peft_type": "LORA", "r": r0, "lora_alpha": _num(a0), "lora_dropout": float(opts["dropout"]),
        "use_dora": meta["method"] == "dora", "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
        "lora_bias": False, "init_lora_weights": True,
        "rank_pattern": _patterns(ranks, r0),
        "alpha_pattern": {k: _num(v) for k, v in _patterns(alphas, a0).items()},
    }
    tensors = {}
    for n in targets:
        u = layers[n].update
        tensors[f"{PREFIX}{n}.lora_A.weight"] = u.lora_A.detach()
        tensors[f"{PREFIX}{n}.lora_B.weight"] = u.lora_B.detach()
        if meta["method"] == "dora":
            # PEFT's magnitude is ours: m with W' = m * (W0 + s B A) / ||W0 + s B A||_row
            tensors[f"{PREFIX}{n}.lora_magnitude_vector"] = u.magnitude.detach()
        if isinstance(layers[n], AdaptedParameter):
            # PEFT's LoRA on an nn.MultiheadAttention adapts in_proj (these tensors) AND out_proj; ours adapts
            # in_proj only, so out_proj gets a LoRA with B = 0 (dW = 0 exactly) and A as PEFT initialises it
            # (Kaiming-uniform, a = sqrt(5); from a fixed generator, so the file is reproducible): further training
            # in PEFT starts that LoRA as PEFT would
            e = layers[n].base_layer.out_proj
            g = torch.Generator().manual_seed(0)
            bound = 1.0 / math.sqrt(e.in_features)  # kaiming_uniform_(a=sqrt(5)) on fan_in = in_features
            a = (torch.rand(u.r, e.in_features, generator=g) * 2 - 1) * bound
            tensors[f"{PREFIX}{n}.base_layer.out_proj.lora_A.weight"] = a
            tensors[f"{PREFIX}{n}.base_layer.out_proj.lora_B.weight"] = torch.zeros(e.out_features, u.r)
    return config, tensors, {}


def _vera_plan(model, meta, names, targets):
    layers = dict(adapted_layers(model))
    opts = meta["options"]
    bases = shared_bases(model)
    config = {"peft_type": "VERA", "r": int(opts["r"]), "projection_prng_key": int(opts["seed"]),
              "save_projection": True, "vera_dropout": float(opts["dropout"]), "d_initial": float(opts["d_init"]),
              "fan_in_fan_out": False, "bias": "none", "init_weights": True}
    tensors, factors = {}, {}
    for n in targets:
        u = layers[n].update
        # PEFT's VeRA has no scaling: dW = diag(lambda_b) B diag(lambda_d) A, so our s goes into lambda_b
        factors[n] = float(u.scaling)
        b = u.vera_b.detach()
        tensors[f"{PREFIX}{n}.vera_lambda_b"] = b if u.scaling == 1.0 else b * u.scaling
        tensors[f"{PREFIX}{n}.vera_lambda_d"] = u.vera_d.detach()
    # shapes agree: PEFT sizes vera_A (r, max in) and vera_B (max out, r) over the targets, as we do
    tensors["base_model.vera_A"] = bases.get("A").detach().float()
    tensors["base_model.vera_B"] = bases.get("B").detach().float()
    return config, tensors, factors


def _legacy_order(n: int, r: int) -> torch.Tensor:
    """For a ``layout="basis_major"`` adapter (trained before our pairing became PEFT's) with n bases of rank r:
    the row of our B stack that PEFT's flattened B column c must hold. Column c meets rank row c // n and basis
    c % n in PEFT (and in our rank-major layout); the basis-major layout pairs rank k, basis j with row j*r + k."""
    c = torch.arange(n * r)
    return (c % n) * r + c // n


def _randlora_plan(model, meta, names, targets):
    layers = dict(adapted_layers(model))
    opts = meta["options"]
    per_layer_r = sorted({n for n in targets if layers[n].update.r != int(opts["r"])})
    if per_layer_r:
        raise _err(f"export_peft: layers {per_layer_r[:3]} have their own RandLoRA rank; PEFT {PEFT_VERSION}'s "
                   f"RandLoRA has one rank for every layer (no rank_pattern); {ALTERNATIVES}")
    r = int(opts["r"])
    shapes = {n: (layers[n].update.out_features, layers[n].update.in_features) for n in targets}
    legacy = opts.get("layout") == "basis_major"
    ns = sorted({layers[n].update.n for n in targets})
    if legacy and len(ns) > 1 and r > 1:
        ex = [next(n for n in targets if layers[n].update.n == x) for x in (ns[0], ns[-1])]
        raise _err(f"export_peft: this RandLoRA adapter has the basis-major layout of adapters trained before PEFT's "
                   f"pairing was adopted (layout='basis_major'), and its layers have different numbers of bases "
                   f"n = ceil(min(out, in) / r) ({ex[0]}: n={ns[0]}, {ex[1]}: n={ns[-1]}); PEFT's one shared B "
                   f"cannot hold that pairing for both. Re-train with the default layout='rank_major' (exported "
                   f"exactly for any n), or {ALTERNATIVES}")
    # PEFT's shared shapes: _find_dim takes the element-wise max (out, in) over the targets
    out_max = max(o for o, _ in shapes.values())
    in_max = max(i for _, i in shapes.values())
    max_dim, min_dim = max(out_max, in_max), min(out_max, in_max)
    n_peft = num_bases(min_dim, min_dim, r)
    bases = shared_bases(model)
    a_ours = bases.get("A").detach().float()          # (r, m_max)
    b_ours = bases.get("B").detach().float()          # (n_max * r, big_max)
    a_peft = torch.zeros(r, 1, min_dim)
    a_peft[:, 0, :a_ours.shape[1]] = a_ours[:r]
    # PEFT's B (max_dim, N, r) flattened to (max_dim, N*r): column c is our B-stack row c (each layer reads the
    # first n*r of both), so ours is its transposed top-left corner; the columns past n_max*r are never read
    b_peft = torch.zeros(max_dim, n_peft, r)
    flat = b_peft.view(max_dim, n_peft * r)
    rows = b_ours[_legacy_order(ns[-1], r)] if legacy else b_ours
    flat[:rows.shape[1], :rows.shape[0]] = rows.t()
    # the scaling: PEFT's is randlora_alpha / r for all layers; a layer whose own scaling differs (its own
    # alpha, or our 1/sqrt(n)) carries the ratio in lambda
    scal = {n: float(layers[n].update.scaling) for n in targets}
    plain = not opts.get("scale_sqrt_n") and not meta.get("layer_options")
    alpha_p = float(opts["alpha"]) if plain else _alpha_for(Counter(scal.values()).most_common(1)[0][0], r)
    s_p = alpha_p / r
    config = {"peft_type": "RANDLORA", "r": r, "randlora_alpha": _num(alpha_p),
              "projection_prng_key": int(opts["seed"]), "save_projection": True,
              "sparse": opts["distribution"] == "sparse" and opts.get("sparsity") == 6.0,
              "very_sparse": opts["distribution"] == "very_sparse",
              "randlora_dropout": float(opts["dropout"]), "fan_in_fan_out": False, "bias": "none",
              "init_weights": True}
    tensors, factors = {}, {}
    for n in targets:
        u = layers[n].update
        f = 1.0 if scal[n] == s_p else scal[n] / s_p
        factors[n] = f
        lam = u.lambda_.detach()                       # (r, n) [rank, basis] in both
        if legacy:
            lam = lam.t()                              # basis-major (n, r)
        tensors[f"{PREFIX}{n}.randlora_lambda"] = (lam if f == 1.0 else lam * f).contiguous()
        tensors[f"{PREFIX}{n}.randlora_gamma"] = u.gamma.detach()  # (n, m) in both; gamma on the small side
    tensors["base_model.randlora_A"] = a_peft
    tensors["base_model.randlora_B"] = b_peft
    return config, tensors, factors


def _alpha_for(scaling: float, r: int) -> float:
    """An alpha with alpha / r == scaling exactly in float64 (the plain product may be off by one unit in the
    last place), so the layers at that scaling need no factor in lambda and round-trip bit for bit."""
    alpha = scaling * r
    for _ in range(4):
        if alpha / r == scaling:
            return alpha
        alpha = math.nextafter(alpha, math.inf if alpha / r < scaling else -math.inf)
    return scaling * r


PLANS = {"lora": _lora_plan, "dora": _lora_plan, "vera": _vera_plan, "randlora": _randlora_plan}


def peft_state(model: nn.Module, base_model_name_or_path: str | None = None, task_type: str | None = None,
               projection_per_layer: bool = True) -> tuple[dict, dict]:
    """The PEFT config (a dict, as ``adapter_config.json``) and tensors (as ``adapter_model.safetensors``) of
    the adapter in ``model``, without writing anything. Raises ValueError for what PEFT cannot express."""
    meta = _check_exportable(model)
    names = _plain_names(model)
    targets = [n for n, _ in adapted_layers(model)]
    config, tensors, factors = PLANS[meta["method"]](model, meta, names, targets)
    mts = _modules_to_save(meta, names)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    config.update(target_modules=_target_modules_entry(targets, names), modules_to_save=mts,
                  layers_to_transform=None, layers_pattern=None, base_model_name_or_path=base_model_name_or_path,
                  revision=None, task_type=task_type, inference_mode=True)
    if task_type is None:  # as PEFT's save_pretrained: the base class, for AutoPeftModel
        config["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    if meta["method"] == "randlora" and projection_per_layer:
        # PEFT 0.21.2 saves its shared projections once on the tuner and once per adapted layer (each layer's
        # reference is a registered buffer); loading a file without the per-layer copies works but warns
        # about missing keys, so the copies are written as PEFT writes them
        for n in targets:
            tensors[f"{PREFIX}{n}.randlora_A"] = tensors["base_model.randlora_A"]
            tensors[f"{PREFIX}{n}.randlora_B"] = tensors["base_model.randlora_B"]
    for tname in mts or []:
        for k, v in model.get_submodule(tname).state_dict().items():
            tensors[f"{PREFIX}{tname}.{k}"] = v.detach()
    record = jsonable(adapter_meta(model))
    record["peft"] = {"version": PEFT_VERSION, "factors": factors}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return config, {META_KEY: record, **tensors}


def export_peft(model: nn.Module, path, base_model_name_or_path: str | None = None, *, task_type: str | None = None,
                overwrite: bool = False, projection_per_layer: bool = True) -> Path:
    """Write the adapter of ``model`` as a PEFT adapter folder at ``path`` and return the path.

    ``peft.PeftModel.from_pretrained(fresh_base_model, path)`` then computes the same outputs (to float32
    rounding). ``base_model_name_or_path``: recorded in the config (default: the model's ``name_or_path``,
    if any). ``task_type``: PEFT's task type (e.g. ``"CAUSAL_LM"``), None for a plain ``PeftModel``.
    ``projection_per_layer``: for RandLoRA, also write a copy of the shared bases per layer, as PEFT 0.21.2
    itself does (False: one copy, a much smaller file; PEFT loads it the same but warns about missing keys).
    Refused, before anything is written: methods and targets PEFT cannot express, and a folder that already
    holds an adapter (unless ``overwrite``).
    """
    from safetensors.torch import save_file

    config, state = peft_state(model, base_model_name_or_path, task_type, projection_per_layer)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise _err(f"export_peft: {path} exists and is not a folder; give a folder path")
    present = [f for f in (CONFIG_NAME, WEIGHTS_NAME, BIN_NAME) if (path / f).exists()]
    if present and not overwrite:
        raise _err(f"export_peft: {path} already holds an adapter ({present}); choose another folder or pass "
                   "overwrite=True")
    record = state.pop(META_KEY)
    # safetensors refuses aliased tensors: the per-layer projection copies become real copies
    seen, tensors = set(), {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    path.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = path / f".{WEIGHTS_NAME}.tmp-{os.getpid()}", path / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    try:
        save_file(tensors, str(tmp_w), metadata={"format": "pt", HEADER_KEY: json.dumps(record)})
        tmp_c.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        os.replace(tmp_w, path / WEIGHTS_NAME)
        os.replace(tmp_c, path / CONFIG_NAME)
        if (path / BIN_NAME).exists():
            (path / BIN_NAME).unlink()  # PEFT would read the safetensors file first; no stale second adapter
    finally:
        for t in (tmp_w, tmp_c):
            if t.exists():
                t.unlink()
    return path


# ---------------------------------------------------------------------------------------------------------
# import

# config fields that do not change what the adapter computes from its tensors (or that we read ourselves)
_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "peft_version", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
            "modules_to_save", "r", "bias", "fan_in_fan_out", "megatron_core", "qalora_group_size",
            "ensure_weight_tying", "init_weights", "init_lora_weights", "loftq_config"}
_READ = {"LORA": {"lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                  "lora_bias"},
         "VERA": {"projection_prng_key", "save_projection", "vera_dropout", "d_initial"},
         "RANDLORA": {"projection_prng_key", "save_projection", "sparse", "very_sparse", "randlora_dropout",
                      "randlora_alpha"}}
# LoRA inits that only set A and B; the others (pissa, olora, corda, loftq, lora_ga, ...) rewrite the base
# weights, so their adapters reproduce the trained model only on a base that was rewritten the same way
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
_PER_LAYER = {"LORA": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
              "VERA": ("vera_lambda_b", "vera_lambda_d"),
              "RANDLORA": ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")}


def _read_folder(path) -> tuple[dict, dict, dict | None]:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise _err(f"import_peft: {path} has no {CONFIG_NAME}; give the folder PEFT's save_pretrained wrote")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise _err(f"import_peft: {cfg_file} is not valid JSON ({e})") from None
    header = None
    if (path / WEIGHTS_NAME).is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
                header = (f.metadata() or {}).get(HEADER_KEY)
            tensors = load_file(str(path / WEIGHTS_NAME))
        except Exception as e:
            raise _err(f"import_peft: cannot read {path / WEIGHTS_NAME}: {e} (truncated?)") from None
    elif (path / BIN_NAME).is_file():
        try:
            tensors = torch.load(str(path / BIN_NAME), map_location="cpu", weights_only=True)
        except Exception as e:
            raise _err(f"import_peft: cannot read {path / BIN_NAME} as plain tensors: {e}") from None
    else:
        raise _err(f"import_peft: {path} has neither {WEIGHTS_NAME} nor {BIN_NAME}")
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise _err(f"import_peft: the weights file in {path} does not hold a flat name -> tensor mapping")
    try:
        header = json.loads(header) if header else None
    except json.JSONDecodeError:
        header = None
    return config, tensors, header


def _check_config(config: dict) -> str:
    ptype = config.get("peft_type")
    if ptype not in _READ:
        raise _err(f"import_peft: PEFT type {ptype!r} has no counterpart here (supported: LORA incl. use_dora, "
                   f"VERA, RANDLORA); merge it with PEFT (merge_and_unload) and load the merged model instead")
    if config.get("fan_in_fan_out"):
        raise _err("import_peft: fan_in_fan_out=True means the adapted layers store weights as (in, out) "
                   "(transformers' Conv1D, e.g. GPT-2); only nn.Linear targets are supported here")
    if config.get("bias", "none") != "none":
        raise _err(f"import_peft: bias={config['bias']!r} trains the base layers' biases, which this adapter format "
                   f"does not hold; only bias='none' adapters can be imported")
    if config.get("lora_bias"):
        raise _err("import_peft: lora_bias=True adds a trained bias to lora_B, which our LoRA does not have")
    init = config.get("init_lora_weights", True)
    if ptype == "LORA" and init not in _PLAIN_INITS:
        raise _err(f"import_peft: init_lora_weights={init!r} rewrites the base weights at initialisation, so this "
                   f"adapter reproduces the trained model only on that rewritten base; convert it to a plain LoRA "
                   f"with PEFT first (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    known = _IGNORED | _READ[ptype]
    odd = sorted(k for k, v in config.items() if k not in known and v not in (None, False, {}, [], ""))
    if odd:
        raise _err(f"import_peft: option(s) {[(k, config[k]) for k in odd]} of this {ptype} config are not "
                   f"understood by this importer (checked against peft {PEFT_VERSION}); only adapters without them "
                   "can be imported")
    return ptype


def _split(tensors: dict, ptype: str):
    """{layer: {param: tensor}}, the shared projections, and {module path: {name: tensor}} for the rest."""
    layers, shared, rest = {}, {}, {}
    suffixes = _PER_LAYER[ptype]
    for key, v in tensors.items():
        if key in ("base_model.vera_A", "base_model.vera_B", "base_model.randlora_A", "base_model.randlora_B"):
            shared[key.rsplit(".", 1)[1]] = v
            continue
        if not key.startswith(PREFIX):
            raise _err(f"import_peft: tensor key {key!r} does not start with {PREFIX!r}; not a PeftModel state")
        k = key[len(PREFIX):]
        for s in suffixes:
            if k.endswith("." + s):
                layers.setdefault(k[:-len(s) - 1], {})[s] = v
                break
        else:
            rest[k] = v
    return layers, shared, rest


def _vera_regenerated(config: dict, out_max: int, in_max: int):
    """PEFT's VeRA projections for ``save_projection=False``: one CPU generator seeded with
    ``projection_prng_key`` draws A (r, max in) then B (max out, r), each uniform on +-sqrt(6 / fan_in)."""
    g = torch.Generator(device="cpu").manual_seed(int(config.get("projection_prng_key", 0)))
    r = int(config["r"])
    a = torch.empty(r, in_max).uniform_(-math.sqrt(6.0 / in_max), math.sqrt(6.0 / in_max), generator=g)
    b = torch.empty(out_max, r).uniform_(-math.sqrt(6.0 / r), math.sqrt(6.0 / r), generator=g)
    return a, b


def _lora_import(config, layers, shapes, names):
    ptype_dora = bool(config.get("use_dora"))
    r0, a0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rs = bool(config.get("use_rslora"))
    need = {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if ptype_dora else set())
    ranks, alphas, tensors = {}, {}, {}
    for n in names:
        got = layers[n]
        if set(got) != need:
            raise _err(f"import_peft: layer {n} has tensors {sorted(got)}, expected {sorted(need)} for "
                       f"{'DoRA' if ptype_dora else 'LoRA'} (use_dora={ptype_dora})")
        a, b = got["lora_A.weight"], got["lora_B.weight"]
        o, i = shapes[n]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != i or b.shape[0] != o or a.shape[0] != b.shape[1]:
            raise _err(f"import_peft: layer {n} ({o} x {i}) has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                       "which do not fit it (saved from another model?)")
        r = a.shape[0]
        want_r = int(_pattern_value(config.get("rank_pattern"), n, r0))
        if r != want_r:
            raise _err(f"import_peft: layer {n}: the config's rank (r / rank_pattern) says {want_r}, the tensors "
                       f"have rank {r}")
        if r > min(o, i):
            raise _err(f"import_peft: layer {n} has rank {r} > min(out, in) = {min(o, i)}; our LoRA caps r at "
                       f"min(out, in) (the extra rank adds nothing): convert the adapter with to_lora after merging "
                       f"it in PEFT, or reduce it to rank {min(o, i)} by SVD first")
        lora_alpha = float(_pattern_value(config.get("alpha_pattern"), n, a0))
        # PEFT's scaling is lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; ours is alpha / r
        ranks[n], alphas[n] = r, (lora_alpha * math.sqrt(r) if rs else lora_alpha)
        tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"] = a, b
        if ptype_dora:
            m = got["lora_magnitude_vector"]
            if tuple(m.shape) != (o,):
                raise _err(f"import_peft: layer {n}: lora_magnitude_vector has shape {tuple(m.shape)}, expected ({o},)")
            tensors[f"{n}.magnitude"] = m
    r_glob = r0 if r0 in ranks.values() else Counter(ranks.values()).most_common(1)[0][0]
    a_glob = Counter(alphas[n] for n in names if ranks[n] == r_glob).most_common(1)[0][0]
    layer_options = {}
    for n in names:
        lo = {}
        if ranks[n] != r_glob:
            lo["r"] = ranks[n]
        if alphas[n] != a_glob:
            lo["alpha"] = alphas[n]
        if lo:
            layer_options[n] = lo
    opts = {"r": r_glob, "alpha": a_glob, "dropout": float(config.get("lora_dropout", 0.0))}
    if ptype_dora:
        opts["detach_norm"] = True  # PEFT always treats the row norm as a constant in backward
    return ("dora" if ptype_dora else "lora"), opts, layer_options, tensors, None


def _vera_import(config, layers, shared, shapes, names):
    r = int(config["r"])
    out_max, in_max = max(o for o, _ in shapes.values()), max(i for _, i in shapes.values())
    if config.get("save_projection", True):
        if set(shared) != {"vera_A", "vera_B"}:
            raise _err("import_peft: save_projection=True but the file lacks base_model.vera_A / base_model.vera_B")
        a, b = shared["vera_A"], shared["vera_B"]
    else:
        a, b = _vera_regenerated(config, out_max, in_max)
    if tuple(a.shape) != (r, in_max) or tuple(b.shape) != (out_max, r):
        raise _err(f"import_peft: VeRA projections have shapes {tuple(a.shape)}, {tuple(b.shape)}; the targets need "
                   f"({r}, {in_max}) and ({out_max}, {r})")
    tensors = {}
    for n in names:
        got = layers[n]
        if set(got) != {"vera_lambda_b", "vera_lambda_d"}:
            raise _err(f"import_peft: layer {n} has tensors {sorted(got)}, expected vera_lambda_b and vera_lambda_d")
        if tuple(got["vera_lambda_b"].shape) != (shapes[n][0],) or tuple(got["vera_lambda_d"].shape) != (r,):
            raise _err(f"import_peft: layer {n}: vera_lambda_b {tuple(got['vera_lambda_b'].shape)} / vera_lambda_d "
                       f"{tuple(got['vera_lambda_d'].shape)} do not fit ({shapes[n][0]},) / ({r},)")
        tensors[f"{n}.vera_b"], tensors[f"{n}.vera_d"] = got["vera_lambda_b"], got["vera_lambda_d"]
    # alpha = r: scaling 1, PEFT's VeRA has none
    opts = {"r": r, "alpha": float(r), "seed": int(config.get("projection_prng_key", 0)),
            "d_init": float(config.get("d_initial", 0.1)), "dropout": float(config.get("vera_dropout", 0.0))}
    return "vera", opts, {}, tensors, {"A": a.float(), "B": b.float()}


def _randlora_import(config, layers, shared, shapes, names):
    r = int(config["r"])
    if not config.get("save_projection", True):
        raise _err("import_peft: this RandLoRA adapter was saved without its projections (save_projection=False); "
                   "PEFT regenerates them in bfloat16 or float16 depending on the machine, so they cannot be "
                   "reproduced reliably here: load it in PEFT and save it again with save_projection=True")
    if set(shared) != {"randlora_A", "randlora_B"}:
        raise _err("import_peft: the file lacks base_model.randlora_A / base_model.randlora_B")
    a_p, b_p = shared["randlora_A"].float(), shared["randlora_B"].float()
    nb = {n: num_bases(o, i, r) for n, (o, i) in shapes.items()}
    out_max, in_max = max(o for o, _ in shapes.values()), max(i for _, i in shapes.values())
    max_dim, min_dim = max(out_max, in_max), min(out_max, in_max)
    want_a, want_b = (r, 1, min_dim), (max_dim, num_bases(min_dim, min_dim, r), r)
    if tuple(a_p.shape) != want_a or tuple(b_p.shape) != want_b:
        raise _err(f"import_peft: RandLoRA projections have shapes {tuple(a_p.shape)}, {tuple(b_p.shape)}; PEFT "
                   f"builds {want_a}, {want_b} for these targets (saved from another model?)")
    for n in names:  # per-layer copies (PEFT 0.21.2 writes them) must be the shared tensors
        for k, ref in (("randlora_A", a_p), ("randlora_B", b_p)):
            if k in layers[n] and not torch.equal(layers[n][k].float(), ref):
                raise _err(f"import_peft: layer {n}'s copy of {k} differs from base_model.{k}; the file is "
                           "inconsistent")
    n_max = max(nb.values())
    m_max = max(min(o, i) for o, i in shapes.values())
    big_max = max(max(o, i) for o, i in shapes.values())
    # PEFT's flattened B column c is our B-stack row c, for every layer whatever its n (see export)
    b_ours = b_p.reshape(max_dim, -1)[:big_max, :n_max * r].t().contiguous()
    a_ours = a_p[:, 0, :m_max].contiguous()
    alpha = float(config.get("randlora_alpha", 640))
    tensors = {}
    for n in names:
        got = layers[n]
        lam, gam = got.get("randlora_lambda"), got.get("randlora_gamma")
        m = min(shapes[n])
        if lam is None or gam is None or tuple(lam.shape) != (r, nb[n]) or tuple(gam.shape) != (nb[n], m):
            raise _err(f"import_peft: layer {n}: expected randlora_lambda ({r}, {nb[n]}) and randlora_gamma "
                       f"({nb[n]}, {m}), got {[(k, tuple(v.shape)) for k, v in got.items()]}")
        tensors[f"{n}.lambda_"] = lam              # (r, n): our rank-major layout is PEFT's
        tensors[f"{n}.gamma"] = gam
    if config.get("very_sparse"):
        dist, sparsity = "very_sparse", 2 * math.sqrt(min_dim)  # P(+-1) = 1/(2 sqrt(D)) each in PEFT
    elif config.get("sparse"):
        dist, sparsity = "sparse", 6.0                          # P(+-1) = 1/6 each
    else:
        dist, sparsity = "uniform", None
    opts = {"r": r, "alpha": alpha, "seed": int(config.get("projection_prng_key", 0)), "scale_sqrt_n": False,
            "distribution": dist, "sparsity": sparsity, "dropout": float(config.get("randlora_dropout", 0.0)),
            "layout": "rank_major"}
    return "randlora", opts, {}, tensors, {"A": a_ours, "B": b_ours}


def _layer_scaling(method: str, opts: dict, layer_options: dict, name: str, out_f: int, in_f: int) -> tuple:
    """(rank, scaling) of one layer under our options (what the update would be built with)."""
    lo = layer_options.get(name, {})
    r, alpha = lo.get("r", opts["r"]), float(lo.get("alpha", opts["alpha"]))
    s = alpha / r
    if method == "randlora" and opts.get("scale_sqrt_n"):
        s /= math.sqrt(num_bases(out_f, in_f, r))
    return r, s


def _restore_ours(header, plan, targets):
    """With our own record in the file (written by export_peft and not re-saved by PEFT since): our exact
    options back (seed, scale_sqrt_n, per-layer alpha, init ...) and the per-layer factors the export folded
    into lambda / lambda_b taken out again. None when the record does not describe this file's adapter:
    other method or targets, or a per-layer rank or effective scaling that differs from the config's."""
    method, opts, layer_options, tensors, bases = plan
    try:
        if header.get("method") != method or sorted(t[0] for t in header["targets"]) != sorted(t.name for t in targets):
            return None
        r_opts = resolve_options(method, header["options"])
        if method == "randlora":
            r_opts["layout"] = "rank_major"  # the tensors are read from PEFT's pairing, whatever the export's was
        r_layers = header.get("layer_options") or {}
        factors = (header.get("peft") or {}).get("factors") or {}
        out = dict(tensors)
        for t in targets:
            f = float(factors.get(t.name, 1.0))
            r1, s1 = _layer_scaling(method, opts, layer_options, t.name, t.out_features, t.in_features)
            r2, s2 = _layer_scaling(method, r_opts, r_layers, t.name, t.out_features, t.in_features)
            if method == "vera":
                s1 = 1.0  # PEFT's VeRA has no scaling
            if r1 != r2 or not math.isclose(s2 / f, s1, rel_tol=1e-9):
                return None
            if f != 1.0:
                key = f"{t.name}.lambda_" if method == "randlora" else f"{t.name}.vera_b"
                out[key] = tensors[key] / f
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return method, r_opts, r_layers, out, bases


def import_peft(model: nn.Module, path) -> nn.Module:
    """Read the PEFT adapter folder ``path`` (``adapter_config.json`` + ``adapter_model.safetensors``, or
    ``adapter_model.bin`` read with ``torch.load(weights_only=True)``) and adapt ``model`` (the plain base
    model PEFT's adapter was trained on) with our corresponding method; returns ``model``.

    The outputs equal PEFT's (``PeftModel.from_pretrained(model, path)``) to float32 rounding. Configs we
    cannot represent exactly (other PEFT types, fan_in_fan_out, trained biases, inits that rewrite the base
    weights, unknown options ...) are refused before the model is touched.
    """
    if is_adapted(model):
        raise _err("import_peft: this model already carries an adapter; import into a fresh base model")
    config, tensors, header = _read_folder(path)
    ptype = _check_config(config)
    layers, shared, rest = _split(tensors, ptype)
    if not layers:
        raise _err(f"import_peft: {path} holds no {ptype} adapter tensors")
    modules = dict(model.named_modules())
    for name in [n for n in layers if n.endswith(".base_layer.out_proj")]:
        # PEFT's LoRA on an nn.MultiheadAttention also adapts its out_proj; our wrapper adapts in_proj only, so
        # that part must be a zero update (as export_peft writes it)
        mha = name[:-len(".base_layer.out_proj")]
        if not isinstance(modules.get(mha), nn.MultiheadAttention) or mha not in layers:
            continue
        b = layers[name].get("lora_B.weight")
        if b is None or set(layers[name]) != {"lora_A.weight", "lora_B.weight"} or bool(b.any()):
            raise _err(f"import_peft: PEFT's LoRA on the nn.MultiheadAttention {mha!r} also trained its out_proj, "
                       "which nn.MultiheadAttention reads directly and our adapters cannot reach; merge the adapter "
                       "in PEFT (merge_and_unload) and load the merged model instead")
        del layers[name]
    names = sorted(layers)
    missing = [n for n in names if n not in modules]
    if missing:
        raise _err(f"import_peft: the adapter adapts layers this model does not have ({missing[:3]}); was it "
                   "trained on another architecture?")
    targets = find_targets(model, exact_names(names))  # refuses layers we cannot adapt, with the reason
    plain = [t.name for t in targets if t.kind != "linear" and not (ptype == "LORA" and _peft_mha(modules[t.name]))]
    if plain:
        raise _err(f"import_peft: layers {plain[:3]} are not nn.Linear; PEFT adapters on them are not supported")
    shapes = {t.name: (t.out_features, t.in_features) for t in targets}
    # modules_to_save: the rest of the tensors, which must be whole modules of the model
    mts = list(config.get("modules_to_save") or [])
    all_names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    wrapped = sorted({n for n in all_names if _modules_to_save_match(mts, n)}) if mts else []
    wrapped = [n for n in wrapped if not any(n.startswith(o + ".") for o in wrapped if o != n)]
    expected_rest = {}
    for w in wrapped:
        for k, v in model.get_submodule(w).state_dict().items():
            expected_rest[f"{w}.{k}"] = tuple(v.shape)
    stray = sorted(set(rest) - set(expected_rest))
    if stray:
        raise _err(f"import_peft: the file holds tensors that are neither adapter weights nor modules_to_save "
                   f"({stray[:5]}); e.g. resized embeddings are not supported")
    lacking = sorted(set(expected_rest) - set(rest))
    if lacking:
        raise _err(f"import_peft: modules_to_save {mts} lack tensors {lacking[:5]} in the file")
    wrong = [k for k in rest if tuple(rest[k].shape) != expected_rest[k]]
    if wrong:
        raise _err(f"import_peft: modules_to_save tensors {wrong[:3]} do not fit this model's shapes")
    if ptype == "LORA":
        plan = _lora_import(config, layers, shapes, names)
    elif ptype == "VERA":
        plan = _vera_import(config, layers, shared, shapes, names)
    else:
        plan = _randlora_import(config, layers, shared, shapes, names)
    record = _restore_ours(header, plan, targets) if header is not None else None
    method, opts, layer_options, ours, bases = record or plan
    opts = resolve_options(method, opts)
    save_bases = bases is not None
    if bases is not None and record is not None:
        # our record and the seed's own bases in the file: the adapter stays as it was (bases from the seed
        # unless it stored them)
        spec = get_method(method)
        typed = spec.options(**opts)
        drawn = spec.make_bases([(t.out_features, t.in_features, spec.for_layer(typed, layer_options.get(t.name)))
                                 for t in targets], typed)
        if all(drawn._buffers[k].shape == v.shape and torch.equal(drawn._buffers[k].float(), v)
               for k, v in bases.items()):
            save_bases = bool(header.get("save_bases"))
            bases = {k: drawn._buffers[k] for k in bases} if save_bases else None
        elif method == "randlora":
            opts["bases_dtype"] = "float32"  # the file's bases, exactly
    trainable = list(wrapped)
    meta = {"format": 1, "method": method, "options": opts,
            "target_modules": (header or {}).get("target_modules") if record else names,
            "trainable_modules": ((header or {}).get("trainable_modules") if record else None) or (trainable or None),
            "trainable_names": _trainable_names(model, trainable), "save_bases": save_bases,
            "targets": [[t.name, t.kind, t.out_features, t.in_features] for t in targets],
            "layer_options": layer_options}
    state = {**ours, **rest}
    if bases is not None:
        expected = _expected_bases(method, targets, opts, layer_options)
        for k, v in bases.items():
            if tuple(v.shape) != expected[k]:
                raise _err(f"import_peft: translated bases {k} have shape {tuple(v.shape)}, expected {expected[k]}")
            state[BASES_PREFIX + k] = v
    state[META_KEY] = meta
    return load_adapter_state_dict(model, state)


def _trainable_names(model: nn.Module, tops: list[str]) -> list[str]:
    """What inject records for ``trainable_modules=exact_names(tops)``: the modules named exactly so."""
    return [n for n, _ in model.named_modules() if n and n in set(tops)]


def _expected_bases(method, targets, opts, layer_options) -> dict:
    if method == "vera":
        return {"A": (opts["r"], max(t.in_features for t in targets)),
                "B": (max(t.out_features for t in targets), opts["r"])}
    rs = [layer_options.get(t.name, {}).get("r", opts["r"]) for t in targets]
    return {"A": (max(rs), max(min(t.out_features, t.in_features) for t in targets)),
            "B": (max(num_bases(t.out_features, t.in_features, r) * r for t, r in zip(targets, rs)),
                  max(max(t.out_features, t.in_features) for t in targets))}
