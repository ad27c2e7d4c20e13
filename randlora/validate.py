"""Checks of a composed config that run before anything is built or loaded.

Each failure is a ``ValueError`` with one line that says what is wrong and how to fix it.
"""
from __future__ import annotations

import math

from omegaconf import OmegaConf

from .adapters import METHODS, resolve_options

PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "transformer-engine")
SOURCES = ("digits", "synthetic", "hf", "imagefolder", "torchvision", "ucf101_midframes", "cub_200_2011",
           "voc2007_crops", "instructions")
FAMILIES = ("timm", "open_clip", "hf_causal_lm")
TASKS = ("classification", "clip", "causal_lm")
FRAMEWORK_KEYS = {"method", "budget", "lr", "lr_by_task", "weight_decay", "target_modules", "trainable_modules", "name"}


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def effective_lr(cfg):
    """optim.lr if set, else adapter.lr, else the paper's LR for this method and task kind."""
    for v in (cfg.optim.get("lr"), cfg.adapter.get("lr")):
        if v is not None:
            return v
    table = cfg.adapter.get("lr_by_task") or {}
    return table.get(cfg.task.kind)


def validate_config(cfg, deep: bool = True) -> None:
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer")
    if cfg.get("resume") and not cfg.get("train", True):
        raise ValueError(f"train=false with resume={cfg.resume} would write an evaluation over that run's results; "
                         f"to evaluate a run, use ckpt_path={cfg.resume}/checkpoints/last.ckpt (a new run folder)")
    a = OmegaConf.to_container(cfg.adapter, resolve=True)
    method = a.get("method")
    if method not in METHODS:
        raise ValueError(f"adapter.method={method!r} is unknown; choose one of {list(METHODS)} (e.g. adapter=lora)")
    opts = {k: v for k, v in a.items() if k not in FRAMEWORK_KEYS and v is not None}
    try:
        resolve_options(method, opts)
    except ValueError as e:
        raise ValueError(f"adapter: {e}") from None
    lr = effective_lr(cfg)
    if not (_num(lr) and lr > 0):
        raise ValueError(f"adapter.lr={lr!r} must be a positive number")
    if not (_num(a.get("weight_decay", 0)) and a.get("weight_decay", 0) >= 0):
        raise ValueError(f"adapter.weight_decay={a.get('weight_decay')!r} must be >= 0")
    budget = a.get("budget")
    if budget is not None:
        if method == "full":
            raise ValueError("adapter.budget is meaningless for full fine-tuning (every parameter trains); drop it")
        if not (_num(budget) and budget > 0):
            raise ValueError(f"adapter.budget={budget!r} must be a positive number of parameters (e.g. 1e6)")
    tm = a.get("target_modules")
    if tm is not None and not isinstance(tm, str) and len(tm) == 0:
        raise ValueError("adapter.target_modules=[] adapts nothing; use null for the model's default targets")

    m = cfg.model
    if m.get("family") not in FAMILIES:
        raise ValueError(f"model.family={m.get('family')!r} is unknown; choose one of {list(FAMILIES)}")
    kind = cfg.task.kind
    if kind not in TASKS:
        raise ValueError(f"task.kind={kind!r} is unknown; choose one of {list(TASKS)}")
    if (m.family == "hf_causal_lm") != (kind == "causal_lm"):
        raise ValueError(f"task {kind!r} does not fit model {m.name!r} ({m.family}); use the model's task")

    d = cfg.data
    src = d.get("source")
    if src not in SOURCES:
        raise ValueError(f"data.source={src!r} is unknown; choose one of {list(SOURCES)}")
    if src == "hf" and not (d.get("hub_id") or d.get("path")):
        raise ValueError(f"dataset {d.name!r} needs data.hub_id=<hub id> or data.path=<local folder>")
    if src in ("imagefolder", "torchvision", "ucf101_midframes", "cub_200_2011", "voc2007_crops") and not d.get("path"):
        raise ValueError(f"data={d.name} reads a local copy (data.source={src}): set data.path=<folder>; "
                         "docs/datasets.md gives the layout and where to get it")
    vf = d.get("val_fraction")
    if vf is not None and not (_num(vf) and 0 < vf < 1):
        raise ValueError(f"data.val_fraction={vf!r} must be in (0, 1): the share of the training split held out for "
                         "validation (val/acc, the Optuna objective)")
    shots = d.get("shots")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0):
        raise ValueError(f"data.shots={shots!r} must be a positive integer (images per class) or null")
    frac = d.get("fraction", 1.0)
    if not (_num(frac) and 0 < frac <= 1):
        raise ValueError(f"data.fraction={frac!r} must be in (0, 1]")
    bs = d.get("batch_size")
    if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
        raise ValueError(f"data.batch_size={bs!r} must be a positive integer")

    o = cfg.optim
    if o.get("schedule") not in ("cosine", "linear", "constant"):
        raise ValueError(f"optim.schedule={o.get('schedule')!r}; choose cosine, linear or constant")
    if not (_num(o.get("warmup_steps", 0)) and o.get("warmup_steps", 0) >= 0):
        raise ValueError(f"optim.warmup_steps={o.get('warmup_steps')!r} must be >= 0")
    eff = cfg.get("effective_batch_size")
    if eff is not None and (isinstance(eff, bool) or not isinstance(eff, int) or eff <= 0):
        raise ValueError(f"effective_batch_size={eff!r} must be a positive integer or null")
    if eff is not None:
        t = cfg.trainer
        dev = t.get("devices", 1)
        ndev = (dev if isinstance(dev, int) and dev > 0 else 1) * int(t.get("num_nodes", 1) or 1)
        if eff % (bs * ndev):
            raise ValueError(f"effective_batch_size={eff} is not a multiple of data.batch_size x devices = "
                             f"{bs * ndev}; choose a multiple (accumulation must be a whole number)")
    _check_hardware(cfg.trainer)
    _check_compile(cfg)
    _check_fsdp(cfg)
    if deep:
        check_targets_on_meta(cfg, method, opts, a)
        if cfg.trainer.get("strategy") == "fsdp":
            check_fsdp_blocks(cfg)


