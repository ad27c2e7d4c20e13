"""Data-parallel training steps: what DDP's per-step buffer broadcast costs RandLoRA, and what skipping
the constant buffers (``randlora.training.distributed``) gives back.

DDP broadcasts every buffer from rank 0 before each training forward. RandLoRA's random bases are
buffers (9.4 MB on ViT-B / CLIP, 235 MB at LLaMA-3-8B width), so plain DDP re-sends them at every
step; the framework's tasks tell DDP to skip the non-persistent buffers and check once, at fit start,
that every rank built the same ones. This script runs two ranks (gloo on the CPU, NCCL on two GPUs)
and, in interleaved rounds inside the same processes, times a training step of:

* ``lora``: LoRA r=32 under DDP (no buffers to broadcast): the reference;
* ``randlora, DDP default``: RandLoRA at LoRA's budget, DDP as torch configures it;
* ``randlora, constants skipped``: the same, with ``static_buffer_names`` handed to DDP (the framework).

With ``--fsdp``, two more rows run randlora's FSDP plan (``randlora.training.distributed.fsdp_strategy``:
frozen weights sharded per block, adapters replicated and averaged once per step), for LoRA and
RandLoRA, and the table gives the parameter bytes each rank holds between steps.

    python -m benchmarks.ddp                             # CPU, 2 gloo ranks, ViT-B b1, CLIP b2, LLaMA 1 x 4096
    python -m benchmarks.ddp --fsdp --models llama       # + FSDP rows
    python -m benchmarks.ddp --device cuda --models llama --llama-layers 2 --seq 512 --batch 4
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.models import build
from benchmarks.run import Runner, shared_copy
from benchmarks.sysinfo import describe, write_report

DEFAULT_BATCH = {"vit": 1, "clip": 2, "llama": 1}


def _broadcast_bytes(ddp) -> int:
    """Bytes DDP broadcasts before each training forward."""
    if not ddp.will_sync_module_buffers():
        return 0
    return sum(b.numel() * b.element_size() for b in ddp.modules_buffers)


def _configs(spec, runner, lora_r, fsdp=False):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from randlora.adapters import inject, match_budget
    from randlora.buffers import static_buffer_names

    base = spec.model
    extra = {"trainable_modules": spec.trainable} if spec.trainable else {}

    def adapt(method, **opts):
        return inject(shared_copy(base, spec.trainable), method, target_modules=spec.targets, **extra, **opts)

    lora = adapt("lora", r=lora_r)
    budget = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    # one rank on every layer: the nearest, accepted within 50 %
    rand_r = match_budget(base, "randlora", budget, target_modules=spec.targets, tolerance=0.5, **extra)["r"]
    rows = [("lora", f"lora r={lora_r}", lora, False)]
    for name, skip in (("randlora, DDP default", False), ("randlora, constants skipped", True)):
        rows.append(("randlora", f"{name} (r={rand_r})", adapt("randlora", r=rand_r, seed=0), skip))
    out = []
    dev = runner.device
    for method, name, model, skip in rows:
        model = model.to(dev)
        if skip:
            model._ddp_params_and_buffers_to_ignore = static_buffer_names(model)
        ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        out.append({"method": method, "name": name, "ddp": ddp, "opt": runner.optimizer(model), "times": [],
                    "bytes": _broadcast_bytes(ddp), "skip": skip, "fsdp": False, "held": _param_bytes(model)})
    if fsdp:
        for method, name, opts in (("lora", f"lora r={lora_r}, FSDP", {"r": lora_r}),
                                   ("randlora", f"randlora, FSDP (r={rand_r})", {"r": rand_r, "seed": 0})):
            # its own frozen weights: FSDP turns the parameters it wraps into views of its shards,
            # which the other rows (sharing the base model's weights) must not see
            model = inject(copy.deepcopy(base), method, target_modules=spec.targets, **extra, **opts).to(dev)
            wrapped, replicated = _fsdp_wrap(model, dev)
            out.append({"method": method, "name": name, "ddp": wrapped, "times": [], "bytes": 0, "skip": True,
                        "fsdp": True, "held": _param_bytes(wrapped),
                        "opt": _SyncThenStep(runner.optimizer(model), replicated)})
    return out


def _param_bytes(model) -> int:
    """Bytes of parameter storage this rank holds between steps (FSDP: its flat shards, plus the
    replicated tensors)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.untyped_storage().data_ptr() in seen:
            continue
        seen.add(p.untyped_storage().data_ptr())
        total += p.untyped_storage().nbytes()
    return total


