"""The Hydra entry point: one job, from its config to its run folder.

    python train.py                                       # the quickstart (tiny ViT, digits, CPU)
    python train.py adapter=lora model=clip_vitb32 data=food101
    python train.py -m adapter=lora,randlora adapter.budget=1e5,4e5

``run(cfg)`` reads top to bottom: check the config, find where the job starts (fresh or a resume),
resolve every default, check every source, then data -> model -> adapter -> task -> trainer, fit, test,
and record. The stages live in ``randlora.training`` (``build``: the stages; ``config``: checks and
defaults; ``resume``: the starting point; ``folder``: the run folder; ``callbacks``, ``checkpoints``,
``loggers``). Every run folder holds ``results.json`` (docs/results-schema.md),
``checkpoints/last.ckpt`` (resumable), ``checkpoints/adapter.safetensors`` (adapter only), CSV
metrics and the Hydra config.
"""
from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from .errors import SourceUnavailableError, UserError
from .training.config import CONFIG_DIR
from .training.folder import resume_run_dir, safe_name_resolver
from .training.sweep import job_output_subdir, job_subdir

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


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


for _name, _fn, _cached in (("uniq", lambda: secrets.token_hex(3), True), ("project_root", lambda: PROJECT_ROOT, False),
                            ("bases_dtype_for", bases_dtype_for, False), ("resume_run_dir", resume_run_dir, False),
                            ("safe_name", safe_name_resolver, False), ("sweep_job_subdir", job_subdir, False),
                            ("sweep_output_subdir", job_output_subdir, False)):
    OmegaConf.register_new_resolver(_name, _fn, use_cache=_cached, replace=True)


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig
        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - outside a Hydra job: no overrides
        return []


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; return the results dict (also written to results.json)."""
    import lightning as L
    import torch

    from .training.loggers import build_loggers, finish_wandb, lightning_lines_once, publish_results
    from .models import build_model
    from .training import folder as rf
    from .training import resume
    from .training.build import (ParameterCounts, adapt, build_datamodule, build_task, compile_task, lowrank_summary,
                                 lowrank_wanted)
    from .training.checkpoints import check_checkpoint, load_trained_tensors
    from .results import new_record, provenance, summary_fields
    from .training.config import resolve, validate_config, world_size
    from .training.preflight import check_sources

    lightning_lines_once()  # Lightning's lines once, through Hydra's handlers (stdout and train.log)
    out = resume.output_dir(cfg)
    rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    results_path = out / "results.json"
    command = _overrides()
    results = new_record(cfg, run_dir=out, overrides=command, config=rf.config_record(cfg))
    attempt = {"started": rf.now(), "ended": None, "status": "running", "error": None, "pid": os.getpid(),
               "host": rf.hostname(), "command_overrides": command, "resumed_from": None}
    # resume=<run folder> continues an earlier run in its own folder: until this attempt has passed its
    # checks and starts, a failure must leave that run's results.json as it was
    continuing = resume.resume_dir(cfg) is not None and results_path.exists()
    started = locked = False
    try:
        locked = rank0 and _lock(out, cfg)  # only the process holding the folder's lock writes into it
        validate_config(cfg)  # cheap checks first: nothing is built before they pass
        rf.check_file_name(cfg.get("task_name", "train"), "task_name")
        start = resume.plan(cfg, command)  # a checkpoint is read weights-only and verified here
        if start.state is not None:
            validate_config(start.cfg)  # a resume's recorded settings
        composed = rf.config_record(start.cfg)
        cfg = resolve(start.cfg)  # every default made explicit: what is recorded is what trains
        results.update(summary_fields(cfg), overrides=start.overrides, config=rf.config_record(cfg))
        attempt["resumed_from"] = start.resumed_from
        check_sources(cfg)  # every unreadable source of the job in one message, before any download
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)

        data = build_datamodule(cfg)
        data.setup("fit")  # data errors (labels, shots, splits) surface before the model is loaded
        bundle = build_model(cfg.model)
        identity = {"model": rf.model_identity(cfg, bundle.backbone), "data": rf.data_identity(cfg, data)}
        if start.state is not None:  # another base model or dataset is refused before anything is written
            rf.check_identity(start.record, identity["model"], identity["data"],
                              "resume with the run's own model and data" if cfg.train else
                              "evaluate it with the model and data it was trained on")
        network, adapter = adapt(cfg, bundle, data)
        task = build_task(cfg, bundle, data, network, adapter)
        counts = ParameterCounts(task)  # whole-model counts, before any sharding
        if start.state is not None:  # a checkpoint of another adapter is refused before anything is written
            check_checkpoint(task.net, start.state)
            if not cfg.train:  # evaluation only: the checkpoint's trained tensors are the model to test
                load_trained_tensors(task, start.state)
        start.state = None
        results["compile"] = compile_task(cfg, task, verbose=rank0)

        match = adapter["budget_match"]
        if match and rank0:  # the achieved count and the rank mix
            print(f"[randlora] budget: {adapter['budget_summary']}", flush=True)
        if rank0:  # what a degenerate budget or scaling compares, and what to set instead
            for w in adapter["warnings"]:
                print(f"[randlora] {w['category']}: {w['message']}", file=sys.stderr, flush=True)
        results.update(r=adapter["r"], params=counts.summary(), identity=identity,
                       data=data.sampling_summary() if hasattr(data, "sampling_summary") else {},
                       attempts=rf.attempts_before(rf.read_results(results_path) if continuing else None) + [attempt],
                       provenance=provenance(results["config"], composed, devices=world_size(cfg.trainer)))
        if match:
            results["budget_match"] = match
        if adapter.get("source"):  # adapter.from_peft: the imported adapter's method, and where it came from
            results.update(method=adapter["method"], adapter_source=adapter["source"])
        if adapter["warnings"]:
            results["adapter_warnings"] = adapter["warnings"]
        started = True
        if rank0:
            out.mkdir(parents=True, exist_ok=True)
            rf.write_json_atomic(results_path, results)
            table = counts.table()
            if table:
                (out / "parameters.txt").write_text(table + "\n")

        loggers, notes = build_loggers(cfg, str(out), _run_name(cfg), r=results["r"])
        rf.use_durable_csv(loggers, start.resume_step, start.epoch if start.resume_step is not None else None)
        run_record = {"format": 1, "overrides": start.overrides, **identity,
                      "config": {k: v for k, v in results["config"].items() if k != "paths"}}
        trainer, perf = _trainer(cfg, task, out, loggers, run_record, results["compile"])
        t0 = time.time()
        if cfg.train:
            trainer.fit(task, datamodule=data, ckpt_path=start.ckpt, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        if cfg.test:
            for row in trainer.test(task, datamodule=data, verbose=False):
                metrics.update({k: float(v) for k, v in row.items()})
        results["metrics"] = _finite_check(metrics)
        results["params"] = counts.summary()  # final counts (DoRA-DR: after pruning)
        if rank0 and lowrank_wanted(cfg, task.net):  # "full rank matters": dW truncated to the equal-budget rank
            low = lowrank_summary(task.net, results["params"].get("lora_equivalent_rank"))
            if low is not None:
                results["lowrank"] = low
        results["perf"] = {**perf.summary(task.device), "train_time_s": time.time() - t0}
        from .adapters import bases_checksum
        results["bases_checksum"] = bases_checksum(task.net)
        results["status"] = "completed"
        attempt.update(status="completed", ended=rf.now(), metrics=results["metrics"])
        if rank0:
            rf.write_json_atomic(results_path, results)
    except BaseException as e:
        results["status"] = "failed"
        results["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        attempt.update(status="failed", ended=rf.now(), error=results["error"])
        if locked and (started or not continuing):
            try:
                rf.write_json_atomic(results_path, results)
            except OSError as w:
                status = (rf.read_results(results_path) or {}).get("status", "missing")
                print(f"[randlora] error: the failure could not be recorded in {results_path} ({type(w).__name__}: "
                      f"{w}); that file still reads {status!r}. The run failed with: {results['error']}",
                      file=sys.stderr, flush=True)
        raise
    else:
        # reporting comes after the completed results.json: a W&B or printing problem here is
        # reported, and never turns a finished job into a failed one
        reports = [("W&B summary", publish_results, (loggers, results))]
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


def _lock(out: Path, cfg) -> bool:
    """Take the run folder's lock (refused, naming the holder, when another process has it); a fresh
    run into a folder that already holds a run is refused, so nothing overwrites it."""
    from .training import folder as rf
    from .training.resume import resume_dir
    checked = rf.is_held(out)  # by the Hydra callback, before Hydra wrote into the folder
    rf.acquire(out)
    if resume_dir(cfg) is None and not checked and rf.holds_run(out):
        rf.release(out)  # the folder's results are another run's: leave them as they are
        raise rf.RunFolderError(f"{out} already holds a run (results.json / checkpoints): a new run would "
                                f"overwrite it; continue it with resume={out}, or use another output folder")
    return True


def _trainer(cfg, task, out: Path, loggers, run_record: dict, compiled: dict):
    """The Lightning Trainer of the resolved config with randlora's callbacks, and its PerfMonitor."""
    import lightning as L
    import torch

    from .training.build import trainer_kwargs
    from .training.callbacks import (AdapterCheckpoint, ConstantBuffersCheck, CudaGraphSteps, ExactResume,
                                     KillAtStep, NonFiniteGuard, PerfMonitor, RankHeatmap, RunCheckpoint)
    from .training.checkpoints import AtomicCheckpointIO, TrainedTensors
    ckdir = str(out / "checkpoints")
    c = cfg.callbacks
    every_steps = c.get("checkpoint_every_n_train_steps")
    perf = PerfMonitor()
    callbacks = [perf, NonFiniteGuard(ckdir), TrainedTensors(run_record), ConstantBuffersCheck(), RankHeatmap(),
                 ExactResume(int(cfg.seed), cuda_stream=not compiled.get("cudagraphs")),
                 RunCheckpoint(dirpath=ckdir, save_last=c.checkpoint.save_last, save_top_k=1,
                               every_n_epochs=None if every_steps else c.checkpoint.every_n_epochs,
                               every_n_train_steps=every_steps)]
    if compiled.get("cudagraphs"):
        callbacks.append(CudaGraphSteps())
    if c.get("kill_at_step") is not None:
        callbacks.append(KillAtStep(c.kill_at_step))
    if c.adapter_checkpoint:
        callbacks.append(AdapterCheckpoint(ckdir))
    tkw = trainer_kwargs(cfg)
    if tkw.get("strategy") == "fsdp":  # per-block units, replicated adapters (randlora/training/distributed.py)
        from .training.distributed import fsdp_strategy
        acc = tkw.get("accelerator", "auto")
        on_cpu = acc == "cpu" or (acc == "auto" and not torch.cuda.is_available())
        tkw["strategy"] = fsdp_strategy(task, "cpu" if on_cpu else "gpu")
    trainer = L.Trainer(**tkw, logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                        default_root_dir=str(out), enable_model_summary=False)
    return trainer, perf


