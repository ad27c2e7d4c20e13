"""Callbacks: throughput and memory, adapter-only checkpoints, the non-finite loss guard, checkpoints that
resume exactly (``ExactResume``, ``RunCheckpoint``), fault injection."""
from __future__ import annotations

import os
import resource
import time

import lightning as L
import torch

from ..adapters import compute_paths, format_paths, save_adapter
from ..buffers import check_static_buffers


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
        # Resuming the run would replay the same steps exactly (resume is exact and keeps the run's
        # settings) and meet the same non-finite loss: the way forward is a new run with other settings.
        last = os.path.join(self.ckpt_dir, "last.ckpt")
        where = last if os.path.isfile(last) else "none (the failure came before the first checkpoint)"
        raise FloatingPointError(
            f"non-finite training loss ({value}) at step {step} (epoch {epoch}, batch {batch_idx}); last good "
            f"checkpoint: {where}. Resuming would repeat the same steps and fail again: start a new run with a "
            "lower learning rate (optim.lr), a smaller adapter scaling (adapter.alpha) or gradient clipping "
            "(trainer.gradient_clip_val)")

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


class RunCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, so that ``last.ckpt`` is always the newest state.

    Lightning restores its bookkeeping (``last_model_path``, the kept top-k file) only when the
    checkpoint's recorded folder equals the current one. In a moved or copied run folder it did not,
    found ``last.ckpt`` already there, and wrote ``last-v1.ckpt`` instead, so every later resume
    read the stale ``last.ckpt``. Here files are overwritten in place (no version counter), and the
    recorded paths are moved to the current folder before Lightning reads them."""

    def __init__(self, **kwargs):
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(**kwargs)

    def load_state_dict(self, state_dict):
        old = state_dict.get("dirpath")
        if old and self.dirpath and os.path.normpath(old) != os.path.normpath(self.dirpath):
            def moved(p):
                if isinstance(p, str) and p and os.path.normpath(os.path.dirname(p)) == os.path.normpath(old):
                    return os.path.join(self.dirpath, os.path.basename(p))
                return p
            state_dict = dict(state_dict, dirpath=self.dirpath)
            for k in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if k in state_dict:
                    state_dict[k] = moved(state_dict[k])
            if isinstance(state_dict.get("best_k_models"), dict):
                state_dict["best_k_models"] = {moved(k): v for k, v in state_dict["best_k_models"].items()}
        super().load_state_dict(state_dict)


def _train_sampler(trainer):
    """The training loader's EpochSeededSampler, or None (a datamodule with another sampler)."""
    from ..data.samplers import EpochSeededSampler
    dl = getattr(trainer, "train_dataloader", None)
    for s in (getattr(dl, "sampler", None), getattr(getattr(dl, "batch_sampler", None), "sampler", None)):
        if isinstance(s, EpochSeededSampler):
            return s
    return None


def _metric_modules(pl_module):
    from torchmetrics import Metric
    return {n: m for n, m in pl_module.named_modules() if isinstance(m, Metric) and n}


