"""Wrappers that put a weight update next to a frozen base layer.

Two kinds of target exist:

* ``AdaptedLinear`` wraps an ``nn.Linear`` (timm's fused ``qkv``, LLaMA's ``q_proj`` ...).
  The update decides how to compute ``base(x) + x dW^T`` (factorised or merged).
* ``AdaptedParameter`` wraps any module whose 2-D weight *parameter* is used directly by
  its forward (``nn.MultiheadAttention.in_proj_weight`` in open_clip's CLIP). The module is
  called through ``torch.func.functional_call`` with ``W0 + dW`` in place of ``W0``, so the
  update stays in the autograd graph. (The official RandLoRA code wrote ``W0 + dW`` into
  ``.data`` here, which silently cut the attention adapters out of training.)

Both expose ``merge()`` / ``unmerge()`` that fold ``dW`` into the base weight in place.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


class Update(nn.Module):
    """A method's per-layer trainable update of an ``(out_features, in_features)`` weight.

    Subclasses implement ``delta_weight()`` (the scaled dW, shape (out, in), in float32 or
    the parameters' dtype) and may override ``branch(x)`` (= x dW^T, computed cheaply) and
    ``linear(x, base, dropout)`` (the whole adapted linear, for fused paths).
    """

    out_features: int
    in_features: int

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.delta_weight().to(x.dtype).t()

    def linear(self, x: torch.Tensor, base: nn.Linear, dropout: nn.Module) -> torch.Tensor:
        x = self.autocast_input(x)
        out = base(x)
        return out + self.branch(dropout(x)).to(out.dtype)

    @staticmethod
    def autocast_input(x: torch.Tensor) -> torch.Tensor:
        """Under autocast, the low-precision copy of ``x`` that autocast would make inside the base
        linear, made once here so the base layer and the update both use (and keep for backward)
        the same copy. On CUDA, LayerNorm outputs float32 under autocast, so without this every
        adapted layer after a norm kept one float32 or two bf16 copies of its input."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            dt = torch.get_autocast_dtype(dev)  # float64 is left alone, as autocast itself does
            if x.dtype != dt:
                return x.to(dt)
        return x

    @staticmethod
    def compute_dtype(x: torch.Tensor, param: torch.Tensor) -> torch.dtype:
        """The dtype adapter matmuls run in: the autocast dtype when autocast is on,
        otherwise the adapter parameters' dtype (fp32 master weights)."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return param.dtype


class _Wrapper(nn.Module):
    """Common state of the two wrappers: the frozen base, the update, the merged flag."""

    def __init__(self, base_layer: nn.Module, update: Update, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.update = update
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def __getattr__(self, name):
        # Code around a wrapped layer may read attributes of the original
        # (``q_proj.weight.dtype``, ``attn.batch_first`` ...): forward them to the base.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def _base_weight(self) -> nn.Parameter:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self._base_weight()
        delta = self.update.delta_weight().to(device=w.device, dtype=torch.float32).to(w.dtype)
        if getattr(self.update, "delta_depends_on_base", False):
            self._merged_delta = delta  # DoRA's dW is a function of W0: keep it to undo exactly
        w.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self._base_weight()
        delta = self.__dict__.pop("_merged_delta", None)
        if delta is None:
            delta = self.update.delta_weight().to(device=w.device, dtype=torch.float32).to(w.dtype)
        w.sub_(delta)
        self.merged = False


class AdaptedLinear(_Wrapper):
    def __init__(self, base_layer: nn.Linear, update: Update, dropout: float = 0.0):
        super().__init__(base_layer, update, dropout)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def _base_weight(self):
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.update.linear(x, self.base_layer, self.dropout)


class AdaptedParameter(_Wrapper):
    """Adapts ``getattr(base_layer, param_name)`` (a 2-D ``(out, in)`` weight)."""

    def __init__(self, base_layer: nn.Module, param_name: str, update: Update, dropout: float = 0.0):
        if dropout > 0:
            raise ValueError(
                f"dropout={dropout} is not supported on a fused-parameter target "
                f"({type(base_layer).__name__}.{param_name}): its input is not a separate tensor; "
                "set dropout=0 or target Linear layers instead")
        super().__init__(base_layer, update, 0.0)
        self.param_name = param_name
        w = getattr(base_layer, param_name)
        self.out_features, self.in_features = w.shape

    def _base_weight(self):
        return getattr(self.base_layer, self.param_name)

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        w = self._base_weight()
        w_eff = w + self.update.delta_weight().to(w.dtype)
        return functional_call(self.base_layer, {self.param_name: w_eff}, args, kwargs)


ADAPTED_TYPES = (AdaptedLinear, AdaptedParameter)
