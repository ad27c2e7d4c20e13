"""What every task shares: adapter injection from the config, parameter accounting, the
optimiser and schedule of the paper, lean checkpoints, and random-basis checks across ranks."""
from __future__ import annotations

import hashlib
import math

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric

from ..adapters import (count_total, count_trainable, format_parameter_table, inject, lora_equivalent_rank,
                        match_budget, shared_bases)
from ..adapters import FUNCTION_OPTIONS, adapted_layers, adapter_meta, clean_name, diff_meta
from ..adapters.state import jsonable
from ..distributed import check_static_buffers, static_buffer_names

# keys of the adapter config that are not options of inject()
_NOT_OPTIONS = {"method", "budget", "lr", "lr_by_task", "weight_decay", "target_modules", "trainable_modules", "name"}


def adapter_kwargs(adapter_cfg, default_targets, trainable_modules=None) -> tuple[str, dict]:
    """(method, kwargs for inject) from an ``adapter`` config node."""
    cfg = OmegaConf.to_container(adapter_cfg, resolve=True) if isinstance(adapter_cfg, DictConfig) else dict(adapter_cfg)
    method = cfg["method"]
    opts = {k: v for k, v in cfg.items() if k not in _NOT_OPTIONS and v is not None}
    targets = cfg.get("target_modules") or default_targets
    kw = dict(opts)
    if method != "full":
        kw["target_modules"] = targets
        if trainable_modules:
            kw["trainable_modules"] = trainable_modules
    return method, kw


def apply_adapter(module: torch.nn.Module, adapter_cfg, default_targets, trainable_modules=None) -> dict:
    """Inject the configured adapter (picking r from ``adapter.budget`` if set); return its facts."""
    method, kw = adapter_kwargs(adapter_cfg, default_targets, trainable_modules)
    budget = adapter_cfg.get("budget")
    if budget is not None:
        # inject's keyword arguments: r, plus layer_options where some layers take a neighbouring rank
        kw = dict(match_budget(module, method, float(budget), **{k: v for k, v in kw.items() if k != "r"}))
    inject(module, method, **kw)
    return {"method": method, "r": kw.get("r"), "budget": None if budget is None else float(budget)}


