"""Training-step speed and peak memory: full FT, our LoRA / VeRA / RandLoRA, PEFT's LoRA / VeRA / RandLoRA.

    python -m benchmarks.run                                   # CPU defaults (~10 min on 2 cores)
    python -m benchmarks.run --quick                           # tiny models, seconds (smoke test)
    python -m benchmarks.run --device cuda --dtype bf16        # GPU: ViT-B b64, CLIP b128, LLaMA 2 x 4096

Timing: every configuration of one model lives in ONE process; each round runs one training step
(zero_grad, forward, loss, backward, AdamW step) of every configuration, in alternating order, so
machine noise (other jobs, thermal drift) hits all configurations alike. Frozen base weights are
shared between the adapter configurations (full fine-tuning gets its own copy). The reported time
is the median over the timed rounds; ratios are also given as the median of per-round ratios.

Budgets: LoRA r = 32 (``--lora-r``) is the anchor; RandLoRA's and VeRA's r come from
``randlora.adapters.match_budget`` on the same model and targets. PEFT rows use the same r as ours.
VeRA (out + r parameters per layer) cannot reach a LoRA-sized budget; it then falls back to r = 256.

Peak memory: on CUDA, each configuration is rebuilt alone after the timing phase and
``torch.cuda.max_memory_allocated`` is read after two steps; on CPU each configuration runs two
steps in its own subprocess (forkserver, libraries preloaded) and reports its max RSS
(``resource.getrusage``). "extra" is the peak minus the memory held right before the first step
(weights, adapters, optimizer object): activations, gradients, optimizer state and temporaries.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmarks import sysinfo
from benchmarks.models import MODELS, ModelSpec, build
from randlora.adapters import compute_paths, format_paths

METHODS = ("full", "lora", "vera", "vera-same-r", "randlora", "randlora-factorised", "randlora-merged",
           "randlora-bf16-bases", "peft-lora", "peft-vera", "peft-randlora")
DEFAULT_METHODS = ("full", "lora", "vera", "vera-same-r", "randlora", "randlora-bf16-bases", "peft-lora", "peft-vera",
                   "peft-randlora")
SAME_TARGETS = "randlora-pt"   # auto-added row: ours RandLoRA on PEFT's targets (CLIP)
COMPILED = "+compiled"         # suffix of the rows --compile adds (the same configuration, compiled)
TARGETS = {  # name: (threshold, "<=" or ">=")
    "randlora_vs_lora_time": (1.3, "<="),
    "peft_vs_ours_randlora_time": (1.6, ">="),
    "randlora_vs_lora_peak_mem": (1.0, "<="),
    "randlora_bf16_bases_vs_lora_peak_mem": (1.0, "<="),
    "vera_vs_lora_time": (1.05, "<="),
}

# Profiles: defaults per device. ``batch`` per model; llama: layers and sequence length.
PROFILES = {
    "cpu": dict(size="full", steps=4, warmup=1, threads=1, batch={"vit": 1, "clip": 2, "llama": 1},
                llama_layers=1, seq=128, lora_r=32),
    "cuda": dict(size="full", steps=20, warmup=3, threads=None, batch={"vit": 64, "clip": 128, "llama": 4},
                 llama_layers=2, seq=512, lora_r=32),
    # tiny widths (64): r=32 would be a near-full-rank budget, so the LoRA anchor is r=4
    "quick": dict(size="tiny", steps=2, warmup=1, threads=1, batch={"vit": 2, "clip": 2, "llama": 2},
                  llama_layers=1, seq=16, lora_r=4),
}


def peft_available() -> tuple[bool, str]:
    try:
        import peft  # noqa: F401
        return True, ""
    except Exception as e:  # optional dependency
        return False, f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------ configs
@dataclass
class Config:
    method: str                 # one of METHODS or SAME_TARGETS
    kind: str                   # full | lora | vera | randlora
    impl: str                   # ours | peft | torch
    r: int | None
    targets: list[str] | None
    path: str | None = None     # RandLoRA compute path for ours
    compiled: dict | None = None  # torch.compile options (randlora.compile) for a "+compiled" row
    bases_dtype: str | None = None  # RandLoRA's bases_dtype option (None: the library default)
    # filled while running
    module: nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    trainable: int = 0
    adapter_params: int = 0
    paths: str = ""
    loss: float = float("nan")
    peak_mb: float = float("nan")
    extra_mb: float = float("nan")
    error: str = ""

    @property
    def label(self) -> str:
        return self._label + (" [compiled]" if self.compiled else "")

    @property
    def _label(self) -> str:
        if self.method.startswith(SAME_TARGETS):
            return "ours randlora [PEFT targets]"
        if self.impl == "peft":
            return f"PEFT {self.kind}"
        if self.kind == "full":
            return "full fine-tuning"
        if self.method.startswith("randlora-bf16-bases"):
            return "ours randlora [bf16 bases]"
        if self.method.startswith("vera-same-r"):
            return "ours vera [LoRA's r]"
        return f"ours {self.method.split(COMPILED)[0]}"

    def describe(self) -> dict:
        return {"method": self.method, "kind": self.kind, "impl": self.impl, "r": self.r,
                "targets": self.targets, "path": self.path, "compiled": self.compiled,
                "bases_dtype": self.bases_dtype}


def _lora_count(model: nn.Module, targets, r: int) -> int:
    from randlora.adapters import find_targets
    return sum(r * (t.out_features + t.in_features) for t in find_targets(model, targets))


def plan(spec: ModelSpec, methods, lora_r: int, vera_fallback: int, have_peft: bool,
         compile_opts: dict | None = None) -> tuple[list[Config], list[str]]:
    """The configurations to run on one model, with equal-budget ranks, plus notes."""
    from randlora.adapters import match_budget

    notes = []
    budget = _lora_count(spec.model, spec.targets, lora_r)
    # one rank on every layer (the PEFT rows take the same r): the nearest, accepted within 50 %
    rand_r = match_budget(spec.model, "randlora", budget, target_modules=spec.targets, tolerance=0.5)
    notes.append(f"budget: ours LoRA r={lora_r} on {spec.targets} = {budget:,} adapter parameters; "
                 f"match_budget gives RandLoRA r={rand_r['r']} ({rand_r.trainable:,})")
    try:
        vr = match_budget(spec.model, "vera", budget, target_modules=spec.targets, tolerance=0.5)
        vera_r = vr["r"]
        notes.append(f"match_budget gives VeRA r={vera_r} ({vr.trainable:,})")
    except ValueError as e:
        vera_r = vera_fallback
        notes.append(f"VeRA cannot reach that budget (match_budget: {str(e).split(';')[0]}); "
                     f"VeRA uses r={vera_r} instead (not equal parameters)")
    cfgs = []
    for m in methods:
        if m.startswith("peft-") and not have_peft:
            continue
        if m == "full":
            cfgs.append(Config(m, "full", "torch", None, None))
        elif m == "lora":
            cfgs.append(Config(m, "lora", "ours", lora_r, spec.targets))
        elif m == "vera":
            cfgs.append(Config(m, "vera", "ours", vera_r, spec.targets))
        elif m == "vera-same-r":  # VeRA at LoRA's r: the same GEMM shapes, so any gap is implementation overhead
            cfgs.append(Config(m, "vera", "ours", lora_r, spec.targets))
        elif m == "randlora-bf16-bases":  # bases stored in bf16: no fp32 master next to the bf16 GEMM copy
            cfgs.append(Config(m, "randlora", "ours", rand_r["r"], spec.targets, "auto", bases_dtype="bfloat16"))
        elif m.startswith("randlora"):
            path = m.split("-", 1)[1] if "-" in m else "auto"
            cfgs.append(Config(m, "randlora", "ours", rand_r["r"], spec.targets, path))
        elif m == "peft-lora":
            cfgs.append(Config(m, "lora", "peft", lora_r, spec.peft_targets))
        elif m == "peft-vera":
            cfgs.append(Config(m, "vera", "peft", vera_r, spec.peft_targets))
        elif m == "peft-randlora":
            cfgs.append(Config(m, "randlora", "peft", rand_r["r"], spec.peft_targets))
            if spec.peft_targets != spec.targets:
                cfgs.append(Config(SAME_TARGETS, "randlora", "ours", rand_r["r"], spec.peft_targets, "auto"))
        else:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    if compile_opts:
        cfgs += [dataclasses.replace(c, method=c.method + COMPILED, compiled=dict(compile_opts), times=[])
                 for c in cfgs]
        notes.append(f"every configuration also runs compiled ({COMPILED} rows; randlora.compile, "
                     f"{compile_opts}), interleaved with the eager ones. Dynamo keeps every configuration's graphs "
                     "for the shared block class and checks their guards on each call, so compiled rows pay a "
                     "little guard time a single-configuration run would not (a bias against them)")
    return cfgs, notes


def shared_copy(model: nn.Module, private: list[str] | None) -> nn.Module:
    """deepcopy that shares every parameter except those under ``private`` module names."""
    keep = set()
    for name in private or []:
        for mname, mod in model.named_modules():
            if mname == name or mname.endswith("." + name):
                keep.update(id(p) for p in mod.parameters())
    memo = {id(p): p for p in model.parameters() if id(p) not in keep}
    return copy.deepcopy(model, memo)


def instantiate(spec: ModelSpec, cfg: Config, base: nn.Module, share: bool) -> nn.Module:
    """Adapt ``base`` as ``cfg`` says: a copy sharing the frozen weights when ``share`` (full
    fine-tuning then gets a private deep copy), else ``base`` itself, in place (no copy, so a
    memory measurement sees no duplicate weights)."""
    from randlora.adapters import adapted_layers, inject

    if cfg.kind == "full":
        model = copy.deepcopy(base) if share else base
        inject(model, "full")
        cfg.adapter_params = 0
    else:
        model = shared_copy(base, spec.trainable) if share else base
        if cfg.impl == "ours":
            opts = dict(r=cfg.r)
            if cfg.kind in ("vera", "randlora"):
                opts["seed"] = 0
            if cfg.kind == "randlora":
                opts["path"] = cfg.path
                if cfg.bases_dtype:
                    opts["bases_dtype"] = cfg.bases_dtype
            inject(model, cfg.kind, target_modules=cfg.targets, trainable_modules=spec.trainable, **opts)
            cfg.adapter_params = sum(p.numel() for _, lay in adapted_layers(model)
                                     for p in lay.update.parameters() if p.requires_grad)
        else:
            model = _peft_wrap(model, cfg, spec.trainable)
            names = ("lora_", "vera_lambda", "randlora_lambda", "randlora_gamma")
            cfg.adapter_params = sum(p.numel() for n, p in model.named_parameters()
                                     if p.requires_grad and any(k in n for k in names))
    cfg.trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    if cfg.compiled:
        from randlora.compile import compile_model
        compile_model(model, cfg.compiled)
    return model


def _peft_wrap(model: nn.Module, cfg: Config, trainable) -> nn.Module:
    from peft import LoraConfig, RandLoraConfig, VeraConfig, get_peft_model

    common = dict(target_modules=list(cfg.targets), modules_to_save=list(trainable) if trainable else None)
    with warnings.catch_warnings():  # save_projection=False warns; bases are irrelevant to timing
        warnings.simplefilter("ignore")
        if cfg.kind == "lora":
            pc = LoraConfig(r=cfg.r, lora_alpha=cfg.r, lora_dropout=0.0, **common)
        elif cfg.kind == "vera":
            pc = VeraConfig(r=cfg.r, vera_dropout=0.0, projection_prng_key=0, save_projection=False, **common)
        else:  # PEFT's defaults otherwise (alpha 640, dense bases)
            pc = RandLoraConfig(r=cfg.r, randlora_dropout=0.0, projection_prng_key=0, save_projection=False,
                                **common)
        return get_peft_model(model, pc)


# --------------------------------------------------------------------------------------------- steps
class Runner:
    """Holds device / dtype / autocast and runs one timed training step of a configuration."""

    def __init__(self, device: torch.device, dtype: torch.dtype, autocast: bool):
        self.device, self.dtype = device, dtype
        self.autocast = autocast and dtype != torch.float32

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(device=self.device, dtype=self.dtype)

    def ctx(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-4)

    def step(self, spec: ModelSpec, model: nn.Module, opt, batch) -> tuple[float, torch.Tensor]:
        if self.device.type == "cuda":  # a new step for CUDA-graph trees (--compile-mode reduce-overhead)
            torch.compiler.cudagraph_mark_step_begin()
        self.sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with self.ctx():
            loss = spec.loss(model, batch)
        loss.backward()
        opt.step()
        self.sync()
        return time.perf_counter() - t0, loss.detach()


def time_interleaved(spec: ModelSpec, cfgs: list[Config], runner: Runner, warmup: int, steps: int,
                     log=print) -> None:
    batch = spec.make_batch(runner.device, runner.dtype)
    live = [c for c in cfgs if not c.error]
    for rnd in range(warmup + steps):
        order = live if rnd % 2 == 0 else live[::-1]
        t_round = time.perf_counter()
        for c in order:
            try:
                dt, loss = runner.step(spec, c.module, c.opt, batch)
            except Exception as e:  # report, keep benchmarking the rest
                c.error = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            c.loss = float(loss)
            if rnd >= warmup:
                c.times.append(dt)
            if c.impl == "ours" and c.kind == "randlora" and not c.paths:
                c.paths = format_paths(compute_paths(c.module))
        live = [c for c in live if not c.error]
        tag = "warmup" if rnd < warmup else "timed"
        log(f"  [{spec.key}] round {rnd + 1}/{warmup + steps} ({tag}) {time.perf_counter() - t_round:.1f}s: "
            + ", ".join(f"{c.method} {c.times[-1] * 1e3:.0f}ms" for c in order if c.times and rnd >= warmup))


# -------------------------------------------------------------------------------------------- memory
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(job: dict) -> dict:
    """Build one configuration alone, run ``job['steps']`` training steps, return peak / extra MB.

    CUDA: torch.cuda.max_memory_allocated; CPU: this process's max RSS (so call it in a fresh
    subprocess; see ``memory_subprocess``)."""
    import resource

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    runner = Runner(device, dtype, job["autocast"])
    spec = build(job["model"], job["size"], job["batch"], job["llama_layers"], job["seq"])
    cfg = Config(**job["config"])
    model = instantiate(spec, cfg, runner.prepare(spec.model), share=False)
    spec.model = None
    opt = runner.optimizer(model)
    batch = spec.make_batch(device, dtype)
    if cfg.compiled:  # compile (and record CUDA graphs) before the baseline: the compiler's memory is not the step's
        for _ in range(3):
            runner.step(spec, model, opt, batch)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = _rss_mb()
    for _ in range(job["steps"]):
        runner.step(spec, model, opt, batch)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        # ru_maxrss is KiB on Linux; the kernel updates it lazily, so never report less than now
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _rss_mb())
    return {"peak_mb": peak, "before_mb": before, "extra_mb": max(0.0, peak - before)}


_PRELOAD = ["torch", "benchmarks.models", "randlora.adapters", "timm", "open_clip", "transformers", "peft"]


def memory_subprocess(jobs: list[dict], log=print) -> list[dict]:
    """Run each job in a fresh forkserver child (libraries preloaded once, so children start fast
    and all share the same import baseline)."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([m for m in _PRELOAD if m != "peft" or peft_available()[0]])
    out = []
    for job in jobs:
        t0 = time.perf_counter()
        try:
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                res = pool.apply(measure_memory, (job,))
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        log(f"  memory {job['model']}/{job['config']['method']}: "
            + (f"peak {res['peak_mb']:.0f} MB, extra {res['extra_mb']:.0f} MB" if "peak_mb" in res else res["error"])
            + f" ({time.perf_counter() - t0:.0f}s)")
        out.append(res)
    return out


