"""NoLA (Koohpayegani et al. 2024): the LoRA factors as linear combinations of frozen random bases,

    dW = s * (sum_i a_i B_i) (sum_j b_j A_j),   B_i: out x r,  A_j: r x in,  i, j = 1..k

with 2k trainable coefficients per layer (the paper: r = 1, k = 1024). a = 0 at init so dW = 0 (the
official code initialises both to 1/k, which is not an identity at init); b = 1/k.
Deviation, stated: the k bases per side are drawn once from the seed and shared by all layers
(sliced to each layer's shape, as VeRA and RandLoRA do) so memory does not grow with depth; the NoLA
paper draws separate bases per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bases import SharedBases
from .layers import Update
from .options import Method, MethodOptions, function_option


@dataclass
class NoLAOptions(MethodOptions):
    """``r``: rank of each basis (paper: 1); ``k``: bases per side, i.e. trained coefficients per side
    (paper: 1024); ``alpha``: scaling alpha / r (None: 1); ``seed``: the bases' generator seed."""

    r: int = function_option(1, "rank of each random basis")
    k: int = function_option(1024, "random bases per side (trained coefficients per side)")
    seed: int = 0

    def validate(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"k (number of NoLA bases per side) must be a positive integer, got {self.k!r}")


def make_nola_bases(shapes, r: int, k: int, seed: int) -> SharedBases:
    out_max = max(o for o, _ in shapes)
    in_max = max(i for _, i in shapes)
    g = torch.Generator().manual_seed(int(seed))
    # unit-variance uniform bases, scaled by 1/sqrt(fan-in) so that each combined factor is O(1)
    b = (torch.rand(k, out_max, r, generator=g) * 2 - 1) * 3 ** 0.5 / r ** 0.5
    a = (torch.rand(k, r, in_max, generator=g) * 2 - 1) * 3 ** 0.5 / in_max ** 0.5
    spec = {"method": "nola", "seed": int(seed), "A": [k, r, in_max], "B": [k, out_max, r]}
    return SharedBases({"A": a, "B": b}, spec)


class NoLAUpdate(Update):
    @staticmethod
    def param_shapes(out_features, in_features, opts):
        return {"coef_b": (opts.k,), "coef_a": (opts.k,)}

    @classmethod
    def build(cls, out_features, in_features, opts, bases, base_weight=None):
        return cls(out_features, in_features, opts.r, opts.k, opts.scaling, bases)

    def __init__(self, out_features: int, in_features: int, r: int, k: int, scaling: float, bases: SharedBases):
        super().__init__()
        self.out_features, self.in_features, self.r, self.k, self.scaling = out_features, in_features, r, k, scaling
        object.__setattr__(self, "bases", bases)
        self.coef_b = nn.Parameter(torch.zeros(k))          # combines the output-side bases
        self.coef_a = nn.Parameter(torch.full((k,), 1.0 / k))  # combines the input-side bases

    def factors(self, dtype=None):
        bb = self.bases.corner("B", dtype, None, self.out_features, None)  # (k, out, r)
        aa = self.bases.corner("A", dtype, None, None, self.in_features)   # (k, r, in)
        cb = self.coef_b if dtype is None else self.coef_b.to(dtype)
        ca = self.coef_a if dtype is None else self.coef_a.to(dtype)
        up = torch.einsum("k,kor->or", cb, bb)
        down = torch.einsum("k,kri->ri", ca, aa)
        return up, down

    def delta_weight(self) -> torch.Tensor:
        up, down = self.factors(self.coef_a.dtype)
        return (up @ down) * self.scaling

    def branch(self, x):
        dt = self.compute_dtype(x, self.coef_a)
        up, down = self.factors(dt)
        return F.linear(F.linear(x.to(dt), down), up) * self.scaling


METHOD = Method("nola", NoLAOptions, NoLAUpdate,
                make_bases=lambda layers, opts: make_nola_bases([(o, i) for o, i, _ in layers], opts.r, opts.k,
                                                                opts.seed),
                knob="k", knob_max=8192)
