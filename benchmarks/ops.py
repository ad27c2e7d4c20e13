"""Operators per training step: what a launch-bound GPU step pays for, counted exactly.

    python -m benchmarks.ops                      # tiny ViT / CLIP / LLaMA, bf16 autocast, Markdown out
    python -m benchmarks.ops --models vit --methods lora,vera-same-r --dtype fp32

At ViT-B / CLIP B/32 sizes a bf16 step on an H100 is launch-bound (CLIP b128: 34 ms of GPU time in
a 90 ms step, benchmarks/RESULTS.md section 1): the host dispatches one operator after another and
the GPU waits. There the step time follows the number of operators each adapted layer runs, not its
FLOPs. This tool counts them with a ``TorchDispatchMode`` during one training step of every
configuration of ``benchmarks.run`` (same builders, budgets and targets, tiny widths: an operator
count does not depend on the width, only on the architecture and the compute path):

* ``compute``: operators that launch work (GEMMs, elementwise, casts, reductions), forward + backward;
* ``views``: metadata-only operators (view, t, unsqueeze ...): host time, no kernel;
* ``optimizer``: the AdamW step's operators (foreach kernels: a handful per dtype / device group);
* ``vs LoRA per layer``: (compute - ours LoRA's compute) / number of adapted layers.

The counts are exact and machine-independent; ``tests/test_benchmarks.py`` pins the VeRA one.
The RandLoRA path is what ``auto`` picks at the tiny size (usually factorised); the rows
``randlora-merged`` / ``randlora-factorised`` force a path.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import sysinfo
from benchmarks.models import MODELS, build
from benchmarks.run import PROFILES, Runner, instantiate, parse_choices, peft_available, plan
from randlora.adapters import compute_paths, format_paths

METHODS = ("full", "lora", "vera-same-r", "randlora", "randlora-merged", "randlora-factorised",
           "peft-lora", "peft-vera", "peft-randlora")
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "as_strided", "detach", "alias",
    "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "permute", "reshape", "_reshape_alias", "split",
    "unbind", "chunk", "split_with_sizes", "lift_fresh", "numpy_T", "_record_function_enter_new",
    "_record_function_exit", "diagonal", "narrow", "unflatten", "flatten", "view_as", "expand_as",
})


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active (forward and autograd's backward alike)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def compute(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in VIEW_OPS)

    @property
    def views(self) -> int:
        return sum(n for op, n in self.ops.items() if op in VIEW_OPS)


def count_step(spec, model, opt, runner: Runner, batch) -> dict:
    """Operators of one training step (after one warm-up step, so gradients and optimizer state
    exist and the counted step is a steady-state one)."""
    runner.step(spec, model, opt, batch)
    opt.zero_grad(set_to_none=True)
    with OpCounter() as fb:
        with runner.ctx():
            loss = spec.loss(model, batch)
        loss.backward()
    with OpCounter() as o:
        opt.step()
    return {"compute": fb.compute, "views": fb.views, "optimizer": o.compute + o.views, "ops": dict(fb.ops)}


def adapted_layer_count(model) -> int:
    from randlora.adapters import adapted_layers
    n = sum(1 for _ in adapted_layers(model))
    if n:
        return n
    return sum(1 for name, _ in model.named_modules() if name.endswith("base_layer"))  # PEFT's tuner layers


def run(models=MODELS, methods=METHODS, dtype: str = "bf16", log=print) -> dict:
    prof = PROFILES["quick"]
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    runner = Runner(torch.device("cpu"), dt, autocast=True)
    have_peft, _ = peft_available()
    out = {}
    for key in models:
        spec = build(key, "tiny", prof["batch"][key], prof["llama_layers"], prof["seq"])
        cfgs, _ = plan(spec, methods, prof["lora_r"], 256, have_peft)
        base = runner.prepare(spec.model)
        batch = spec.make_batch(runner.device, runner.dtype)
        rows = []
        for c in cfgs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = instantiate(spec, c, base, share=True)
                model = runner.prepare(model) if c.kind == "full" else model
            opt = runner.optimizer(model)
            res = count_step(spec, model, opt, runner, batch)
            res.update(label=c.label, method=c.method, layers=adapted_layer_count(model) if c.kind != "full" else 0)
            if c.impl == "ours" and c.kind == "randlora":
                res["paths"] = format_paths(compute_paths(model))
            rows.append(res)
            log(f"  [{key}] {c.label}: {res['compute']} compute ops, {res['views']} views, "
                f"{res['optimizer']} optimizer ops")
        lora = next((r for r in rows if r["method"] == "lora"), None)
        for r in rows:
            r["vs_lora_per_layer"] = ((r["compute"] - lora["compute"]) / r["layers"]
                                      if lora and r["layers"] and r["layers"] == lora["layers"] else None)
        out[key] = {"title": spec.title, "rows": rows}
    return out


def render(results: dict, header: list[str]) -> str:
    lines = ["# Operators per training step (forward + backward, AdamW step apart)", ""]
    lines += list(header)
    lines += ["- counted with a TorchDispatchMode on tiny widths (counts do not depend on width); "
              "see `python -m benchmarks.ops --help`", ""]
    for key, res in results.items():
        lines += [f"## {key}: {res['title']}", "",
                  "| configuration | adapted layers | compute ops | view ops | optimizer ops | "
                  "vs ours LoRA, per adapted layer | RandLoRA path |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            d = r["vs_lora_per_layer"]
            lines.append(f"| {r['label']} | {r['layers'] or '-'} | {r['compute']} | {r['views']} | "
                         f"{r['optimizer']} | {'-' if d is None else f'{d:+.1f}'} | {r.get('paths', '')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None, log=print) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {MODELS}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {METHODS}")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"],
                   help="bf16: bf16 weights under autocast, fp32 adapter masters (the GPU setting)")
    p.add_argument("--out", default="benchmarks/results/ops.md", help="Markdown report path ('' = none)")
    args = p.parse_args(argv)
    models = parse_choices(args.models, MODELS, "model")
    methods = parse_choices(args.methods, METHODS, "method")
    torch.set_num_threads(1)
    command = "python -m benchmarks.ops " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run(models, methods, args.dtype, log)
    md = render(results, sysinfo.describe(torch.device("cpu"), command))
    log("\n" + md)
    sysinfo.write_report(md, args.out, log)
    return results


if __name__ == "__main__":
    main()
