"""Can the ternary ``very_sparse`` bases be exploited? Dense GEMM vs sparse (CSR) x dense for the two
basis products of RandLoRA's merged path: building dW = B^T A~ and projecting gW onto B.

    python -m benchmarks.sparse_bases [--device cuda] [--out benchmarks/results/sparse_bases.md]

Each product runs dense and sparse alternately in one process (median of ``--reps``); "useful
GFLOP/s" counts only the nonzeros' multiply-adds. The bases are the library's (``draw_basis``,
P(+-1) = 1/s each with s = sqrt(larger side), so density 2/s: 7 % at 768, 3 % at 4096).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings

import torch

from benchmarks import sysinfo
from randlora.adapters.bases import draw_basis

SHAPES = ((768, 768, 5), (3072, 768, 5), (4096, 4096, 2))


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(out: int, inn: int, reps: int, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    k, big, small = min(out, inn), max(out, inn), min(out, inn)
    b = draw_basis((k, big), g, "very_sparse", math.sqrt(big)).to(device, dtype)     # (n*r x big)
    a = torch.randn(k, small, generator=g).to(device, dtype)                          # scaled A~
    gw = torch.randn(big, small, generator=g).to(device, dtype)                       # weight gradient
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        bt_csr, b_csr = b.t().contiguous().to_sparse_csr(), b.to_sparse_csr()
    fns = {"dense dW": lambda: b.t() @ a, "sparse dW": lambda: torch.sparse.mm(bt_csr, a),
           "dense proj": lambda: b @ gw, "sparse proj": lambda: torch.sparse.mm(b_csr, gw)}
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    same = torch.allclose(fns["sparse dW"]().float(), fns["dense dW"]().float(), rtol=2e-2, atol=2e-2)
    med = {name: statistics.median(v) for name, v in times.items()}
    density = b.count_nonzero().item() / b.numel()
    flops = 2 * k * big * small
    return {"shape": f"{out} x {inn}", "k": k, "density": density, **med, "dense_gflops": flops / med["dense dW"] / 1e9,
            "sparse_gflops": density * flops / med["sparse dW"] / 1e9, "same": same}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparse_bases", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/sparse_bases.md")
    p.add_argument("--quick", action="store_true", help="the 768 x 768 shape, 1 repetition")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shapes = ((768, 768, 1),) if args.quick else SHAPES
    rows = [measure(o, i, r, device, dtype) for o, i, r in shapes]
    command = "python -m benchmarks.sparse_bases " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# very_sparse bases: dense GEMM vs sparse (CSR) x dense", "", *sysinfo.describe(device, command),
             f"- dtype {args.dtype}", "",
             "| layer | k = n·r | density | dense dW ms | sparse dW ms | sparse / dense | dense proj ms | sparse proj ms "
             "| sparse / dense | dense GFLOP/s | sparse useful GFLOP/s | same result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['k']} | {r['density']:.3f} | {r['dense dW'] * 1e3:.1f} | {r['sparse dW'] * 1e3:.1f} "
                     f"| {r['sparse dW'] / r['dense dW']:.2f} | {r['dense proj'] * 1e3:.1f} | {r['sparse proj'] * 1e3:.1f} "
                     f"| {r['sparse proj'] / r['dense proj']:.2f} | {r['dense_gflops']:.0f} | {r['sparse_gflops']:.1f} "
                     f"| {r['same']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    sysinfo.write_report(text, args.out)
    return rows


if __name__ == "__main__":
    main()
