"""Checks of a composed config that run before anything is built or loaded.

Each failure is a ``ValueError`` with one line that says what is wrong and how to fix it. Every input
refused here is listed in docs/refused-inputs.md (tests/test_validate.py runs each row of that table).

Known keys. The keys a config may hold are derived from the shipped YAML files (``configs/``: each file's
keys at the place its ``# @package`` puts them) plus the few keys the code reads that no file declares
(:data:`EXTRA_KEYS`), and, under ``trainer.``, the arguments of Lightning's ``Trainer``. A key outside
that set (``+unknown_key=1``, ``++trainer.max_epoch=3``) would be ignored silently, so it is refused; a
key added to a shipped YAML file is known without touching this module.
"""
from __future__ import annotations

import difflib
import functools
import math
import warnings
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from ..adapters import METHODS, resolve_options

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "transformer-engine")
SOURCES = ("digits", "synthetic", "hf", "imagefolder", "torchvision", "ucf101_midframes", "cub_200_2011",
           "voc2007_crops", "instructions")
FAMILIES = ("timm", "open_clip", "hf_causal_lm")
TASKS = ("classification", "clip", "causal_lm")
FRAMEWORK_KEYS = {"method", "budget", "budget_tolerance", "scaling", "lr", "lr_by_task", "weight_decay",
                  "target_modules", "trainable_modules", "name", "from_peft"}  # adapter keys that are not inject() options
# keys the code reads that no shipped YAML file sets (randlora/train.py build_datamodule: the model's
# normalisation, e.g. for a local timm checkpoint with its own mean / std)
EXTRA_KEYS = {"model": {"mean", "std"}}
# subtrees whose keys are free-form (passed on as keyword arguments or a user's mapping), or checked
# against the method's / compiler's own options further down (adapter: resolve_options; compile:
# randlora.compile.normalise_options, which name the bad option with the method's context)
FREE_FORM = {"model.kwargs", "model.tiny", "data.test_sources", "data.class_names", "data.torchvision",
             "data.expected_sizes", "adapter", "compile", "tags"}
# Trainer arguments randlora passes itself (randlora/train.py run): set through other config keys
FRAMEWORK_TRAINER_ARGS = {"logger": "logger=csv|wandb|tensorboard|all", "callbacks": "callbacks.*",
                          "plugins": "nothing (checkpoints are written atomically by randlora)",
                          "default_root_dir": "paths.log_dir / hydra.run.dir",
                          "enable_model_summary": "nothing (parameters.txt holds the per-layer table)"}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# strategies randlora runs correctly; Lightning's other registry names are refused with the reason
STRATEGIES_REFUSED = {
    "fsdp_cpu_offload": "Lightning's plain FSDP (one unit for the whole model, bases cast to 16 bits, adapter "
                        "files from rank 0's shard); use trainer.strategy=fsdp (randlora's per-block plan)",
    "deepspeed": "not supported by randlora's adapter checkpoints; use trainer.strategy=fsdp or ddp",
    "xla": "TPUs are not supported; use trainer.accelerator=gpu or cpu",
    "tpu": "TPUs are not supported; use trainer.accelerator=gpu or cpu",
}
# where the data comes from: keys read by some sources only. Given (not null) to another source they
# would be ignored, and the run would train on other data than the user asked for.
SOURCE_ONLY_KEYS = {
    "path": ("hf", "imagefolder", "torchvision", "ucf101_midframes", "cub_200_2011", "voc2007_crops", "instructions"),
    "hub_id": ("hf",),
    "hub_config": ("hf",),
    "hub_revision": ("hf",),
    "synthetic": ("synthetic",),
    "train_file": ("instructions",),
    "train_source": ("instructions",),
    "test_sources": ("instructions",),
}
AUGMENTS = ("none", "clip")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def effective_lr(cfg):
    """optim.lr if set, else adapter.lr, else the paper's LR for this method and task (``lr_by_task``)."""
    return _lr_source(cfg)[1]


