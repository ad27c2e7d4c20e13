"""Wrappers that put a weight update next to a frozen base layer.

Two kinds of target exist:

* ``AdaptedLinear`` wraps an ``nn.Linear`` (timm's fused ``qkv``, LLaMA's ``q_proj`` ...).
  The update decides how to compute ``base(x) + x dW^T`` (factorised or merged).
* ``AdaptedParameter`` wraps any module whose 2-D weight *parameter* is used directly by
  its forward (``nn.MultiheadAttention.in_proj_weight`` in open_clip's CLIP).
  - Self-attention through an ``nn.MultiheadAttention`` (query, key and value the same tensor,
    no attention weights asked for: every CLIP block) runs the attention itself: the packed
    q/k/v projection goes through the update's ``linear`` like any Linear layer, so RandLoRA
    picks its factorised or merged path there too, then SDPA and the output projection,
    with ``nn.MultiheadAttention``'s mask semantics.
  - Any other call is made through ``torch.func.functional_call`` with ``W0 + dW`` in place of
    ``W0``, so the update stays in the autograd graph (it materialises dW every call). Under FSDP,
    where a plain attribute shadows the weight during forward, that attribute is swapped instead.
  (The official RandLoRA code wrote ``W0 + dW`` into ``.data`` here, which silently cut the
  attention adapters out of training.)

Both expose ``merge()`` / ``unmerge()`` that fold ``dW`` into the base weight in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is already that dtype (a no-op ``to`` still costs
    ~1 us of host time, and a launch-bound GPU step waits on the host)."""
    return t if t.dtype == dtype else t.to(dtype)


class Update(nn.Module):
    """A method's per-layer trainable update of an ``(out_features, in_features)`` weight.

    Subclasses implement

    * ``param_shapes(out, in, opts)``: the shape of every trained tensor, which the constructor
      allocates and from which parameter counts and budgets are derived (``buffer_shapes`` for
      persistent buffers a method keeps in its state, if any);
    * ``build(out, in, opts, bases, base_weight)``: the update of one layer from the method's
      options object, the shared bases (or None) and the frozen weight W0;
    * ``delta_weight()``: the scaled dW, shape (out, in), in float32 or the parameters' dtype;

    and may override ``branch(x)`` (= x dW^T, computed cheaply) and ``linear(x, base, dropout)``
    (the whole adapted linear, for fused paths). A method that picks a compute path per call sets
    ``chooses_path`` and records the path of the last call in ``last_path``. A method whose dW
    depends on W0 (DoRA) sets ``delta_depends_on_base`` and takes W0 in ``delta_weight``.
    """

    out_features: int
    in_features: int
    chooses_path = False
    last_path: str | None = None
    delta_depends_on_base = False

    @staticmethod
    def param_shapes(out_features: int, in_features: int, opts) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError  # pragma: no cover - abstract

    @staticmethod
    def buffer_shapes(out_features: int, in_features: int, opts) -> dict[str, tuple[int, ...]]:
        return {}

    @classmethod
    def build(cls, out_features: int, in_features: int, opts, bases, base_weight) -> "Update":
        raise NotImplementedError  # pragma: no cover - abstract

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
        """The dtype adapter matmuls run in: the autocast dtype when autocast is on (float64 inputs
        excepted: autocast leaves those alone), otherwise the adapter parameters' dtype (fp32 master
        weights)."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.dtype != torch.float64:
            return torch.get_autocast_dtype(dev)
        return param.dtype


class AdapterWrapper(nn.Module):
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

    def delta_weight(self) -> torch.Tensor:
        """This layer's dW. An update whose dW depends on W0 (DoRA) gets the base weight as the
        module holds it now, not a reference kept at injection: under FSDP the original Parameter
        is a shard view, and ``load_state_dict(assign=True)`` replaces it. A merged layer's W
        already holds W0 + dW, so the dW folded in at merge time is returned."""
        if not self.update.delta_depends_on_base:
            return self.update.delta_weight()
        if self.merged:
            return self.__dict__["_merged_delta"]
        return self.update.delta_weight(self._base_weight())

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self._base_weight()
        delta = self.delta_weight().to(device=w.device, dtype=w.dtype)
        if self.update.delta_depends_on_base:
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
            delta = self.delta_weight().to(device=w.device, dtype=w.dtype)
        w.sub_(delta)
        self.merged = False


class AdaptedLinear(AdapterWrapper):
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


class _PackedInProj:
    """``nn.MultiheadAttention``'s packed q/k/v projection seen as the Linear ``Update.linear`` expects
    (``weight``, ``bias`` and a call)."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# nn.MultiheadAttention.forward's parameters, in order
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
_MHA_ARG_NAMES = frozenset(_MHA_ARGS)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may not attend) as the additive float mask nn.MultiheadAttention makes."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