def bases_checksum(module) -> str | None:
    b = shared_bases(module)
    if b is None:
        return None
    h = hashlib.sha256()
    for name in sorted(b._buffers):
        h.update(b._buffers[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class AdapterTask(L.LightningModule):
    """Base class. Subclasses build ``self.net`` (the adapted module) in ``__init__``."""

    def __init__(self, optim: dict, adapter_info: dict | None = None):
        super().__init__()
        self.optim = dict(optim)
        self.adapter_info = adapter_info or {}
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.bases_checksum = None
        self._param_counts = None
        self.eval_loss = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    # -- accounting
    def parameter_summary(self) -> dict:
        net = self.net
        # Counted once, on the whole model: under FSDP each rank later holds only shards of the sharded
        # parameters (the frozen weights; every weight in full fine-tuning). Counts never change after
        # injection (DoRA-DR prunes with masks); replicated (trained) parameters are always whole.
        if self._param_counts is None:
            self._param_counts = (count_trainable(net), count_total(net))
        trainable, total = self._param_counts
        if self.adapter_info.get("method") not in (None, "full"):
            trainable = count_trainable(net)
        out = {"trainable": trainable, "total": total, "ratio": trainable / total if total else float("nan")}
        if self.adapter_info.get("method") not in (None, "full"):
            adapter = sum(p.numel() for _, layer in adapted_layers(net) for p in layer.update.parameters())
            out["adapter"] = adapter
            out["lora_equivalent_rank"] = lora_equivalent_rank(net)
        else:
            out["adapter"] = trainable
            out["lora_equivalent_rank"] = None
        if self.dynamic_rank is not None:  # the three DoRA-DR counts
            c = self.dynamic_rank.counts()
            out["adapter_during_training"] = c["training"]
            out["adapter_stored"] = c["stored"]
            out["lora_equivalent_rank"] = c["lora_equivalent_rank"]
        return out

    def parameter_table_text(self) -> str:
        return "" if self.adapter_info.get("method") == "full" else format_parameter_table(self.net)

    # -- torch.compile with CUDA graphs (compile.mode=reduce-overhead or max-autotune): every step
    #    opens a new generation of the graph trees, so no step reads an output the next one overwrote
    cudagraphs = False

    def _mark_step(self):
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def on_train_batch_start(self, batch, batch_idx):
        self._mark_step()

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0):
        self._mark_step()

    def on_test_batch_start(self, batch, batch_idx, dataloader_idx=0):
        self._mark_step()

    # -- DoRA-DR: the pruning schedule follows the optimizer step count
    dynamic_rank = None

    def _start_dynamic_rank(self):
        from ..adapters.dora_dr import DynamicRankScheduler
        self.dynamic_rank = DynamicRankScheduler.for_model(self.net, self.trainer.estimated_stepping_batches)
        self._last_step = self.trainer.global_step

    def add_regularizer(self, loss):
        """Task loss plus the adapter's regulariser (DoRA-DR's DEM in its first two phases)."""
        if self.dynamic_rank is None:
            return loss
        reg = self.dynamic_rank.regularizer(self.trainer.global_step)
        if reg is None:
            return loss
        self.log("train/dem", reg.detach(), on_step=True, on_epoch=False)
        return loss + reg

    _rank_step = None  # (step, info) of DoRA-DR's update after the last optimizer step, logged at batch end

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.dynamic_rank is None:
            return
        # Right after the optimizer step, not at the batch end: Lightning writes step-triggered
        # checkpoints in the callbacks' on_train_batch_end, before the module's, so an update made
        # there was missing from a mid-epoch checkpoint and a resume from it diverged.
        step = self.trainer.global_step + 1  # Lightning counts this step once optimizer_step returns
        bcast = (lambda t: self.trainer.strategy.broadcast(t, src=0)) if self.trainer.world_size > 1 else None
        self._rank_step = (step, self.dynamic_rank.after_step(step, broadcast=bcast))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.dynamic_rank is None or self._rank_step is None:
            return  # no optimizer step happened (gradient accumulation)
        (step, info), self._rank_step = self._rank_step, None
        self._last_step = step
        self.log("dora/live_components", float(info["live"]), on_step=True, on_epoch=False)
        if "threshold" in info:
            self.log("dora/threshold", info["threshold"], on_step=True, on_epoch=False)
        if step == self.dynamic_rank.t_end and self.trainer.is_global_zero:
            import os
            path = os.path.join(self.trainer.default_root_dir, "dora_dr_ranks.png")
            from ..analysis import plot_rank_heatmap
            plot_rank_heatmap(self.dynamic_rank.rank_table(), path, r_start=self.dynamic_rank.r_start,
                              r=self.dynamic_rank.r)
            for lg in self.loggers:
                if hasattr(lg, "log_image"):
                    lg.log_image(key="dora/rank_heatmap", images=[path])

    def on_train_end(self):
        if self.dynamic_rank is not None and self.trainer.world_size > 1:
            masks = torch.cat([u.final_mask.flatten().float() for _, u in self.dynamic_rank.layers])
            every = self.all_gather(masks)
            if not torch.all(every == every[0]):
                raise RuntimeError("DoRA-DR final masks differ across DDP ranks")

    def on_fit_start(self):
        if self.adapter_info.get("method") == "dora_dr":
            self._start_dynamic_rank()
        self.bases_checksum = bases_checksum(self.net)
        self._check_ranks()
        ps = {f"params/{k}": float(v) for k, v in self.parameter_summary().items() if v is not None}
        if self.trainer.is_global_zero:
            for lg in self.loggers:
                lg.log_metrics(ps, step=0)
                lg.log_hyperparams({"adapter": self.adapter_info, **ps})

    # -- DDP: the random bases and the other non-persistent buffers are constants built identically on
    #    every rank; DDP must not broadcast them from rank 0 before every forward (235 MB per step for a
    #    LLaMA-width RandLoRA). Read by DistributedDataParallel when it wraps us, and by Lightning's
    #    one-off sync of test / validate / predict runs. Names assigned to it (torch's documented way to
    #    exclude more) are kept in addition.
    _ddp_extra_ignore: tuple = ()
    _ranks_checked = False

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        return sorted(set(static_buffer_names(self)) | set(self._ddp_extra_ignore))

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names) -> None:
        self._ddp_extra_ignore = tuple(names)

    def _check_ranks(self) -> None:
        """Every rank must hold the same constant buffers, since DDP no longer overwrites them with rank
        0's: checked once, at the start of whichever of fit / validate / test / predict comes first."""
        trainer = self._trainer  # None when a hook is called by hand, outside a Trainer
        if trainer is not None and trainer.world_size > 1 and not self._ranks_checked:
            check_static_buffers(self, self.all_gather, self.device)
            self._ranks_checked = True

    def on_validation_start(self):
        self._check_ranks()

    def on_test_start(self):
        self._check_ranks()

    def on_predict_start(self):
        self._check_ranks()

    # -- optimisation (paper: AdamW, cosine from the peak LR down to 1 % of it, optional warmup)
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(self.optim["lr"]), weight_decay=float(self.optim["weight_decay"]),
                                betas=tuple(self.optim.get("betas", (0.9, 0.999))))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.optim.get("warmup_steps", 0))
        floor = float(self.optim.get("min_lr_ratio", 0.01))
        schedule = self.optim.get("schedule", "cosine")

        def factor(step):
            if step < warmup:
                return (step + 1) / warmup
            if schedule == "constant":
                return 1.0
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            if schedule == "linear":
                return 1.0 - (1.0 - floor) * t
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = getattr(self.trainer.strategy, "clip_trained_gradients", None)  # randlora's FSDP strategy
        if clip is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_val:
            clip(optimizer, float(gradient_clip_val), gradient_clip_algorithm)

    # -- checkpoints: keep trained tensors only (frozen weights come from the model source)
    def on_save_checkpoint(self, checkpoint):
        trained = {clean_name(n) for n, p in self.named_parameters() if p.requires_grad}  # FSDP-wrapped too
        sd = checkpoint["state_dict"]
        # trained parameters plus the adapters' own buffers (DoRA-DR's EMA scores and final masks)
        keep = {k: v for k, v in sd.items() if k in trained or ".update." in k}
        if self.adapter_info.get("method") == "full":
            keep = sd
        checkpoint["state_dict"] = keep
        checkpoint["adapter_meta"] = adapter_meta(self.net) if hasattr(self.net, "_adapter_meta") else None
        checkpoint["bases_checksum"] = bases_checksum(self.net)
        if self.run_record is not None:  # settings, base model and dataset: checked by a resume (runfolder.py)
            checkpoint["randlora_run"] = self.run_record

    # the run's record (settings, base model and dataset identity), set by randlora.train.run
    run_record = None

    def check_checkpoint(self, checkpoint: dict) -> None:
        """Raise a ValueError if ``checkpoint`` was not trained with this task's adapter: another method,
        other targets or trainable modules (so other tensor shapes), other random bases, or an option that
        changes what the adapter computes (``FUNCTION_OPTIONS``: r, alpha, ...). Options that do not
        (compute path, dropout, init, ...) may differ."""
        saved_meta = checkpoint.get("adapter_meta")
        if saved_meta is not None and hasattr(self.net, "_adapter_meta"):
            function = tuple(f"options.{k}:" for k in FUNCTION_OPTIONS)
            diffs = [d for d in diff_meta(jsonable(adapter_meta(self.net)), jsonable(saved_meta))
                     if not d.startswith("options.") or d.startswith(function)]
            if diffs:
                raise ValueError("the checkpoint was trained with another adapter: " + "; ".join(diffs)
                                 + "; resume with the checkpoint's adapter settings")
        saved = checkpoint.get("bases_checksum")
        mine = bases_checksum(self.net)
        if saved is not None and mine is not None and saved != mine:
            theirs = ((saved_meta or {}).get("options") or {}).get("bases_dtype", "float32")
            ours = adapter_meta(self.net)["options"].get("bases_dtype", "float32")
            if theirs != ours:
                raise ValueError(
                    f"the checkpoint was trained with random bases stored as {theirs}, this run stores them as "
                    f"{ours} (adapter.bases_dtype follows trainer.precision unless set); resume with "
                    f"adapter.bases_dtype={theirs}")
            raise ValueError(f"the checkpoint was trained with other random bases (checksum {saved}, this run "
                             f"{mine}); resume with the same adapter.seed, adapter.distribution and targets")

    def log_eval_loss(self, stage: str, value: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        """Log ``<stage>/loss`` as the epoch's weighted mean of ``value``, exact across ranks: the
        metric sums values and weights on every rank. (Logging a batch mean with ``sync_dist``
        averaged Lightning's integer sample counter and truncated it, which biased the mean whenever
        ranks evaluated different numbers of samples.)"""
        metric = self.eval_loss[stage]
        metric.update(value.detach().float(), weight)
        self.log(f"{stage}/loss", metric, on_step=False, on_epoch=True)

    def load_trained_tensors(self, checkpoint: dict) -> None:
        """Load a checkpoint's trained tensors into this (unwrapped) task, for evaluation without
        training. Every trained parameter must be in it, and nothing it holds may be unknown here."""
        sd = checkpoint["state_dict"]
        own = self.state_dict()
        unexpected = sorted(set(sd) - set(own))
        missing = sorted({n for n, p in self.named_parameters() if p.requires_grad} - set(sd))
        if unexpected or missing:
            raise ValueError(f"the checkpoint does not fit this model: missing trained tensors {missing[:5]}, "
                             f"unknown tensors {unexpected[:5]}")
        wrong = [f"{k}: model {tuple(own[k].shape)}, checkpoint {tuple(v.shape)}" for k, v in sd.items()
                 if tuple(own[k].shape) != tuple(v.shape)]
        if wrong:
            raise ValueError(f"the checkpoint's tensor shapes differ from this model's: {wrong[:5]}")
        self.load_state_dict(sd, strict=False)

    def on_load_checkpoint(self, checkpoint):
        self.check_checkpoint(checkpoint)
