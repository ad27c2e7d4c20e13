"""The Hydra entry point: compose, validate, seed, build, fit, test, write results.

    python train.py                                       # the quickstart (tiny ViT, digits, CPU)
    python train.py adapter=lora model=clip_vitb32 data=food101
    python train.py -m adapter=lora,randlora adapter.budget=1e5,4e5

Every run folder holds ``results.json`` (docs/results-schema.md), ``checkpoints/last.ckpt``
(resumable), ``checkpoints/adapter.safetensors`` (adapter only), CSV metrics and the Hydra config.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
OmegaConf.register_new_resolver("uniq", lambda: secrets.token_hex(3), use_cache=True, replace=True)
OmegaConf.register_new_resolver("project_root", lambda: PROJECT_ROOT, replace=True)


def bases_dtype_for(precision) -> str:
    """The storage of RandLoRA's random bases that matches ``trainer.precision``: the 16-bit type the
    adapter GEMMs run in under bf16 / fp16 precision (the bases are rounded once, and no float32 master
    sits next to the 16-bit copy those GEMMs would read), float32 otherwise."""
    p = str(precision)
    if p.startswith("bf16"):
        return "bfloat16"
    if p.startswith("16"):
        return "float16"
    return "float32"


OmegaConf.register_new_resolver("bases_dtype_for", bases_dtype_for, replace=True)


def _register_run_folder_resolvers() -> None:
    from .runfolder import resume_run_dir, safe_name_resolver
    OmegaConf.register_new_resolver("resume_run_dir", resume_run_dir, replace=True)
    OmegaConf.register_new_resolver("safe_name", safe_name_resolver, replace=True)


_register_run_folder_resolvers()


class UserError(Exception):
    """A problem with the request (config, weights, data): printed as one message, no traceback."""


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it over ``path``; on failure (a full disk) the
    previous file stays and the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def _config_record(cfg) -> dict:
    """The config for results.json, resolved (the concrete seed, bases dtype, paths); as written where an
    interpolation cannot be resolved (a Hydra runtime key outside a Hydra job)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - any resolver error: keep the unresolved form
        return OmegaConf.to_container(cfg, resolve=False)


def _resume_dir(cfg) -> Path | None:
    """The earlier run's folder when ``resume=<run dir>`` (the run continues there), else None."""
    return Path(cfg.resume).resolve() if cfg.get("resume") and Path(cfg.resume).is_dir() else None


def output_dir(cfg) -> Path:
    # DDP children re-run this script; they must write into the parent's folder
    if int(os.environ.get("LOCAL_RANK", "0")) > 0 and os.environ.get("RANDLORA_RUN_DIR"):
        return Path(os.environ["RANDLORA_RUN_DIR"])
    return _resume_dir(cfg) or Path(cfg.paths.output_dir).resolve()


def resolve_resume(cfg) -> str | None:
    """The checkpoint to start from: for ``resume=<run folder>`` the newest complete checkpoint in its
    ``checkpoints/`` (``last.ckpt``, or a newer top-k file when a kill came between the two saves);
    ``resume=<file>`` or ``ckpt_path=<file>`` that file."""
    if cfg.get("resume"):
        run = Path(cfg.resume)
        if run.is_dir():
            from .checkpoint_io import newest_checkpoint, remove_stale_temporaries
            remove_stale_temporaries(run / "checkpoints")
            remove_stale_temporaries(run)
            ckpt = newest_checkpoint(run / "checkpoints")
            if ckpt is None:
                raise UserError(f"resume={cfg.resume}: no checkpoint at {run / 'checkpoints' / 'last.ckpt'} (a run "
                                "folder must contain checkpoints/last.ckpt)")
            if ckpt.name != "last.ckpt":
                print(f"[randlora] resuming from {ckpt.name}: the newest complete checkpoint of the run",
                      file=sys.stderr, flush=True)
            return str(ckpt)
        if not run.is_file():
            raise UserError(f"resume={cfg.resume}: no checkpoint at {run} (a run folder must contain "
                            "checkpoints/last.ckpt)")
        return str(run)
    if cfg.get("ckpt_path"):
        if not Path(cfg.ckpt_path).is_file():
            raise UserError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return str(cfg.ckpt_path)
    return None


