"""VeRA (Kopiczko et al. 2024): dW = s * diag(b) B diag(d) A.

A (r x in_max) and B (out_max x r) are frozen Kaiming-uniform matrices shared by every
adapted layer (each layer slices its ``[:, :in]`` / ``[:out, :]`` corner); the trainable
vectors are b (out, init 0, so dW = 0 at init) and d (r, init ``d_init`` = 0.1).
Trainable parameters per layer: out + r. ``s`` = alpha / r (alpha defaults to r, i.e. 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bases import SharedBases
from .layers import Update, as_dtype
from .options import Method, MethodOptions, function_option


@dataclass
class VeRAOptions(MethodOptions):
    """``r``: rows of the shared projections (the paper's 256 / 1024); ``alpha``: scaling alpha / r
    (None: 1); ``seed``: the bases' generator seed; ``d_init``: the initial value of d."""

    r: int = function_option(256, "rows of the shared random projections")
    seed: int = 0
    d_init: float = 0.1


def make_vera_bases(shapes: list[tuple[int, int]], r: int, seed: int) -> SharedBases:
    out_max = max(o for o, _ in shapes)
    in_max = max(i for _, i in shapes)
    g = torch.Generator().manual_seed(int(seed))
    # Kaiming-uniform with gain sqrt(2): bound sqrt(6 / fan_in)
    a = (torch.rand(r, in_max, generator=g) * 2 - 1) * math.sqrt(6.0 / in_max)
    b = (torch.rand(out_max, r, generator=g) * 2 - 1) * math.sqrt(6.0 / r)
    spec = {"method": "vera", "seed": int(seed), "A": [r, in_max], "B": [out_max, r]}
    return SharedBases({"A": a, "B": b}, spec)


class VeRAUpdate(Update):
    @staticmethod
    def param_shapes(out_features, in_features, opts):
        return {"vera_b": (out_features,), "vera_d": (opts.r,)}

    @classmethod
    def build(cls, out_features, in_features, opts, bases, base_weight=None):
        return cls(out_features, in_features, opts.r, opts.scaling, bases, opts.d_init)

    def __init__(self, out_features: int, in_features: int, r: int, scaling: float,
                 bases: SharedBases, d_init: float = 0.1):
        super().__init__()
        self.out_features, self.in_features, self.r, self.scaling = out_features, in_features, r, scaling
        object.__setattr__(self, "bases", bases)  # a reference, not a submodule: stored once on the root
        self.vera_b = nn.Parameter(torch.zeros(out_features))
        self.vera_d = nn.Parameter(torch.full((r,), float(d_init)))

    def _slices(self, a_dtype=None):
        """This layer's corner of A (optionally in ``a_dtype``, the GEMM dtype) and of B (float32:
        the trained vectors scale it before the one cast)."""
        a = self.bases.corner("A", a_dtype, None, self.in_features)
        b = self.bases.corner("B", None, self.out_features, None)
        return a, b

    def delta_weight(self) -> torch.Tensor:
        a, b = self._slices()
        return ((self.vera_b[:, None] * b) @ (self.vera_d[:, None] * a)) * self.scaling

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        # x A^T M^T with M = s diag(b) B diag(d) = s B * outer(b, d), built in fp32 and cast once: the
        # branch is LoRA's two GEMMs plus three small ops on (out x r). Nothing of size T x out is
        # kept for backward (the trained vectors' gradients come from M's, an out x r product).
        # Few operators matter: at ViT/CLIP sizes a bf16 GPU step is launch-bound, and the earlier
        # form (two row scalings with their casts and reductions, ~6 operators per layer more than
        # LoRA) ran 1.15-1.2x LoRA's step on an H100 at equal GEMMs.
        dt = self.compute_dtype(x, self.vera_b)
        a, b = self._slices(dt)
        m = b * torch.outer(self.vera_b, self.vera_d)
        if self.scaling != 1.0:  # default alpha = r: s = 1
            m = m * self.scaling
        return F.linear(F.linear(as_dtype(x, dt), a), as_dtype(m, dt))


METHOD = Method("vera", VeRAOptions, VeRAUpdate,
                make_bases=lambda layers, opts: make_vera_bases([(o, i) for o, i, _ in layers], opts.r, opts.seed),
                rank_limited=False, knob_max=8192)
