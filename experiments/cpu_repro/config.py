"""Settings of the full and the quick (smoke-test) reproduction."""
from __future__ import annotations

import math

DISTRIBUTIONS = [("uniform", "uniform", None), ("normal", "normal", None), ("binary (s=2)", "binary", None),
                 ("sparse s=6 (67%)", "sparse", 6), ("sparse s=sqrt(D)=8 (75%)", "sparse", math.sqrt(64)),
                 ("sparse s=100 (98%)", "sparse", 100)]

FULL = {
    "seeds": 5,
    "e1": {"spectra": ["flat", "gaussian", "inv", "rank8"], "pairs": [(8, 4), (4, 8), (2, 16)],
           "lrs": [3e-3, 3e-2], "lora_lrs": [1e-2], "steps": 600},
    "e2": {"spectra": ["flat", "gaussian", "inv", "rank8"], "budget_r": 4, "lora_ranks": [4, 8],
           "lrs": [3e-3, 3e-2], "lora_lrs": [1e-2], "steps": 600},
    "e6m": {"spectra": ["flat", "gaussian"], "r": 4, "distributions": DISTRIBUTIONS,
            "lrs": [3e-3, 3e-2], "steps": 600},
    "vit": {
        "seeds": 3, "dim": 64, "depth": 3, "heads": 4, "mlp_ratio": 2,
        "pretrain_steps": 700, "pretrain_lr": 2e-3,
        "tasks": ["perm", "shift"], "shots": [1, 4, 16, None],
        "steps": {"1": 60, "4": 80, "16": 120, "all": 200}, "batch": 32, "weight_decay": 0.01,
        # learning rates: the best mean validation accuracy of `--lr-pilot` (results/lr_pilot.csv)
        "lr": {"full": 3e-3, "lora": 1e-2, "randlora": 1e-2, "vera": 3e-2},
        "vera_r": 256, "lora_ranks": [1, 4, 16], "matched_lora_ranks": [1, 4, 16],
        "plane_lora_rank": 4, "plane_xs": [-0.5 + 0.125 * i for i in range(17)],
        "plane_ys": [-0.5 + 0.125 * i for i in range(17)], "plane_samples": 256, "path_steps": 11,
        "e6_r": 6, "e6_shots": [None], "e6_task": "perm", "distributions": DISTRIBUTIONS,
    },
}

QUICK = {
    "seeds": 2,
    "e1": {"spectra": ["flat", "rank8"], "pairs": [(4, 8)], "lrs": [3e-2], "lora_lrs": [1e-2], "steps": 30},
    "e2": {"spectra": ["flat"], "budget_r": 4, "lora_ranks": [4], "lrs": [3e-2], "lora_lrs": [1e-2], "steps": 30},
    "e6m": {"spectra": ["flat"], "r": 4, "distributions": DISTRIBUTIONS[:1] + DISTRIBUTIONS[-1:],
            "lrs": [3e-2], "steps": 30},
    "vit": {
        "seeds": 2, "dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 2,
        "pretrain_steps": 2, "pretrain_lr": 2e-3,
        "tasks": ["perm"], "shots": [1, None],
        "steps": {"1": 2, "4": 2, "16": 2, "all": 3}, "batch": 16, "weight_decay": 0.01,
        "lr": {"full": 1e-3, "lora": 1e-2, "randlora": 1e-2, "vera": 1e-2},
        "vera_r": 32, "lora_ranks": [4], "matched_lora_ranks": [4],
        "plane_lora_rank": 4, "plane_xs": [0.0, 0.5, 1.0], "plane_ys": [0.0, 1.0], "plane_samples": 32,
        "path_steps": 3,
        "e6_r": 6, "e6_shots": [None], "e6_task": "perm", "distributions": DISTRIBUTIONS[:1] + DISTRIBUTIONS[-1:],
    },
}
