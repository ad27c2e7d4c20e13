"""The configs say each fact once and agree with the code that reads them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from randlora.adapters import REGISTRY
from randlora.training.config import FRAMEWORK_KEYS
from tests.helpers import ROOT, compose_cfg, sweep_params

CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("method", ["full", *REGISTRY])
def test_every_method_has_an_adapter_config_listing_exactly_its_options(method):
    """configs/adapter/<method>.yaml states every option of the method's options class (so a reader sees
    the defaults the paper uses) and nothing the method does not take; the rest are framework keys."""
    cfg = compose_cfg([f"adapter={method}"]).adapter
    assert cfg.method == method
    options = set(cfg) - FRAMEWORK_KEYS
    expected = set() if method == "full" else set(REGISTRY[method].options.names())
    assert options == expected, f"adapter/{method}.yaml: missing {expected - options}, unknown {options - expected}"


def test_the_paper_dataset_lists_are_written_once_and_exist():
    lists = compose_cfg(["+paper=datasets"]).paper_datasets
    vl, vision = lists.vision_language.split(","), lists.vision.split(",")
    assert len(vl) == 22 and vision == [d for d in vl if d != "imagenet"]
    assert all((CONFIGS / "data" / f"{d}.yaml").is_file() for d in vl)
    # no other config pastes a list of the paper's datasets
    pasted = re.compile(r"(?:\b(?:" + "|".join(vl) + r")\b\s*,\s*){5,}")
    offenders = [str(p.relative_to(ROOT)) for p in CONFIGS.rglob("*.yaml")
                 if p.name != "datasets.yaml" and pasted.search(p.read_text())]
    assert offenders == []
    assert sweep_params(["experiment=paper/clip_b32_vl"])["data"] == vl
    assert sweep_params(["experiment=paper/dinov2_vision"])["data"] == vision


def test_a_figure_sweep_is_its_paper_experiment():
    """sweep=fig3_clip_vl and experiment=paper/clip_b32_vl are one definition (they had drifted: the sweep
    left out NoLA and ran in fp32 with another micro-batch)."""
    for sweep, experiment in (("fig3_clip_vl", "paper/clip_b32_vl"), ("fig2_vision", "paper/dinov2_vision")):
        a, b = compose_cfg([f"sweep={sweep}"]), compose_cfg([f"experiment={experiment}"])
        assert a == b
        assert sweep_params([f"sweep={sweep}"]) == sweep_params([f"experiment={experiment}"])


@pytest.mark.integration
def test_commonsense_experiments_differ_only_in_model_method_rank_and_alpha():
    names = sorted(p.stem for p in (CONFIGS / "experiment" / "paper").glob("commonsense_*.yaml"))
    assert len(names) == 21
    for name in names:
        text = (CONFIGS / "experiment" / "paper" / f"{name}.yaml").read_text()
        body = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(body) <= 8, f"{name}: the shared settings belong in the _commonsense bases"
        method, r, model = re.fullmatch(r"commonsense_([a-z]+?)(\d+)_(\w+)", name).groups()
        cfg = compose_cfg([f"experiment=paper/{name}"])
        assert cfg.adapter.method == method and cfg.adapter.r == int(r)
        assert cfg.adapter.alpha == 2 * int(r)  # the paper's base coefficient 2 (alpha = 2r) for every method
        assert cfg.effective_batch_size == 16 and cfg.data.epochs == 3 and cfg.task.num_beams == 4
        assert cfg.data.batch_size == (4 if model == "llama3" else 16)


def test_vision_only_clip_takes_each_methods_vision_learning_rate():
    """The CLIP vision-only experiment used to set lr_by_task.clip = 1e-2 for every method of its sweep,
    which trained full fine-tuning at 1e-2 (the paper: 1e-5) and NoLA at 1e-2 (1e-3)."""
    from randlora.training.config import effective_lr
    lrs = {m: effective_lr(compose_cfg(["experiment=paper/clip_b32_vision", f"adapter={m}"]))
           for m in ("full", "lora", "randlora", "vera", "nola")}
    assert lrs == {"full": 1e-5, "lora": 1e-2, "randlora": 1e-2, "vera": 1e-2, "nola": 1e-3}
    vl = {m: effective_lr(compose_cfg(["experiment=paper/clip_b32_vl", f"adapter={m}"])) for m in ("full", "lora")}
    assert vl == {"full": 1e-5, "lora": 1e-3}


def test_no_config_file_is_unused():
    """Every YAML file is a group option, or a base some other config includes."""
    text = "\n".join(p.read_text() for p in CONFIGS.rglob("*.yaml"))
    bases = [p for p in CONFIGS.rglob("_*.yaml")] + [CONFIGS / "paper" / "datasets.yaml"]
    for p in bases:
        rel = p.relative_to(CONFIGS).with_suffix("").as_posix()
        short = Path(rel).name
        assert f"/{rel}" in text or re.search(rf"^\s*-\s*{short}\s*$", text, re.M), f"{rel} is included by nothing"