def lr_task_key(cfg) -> str:
    """The ``adapter.lr_by_task`` entry of this run: the task kind, except CLIP with a frozen text tower
    (the paper's vision-only experiments, §5.2 / App. C.3: LoRA and RandLoRA at 1e-2, FT at 1e-5 as in the
    vision-language runs), which has its own entry ``clip_vision``."""
    kind = cfg.task.kind
    return "clip_vision" if kind == "clip" and cfg.task.get("text_tower") == "frozen" else kind


def _lr_source(cfg):
    """(the key the learning rate comes from, its value)."""
    for key, v in (("optim.lr", cfg.optim.get("lr")), ("adapter.lr", cfg.adapter.get("lr"))):
        if v is not None:
            return key, v
    table = cfg.adapter.get("lr_by_task") or {}
    key = lr_task_key(cfg)
    return f"adapter.lr_by_task.{key}", table.get(key)


# ----------------------------------------------------------------------------------------- known keys
def _package(path: Path, rel: Path) -> str:
    """Where Hydra puts a config file's keys: its ``# @package`` header, else its group (the first folder)."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("# @package"):
            pkg = line.split("@package", 1)[1].strip()
            return "" if pkg == "_global_" else (rel.parts[0] if pkg == "_group_" else pkg)
        if line and not line.startswith("#"):
            break
    return "" if len(rel.parts) == 1 else rel.parts[0]


def _merge_keys(node: dict, data: dict) -> None:
    for k, v in data.items():
        sub = node.setdefault(str(k), None)
        if isinstance(v, dict):
            sub = {} if sub is None else sub
            _merge_keys(sub, v)
            node[str(k)] = sub


@functools.lru_cache(maxsize=4)
def known_keys(config_dir: str = str(CONFIG_DIR)) -> dict:
    """The tree of config keys the shipped YAML files define: ``{key: subtree or None}`` (None: a leaf).
    Hydra's own settings (``hydra:``, ``configs/hydra/``) and ``defaults`` lists are not config keys."""
    import yaml
    root = Path(config_dir)
    tree: dict = {}
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root)
        if rel.parts[0] == "hydra":
            continue
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            continue
        data = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
        node = tree
        for part in filter(None, _package(path, rel).split(".")):
            node[part] = node.get(part) or {}
            node = node[part]
        _merge_keys(node, data)
    for group, extra in EXTRA_KEYS.items():
        for k in extra:
            tree.setdefault(group, {}).setdefault(k, None)
    return tree


@functools.lru_cache(maxsize=1)
def trainer_arguments() -> tuple[str, ...]:
    import inspect

    from lightning.pytorch import Trainer
    return tuple(p for p in inspect.signature(Trainer.__init__).parameters if p != "self")


def _unknown(where: str, key: str, known) -> ValueError:
    full = f"{where}.{key}" if where else key
    kind = f"known key of {where}" if where else "known top-level key"
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if close:
        fix = f"did you mean {where + '.' if where else ''}{close[0]}? Fix the spelling or remove it"
    elif known:
        listing = ", ".join(sorted(known))
        if len(listing) > 600:
            listing = listing[:600].rsplit(", ", 1)[0] + ", ..."
        fix = f"remove it, or use one of: {listing}"
    else:
        fix = f"remove it ({where} takes no options)"
    return ValueError(f"{full} is not a {kind} (it would be ignored); {fix}")


def check_known_keys(cfg, config_dir: str | None = None) -> None:
    """Refuse any key that neither a shipped config file nor the code defines (see the module docstring)."""
    tree = known_keys(str(config_dir or CONFIG_DIR))
    data = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    _check_keys("", data, tree)