# -------------------------------------------------------------------------------------------- report
def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _find(cfgs, method, suffix=""):
    return next((c for c in cfgs if c.method == method + suffix and not c.error and c.times), None)


def _paired(a: Config | None, b: Config | None) -> float:
    """Median over rounds of a's step time / b's step time in the same round."""
    if a is None or b is None:
        return float("nan")
    n = min(len(a.times), len(b.times))
    return _median([a.times[i] / b.times[i] for i in range(n)]) if n else float("nan")


def _div(a, b) -> float:
    if a is None or b is None or not (isinstance(b, float) and b > 0) or not math.isfinite(a):
        return float("nan")
    return a / b


def ratios(cfgs: list[Config], suffix: str = "") -> dict:
    """The target ratios among the eager rows (``suffix=""``) or among the compiled ones."""
    def t(c):
        return _median(c.times) if c else float("nan")

    def find(method):
        return _find(cfgs, method, suffix)

    lora, rand, vera = find("lora"), find("randlora"), find("vera")
    rand16 = find("randlora-bf16-bases")
    vera_same = find("vera-same-r")
    peft_rand = find("peft-randlora")
    same = find(SAME_TARGETS) or rand
    out = {
        "randlora_vs_lora_time": (t(rand) / t(lora), _paired(rand, lora)),
        "peft_vs_ours_randlora_time": (t(peft_rand) / t(same), _paired(peft_rand, same)),
        "randlora_vs_lora_peak_mem": (_div(rand and rand.peak_mb, lora and lora.peak_mb),
                                      _div(rand and rand.extra_mb, lora and lora.extra_mb)),
        "randlora_bf16_bases_vs_lora_peak_mem": (_div(rand16 and rand16.peak_mb, lora and lora.peak_mb),
                                                 _div(rand16 and rand16.extra_mb, lora and lora.extra_mb)),
        "vera_vs_lora_time": (t(vera_same or vera) / t(lora), _paired(vera_same or vera, lora)),
        "vera_budget_r_vs_lora_time": (t(vera) / t(lora), _paired(vera, lora)),
        "full_vs_lora_time": (t(find("full")) / t(lora), _paired(find("full"), lora)),
        "peft_lora_vs_ours_lora_time": (t(find("peft-lora")) / t(lora), _paired(find("peft-lora"), lora)),
    }
    return out


