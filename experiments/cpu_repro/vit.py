"""A tiny Vision Transformer on sklearn's 8x8 digits, and the pretrain / shifted-task data."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ADAPT_TARGETS = ["qkv", "proj", "fc1", "fc2"]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Pre-norm ViT: 2x2 patches of an 8x8 image -> 16 tokens + [CLS], ``depth`` blocks, linear head."""

    def __init__(self, num_classes: int = 5, dim: int = 64, depth: int = 3, heads: int = 4, mlp_ratio: int = 2,
                 image: int = 8, patch: int = 2):
        super().__init__()
        self.image, self.patch = image, patch
        n_tok = (image // patch) ** 2
        self.patch_embed = nn.Linear(patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_tok + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def patchify(self, x):
        b = x.shape[0]
        p, g = self.patch, self.image // self.patch
        x = x.reshape(b, g, p, g, p).permute(0, 1, 3, 2, 4)
        return x.reshape(b, g * g, p * p)

    def features(self, x):
        t = self.patch_embed(self.patchify(x))
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 0]

    def forward(self, x):
        return self.head(self.features(x))


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
    Each task has a training pool and a fixed, disjoint test set (40 %).
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
        tasks[name] = {"x_pool": fx(x[pool]), "y_pool": y[pool] - 5, "x_test": fx(x[test]), "y_test": y[test] - 5}
    return {"pretrain": {"x_train": x[pre_tr], "y_train": y[pre_tr], "x_test": x[pre_te], "y_test": y[pre_te]},
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