def _check_keys(where: str, data: dict, tree: dict) -> None:
    known = set(tree)
    if where == "trainer":
        for k in data:
            if k in FRAMEWORK_TRAINER_ARGS:
                raise ValueError(f"trainer.{k} is set by randlora itself; use {FRAMEWORK_TRAINER_ARGS[k]} instead "
                                 f"(remove trainer.{k})")
        known |= set(trainer_arguments())
    for k, v in data.items():
        path = f"{where}.{k}" if where else str(k)
        if k not in known:
            raise _unknown(where, str(k), known)
        if path in FREE_FORM or not isinstance(v, dict):
            continue
        sub = tree.get(k)
        if isinstance(sub, dict):
            _check_keys(path, v, sub)


def validate_config(cfg, deep: bool = True) -> None:
    """Raise ``ValueError`` (one line: the key, the value, the fix) for the first bad input of ``cfg``.
    ``deep`` adds the checks that build the architecture on the meta device (targets, rank, budget)."""
    check_known_keys(cfg)  # first: a typo'd key would make the value checks below read the default
    _check_run(cfg)
    method, opts, a = _check_adapter(cfg)
    _check_model(cfg)
    _check_task(cfg)
    _check_data(cfg)
    _check_optim(cfg)
    _check_trainer(cfg)
    _check_hardware(cfg.trainer)
    _check_batch(cfg)
    _check_callbacks(cfg)
    _check_logger(cfg)
    _check_compile(cfg)
    _check_fsdp(cfg)
    if deep and a.get("from_peft") is None:  # an imported PEFT adapter brings its own targets and ranks
        check_targets_on_meta(cfg, method, opts, a)
        if cfg.trainer.get("strategy") == "fsdp":
            check_fsdp_blocks(cfg)


def _check_run(cfg) -> None:
    seed = cfg.get("seed")
    if not _int(seed):
        raise ValueError(f"seed={seed!r} must be an integer")
    for key in ("train", "test"):
        if not isinstance(cfg.get(key), bool):
            raise ValueError(f"{key}={cfg.get(key)!r} must be true or false")
    if not cfg.train and not cfg.test:
        raise ValueError("train=false test=false does nothing; set train=true to train, or test=true with "
                         "ckpt_path=<checkpoint> to evaluate")
    if cfg.get("resume") and not cfg.get("train", True):
        raise ValueError(f"train=false with resume={cfg.resume} would write an evaluation over that run's results; "
                         f"to evaluate a run, use ckpt_path={cfg.resume}/checkpoints/last.ckpt (a new run folder)")
    low = cfg.get("lowrank_error", "auto")
    if low not in (True, False, "auto"):
        raise ValueError(f"lowrank_error={low!r}; choose auto, true or false")
    if low is True and cfg.trainer.get("strategy") == "fsdp":
        raise ValueError("lowrank_error=true is not supported with trainer.strategy=fsdp (each rank holds shards of "
                         "the weights); use lowrank_error=auto or false, or compute it afterwards with "
                         "python -m randlora.export <run> --format lora --rank k")
    metric = cfg.get("optimized_metric")
    if metric is not None and not (isinstance(metric, str) and metric):
        raise ValueError(f"optimized_metric={metric!r} must be a metric name (e.g. val/acc) or null")


def _check_adapter(cfg):
    a = OmegaConf.to_container(cfg.adapter, resolve=True)
    method = a.get("method")
    if method not in METHODS:
        raise ValueError(f"adapter.method={method!r} is unknown; choose one of {list(METHODS)} (e.g. adapter=lora)")
    opts = {k: v for k, v in a.items() if k not in FRAMEWORK_KEYS and v is not None}
    try:
        resolve_options(method, opts)
    except ValueError as e:
        raise ValueError(f"adapter: {e}") from None
    key, lr = _lr_source(cfg)
    if not (_num(lr) and lr > 0):
        raise ValueError(f"{key}={lr!r} must be a positive number")
    if not (_num(a.get("weight_decay", 0)) and a.get("weight_decay", 0) >= 0):
        raise ValueError(f"adapter.weight_decay={a.get('weight_decay')!r} must be >= 0")
    budget = a.get("budget")
    if budget is not None:
        if method == "full":
            raise ValueError("adapter.budget is meaningless for full fine-tuning (every parameter trains); drop it")
        if not (_num(budget) and budget > 0):
            raise ValueError(f"adapter.budget={budget!r} must be a positive number of parameters (e.g. 1e6)")
    if a.get("from_peft") is not None:
        _check_from_peft(cfg, a)
    tm = a.get("target_modules")
    if tm is not None and not isinstance(tm, str) and len(tm) == 0:
        raise ValueError("adapter.target_modules=[] adapts nothing; use null for the model's default targets")
    return method, opts, a


