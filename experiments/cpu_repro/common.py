"""Small shared helpers: seeding, statistics, JSON/CSV output, timing."""
from __future__ import annotations

import csv
import json
import math
import os
import time
from contextlib import contextmanager

import numpy as np
import torch


def setup_threads(n: int = 1) -> None:
    """One intra-op thread per process: the tiny matmuls here gain little from more, and on a shared
    2-core machine oversubscribed threads were measured 4-5x slower. Parallelism comes from workers."""
    torch.set_num_threads(n)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are ignored."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(values, digits: int = 3, scale: float = 1.0) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def save_json(path, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_default)
    os.replace(tmp, path)


def _default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(type(o))


def save_csv(path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


@contextmanager
def timed(log: dict, key: str):
    t0 = time.time()
    try:
        yield
    finally:
        log[key] = round(time.time() - t0, 2)


def group(rows: list[dict], keys: tuple[str, ...], value: str) -> dict:
    """{tuple(row[k] for k in keys): [row[value], ...]} preserving first-seen order."""
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r[value])
    return out
