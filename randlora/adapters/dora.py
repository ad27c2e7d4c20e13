"""DoRA (Liu et al. 2024), weight-decomposed low-rank adaptation:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row

m (out) is a trainable magnitude initialised to the row norms of W0 (so W' = W0 at init), B A is a
LoRA update (B = 0 at init) and the norm is taken per output row. As in the DoRA paper (§4.3) the
norm is treated as a constant in backward by default (``detach_norm``), which saves the memory of
its graph. Trainable parameters per layer: r * (in + out) + out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Update
from .options import Method, MethodOptions


@dataclass
class DoRAOptions(MethodOptions):
    """LoRA's options, plus ``detach_norm``: treat the row norm as a constant in backward (DoRA
    paper §4.3; saves the memory of its graph)."""

    detach_norm: bool = True


class DoRAUpdate(Update):
    delta_depends_on_base = True

    @staticmethod
    def param_shapes(out_features, in_features, opts):
        return {"lora_A": (opts.r, in_features), "lora_B": (out_features, opts.r), "magnitude": (out_features,)}

    @classmethod
    def build(cls, out_features, in_features, opts, bases, base_weight):
        return cls(out_features, in_features, opts.r, opts.scaling, base_weight, opts.detach_norm)

    def __init__(self, out_features: int, in_features: int, r: int, scaling: float, base_weight: torch.Tensor,
                 detach_norm: bool = True):
        super().__init__()
        self.out_features, self.in_features, self.r, self.scaling = out_features, in_features, r, scaling
        self.detach_norm = detach_norm
        object.__setattr__(self, "base_weight", base_weight)  # a reference to the frozen W0
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        w0 = base_weight.detach()  # the row norms in float64 for a float64 model: exact identity at init
        self.magnitude = nn.Parameter(w0.to(torch.promote_types(w0.dtype, torch.float32)).norm(dim=1))

    def _factor(self, w0):
        combined = w0.to(self.lora_A.dtype) + (self.lora_B @ self.lora_A) * self.scaling
        norm = combined.norm(dim=1)
        if self.detach_norm:
            norm = norm.detach()
        return self.magnitude / norm, combined

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """dW against ``base_weight`` (the wrapper passes the live W0); without it, the W0 given at
        injection, which is only right while the model's weight is still that tensor."""
        w0 = self.base_weight if base_weight is None else base_weight
        factor, combined = self._factor(w0)
        return factor[:, None] * combined - w0.to(combined.dtype)

    def linear(self, x, base, dropout):
        factor, _ = self._factor(base.weight)
        out = F.linear(x, base.weight)
        if not torch.is_autocast_enabled(x.device.type):
            xa = dropout(x).to(self.lora_A.dtype)
        else:
            xa = dropout(x)
        lora = F.linear(F.linear(xa, self.lora_A), self.lora_B) * self.scaling
        if isinstance(dropout, nn.Identity):
            y = factor * (out + lora.to(out.dtype))
        else:  # the base path sees x, the update sees dropout(x) (as PEFT): (m/n - 1) W0 x + (m/n) s B A x'
            y = out + (factor - 1) * out + factor * lora.to(out.dtype)
        y = y.to(out.dtype)
        return y if base.bias is None else y + base.bias


METHOD = Method("dora", DoRAOptions, DoRAUpdate, per_layer=("r", "alpha"))
