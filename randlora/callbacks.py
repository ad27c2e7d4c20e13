"""Callbacks: throughput and memory, adapter-only checkpoints."""
from __future__ import annotations

import os
import resource
import time

import lightning as L
import torch

from .adapters import save_adapter


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak CUDA allocator memory on GPU; peak resident set size of this process on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PerfMonitor(L.Callback):
    """Median training-step time and samples/s (the first steps are warm-up and not counted)."""

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self.times: list[float] = []
        self.samples: list[int] = []
        self._t0 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.times.append(time.perf_counter() - self._t0)
        first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
        self.samples.append(len(first))

    def summary(self, device=None) -> dict:
        times = self.times[self.warmup:] or self.times
        samples = self.samples[self.warmup:] or self.samples
        if not times:
            return {"step_time_s": None, "samples_per_s": None, "peak_memory_mb": peak_memory_mb(device)}
        ordered = sorted(times)
        med = ordered[len(ordered) // 2]
        return {"step_time_s": med, "samples_per_s": sum(samples) / sum(times),
                "peak_memory_mb": peak_memory_mb(device)}

    def on_train_epoch_end(self, trainer, pl_module):
        s = self.summary(pl_module.device)
        for k, v in s.items():
            if v is not None:
                pl_module.log(f"perf/{k}", float(v), rank_zero_only=True)


class AdapterCheckpoint(L.Callback):
    """Writes ``<dirpath>/adapter.safetensors`` (adapter tensors + metadata only) after training."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            os.makedirs(self.dirpath, exist_ok=True)
            save_adapter(pl_module.net, os.path.join(self.dirpath, "adapter.safetensors"))


class NonFiniteGuard(L.Callback):
    """Stop at the first non-finite training loss, naming the step and the last good checkpoint."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = ckpt_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or torch.isfinite(loss.detach()).all():
            return
        last = os.path.join(self.ckpt_dir, "last.ckpt")
        where = last if os.path.isfile(last) else "none yet (the failure came before the first checkpoint)"
        raise FloatingPointError(
            f"non-finite training loss ({float(loss.detach())}) at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {batch_idx}); last good checkpoint: {where}. "
            "Lower the learning rate or the adapter scaling (alpha), or enable gradient clipping")


class KillAtStep(L.Callback):
    """Fault injection for resume tests: SIGKILL this process after global step ``step``
    (``callbacks.kill_at_step=N``). Nothing is flushed or saved, as with a pre-empted job."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
