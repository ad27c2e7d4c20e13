import os

import pytest
import torch
from torch import nn

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# tests/test_cuda.py needs a GPU: collected only where one is (`make test-cuda`), never skipped in place
collect_ignore = [] if torch.cuda.is_available() else ["test_cuda.py"]

torch.set_num_threads(1)  # robust to other processes on 2 cores (OpenMP oversubscription is 50x slower)


class TinyNet(nn.Module):
    """Square, wide, narrow Linear layers, a fused-qkv MultiheadAttention and a head."""

    def __init__(self, d=12, hidden=20, classes=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.sq = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.down(torch.nn.functional.gelu(self.up(x)))
        x = self.sq(x)
        return self.head(x.mean(1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 5, 12, generator=g), torch.randint(0, 3, (4,), generator=g)
