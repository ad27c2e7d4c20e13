"""The E4 network (a tiny timm ViT built by the framework) on sklearn's 8x8 digits, and the pretrain /
shifted-task data."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from randlora.models import build_model

ADAPT_TARGETS = ["qkv", "proj", "fc1", "fc2"]
IMAGE, PATCH = 8, 2          # 2x2 patches of an 8x8 image: 16 tokens + [CLS]
NORM_EPS = 1e-5              # torch.nn.LayerNorm's default (timm's ViT uses 1e-6)


def model_config(cfg: dict):
    """The framework model config of the E4 network (``cfg``: the ``vit`` settings of config.py): timm's
    VisionTransformer, pre-norm, class-token pooling, random weights."""
    return OmegaConf.create({
        "name": "cpu_repro_vit", "family": "timm", "arch": "vit_tiny_patch16_224", "pretrained": None,
        "kwargs": {"img_size": IMAGE, "patch_size": PATCH, "in_chans": 1, "embed_dim": cfg["dim"],
                   "depth": cfg["depth"], "num_heads": cfg["heads"], "mlp_ratio": cfg["mlp_ratio"]},
        "image_size": IMAGE, "task": "classification", "targets": ADAPT_TARGETS})


def build_vit(cfg: dict, num_classes: int = 5) -> nn.Module:
    """The E4 network: ``randlora.models.build_model`` of :func:`model_config` with timm's classifier
    (``reset_classifier``), so its modules are timm's (``blocks.0.attn.qkv``, ``head``), with what the
    committed results (results/, REPORT.md) were computed with, bit for bit
    (tests/test_analysis.py::test_cpu_repro_vit_is_bit_identical_to_the_network_of_the_committed_results):

    * the patch embedding is an ``nn.Linear`` over pre-cut 2x2 patches (:func:`patches`; the input is
      ``(N, 16, 4)``): timm's ``Conv2d`` stem computes the same forward, bit for bit, but its weight
      gradient is summed in another order (differences of ~1e-7), so training would drift;
    * LayerNorm epsilon 1e-5;
    * PyTorch's default initialisation in module order, drawn from the global RNG as it stands on entry
      (patch embedding, class token 0, position embedding N(0, 0.02), the blocks' linears, the head): the
      RNG afterwards is where constructing the network leaves it.
    """
    rng = torch.get_rng_state()
    vit = build_model(model_config(cfg)).backbone
    vit.reset_classifier(num_classes)
    vit.patch_embed = nn.Linear(PATCH * PATCH, cfg["dim"])
    for m in vit.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = NORM_EPS
    torch.set_rng_state(rng)
    with torch.no_grad():
        vit.patch_embed.reset_parameters()
        vit.cls_token.zero_()
        vit.pos_embed.copy_(torch.randn(vit.pos_embed.shape) * 0.02)
        for m in [*vit.blocks.modules(), vit.norm, vit.head]:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return vit


def patches(x: torch.Tensor) -> torch.Tensor:
    """(N, 64) pixels of 8x8 images -> (N, 16, 4): the 2x2 patches in row-major order, each row-major."""
    g = IMAGE // PATCH
    x = x.reshape(x.shape[0], g, PATCH, g, PATCH).permute(0, 1, 3, 2, 4)
    return x.reshape(x.shape[0], g * g, PATCH * PATCH)


# ------------------------------------------------------------------------------------------ data
@lru_cache(maxsize=1)
def load_digits_tensors():
    """The 1,797 sklearn digits as (x in [-1, 1] of shape (N, 64), labels); parsed once per process."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 8.0 - 1.0   # pixel values 0..16 -> [-1, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def _split(idx: np.ndarray, labels: np.ndarray, frac_test: float, rng: np.random.Generator):
    """Stratified split of ``idx`` into (train, test)."""
    train, test = [], []
    for c in np.unique(labels[idx]):
        ci = idx[labels[idx] == c]
        ci = ci[rng.permutation(len(ci))]
        k = int(round(len(ci) * frac_test))
        test.extend(ci[:k].tolist())
        train.extend(ci[k:].tolist())
    return np.array(sorted(train)), np.array(sorted(test))


def make_tasks(split_seed: int = 0, perm_seed: int = 1234) -> dict:
    """Pretraining data (digits 0-4) and two downstream tasks on digits 5-9 (labels 0-4).

    * ``shift``: digits 5-9, plain pixels (new classes, same image statistics).
    * ``perm``: digits 5-9 under one fixed random pixel permutation (a large, full-rank change:
      the 2x2 patches and positions no longer mean what the pretrained model learned).
    Each task has a training pool and a fixed, disjoint test set (40 %). Images are given as their
    2x2 patches (:func:`patches`), the input of :func:`build_vit`.
    """
    x, y = load_digits_tensors()
    lab = y.numpy()
    rng = np.random.default_rng(split_seed)
    pre = np.where(lab < 5)[0]
    down = np.where(lab >= 5)[0]
    pre_tr, pre_te = _split(pre, lab, 0.2, rng)
    pool, test = _split(down, lab, 0.4, rng)
    perm = torch.from_numpy(np.random.default_rng(perm_seed).permutation(64))
    tasks = {}
    for name, fx in (("shift", lambda t: t), ("perm", lambda t: t[:, perm])):
        tasks[name] = {"x_pool": patches(fx(x[pool])), "y_pool": y[pool] - 5, "x_test": patches(fx(x[test])),
                       "y_test": y[test] - 5}
    return {"pretrain": {"x_train": patches(x[pre_tr]), "y_train": y[pre_tr], "x_test": patches(x[pre_te]),
                         "y_test": y[pre_te]},
            "tasks": tasks}


def few_shot(x, y, shots, seed: int):
    """``shots`` examples per class (None = the whole pool), drawn with a seeded permutation."""
    if shots is None:
        return x, y
    g = torch.Generator().manual_seed(10_000 + seed)
    keep = []
    for c in torch.unique(y):
        ci = torch.nonzero(y == c).flatten()
        keep.append(ci[torch.randperm(len(ci), generator=g)[:shots]])
    keep = torch.cat(keep)
    return x[keep], y[keep]


# ---------------------------------------------------------------------------------- training
def train(model: nn.Module, x, y, *, steps: int, lr: float, batch: int = 64, weight_decay: float = 0.01,
          seed: int = 0) -> float:
    """AdamW with a cosine schedule over ``steps`` mini-batch steps; returns the last batch loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(20_000 + seed)
    n = x.shape[0]
    bs = min(batch, n)
    model.train()
    loss = torch.tensor(float("nan"))
    order = torch.randperm(n, generator=g)
    pos = 0
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + bs]
        pos += bs
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: nn.Module, x, y) -> tuple[float, float]:
    """(accuracy, mean cross-entropy)."""
    model.eval()
    logits = model(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))
