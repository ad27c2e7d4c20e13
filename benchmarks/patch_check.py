"""Evidence for the patch proposed to randlora/adapters/randlora.py (the library itself is untouched).

    python -m benchmarks.patch_check            # ~1-2 min on one CPU thread

It defines the proposed versions of the two autograd Functions locally, swaps them into the
library module for the duration of a measurement, checks that every gradient (input, lambda,
gamma) equals the library's, and compares forward + backward time (interleaved rounds, median)
and the peak memory of a fresh subprocess per variant (max RSS above the RSS before the step).

The proposal:
1. ``_Factorised`` on layers with out < in (fc2, c_proj, k/v_proj, down_proj): keep the
   (T x n*r) hidden ``h = x B^T`` for backward instead of recomputing it. The recompute is the
   largest GEMM of that path (2*T*in*n*r with in the big side); PEFT keeps the same tensor.
   Factorised then costs 2*T*k*(2*max + 3*min) on both orientations, which is also what
   ``choose_path`` should use (today it uses 2*T*k*(2*out + 3*in), too high after the patch
   and too low before it for out < in).
2. Fewer (n*r x m) temporaries: build A~ with one in-place multiply, free A~ as soon as the input
   gradient is done, project the gradient of A~ onto lambda / gamma in place, and in ``_Merged``
   fold W0 + s*dW into one ``addmm`` and free W_eff / gW early.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import randlora.adapters.randlora as RL


# -------------------------------------------------------------------------- proposed functions
def scaled_a(lam, gam, a):
    n, r = lam.shape
    out = lam[:, :, None] * a[None]
    out.mul_(gam[:, None, :])
    return out.reshape(n * r, a.shape[1])


def grad_lambda_gamma(g_scaled, lam, gam, a, inplace=False):
    n, r = lam.shape
    g3 = g_scaled.reshape(n, r, -1)
    ga = g3.mul_(a[None]) if inplace else g3 * a[None]
    return torch.bmm(ga, gam[:, :, None]).squeeze(-1), torch.bmm(lam[:, None, :], ga).squeeze(1)


class Factorised(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam, gam, a, b, scaling, in_small, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        sa = scaled_a(lam, gam, a).to(dtype)
        bd = b.to(dtype)
        h = None
        if in_small:
            y = (x2 @ sa.t()) @ bd
        else:
            h = x2 @ bd.t()          # kept for backward (T x n*r)
            y = h @ sa
        y.mul_(scaling)
        ctx.save_for_backward(x, lam, gam, a, b, h)
        ctx.scaling, ctx.in_small, ctx.dtype = scaling, in_small, dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, lam, gam, a, b, h = ctx.saved_tensors
        dt, s = ctx.dtype, ctx.scaling
        g2 = gy.reshape(-1, gy.shape[-1]).to(dt) * s
        sa = scaled_a(lam, gam, a).to(dt)
        bd = b.to(dt)
        if ctx.in_small:
            gh = g2 @ bd.t()
            gx = gh @ sa if ctx.needs_input_grad[0] else None
            del sa
            g_sa = gh.t() @ x.reshape(-1, x.shape[-1]).to(dt)
        else:
            g_sa = h.t() @ g2
            gx = (g2 @ sa.t()) @ bd if ctx.needs_input_grad[0] else None
            del sa
        g_lam, g_gam = grad_lambda_gamma(g_sa.to(lam.dtype), lam, gam, a.to(lam.dtype), inplace=True)
        if gx is not None:
            gx = gx.reshape(x.shape).to(x.dtype)
        return gx, g_lam, g_gam, None, None, None, None, None


def w_eff(weight, lam, gam, a, b, s, in_small, dt):
    sa = scaled_a(lam, gam, a).to(dt)
    bd = b.to(dt)
    if in_small:
        return torch.addmm(weight.to(dt), bd.t(), sa, alpha=s)
    return torch.addmm(weight.to(dt), sa.t(), bd, alpha=s)


class Merged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lam, gam, a, b, scaling, in_small, dtype):
        w = w_eff(weight, lam, gam, a, b, scaling, in_small, dtype)
        y = F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, weight, lam, gam, a, b)
        ctx.scaling, ctx.in_small, ctx.dtype = scaling, in_small, dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, lam, gam, a, b = ctx.saved_tensors
        dt, s = ctx.dtype, ctx.scaling
        g2 = gy.reshape(-1, gy.shape[-1]).to(dt)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        gx = None
        if ctx.needs_input_grad[0]:
            w = w_eff(weight, lam, gam, a, b, s, ctx.in_small, dt)
            gx = (g2 @ w).reshape(x.shape).to(x.dtype)
            del w
        g_dw = g2.t() @ x2
        bd = b.to(dt)
        g_sa = bd @ g_dw if ctx.in_small else bd @ g_dw.t()
        del g_dw
        g_sa.mul_(s)
        g_lam, g_gam = grad_lambda_gamma(g_sa.to(lam.dtype), lam, gam, a.to(lam.dtype), inplace=True)
        return gx, None, None, g_lam, g_gam, None, None, None, None, None


CURRENT = {"_Factorised": RL._Factorised, "_Merged": RL._Merged}
PROPOSED = {"_Factorised": Factorised, "_Merged": Merged}


def use(variant: str) -> None:
    for k, v in (PROPOSED if variant == "proposed" else CURRENT).items():
        setattr(RL, k, v)


# ------------------------------------------------------------------------------------ measuring
class One(nn.Module):
    def __init__(self, o, i):
        super().__init__()
        self.lin = nn.Linear(i, o)

    def forward(self, x):
        return self.lin(x)


def make(o, i, path, lora_r=32):
    from randlora.adapters import inject, match_budget
    torch.manual_seed(0)
    m = One(o, i)
    r = match_budget(m, "randlora", lora_r * (o + i), target_modules=["lin"])["r"]
    inject(m, "randlora", target_modules=["lin"], r=r, path=path)
    with torch.no_grad():  # a trained-looking adapter: nonzero lambda, varied gamma
        g = torch.Generator().manual_seed(2)
        m.lin.update.lambda_.copy_(torch.randn(m.lin.update.lambda_.shape, generator=g) * 0.1)
        m.lin.update.gamma.mul_(1 + torch.rand(m.lin.update.gamma.shape, generator=g))
    return m, r


def fwd_bwd(m, x, gy):
    x.grad = None
    for p in m.parameters():
        p.grad = None
    t0 = time.perf_counter()
    m(x).backward(gy)
    return time.perf_counter() - t0


def compare(o, i, T, path, reps):
    m, r = make(o, i, path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, i, generator=g).requires_grad_(True)
    gy = torch.randn(T, o, generator=g)
    times, grads = {"current": [], "proposed": []}, {}
    for rnd in range(reps + 1):
        for v in (("current", "proposed") if rnd % 2 == 0 else ("proposed", "current")):
            use(v)
            dt = fwd_bwd(m, x, gy)
            if rnd:
                times[v].append(dt)
            grads[v] = (x.grad.clone(), m.lin.update.lambda_.grad.clone(), m.lin.update.gamma.grad.clone())
    use("current")
    assert m.lin.update.last_path == path
    for a, b, name in zip(grads["current"], grads["proposed"], ("x", "lambda", "gamma")):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * a.abs().max().item(), msg=f"grad {name} differs")
    return r, {v: (statistics.median(t), min(t)) for v, t in times.items()}


def memory_child(o, i, T, path, variant):
    import resource
    torch.set_num_threads(1)
    use(variant)
    m, _ = make(o, i, path)
    x = torch.randn(T, i).requires_grad_(True)
    gy = torch.randn(T, o)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * 4096 / 2**20
    for _ in range(2):
        fwd_bwd(m, x, gy)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.patch_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7, help="timed rounds per case (median and min reported)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default="benchmarks/results/patch_check.md", help="Markdown copy ('' = none)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks import sysinfo
    lines = ["# Proposed randlora.py patch: one layer, forward + backward, current vs proposed", "",
             *sysinfo.describe(torch.device("cpu"),
                               "python -m benchmarks.patch_check " + " ".join(sys.argv[1:] if argv is None else argv)),
             f"- {args.reps} interleaved rounds + 1 warmup; 'extra MB' = max RSS of a fresh subprocess above its RSS "
             "before the two measured steps", ""]

    def out(line):
        print(line, flush=True)
        lines.append(line)

    cases = [(768, 3072, 197, "factorised"), (1024, 4096, 512, "factorised"), (4096, 14336, 128, "factorised"),
             (3072, 768, 197, "factorised"), (4096, 4096, 128, "factorised"), (3072, 3072, 2048, "merged")]
    out("| layer (out x in) | T | path | r | current ms (median / min) | proposed ms (median / min) "
        "| proposed / current (median / min) | current extra MB | proposed extra MB |")
    out("|---|---|---|---|---|---|---|---|---|")
    import multiprocessing as mp
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "randlora.adapters"])
    for o, i, T, path in cases:
        r, t = compare(o, i, T, path, args.reps)
        mem = {}
        if not args.no_memory:
            for v in ("current", "proposed"):
                with ctx.Pool(1, maxtasksperchild=1) as pool:
                    mem[v] = pool.apply(memory_child, (o, i, T, path, v))
        (cm, cn), (pm, pn) = t["current"], t["proposed"]
        out(f"| {o} x {i} | {T} | {path} | {r} | {cm * 1e3:.0f} / {cn * 1e3:.0f} | {pm * 1e3:.0f} / {pn * 1e3:.0f} "
            f"| {pm / cm:.2f} / {pn / cn:.2f} | {mem.get('current', float('nan')):.0f} | "
            f"{mem.get('proposed', float('nan')):.0f} |")
    out("")
    out("Gradients of x, lambda and gamma: equal to the library's (rtol 1e-4) in every case.")
    out(f"Load average at the end: {sysinfo.loadavg()}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