def _fmt(x, spec=".0f"):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _verdict(name, value):
    if name not in TARGETS or not math.isfinite(value):
        return ""
    thr, op = TARGETS[name]
    ok = value <= thr if op == "<=" else value >= thr
    return f"{'met' if ok else 'NOT met'} (target {op} {thr})"


RATIO_TEXT = {
    "randlora_vs_lora_time": "ours RandLoRA / ours LoRA, step time",
    "peft_vs_ours_randlora_time": "PEFT RandLoRA / ours RandLoRA (same r, same targets), step time",
    "randlora_vs_lora_peak_mem": "ours RandLoRA / ours LoRA, peak memory",
    "randlora_bf16_bases_vs_lora_peak_mem": "ours RandLoRA with bf16 bases (bases_dtype=bfloat16) / ours LoRA, peak memory",
    "vera_vs_lora_time": "ours VeRA / ours LoRA at the same r (same GEMM shapes), step time",
    "vera_budget_r_vs_lora_time": "ours VeRA at its budget r (256 when LoRA's budget is out of reach) / ours LoRA",
    "full_vs_lora_time": "full fine-tuning / ours LoRA, step time",
    "peft_lora_vs_ours_lora_time": "PEFT LoRA / ours LoRA, step time",
}


def model_table(spec_title: str, cfgs: list[Config], mem_label: str) -> list[str]:
    t_lora = {}
    for suffix in ("", COMPILED):
        lora = _find(cfgs, "lora", suffix)
        t_lora[suffix] = _median(lora.times) if lora else float("nan")
    lines = [
        f"| method | targets | r | adapter params | trainable | step ms (median) | min-max ms | vs ours LoRA "
        f"| peak {mem_label} MB | extra MB | RandLoRA path (ours) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cfgs:
        med = _median(c.times)
        if c.error:
            lines.append(f"| {c.label} | {'/'.join(c.targets or ['all'])} | {c.r or '-'} | | | failed: {c.error} "
                         "| | | | | |")
            continue
        lines.append(
            f"| {c.label} | {'/'.join(c.targets or ['all'])} | {c.r if c.r else '-'} | {c.adapter_params:,} "
            f"| {c.trainable:,} | {_fmt(med * 1e3)} | {_fmt(min(c.times) * 1e3 if c.times else None)}-"
            f"{_fmt(max(c.times) * 1e3 if c.times else None)} | {_fmt(med / t_lora[COMPILED if c.compiled else ''], '.2f')} "
            f"| {_fmt(c.peak_mb)} | {_fmt(c.extra_mb)} | {c.paths or '-'} |")
    return lines


def compile_lines(cfgs: list[Config]) -> list[str]:
    """Each compiled row against its eager twin (median of per-round ratios, and of medians)."""
    lines = ["| configuration | eager ms | compiled ms | compiled / eager | per-round estimate |", "|---|---|---|---|---|"]
    for c in cfgs:
        if not c.compiled:
            continue
        e = _find(cfgs, c.method[:-len(COMPILED)])
        if e is None or c.error or not c.times:
            continue
        lines.append(f"| {e.label} | {_fmt(_median(e.times) * 1e3, '.1f')} | {_fmt(_median(c.times) * 1e3, '.1f')} "
                     f"| {_fmt(_median(c.times) / _median(e.times), '.2f')} | {_fmt(_paired(c, e), '.2f')} |")
    return lines


def ratio_lines(rat: dict) -> list[str]:
    lines = ["| ratio | value | second estimate | verdict |", "|---|---|---|---|"]
    for k, (v, p) in rat.items():
        f = ".3f" if "mem" in k else ".2f"
        lines.append(f"| {RATIO_TEXT[k]} | {_fmt(v, f)} | {_fmt(p, f)} | {_verdict(k, v)} |")
    lines.append("")
    lines.append("Value: ratio of the median step times (of peak memory for the memory row). Second estimate: "
                 "median over rounds of the ratio within each round (for memory: ratio of 'extra').")
    return lines


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {MODELS}")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {METHODS} (PEFT rows are skipped with a note if peft is missing)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default: profile)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: profile)")
    p.add_argument("--batch", default=None, help="batch size for every model, or 'vit=16,clip=128,llama=4'")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="base weight dtype; bf16/fp16 also run forward under torch.autocast (adapters keep "
                        "fp32 master weights) unless --no-autocast")
    p.add_argument("--no-autocast", action="store_true",
                   help="with --dtype bf16: no torch.autocast (PEFT's MetaMathQA setting: adapters then compute "
                        "in fp32)")
    p.add_argument("--out", default="benchmarks/results/latest.md", help="Markdown report path ('' = none)")
    p.add_argument("--quick", action="store_true", help="tiny models, batch 2, 2 steps: a smoke test in seconds")
    p.add_argument("--llama-layers", type=int, default=None, help="LLaMA decoder layers (default 1 CPU, 2 CUDA)")
    p.add_argument("--seq", type=int, default=None, help="LLaMA sequence length (default 128 CPU, 512 CUDA)")
    p.add_argument("--lora-r", type=int, default=None,
                   help="LoRA rank that sets the parameter budget (default 32; 4 with --quick)")
    p.add_argument("--vera-fallback-r", type=int, default=256, help="VeRA r when the budget is unreachable")
    p.add_argument("--memory", default="auto", choices=["auto", "subprocess", "inprocess", "none"],
                   help="peak memory: auto = in-process on CUDA, one subprocess per configuration on CPU")
    p.add_argument("--compile", default="none", choices=["none", "blocks", "model"],
                   help="also run every configuration compiled (randlora.compile at this scope), interleaved with "
                        "the eager rows; the target ratios are then reported for both")
    p.add_argument("--compile-mode", default=None,
                   help="inductor mode for --compile: default | reduce-overhead (CUDA graphs) | max-autotune | "
                        "max-autotune-no-cudagraphs")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 1 on CPU (on a shared 2-core machine two OpenMP threads "
                        "stall at every barrier when another job holds a core: steps became 2-8x slower and "
                        "erratic), torch's default on CUDA")
    return p.parse_args(argv)


