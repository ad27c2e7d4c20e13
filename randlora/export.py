"""Export a finished run's adapter for use outside randlora.

    python -m randlora.export <run folder> --format peft   --out DIR   # a PEFT adapter folder
    python -m randlora.export <run folder> --format merged --out DIR   # the model with the adapter folded in
    python -m randlora.export <run folder> --format lora   --out DIR --rank 16   # (or --energy 0.99)

The run folder must hold a completed run (``results.json`` says ``"status": "completed"``) and its adapter
file (``checkpoints/adapter.safetensors``, checksums verified on load). The base model is rebuilt through
the framework's own builder from the run's recorded config, checked against the run's recorded model
fingerprint, and the adapter loaded into it. Everything is written in the model library's own names
(``randlora.training.native``): an image classifier as ``timm.create_model(arch, num_classes=C)``, CLIP as
open_clip's model, a causal LM as transformers'.

* ``peft``: ``randlora.adapters.export_peft``; ``peft.PeftModel.from_pretrained(base, DIR)`` computes the run's
  outputs (LoRA, DoRA, VeRA, RandLoRA; docs/peft-interop.md).
* ``merged``: every update folded into its weight. transformers models: ``save_pretrained`` (with the
  tokenizer); timm / open_clip models: ``model.safetensors``, the library's state dict (``load_state_dict``
  accepts it; a classifier's trained head is timm's ``head``), which ``model.pretrained=DIR/model.safetensors``
  loads in randlora.
* ``lora``: ``randlora.adapters.to_lora`` at ``--rank k`` (or the smallest rank per layer keeping ``--energy``
  of ||dW||_F^2) written as a PEFT LoRA folder, with ``truncation.json``: per layer the relative Frobenius
  error ||dW - dW_k||_F / ||dW||_F of the truncation.

Every format also writes ``export.json`` (the run folder, method, budget, trainable parameters, the run's git
commit, the SHA-256 of the source results.json, and what was written). Bad requests are refused in one
line before anything is built or written.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

FORMATS = ("peft", "merged", "lora")
PEFT_METHODS = ("lora", "dora", "vera", "randlora")  # randlora.adapters.peft.PEFT_TYPES
ADAPTER_FILE = Path("checkpoints") / "adapter.safetensors"
EXPORT_RECORD = "export.json"
TRUNCATION_FILE = "truncation.json"
MERGED_FILE = "model.safetensors"


class ExportError(ValueError):
    """A request the exporter refuses (one line: what is wrong and what to do)."""


# ------------------------------------------------------------------------------------------------ checks

def check_request(run_dir, fmt: str, out, *, rank=None, energy=None, force: bool = False) -> dict:
    """Every check that needs no model: the format, the run (completed, its adapter file present), what the
    format can hold of the run's method, the rank, the output folder. Returns the run's results.json."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    run = Path(run_dir)
    res_file = run / "results.json"
    if not res_file.is_file():
        raise ExportError(f"{run} is not a run folder (no results.json); give the folder a training run wrote")
    try:
        results = json.loads(res_file.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{res_file} is unreadable ({type(e).__name__}); the run cannot be exported") from None
    status = results.get("status")
    if status != "completed":
        why = f": {results['error']}" if status == "failed" and results.get("error") else ""
        raise ExportError(f"{run} holds a run with status {status!r}{why}; only a completed run can be exported "
                          "(finish it with resume=<run folder>, or export another run)")
    method = results.get("method")
    if fmt == "peft" and method not in PEFT_METHODS:
        alt = ("--format merged (the full fine-tune's weights)" if method == "full" else
               "--format lora --rank k (a LoRA by truncated SVD, with its error) or --format merged")
        raise ExportError(f"--format peft cannot hold a {method!r} run: PEFT has no method that computes it "
                          f"(supported: {', '.join(PEFT_METHODS)}); use {alt}")
    if fmt == "lora":
        if method == "full":
            raise ExportError("--format lora cannot hold a full fine-tune: it has no adapter update to factorise "
                              "(its dW needs the original weights); use --format merged")
        if (rank is None) == (energy is None):
            raise ExportError("--format lora needs the LoRA rank: give --rank k (one rank for every layer) or "
                              "--energy e (per layer, the smallest rank keeping that share of ||dW||_F^2), not both")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ExportError(f"--rank {rank} must be a positive integer")
        if energy is not None and not (0.0 < float(energy) <= 1.0):
            raise ExportError(f"--energy {energy} must be in (0, 1]")
    elif rank is not None or energy is not None:
        raise ExportError(f"--rank / --energy apply to --format lora only, not --format {fmt}; drop them")
    if not (run / ADAPTER_FILE).is_file():
        raise ExportError(f"{run / ADAPTER_FILE} is missing (the run was trained with "
                          "callbacks.adapter_checkpoint=false?); nothing to export")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; give a new or empty folder, or pass --force to "
                          "write over the files of the same names")
    return results


