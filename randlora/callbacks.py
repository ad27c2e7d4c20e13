"""Callbacks: throughput and memory, adapter-only checkpoints."""
from __future__ import annotations

import os
import resource
import time

import lightning as L
import torch

from .adapters import compute_paths, format_paths, save_adapter


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak CUDA allocator memory on GPU; peak resident set size of this process on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_memory(device: torch.device | None = None) -> bool:
    """Start a new peak: the CUDA allocator's peak, or on CPU the process's resident-set high-water
    mark (Linux: writing 5 to /proc/self/clear_refs resets it, and ru_maxrss with it). A multirun
    runs its jobs in one process, so without this every job would report the largest earlier peak.
    Returns False where the CPU peak cannot be reset (then it stays process-wide)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PerfMonitor(L.Callback):
    """Median training-step time and samples/s (the first steps are warm-up and not counted, nor are
    steps over 10x the median: ``slow_steps`` counts those).

    On CUDA the step is timed with CUDA events read back once per epoch, never with a per-step
    synchronize, which would stall the CPU until the GPU drains and cost the overlap of the next
    step's launches with this step's kernels (the framework-vs-bare-loop benchmark lost ~9 % to it).

    For methods that choose a compute path per layer and call (RandLoRA), the paths of the first
    training step are printed (rank 0) and, with those of the last step, reported in ``summary()``
    as ``compute_paths`` (``{"first_step": {"merged": 24, ...}, "last_step": {...}}``).
    """

    OUTLIER = 10.0

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self.times: list[float] = []
        self.samples: list[int] = []
        self._t0 = None
        self._pending: list = []  # CUDA: (start event, end event) not read yet
        self.train_peak_mb = None
        self.memory_at_start_mb = None
        self.paths: dict = {}

    def on_train_start(self, trainer, pl_module):
        # peak memory of this job's training (a multirun runs its jobs in one process: without the
        # reset a job would report the peak of an earlier one)
        self.train_peak_mb = None
        self.memory_at_start_mb = None
        self.paths = {}
        reset_peak_memory(pl_module.device)
        if pl_module.device.type == "cuda":
            self.memory_at_start_mb = torch.cuda.memory_allocated(pl_module.device) / 2**20

    def on_train_end(self, trainer, pl_module):
        self.train_peak_mb = peak_memory_mb(pl_module.device)
        if self.paths:
            self.paths["last_step"] = compute_paths(getattr(pl_module, "net", pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            return
        if isinstance(self._t0, torch.cuda.Event):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._t0, end))
        else:
            self.times.append(time.perf_counter() - self._t0)
        self._t0 = None
        first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
        self.samples.append(len(first))
        if len(self.samples) == 1:
            paths = compute_paths(getattr(pl_module, "net", pl_module))
            if paths:
                self.paths = {"first_step": paths}
                if trainer.is_global_zero:
                    print(f"[randlora] compute paths at the first training step: {format_paths(paths)}",
                          flush=True)

    def _resolve(self):
        for start, end in self._pending:
            end.synchronize()
            self.times.append(start.elapsed_time(end) / 1000.0)
        self._pending = []

    def summary(self, device=None) -> dict:
        self._resolve()
        times = self.times[self.warmup:] or self.times
        samples = self.samples[self.warmup:] or self.samples
        peak = self.train_peak_mb if self.train_peak_mb is not None else peak_memory_mb(device)
        extra = {} if self.memory_at_start_mb is None else {"memory_at_train_start_mb": self.memory_at_start_mb}
        if self.paths:
            extra["compute_paths"] = dict(self.paths)
        if not times:
            return {"step_time_s": None, "samples_per_s": None, "peak_memory_mb": peak, **extra}
        ordered = sorted(times)
        med = ordered[len(ordered) // 2]
        # steady state: steps over OUTLIER x the median are one-off work (a torch.compile recompilation
        # for a new batch shape takes seconds), not throughput; they are counted, not hidden
        keep = [i for i, t in enumerate(times) if t <= self.OUTLIER * med]
        rate = sum(samples[i] for i in keep) / sum(times[i] for i in keep)
        return {"step_time_s": med, "samples_per_s": rate, "peak_memory_mb": peak,
                "slow_steps": len(times) - len(keep), **extra}

    def on_train_epoch_end(self, trainer, pl_module):
        s = self.summary(pl_module.device)
        for k, v in s.items():
            if v is not None and not isinstance(v, dict):
                pl_module.log(f"perf/{k}", float(v), rank_zero_only=True)


class AdapterCheckpoint(L.Callback):
    """Writes ``<dirpath>/adapter.safetensors`` (adapter tensors + metadata only) after training."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module):
        tensors = None
        if isinstance(trainer.strategy, L.pytorch.strategies.FSDPStrategy) and pl_module.adapter_info.get("method") == "full":
            # full fine-tuning under FSDP: every weight is sharded, so the ranks gather the full state
            # dict together (on rank 0's CPU). Adapters are replicated by randlora's FSDP plan: whole.
            full = trainer.strategy.lightning_module_state_dict()
            tensors = {k[len("net."):]: v for k, v in full.items() if k.startswith("net.")}
        if trainer.is_global_zero:
            os.makedirs(self.dirpath, exist_ok=True)
            save_adapter(pl_module.net, os.path.join(self.dirpath, "adapter.safetensors"), tensors)