def _batch_map(arg, default: dict) -> dict:
    if arg is None:
        return dict(default)
    if "=" not in str(arg):
        return {k: int(arg) for k in default}
    out = dict(default)
    for part in str(arg).split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v)
    return out


def parse_choices(arg: str, allowed, what: str) -> list[str]:
    """A comma list from the command line, each item checked against ``allowed``."""
    items = [m.strip() for m in arg.split(",") if m.strip()]
    for m in items:
        if m not in allowed:
            raise SystemExit(f"unknown {what} {m!r}; choose from {tuple(allowed)}")
    return items


def main(argv=None, log=print) -> dict:
    args = parse_args(argv)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    prof = PROFILES["quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")]
    threads = args.threads or prof["threads"]
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, command, device, dtype, prof, log)
    finally:
        torch.set_num_threads(old_threads)


def _run(args, command: str, device: torch.device, dtype: torch.dtype, prof: dict, log=print) -> dict:
    steps = args.steps if args.steps is not None else prof["steps"]
    warmup = args.warmup if args.warmup is not None else prof["warmup"]
    batches = _batch_map(args.batch, prof["batch"])
    llama_layers = args.llama_layers or prof["llama_layers"]
    seq = args.seq or prof["seq"]
    models = parse_choices(args.models, MODELS, "model")
    methods = parse_choices(args.methods, METHODS, "method")
    mem_mode = args.memory if args.memory != "auto" else ("inprocess" if device.type == "cuda" else "subprocess")
    have_peft, peft_err = peft_available()
    compile_opts = None
    if args.compile != "none":
        from randlora.compile import normalise_options
        try:
            # static shapes, as the framework uses for images: every model here has one input shape per
            # tower, and automatic dynamic shapes would make CLIP's two towers (one block class) symbolic
            compile_opts = normalise_options({"scope": args.compile, "mode": args.compile_mode,
                                              "backend": args.compile_backend, "dynamic": False})
        except ValueError as e:
            raise SystemExit(f"--compile: {e}") from None
        # the first compiled step compiles, the second may recompile; CUDA-graph trees then warm up,
        # record and replay, so they need one more
        warmup = max(warmup, 3 if args.compile_mode in ("reduce-overhead", "max-autotune") else 2)
    runner = Runner(device, dtype, not args.no_autocast)
    header = sysinfo.describe(device, command)
    t_start = time.perf_counter()

    results = {"command": command, "device": str(device), "dtype": args.dtype, "autocast": runner.autocast,
               "steps": steps, "warmup": warmup, "compile": compile_opts, "models": {}, "notes": []}
    if not have_peft and any(m.startswith("peft-") for m in methods):
        results["notes"].append(f"PEFT rows skipped: `import peft` failed ({peft_err}).")
    for key in models:
        log(f"[{key}] building ({prof['size']}, batch {batches[key]})")
        spec = build(key, prof["size"], batches[key], llama_layers, seq)
        cfgs, notes = plan(spec, methods, args.lora_r or prof["lora_r"], args.vera_fallback_r, have_peft,
                           compile_opts)
        base = runner.prepare(spec.model)
        for c in cfgs:
            try:
                c.module = instantiate(spec, c, base, share=True)
                c.module = runner.prepare(c.module) if c.kind == "full" else c.module
                c.opt = runner.optimizer(c.module)
            except Exception as e:
                c.error = f"{type(e).__name__}: {str(e)[:200]}"
                log(f"  {c.method}: setup failed: {c.error}")
        log(f"[{key}] {len(cfgs)} configurations, {warmup} warmup + {steps} timed rounds")
        time_interleaved(spec, cfgs, runner, warmup, steps, log)
        for c in cfgs:
            c.module = c.opt = None
        spec.model = base = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if mem_mode != "none":
            # on the CPU the peak is the process's max RSS, which would include the compiler's own memory:
            # compiled rows are measured on CUDA only (after their compile steps)
            live = [c for c in cfgs if not c.error and not (c.compiled and mem_mode == "subprocess")]
            jobs = [dict(model=key, size=prof["size"], batch=batches[key], llama_layers=llama_layers, seq=seq,
                         device=str(device), dtype=str(dtype).replace("torch.", ""), autocast=runner.autocast,
                         steps=2, threads=torch.get_num_threads(), config=c.describe())
                    for c in live]
            if mem_mode == "subprocess":
                mem = memory_subprocess(jobs, log)
            else:
                mem = []
                for j in jobs:
                    try:
                        mem.append(measure_memory(j))
                    except Exception as e:
                        mem.append({"error": f"{type(e).__name__}: {str(e)[:200]}"})
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            for c, m in zip(live, mem):
                c.peak_mb, c.extra_mb = m.get("peak_mb", float("nan")), m.get("extra_mb", float("nan"))
        results["models"][key] = {
            "title": spec.title, "notes": notes + spec.notes, "tokens": spec.tokens,
            "rows": [{**c.describe(), "label": c.label, "times_s": c.times, "median_ms": _median(c.times) * 1e3,
                      "trainable": c.trainable, "adapter_params": c.adapter_params, "paths": c.paths,
                      "loss": c.loss, "peak_mb": c.peak_mb, "extra_mb": c.extra_mb, "error": c.error}
                     for c in cfgs],
            "ratios": ratios(cfgs),
            "ratios_compiled": ratios(cfgs, COMPILED) if compile_opts else None,
            "compile_table": compile_lines(cfgs) if compile_opts else None,
            "table": model_table(spec.title, cfgs, "GPU alloc" if device.type == "cuda" else "RSS"),
        }
        del spec
    results["wall_s"] = time.perf_counter() - t_start
    md = render(results, header, mem_mode)
    results["markdown"] = md
    log("\n" + md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md)
        out.with_suffix(".json").write_text(json.dumps({k: v for k, v in results.items() if k != "markdown"},
                                                       indent=1, default=str))
        log(f"wrote {out} and {out.with_suffix('.json')}")
    return results


