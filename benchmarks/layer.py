"""Micro-benchmark of ONE adapted linear layer: RandLoRA's compute paths vs LoRA at equal parameters.

    python -m benchmarks.layer                       # d = 768 and 3072, several token counts, CPU
    python -m benchmarks.layer --device cuda --dtype bf16 --tokens 1024,4096,16384
    python -m benchmarks.layer --quick               # d = 64 / 128, seconds

Each row times forward + backward (input gradient included, as for any layer that is not the
first; no optimizer step) of an (out x in) layer on T tokens, interleaved across rows, median of
``--reps`` rounds. Rows: the frozen base layer alone, full fine-tuning (weight gradient), LoRA
r=32, VeRA r=256, our RandLoRA with path factorised / merged / auto (r from ``match_budget`` at
LoRA r=32's parameter count) and PEFT's RandLoRA at the same r (if peft is installed).

Next to the times it prints the FLOP and byte count of the GEMMs each path runs (our reading
of the code in randlora/adapters/randlora.py), the arithmetic intensity, the achieved GFLOP/s
and the prediction "model FLOPs / LoRA's" against the measured "time / LoRA's". Cost model
(k = n*r ~ m = min(in, out) columns of the flattened bases, square d x d layer):

    frozen base  fwd 2Td^2 + input grad 2Td^2                      = 4 T d^2
    full FT      + weight gradient gW = gy^T x                     = 6 T d^2
    LoRA         4 T d^2 + 6 T r (in + out)                        ~ 4 T d^2
    factorised   4 T d^2 + 2 T k (2 out + 3 in)                    ~ 14 T d^2
                 (out < in: 4 T d^2 + 2 T k (3 out + 3 in): h = x B^T is recomputed in backward)
    merged       6 T d^2 + 6 out in k   (dW fwd, dW rebuilt bwd, B gW) ~ 6 T d^2 + 6 d^3

The lambda / gamma gradient is a projection of gW = gy^T x onto the bases (merged: B gW;
factorised: (gy B^T)^T x), which costs at least one weight-gradient-sized GEMM (2 T m k ~ 2 T d^2,
a lower bound for any exact algorithm: every gamma entry is a length-T inner product of x with a
rank-r mix of gy projections, n*m of them, each needing r multiply-adds per token). So at large T
the best exact RandLoRA costs what full fine-tuning costs, ~1.5x a LoRA layer, and more at
moderate T where the T-independent 6 d^3 (merged) or the 2.5x (factorised) dominates.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections import OrderedDict

import torch
from torch import nn

from benchmarks import sysinfo


def one_layer(d_out: int, d_in: int) -> nn.Module:
    """One ``nn.Linear`` named ``lin`` (the adapter target) inside a container."""
    return nn.Sequential(OrderedDict(lin=nn.Linear(d_in, d_out)))


# ----------------------------------------------------------------------------------- cost model
def gemms(row: str, T: int, o: int, i: int, r: int, k: int, path: str | None) -> list[tuple[int, int, int]]:
    """(M, K, N) of every GEMM a row runs in forward + backward (input grad included)."""
    base = [(T, i, o), (T, o, i)]                       # y = x W^T ; gx = gy W
    if row == "base":
        return base
    if row == "full":
        return base + [(o, T, i)]                       # gW = gy^T x
    if row == "lora":                                   # h = x A^T, y += h B^T ; gh, gB, gA, gx
        return base + [(T, i, r), (T, r, o), (T, o, r), (o, T, r), (r, T, i), (T, r, i)]
    if row == "vera":                                   # same GEMM shapes as LoRA at rank r (frozen A, B)
        return base + [(T, i, r), (T, r, o), (T, o, r), (T, r, i)]
    in_small = i <= o
    m, big = min(o, i), max(o, i)
    if path == "merged":                                # dW fwd, dW rebuilt for gx, gW, B gW
        return [(T, i, o), (T, o, i), (big, k, m), (big, k, m), (o, T, i), (k, big, m)]
    # factorised (ours and PEFT's): forward two GEMMs, backward three
    if in_small:
        return base + [(T, i, k), (T, k, o), (T, o, k), (T, k, i), (k, T, i)]
    if row == "peft":  # PEFT's plain autograd keeps h = x B^T; ours recomputes it (one more GEMM)
        return base + [(T, i, k), (T, k, o), (k, T, o), (T, o, k), (T, k, i)]
    return base + [(T, i, k), (T, k, o), (T, i, k), (k, T, o), (T, o, k), (T, k, i)]


def cost(row, T, o, i, r, k, path, itemsize) -> tuple[float, float]:
    """(FLOPs, bytes) of the GEMMs of one forward + backward (operands read once, result written once)."""
    g = gemms(row, T, o, i, r, k, path)
    flops = sum(2.0 * M * K * N for M, K, N in g)
    byts = sum(itemsize * (M * K + K * N + M * N) for M, K, N in g)
    return flops, byts


# ------------------------------------------------------------------------------------------ rows
def build_rows(o: int, i: int, lora_r: int, vera_r: int, device, dtype, with_peft: bool):
    from randlora.adapters import adapted_layers, inject, match_budget

    budget = lora_r * (o + i)
    probe = one_layer(o, i)
    rr = match_budget(probe, "randlora", budget, target_modules=["lin"], tolerance=0.5)["r"]  # one layer: one rank
    rows = {}

    def make(name, method, **opts):
        torch.manual_seed(0)
        m = one_layer(o, i)
        if method == "base":
            for p in m.parameters():
                p.requires_grad_(False)
        elif method == "peft":
            from peft import RandLoraConfig, get_peft_model
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = get_peft_model(m, RandLoraConfig(r=rr, target_modules=["lin"], save_projection=False))
        else:
            inject(m, method, **({} if method == "full" else dict(target_modules=["lin"], **opts)))
        m = m.to(device=device, dtype=dtype)  # adapters keep fp32 masters (ours) / are upcast (PEFT)
        params = sum(p.numel() for p in m.parameters() if p.requires_grad)
        upd = None
        if method in ("randlora",):
            upd = adapted_layers(m)[0][1].update
        rows[name] = dict(module=m, method=method, params=params, update=upd,
                          r={"lora": lora_r, "vera": vera_r, "randlora": rr, "peft": rr}.get(method),
                          times=[])

    make("frozen base", "base")
    make("full FT", "full")
    make("LoRA", "lora", r=lora_r)
    make("VeRA", "vera", r=vera_r)
    for p in ("factorised", "merged", "auto"):
        make(f"RandLoRA {p}", "randlora", r=rr, path=p)
    if with_peft:
        make("PEFT RandLoRA", "peft")
    return rows, rr


def fwd_bwd(module, x, gy, autocast, device, dtype):
    x.grad = None
    for p in module.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    if autocast:
        with torch.autocast(device.type, dtype=dtype):
            y = module(x)
    else:
        y = module(x)
    y.backward(gy.to(y.dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def bench_group(o, i, T, args, device, dtype, autocast, with_peft, log):
    rows, rr = build_rows(o, i, args.lora_r, args.vera_r, device, dtype, with_peft)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, i, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    gy = torch.randn(T, o, generator=g).to(device=device, dtype=dtype)
    names = list(rows)
    for rnd in range(args.warmup + args.reps):
        order = names if rnd % 2 == 0 else names[::-1]
        for n in order:
            dt = fwd_bwd(rows[n]["module"], x, gy, autocast, device, dtype)
            if rnd >= args.warmup:
                rows[n]["times"].append(dt)
    for row in rows.values():
        row["path"] = row["update"].last_path if row["update"] is not None else None
        row["module"] = row["update"] = None
    return rows, rr


def table(o, i, T, rows, rr, itemsize) -> tuple[list[str], dict]:
    k = math.ceil(min(o, i) / rr) * rr
    med = {n: statistics.median(r["times"]) for n, r in rows.items()}
    kind = {"frozen base": "base", "full FT": "full", "LoRA": "lora", "VeRA": "vera", "PEFT RandLoRA": "peft"}
    costs = {}
    for n, r in rows.items():
        path = r["path"] or ("factorised" if n == "PEFT RandLoRA" else None)
        costs[n] = cost(kind.get(n, "randlora"), T, o, i, r["r"] or 0, k, path, itemsize)
    lines = ["| row | r | trainable | path | model GFLOP | model MB | FLOP/byte | ms (median) | GFLOP/s "
             "| ms / LoRA | model FLOP / LoRA |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        f, b = costs[n]
        lines.append(f"| {n} | {r['r'] or '-'} | {r['params']:,} | {r['path'] or '-'} | {f / 1e9:.2f} | "
                     f"{b / 2**20:.1f} | {f / b:.0f} | {med[n] * 1e3:.1f} | {f / med[n] / 1e9:.1f} | "
                     f"{med[n] / med['LoRA']:.2f} | {f / costs['LoRA'][0]:.2f} |")
    best = min((n for n in rows if n.startswith("RandLoRA") and n != "RandLoRA auto"), key=lambda n: med[n])
    wgrad = med["full FT"] - med["frozen base"]
    extra = med[best] - med["LoRA"]
    summary = {
        "o": o, "i": i, "T": T, "randlora_r": rr, "k": k,
        "median_ms": {n: med[n] * 1e3 for n in rows},
        "auto_path": rows["RandLoRA auto"]["path"],
        "best_path": best.split()[-1],
        "best_vs_lora": med[best] / med["LoRA"],
        "auto_vs_lora": med["RandLoRA auto"] / med["LoRA"],
        "full_vs_lora": med["full FT"] / med["LoRA"],
        "extra_in_wgrad_units": extra / wgrad if wgrad > 0 else float("nan"),
        "peft_vs_auto": (med["PEFT RandLoRA"] / med["RandLoRA auto"]) if "PEFT RandLoRA" in med else float("nan"),
    }
    lines.append("")
    lines.append(f"RandLoRA r={rr} (n*r = {k}); auto chose **{summary['auto_path']}**, fastest measured path "
                 f"**{summary['best_path']}**: best RandLoRA / LoRA = {summary['best_vs_lora']:.2f}, auto / LoRA = "
                 f"{summary['auto_vs_lora']:.2f}, full FT / LoRA = {summary['full_vs_lora']:.2f}; "
                 f"RandLoRA's extra time over LoRA = {summary['extra_in_wgrad_units']:.2f} x (full FT - frozen base), "
                 f"i.e. in units of one measured weight-gradient GEMM"
                 + (f"; PEFT / ours auto = {summary['peft_vs_auto']:.2f}" if "PEFT RandLoRA" in med else "") + ".")
    return lines, summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.layer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None,
                   help="comma list of OUTxIN (default 768x768,3072x3072,768x3072; the last is ViT-B's fc2 / "
                        "CLIP's c_proj, where out < in flips RandLoRA's orientation)")
    p.add_argument("--tokens", default=None, help="comma list of token counts T (default per shape)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--vera-r", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="layer weight / input dtype; bf16/fp16 run under torch.autocast")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU, see run.py)")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT RandLoRA row")
    p.add_argument("--quick", action="store_true", help="d = 64 / 128, T = 64 / 256: seconds")
    p.add_argument("--out", default="benchmarks/results/layer.md", help="Markdown report ('' = none)")
    return p.parse_args(argv)


DEFAULT_TOKENS = {(768, 768): [128, 512, 2048, 8192], (3072, 3072): [128, 512, 2048], (768, 3072): [128, 512, 2048]}


def main(argv=None, log=print) -> dict:
    args = parse_args(argv)
    command = "python -m benchmarks.layer " + " ".join(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    autocast = dtype != torch.float32
    old_threads = torch.get_num_threads()
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        try:
            import peft  # noqa: F401
            with_peft = not args.no_peft
        except Exception:
            with_peft = False
        shapes = args.shapes or ("128x128,64x64" if args.quick else "768x768,3072x3072,768x3072")
        shapes = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")]
        header = sysinfo.describe(device, command)
        out_lines = ["# One adapted linear layer: RandLoRA paths vs LoRA at equal parameters", "", *header,
                     f"- settings: dtype {args.dtype}{' (autocast)' if autocast else ''}, forward + backward with "
                     f"input gradient, no optimizer step, {args.warmup} warmup + {args.reps} interleaved rounds, "
                     f"median; LoRA r={args.lora_r}, VeRA r={args.vera_r}, RandLoRA r from match_budget at LoRA's "
                     "parameter count; 'model' columns count only GEMMs (operands read once, result written once)",
                     ""]
        summaries = []
        t0 = time.perf_counter()
        for o, i in shapes:
            tokens = ([int(t) for t in args.tokens.split(",")] if args.tokens else
                      ([64, 256] if args.quick else DEFAULT_TOKENS.get((o, i), [128, 512, 2048])))
            for T in tokens:
                t1 = time.perf_counter()
                rows, rr = bench_group(o, i, T, args, device, dtype, autocast, with_peft, log)
                lines, summ = table(o, i, T, rows, rr, torch.finfo(dtype).bits // 8)
                summaries.append(summ)
                block = [f"## {o} x {i} layer, T = {T} tokens", "", *lines, ""]
                out_lines += block
                log("\n".join(block) + f"({time.perf_counter() - t1:.0f} s)\n")
        out_lines += summary_table(summaries)
        out_lines.append(f"\nload average at the end: {sysinfo.loadavg()}; wall time {time.perf_counter() - t0:.0f} s")
        md = "\n".join(out_lines) + "\n"
        sysinfo.write_report(md, args.out, log)
        return {"summaries": summaries, "markdown": md}
    finally:
        torch.set_num_threads(old_threads)


def summary_table(summaries) -> list[str]:
    lines = ["## Summary", "",
             "| layer | T | auto path | fastest path | best RandLoRA / LoRA | auto / LoRA | full FT / LoRA "
             "| RandLoRA extra in weight-grad GEMMs | PEFT / ours auto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['o']}x{s['i']} | {s['T']} | {s['auto_path']} | {s['best_path']} | {s['best_vs_lora']:.2f} "
                     f"| {s['auto_vs_lora']:.2f} | {s['full_vs_lora']:.2f} | {s['extra_in_wgrad_units']:.2f} "
                     f"| {s['peft_vs_auto']:.2f} |")
    return lines


if __name__ == "__main__":
    main()
