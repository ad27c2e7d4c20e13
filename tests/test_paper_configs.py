"""Every paper-scale experiment composes for every method in its sweep, and the trainable-parameter
counts of the architectures (built on the meta device: no weights, no memory) match the paper."""
from __future__ import annotations

import pytest

from randlora.adapters import count_trainable, inject
from randlora.models import meta_backbone
from randlora.training.build import adapter_kwargs
from tests import helpers
from tests.helpers import compose_cfg

VISION = ["clip_b32_vl", "clip_l14_vl", "clip_h14_vl", "dinov2_vision", "clip_b32_vision", "sparse_bases_ablation"]


def sweep_params(name):
    return helpers.sweep_params([f"experiment=paper/{name}"])


def adapter_count(cfg) -> int:
    model = meta_backbone(cfg.model)
    assert model is not None
    targets = list(cfg.model.targets)
    if cfg.task.get("text_tower") == "frozen":
        targets = r"visual\..*\.(" + "|".join(targets) + ")"
    method, kw = adapter_kwargs(cfg.adapter, targets)
    inject(model, method, **kw)
    return count_trainable(model)


@pytest.mark.integration
@pytest.mark.parametrize("name", VISION)
def test_paper_experiment_composes_for_every_method(name):
    params = sweep_params(name)
    methods = params.get("adapter", [None])
    bases = params.get("+basis", [None])
    for m in methods:
        for b in bases:
            over = [f"experiment=paper/{name}"] + ([f"adapter={m}"] if m else []) + ([f"+basis={b}"] if b else [])
            cfg = compose_cfg(over + [f"data={params['data'][0]}"])
            assert cfg.group.startswith("paper_") and cfg.effective_batch_size == 128
            assert cfg.adapter.method in ("full", "lora", "vera", "randlora", "nola")
            if m == "paper/randlora10":
                assert cfg.adapter.r == 10 and cfg.adapter.alpha == 10.0
            if b == "s100":
                assert cfg.adapter.distribution == "sparse" and cfg.adapter.sparsity == 100
    assert set(params.get("setting", ["k1"])) <= {"k1", "k2", "k4", "k16", "half", "full"}


def test_clip_b32_vl_counts_match_paper():
    """randlora-method.md §1.7: RandLoRA-6 ~5.2M vs LoRA-32 ~6.9M trainable on CLIP-B/32 VL."""
    counts = {m: adapter_count(compose_cfg(["experiment=paper/clip_b32_vl", f"adapter={m}"]))
              for m in ("randlora", "lora", "vera", "nola")}
    assert 5.0e6 < counts["randlora"] < 5.4e6
    assert 6.7e6 < counts["lora"] < 7.1e6
    # 72 adapted matrices: 12 vision + 12 text blocks x (in_proj, c_fc, c_proj); NoLA trains 2k each
    assert counts["vera"] < 0.2e6 and counts["nola"] == 2 * 1024 * 72
    # one in_proj adapter of the vision tower: n = ceil(768/6) = 128 bases, 128 x (6 + 768)
    assert 128 * (6 + 768) == 99072


@pytest.mark.integration
def test_larger_clips_build_and_are_ordered():
    b32 = adapter_count(compose_cfg(["experiment=paper/clip_b32_vl", "adapter=randlora"]))
    l14 = adapter_count(compose_cfg(["experiment=paper/clip_l14_vl", "adapter=paper/randlora10"]))
    h14 = adapter_count(compose_cfg(["experiment=paper/clip_h14_vl", "adapter=paper/randlora10"]))
    lora_l14 = adapter_count(compose_cfg(["experiment=paper/clip_l14_vl", "adapter=lora"]))
    assert b32 < l14 < h14
    assert 0.5 < l14 / lora_l14 < 1.2  # RandLoRA-10 sits near LoRA-32's budget on L/14


def test_vision_only_adapts_the_image_tower_only():
    cfg = compose_cfg(["experiment=paper/clip_b32_vision", "adapter=lora"])
    full = adapter_count(compose_cfg(["experiment=paper/clip_b32_vl", "adapter=lora"]))
    assert 0 < adapter_count(cfg) < full