def _run_name(cfg) -> str:
    return f"{cfg.adapter.method}-{cfg.model.name}-{cfg.data.name}-s{cfg.seed}"


def _finite_check(metrics: dict) -> dict:
    import math
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if any(k.endswith("loss") for k in bad):
        raise FloatingPointError(f"non-finite {', '.join(bad)} at the end of training; lower the learning "
                                 "rate or the adapter scaling (alpha)")
    return metrics


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
    match = results.get("budget_match")
    if match:
        lines.append(f"budget             {match['achieved']:,} adapter parameters for {match['budget']:,.0f} "
                     f"({100 * match['deviation']:+.2f} %), {match['knob']} per layer {match['rank_counts']}")
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
    from .training.loggers import to_log_files
    to_log_files("\n".join(lines))  # the run's train.log keeps the summary too


def _release_memory() -> None:
    """Free a finished job's tensors before the next job of a multirun (same process). Called by
    ``main`` after ``run`` has returned: run's own frame still holds the trainer and the model, and
    Lightning's trainer <-> module references form a cycle that only a collection breaks."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside a Hydra job
        return False


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig):
    from .training.launch import run_job_in_child, should_isolate
    from .training.sweep import current_job, skipped_objective
    job = current_job()  # a job of a sweep re-run into its folder (randlora/training/sweep.py)
    if job is not None and job.action == "skipped":
        return skipped_objective(cfg, job)
    if job is not None and job.action == "resumed":
        with open_dict(cfg):
            cfg.resume = str(job.folder)
    if should_isolate():  # a local multirun: this job runs in a process of its own (randlora/training/launch.py)
        return run_job_in_child(cfg)
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
    from .training.launch import await_job
    await_job()
    main()