def build_datamodule(cfg):
    from .data.images import ImageDataModule
    from .models import CLIP_MEAN, CLIP_STD
    d = OmegaConf.to_container(cfg.data, resolve=True)
    kind = cfg.task.kind
    if kind == "causal_lm":
        from .data.commonsense import InstructionDataModule
        return InstructionDataModule(**d, order_seed=int(cfg.seed))
    d.setdefault("image_size", cfg.model.get("image_size") or 224)
    d["image_size"] = cfg.model.get("image_size") or d["image_size"]
    d["mean"], d["std"] = cfg.model.get("mean") or CLIP_MEAN, cfg.model.get("std") or CLIP_STD
    d["order_seed"] = int(cfg.seed)
    d["require_class_names"] = kind == "clip"  # CLIP scores class names: unnamed labels refused before the model
    return ImageDataModule(**d)


def build_task(cfg, bundle, dm):
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    kind = cfg.task.kind
    if bundle.kind == "vision" and kind == "classification":
        from .tasks.classification import ClassificationTask
        return ClassificationTask(bundle, dm.num_classes, cfg.adapter, optim,
                                  label_smoothing=cfg.task.label_smoothing, head_seed=cfg.seed)
    if bundle.kind == "clip" and kind == "clip":
        from .tasks.clip import ClipTask
        return ClipTask(bundle, dm.class_names, cfg.adapter, optim, prompt=cfg.task.prompt, loss=cfg.task.loss,
                        logit_scale=cfg.task.logit_scale, text_tower=cfg.task.text_tower,
                        templates=dm.templates, head=cfg.task.get("head", "auto"))
    if bundle.kind == "causal_lm" and kind == "causal_lm":
        from .tasks.causal_lm import CausalLMTask
        return CausalLMTask(bundle, cfg.adapter, optim, cfg.task)
    raise UserError(f"task {kind!r} does not fit a {bundle.kind} model ({cfg.model.name})")


def trainer_kwargs(cfg, dm) -> dict:
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    if t.get("max_epochs") is None:
        shots = cfg.data.get("shots")
        t["max_epochs"] = int(cfg.data.get("few_shot_epochs" if shots else "epochs", 1) or 1)
    eff = cfg.get("effective_batch_size")
    if eff:
        per_step = int(cfg.data.batch_size) * _world_size(t)
        if eff % per_step:
            raise UserError(f"effective_batch_size={eff} is not a multiple of data.batch_size x devices "
                            f"= {per_step}; choose a multiple")
        t["accumulate_grad_batches"] = eff // per_step
    return {k: v for k, v in t.items() if v is not None}


def _world_size(t) -> int:
    dev = t.get("devices", 1)
    if isinstance(dev, int) and dev > 0:
        n = dev
    elif isinstance(dev, (list, tuple)):
        n = len(dev)
    else:
        import torch
        n = max(1, torch.cuda.device_count())
    return n * int(t.get("num_nodes", 1) or 1)


def _run_summary_fields(cfg) -> dict:
    return {"method": cfg.adapter.method, "model": cfg.model.name, "dataset": cfg.data.name, "task": cfg.task.kind,
            "seed": int(cfg.seed), "r": cfg.adapter.get("r"), "budget": cfg.adapter.get("budget"),
            "shots": cfg.data.get("shots"), "fraction": cfg.data.get("fraction", 1.0), "sweep": cfg.get("group")}