class NonFiniteGuard(L.Callback):
    """Stop at the first non-finite training loss, naming the step and the last good checkpoint.

    CPU: checked at every step. CUDA (or ``defer=True``): reading the loss every step would force a
    host-device synchronisation per step, so the first non-finite step and its loss are recorded on
    the device and read back every ``check_every`` steps (default: the trainer's logging interval,
    where logging synchronises anyway), on steps where a step-triggered checkpoint is due, before
    validation, at the end of every epoch and in ``on_save_checkpoint``, so a checkpoint is never
    saved from weights a non-finite step has touched.
    """

    def __init__(self, ckpt_dir: str, check_every: int | None = None, defer: bool | None = None):
        self.ckpt_dir = ckpt_dir
        self.check_every = check_every
        self.defer = defer
        self._record = None  # on the device: (first bad global step or -1, its loss, epoch, batch)

    def _raise(self, value, step, epoch, batch_idx):
        last = os.path.join(self.ckpt_dir, "last.ckpt")
        where = last if os.path.isfile(last) else "none yet (the failure came before the first checkpoint)"
        raise FloatingPointError(
            f"non-finite training loss ({value}) at step {step} "
            f"(epoch {epoch}, batch {batch_idx}); last good checkpoint: {where}. "
            "Lower the learning rate or the adapter scaling (alpha), or enable gradient clipping")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach()
        defer = self.defer if self.defer is not None else loss.device.type == "cuda"
        if not defer:
            if not torch.isfinite(loss).all():
                self._raise(float(loss.float().mean()), trainer.global_step, trainer.current_epoch, batch_idx)
            return
        value = loss.double().mean()
        if self._record is None:
            self._record = torch.full((4,), -1.0, dtype=torch.float64, device=loss.device)
        new = ~torch.isfinite(value) & (self._record[0] < 0)
        # python scalars go in as fill values: no host-to-device copy, no synchronisation
        info = torch.stack([torch.full_like(value, trainer.global_step), value,
                            torch.full_like(value, trainer.current_epoch), torch.full_like(value, batch_idx)])
        self._record = torch.where(new, info, self._record)
        every = self.check_every or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        if (trainer.global_step + 1) % every == 0 or self._save_due(trainer):
            self.check()

    @staticmethod
    def _save_due(trainer) -> bool:
        """A step-triggered checkpoint will be written after this hook (Lightning runs checkpoint
        callbacks last). Checked here and not only in on_save_checkpoint, which Lightning skips
        for weights-only checkpoints."""
        for cb in getattr(trainer, "checkpoint_callbacks", None) or []:
            n = getattr(cb, "_every_n_train_steps", 0) or 0
            if n and trainer.global_step % n == 0:
                return True
        return False

    def check(self):
        """Raise if a non-finite loss was recorded (one host-device synchronisation)."""
        if self._record is None:
            return
        step, value, epoch, batch_idx = self._record.tolist()
        if step >= 0:
            self._raise(value, int(step), int(epoch), int(batch_idx))

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.check()  # before a save at the end of validation (also weights-only ones)

    def on_train_epoch_end(self, trainer, pl_module):
        self.check()

    def on_train_end(self, trainer, pl_module):
        self.check()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.check()  # raised before the file is written: the previous checkpoint stays intact


class KillAtStep(L.Callback):
    """Fault injection for resume tests: SIGKILL this process after global step ``step``
    (``callbacks.kill_at_step=N``). Nothing is flushed or saved, as with a pre-empted job."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