# ------------------------------------------------------------------------------------------------ rebuild

def run_config(results: dict):
    """The run's resolved config (as recorded in its results.json) as an OmegaConf node."""
    from omegaconf import OmegaConf
    import importlib
    importlib.import_module(f"{__package__}.train")  # registers the resolvers a recorded config may still name
    return OmegaConf.create(results["config"])


def rebuild(run_dir, results: dict | None = None):
    """(cfg, bundle, model): the run's base model rebuilt from its recorded config, checked against the
    recorded fingerprint, in its library's form, with the run's adapter loaded (checksums verified)."""
    from .adapters import load_adapter, load_adapter_state_dict
    from .adapters.state import read_adapter_file
    from .models import build_model
    from .training import folder as rf
    from .training.build import task_class
    from .training.native import move_adapter_state, native_model, wraps_backbone

    run = Path(run_dir)
    results = results or json.loads((run / "results.json").read_text())
    cfg = run_config(results)
    import lightning as L
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # as train.run: a random-init model is the same
    bundle = build_model(cfg.model)
    recorded = ((results.get("identity") or {}).get("model") or {}).get("fingerprint")
    now = rf.model_identity(cfg, bundle.backbone)["fingerprint"]
    if recorded and recorded != now:
        raise ExportError(f"the base model rebuilt from {run}'s config ({cfg.model.get('pretrained') or cfg.model.name}) "
                          f"is not the one the run trained (fingerprint {now} vs recorded {recorded}); restore the "
                          "run's weights file")
    classes = (results.get("data") or {}).get("num_classes") or \
        (((results.get("identity") or {}).get("data") or {}).get("classes"))
    data = SimpleNamespace(num_classes=classes, class_names=None)  # all a task's network reads of the data
    network = task_class(cfg, bundle).network(bundle, data, dict(cfg.task), int(cfg.seed))
    if not wraps_backbone(cfg):
        load_adapter(network.net, run / ADAPTER_FILE)
        return cfg, bundle, network.net.eval()
    # a classifier: the adapter file (checked) goes into timm's own model of backbone + head
    state = read_adapter_file(run / ADAPTER_FILE)
    model = native_model(cfg, bundle.backbone, network.net.head)
    load_adapter_state_dict(model, move_adapter_state(state, to_native=True))
    return cfg, bundle, model.eval()


# ------------------------------------------------------------------------------------------------ export

def _record(run_dir, results: dict, fmt: str, model) -> dict:
    from .adapters import adapter_meta
    from .models import file_sha256
    run = Path(run_dir).resolve()
    meta = adapter_meta(model)
    return {
        "format": fmt,
        "run_dir": str(run),
        "method": results.get("method"),
        "model": results.get("model"),
        "dataset": results.get("dataset"),
        "seed": results.get("seed"),
        "r": results.get("r"),
        "budget": results.get("budget"),
        "trainable": (results.get("params") or {}).get("trainable"),
        "adapter_params": (results.get("params") or {}).get("adapter"),
        "git_commit": (((results.get("provenance") or {}).get("git")) or {}).get("commit"),
        "results_sha256": file_sha256(run / "results.json"),
        "adapter_file_sha256": file_sha256(run / ADAPTER_FILE),
        "adapter_options": meta.get("options"),
        "library": results.get("config", {}).get("model", {}).get("family"),
        "arch": results.get("config", {}).get("model", {}).get("arch"),
    }