def _start_from_checkpoint(cfg, ckpt: str, out: Path):
    """Load the checkpoint a run starts from (weights-only, checksums verified) and, for a resume,
    the config the run continues with (its recorded settings; see ``runfolder.resume_config``).
    Returns (cfg, checkpoint, run record, override list)."""
    from . import runfolder as rf
    from .checkpoint_io import load_checkpoint_file
    state = load_checkpoint_file(ckpt)
    record = state.get("randlora_run")
    resuming = bool(cfg.get("resume")) or bool(cfg.train)
    run_dir = _resume_dir(cfg)
    previous = rf.read_results(run_dir / "results.json") if run_dir is not None else None
    recorded_config = (record or {}).get("config") or (previous or {}).get("config")
    recorded_overrides = rf.recorded_overrides(run_dir, record, previous)
    current = rf.current_overrides()
    overrides = [o for o in (current or []) if not rf.is_attempt(rf.override_key(o))]
    if resuming and recorded_config:
        cfg, overrides = rf.resume_config(cfg, recorded_config, recorded_overrides, current,
                                          compose=rf.hydra_compose if current is not None else None)
    elif resuming:
        print(f"[randlora] warning: {ckpt} holds no record of its run's settings (written by an older randlora); "
              "the settings, base model and dataset of this resume are not checked against it", file=sys.stderr,
              flush=True)
    return cfg, state, record, overrides


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; return the results dict (also written to results.json)."""
    import lightning as L
    import torch

    from . import runfolder as rf
    from .callbacks import (AdapterCheckpoint, ExactResume, KillAtStep, NonFiniteGuard, PerfMonitor,
                            RunCheckpoint)
    from .checkpoint_io import AtomicCheckpointIO
    from .loggers import build_loggers, finish_wandb
    from .models import build_model
    from .sources import check_sources
    from .validate import effective_lr, validate_config

    out = output_dir(cfg)
    rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    os.environ["RANDLORA_RUN_DIR"] = str(out)
    results_path = out / "results.json"
    overrides = _overrides()
    results = {"status": "running", "error": None, **_run_summary_fields(cfg), "params": {}, "metrics": {},
               "perf": {}, "run_dir": str(out), "overrides": overrides,
               "config": _config_record(cfg)}
    # resume=<run dir> continues an earlier run in its own folder: until this attempt has passed its checks
    # and starts, a failure must leave that run's results.json as it was
    resuming_dir = _resume_dir(cfg) is not None
    continuing = resuming_dir and results_path.exists()
    started = False
    locked = False  # only the process holding the folder's lock writes into it
    attempt = {"started": rf.now(), "ended": None, "status": "running", "error": None, "pid": os.getpid(),
               "host": rf.hostname(), "command_overrides": overrides, "resumed_from": None}
    try:
        if rank0:
            checked = rf.is_held(out)  # by the Hydra callback, before Hydra wrote into the folder
            rf.acquire(out)
            locked = True
            if not resuming_dir and not checked and rf.holds_run(out):
                locked = False  # the folder's results are another run's: leave them as they are
                rf.release(out)
                raise rf.RunFolderError(f"{out} already holds a run (results.json / checkpoints): a new run would "
                                        f"overwrite it; continue it with resume={out}, or use another output folder")
        validate_config(cfg)  # cheap checks first: nothing is built before they pass
        rf.check_file_name(cfg.get("task_name", "train"), "task_name")
        ckpt = resolve_resume(cfg)
        state = record = None
        if ckpt is not None:
            # the checkpoint, read weights-only and verified, before anything is built; a resume continues
            # with the run's own settings (a new override that changes what it computes is refused)
            cfg, state, record, overrides = _start_from_checkpoint(cfg, ckpt, out)
            validate_config(cfg)
            results.update(_run_summary_fields(cfg), overrides=overrides, config=_config_record(cfg))
            resumed = (state.get("callbacks") or {}).get("ExactResume") or {}
            attempt["resumed_from"] = {"checkpoint": str(ckpt), "global_step": int(state.get("global_step", 0)),
                                       "epoch": resumed.get("epoch", state.get("epoch"))}
        else:
            overrides = [o for o in overrides if not rf.is_attempt(rf.override_key(o))]
            results["overrides"] = overrides
        # the settings as composed (optim.lr null: the method's default), recorded in checkpoints
        recorded = {k: v for k, v in _config_record(cfg).items() if k != "paths"}
        check_sources(cfg)  # every unreadable source of the job in one message, before any download
        with open_dict(cfg):
            cfg.optim.lr = float(effective_lr(cfg))
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        dm = build_datamodule(cfg)
        dm.setup("fit")  # data errors (labels, shots) surface before the model is built
        data_id = rf.data_identity(cfg, dm)
        bundle = build_model(cfg.model)
        model_id = rf.model_identity(cfg, bundle.backbone)
        if state is not None:  # another base model or dataset is refused before anything is written
            rf.check_identity(record, model_id, data_id,
                              "resume with the run's own model and data" if cfg.train else
                              "evaluate it with the model and data it was trained on")
        task = build_task(cfg, bundle, dm)
        task.run_record = {"format": 1, "overrides": overrides, "model": model_id, "data": data_id,
                           "config": recorded}
        if state is not None:  # a checkpoint of another adapter is refused before anything is written
            task.check_checkpoint(state)
            if not cfg.train:  # evaluation only: the checkpoint's trained tensors are the model to test
                task.load_trained_tensors(state)
        # a resume in the run's own folder keeps that folder's earlier metrics rows (runfolder.make_csv_writer)
        resume_step = int(state.get("global_step", 0)) if state is not None and cfg.train and resuming_dir else None
        resume_epoch = resumed.get("epoch") if resume_step is not None else None
        del state
        results["compile"] = _compile(cfg, task, verbose=rank0)
        results["r"] = task.adapter_info.get("r")
        results["params"] = task.parameter_summary()
        results["data"] = dm.sampling_summary() if hasattr(dm, "sampling_summary") else {}
        results["identity"] = {"model": model_id, "data": data_id}
        previous = rf.read_results(results_path) if continuing else None
        results["attempts"] = rf.attempts_before(previous) + [attempt]
        started = True
        if rank0:
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(results_path, results)
            table = task.parameter_table_text()
            if table:
                (out / "parameters.txt").write_text(table + "\n")
        run_name = f"{cfg.adapter.method}-{cfg.model.name}-{cfg.data.name}-s{cfg.seed}"
        loggers, notes = build_loggers(cfg, str(out), run_name, r=results["r"])
        rf.use_durable_csv(loggers, resume_step, resume_epoch)
        perf = PerfMonitor()
        ck = cfg.callbacks.checkpoint
        callbacks = [perf, NonFiniteGuard(str(out / "checkpoints")),
                     ExactResume(int(cfg.seed), cuda_stream=not task.cudagraphs),
                     RunCheckpoint(dirpath=str(out / "checkpoints"), save_last=ck.save_last, save_top_k=1,
                                   every_n_epochs=None if cfg.callbacks.get("checkpoint_every_n_train_steps")
                                   else ck.every_n_epochs,
                                   every_n_train_steps=cfg.callbacks.get("checkpoint_every_n_train_steps"))]
        if cfg.callbacks.get("kill_at_step") is not None:
            callbacks.append(KillAtStep(cfg.callbacks.kill_at_step))
        if cfg.callbacks.adapter_checkpoint:
            callbacks.append(AdapterCheckpoint(str(out / "checkpoints")))
        tkw = trainer_kwargs(cfg, dm)
        if tkw.get("strategy") == "fsdp":  # per-block units, replicated adapters (randlora/distributed.py)
            from .distributed import fsdp_strategy
            acc = tkw.get("accelerator", "auto")
            on_cpu = acc == "cpu" or (acc == "auto" and not torch.cuda.is_available())
            tkw["strategy"] = fsdp_strategy(task, "cpu" if on_cpu else "gpu")
        trainer = L.Trainer(**tkw, logger=loggers, callbacks=callbacks,
                            plugins=[AtomicCheckpointIO()], default_root_dir=str(out), enable_model_summary=False)
        t0 = time.time()
        if cfg.train:
            trainer.fit(task, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        if cfg.test:
            for row in trainer.test(task, datamodule=dm, verbose=False):
                metrics.update({k: float(v) for k, v in row.items()})
        results["metrics"] = _finite_check(metrics)
        results["params"] = task.parameter_summary()  # final counts (DoRA-DR: after pruning)
        results["perf"] = {**perf.summary(task.device), "train_time_s": time.time() - t0}
        results["bases_checksum"] = task.bases_checksum
        results["status"] = "completed"
        attempt.update(status="completed", ended=rf.now(), metrics=results["metrics"])
        if rank0:
            write_json_atomic(results_path, results)
    except BaseException as e:
        results["status"] = "failed"
        results["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        attempt.update(status="failed", ended=rf.now(), error=results["error"])
        if rank0 and locked and (started or not continuing):
            try:
                write_json_atomic(results_path, results)
            except OSError as w:
                print(f"[randlora] error: the failure could not be recorded in {results_path} ({type(w).__name__}: "
                      f"{w}); that file still reads {_status_on_disk(results_path)!r}. The run failed with: "
                      f"{results['error']}", file=sys.stderr, flush=True)
        raise
    else:
        # reporting comes after the completed results.json: a W&B or printing problem here is
        # reported, and never turns a finished job into a failed one
        reports = [("W&B summary", _to_wandb, (loggers, results))]
        if rank0:
            reports.append(("summary", _print_summary, (results, notes)))
        for what, report, args in reports:
            try:
                report(*args)
            except Exception as e:  # noqa: BLE001 - the job itself has completed
                print(f"[randlora] warning: writing the {what} failed ({type(e).__name__}: {e}); "
                      f"the job completed and {results_path} is written", file=sys.stderr, flush=True)
        return results
    finally:
        finish_wandb()
        if locked:
            rf.release(out)


def _status_on_disk(path: Path) -> str:
    from .runfolder import read_results
    r = read_results(path)
    return (r or {}).get("status", "missing")


def _compile(cfg, task, verbose: bool = True) -> dict:
    """torch.compile the task's network in place, as ``cfg.compile`` says; a short record of it."""
    from .compile import compile_model, normalise_options
    from .validate import compile_options
    opts = compile_options(cfg)
    if normalise_options(opts) is not None:
        import torch._dynamo
        # a fresh cache per job: in a multirun every job compiles its own adapter variant of the same
        # block class, and entries left by earlier jobs counted against the recompile limit (the 17th
        # job of a sweep ran eager)
        torch._dynamo.reset()
    info = compile_model(task.net, opts)
    if not info["enabled"]:
        return info
    task.cudagraphs = info["mode"] in ("reduce-overhead", "max-autotune")
    outside = info["adapted_layers_not_compiled"]
    info["modules"], info["adapted_layers_not_compiled"] = len(info.pop("compiled")), len(outside)
    if verbose:
        print(f"torch.compile ({info['scope']} scope, mode {info['mode'] or 'default'}, {info['backend']}): "
              f"{info['modules']} modules of {', '.join(info['classes'])}; the first steps include compile time",
              flush=True)
        if outside:
            print(f"torch.compile: {len(outside)} adapted layers lie outside the compiled blocks and run eager "
                  f"(e.g. {outside[0]})", flush=True)
    return info


