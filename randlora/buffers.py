"""Data-parallel training without per-step traffic for constant buffers (plain PyTorch).

``DistributedDataParallel`` broadcasts every buffer of the wrapped module from rank 0 at the start
of each training forward (``broadcast_buffers=True``, the default that Lightning's ``ddp`` strategy
keeps), so that running statistics such as BatchNorm's stay in step. VeRA's and RandLoRA's random
bases are buffers: without care, every step would re-send them, 9.4 MB for ViT-B / CLIP and 235 MB
for a LLaMA-3-8B-width RandLoRA (its shared B is 4,110 x 14,336 in float32), the same amount at every
depth. Those bases, and the other non-persistent buffers of the supported models (rotary frequencies,
causal masks, tokenised prompts), are constants built from the config and the seed, identical on
every rank by construction. ``static_buffer_names`` lists them; ``AdapterTask`` hands the list to DDP
(its ``_ddp_params_and_buffers_to_ignore`` attribute), and ``check_static_buffers`` verifies once, at
the start of fit / validate / test / predict (``randlora.training.callbacks.ConstantBuffersCheck``),
that every rank really holds the same values (DDP no
longer overwrites them with rank 0's, so a mismatch, e.g. a different adapter seed on one rank, is
reported instead of hidden).

Persistent buffers (model state such as BatchNorm statistics) are still synchronised by DDP.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn


def static_buffer_names(module: nn.Module) -> list[str]:
    """Every name under which a non-persistent buffer of ``module`` is reachable (shared modules,
    such as the one holding the random bases, appear under each of their paths), sorted."""
    names = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name, buf in sub._buffers.items():
            if buf is not None and name in sub._non_persistent_buffers_set:
                names.add(f"{prefix}.{name}" if prefix else name)
    return sorted(names)


def static_buffers_digest(module: nn.Module) -> tuple[int, int]:
    """48-bit digests (exact in float64, so they can be all-gathered as numbers) of the values of the
    non-persistent buffers: (random bases, every other one)."""
    from .adapters.bases import SharedBases

    hashes = (hashlib.sha256(), hashlib.sha256())
    owners = dict(module.named_modules())
    for name, buf in sorted(module.named_buffers()):  # named_buffers visits each tensor once
        sub, _, leaf = name.rpartition(".")
        owner = owners[sub]
        if leaf not in owner._non_persistent_buffers_set:
            continue
        h = hashes[0 if isinstance(owner, SharedBases) else 1]
        h.update(f"{name}{tuple(buf.shape)}{buf.dtype}".encode())
        h.update(buf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no bytes copy
    return tuple(int(h.hexdigest()[:12], 16) for h in hashes)


def check_static_buffers(module: nn.Module, all_gather: Callable[[torch.Tensor], torch.Tensor],
                         device: torch.device | str = "cpu") -> None:
    """Raise if any rank holds other values in its non-persistent buffers than rank 0.
    ``all_gather`` maps a (2,) tensor to the (world, 2) stack of every rank's tensor."""
    mine = torch.tensor([float(d) for d in static_buffers_digest(module)], dtype=torch.float64, device=device)
    every = all_gather(mine).reshape(-1, 2).cpu()
    for col, what, fix in ((0, "the random bases", "the same adapter.seed and adapter options"),
                           (1, "the non-persistent buffers (constants such as rotary frequencies or masks)",
                            "the same model config")):
        differing = [rank for rank, v in enumerate(every[:, col].tolist()) if v != every[0, col].item()]
        if differing:
            raise RuntimeError(
                f"{what} differ across DDP ranks (rank(s) {differing} disagree with rank 0). DDP does not re-send "
                f"these constant buffers at every step, so every rank must build them identically: give every "
                f"rank {fix}")
