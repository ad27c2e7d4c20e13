"""How big each method's update is as a budget changes its rank (docs/budgets.md §2 and §4).

``python -m experiments.budget_scaling first-step [--budgets 2500,5000,...] [--variant vera:adapter.alpha=1]``
  Builds the job a budget sweep runs (the default model, data and adapter configs, ``adapter.budget=<b>``),
  takes one AdamW step on the first training batch exactly as the trainer does (global gradient clipping at
  ``trainer.gradient_clip_val``, the resolved LR and weight decay) and prints, per method and budget: the
  matched rank mix, the scaling s per layer, the adapter's gradient norm, and ||dW||_F / ||W0||_F after that
  step (dW = the update with its scaling, mean over the adapted layers). With Adam the first step moves every
  trained entry by about the LR whatever its gradient, so this is the update size the scaling and the frozen
  factors set, before any learning.

``python -m experiments.budget_scaling trained <multirun folder>``
  The same ratio for every job of a finished sweep, from its ``checkpoints/adapter.safetensors``, and rank90:
  how many singular values of the trained dW hold 90 % of its energy (mean over the layers).

Both print a Markdown table (and ``--json`` writes the rows). CPU only; seconds per row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "vera", "randlora")


def _cfg(overrides: list[str]):
    import importlib

    from hydra import compose, initialize_config_dir

    from randlora.training.config import resolve
    importlib.import_module("randlora.train")  # registers the config resolvers
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return resolve(cfg)


def _build(overrides: list[str]):
    """(cfg, data, task) of the job these overrides describe, the budget's warnings recorded."""
    from randlora.adapters import BudgetWarning
    from randlora.training.build import adapt, build_datamodule, build_task
    from randlora.models import build_model
    cfg = _cfg(overrides)
    data = build_datamodule(cfg)
    data.setup("fit")
    bundle = build_model(cfg.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetWarning)
        network, adapter = adapt(cfg, bundle, data)
    task = build_task(cfg, bundle, data, network, adapter)
    return cfg, data, task, adapter


def update_ratios(net) -> list[float]:
    """||dW||_F / ||W0||_F of every adapted layer (dW with its scaling)."""
    import torch

    from randlora.adapters import adapted_layers
    with torch.no_grad():
        return [float(layer.update.delta_weight().norm() / layer.base_layer.weight.norm())
                for _, layer in adapted_layers(net)]


def energy_ranks(net, energy: float = 0.9) -> list[int]:
    """Per adapted layer: the number of singular values of dW that hold ``energy`` of ||dW||_F^2 (how much of
    the rank the trained update uses)."""
    import torch

    from randlora.adapters import adapted_layers
    out = []
    with torch.no_grad():
        for _, layer in adapted_layers(net):
            sv = torch.linalg.svdvals(layer.update.delta_weight().double()) ** 2
            cum = torch.cumsum(sv, 0) / sv.sum().clamp_min(1e-300)
            out.append(int((cum < energy).sum()) + 1)
    return out


def _mix(adapter: dict) -> str:
    match = adapter.get("budget_match") or {}
    counts = match.get("rank_counts") or {str(adapter["r"]): None}
    return " + ".join(f"{k}" + (f" x{v}" if v else "") for k, v in counts.items())


def first_step(method: str, budget: float, extra: list[str], seed: int = 1) -> dict:
    import torch
    import torch.nn.functional as F

    from randlora.adapters import adapted_layers
    torch.manual_seed(seed)
    cfg, data, task, adapter = _build([f"adapter={method}", f"adapter.budget={budget:g}", f"seed={seed}", *extra])
    net = task.net
    net.train()
    x, y = next(iter(data.train_dataloader()))
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg.optim.lr), weight_decay=float(cfg.optim.weight_decay))
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    adapter_params = [p for _, layer in adapted_layers(net) for p in layer.update.parameters() if p.requires_grad]
    grad_adapter = float(torch.norm(torch.stack([p.grad.norm() for p in adapter_params])))
    clip = cfg.trainer.get("gradient_clip_val")
    grad_total = float(torch.nn.utils.clip_grad_norm_(params, float(clip) if clip else float("inf")))
    opt.step()
    ratios = update_ratios(net)
    scalings = sorted({round(float(layer.update.scaling), 6) for _, layer in adapted_layers(net)})
    match = adapter.get("budget_match") or {}
    return {"method": method, "budget": budget, "extra": " ".join(extra), "r": _mix(adapter),
            "achieved": match.get("achieved"), "scaling": scalings, "lr": float(cfg.optim.lr),
            "grad_adapter": grad_adapter, "grad_total": grad_total,
            "update_ratio": statistics.mean(ratios), "warnings": len(match.get("warnings") or [])}


def trained(folder: str) -> list[dict]:
    """||dW|| / ||W0|| of every finished job of a multirun folder, from its saved adapter."""
    import yaml

    from randlora.adapters import load_adapter
    rows = []
    for res in sorted(Path(folder).rglob("results.json")):
        job = res.parent
        path = job / "checkpoints" / "adapter.safetensors"
        if not path.exists():
            continue
        record = json.loads(res.read_text())
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) if (
            job / ".hydra" / "overrides.yaml").exists() else record.get("overrides", [])
        overrides = [o for o in overrides if not o.startswith(("sweep=", "hydra"))]
        cfg, data, task, adapter = _build(overrides)
        load_adapter(task.net, path)
        ratios = update_ratios(task.net)
        rows.append({"method": record.get("method"), "budget": record.get("budget"), "seed": record.get("seed"),
                     "r": _mix(adapter), "update_ratio": statistics.mean(ratios),
                     "rank90": statistics.mean(energy_ranks(task.net)),
                     "test_acc": (record.get("metrics") or {}).get("test/acc")})
    return rows


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list):
            return ", ".join(f"{x:.3g}" for x in v)
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.budget_scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    fs = sub.add_parser("first-step")
    fs.add_argument("--budgets", default="2500,5000,10000,20000,40000")
    fs.add_argument("--methods", default=",".join(METHODS))
    fs.add_argument("--variant", action="append", default=[],
                    help="method:overrides (repeatable; overrides space-separated), e.g. vera:adapter.alpha=1 adds those rows")
    fs.add_argument("--json", default=None)
    tr = sub.add_parser("trained")
    tr.add_argument("folder")
    tr.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "trained":
        rows = trained(args.folder)
        print(_table(rows, ["method", "budget", "seed", "r", "update_ratio", "rank90", "test_acc"]))
    else:
        rows = []
        runs = [(m, []) for m in args.methods.split(",")]
        runs += [(v.split(":", 1)[0], v.split(":", 1)[1].split()) for v in args.variant]
        for method, extra in runs:
            for b in (float(x) for x in args.budgets.split(",")):
                try:
                    rows.append(first_step(method, b, extra))
                except Exception as e:  # a budget out of the method's reach: say so and go on
                    msg = str(e).split(";")[0]
                    rows.append({"method": method, "budget": b, "extra": " ".join(extra), "r": f"refused: {msg}"})
                print(_table(rows[-1:], ["method", "extra", "budget", "r", "scaling", "update_ratio"]).splitlines()[-1],
                      file=sys.stderr, flush=True)
        print(_table(rows, ["method", "extra", "budget", "r", "achieved", "scaling", "lr", "grad_adapter",
                            "grad_total", "update_ratio", "warnings"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
