"""The stages of a job, each built from the resolved config and what the stage before produced:

    data    = build_datamodule(cfg)               # the resolved config only (image size and normalisation are
                                                  # model facts, in cfg.model); set up before the model is
                                                  # loaded, so a data problem costs nothing
    bundle  = build_model(cfg.model)              # randlora.models: backbone, tokenizer, default targets
    network, adapter = adapt(cfg, bundle, data)   # the task's network, the adapter injected (budget matched)
    task    = build_task(cfg, bundle, data, network, adapter)
    trainer = lightning.Trainer(**trainer_kwargs(cfg), callbacks=..., ...)   # see randlora/train.py

``randlora.train.run`` calls them in this order; tests and benchmarks use them one by one. ``model_network``
builds a model config's task network without data (for benchmarks and experiments).
"""
from __future__ import annotations

import math
import sys
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
    if cfg.adapter.get("from_peft"):
        adapter = import_peft_adapter(cfg, network)
    else:
        adapter = inject_adapter(network, cfg.adapter)
    task_cls.after_inject(network.net, adapter["method"], task_cfg)
    return network, adapter


def import_peft_adapter(cfg, network: Network) -> dict:
    """``adapter.from_peft=<folder>``: the PEFT adapter in that folder imported into ``network.net`` by
    ``randlora.adapters.import_peft`` (our own method, PEFT's outputs; no adapter of ours injected first).
    An image classifier's adapter may name the network's modules (``backbone.blocks.0...``, ``head``) or, as
    when PEFT adapted ``timm.create_model(arch, num_classes=C)``, timm's (``blocks.0...``, ``head``): the
    latter is imported into timm's model and moved over (``randlora.training.native``). Returns what
    ``inject_adapter`` returns, and ``source``: the folder and the checksums of its files."""
    from pathlib import Path

    from ..adapters import adapter_meta, adapter_state_dict, import_peft, load_adapter_state_dict
    from ..models import file_sha256
    from .native import BACKBONE, move_adapter_state, native_model, wraps_backbone
    folder = Path(str(cfg.adapter.from_peft)).expanduser().resolve()
    if wraps_backbone(cfg) and not _names_modules_under(folder, BACKBONE):
        native = native_model(cfg, network.net.backbone, network.net.head)
        import_peft(native, folder)
        load_adapter_state_dict(network.net, move_adapter_state(adapter_state_dict(native), to_native=False))
    else:
        import_peft(network.net, folder)
    meta = adapter_meta(network.net)
    source = {"path": str(folder)}
    for key, name in (("adapter_config_sha256", "adapter_config.json"), ("weights_sha256", "adapter_model.safetensors"),
                      ("weights_sha256", "adapter_model.bin")):
        if (folder / name).is_file() and key not in source:
            source[key] = file_sha256(folder / name)
    import json
    source["peft_type"] = json.loads((folder / "adapter_config.json").read_text()).get("peft_type")
    return {"method": meta["method"], "r": meta["options"].get("r"), "budget": None, "budget_match": None,
            "budget_summary": None, "warnings": [], "source": source}


def _names_modules_under(folder, prefix: str) -> bool:
    """Whether the PEFT adapter in ``folder`` adapts modules named ``prefix...`` (its tensor keys read
    ``base_model.model.<prefix>...``)."""
    from pathlib import Path
    f = Path(folder) / "adapter_model.safetensors"
    if f.is_file():
        from safetensors import safe_open
        with safe_open(str(f), framework="pt") as h:
            keys = list(h.keys())
    else:
        import torch
        keys = list(torch.load(str(Path(folder) / "adapter_model.bin"), map_location="cpu", weights_only=True))
    return any(k.startswith("base_model.model." + prefix) for k in keys)