def _check_from_peft(cfg, a: dict) -> None:
    """``adapter.from_peft=<folder>``: evaluate a PEFT adapter (imported, not trained) on the run's model and
    data."""
    folder = a["from_peft"]
    if cfg.get("train"):
        raise ValueError(f"adapter.from_peft={folder} evaluates that PEFT adapter as it is; add train=false (training "
                         "an imported adapter further is not supported: train it in PEFT, or train our own adapter)")
    if cfg.get("ckpt_path") or cfg.get("resume"):
        raise ValueError(f"adapter.from_peft={folder} with a checkpoint (ckpt_path / resume) would evaluate the "
                         "checkpoint's tensors, not the PEFT adapter; drop one of them")
    for key in ("budget", "target_modules"):
        if a.get(key) is not None:
            raise ValueError(f"adapter.{key}={a[key]!r} has no meaning with adapter.from_peft (the PEFT adapter "
                             f"brings its own layers and ranks); drop adapter.{key}")
    p = Path(str(folder)).expanduser()
    if not p.is_dir():
        raise ValueError(f"adapter.from_peft={folder} is not a folder; give the folder PEFT's save_pretrained wrote "
                         "(adapter_config.json + adapter_model.safetensors)")
    if not (p / "adapter_config.json").is_file() or not any((p / n).is_file() for n in
                                                            ("adapter_model.safetensors", "adapter_model.bin")):
        raise ValueError(f"adapter.from_peft={folder} is not a PEFT adapter folder (it needs adapter_config.json and "
                         "adapter_model.safetensors or adapter_model.bin)")


def _check_model(cfg) -> None:
    m = cfg.model
    if m.get("family") not in FAMILIES:
        raise ValueError(f"model.family={m.get('family')!r} is unknown; choose one of {list(FAMILIES)}")
    size = m.get("image_size")
    if size is not None and not (_int(size) and size > 0):
        raise ValueError(f"model.image_size={size!r} must be a positive integer (pixels) or null")


def _check_task(cfg) -> None:
    m, t = cfg.model, cfg.task
    kind = t.kind
    if kind not in TASKS:
        raise ValueError(f"task.kind={kind!r} is unknown; choose one of {list(TASKS)}")
    if (m.family == "hf_causal_lm") != (kind == "causal_lm"):
        raise ValueError(f"task {kind!r} does not fit model {m.name!r} ({m.family}); use the model's task")
    ls = t.get("label_smoothing", 0.0)
    if not (_num(ls) and 0 <= ls < 1):
        raise ValueError(f"task.label_smoothing={ls!r} must be in [0, 1) (the probability mass spread over the "
                         "other classes; 0.1 is usual, 0 turns it off)")
    if kind == "clip":
        # the same values as randlora.tasks.clip.ClipTask, checked before the model is built
        if t.get("loss") not in ("in_batch", "in_batch_official", "all_classes"):
            raise ValueError(f"task.loss={t.get('loss')!r}; choose in_batch, in_batch_official or all_classes")
        if t.get("logit_scale") not in ("exp", "raw"):
            raise ValueError(f"task.logit_scale={t.get('logit_scale')!r}; choose exp or raw")
        if t.get("text_tower") not in ("train", "frozen"):
            raise ValueError(f"task.text_tower={t.get('text_tower')!r}; choose train or frozen")
        prompt = t.get("prompt")
        if not (isinstance(prompt, str) and "{}" in prompt):
            raise ValueError(f"task.prompt={prompt!r} must contain {{}} where the class name goes "
                             "(e.g. 'An image of {}.'); without it every class gets the same text")
    if kind == "causal_lm":
        from ..tasks.causal_lm import options
        options(t)
        lb = t.get("loglik_batch_size", 0)
        if not (_int(lb) and lb >= 0):
            raise ValueError(f"task.loglik_batch_size={lb!r} must be an integer >= 0 (0: the whole eval batch)")


