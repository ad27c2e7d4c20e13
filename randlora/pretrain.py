"""Make the small pretrained backbone the quickstart adapts (``assets/tiny_vit_digits04.safetensors``).

A tiny timm ViT (config ``model=tiny_vit_digits``) is trained from scratch on the digits 0-4 of the
training split of scikit-learn's digits; the quickstart then adapts it to all ten digits, so
adapters start from features that know some digits but not the task — the PEFT setting in
miniature. Deterministic; about a minute on one CPU core:

    python -m randlora.pretrain
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .data.images import DIGIT_NAMES, ImageDataModule
from .models import CLIP_MEAN, CLIP_STD

KWARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, global_pool="avg")
ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "tiny_vit_digits04.safetensors"))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    dm = ImageDataModule("digits", "digits", image_size=32, mean=CLIP_MEAN, std=CLIP_STD, val_fraction=0.0)
    dm.setup()
    keep = [i for i, y in enumerate(dm.train_set.labels.tolist()) if y < 5]
    xs = torch.stack([dm.train_set[i][0] for i in keep])
    ys = torch.tensor([dm.train_set[i][1] for i in keep])
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = args.epochs * ((len(ys) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(ys), generator=g)
        correct = 0
        for i in range(0, len(ys), 64):
            idx = perm[i:i + 64]
            logits = model(xs[idx])
            loss = F.cross_entropy(logits, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += (logits.argmax(1) == ys[idx]).sum().item()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1}: train acc on digits {DIGIT_NAMES[0]}-{DIGIT_NAMES[4]} {correct / len(ys):.3f}")
    model.reset_classifier(0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out)
    print(f"wrote {args.out} ({sum(v.numel() for v in state.values()):,} parameters)")


if __name__ == "__main__":
    main()
