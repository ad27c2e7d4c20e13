"""Index views over a dataset that keep its ``labels`` tensor: a subset (splits, k-shot, fractions)
and a relabelling (a copy whose classes are ordered differently from the curated list)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


class Subset(Dataset):
    def __init__(self, base, indices):
        self.base, self.indices = base, [int(i) for i in indices]
        self.labels = base.labels[torch.as_tensor(self.indices, dtype=torch.long)]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


class Relabel(Dataset):
    """``base`` with label y read as ``perm[y]``: a copy whose classes are ordered differently from
    the curated list is mapped onto the curated order."""

    def __init__(self, base, perm):
        self.base, self.perm = base, torch.as_tensor(perm, dtype=torch.long)
        self.labels = self.perm[base.labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, int(self.perm[y])