def _fsdp_wrap(model, dev):
    """``model`` wrapped as randlora's FSDP strategy wraps a task: per-block units, trained tensors
    (and 0-d parameters) left out and replicated, nothing cast by FSDP."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from randlora.training.distributed import fsdp_strategy
    plan = fsdp_strategy(model, dev.type)
    return FSDP(model, mixed_precision=plan.mixed_precision, device_id=dev, **plan.kwargs), plan.replicated


class _SyncThenStep:
    """The optimizer of an FSDP row: average the replicated gradients, then step (as the strategy does)."""

    def __init__(self, opt, replicated):
        self.opt, self.replicated = opt, replicated

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        from randlora.training.distributed import all_reduce_mean_grads
        all_reduce_mean_grads(self.replicated)
        self.opt.step()


def _rank(rank, a, init, out):
    torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank,
                            world_size=a.world)
    try:
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        runner = Runner(device, dtype, autocast=dtype != torch.float32)
        results = {}
        for key in a.models.split(","):
            batch = a.batch or DEFAULT_BATCH[key]
            spec = build(key, a.size, batch, a.llama_layers, a.seq)
            spec.model = runner.prepare(spec.model)
            cfgs = _configs(spec, runner, a.lora_r or (4 if a.size == "tiny" else 32), a.fsdp)
            data = spec.make_batch(device, dtype)
            for rnd in range(a.warmup + a.steps):
                order = cfgs if rnd % 2 == 0 else cfgs[::-1]
                for c in order:
                    dist.barrier()
                    dt, _ = runner.step(spec, c["ddp"], c["opt"], data)
                    if rnd >= a.warmup:
                        c["times"].append(dt)
                if rank == 0:
                    print(f"  [{key}] round {rnd + 1}/{a.warmup + a.steps}: " + ", ".join(
                        f"{c['name']} {c['times'][-1] * 1e3:.0f}ms" for c in order if c["times"]), flush=True)
            results[key] = {"title": spec.title,
                            "rows": [{k: c[k] for k in ("method", "name", "times", "bytes", "skip", "fsdp", "held")}
                                     for c in cfgs]}
            del cfgs, spec
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def report(results: dict, machine: list[str], a) -> str:
    lines = ["# Data-parallel RandLoRA: DDP's per-step buffer broadcast"
             + (", and randlora's FSDP plan" if a.fsdp else ""), "", *machine,
             f"- {a.world} ranks ({'NCCL' if a.device == 'cuda' else 'gloo, one process per core'}), "
             f"{a.dtype}, {a.warmup} warm-up + {a.steps} timed interleaved rounds, AdamW; times are rank 0's", ""]
    for key, res in results.items():
        rows = res["rows"]
        med = {r["name"]: statistics.median(r["times"]) for r in rows}
        lora = next(med[r["name"]] for r in rows if r["method"] == "lora")
        lines += [f"## {key}: {res['title']}", "",
                  "| configuration | broadcast per step MB | parameters held per rank MB | step ms (median) "
                  "| min-max ms | vs LoRA |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            t = r["times"]
            lines.append(f"| {r['name']} | {r['bytes'] / 1e6:.3f} | {r.get('held', 0) / 1e6:.1f} | "
                         f"{med[r['name']] * 1e3:.0f} | {min(t) * 1e3:.0f}-{max(t) * 1e3:.0f} | "
                         f"{med[r['name']] / lora:.2f} |")
        default = next(r for r in rows if r["method"] == "randlora" and not r["skip"])
        skipped = next(r for r in rows if r["skip"] and not r.get("fsdp"))
        per_round = statistics.median(d / s for d, s in zip(default["times"], skipped["times"]))
        lines += ["", f"DDP default / constants skipped: {med[default['name']] / med[skipped['name']]:.3f} "
                      f"(median over rounds of the per-round ratio: {per_round:.3f}); "
                      f"{default['bytes'] / 1e6:.1f} MB no longer broadcast per step.", ""]
        fs = {r["method"]: r for r in rows if r.get("fsdp")}
        if fs:
            lines += [f"FSDP RandLoRA / FSDP LoRA: {med[fs['randlora']['name']] / med[fs['lora']['name']]:.2f}; "
                      f"FSDP / DDP (constants skipped), RandLoRA: "
                      f"{med[fs['randlora']['name']] / med[skipped['name']]:.2f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--models", default="vit,clip,llama")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--batch", type=int, default=None, help="per rank (default: ViT 1, CLIP 2, LLaMA 1)")
    p.add_argument("--llama-layers", type=int, default=1)
    p.add_argument("--seq", type=int, default=128, help="LLaMA tokens per sequence")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank, the budget anchor (32; tiny: 4)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--world", type=int, default=2, help="ranks (processes)")
    p.add_argument("--fsdp", action="store_true", help="add LoRA and RandLoRA under randlora's FSDP plan")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--out", default="benchmarks/results/ddp.md", help="Markdown report ('' = none)")
    a = p.parse_args(argv)
    if a.device == "cuda" and torch.cuda.device_count() < a.world:
        raise SystemExit(f"--device cuda --world {a.world} needs {a.world} GPUs, {torch.cuda.device_count()} visible")
    unknown = set(a.models.split(",")) - set(DEFAULT_BATCH)
    if unknown:
        raise SystemExit(f"unknown model(s) {sorted(unknown)}; choose from {sorted(DEFAULT_BATCH)}")
    command = "python -m benchmarks.ddp " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = describe(torch.device(a.device), command.strip())
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        t0 = time.perf_counter()
        mp.start_processes(_rank, args=(a, os.path.join(tmp, "init"), out), nprocs=a.world, start_method="spawn")
        results = torch.load(out)
    text = report(results, machine, a) + f"\nwall time {time.perf_counter() - t0:.0f} s\n"
    print(text)
    write_report(text, a.out)
    return results


if __name__ == "__main__":
    main()