class ExactResume(L.Callback):
    """Everything beyond weights, optimizer and loop counters that a resumed run needs to compute
    what the uninterrupted run computes, from epoch-end and mid-epoch checkpoints alike:

    * the position in the epoch: the training sampler resumes at the first item the interrupted
      run had not trained on (``EpochSeededSampler.resume_at``), in the recorded epoch's order;
    * random numbers: training steps (forward, backward, optimizer step) draw from their own
      stream, seeded from the run seed, swapped in around every step and saved in checkpoints, so
      dropout masks after a resume are the uninterrupted run's whatever data loading or
      validation drew in between. The global torch / CUDA / numpy / python states are saved too
      and restored when training starts;
    * the epoch's running aggregates when the checkpoint is mid-epoch: Lightning's epoch means
      (``train/loss_epoch``) and the torchmetrics states (``train/acc``), else the resumed epoch's
      values would cover only the batches after the resume;
    * the logging step (Lightning adds one on some restarts, which shifted every later CSV row), and
      the last value logged under each name (what the run reports at its end).

    Per-rank states are gathered into rank 0's checkpoint and each rank gets its own back.
    """

    def __init__(self, seed: int, cuda_stream: bool = True):
        self.seed = int(seed)
        self.cuda_stream = cuda_stream  # off with CUDA graphs: their generator state is managed by torch
        self._stream = None  # {"cpu": ByteTensor, "cuda": ByteTensor | None}
        self._outside = None
        self._loaded = None  # this rank's state from the checkpoint, applied at on_train_start
        self._aggregates = None  # Lightning epoch aggregates to add after the first resumed step
        self.resumed_at = None  # {"epoch", "batches", "global_step"} of the checkpoint resumed from
        self._position = None  # (epoch, batches) this run resumed at
        self._fix_log_step = False

    # ------------------------------------------------------------------ random streams
    def _cuda(self, device) -> bool:
        return self.cuda_stream and device is not None and device.type == "cuda"

    def _get(self, device):
        return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if self._cuda(device) else None}

    def _set(self, state, device):
        torch.set_rng_state(state["cpu"])
        if self._cuda(device) and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], device)

    def _fresh_stream(self, device):
        s = (self.seed * 0x9E3779B97F4A7C15 + 0x5EED) % (2 ** 63)
        cuda = None
        if self._cuda(device):
            g = torch.Generator(device=device)
            g.manual_seed(s)
            cuda = g.get_state()
        return {"cpu": torch.Generator().manual_seed(s).get_state(), "cuda": cuda}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._aggregates is not None and self._fix_log_step:
            # the first batch after a mid-epoch resume is not the epoch's first: Lightning must not clear
            # the epoch's logged values at it (it does at a loop's first batch), or those restored below
            # would be cleared when the module logs
            trainer._logger_connector._first_loop_iter = False
        if self._fix_log_step:
            # Lightning's restart (epoch loop reset) adds one to the step the loggers write on some
            # paths, which shifted every later CSV row; the uninterrupted run writes at its
            # optimizer-step count
            self._fix_log_step = False
            loop = trainer.fit_loop.epoch_loop
            if hasattr(loop, "_batches_that_stepped"):
                loop._batches_that_stepped = int(trainer.global_step)
        dev = pl_module.device
        if self._stream is None:
            self._stream = self._fresh_stream(dev)
        self._outside = self._get(dev)
        self._set(self._stream, dev)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dev = pl_module.device
        if self._outside is not None:
            self._stream = self._get(dev)
            self._set(self._outside, dev)
            self._outside = None
        if self._aggregates is not None:
            self._add_aggregates(trainer)

    def on_exception(self, trainer, pl_module, exception):
        if self._outside is not None:  # leave the global generators as the rest of the program expects
            self._set(self._outside, pl_module.device)
            self._outside = None

    # ------------------------------------------------------------------ checkpoint state
    @staticmethod
    def _global_rng(device, cuda: bool) -> dict:
        import random

        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if cuda else None,
                "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                "python": random.getstate()}

    @staticmethod
    def _set_global_rng(state, device, cuda: bool) -> None:
        import random

        import numpy as np
        torch.set_rng_state(state["torch"])
        if cuda and state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], device)
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))

    def state_dict(self):
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.lightning_module is None:
            return {}
        pl_module = trainer.lightning_module
        dev = pl_module.device
        loop = trainer.fit_loop.epoch_loop
        done = int(loop.batch_progress.current.processed)
        total = trainer.num_training_batches
        sampler = _train_sampler(trainer)
        epoch = sampler.epoch if sampler is not None else trainer.current_epoch
        mid = isinstance(total, int) and 0 < done < total
        if not mid:  # the epoch is over: the next one starts at its first batch
            epoch, done = (epoch + 1, 0) if done else (epoch, 0)
        if self._position is not None and sampler is not None and sampler.pending:
            epoch, done = self._position  # saved again before the resumed pass began: the same position
            mid = False
        stream = self._stream
        if self._outside is not None:  # saved from inside a training step
            stream = self._get(dev)
        last = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        mine = {"stream": stream, "rng": self._global_rng(dev, self._cuda(dev)), "last_logged": last,
                "aggregates": self._epoch_aggregates(trainer) if mid else None,
                "metrics": self._metric_states(pl_module) if mid else None}
        ranks = [mine]
        if trainer.world_size > 1:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                ranks = [None] * dist.get_world_size()
                dist.all_gather_object(ranks, mine)
        dl = trainer.train_dataloader
        return {"version": 1, "epoch": int(epoch), "batches": int(done), "global_step": int(trainer.global_step),
                "batch_size": getattr(dl, "batch_size", None), "sampler": sampler is not None, "ranks": ranks}

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer

    def load_state_dict(self, state_dict):
        if not state_dict:
            return
        self._loaded = state_dict
        self.resumed_at = {k: state_dict.get(k) for k in ("epoch", "batches", "global_step")}

    def on_train_start(self, trainer, pl_module):
        st, self._loaded = self._loaded, None
        if st is None:
            return
        rank = trainer.global_rank
        mine = st["ranks"][rank] if rank < len(st["ranks"]) else st["ranks"][0]
        self._position = (int(st["epoch"]), int(st["batches"]))
        fl = trainer.fit_loop
        ep = fl.epoch_progress
        if fl.restarted_on_epoch_end and fl._iteration_based_training() and ep.current.processed == ep.current.started:
            # Lightning 2.6 restarts an iteration-based run (max_steps set) from a checkpoint written at an
            # epoch's end by replaying that end, which counts the epoch as processed a second time: every
            # later epoch then had the next epoch's number (its data order, and max_epochs one epoch early)
            ep.current.processed -= 1
            ep.total.processed -= 1
        sampler = _train_sampler(trainer)
        if sampler is not None:
            per_rank = int(st["batches"]) * int(st.get("batch_size") or 0)
            began = sampler.passes > 0
            sampler.resume_at(st["epoch"], per_rank)
            if began:  # worker processes were already given this epoch's first indices: start over
                iter(trainer.fit_loop._data_fetcher)
        elif st["batches"]:
            from lightning.pytorch.utilities import rank_zero_warn
            rank_zero_warn("the training loader has no EpochSeededSampler: this mid-epoch resume replays the "
                           "epoch from its first batch")
        dev = pl_module.device
        self._set_global_rng(mine["rng"], dev, self._cuda(dev))
        self._stream = mine["stream"]
        if mine.get("metrics"):
            self._restore_metric_states(pl_module, mine["metrics"])
        self._aggregates = mine.get("aggregates") or None
        self._fix_log_step = True
        # the last value logged under each name (kept by Lightning for the whole run, and what the run
        # reports at its end): names last logged before the checkpoint keep their values
        store = getattr(trainer._logger_connector, "_callback_metrics", None)
        if isinstance(store, dict):
            for k, v in (mine.get("last_logged") or {}).items():
                store.setdefault(k, torch.tensor(v))

    # ------------------------------------------------------------------ logged values of the epoch
    _KINDS = {"mean": torch.mean, "sum": torch.sum, "max": torch.max, "min": torch.min}

    @classmethod
    def _epoch_aggregates(cls, trainer) -> dict:
        """Lightning's training result collection of this epoch: each value logged with self.log (its
        options, running aggregate and last step value; Lightning writes every on_step value again in
        the epoch's later step rows)."""
        out = {}
        results = getattr(trainer.fit_loop.epoch_loop, "_results", None) or {}
        for key, m in results.items():
            if not getattr(m, "is_tensor", False):
                continue  # torchmetrics objects: their states are saved with the module's metrics
            meta = m.meta
            kind = next((k for k, f in cls._KINDS.items() if meta.reduce_fx is f), None)
            if kind is None:
                continue
            cache = m._forward_cache
            out[key] = {"fx": meta.fx, "name": meta.name, "prog_bar": bool(meta.prog_bar), "logger": bool(meta.logger),
                        "on_step": bool(meta.on_step), "on_epoch": bool(meta.on_epoch), "kind": kind,
                        "enable_graph": bool(meta.enable_graph), "add_dataloader_idx": bool(meta.add_dataloader_idx),
                        "sync": bool(meta.sync.should), "rank_zero_only": bool(meta.sync.rank_zero_only),
                        "value": m.value.detach().cpu().clone(),
                        "count": m.cumulated_batch_size.detach().cpu().clone() if meta.is_mean_reduction else None,
                        "step_value": cache.detach().cpu().clone() if torch.is_tensor(cache) else None,
                        "has_reset": bool(m.has_reset)}
        return out

    def _add_aggregates(self, trainer) -> None:
        """After the first resumed step has logged: add the epoch's earlier contributions to each running
        aggregate, and bring back the values only logged before the checkpoint."""
        saved, self._aggregates = self._aggregates, None
        results = getattr(trainer.fit_loop.epoch_loop, "_results", None)
        if results is None:
            return
        for key, s in saved.items():
            m = results.get(key)
            if m is None:
                if s["has_reset"] or s["step_value"] is None and not s["on_epoch"]:
                    continue
                first = s["step_value"] if s["step_value"] is not None else s["value"]
                results.log(s["fx"], s["name"], first.clone(),
                            prog_bar=s["prog_bar"], logger=s["logger"], on_step=s["on_step"], on_epoch=s["on_epoch"],
                            reduce_fx=self._KINDS[s["kind"]], enable_graph=s["enable_graph"],
                            add_dataloader_idx=s["add_dataloader_idx"], batch_size=1,
                            sync_dist=s["sync"] and trainer._accelerator_connector.is_distributed,
                            sync_dist_fn=trainer.strategy.reduce, rank_zero_only=s["rank_zero_only"])
                m = results[key]
                dev = m.value.device
                m.value = s["value"].to(dev, m.value.dtype)
                if s["count"] is not None:
                    m.cumulated_batch_size = s["count"].to(dev)
                continue
            if not getattr(m, "is_tensor", False) or not m.meta.on_epoch:
                continue
            v = s["value"].to(m.value.device, m.value.dtype)
            if s["kind"] in ("mean", "sum"):
                # a + b == b + a in IEEE arithmetic: the running sum is the uninterrupted run's
                m.value = v + m.value
                if s["kind"] == "mean":
                    m.cumulated_batch_size = s["count"].to(m.cumulated_batch_size.device) + m.cumulated_batch_size
            else:
                m.value = torch.maximum(v, m.value) if s["kind"] == "max" else torch.minimum(v, m.value)

    @staticmethod
    def _metric_states(pl_module) -> dict:
        out = {}
        for name, m in _metric_modules(pl_module).items():
            count = int(getattr(m, "_update_count", 0) or 0)
            if not count:
                continue
            states = {}
            for s in m._defaults:
                v = getattr(m, s)
                states[s] = [t.detach().cpu().clone() for t in v] if isinstance(v, list) else v.detach().cpu().clone()
            out[name] = {"count": count, "states": states}
        return out

    @staticmethod
    def _restore_metric_states(pl_module, saved: dict) -> None:
        metrics = _metric_modules(pl_module)
        for name, s in saved.items():
            m = metrics.get(name)
            if m is None:
                continue
            dev = pl_module.device
            for k, v in s["states"].items():
                setattr(m, k, [t.to(dev) for t in v] if isinstance(v, list) else v.to(dev))
            m._update_count = s["count"]
            m._computed = None