def _check_data(cfg) -> None:
    d = cfg.data
    src = d.get("source")
    if src not in SOURCES:
        raise ValueError(f"data.source={src!r} is unknown; choose one of {list(SOURCES)}")
    for key, readers in SOURCE_ONLY_KEYS.items():
        v = d.get(key)
        if v in (None, {}, []) or src in readers:
            continue
        if key == "path" and src in ("digits", "synthetic"):  # the loader's wording (randlora/data/images.py)
            raise ValueError(f"data.source={src} generates its images and does not read data.path={v!r}, so the run "
                             "would ignore it; drop data.path, or choose a source that reads it (e.g. "
                             "data.source=imagefolder for a folder of class folders; hf, torchvision, ...)")
        raise ValueError(f"data.{key}={v!r} is not read by data.source={src} (dataset {d.get('name')!r}), so the "
                         f"run would ignore it; drop data.{key}, or pick a dataset whose source reads it "
                         f"(data.source={' / '.join(readers)})")
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
    if shots is not None and not (_int(shots) and shots > 0):
        raise ValueError(f"data.shots={shots!r} must be a positive integer (images per class) or null")
    frac = d.get("fraction", 1.0)
    if not (_num(frac) and 0 < frac <= 1):
        raise ValueError(f"data.fraction={frac!r} must be in (0, 1]")
    bs = d.get("batch_size")
    if not (_int(bs) and bs > 0):
        raise ValueError(f"data.batch_size={bs!r} must be a positive integer")
    for key in ("eval_batch_size", "max_test_per_task"):
        v = d.get(key)
        if v is not None and not (_int(v) and v > 0):
            raise ValueError(f"data.{key}={v!r} must be a positive integer or null")
    for key in ("epochs", "few_shot_epochs"):
        v = d.get(key)
        if v is not None and not (_int(v) and v > 0):
            raise ValueError(f"data.{key}={v!r} must be a positive number of epochs")
    for key in ("num_workers", "val_size"):
        v = d.get(key)
        if v is not None and not (_int(v) and v >= 0):
            raise ValueError(f"data.{key}={v!r} must be an integer >= 0")
    if not _int(d.get("seed", 0)):
        raise ValueError(f"data.seed={d.get('seed')!r} must be an integer")
    aug = d.get("augment")
    if aug is not None and aug not in AUGMENTS:
        raise ValueError(f"data.augment={aug!r} is unknown (it would train without augmentation); choose one of "
                         f"{list(AUGMENTS)}")


def _check_optim(cfg) -> None:
    o = cfg.optim
    if o.get("schedule") not in ("cosine", "linear", "constant"):
        raise ValueError(f"optim.schedule={o.get('schedule')!r}; choose cosine, linear or constant")
    if not (_num(o.get("warmup_steps", 0)) and o.get("warmup_steps", 0) >= 0):
        raise ValueError(f"optim.warmup_steps={o.get('warmup_steps')!r} must be >= 0")
    floor = o.get("min_lr_ratio", 0.01)
    if not (_num(floor) and 0 <= floor <= 1):
        raise ValueError(f"optim.min_lr_ratio={floor!r} must be in [0, 1]: the schedule ends at min_lr_ratio x the "
                         "peak learning rate (paper: 0.01); outside it the learning rate turns negative or grows")
    wd = o.get("weight_decay", 0.0)
    if wd is not None and not (_num(wd) and wd >= 0):
        raise ValueError(f"optim.weight_decay={wd!r} must be >= 0")