def export_run(run_dir, fmt: str, out, *, rank: int | None = None, energy: float | None = None,
               force: bool = False) -> dict:
    """Export the run in ``run_dir`` as ``fmt`` into ``out``; returns what ``export.json`` records."""
    results = check_request(run_dir, fmt, out, rank=rank, energy=energy, force=force)
    cfg, bundle, model = rebuild(run_dir, results)
    record = _record(run_dir, results, fmt, model)
    out = Path(out)
    family = cfg.model.family
    if fmt == "peft":
        from .adapters import export_peft
        out.mkdir(parents=True, exist_ok=True)
        export_peft(model, out, base_model_name_or_path=_base_name(cfg),
                    task_type="CAUSAL_LM" if family == "hf_causal_lm" else None, overwrite=force)
        record["files"] = ["adapter_config.json", "adapter_model.safetensors"]
    elif fmt == "lora":
        from .adapters import export_peft, overall_error, to_lora
        lora, report = to_lora(model, rank=rank, energy=energy, inplace=True)
        out.mkdir(parents=True, exist_ok=True)
        export_peft(lora, out, base_model_name_or_path=_base_name(cfg),
                    task_type="CAUSAL_LM" if family == "hf_causal_lm" else None, overwrite=force)
        errors = [row.rel_error for row in report]
        trunc = {"requested": {"rank": rank, "energy": energy}, "method": results.get("method"),
                 "overall_rel_error": overall_error(report),
                 "mean_rel_error": sum(errors) / len(errors), "max_rel_error": max(errors),
                 "layers": [row.as_dict() for row in report]}
        _write_json(out / TRUNCATION_FILE, trunc)
        record.update(files=["adapter_config.json", "adapter_model.safetensors", TRUNCATION_FILE],
                      rank=rank, energy=energy, overall_rel_error=trunc["overall_rel_error"])
    else:
        from .adapters import unload
        unload(model)  # every update folded into its weight, the library's plain modules back
        out.mkdir(parents=True, exist_ok=True)
        if family == "hf_causal_lm":
            model.save_pretrained(str(out))
            files = ["config.json", "model.safetensors"]
            if bundle.tokenizer is not None and hasattr(bundle.tokenizer, "save_pretrained"):
                bundle.tokenizer.save_pretrained(str(out))
                files.append("tokenizer files")
            record["files"] = files
            # the run's model config may pin its shipped folder's files (model.sha256): this folder is another
            record["load"] = (f"transformers AutoModelForCausalLM.from_pretrained({str(out.resolve())!r}); in randlora: "
                              f"model={cfg.model.name}" + (" model.tiny=null" if cfg.model.get("tiny") else "")
                              + f" model.pretrained={out.resolve()}" + (" model.sha256=null" if cfg.model.get("sha256") else ""))
        else:
            from safetensors.torch import save_file
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(out / MERGED_FILE), metadata={"format": "pt", "randlora_export": "merged"})
            record["files"] = [MERGED_FILE]
            if cfg.task.kind == "classification":
                record["num_classes"] = int(model.num_classes)
                record["load"] = (f"timm.create_model({cfg.model.arch!r}, num_classes={int(model.num_classes)}, "
                                  f"**{dict(cfg.model.get('kwargs') or {})}).load_state_dict(...); in randlora: "
                                  f"model={cfg.model.name} model.pretrained={(out / MERGED_FILE).resolve()}")
    _write_json(out / EXPORT_RECORD, record)
    return record


def _base_name(cfg) -> str | None:
    m = cfg.model
    p = m.get("pretrained")
    if m.family == "hf_causal_lm":
        return str(p) if p else None
    return f"{m.arch}" + (f" ({p})" if p else "")


def _write_json(path: Path, obj) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    path.write_text(json.dumps(clean(obj), indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m randlora.export",
                                description="Export a completed run's adapter: as a PEFT adapter, merged into the "
                                            "model, or as a rank-k LoRA (PEFT format) with its truncation error.")
    p.add_argument("run_dir", help="the run folder (holds results.json and checkpoints/adapter.safetensors)")
    p.add_argument("--format", required=True, dest="fmt", help="peft | merged | lora")
    p.add_argument("--out", required=True, help="the folder to write (new or empty, unless --force)")
    p.add_argument("--rank", type=int, default=None, help="--format lora: the LoRA rank of every layer")
    p.add_argument("--energy", type=float, default=None,
                   help="--format lora: per layer, the smallest rank keeping this share of ||dW||_F^2")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out (files of the same names "
                                                        "are replaced, others left)")
    args = p.parse_args(argv)
    try:
        record = export_run(args.run_dir, args.fmt, args.out, rank=args.rank, energy=args.energy, force=args.force)
    except ValueError as e:  # ExportError, and the adapter library's refusals (one line each)
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    line = f"exported {record['method']} run {record['run_dir']} as {args.fmt} to {Path(args.out).resolve()}"
    if args.fmt == "lora":
        line += f" (relative truncation error over all layers {record['overall_rel_error']:.4f})"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
