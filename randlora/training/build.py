"""The stages of a job, each built from the resolved config and what the stage before produced:

    data    = build_datamodule(cfg)               # the resolved config only (image size and normalisation are
                                                  # model facts, in cfg.model); set up before the model is
                                                  # loaded, so a data problem costs nothing
    bundle  = build_model(cfg.model)              # randlora.models: backbone, tokenizer, default targets
    network, adapter = adapt(cfg, bundle, data)   # the task's network, the adapter injected (budget matched)
    task    = build_task(cfg, bundle, data, network, adapter)
    trainer = lightning.Trainer(**trainer_kwargs(cfg), callbacks=..., ...)   # see randlora/train.py

``randlora.train.run`` calls them in this order; tests and benchmarks use them one by one.
"""
from __future__ import annotations

import warnings

from omegaconf import DictConfig, OmegaConf

from ..adapters import (BudgetWarning, ScalingWarning, adapted_layers, count_total, count_trainable,
                        format_parameter_table, inject, lora_equivalent_rank, match_budget, scaling_warnings)
from ..errors import UserError
from ..results import budget_record
from ..tasks import TASKS
from ..tasks.base import Network
from .config import FRAMEWORK_KEYS


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


# ----------------------------------------------------------------------------------------------- data
def build_datamodule(cfg):
    """The datamodule of ``cfg.data``. Image data is read at the model's input size and normalised with
    its statistics (``cfg.model.image_size / mean / std``: stated in every model config and checked
    against the libraries' metadata by tests/test_model_fidelity.py)."""
    from ..data.images import ImageDataModule
    from ..models import CLIP_MEAN, CLIP_STD
    d = _plain(cfg.data)
    kind = cfg.task.kind
    if kind == "causal_lm":
        from ..data.commonsense import InstructionDataModule
        return InstructionDataModule(**d, order_seed=int(cfg.seed))
    d["image_size"] = cfg.model.get("image_size") or d.get("image_size") or 224
    d["mean"], d["std"] = cfg.model.get("mean") or CLIP_MEAN, cfg.model.get("std") or CLIP_STD
    d["order_seed"] = int(cfg.seed)
    d["require_class_names"] = kind == "clip"  # CLIP scores class names: unnamed labels refused before the model
    return ImageDataModule(**d)


# -------------------------------------------------------------------------------------------- adapter
def adapter_kwargs(adapter_cfg, targets, trainable_modules=None) -> tuple[str, dict]:
    """(method, keyword arguments of ``inject``) from an ``adapter`` config node and the network's targets."""
    a = _plain(adapter_cfg)
    method = a["method"]
    kw = {k: v for k, v in a.items() if k not in FRAMEWORK_KEYS and v is not None}
    if method != "full":
        kw["target_modules"] = a.get("target_modules") or targets
        if trainable_modules:
            kw["trainable_modules"] = list(trainable_modules)
    return method, kw


def inject_adapter(network: Network, adapter_cfg) -> dict:
    """Inject the configured adapter into ``network.net`` (the rank picked by ``adapter.budget`` when
    set: ``match_budget`` reaches it within ``adapter.budget_tolerance`` by mixing neighbouring ranks);
    return what was injected: method, r, the budget and, when matched, the match's record for results.json
    (``results.budget_record``: achieved count, deviation, per-layer ranks, warnings) and its log line, and
    ``warnings``: [{category, message}] of the degenerate regimes (the match's; for a rank set directly,
    ``scaling_warnings``), for results.json ``adapter_warnings`` (printed once by the caller)."""
    a = _plain(adapter_cfg)
    method, kw = adapter_kwargs(a, network.targets, network.trainable_modules)
    budget = a.get("budget")
    match = None
    if budget is not None:
        extra = {"tolerance": float(a["budget_tolerance"])} if a.get("budget_tolerance") is not None else {}
        if a.get("scaling") is not None:
            extra["scaling"] = float(a["scaling"])
        with warnings.catch_warnings():  # the warnings are recorded (and printed once by the caller)
            warnings.simplefilter("ignore", BudgetWarning)
            match = match_budget(network.net, method, float(budget), **extra,
                                 **{k: v for k, v in kw.items() if k != "r"})
        kw = dict(match)
        found = [{"category": c, "message": m} for c, m in zip(match.warning_categories, match.warnings)]
    elif method != "full":
        found = [{"category": ScalingWarning.__name__, "message": m} for m in scaling_warnings(method, kw)]
    else:
        found = []
    inject(network.net, method, **kw)
    return {"method": method, "r": kw.get("r"), "budget": None if budget is None else float(budget),
            "budget_match": None if match is None else budget_record(match),
            "budget_summary": None if match is None else match.summary(), "warnings": found}


