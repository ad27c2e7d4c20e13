"""Frozen random bases shared by every adapted layer of a model (VeRA, RandLoRA).

The bases are drawn once, on the CPU, in float32, from a dedicated ``torch.Generator``
seeded with the adapter seed, so the same seed gives bit-identical bases on every
machine, process and DDP rank. They live as *non-persistent* buffers of one module
attached to the root model (so ``model.to(device)`` moves them and the model's own
state dict does not grow); each adapted layer holds a plain reference to that module
and slices what it needs. Nothing per layer is ever copied.
"""
from __future__ import annotations

import math

import torch
from torch import nn

DISTRIBUTIONS = ("uniform", "normal", "binary", "sparse", "very_sparse")


def draw_basis(shape, generator: torch.Generator, distribution: str = "uniform",
               sparsity: float | None = None) -> torch.Tensor:
    """One float32 random tensor with zero mean and unit variance over the whole tensor.

    ``uniform`` / ``normal``: i.i.d. draws divided by the tensor's empirical std (the paper's
    "Kaiming then normalise" recipe; the Kaiming gain cancels). ``binary``: +-1 with equal
    probability. ``sparse`` / ``very_sparse``: ternary {-1, 0, +1} with P(+1) = P(-1) = 1/s
    (the paper's convention, sparsity 1 - 2/s), then normalised so nonzeros are +-sqrt(s/2).
    """
    if distribution == "uniform":
        t = torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1
    elif distribution == "normal":
        t = torch.randn(shape, generator=generator, dtype=torch.float32)
    elif distribution in ("binary", "sparse", "very_sparse"):
        s = 2.0 if distribution == "binary" else float(sparsity)
        if s < 2:
            raise ValueError(f"sparsity s={s} is invalid: P(+-1) = 1/s each needs s >= 2 "
                             f"(s=2 is binary, s=6 gives 66% zeros)")
        u = torch.rand(shape, generator=generator, dtype=torch.float32)
        t = torch.zeros(shape, dtype=torch.float32)
        t[u < 1 / s] = -1.0
        t[u >= 1 - 1 / s] = 1.0
        # exact population std of this ternary law, so every tensor is scaled the same way
        return t / math.sqrt(2.0 / s)
    else:
        raise ValueError(f"unknown basis distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    return t / t.std()


class SharedBases(nn.Module):
    """Holds the frozen bases of one injection as non-persistent buffers.

    ``spec`` records everything needed to regenerate them (method, seed, shapes,
    distribution) and is written into adapter metadata.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], spec: dict):
        super().__init__()
        self.spec = dict(spec)
        # the dtype the bases are stored in, whatever the model is cast to (float32 unless an adapter
        # option chose a 16-bit storage, e.g. RandLoRA's bases_dtype)
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) != 1:
            raise ValueError(f"shared bases must have one dtype, got {sorted(map(str, dtypes))}")
        self.storage_dtype = dtypes.pop()
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)
        self._cast_cache: dict = {}
        self._corner_cache: dict = {}

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The buffer, optionally cast; casts are cached so a bf16 copy is made once."""
        t = self._buffers[name]
        if dtype is None or t.dtype == dtype:
            return t
        if torch.compiler.is_compiling():  # a traced graph casts itself; data_ptr() would break the graph
            return t.to(dtype)
        key = (name, dtype, t.device, t.data_ptr())
        hit = self._cast_cache.get(key)
        if hit is None:
            self._cast_cache = {k: v for k, v in self._cast_cache.items() if k[0] != name or k[3] == t.data_ptr()}
            # built outside inference mode: a cast first made during evaluation (Lightning validates
            # under torch.inference_mode) must still be usable by a later training step's autograd
            with torch.inference_mode(False), torch.no_grad():
                hit = t.to(dtype)
            self._cast_cache[key] = hit
        return hit

    def corner(self, name: str, dtype: torch.dtype | None, *sizes: int | None) -> torch.Tensor:
        """``get(name, dtype)[:sizes[0], :sizes[1], ...]`` (a view; None keeps a whole dimension),
        cached per (name, dtype, sizes): each adapted layer asks for its corner on every call, and
        building the view (plus ``get``'s cache key) is host time a launch-bound GPU step waits on."""
        if torch.compiler.is_compiling():
            return self._view(name, dtype, sizes)
        key = (name, dtype, sizes)
        ptr = self._buffers[name].data_ptr()
        hit = self._corner_cache.get(key)
        if hit is not None and hit[0] == ptr:
            return hit[1]
        view = self._view(name, dtype, sizes)
        self._corner_cache[key] = (ptr, view)
        return view

    def _view(self, name: str, dtype: torch.dtype | None, sizes: tuple) -> torch.Tensor:
        return self.get(name, dtype)[tuple(slice(None, n) for n in sizes)]

    def invalidate(self) -> None:
        """Forget the casts and corner views (after the buffers were written in place)."""
        self._cast_cache = {}
        self._corner_cache = {}

    def _apply(self, fn, *args, **kwargs):
        # Follow device moves but keep the storage dtype (model.half() / .to(bf16) must not round
        # float32 bases, and model.float() must not double 16-bit ones); matmuls cast them on the fly
        # (cached, see ``get``).
        self.invalidate()
        out = super()._apply(fn, *args, **kwargs)
        for k, v in self._buffers.items():
            if v is not None and v.is_floating_point() and v.dtype != self.storage_dtype:
                self._buffers[k] = v.to(self.storage_dtype)
        return out

    def extra_repr(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._buffers.items()}
        return f"method={self.spec.get('method')}, seed={self.spec.get('seed')}, shapes={shapes}"