def _limit(t, key: str, needed: bool, what: str) -> None:
    v = t.get(key)
    if v is None:
        return
    ok = (_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1)
    if not ok:
        raise ValueError(f"trainer.{key}={v!r} must be a number of batches (an integer >= 1) or a fraction of the "
                         "loader in (0, 1]")
    if needed and v == 0:
        raise ValueError(f"trainer.{key}=0 {what} nothing (the run would report 'completed' without it); use a "
                         f"positive value or null (all batches)")


def _check_trainer(cfg) -> None:
    t = cfg.trainer
    acc = t.get("accelerator", "auto")
    if acc not in ACCELERATORS:
        why = "is not supported by randlora" if acc in ("tpu", "xla", "hpu") else "is unknown"
        raise ValueError(f"trainer.accelerator={acc!r} {why}; choose one of {list(ACCELERATORS)} "
                         "(e.g. trainer=cpu or trainer=gpu)")
    if acc == "mps":
        import torch
        if not torch.backends.mps.is_available():
            raise ValueError("trainer.accelerator=mps but no Apple MPS device is available; use trainer=cpu")
    dev = t.get("devices", 1)
    if not _devices_ok(dev):
        raise ValueError(f"trainer.devices={dev!r} selects no device; use a positive count, -1 (all GPUs), 'auto' "
                         "or a list of device ids such as [0, 1]")
    nodes = t.get("num_nodes", 1)
    if not (_int(nodes) and nodes >= 1):
        raise ValueError(f"trainer.num_nodes={nodes!r} must be a positive integer")
    strategy = t.get("strategy", "auto")
    if not isinstance(strategy, str):
        raise ValueError(f"trainer.strategy={strategy!r} must be a strategy name (auto, ddp, fsdp)")
    if strategy != "auto":
        from lightning.pytorch.strategies import StrategyRegistry
        names = StrategyRegistry.available_strategies()
        if strategy not in names:
            close = difflib.get_close_matches(strategy, names + ["auto"], n=1)
            raise ValueError(f"trainer.strategy={strategy!r} is unknown; "
                             + (f"did you mean {close[0]}? " if close else "") + "use auto, ddp or fsdp")
        for prefix, why in STRATEGIES_REFUSED.items():
            if prefix in strategy:
                raise ValueError(f"trainer.strategy={strategy}: {why}")
    max_steps = t.get("max_steps", -1)
    if max_steps is not None and not (_int(max_steps) and (max_steps == -1 or max_steps >= 1)):
        raise ValueError(f"trainer.max_steps={max_steps!r} must be a positive number of optimizer steps, or -1 "
                         "(no step limit: train for max_epochs)")
    me = t.get("max_epochs")
    if me is not None:
        infinite = me == -1 and _int(max_steps) and max_steps >= 1  # Lightning: -1 = until max_steps
        if not (_int(me) and (me >= 1 or infinite)):
            raise ValueError(f"trainer.max_epochs={me!r} must be a positive number of epochs, or null (data.epochs; "
                             "data.few_shot_epochs for k-shot runs)")
    clip = t.get("gradient_clip_val")
    if clip is not None and not (_num(clip) and clip >= 0):
        raise ValueError(f"trainer.gradient_clip_val={clip!r} must be >= 0 (the largest gradient norm kept) or null "
                         "(no clipping); a negative value flips the gradients and trains backwards")
    algo = t.get("gradient_clip_algorithm")
    if algo not in (None, "norm", "value"):
        raise ValueError(f"trainer.gradient_clip_algorithm={algo!r}; choose norm or value")
    acc_b = t.get("accumulate_grad_batches", 1)
    if not (_int(acc_b) and acc_b >= 1):
        raise ValueError(f"trainer.accumulate_grad_batches={acc_b!r} must be a positive integer")
    for key, low in (("log_every_n_steps", 1), ("check_val_every_n_epoch", 1), ("num_sanity_val_steps", -1)):
        v = t.get(key)
        if v is not None and not (_int(v) and v >= low):
            raise ValueError(f"trainer.{key}={v!r} must be an integer >= {low}")
    det = t.get("deterministic")
    if det not in (None, True, False, "warn"):
        raise ValueError(f"trainer.deterministic={det!r}; choose true, false or warn")
    _limit(t, "limit_train_batches", bool(cfg.get("train", True)), "trains on")
    _limit(t, "limit_val_batches", False, "validates on")
    _limit(t, "limit_test_batches", bool(cfg.get("test", True)), "tests on")


