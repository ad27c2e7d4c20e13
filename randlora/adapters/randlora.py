"""RandLoRA (Albert et al., ICLR 2025): full-rank updates from shared random bases.

For a weight W0 of shape (out, in), let m = min(out, in), M = max(out, in), n = ceil(m / r):

    dW = s * sum_{j=1..n} B_j diag(lambda_j) A diag(gamma_j)            (oriented to (out, in))

* B_j (M x r): frozen, a different one per j; A (r x m): frozen, shared by all j.
* lambda_j (r) and gamma_j (m) are trained; gamma always sits on the *smaller* side m.
* Trainable parameters per layer: n * (r + m).  n * r >= m, so dW is full rank (generically).
* s = alpha / r, times 1 / sqrt(n) when ``scale_sqrt_n`` is set (the paper's LLM preset).
* Init (default, as PEFT and the paper's LLM code): lambda = 0, gamma = 1 / m, so dW = 0 and
  dW has rank r after the first step, full rank from the second. ``init="vision"`` is the
  paper's vision code: lambda = 1 / n, gamma = 0 (full rank from the first step).

Storage. One global B stack Bs (n_max * r rows x M_max columns) and one A (r x m_max) serve every
layer, which slices its top-left corner (rows < n*r of Bs, rows < r of A): memory for bases does not
grow with depth. ``lambda_`` has shape (r, n): lambda_j is its column j; ``gamma`` (n, m). The scaled
A~ (n*r x m) has row i = lambda[k, j] A_k diag(gamma_j) with k = i // n, j = i % n (rank-major), and
Bs row i is paired with A~ row i: column k of B_j is Bs row k*n + j. The update is Bs[:n*r]^T A~ when
in == m, and A~^T Bs[:n*r] when out == m. This is HF PEFT's pairing (its scaled A is (r, n, m)
flattened, its B (M, n, r) flattened), so one shared B stack serves layers with different n in both
libraries and the PEFT export is a reshape.

``layout="basis_major"``: adapters created before the rank-major layout (records without a ``layout``
option mean it) keep computing what they computed: ``lambda_`` (n, r), A~ row i = lambda[j, k] A_k
diag(gamma_j) with j = i // r, k = i % r, so column k of B_j is Bs row j*r + k. The same bases, the
same sum; only which B row meets which (rank, basis) pair differs, and with it the trained values.

Compute paths (``path=``):
* ``factorised``: y = W0 x + s Bs^T (A~ x) (or the mirrored form); a custom autograd function
  saves x (which the base linear keeps anyway) and lambda / gamma, and rebuilds A~ in
  backward, so the (n*r x m) A~ is never kept; the (T x n*r) hidden activation is kept only
  when out < in, where recomputing it would be the largest GEMM of the path.
* ``merged``: y = (W0 + s dW) x in one GEMM; backward rebuilds dW, so nothing but x is kept.
  Its cost does not grow with the token count T through the adapter, so it wins for large T.
* ``auto`` (default): per call, the cheaper of the two by a FLOP count of forward + backward
  (or forward only when no gradient is needed), the factorised count weighted by the measured
  per-FLOP cost of its GEMMs on the device (``FACTORISED_COST``). ``last_path`` says which ran.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bases import DISTRIBUTIONS, SharedBases, draw_basis
from .layers import Update, as_dtype
from .options import Method, MethodOptions, function_option

PATHS = ("auto", "factorised", "merged")
# Time per FLOP of the factorised path relative to the merged one, by device type, for path="auto".
# CPU: 1 (the FLOP count alone picked the faster path in benchmarks/results/layer.md). CUDA (H100, bf16,
# benchmarks/results/gpu/layer_h100_bf16.md): counted as in choose_path, the merged path ran at
# 320-480 TFLOP/s and the factorised one at 155-175 on LLaMA-width layers at 2,048 tokens (ratio
# 2.05 at 4096 x 4096, 2.8 at 14336 x 4096), so by FLOPs alone auto chose the slower path there
# (4096 x 4096: 2.2 ms vs 1.5 ms; 14336 x 4096: 4.0 vs 3.5 ms).
# Measured for bf16 training steps; applied to every dtype and to forward-only calls alike.
FACTORISED_COST = {"cpu": 1.0, "cuda": 2.5}
INITS = ("default", "vision")
LAYOUTS = ("rank_major", "basis_major")


def num_bases(out_features: int, in_features: int, r: int) -> int:
    return math.ceil(min(out_features, in_features) / r)


BASES_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RandLoRAOptions(MethodOptions):
    """RandLoRA's options (the math is in the module docstring).

    ``alpha``: s = alpha / r (times 1 / sqrt(n) with ``scale_sqrt_n``); None: alpha = 10, the paper's
    vision / vision-language preset 10 / r. The LLM preset is alpha = 2r with ``scale_sqrt_n``.
    ``init``: ``default`` (lambda = 0, gamma = 1/m) or ``vision`` (lambda = 1/n, gamma = 0).
    ``distribution`` of the bases (``uniform``, ``normal``, ``binary``, ``sparse``, ``very_sparse``) and
    ``sparsity`` s with P(+-1) = 1/s (None: 6 for sparse, sqrt(m_max) for very_sparse).
    ``path``: ``auto`` | ``factorised`` | ``merged`` (see ``RandLoRAUpdate.choose_path``).
    ``bases_dtype``: storage of the bases, ``float32`` or a 16-bit type (the float32 draw rounded once).
    ``seed``: the bases' generator seed.
    ``layout``: which row of the shared B stack meets which (rank, basis) pair (module docstring):
    ``rank_major`` (PEFT's pairing; ``lambda_`` (r, n)) for every new adapter; ``basis_major`` (``lambda_``
    (n, r)) is what adapters written before it computed, and what a stored record without it means.
    """

    # what a stored record (adapter file, checkpoint) that predates ``layout`` was computed with
    LEGACY = {"layout": "basis_major"}

    seed: int = 0
    scale_sqrt_n: bool = function_option(False, "divide the scaling by sqrt(n)")
    init: str = "default"
    distribution: str = "uniform"
    sparsity: float | None = None
    path: str = "auto"
    bases_dtype: str = "float32"
    layout: str = function_option("rank_major", "B-stack row i meets rank row i // n, basis i % n (PEFT's)")

    def default_alpha(self) -> float:
        return 10.0

    def validate(self):
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown basis distribution {self.distribution!r}; choose one of {list(DISTRIBUTIONS)}")
        if self.sparsity is not None and not (isinstance(self.sparsity, (int, float)) and self.sparsity >= 2):
            raise ValueError(f"sparsity s must be >= 2 (P(+-1) = 1/s each), got {self.sparsity!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown RandLoRA init {self.init!r}; choose one of {list(INITS)}")
        if self.path not in PATHS:
            raise ValueError(f"unknown RandLoRA path {self.path!r}; choose one of {list(PATHS)}")
        if self.bases_dtype not in BASES_DTYPES:
            raise ValueError(f"bases_dtype={self.bases_dtype!r} is unknown; choose one of {list(BASES_DTYPES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown RandLoRA layout {self.layout!r}; choose one of {list(LAYOUTS)} (basis_major "
                             "only to keep computing an adapter trained before rank_major existed)")


def make_randlora_bases(shapes: list[tuple[int, ...]], r: int, seed: int, distribution: str = "uniform",
                        sparsity: float | None = None, dtype: str = "float32") -> SharedBases:
    """One B stack and one A for all target shapes, drawn from a generator seeded with ``seed``.

    ``shapes``: (out, in) per layer, or (out, in, r_layer) where a layer has its own rank; A then has
    max r_layer rows and the B stack max n_layer * r_layer rows, and each layer slices its corner (with
    one rank everywhere this is the same draw as without per-layer ranks).
    For ``very_sparse`` the sparsity defaults to s = sqrt(m_max) (the paper's "sqrt(D)" row,
    e.g. sqrt(768) for ViT-B: 93 % zeros); ``sparse`` defaults to s = 6 (66 % zeros).
    """
    layers = [(s[0], s[1], s[2] if len(s) > 2 else r) for s in shapes]
    m_max = max(min(o, i) for o, i, _ in layers)
    big_max = max(max(o, i) for o, i, _ in layers)
    rows = max(num_bases(o, i, rl) * rl for o, i, rl in layers)
    r_max = max(rl for _, _, rl in layers)
    if distribution == "very_sparse" and sparsity is None:
        sparsity = math.sqrt(m_max)
    if distribution == "sparse" and sparsity is None:
        sparsity = 6.0
    g = torch.Generator().manual_seed(int(seed))
    b = draw_basis((rows, big_max), g, distribution, sparsity)
    a = draw_basis((r_max, m_max), g, distribution, sparsity)
    if distribution in ("sparse", "very_sparse"):
        # The shared A has only r rows: a column of A that is all zero (probability (1 - 2/s)^r, 64 % at
        # r = 6, s = sqrt(768)) zeroes that whole line of every dW and caps the rank below min(D, d).
        # Redraw such columns from the same ternary law until each has a nonzero entry.
        # (B's columns have n_max * r ~ d entries, so this matters only at toy sizes; done for both.)
        for t in (a, b):
            while True:
                dead = (t == 0).all(dim=0)
                if not dead.any():
                    break
                t[:, dead] = draw_basis((t.shape[0], int(dead.sum())), g, distribution, sparsity)
    spec = {"method": "randlora", "seed": int(seed), "A": [r_max, m_max], "B": [rows, big_max],
            "distribution": distribution, "sparsity": sparsity, "dtype": dtype}
    # drawn in float32 from the same generator whatever the storage: 16-bit bases are the float32
    # ones rounded once, so every run with this seed and dtype has the same bases
    return SharedBases({"A": a.to(BASES_DTYPES[dtype]), "B": b.to(BASES_DTYPES[dtype])}, spec)


def _scaled_a(lam: torch.Tensor, gam: torch.Tensor, a: torch.Tensor, rank_major: bool = True) -> torch.Tensor:
    """A~, shape (n*r, m), row i = lambda_{k,j} A_k diag(gamma_j): rank-major (lambda (r, n); k = i // n,
    j = i % n) or basis-major (lambda (n, r); j = i // r, k = i % r). Plain ops, no graph kept."""
    if rank_major:
        out = lam[:, :, None] * a[:, None, :]   # (r, n, m)
        out.mul_(gam[None])                      # one temporary, not two
    else:
        out = lam[:, :, None] * a[None]          # (n, r, m)
        out.mul_(gam[:, None, :])
    return out.reshape(-1, a.shape[1])


def _grad_lambda_gamma(g_scaled: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, a: torch.Tensor,
                       inplace: bool = False, rank_major: bool = True):
    """Pull the gradient of A~ back to lambda and gamma (n, m) with two batched matmuls over the bases j.
    ``inplace``: ``g_scaled`` is a temporary of the caller and may be overwritten."""
    if rank_major:
        r, n = lam.shape
        g3 = g_scaled.reshape(r, n, -1)
        ga = (g3.mul_(a[:, None, :]) if inplace else g3 * a[:, None, :]).transpose(0, 1)  # (n, r, m) view
        g_lam = torch.bmm(ga, gam[:, :, None]).squeeze(-1).t().contiguous()              # (r, n)
        g_gam = torch.bmm(lam.t()[:, None, :], ga).squeeze(1)
        return g_lam, g_gam
    n, r = lam.shape
    g3 = g_scaled.reshape(n, r, -1)
    ga = g3.mul_(a[None]) if inplace else g3 * a[None]  # (n, r, m)
    g_lam = torch.bmm(ga, gam[:, :, None]).squeeze(-1)
    g_gam = torch.bmm(lam[:, None, :], ga).squeeze(1)
    return g_lam, g_gam


class _ScaledBases(torch.autograd.Function):
    """A~ with a backward that keeps only lambda and gamma (A is a resident buffer)."""

    @staticmethod
    def forward(ctx, lam, gam, a, rank_major=True):
        ctx.save_for_backward(lam, gam, a)
        ctx.rank_major = rank_major
        return _scaled_a(lam, gam, a, rank_major)

    @staticmethod
    def backward(ctx, g):
        lam, gam, a = ctx.saved_tensors
        g_lam, g_gam = _grad_lambda_gamma(as_dtype(g, lam.dtype), lam, gam, as_dtype(a, lam.dtype), rank_major=ctx.rank_major)
        return g_lam, g_gam, None, None


class _Factorised(torch.autograd.Function):
    """y = s * x dW^T without storing A~; the (T x n*r) hidden activation is kept only when
    out < in, where recomputing it would be the largest GEMM of the path (2*T*in*n*r)."""

    @staticmethod
    def forward(ctx, x, lam, gam, a, b, scaling, in_small, dtype, rank_major=True):
        x2 = as_dtype(x.reshape(-1, x.shape[-1]), dtype)
        sa = as_dtype(_scaled_a(lam, gam, a, rank_major).mul_(scaling), dtype)  # s folded into A~, not the output
        bd = as_dtype(b, dtype)
        h = None
        if in_small:   # dW = Bs^T A~ : x -> A~ -> Bs
            y = (x2 @ sa.t()) @ bd
        else:          # dW = A~^T Bs : x -> Bs -> A~
            h = x2 @ bd.t()                        # (T, n*r), kept for backward
            y = h @ sa
        del sa
        ctx.save_for_backward(x, lam, gam, a, b, h)
        ctx.scaling, ctx.in_small, ctx.dtype, ctx.rank_major = scaling, in_small, dtype, rank_major
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, lam, gam, a, b, h = ctx.saved_tensors
        dt, s = ctx.dtype, ctx.scaling
        g2 = as_dtype(gy.reshape(-1, gy.shape[-1]), dt)
        sa = as_dtype(_scaled_a(lam, gam, a, ctx.rank_major).mul_(s), dt)  # s * A~, as in forward
        bd = as_dtype(b, dt)
        if ctx.in_small:
            gh = g2 @ bd.t()                       # (T, n*r)
            gx = gh @ sa if ctx.needs_input_grad[0] else None
            del sa
            g_sa = gh.t() @ as_dtype(x.reshape(-1, x.shape[-1]), dt)  # (n*r, in): gradient of s * A~
        else:
            g_sa = h.t() @ g2                      # (n*r, out)
            gx = (g2 @ sa.t()) @ bd if ctx.needs_input_grad[0] else None
            del sa
        g_sa = as_dtype(g_sa, lam.dtype).mul_(s)          # gradient of A~ (scaled on the small side, not gy)
        g_lam, g_gam = _grad_lambda_gamma(g_sa, lam, gam, as_dtype(a, lam.dtype), inplace=True, rank_major=ctx.rank_major)
        if gx is not None:
            gx = as_dtype(gx.reshape(x.shape), x.dtype)
        return gx, g_lam, g_gam, None, None, None, None, None, None


def _w_eff(weight, lam, gam, a, b, scaling, in_small, dtype, rank_major=True):
    """W0 + s dW in one addmm (no separate dW temporary)."""
    sa = as_dtype(_scaled_a(lam, gam, a, rank_major), dtype)
    bd = as_dtype(b, dtype)
    if in_small:
        return torch.addmm(as_dtype(weight, dtype), bd.t(), sa, alpha=scaling)
    return torch.addmm(as_dtype(weight, dtype), sa.t(), bd, alpha=scaling)


class _Merged(torch.autograd.Function):
    """y = x (W0 + s dW)^T + bias in one GEMM; backward rebuilds dW, keeps only x."""

    @staticmethod
    def forward(ctx, x, weight, bias, lam, gam, a, b, scaling, in_small, dtype, rank_major=True):
        w_eff = _w_eff(weight, lam, gam, a, b, scaling, in_small, dtype, rank_major)
        y = F.linear(as_dtype(x, dtype), w_eff, None if bias is None else as_dtype(bias, dtype))
        ctx.save_for_backward(x, weight, lam, gam, a, b)
        ctx.scaling, ctx.in_small, ctx.dtype, ctx.rank_major = scaling, in_small, dtype, rank_major
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, lam, gam, a, b = ctx.saved_tensors
        dt, s = ctx.dtype, ctx.scaling
        g2 = as_dtype(gy.reshape(-1, gy.shape[-1]), dt)
        x2 = as_dtype(x.reshape(-1, x.shape[-1]), dt)
        gx = None
        if ctx.needs_input_grad[0]:
            w_eff = _w_eff(weight, lam, gam, a, b, s, ctx.in_small, dt, ctx.rank_major)
            gx = as_dtype((g2 @ w_eff).reshape(x.shape), x.dtype)
            del w_eff
        g_dw = g2.t() @ x2                         # (out, in)
        bd = as_dtype(b, dt)
        g_sa = bd @ g_dw if ctx.in_small else bd @ g_dw.t()
        del g_dw
        g_sa.mul_(s)                               # scale the (n*r x m) result, not the (out x in) gW
        g_lam, g_gam = _grad_lambda_gamma(as_dtype(g_sa, lam.dtype), lam, gam, as_dtype(a, lam.dtype), inplace=True,
                                          rank_major=ctx.rank_major)
        # a bias someone unfroze by hand still gets its gradient (the adapter never trains it)
        g_bias = as_dtype(g2.sum(0), ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return gx, None, g_bias, g_lam, g_gam, None, None, None, None, None, None


class RandLoRAUpdate(Update):
    chooses_path = True

    @staticmethod
    def param_shapes(out_features, in_features, opts):
        n = num_bases(out_features, in_features, opts.r)
        lam = (opts.r, n) if opts.layout == "rank_major" else (n, opts.r)
        return {"lambda_": lam, "gamma": (n, min(out_features, in_features))}

    @classmethod
    def build(cls, out_features, in_features, opts, bases, base_weight=None):
        return cls(out_features, in_features, opts.r, opts.alpha, bases, opts.scale_sqrt_n, opts.init, opts.path,
                   opts.layout)

    def __init__(self, out_features: int, in_features: int, r: int, alpha: float, bases: SharedBases,
                 scale_sqrt_n: bool = False, init: str = "default", path: str = "auto", layout: str = "rank_major"):
        super().__init__()
        self.out_features, self.in_features, self.r = out_features, in_features, r
        self.m = min(out_features, in_features)
        self.big = max(out_features, in_features)
        self.n = num_bases(out_features, in_features, r)
        self.in_small = in_features <= out_features
        self.scaling = alpha / r / (math.sqrt(self.n) if scale_sqrt_n else 1.0)
        self.path = path
        if layout not in LAYOUTS:
            raise ValueError(f"unknown RandLoRA layout {layout!r}; choose one of {LAYOUTS}")
        self.rank_major = layout == "rank_major"
        object.__setattr__(self, "bases", bases)  # a reference, not a submodule: stored once on the root
        shape = (r, self.n) if self.rank_major else (self.n, r)
        if init == "default":
            lam = torch.zeros(shape)
            gam = torch.full((self.n, self.m), 1.0 / self.m)
        elif init == "vision":
            lam = torch.full(shape, 1.0 / self.n)
            gam = torch.zeros(self.n, self.m)
        else:
            raise ValueError(f"unknown RandLoRA init {init!r}; choose one of {INITS}")
        self.lambda_ = nn.Parameter(lam)
        self.gamma = nn.Parameter(gam)

    def _slices(self, dtype=None, b_dtype=None):
        """Views of this layer's corner of the shared bases. ``b_dtype``: the B stack in the GEMM
        dtype, from the bases' cast cache (one bf16 copy per model, not a cast per call)."""
        a = self.bases.corner("A", dtype, self.r, self.m)
        b = self.bases.corner("B", b_dtype or dtype, self.n * self.r, self.big)
        return a, b

    def delta_weight(self) -> torch.Tensor:
        a, b = self._slices(self.lambda_.dtype)
        sa = _ScaledBases.apply(self.lambda_, self.gamma, a, self.rank_major)
        dw = b.t() @ sa if self.in_small else sa.t() @ b
        return dw * self.scaling

    def choose_path(self, tokens: int, needs_grad: bool, device_type: str = "cpu") -> str:
        if self.path != "auto":
            return self.path
        o, i, k = self.out_features, self.in_features, self.n * self.r
        if needs_grad:  # 5 GEMMs of width k: 2 against the big side, 3 against the small side m
            factorised = 2 * tokens * k * (2 * max(o, i) + 3 * min(o, i))
            merged = 6 * o * i * k + 2 * tokens * o * i
        else:
            factorised = 2 * tokens * k * (o + i)
            merged = 2 * o * i * k
        factorised *= FACTORISED_COST.get(device_type, 1.0)
        return "merged" if merged < factorised else "factorised"

    def branch(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dt = dtype or self.compute_dtype(x, self.lambda_)
        a, b = self._slices(b_dtype=dt)  # A (r x m, small) stays fp32: lambda / gamma math in fp32
        return _Factorised.apply(x, self.lambda_, self.gamma, a, b, self.scaling, self.in_small, dt, self.rank_major)

    def linear(self, x: torch.Tensor, base: nn.Linear, dropout: nn.Module) -> torch.Tensor:
        x = self.autocast_input(x)
        needs_grad = torch.is_grad_enabled() and (self.lambda_.requires_grad or x.requires_grad)
        path = self.choose_path(x.numel() // max(x.shape[-1], 1), needs_grad, x.device.type)
        if not isinstance(dropout, nn.Identity) or base.weight.requires_grad:
            path = "factorised"  # the update sees dropout(x) / a trained base needs its own grad
        self.last_path = path
        # adapter GEMMs in the base layer's compute dtype (bf16 models stay bf16), lambda/gamma fp32
        dt = self.compute_dtype(x, base.weight)
        if path == "factorised":
            out = base(x)
            return out + self.branch(dropout(x), dt).to(out.dtype)
        a, b = self._slices(b_dtype=dt)
        y = _Merged.apply(x, base.weight, base.bias, self.lambda_, self.gamma, a, b,
                          self.scaling, self.in_small, dt, self.rank_major)
        return y


METHOD = Method("randlora", RandLoRAOptions, RandLoRAUpdate,
                make_bases=lambda layers, opts: make_randlora_bases([(o, i, lo.r) for o, i, lo in layers], opts.r,
                                                                    opts.seed, opts.distribution, opts.sparsity,
                                                                    opts.bases_dtype),
                per_layer=("r", "alpha"))
