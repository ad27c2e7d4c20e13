"""Shared helpers for framework tests: compose the real Hydra config and run jobs."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
FAST = ["trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1"]


def compose_cfg(overrides, out_dir=None):
    import randlora.train  # noqa: F401  (registers the resolvers)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    if out_dir is not None:
        from omegaconf import open_dict
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
    return cfg


def refused_in_one_line(overrides, message: str) -> ValueError:
    """The config check's refusal of ``overrides``: one line (under 1,500 characters) that contains
    ``message``; returns the exception."""
    import pytest

    from randlora.training.config import validate_config
    cfg = compose_cfg(overrides)
    with pytest.raises(ValueError) as e:
        validate_config(cfg)
    text = str(e.value)
    assert message in text
    assert "\n" not in text and len(text) < 1500
    return e.value


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", WANDB_MODE=e.get("WANDB_MODE", "offline"), HF_HUB_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    e.pop("WANDB_API_KEY", None)
    return e


def train_cli(args, cwd=ROOT, timeout=600, extra_env=None):
    e = env()
    if extra_env:
        e.update(extra_env)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def results(run_dir) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def sweep_params(overrides) -> dict:
    """{key: [values]} of the sweep a composed config would run (its ``hydra.sweeper.params``, with
    interpolations such as ``${paper_datasets.vision}`` resolved against the config)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    import randlora.train  # noqa: F401  (registers the resolvers)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    out = {}
    for k, v in (OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=False) or {}).items():
        v = str(v)
        if v.startswith("${") and v.endswith("}"):
            v = str(OmegaConf.select(cfg, v[2:-1]))
        out[k] = v.split(",")
    return out


class Interrupted(Exception):
    """Raised by the ``interrupt`` fixture (tests/conftest.py): a run stopped in-process."""


# -------------------------------------------------- comparing a resumed run with an uninterrupted one
def _csv_rows(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # wall-clock timings and memory are the only things that may differ
    return [{k: v for k, v in r.items() if v != "" and not k.startswith("perf/")} for r in rows]


def _tensors(run_dir):
    from safetensors.torch import load_file
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    out = {f"adapter/{k}": v for k, v in load_file(str(run_dir / "checkpoints" / "adapter.safetensors")).items()}
    out.update({f"ckpt/{k}": v for k, v in ck["state_dict"].items()})
    for i, st in ck["optimizer_states"][0]["state"].items():
        out.update({f"adam/{i}/{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out, ck["global_step"]


def _quality(res):
    return {k: v for k, v in res["metrics"].items() if not k.startswith("perf/")}


def assert_same_run(ref, resumed):
    a, b = results(ref), results(resumed)
    assert b["status"] == "completed"
    assert _quality(a) == _quality(b) and "train/loss_epoch" in _quality(a)
    ta, sa = _tensors(ref)
    tb, sb = _tensors(resumed)
    assert sa == sb and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert _csv_rows(ref) == _csv_rows(resumed)