def _devices_ok(dev) -> bool:
    if _int(dev):
        return dev >= 1 or dev == -1
    if isinstance(dev, str):
        s = dev.strip()
        if s == "auto":
            return True
        parts = [p for p in s.split(",") if p.strip()]
        if not parts or not all(p.strip().lstrip("-").isdigit() for p in parts):
            return False
        return _devices_ok(int(parts[0])) if len(parts) == 1 and not s.endswith(",") else all(
            int(p) >= 0 for p in parts)
    if isinstance(dev, (list, tuple)) or OmegaConf.is_list(dev):
        return len(dev) > 0 and all(_int(x) and x >= 0 for x in dev)
    return False


def world_size(trainer) -> int:
    """How many processes train (devices per node x nodes), by one rule for every part of the framework:
    a positive count or a list / "0,1" string of device ids as given; -1 or "auto" all visible GPUs on a
    GPU accelerator (at least 1), one process on the CPU."""
    dev = trainer.get("devices", 1)
    if OmegaConf.is_list(dev) or isinstance(dev, (list, tuple)):
        n = len(dev)
    elif isinstance(dev, str) and dev.strip() != "auto":
        n = len([p for p in dev.split(",") if p.strip()]) if "," in dev else max(1, int(dev))
    elif _int(dev) and dev > 0:
        n = dev
    else:  # -1 / "auto"
        import torch
        acc = trainer.get("accelerator", "auto")
        n = max(1, torch.cuda.device_count()) if acc in ("gpu", "cuda") or (
            acc in ("auto", None) and torch.cuda.is_available()) else 1
    return n * int(trainer.get("num_nodes", 1) or 1)


def _check_batch(cfg) -> None:
    eff = cfg.get("effective_batch_size")
    if eff is not None and not (_int(eff) and eff > 0):
        raise ValueError(f"effective_batch_size={eff!r} must be a positive integer or null")
    if eff is not None:
        per_step = cfg.data.batch_size * world_size(cfg.trainer)
        if eff % per_step:
            raise ValueError(f"effective_batch_size={eff} is not a multiple of data.batch_size x devices = "
                             f"{per_step}; choose a multiple (accumulation must be a whole number)")