def _check_fsdp(cfg) -> None:
    """What randlora's FSDP strategy (randlora.distributed.fsdp_strategy) does not support."""
    if cfg.trainer.get("strategy") != "fsdp":
        return
    from .compile import normalise_options
    if normalise_options(compile_options(cfg)) is not None:
        raise ValueError("compile.enabled=true is not supported with trainer.strategy=fsdp (untested with the "
                         "per-block FSDP units); use trainer.strategy=ddp to compile, or compile.enabled=false")
    import torch
    t = cfg.trainer
    on_cpu = t.get("accelerator") == "cpu" or (t.get("accelerator") in ("auto", None) and not torch.cuda.is_available())
    if on_cpu and "mixed" in str(t.get("precision")):
        raise ValueError(f"trainer.precision={t.get('precision')} with trainer.strategy=fsdp on the CPU would run in "
                         "float32 (Lightning's FSDP precision autocasts on CUDA only); use trainer.precision=32-true")
    if cfg.task.get("merge_for_test"):
        raise ValueError("task.merge_for_test=true folds the update into the base weights, which FSDP holds "
                         "sharded; use task.merge_for_test=false (the same predictions) or trainer.strategy=ddp")


def check_fsdp_blocks(cfg) -> None:
    """FSDP shards block by block: the model must have repeated blocks (checked on the meta device)."""
    from .compile import repeated_blocks
    from .models import meta_backbone
    model = meta_backbone(cfg.model)
    if model is not None and not repeated_blocks(model):
        raise ValueError(f"trainer.strategy=fsdp shards the model block by block, but {cfg.model.name!r} has no "
                         "repeated blocks (a ModuleList / Sequential of blocks of one class); use trainer.strategy=ddp")


def check_targets_on_meta(cfg, method, opts, a) -> None:
    """Targets, rank and budget against the architecture built on the meta device (no weights)."""
    if method == "full":
        return
    from .adapters.core import _check_rank, find_targets, match_budget
    from .models import meta_backbone
    model = meta_backbone(cfg.model)
    if model is None:
        return  # only knowable after loading (a hub-only architecture): inject() checks it then
    targets = a.get("target_modules") or list(cfg.model.targets)
    try:
        found = find_targets(model, targets)
        if a.get("budget") is not None:
            match_budget(model, method, float(a["budget"]), target_modules=targets,
                         **{k: v for k, v in opts.items() if k != "r"})
        else:
            full_opts = resolve_options(method, opts)
            _check_rank(method, full_opts, found)
    except ValueError as e:
        raise ValueError(f"adapter on model {cfg.model.name!r}: {e}") from None


def compile_options(cfg):
    """The ``compile`` config as plain data for ``randlora.compile``, with the task's default for
    ``dynamic``: static shapes for image tasks. Images have one size; with automatic dynamic shapes
    CLIP's two towers (one block class, two widths) turned width and length symbolic (38 s compile
    instead of 5 s, and CUDA graphs skip dynamic graphs). A smaller last batch costs one more static
    graph instead. Language models keep automatic shapes (sequence lengths vary)."""
    c = cfg.get("compile")
    opts = OmegaConf.to_container(c, resolve=True) if OmegaConf.is_config(c) else c
    if isinstance(opts, dict) and opts.get("dynamic") is None and cfg.task.kind in ("classification", "clip"):
        opts = {**opts, "dynamic": False}
    return opts


def _check_compile(cfg) -> None:
    from .compile import normalise_options
    opts = normalise_options(compile_options(cfg))
    if opts and opts["scope"] == "model" and cfg.task.kind == "clip":
        raise ValueError("compile.scope=model compiles forward(), which the CLIP task never calls (it calls "
                         "encode_image / encode_text); use compile.scope=blocks")


def _check_hardware(t) -> None:
    import torch
    prec = str(t.get("precision"))
    if prec not in PRECISIONS:
        raise ValueError(f"trainer.precision={prec!r} is unknown; choose one of {list(PRECISIONS)}")
    acc = t.get("accelerator", "auto")
    cuda = torch.cuda.is_available()
    if acc in ("gpu", "cuda") and not cuda:
        raise ValueError(f"trainer.accelerator={acc} but no CUDA GPU is visible; use trainer=cpu (or trainer=ddp_cpu)")
    on_cpu = acc == "cpu" or (acc == "auto" and not cuda)
    if on_cpu and prec in ("16-mixed", "16-true"):
        raise ValueError(f"trainer.precision={prec} is not supported on the CPU; use bf16-mixed or 32-true")
    if not on_cpu and prec.startswith("bf16") and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"trainer.precision={prec} needs a GPU with bf16 (Ampere or newer); use 16-mixed")
    dev = t.get("devices", 1)
    if not on_cpu and isinstance(dev, int) and dev > torch.cuda.device_count():
        raise ValueError(f"trainer.devices={dev} but only {torch.cuda.device_count()} GPU(s) are visible")
    if on_cpu and isinstance(dev, int) and dev > 1 and t.get("strategy") in ("auto", None):
        raise ValueError(f"trainer.devices={dev} on the CPU needs trainer.strategy=ddp (see trainer=ddp_cpu)")
