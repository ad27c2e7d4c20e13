"""Where a training step's time goes: torch.profiler over a few steps of one configuration.

    python -m benchmarks.profile --model clip --method randlora --device cuda --dtype bf16
    python -m benchmarks.profile --model vit --method lora --batch 2          # CPU

Prints the operators sorted by self device time (CPU time on the CPU) and, with ``--trace``, writes a
Chrome trace. Same models, budgets and step as ``benchmarks.run``.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.models import build
from benchmarks.run import PROFILES, Runner, instantiate, plan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="clip", choices=["vit", "clip", "llama"])
    ap.add_argument("--method", default="randlora")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--tiny", action="store_true", help="the width-64 models of --quick (seconds, for tests)")
    ap.add_argument("--trace", default="", help="write a Chrome trace to this path")
    ap.add_argument("--memory", action="store_true",
                    help="instead of timing: tensors saved for backward (by dtype and shape) and allocator "
                         "memory after forward / at the peak (CUDA)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    prof_defaults = PROFILES["cuda" if dev.type == "cuda" else "cpu"]
    batch = args.batch or prof_defaults["batch"][args.model]
    if args.tiny:
        prof_defaults = PROFILES["quick"]
        batch = args.batch or 2
    spec = build(args.model, "tiny" if args.tiny else "full", batch, prof_defaults["llama_layers"],
                 prof_defaults["seq"])
    cfgs, notes = plan(spec, [args.method], prof_defaults["lora_r"], 256, have_peft=True)
    cfg = cfgs[0]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    runner = Runner(dev, dtype, autocast=True)
    model = instantiate(spec, cfg, runner.prepare(spec.model), share=False)
    model = runner.prepare(model) if cfg.kind == "full" else model
    opt = runner.optimizer(model)
    b = spec.make_batch(dev, dtype)
    for _ in range(3):
        runner.step(spec, model, opt, b)
    if args.memory:
        return memory_breakdown(spec, cfg, model, opt, runner, b, dev)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        times = [runner.step(spec, model, opt, b)[0] for _ in range(args.steps)]
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"{spec.title}; {cfg.label} r={cfg.r}; step times (profiled) "
          + ", ".join(f"{t * 1e3:.1f} ms" for t in times))
    print("\n".join(notes))
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


def memory_breakdown(spec, cfg, model, opt, runner, b, dev):
    import collections
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = (str(t.dtype).replace("torch.", ""), tuple(t.shape), t.untyped_storage().nbytes())
        return t

    cuda = dev.type == "cuda"
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        m0 = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), runner.ctx():
        loss = spec.loss(model, b)
    if cuda:
        m1 = torch.cuda.memory_allocated()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    groups = collections.Counter()
    for dt, shape, nb in saved.values():
        groups[(dt, shape)] += nb
    print(f"{spec.title}; {cfg.label} r={cfg.r}")
    print(f"saved for backward (excluding parameters and buffers): {sum(groups.values()) / 2**20:.1f} MB "
          f"in {len(saved)} storages")
    if cuda:
        print(f"allocated: after forward +{(m1 - m0) / 2**20:.1f} MB, peak in forward + backward "
              f"+{(peak - m0) / 2**20:.1f} MB")
    for (dt, shape), nb in groups.most_common(12):
        print(f"  {nb / 2**20:9.1f} MB  {dt:9s} {shape}")


if __name__ == "__main__":
    main()
