"""CLIP's adapted attention: the self-attention path against the materialised-weight fallback.

An ``nn.MultiheadAttention`` whose ``in_proj_weight`` is adapted runs, for a self-attention call,
its packed q/k/v projection through the method's own ``linear`` and then SDPA
(``randlora/adapters/layers.py``). Every other call builds ``W0 + dW`` and calls torch's
MultiheadAttention through ``functional_call`` (what every call did before). This script times
both on the same model, in one process, in interleaved rounds: per method (LoRA, RandLoRA at
LoRA's budget, VeRA at LoRA's r), ``fast`` uses the self-attention path and ``fallback`` turns it
off on every adapted attention layer. A row ``frozen torch MHA`` adapts only c_fc / c_proj (PEFT's
targets), so its attention is torch's own: the attention cost without any adapter.

    python -m benchmarks.attn_path                          # CPU, CLIP ViT-B/32, batch 2, fp32
    python -m benchmarks.attn_path --device cuda --dtype bf16 --batch 128
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.models import build_clip
from benchmarks.run import Runner, shared_copy
from benchmarks.sysinfo import describe, write_report
from randlora.adapters import compute_paths, format_paths, inject, match_budget
from randlora.adapters.layers import AdaptedParameter


def _configs(spec, lora_r: int):
    """Adapted copies of ``spec.model`` sharing its frozen weights (already in the run's dtype); the
    adapters keep their fp32 master weights, as in ``benchmarks.run``."""
    base = spec.model

    def adapt(method, targets, **opts):
        return inject(shared_copy(base, None), method, target_modules=targets, **opts)

    lora_model = adapt("lora", spec.targets, r=lora_r)
    budget = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    rand_r = match_budget(base, "randlora", budget, target_modules=spec.targets, tolerance=0.5)["r"]  # one rank
    methods = [("lora", dict(r=lora_r), lora_model),
               ("randlora", dict(r=rand_r, seed=0), None),
               ("vera", dict(r=lora_r, seed=0), None)]
    out = []
    for method, opts, model in methods:
        for variant in ("fast", "fallback"):
            m = model if (model is not None and variant == "fast") else adapt(method, spec.targets, **opts)
            if variant == "fallback":
                for layer in m.modules():
                    if isinstance(layer, AdaptedParameter):
                        layer._mha = False
            out.append({"name": f"{method} r={opts['r']} {variant}", "method": method, "variant": variant,
                        "model": m})
    frozen = adapt("lora", spec.peft_targets, r=lora_r)
    out.append({"name": f"lora r={lora_r} on c_fc/c_proj (frozen torch MHA)", "method": "lora",
                "variant": "frozen attention", "model": frozen})
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=None, help="default 2 (CPU), 128 (CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default 4 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 CPU, 3 CUDA)")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank, the budget anchor (32; tiny: 4)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/attn_path.md", help="Markdown report ('' = none)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(a.threads)
    batch = a.batch or (128 if cuda else 2)
    steps = a.steps or (20 if cuda else 4)
    warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    runner = Runner(device, dtype, autocast=dtype != torch.float32)

    command = (f"python -m benchmarks.attn_path --device {a.device} --dtype {a.dtype} --batch {batch} "
               f"--steps {steps} --warmup {warmup}" + (" --size tiny" if a.size == "tiny" else ""))
    machine = describe(device, command)  # with the load average before the run
    spec = build_clip(a.size, batch)
    spec.model = runner.prepare(spec.model)  # frozen weights in the run's dtype, shared by every row
    cfgs = _configs(spec, a.lora_r or (4 if a.size == "tiny" else 32))
    batch_t = spec.make_batch(device, dtype)
    for c in cfgs:
        c["model"].train()
        c["opt"] = runner.optimizer(c["model"])
        c["times"] = []
    for rnd in range(warmup + steps):
        order = cfgs if rnd % 2 == 0 else cfgs[::-1]
        for c in order:
            dt, _ = runner.step(spec, c["model"], c["opt"], batch_t)
            if rnd >= warmup:
                c["times"].append(dt)
        print(f"  round {rnd + 1}/{warmup + steps}: "
              + ", ".join(f"{c['name']} {c['times'][-1] * 1e3:.0f}ms" for c in order if c["times"]), flush=True)

    for c in cfgs:
        c["median"] = statistics.median(c["times"])
    med = {(c["method"], c["variant"]): c["median"] for c in cfgs}
    lines = ["# CLIP attention in_proj: self-attention path vs materialised W0 + dW", "",
             *machine,
             f"- model: {spec.title}; {warmup} warm-up + {steps} timed interleaved rounds, AdamW", "",
             "| configuration | step ms (median) | min-max ms | fast / fallback | RandLoRA paths |",
             "|---|---|---|---|---|"]
    for c in cfgs:
        pair = c["median"] / med[c["method"], "fallback"] if c["variant"] == "fast" else None
        paths = format_paths(compute_paths(c["model"])) or "-"  # the paths of the last step
        lines.append(f"| {c['name']} | {c['median'] * 1e3:.0f} | {min(c['times']) * 1e3:.0f}-"
                     f"{max(c['times']) * 1e3:.0f} | {'-' if pair is None else f'{pair:.2f}'} | {paths} |")
    ratio = {v: med["randlora", v] / med["lora", v] for v in ("fast", "fallback")}
    lines += ["", f"RandLoRA / LoRA step: {ratio['fast']:.2f} with the self-attention path, "
              f"{ratio['fallback']:.2f} with the fallback."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(text, a.out)
    return text


if __name__ == "__main__":
    main()