def resolve(cfg):
    """The config with every default the run depends on made explicit, so that it is recorded once, as it
    trains: ``optim.lr`` (the method's paper LR for the task when unset), ``trainer.max_epochs`` (the
    dataset's epochs, or its few-shot epochs for k-shot runs, when unset) and
    ``trainer.accumulate_grad_batches`` (from ``effective_batch_size``). ``cfg`` must have passed
    ``validate_config``; a resolved config resolves to itself."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.optim.lr = float(effective_lr(cfg))
        t = cfg.trainer
        if t.get("max_epochs") is None:
            shots = cfg.data.get("shots")
            t.max_epochs = int(cfg.data.get("few_shot_epochs" if shots else "epochs", 1) or 1)
        eff = cfg.get("effective_batch_size")
        if eff:
            t.accumulate_grad_batches = int(eff) // (int(cfg.data.batch_size) * world_size(t))
    return cfg


def _check_callbacks(cfg) -> None:
    c = cfg.get("callbacks") or {}
    every = (c.get("checkpoint") or {}).get("every_n_epochs", 1)
    if every is not None and not (_int(every) and every >= 1):
        raise ValueError(f"callbacks.checkpoint.every_n_epochs={every!r} must be a positive integer")
    steps = c.get("checkpoint_every_n_train_steps")
    if steps is not None and not (_int(steps) and steps >= 1):
        raise ValueError(f"callbacks.checkpoint_every_n_train_steps={steps!r} must be a positive integer or null")
    kill = c.get("kill_at_step")
    if kill is not None and not (_int(kill) and kill >= 0):
        raise ValueError(f"callbacks.kill_at_step={kill!r} must be an integer >= 0 or null")


def _check_logger(cfg) -> None:
    lg = cfg.get("logger") or {}
    w = lg.get("wandb")
    if not w:
        return
    mode = w.get("mode", "auto")
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logger.wandb.mode={mode!r}; choose auto, online, offline or disabled")
    for key in ("init_timeout", "probe_timeout", "finish_timeout"):
        v = w.get(key)
        if v is not None and not (_num(v) and v > 0):
            raise ValueError(f"logger.wandb.{key}={v!r} must be a positive number of seconds")


def _check_fsdp(cfg) -> None:
    """What randlora's FSDP strategy (randlora.training.distributed.fsdp_strategy) does not support."""
    if cfg.trainer.get("strategy") != "fsdp":
        return
    from ..compile import normalise_options
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
    from ..compile import repeated_blocks
    from ..models import meta_backbone
    model = meta_backbone(cfg.model)
    if model is not None and not repeated_blocks(model):
        raise ValueError(f"trainer.strategy=fsdp shards the model block by block, but {cfg.model.name!r} has no "
                         "repeated blocks (a ModuleList / Sequential of blocks of one class); use trainer.strategy=ddp")


def check_targets_on_meta(cfg, method, opts, a) -> None:
    """Targets, rank and budget against the architecture built on the meta device (no weights)."""
    if method == "full":
        return
    from ..adapters import BudgetWarning, check_rank, find_targets, match_budget
    from ..models import meta_backbone
    model = meta_backbone(cfg.model)
    if model is None:
        return  # only knowable after loading (a hub-only architecture): inject() checks it then
    targets = a.get("target_modules") or list(cfg.model.targets)
    try:
        found = find_targets(model, targets)
        if a.get("budget") is not None:
            extra = {"tolerance": float(a["budget_tolerance"])} if a.get("budget_tolerance") is not None else {}
            if a.get("scaling") is not None:
                extra["scaling"] = float(a["scaling"])
            with warnings.catch_warnings():  # recorded and printed once when the adapter is built
                warnings.simplefilter("ignore", BudgetWarning)
                match_budget(model, method, float(a["budget"]), target_modules=targets, **extra,
                             **{k: v for k, v in opts.items() if k != "r"})
        else:
            full_opts = resolve_options(method, opts)
            check_rank(method, full_opts, found)
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
    from ..compile import normalise_options
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
    on_cuda = acc in ("gpu", "cuda") or (acc == "auto" and cuda)
    if on_cpu and prec in ("16-mixed", "16-true"):
        raise ValueError(f"trainer.precision={prec} is not supported on the CPU; use bf16-mixed or 32-true")
    if on_cuda and prec.startswith("bf16") and not torch.cuda.is_bf16_supported():
        raise ValueError(f"trainer.precision={prec} needs a GPU with bf16 (Ampere or newer); use 16-mixed")
    dev = t.get("devices", 1)
    if on_cuda and isinstance(dev, int) and dev > torch.cuda.device_count():
        raise ValueError(f"trainer.devices={dev} but only {torch.cuda.device_count()} GPU(s) are visible")
    if on_cpu and not ((_int(dev) and dev >= 1) or dev == "auto"):
        raise ValueError(f"trainer.devices={dev!r} on the CPU must be a number of processes (a positive integer, "
                         "e.g. trainer.devices=2 with trainer.strategy=ddp)")
    if on_cpu and isinstance(dev, int) and dev > 1 and t.get("strategy") in ("auto", None):
        raise ValueError(f"trainer.devices={dev} on the CPU needs trainer.strategy=ddp (see trainer=ddp_cpu)")
