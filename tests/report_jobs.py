"""Fake jobs for the report's tests: results.json records and Hydra job folders laid out as a multirun
writes them (docs/results-schema.md)."""
import json
from pathlib import Path

HEAD = 650  # classifier head parameters, trained by every method

# (method, budget) -> (rank used, adapter params)
SIZES = {
    ("lora", 1e5): (4, 98_304),
    ("lora", 1e6): (40, 983_040),
    ("randlora", 1e5): (6, 99_120),
    ("randlora", 1e6): (64, 1_001_472),
}
# accuracies over seeds 1, 2, 3
ACC = {
    ("lora", 1e5): [0.80, 0.82, 0.87],
    ("lora", 1e6): [0.85, 0.86, 0.90],
    ("randlora", 1e5): [0.83, 0.84, 0.88],
    ("randlora", 1e6): [0.89, 0.91, 0.92],
}


def results(method="lora", budget=1e5, seed=1, acc=0.8, dataset="digits", model="tiny_vit", shots=None,
            fraction=1.0, status="completed", error=None, run_dir="/abs/run", r=None, adapter=None, **extra):
    if (method, budget) in SIZES:
        r_used, n_adapter = SIZES[(method, budget)]
    else:
        r_used, n_adapter = 8, 50_000
    r = r_used if r is None else r
    adapter = n_adapter if adapter is None else adapter
    total = 5_000_000 + adapter
    trainable = adapter + HEAD
    overrides = [f"adapter={method}", f"seed={seed}", f"data={dataset}"]
    if budget is not None:
        overrides.insert(1, f"adapter.budget={budget:g}")
    if shots is not None:
        overrides.append(f"data.shots={shots}")
    d = {
        "status": status, "error": error, "method": method, "model": model, "dataset": dataset,
        "task": "classification", "seed": seed, "r": r, "budget": budget, "shots": shots,
        "fraction": fraction, "sweep": "budget_sweep",
        "params": {"trainable": trainable, "total": total, "ratio": trainable / total,
                   "adapter": adapter, "lora_equivalent_rank": adapter / (2 * 768 * 16)},
        "metrics": {} if status != "completed" else {"test/acc": acc, "val/acc": acc + 0.01,
                                                     "train/loss": 1 - acc},
        "perf": {"step_time_s": 0.012 + 0.001 * seed, "samples_per_s": 2650.0,
                 "peak_memory_mb": 500.0 + seed},
        "run_dir": run_dir, "overrides": overrides,
        "config": {"adapter": {"name": method, "budget": budget}, "seed": seed, "data": {"name": dataset}},
    }
    d.update(extra)
    return d


def make_job(job_dir: Path, data=None):
    """A Hydra job folder: .hydra/ always, results.json when ``data`` is given."""
    hydra = job_dir / ".hydra"
    hydra.mkdir(parents=True)
    overrides = (data or {}).get("overrides") or ["adapter=lora", "seed=9"]
    (hydra / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (hydra / "config.yaml").write_text("seed: 1\n")
    (hydra / "hydra.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    if data is not None:
        data = dict(data, run_dir=str(job_dir.resolve()))
        (job_dir / "results.json").write_text(json.dumps(data, indent=2))
    return job_dir


def make_multirun(root: Path, stamp: str, jobs):
    folder = root / "logs" / "multiruns" / stamp
    folder.mkdir(parents=True)
    (folder / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for i, data in enumerate(jobs):
        make_job(folder / str(i), data)
    return folder
