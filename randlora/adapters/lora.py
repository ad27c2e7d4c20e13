"""LoRA (Hu et al. 2021): dW = (alpha / r) B A.

A (r x in) is Kaiming-uniform (a = sqrt(5), like ``nn.Linear``), B (out x r) is zero, so the
update is exactly zero at init. Trainable parameters per layer: r * (in + out).
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
class LoRAOptions(MethodOptions):
    """``r``: rank; ``alpha``: scaling alpha / r (None: alpha = r, scaling 1); ``dropout`` on the
    adapter input."""


class LoRAUpdate(Update):
    @staticmethod
    def param_shapes(out_features, in_features, opts):
        return {"lora_A": (opts.r, in_features), "lora_B": (out_features, opts.r)}

    @classmethod
    def build(cls, out_features, in_features, opts, bases=None, base_weight=None):
        return cls(out_features, in_features, opts.r, opts.scaling)

    def __init__(self, out_features: int, in_features: int, r: int, scaling: float):
        super().__init__()
        self.out_features, self.in_features, self.r, self.scaling = out_features, in_features, r, scaling
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        # the scaling goes on B (out x r), not on the T x out output: one elementwise pass over the
        # activations fewer, forward and backward
        up = self.lora_B if self.scaling == 1.0 else self.lora_B * self.scaling
        return F.linear(F.linear(x, self.lora_A), up)


METHOD = Method("lora", LoRAOptions, LoRAUpdate, per_layer=("r", "alpha"))
