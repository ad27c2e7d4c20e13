"""Shared helpers for framework tests: compose the real Hydra config and run jobs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