def adapt(cfg, bundle, data) -> tuple[Network, dict]:
    """The task's network for this model and dataset, with the configured adapter injected."""
    task_cls = task_class(cfg, bundle)
    task_cfg = _plain(cfg.task)
    network = task_cls.network(bundle, data, task_cfg, int(cfg.seed))
    adapter = inject_adapter(network, cfg.adapter)
    task_cls.after_inject(network.net, adapter["method"], task_cfg)
    return network, adapter


# ----------------------------------------------------------------------------------------------- task
def task_class(cfg, bundle):
    kind = cfg.task.kind
    cls = TASKS.get(kind)
    if cls is None or cls.model_kind != bundle.kind:
        raise UserError(f"task {kind!r} does not fit a {bundle.kind} model ({cfg.model.name})")
    return cls


def build_task(cfg, bundle, data, network: Network | None = None, adapter: dict | None = None):
    """The LightningModule of ``cfg.task`` on ``network`` (adapted here when not given)."""
    if network is None:
        network, adapter = adapt(cfg, bundle, data)
    return task_class(cfg, bundle).from_config(network.net, bundle, data, _plain(cfg.task), _plain(cfg.optim),
                                               adapter)


# ---------------------------------------------------------------------------------------- accounting
class ParameterCounts:
    """The parameter counts of a task's network for results.json. The whole-model counts are taken
    when the network is built: under FSDP each rank later holds only shards of the sharded parameters
    (the frozen weights; every weight in full fine-tuning). Trained adapter tensors are always whole."""

    def __init__(self, task):
        self.task = task
        self.trainable, self.total = count_trainable(task.net), count_total(task.net)

    def summary(self) -> dict:
        net = self.task.net
        adapted = bool(adapted_layers(net))  # an adapter (full fine-tuning has no adapted layers)
        trainable = count_trainable(net) if adapted else self.trainable
        out = {"trainable": trainable, "total": self.total,
               "ratio": trainable / self.total if self.total else float("nan")}
        if adapted:
            out["adapter"] = sum(p.numel() for _, layer in adapted_layers(net) for p in layer.update.parameters())
            out["lora_equivalent_rank"] = lora_equivalent_rank(net)
        else:
            out["adapter"], out["lora_equivalent_rank"] = trainable, None
        schedule = getattr(self.task, "schedule", None)
        if schedule is not None and hasattr(schedule, "counts"):  # a method that prunes: three counts
            c = schedule.counts()
            out["adapter_during_training"] = c["training"]
            out["adapter_stored"] = c["stored"]
            out["lora_equivalent_rank"] = c["lora_equivalent_rank"]
        return out

    def table(self) -> str:
        """The per-layer table (parameters.txt); empty for full fine-tuning."""
        net = self.task.net
        return format_parameter_table(net) if adapted_layers(net) else ""


# -------------------------------------------------------------------------------------------- compile
def compile_task(cfg, task, verbose: bool = True) -> dict:
    """torch.compile the task's network in place, as ``cfg.compile`` says; a short record of it."""
    from ..compile import compile_model, normalise_options
    from .config import compile_options
    opts = compile_options(cfg)
    if normalise_options(opts) is not None:
        import torch._dynamo
        # a fresh cache per job: in a multirun every job compiles its own adapter variant of the same
        # block class, and entries left by earlier jobs counted against the recompile limit (the 17th
        # job of a sweep ran eager)
        torch._dynamo.reset()
    info = compile_model(task.net, opts)
    if not info["enabled"]:
        return info
    info["cudagraphs"] = info["mode"] in ("reduce-overhead", "max-autotune")
    outside = info["adapted_layers_not_compiled"]
    info["modules"], info["adapted_layers_not_compiled"] = len(info.pop("compiled")), len(outside)
    if verbose:
        print(f"torch.compile ({info['scope']} scope, mode {info['mode'] or 'default'}, {info['backend']}): "
              f"{info['modules']} modules of {', '.join(info['classes'])}; the first steps include compile time",
              flush=True)
        if outside:
            print(f"torch.compile: {len(outside)} adapted layers lie outside the compiled blocks and run eager "
                  f"(e.g. {outside[0]})", flush=True)
    return info


# -------------------------------------------------------------------------------------------- trainer
def trainer_kwargs(cfg) -> dict:
    """Lightning Trainer arguments of the resolved config (``training.config.resolve`` has made the
    epochs and the gradient accumulation explicit)."""
    t = _plain(cfg.trainer)
    return {k: v for k, v in t.items() if v is not None}
