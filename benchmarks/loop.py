"""Framework overhead: the Lightning training loop of ``randlora.train`` vs a bare PyTorch loop on the
same model, data, optimiser and schedule. Interleaved rounds in one process; median samples/s.

    python -m benchmarks.loop [--model tiny_vit_digits] [--epochs 2] [--rounds 3]
    python -m benchmarks.loop --accelerator gpu --precision bf16-mixed --model vit_b16 \
        --set model.pretrained=null data=synthetic data.synthetic.size=224 data.batch_size=64

Target (issue 6): the framework reaches >= 95 % of the bare loop's throughput.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time

import torch
import torch.nn.functional as F


def build_job(overrides):
    import randlora.train  # noqa: F401  (registers the config resolvers)
    from randlora.models import build_model
    from randlora.training.build import build_datamodule, build_task
    from randlora.training.config import effective_lr
    from randlora.training.folder import hydra_compose
    from omegaconf import open_dict
    cfg = hydra_compose(list(overrides))
    with open_dict(cfg):
        cfg.optim.lr = float(effective_lr(cfg))
    dm = build_datamodule(cfg)
    dm.setup()
    task = build_task(cfg, build_model(cfg.model), dm)
    return cfg, dm, task


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bare(overrides, epochs, accelerator="cpu", precision="32-true"):
    cfg, dm, task = build_job(overrides)
    dev = torch.device("cuda" if accelerator == "gpu" else "cpu")
    task = task.to(dev)
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
           else contextlib.nullcontext())
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loader = dm.train_dataloader()
    total = epochs * len(loader)  # the framework's schedule: cosine to 1 % of the peak
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    task.train()
    _sync()
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with amp:
                loss = F.cross_entropy(task(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            n += len(y)
    _sync()
    return n / (time.perf_counter() - t0)


def framework(overrides, epochs, tmp, accelerator="cpu", precision="32-true"):
    import lightning as L

    from randlora.training.callbacks import NonFiniteGuard, PerfMonitor

    class LoopTimer(L.Callback):  # the epochs alone, as the bare loop is timed (no fit() setup)
        def on_train_start(self, trainer, pl_module):
            _sync()
            self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            _sync()
            self.t1 = time.perf_counter()

    timer = LoopTimer()
    cfg, dm, task = build_job(overrides)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0,
                        gradient_clip_val=1.0, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, logger=L.pytorch.loggers.CSVLogger(tmp),
                        callbacks=[PerfMonitor(), NonFiniteGuard(tmp), timer], log_every_n_steps=10)
    n = epochs * len(dm.train_set)
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    _sync()
    whole = time.perf_counter() - t0
    return n / (timer.t1 - timer.t0), n / whole


def main(argv=None):
    import tempfile
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_vit_digits")
    ap.add_argument("--adapter", default="randlora")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for both loops")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    over = [f"model={args.model}", f"adapter={args.adapter}", "trainer=cpu", *args.set]
    ours, ours_fit, ref = [], [], []
    for _ in range(args.rounds):
        ref.append(bare(over, args.epochs, args.accelerator, args.precision))
        with tempfile.TemporaryDirectory() as tmp:
            loop_rate, fit_rate = framework(over, args.epochs, tmp, args.accelerator, args.precision)
        ours.append(loop_rate)
        ours_fit.append(fit_rate)
    b, f = statistics.median(ref), statistics.median(ours)
    print(f"{args.accelerator}, {args.precision}, overrides {over}, {args.epochs} epochs per round")
    print(f"| loop | samples/s (median of {args.rounds}) |\n|---|---|\n| bare PyTorch | {b:.1f} |\n"
          f"| randlora framework (Lightning), training epochs | {f:.1f} |\n"
          f"| randlora framework, whole fit() incl. setup | {statistics.median(ours_fit):.1f} |\n\n"
          f"framework / bare = {f / b:.3f} (target >= 0.95)")
    return f / b


if __name__ == "__main__":
    main()