# ----------------------------------------------------------------------------------------------- task
def model_network(cfg_model, num_classes: int | None = None, seed: int = 0, task_cfg: dict | None = None):
    """(network, bundle): the network ``adapt`` would adapt for model config ``cfg_model`` under the task
    the config names (``cfg_model.task``), built without a dataset: ``build_model(cfg_model)``, then the
    task's ``network`` (an image classifier gets a linear head over ``num_classes`` classes, initialised
    from ``seed``). The global RNG is seeded with ``seed`` first (random weights are drawn from it). For the benchmarks and experiments, which train what ``train.py`` trains without its
    data; ``network.targets`` / ``network.trainable_modules`` are the default adapter targets and the
    modules that train in full next to an adapter."""
    from types import SimpleNamespace

    import torch

    from ..models import build_model
    torch.manual_seed(int(seed))  # random weights (pretrained: null) drawn from the seed, as in a seeded job
    bundle = build_model(cfg_model)
    kind = cfg_model.get("task")
    cls = TASKS.get(kind)
    if cls is None or cls.model_kind != bundle.kind:
        raise UserError(f"model config {cfg_model.get('name')!r} names task {kind!r}, which does not fit a "
                        f"{bundle.kind} model")
    if cls.model_kind == "vision" and not num_classes:
        raise UserError("an image classifier's network needs num_classes (the width of its head)")
    return cls.network(bundle, SimpleNamespace(num_classes=num_classes), dict(task_cfg or {}), int(seed)), bundle


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


# ------------------------------------------------------------------------------------ low-rank error
LOWRANK_AUTO_COST = 1e11  # lowrank_error=auto: on when sum over layers of out * in * min(out, in) is at most this


def lowrank_wanted(cfg, net) -> bool:
    """Whether the run records ``lowrank`` in results.json (``lowrank_error``: true / false / auto). auto: for
    an adapter whose float64 SVDs cost at most :data:`LOWRANK_AUTO_COST` (ViT-B/16 or CLIP ViT-B size: seconds
    on a CPU; a 7-8B LLM's take minutes: off), and never under FSDP (each rank holds shards)."""
    mode = cfg.get("lowrank_error", "auto")
    layers = adapted_layers(net)
    if mode is False or not layers:
        return False
    if mode is True:
        return True
    if cfg.trainer.get("strategy") == "fsdp":
        return False
    cost = 0.0
    for _, layer in layers:
        o, i = layer.update.out_features, layer.update.in_features
        cost += float(o) * i * min(o, i)
    return cost <= LOWRANK_AUTO_COST


def lowrank_summary(net, lora_rank) -> dict | None:
    """The cost of truncating the trained update to the rank of the LoRA with the same parameter count
    ("full rank matters"): k = floor(LoRA-equivalent rank) (at least 1), per layer the relative Frobenius
    error ||dW - dW_k||_F / ||dW||_F of the best rank-k approximation (``randlora.adapters.truncation`` on
    the float64 singular values), their mean, max and the error over all layers stacked, and the mean of the
    smallest rank per layer keeping 99 % of ||dW||_F^2. None without a LoRA-equivalent rank."""
    from ..adapters import delta_spectra, rank_for_energy, truncation
    if lora_rank is None or not math.isfinite(float(lora_rank)):
        return None
    k = max(1, int(math.floor(float(lora_rank) + 1e-9)))
    spectra = delta_spectra(net)
    layers, tails, totals, r99 = {}, 0.0, 0.0, []
    for name, s in spectra.items():
        err, _ = truncation(s, k)
        layers[name] = err
        sq = float((s.double() ** 2).sum())
        totals += sq
        tails += (err ** 2) * sq
        r99.append(rank_for_energy(s, 0.99))
    errors = list(layers.values())
    return {"rank": k, "overall_rel_error": math.sqrt(tails / totals) if totals else 0.0,
            "mean_rel_error": sum(errors) / len(errors), "max_rel_error": max(errors),
            "rank99_mean": sum(r99) / len(r99), "layers": layers}


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
    out = {k: v for k, v in t.items() if v is not None}
    if t.get("enable_progress_bar") is None:  # a progress bar only where someone watches it
        out["enable_progress_bar"] = bool(sys.stdout.isatty())
    return out
