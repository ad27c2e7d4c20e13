"""One entry per adapter method: defaults, checks, bases, layer construction and parameter shapes.

Adding a method = writing its ``Update`` class and one ``MethodSpec`` here; ``inject``, budgets,
counting and state dicts then work for it unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .bases import DISTRIBUTIONS
from .dora import DoRAUpdate
from .dora_dr import DoRADRUpdate, start_rank
from .lora import LoRAUpdate
from .nola import NoLAUpdate, make_nola_bases
from .randlora import BASES_DTYPES, INITS, PATHS, RandLoRAUpdate, make_randlora_bases, num_bases
from .vera import VeRAUpdate, make_vera_bases


def _err(msg):
    return ValueError(msg)


@dataclass
class MethodSpec:
    name: str
    defaults: dict
    build: Callable            # (out, in, opts, bases, base_weight) -> Update
    param_shapes: Callable     # (out, in, opts) -> {param name: shape}
    default_alpha: Callable = lambda opts: float(opts["r"])
    rank_limited: bool = True  # r <= min(out, in) of every target
    make_bases: Callable | None = None  # (shapes, opts) -> SharedBases
    validate: Callable | None = None    # (opts) -> None, raises ValueError
    buffer_shapes: Callable | None = None  # (out, in, opts) -> {buffer name: shape} kept in state dicts
    knob: str = "r"            # what match_budget tunes
    knob_range: Callable = field(default=lambda limit: range(1, limit + 1))

    def num_trainable(self, out_f: int, in_f: int, opts: dict) -> int:
        return sum(math.prod(s) for s in self.param_shapes(out_f, in_f, opts).values())


def _validate_randlora(o):
    if o["distribution"] not in DISTRIBUTIONS:
        raise _err(f"unknown basis distribution {o['distribution']!r}; choose one of {list(DISTRIBUTIONS)}")
    if o["sparsity"] is not None and not (isinstance(o["sparsity"], (int, float)) and o["sparsity"] >= 2):
        raise _err(f"sparsity s must be >= 2 (P(+-1) = 1/s each), got {o['sparsity']!r}")
    if o["init"] not in INITS:
        raise _err(f"unknown RandLoRA init {o['init']!r}; choose one of {list(INITS)}")
    if o["path"] not in PATHS:
        raise _err(f"unknown RandLoRA path {o['path']!r}; choose one of {list(PATHS)}")
    if o["bases_dtype"] not in BASES_DTYPES:
        raise _err(f"bases_dtype={o['bases_dtype']!r} is unknown; choose one of {list(BASES_DTYPES)}")


def _validate_nola(o):
    if isinstance(o["k"], bool) or not isinstance(o["k"], int) or o["k"] <= 0:
        raise _err(f"k (number of NoLA bases per side) must be a positive integer, got {o['k']!r}")


def _validate_dora_dr(o):
    for key in ("prune_start_ratio", "final_phase_ratio"):
        if not (0 <= o[key] < 1):
            raise _err(f"{key} must be in [0, 1), got {o[key]!r}")
    if o["prune_start_ratio"] + o["final_phase_ratio"] >= 1:
        raise _err("prune_start_ratio + final_phase_ratio must be < 1 (the pruning window would be empty)")
    if o["init_rank_factor"] < 1:
        raise _err(f"init_rank_factor must be >= 1 (start rank >= target rank), got {o['init_rank_factor']!r}")
    if not (isinstance(o["prune_interval"], int) and o["prune_interval"] > 0):
        raise _err(f"prune_interval must be a positive integer, got {o['prune_interval']!r}")


def _dr_start(opts):
    return start_rank(opts["r"], opts["init_rank_factor"])


def _rl_shapes(o, i, opts):
    n = num_bases(o, i, opts["r"])
    return {"lambda_": (n, opts["r"]), "gamma": (n, min(o, i))}


REGISTRY: dict[str, MethodSpec] = {
    "lora": MethodSpec(
        "lora", {"r": 8, "alpha": None, "dropout": 0.0},
        build=lambda o, i, opts, bases, w: LoRAUpdate(o, i, opts["r"], opts["alpha"] / opts["r"]),
        param_shapes=lambda o, i, opts: {"lora_A": (opts["r"], i), "lora_B": (o, opts["r"])}),
    "dora": MethodSpec(
        "dora", {"r": 8, "alpha": None, "dropout": 0.0, "detach_norm": True},
        build=lambda o, i, opts, bases, w: DoRAUpdate(o, i, opts["r"], opts["alpha"] / opts["r"], w,
                                                      opts["detach_norm"]),
        param_shapes=lambda o, i, opts: {"lora_A": (opts["r"], i), "lora_B": (o, opts["r"]), "magnitude": (o,)}),
    "vera": MethodSpec(
        "vera", {"r": 256, "alpha": None, "dropout": 0.0, "seed": 0, "d_init": 0.1},
        build=lambda o, i, opts, bases, w: VeRAUpdate(o, i, opts["r"], opts["alpha"] / opts["r"], bases,
                                                      opts["d_init"]),
        param_shapes=lambda o, i, opts: {"vera_b": (o,), "vera_d": (opts["r"],)},
        rank_limited=False,
        make_bases=lambda shapes, opts: make_vera_bases(shapes, opts["r"], opts["seed"]),
        knob_range=lambda limit: range(1, 8193)),
    "randlora": MethodSpec(
        "randlora", {"r": 8, "alpha": None, "dropout": 0.0, "seed": 0, "scale_sqrt_n": False, "init": "default",
                     "distribution": "uniform", "sparsity": None, "path": "auto", "bases_dtype": "float32"},
        build=lambda o, i, opts, bases, w: RandLoRAUpdate(o, i, opts["r"], opts["alpha"], bases,
                                                          opts["scale_sqrt_n"], opts["init"], opts["path"]),
        param_shapes=_rl_shapes,
        default_alpha=lambda opts: 10.0,
        make_bases=lambda shapes, opts: make_randlora_bases(shapes, opts["r"], opts["seed"], opts["distribution"],
                                                            opts["sparsity"], opts["bases_dtype"]),
        validate=_validate_randlora),
    "dora_dr": MethodSpec(
        "dora_dr", {"r": 8, "alpha": 8.0, "dropout": 0.0, "init_rank_factor": 1.5, "prune_start_ratio": 0.15,
                    "final_phase_ratio": 0.5, "prune_interval": 100, "ema_beta": 0.9, "dem_weight": 0.1},
        build=lambda o, i, opts, bases, w: DoRADRUpdate(o, i, opts["r"], _dr_start(opts), opts["alpha"] / _dr_start(opts)),
        param_shapes=lambda o, i, opts: {"lora_A": (_dr_start(opts), i), "lora_B": (o, _dr_start(opts)),
                                         "gates": (_dr_start(opts),)},
        buffer_shapes=lambda o, i, opts: {"ema_score": (_dr_start(opts),), "final_mask": (_dr_start(opts),)},
        default_alpha=lambda opts: 8.0, validate=_validate_dora_dr),
    "nola": MethodSpec(
        "nola", {"r": 1, "k": 1024, "alpha": None, "dropout": 0.0, "seed": 0},
        build=lambda o, i, opts, bases, w: NoLAUpdate(o, i, opts["r"], opts["k"], opts["alpha"] / opts["r"], bases),
        param_shapes=lambda o, i, opts: {"coef_b": (opts["k"],), "coef_a": (opts["k"],)},
        make_bases=lambda shapes, opts: make_nola_bases(shapes, opts["r"], opts["k"], opts["seed"]),
        validate=_validate_nola, knob="k", knob_range=lambda limit: range(1, 8193)),
}