class AdaptedParameter(AdapterWrapper):
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
        b = base_layer
        # the configurations the self-attention path reproduces (a plain nn.MultiheadAttention)
        self._mha = (isinstance(b, nn.MultiheadAttention) and param_name == "in_proj_weight"
                     and b._qkv_same_embed_dim and b.bias_k is None and b.bias_v is None
                     and not b.add_zero_attn)

    def _base_weight(self):
        return getattr(self.base_layer, self.param_name)

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        if self._mha and len(args) <= len(_MHA_ARGS):
            call = dict(zip(_MHA_ARGS, args))
            if not call.keys() & kwargs.keys() and kwargs.keys() <= _MHA_ARG_NAMES:
                call.update(kwargs)
                out = self._self_attention(**call)
                if out is not None:
                    return out
        if self.update.chooses_path:
            self.update.last_path = "materialised"  # dW built in full for this call
        w = self._base_weight()
        w_eff = w + self.delta_weight().to(w.dtype)
        base, name = self.base_layer, self.param_name
        shadow = base.__dict__.get(name)
        if shadow is None:
            return functional_call(base, {name: w_eff}, args, kwargs)
        # FSDP (use_orig_params) shadows the registered Parameter, a shard, with a plain attribute
        # holding the gathered weight during forward. functional_call swaps only the registered
        # entry, so the module would read the shadow, W0, and drop the update without a word.
        base.__dict__[name] = w_eff
        try:
            return base(*args, **kwargs)
        finally:
            base.__dict__[name] = shadow

    def _self_attention(self, query, key=None, value=None, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True, is_causal=False):
        """nn.MultiheadAttention's self-attention with the q/k/v projection through the update's
        ``linear``; None when the call is outside what it reproduces (the caller falls back)."""
        mha = self.base_layer
        x = query
        if (key is not x or value is not x or need_weights or is_causal or x.dim() != 3 or x.is_nested
                or x.shape[-1] != mha.embed_dim):
            return None
        if not mha.batch_first:
            x = x.transpose(0, 1)
        n, length, e = x.shape
        h = mha.num_heads
        if any(m is not None and m.dtype != torch.bool and not m.is_floating_point()
               for m in (attn_mask, key_padding_mask)):
            return None  # integer masks: MultiheadAttention itself refuses them
        mask = None
        if attn_mask is not None:
            if attn_mask.shape == (length, length):
                mask = _additive_mask(attn_mask, query.dtype)
            elif attn_mask.shape == (n * h, length, length):
                mask = _additive_mask(attn_mask, query.dtype).view(n, h, length, length)
            else:
                return None  # a wrong shape: MultiheadAttention itself raises its error
        if key_padding_mask is not None:
            if key_padding_mask.shape != (n, length):
                return None
            pad = _additive_mask(key_padding_mask, query.dtype).view(n, 1, 1, length)
            mask = pad if mask is None else mask + pad
        qkv = self.update.linear(x, _PackedInProj(mha.in_proj_weight, mha.in_proj_bias), self.dropout)
        q, k, v = qkv.reshape(n, length, 3, h, e // h).permute(2, 0, 3, 1, 4).unbind(0)  # (n, h, L, e/h) each
        o = F.scaled_dot_product_attention(q, k, v, mask, mha.dropout if mha.training else 0.0)
        o = F.linear(o.transpose(1, 2).reshape(n, length, e), mha.out_proj.weight, mha.out_proj.bias)
        if not mha.batch_first:
            o = o.transpose(0, 1).contiguous()  # (L, N, E) laid out as MultiheadAttention returns it
        return o, None  # no attention weights (need_weights=False), so average_attn_weights is moot


ADAPTED_TYPES = (AdaptedLinear, AdaptedParameter)