def _release_memory() -> None:
    """Free a finished job's tensors before the next job of a multirun run in the same process (a
    launcher such as submitit's local one, or RANDLORA_INPROCESS_JOBS=1). Called by
    ``main`` after ``run`` has returned: run's own frame still holds the trainer and the model, and
    Lightning's trainer <-> module references form a cycle that only a collection breaks."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


RUN_FIELDS = ("status", "method", "model", "dataset", "task", "seed", "r", "budget", "shots", "fraction", "sweep")


def _to_wandb(loggers, results: dict) -> None:
    """Put the results.json fields into the W&B run (config + summary) so reports can pull them."""
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.loggers.logger import DummyExperiment
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run = lg.experiment
            if isinstance(run, DummyExperiment):  # DDP ranks other than 0 have no W&B run
                continue
            run.config.update({k: results.get(k) for k in RUN_FIELDS if k != "status"}, allow_val_change=True)
            summary = {"status": results["status"], **{f"params/{k}": v for k, v in results["params"].items()},
                       **results["metrics"], **{f"perf/{k}": v for k, v in results["perf"].items()}}
            run.summary.update({k: v for k, v in summary.items() if v is not None})


def _finite_check(metrics: dict) -> dict:
    import math
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if any(k.endswith("loss") for k in bad):
        raise FloatingPointError(f"non-finite {', '.join(bad)} at the end of training; lower the learning "
                                 "rate or the adapter scaling (alpha)")
    return metrics


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig
        return list(HydraConfig.get().overrides.task)
    except Exception:
        return []


def _print_summary(results: dict, notes: list[str]) -> None:
    p, m = results["params"], results["metrics"]
    lines = ["", f"== {results['method']} on {results['model']} / {results['dataset']} (seed {results['seed']})"]
    if "test/acc" in m:
        lines.append(f"test accuracy      {m['test/acc']:.4f}")
    if "val/acc" in m:
        lines.append(f"val accuracy       {m['val/acc']:.4f}")
    lines.append(f"trainable params   {p['trainable']:,} of {p['total']:,} ({100 * p['ratio']:.3f} %)")
    if p.get("lora_equivalent_rank") is not None:
        lines.append(f"adapter params     {p['adapter']:,}  (r = {results['r']}, LoRA-equivalent rank "
                     f"{p['lora_equivalent_rank']:.2f})")
    perf = results.get("perf", {})
    if perf.get("samples_per_s"):
        lines.append(f"throughput         {perf['samples_per_s']:.1f} samples/s, peak memory "
                     f"{perf['peak_memory_mb']:.0f} MB")
    paths = perf.get("compute_paths")
    if paths:
        from .adapters import format_paths
        first = paths.get("first_step", {})
        last = paths.get("last_step", first)
        lines.append(f"compute paths      {format_paths(first)} (first step)"
                     + ("" if last == first else f"; {format_paths(last)} (last step)"))
    lines.append(f"run folder         {results['run_dir']}")
    lines += notes
    print("\n".join(lines), flush=True)


def is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig):
    from .launch import run_job_in_child, should_isolate
    if should_isolate():  # a local multirun: this job runs in a process of its own (randlora/launch.py)
        return run_job_in_child(cfg)
    from .models import SourceUnavailableError
    expected = (UserError, ValueError, SourceUnavailableError, FloatingPointError)
    message = None
    try:
        results = run(cfg)
    except expected as e:
        if os.environ.get("RANDLORA_TRACEBACK"):
            raise
        message = f"error: {e}"
    except Exception:
        if not is_multirun():
            raise
        import traceback
        traceback.print_exc()
        message = ""
    # outside the except blocks: the exception's traceback (which holds run's frame, and with it the
    # model) is gone, so the collection can free this job's memory before the next job starts
    _release_memory()
    if message is not None:
        if message:
            print(message, file=sys.stderr, flush=True)
        if is_multirun():  # one failed job must not stop the sweep; results.json says "failed"
            return float("nan")
        sys.exit(2)
    metric = cfg.get("optimized_metric")
    return results["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    from randlora.launch import await_job
    await_job()  # in a local multirun's fork server: returns in each forked job (randlora/launch.py)
    main()
