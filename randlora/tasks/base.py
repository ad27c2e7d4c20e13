"""What every task shares: the optimiser and schedule of the paper, the exact evaluation loss, and
the adapter method's own training schedule (DoRA-DR's pruning), if it has one.

A task receives its network already adapted (``randlora.training.build.adapt``): the task only says
which network it trains (``network``: a backbone plus a head for classification, CLIP's two towers,
a causal LM) and what is computed from it (loss, metrics). Checkpoints, parameter accounting, DDP's
constant buffers and compilation are the training framework's (``randlora.training``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from ..adapters import REGISTRY, adapter_meta, is_adapted
from ..buffers import static_buffer_names


@dataclass
class Network:
    """What a task trains: the module the adapter goes into, the layers it targets there, and the
    modules that train in full next to the adapter (a classification head)."""

    net: nn.Module
    targets: list[str] | str
    trainable_modules: list[str] = field(default_factory=list)


class AdapterTask(L.LightningModule):
    """Base class of the tasks. ``net`` is the adapted network; ``optim`` the resolved optimiser
    settings (lr, weight_decay, betas, warmup_steps, schedule, min_lr_ratio); ``adapter`` what the
    adapter step recorded (method, r, budget match)."""

    @classmethod
    def network(cls, bundle, data, task_cfg: dict, seed: int) -> Network:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def after_inject(cls, net: nn.Module, method: str, task_cfg: dict) -> None:
        """Adjust what trains once the adapter is in (e.g. CLIP's temperature); nothing by default."""

    def __init__(self, net: nn.Module, optim: dict, adapter: dict):
        super().__init__()
        self.net = net
        self.optim = dict(optim)
        self.adapter_info = dict(adapter)
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.eval_loss = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.schedule = None  # the adapter method's training schedule, built at fit start

    # -- the adapter method's schedule (``Method.schedule``: DoRA-DR's pruning), driven by the optimizer step
    def on_fit_start(self):
        spec = REGISTRY.get(self.adapter_info.get("method"))  # None for full fine-tuning
        if spec is not None and spec.schedule is not None and is_adapted(self.net):
            self.schedule = spec.schedule.for_model(self.net, self.trainer.estimated_stepping_batches)

    def add_regularizer(self, loss):
        """Task loss plus the schedule's regulariser (DoRA-DR's DEM in its first two phases)."""
        reg = None if self.schedule is None else self.schedule.regularizer(self.trainer.global_step)
        if reg is None:
            return loss
        self.log(self.schedule.regularizer_name, reg.detach(), on_step=True, on_epoch=False)
        return loss + reg

    _schedule_step = None  # (step, info) of the schedule's update after the last optimizer step

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.schedule is None:
            return
        # Right after the optimizer step, not at the batch end: Lightning writes step-triggered
        # checkpoints in the callbacks' on_train_batch_end, before the module's, so an update made
        # there was missing from a mid-epoch checkpoint and a resume from it diverged.
        step = self.trainer.global_step + 1  # Lightning counts this step once optimizer_step returns
        bcast = (lambda t: self.trainer.strategy.broadcast(t, src=0)) if self.trainer.world_size > 1 else None
        self._schedule_step = (step, self.schedule.after_step(step, broadcast=bcast))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._schedule_step is None:
            return  # no optimizer step happened (gradient accumulation), or no schedule
        (_, info), self._schedule_step = self._schedule_step, None
        for k, v in self.schedule.log_values(info).items():
            self.log(k, v, on_step=True, on_epoch=False)

    def on_train_end(self):
        if self.schedule is not None and self.trainer.world_size > 1:
            state = self.schedule.state_digest().to(self.device)
            every = self.all_gather(state)
            if not torch.all(every == every[0]):
                raise RuntimeError(f"{self.adapter_info['method']}: the schedule's state differs across DDP ranks")

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

    def log_eval_loss(self, stage: str, value: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        """Log ``<stage>/loss`` as the epoch's weighted mean of ``value``, exact across ranks: the
        metric sums values and weights on every rank. (Logging a batch mean with ``sync_dist``
        averaged Lightning's integer sample counter and truncated it, which biased the mean whenever
        ranks evaluated different numbers of samples.)"""
        metric = self.eval_loss[stage]
        metric.update(value.detach().float(), weight)
        self.log(f"{stage}/loss", metric, on_step=False, on_epoch=True)

    # -- DDP must not broadcast the constant buffers (random bases, rotary frequencies ...) from rank 0 before
    #    every forward (randlora/buffers.py); it reads this attribute when it wraps the module. Names assigned
    #    to it (torch's documented way to exclude more) are kept in addition.
    _ddp_extra_ignore: tuple = ()

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        return sorted(set(static_buffer_names(self)) | set(self._ddp_extra_ignore))

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names) -> None:
        self._ddp_extra_ignore = tuple(names)

    @property
    def method_options(self) -> dict:
        return adapter_meta(self.net)["options"] if is_adapted(self.net) else {}
