"""Framework overhead: the Lightning training loop of ``randlora.train`` vs a bare PyTorch loop on the
same model, data, optimiser and schedule. Interleaved rounds in one process; median samples/s.

    python -m benchmarks.loop [--model tiny_vit_digits] [--epochs 2] [--rounds 3]

Target (issue 6): the framework reaches >= 95 % of the bare loop's throughput.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F


def _build(overrides):
    from tests.helpers import compose_cfg
    from randlora.models import build_model
    from randlora.train import build_datamodule, build_task
    from randlora.validate import effective_lr
    from omegaconf import open_dict
    cfg = compose_cfg(overrides)
    with open_dict(cfg):
        cfg.optim.lr = float(effective_lr(cfg))
    dm = build_datamodule(cfg)
    dm.setup()
    task = build_task(cfg, build_model(cfg.model), dm)
    return cfg, dm, task


def bare(overrides, epochs):
    cfg, dm, task = _build(overrides)
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loader = dm.train_dataloader()
    total = epochs * len(loader)  # the framework's schedule: cosine to 1 % of the peak
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    task.train()
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(task(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            n += len(y)
    return n / (time.perf_counter() - t0)


def framework(overrides, epochs, tmp):
    import lightning as L

    from randlora.callbacks import NonFiniteGuard, PerfMonitor
    cfg, dm, task = _build(overrides)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0,
                        gradient_clip_val=1.0, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, logger=L.pytorch.loggers.CSVLogger(tmp),
                        callbacks=[PerfMonitor(), NonFiniteGuard(tmp)], log_every_n_steps=10)
    n = epochs * len(dm.train_set)
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    return n / (time.perf_counter() - t0)


def main(argv=None):
    import tempfile
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_vit_digits")
    ap.add_argument("--adapter", default="randlora")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    over = [f"model={args.model}", f"adapter={args.adapter}", "trainer=cpu"]
    ours, ref = [], []
    for _ in range(args.rounds):
        ref.append(bare(over, args.epochs))
        with tempfile.TemporaryDirectory() as tmp:
            ours.append(framework(over, args.epochs, tmp))
    b, f = statistics.median(ref), statistics.median(ours)
    print(f"| loop | samples/s (median of {args.rounds}) |\n|---|---|\n| bare PyTorch | {b:.1f} |\n"
          f"| randlora framework (Lightning) | {f:.1f} |\n\nframework / bare = {f / b:.3f} (target >= 0.95)")
    return f / b


if __name__ == "__main__":
    main()