class ConstantBuffersCheck(L.Callback):
    """Every rank must hold the same constant buffers (random bases, rotary frequencies ...), since DDP
    no longer overwrites them with rank 0's (randlora/buffers.py): checked once, at the start of
    whichever of fit / validate / test / predict comes first."""

    def __init__(self):
        self.checked = False

    def _check(self, trainer, pl_module):
        if trainer.world_size > 1 and not self.checked:
            check_static_buffers(pl_module, pl_module.all_gather, pl_module.device)
            self.checked = True

    on_fit_start = on_validation_start = on_test_start = on_predict_start = _check


class CudaGraphSteps(L.Callback):
    """With ``torch.compile`` and CUDA graphs (compile.mode=reduce-overhead or max-autotune) every step
    opens a new generation of the graph trees, so no step reads an output the next one overwrote."""

    @staticmethod
    def _mark(*_args, **_kwargs):
        torch.compiler.cudagraph_mark_step_begin()

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = _mark


class RankHeatmap(L.Callback):
    """For an adapter whose training schedule redistributes rank across layers (DoRA-DR): the surviving
    rank per layer as ``<run>/<method>_ranks.png`` at the end of training, also sent to loggers that
    take images."""

    def on_train_end(self, trainer, pl_module):
        schedule = getattr(pl_module, "schedule", None)
        if schedule is None or not getattr(schedule, "redistributes_rank", False) or not trainer.is_global_zero:
            return
        from ..analysis import plot_rank_heatmap
        path = os.path.join(trainer.default_root_dir, f"{pl_module.adapter_info['method']}_ranks.png")
        plot_rank_heatmap(schedule.rank_table(), path, r_start=schedule.r_start, r=schedule.r)
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image(key=f"{pl_module.adapter_info['method']}/rank_heatmap", images=[path])