def render(results: dict, header: list[str], mem_mode: str) -> str:
    mem_text = {"subprocess": "max RSS of a subprocess running that configuration alone (2 steps; includes "
                              "~1 GB of preloaded libraries)",
                "inprocess": "torch.cuda.max_memory_allocated with that configuration alone (2 steps); on CPU this "
                             "is the whole process's max RSS, which is NOT per configuration",
                "none": "not measured (--memory none)"}[mem_mode]
    lines = ["# Training-step benchmark: full FT vs LoRA / VeRA / RandLoRA (ours and PEFT)", "", *header,
             f"- settings: device {results['device']}, dtype {results['dtype']}, autocast {results['autocast']}, "
             f"{results['warmup']} warmup + {results['steps']} timed interleaved rounds, AdamW (torch default "
             "implementation), random weights and data",
             f"- peak memory: {mem_text}; 'extra' = peak minus memory held just before the first step",
             f"- load average at the end: {sysinfo.loadavg()}; wall time {results['wall_s']:.0f} s", ""]
    lines += [f"> {n}" for n in results["notes"]]
    summary = ["## Summary against the targets", "",
               "| model | RandLoRA/LoRA time (<= 1.3) | PEFT RandLoRA/ours (>= 1.6) | RandLoRA/LoRA peak mem "
               "(<= 1.0) | VeRA/LoRA time, same r (<= 1.05) |", "|---|---|---|---|---|"]
    body = []
    for key, res in results["models"].items():
        for tag, r in (("", res["ratios"]), (" (compiled)", res.get("ratios_compiled"))):
            if r is None:
                continue
            cells = []
            for k in ("randlora_vs_lora_time", "peft_vs_ours_randlora_time", "randlora_vs_lora_peak_mem",
                      "vera_vs_lora_time"):
                v = r[k][0]
                ok = _verdict(k, v)
                cells.append(f"{_fmt(v, '.3f' if 'mem' in k else '.2f')} "
                             f"{'(met)' if ok.startswith('met') else '(NOT met)' if ok else ''}")
            summary.append(f"| {key}{tag} | " + " | ".join(cells) + " |")
        body += [f"## {key}: {res['title']}", ""]
        body += [f"- {n}" for n in res["notes"]]
        body += ["", *res["table"], "", *ratio_lines(res["ratios"]), ""]
        if res.get("ratios_compiled"):
            body += ["### Compiled rows", "", *res["compile_table"], "",
                     "The target ratios among the compiled rows (every implementation compiled alike):", "",
                     *ratio_lines(res["ratios_compiled"]), ""]
    return "\n".join(lines + [""] + summary + [""] + body) + "\n"


if __name__ == "__main__":
    main()
