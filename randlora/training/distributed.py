"""Distributed training for adapters: randlora's FSDP plan (below), and the check that every rank
built the same constant buffers (:mod:`randlora.buffers`, which says why DDP must skip them)."""
from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn



# ------------------------------------------------------------------------------------------------ FSDP
# ``trainer=fsdp`` (and ``trainer=fsdp_cpu``): a sharding plan made for adapter training.
#
# Lightning's plain ``strategy: fsdp`` wraps the whole model as one FSDP unit (so every rank
# all-gathers every weight at the first forward: no peak-memory saving), casts every buffer to the
# low precision (the random bases, rotary frequencies), refuses norm gradient clipping, and cannot
# flatten a LLaMA block whose frozen weights are bf16 and whose adapters are fp32 (FSDP1 flattens
# one dtype per unit). Its rank 0 then writes the adapter file from its own shard. Here instead:
#
# * the frozen weights are sharded per transformer block (the blocks ``repeated_blocks`` finds, as
#   for torch.compile), and all-gathered one block at a time in forward and backward;
# * the trained tensors (adapter parameters, ``trainable_modules`` such as a classifier head) are
#   left out of FSDP and replicated on every rank, as under DDP: they are small, every rank
#   holds them whole (so the adapter file and the checkpoint are written from full tensors), and
#   their gradients are averaged once per optimizer step in one coalesced all-reduce per dtype,
#   before clipping; the optimizer state is the same as under DDP;
# * nothing is cast by FSDP (no MixedPrecision dtypes): weights are all-gathered in the dtype they
#   are stored in, buffers keep theirs, and autocast does the compute casts exactly as it does
#   without FSDP, so a sharded run computes what a DDP run computes;
# * full fine-tuning (every parameter trained) is ordinary FSDP: parameters, gradients and optimizer
#   state sharded per block, gradients clipped by FSDP's sharded norm.
#
# On the CPU (gloo; for tests and debugging, like trainer=ddp_cpu) the units are built on the CPU,
# which FSDP accepts only when given the device explicitly.

def shards_trained(task: nn.Module) -> bool:
    """True when FSDP shards the trained parameters (full fine-tuning), False when it leaves them
    replicated (every adapter method)."""
    return (getattr(task, "adapter_info", None) or {}).get("method") == "full"


def replicated_parameters(task: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(trained, frozen) parameters FSDP leaves out and replicates: every trained one unless the
    method is full fine-tuning, and every 0-d parameter (FSDP cannot flatten scalars, e.g. CLIP's
    logit scale)."""
    full = shards_trained(task)
    trained = [p for p in task.parameters() if p.requires_grad and (not full or p.dim() == 0)]
    frozen = [p for p in task.parameters() if not p.requires_grad and p.dim() == 0]
    return trained, frozen


def all_reduce_mean_grads(params: list[nn.Parameter], group=None) -> None:
    """Average ``params``' gradients over the ranks: one flat all-reduce per dtype. A missing gradient
    counts as zeros, so every rank issues the same collectives whatever its batch did."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = dist.get_world_size(group)
    by_dtype: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault((p.dtype, p.device), []).append(p)
    for ps in by_dtype.values():
        for p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in ps]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def fsdp_strategy(task: nn.Module, accelerator: str = "gpu", **kwargs):
    """The FSDP strategy for ``task`` (an ``AdapterTask``) described above. ``kwargs`` go to
    Lightning's ``FSDPStrategy`` (e.g. ``sharding_strategy``, ``activation_checkpointing_policy``).
    Raises ``ValueError`` when the model has no repeated blocks to shard by."""
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from ..compile import repeated_blocks

    net = getattr(task, "net", task)
    if hasattr(task, "parameter_summary"):
        task.parameter_summary()  # whole-model counts, cached while every parameter is still whole
    blocks = repeated_blocks(net)
    if not blocks:
        raise ValueError(f"trainer.strategy=fsdp shards the model block by block, but {type(net).__name__} has no "
                         "repeated blocks (a ModuleList / Sequential of blocks of one class); use trainer.strategy=ddp")
    classes = {type(m) for _, m in blocks}
    trained, frozen = replicated_parameters(task)
    opts = {"auto_wrap_policy": ModuleWrapPolicy(classes), "mixed_precision": MixedPrecision(),
            "use_orig_params": True, **kwargs}
    if trained or frozen:
        opts["ignored_states"] = trained + frozen
    return AdapterFSDPStrategy(on_cpu=accelerator == "cpu", replicated=trained, shards_trained=shards_trained(task),
                               **opts)


class AdapterFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy plus: replicated trained parameters whose gradients are averaged
    before clipping and the optimizer step, sharded-aware gradient clipping, and CPU units."""

    def __init__(self, *, on_cpu: bool = False, replicated=(), shards_trained: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.on_cpu = on_cpu
        self.replicated = list(replicated)  # trained parameters outside FSDP: gradients averaged here
        self.shards_trained = shards_trained

    _root = None  # the FSDP root this strategy built

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel
        if self._root is not None and self._root.module is model:
            # trainer.test / validate after fit: the model's parameters outside the blocks live in
            # the root unit's flat shard; without the root they would be seen as 1-D shards
            return self._root
        # FSDP moves what it manages to its device and leaves ignored (replicated) parameters where
        # they are, and Lightning does not move a model it hands to FSDP: move those ourselves
        self.place_replicated(self.root_device)
        if not self.on_cpu:
            self._root = super()._setup_model(model)
        else:
            from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
            self._root = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                                  mixed_precision=self.mixed_precision_config,
                                                  sharding_strategy=self.sharding_strategy,
                                                  device_id=torch.device("cpu"), **self.kwargs)
            _setup_activation_checkpointing(self._root, self._activation_checkpointing_kwargs)
        return self._root

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        """Lightning's FSDP load of a full checkpoint unpickles it with a full unpickler
        (``_lazy_load``), which runs any code pickled in the file: read it weights-only, with its
        checksums verified, instead (randlora/training/checkpoints.py). Folders of sharded checkpoints
        are never written by randlora and are refused."""
        from pathlib import Path

        import lightning.pytorch.strategies.fsdp as lightning_fsdp

        from .checkpoints import CheckpointError, load_checkpoint_file
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} is not a file (randlora writes whole-tensor checkpoint files)")
        lazy = lightning_fsdp._lazy_load
        lightning_fsdp._lazy_load = load_checkpoint_file
        try:
            return super().load_checkpoint(path, weights_only=True)
        finally:
            lightning_fsdp._lazy_load = lazy

    def place_replicated(self, device) -> None:
        """Move the parameters FSDP leaves out (``ignored_states``) to ``device``, in place."""
        for p in self.kwargs.get("ignored_states", ()):
            if p.device != torch.device(device):
                p.data = p.data.to(device)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        # Lightning clips inside the optimizer's closure, right after it returns: average the
        # replicated gradients at the end of the closure, so clipping sees the averaged ones
        def closure_then_sync():
            out = closure()
            if self.replicated:
                all_reduce_mean_grads(self.replicated)
            return out
        return super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)

    def clip_trained_gradients(self, optimizer, value: float, algorithm: str | None) -> None:
        """Clip as under DDP, by the global norm of every trained parameter (Lightning's FSDP
        precision refuses norm clipping). Called by ``AdapterTask.configure_gradient_clipping``."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if (algorithm or "norm") == "value":
            torch.nn.utils.clip_grad_value_(params, value)
        elif not self.shards_trained:  # every trained tensor is whole on every rank
            torch.nn.utils.clip_grad_norm_(params, value)
        else:  # full fine-tuning: the norm over every rank's shards (and the replicated scalars once)
            self.model.clip_grad_norm_(value)
