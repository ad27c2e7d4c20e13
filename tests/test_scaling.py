"""How each method's scaling, and the update it sets, moves as a budget changes the rank (docs/budgets.md §2),
and the warnings for the regimes where an equal budget compares something else (§3).

The rules checked here, with the adapter configs' own alpha (configs/adapter/*.yaml):

* LoRA, alpha = 1 (the paper's vision convention): s = 1 / r per layer; Adam's first step moves dW by
  ~ s sqrt(r), i.e. it falls as 1 / sqrt(r).
* VeRA, alpha unset: s = 1 at every r; the Kaiming-scaled bases keep B diag(d) A the same size, so the first
  step's dW is the same size at every r. alpha = 1 (s = 1 / r) shrinks it as 1 / r and warns.
* RandLoRA, alpha = 10 (the paper's vision preset): s = 10 / r; n ~ m / r unit-variance terms of rank r make
  the first step's dW grow as 1 / r. ``scaling=s`` holds s and the step size at every budget.
"""
import copy
import warnings

import pytest
import torch

from randlora.adapters import (BudgetWarning, ScalingWarning, adapted_layers, inject, match_budget,
                               scaling_warnings)
from tests.helpers import compose_cfg
from tests.tiny_models import VIT_TARGETS, budget_vit

SWEEP_BUDGETS = (5e3, 1e4, 2e4)  # configs/sweep/budget_sweep.yaml


@pytest.fixture(scope="module")
def vit():
    return budget_vit()


@pytest.fixture(scope="module")
def config_alpha():
    """{method: adapter.alpha of its config} (None: the method's default)."""
    return {m: compose_cfg([f"adapter={m}"]).adapter.alpha for m in ("lora", "vera", "randlora")}


def record(fn, *args, **kw):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [w for w in got if issubclass(w.category, BudgetWarning)]


def scalings(model):
    return {name: layer.update.scaling for name, layer in adapted_layers(model)}


def first_step_update(model, lr=1e-2, seed=0) -> float:
    """Mean over the adapted layers of ||dW||_F / ||W0||_F after one AdamW step on a fixed batch (the adapter
    trains alone: every other parameter is frozen)."""
    torch.manual_seed(seed)
    x = torch.randn(8, 3, 32, 32)
    params = [p for _, layer in adapted_layers(model) for p in layer.update.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model(x).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        ratios = [float(layer.update.delta_weight().norm() / layer.base_layer.weight.norm())
                  for _, layer in adapted_layers(model)]
    return sum(ratios) / len(ratios)


def adapted(vit, method, **options):
    model = inject(copy.deepcopy(vit), method, target_modules=VIT_TARGETS, **options)
    for p in model.parameters():
        p.grad = None
    return model


# ------------------------------------------------------------------ the documented rule, with the configs' alpha
def test_config_defaults_are_the_documented_conventions(config_alpha):
    """LoRA 1 / r (alpha = 1), VeRA 1 (alpha unset: VeRA's own, for Kaiming bases), RandLoRA 10 / r (alpha = 10)."""
    assert config_alpha == {"lora": 1.0, "vera": None, "randlora": 10.0}


@pytest.mark.parametrize("budget", SWEEP_BUDGETS)
def test_scaling_at_the_sweeps_budgets_follows_the_rule(vit, config_alpha, budget):
    rule = {"lora": lambda r: 1 / r, "vera": lambda r: 1.0, "randlora": lambda r: 10 / r}
    for method, expect in rule.items():
        alpha = config_alpha[method]
        m, _ = record(match_budget, vit, method, budget, target_modules=VIT_TARGETS,
                      **({} if alpha is None else {"alpha": alpha}))
        for name, s in scalings(inject(copy.deepcopy(vit), method, **m)).items():
            assert s == pytest.approx(expect(m.ranks[name])), (method, budget, name)


def test_first_step_update_size_vs_rank(vit):
    """The size of Adam's first step of dW, as a budget sweep moves r with alpha fixed."""
    lora = {r: first_step_update(adapted(vit, "lora", r=r, alpha=1.0)) for r in (1, 4, 16)}
    # ~ s sqrt(r) = 1 / sqrt(r): x 1/2 per x4 in r
    assert lora[4] / lora[1] == pytest.approx(0.5, rel=0.25) and lora[16] / lora[4] == pytest.approx(0.5, rel=0.25)

    vera = {r: first_step_update(adapted(vit, "vera", r=r)) for r in (64, 256, 1024)}
    assert max(vera.values()) / min(vera.values()) < 1.3, vera  # s = 1: flat in r
    vera_1 = {r: first_step_update(adapted(vit, "vera", r=r, alpha=1.0)) for r in (64, 256, 1024)}
    for r in vera_1:  # alpha = 1: the same update times 1 / r, or less (tiny gradients meet Adam's eps)
        assert vera_1[r] / vera[r] <= 1.05 / r, (r, vera_1[r], vera[r])
    assert vera_1[1024] < vera_1[256] / 4 < vera_1[64] / 16

    rand = {r: first_step_update(adapted(vit, "randlora", r=r, alpha=10.0)) for r in (1, 2, 4, 8)}
    for lo, hi in ((1, 2), (2, 4), (4, 8)):  # ~ s = 10 / r: x 1/2 per x2 in r
        assert rand[hi] / rand[lo] == pytest.approx(0.5, rel=0.3), rand
    fixed = {r: first_step_update(adapted(vit, "randlora", r=r, alpha=10.0 / 6 * r)) for r in (1, 2, 4, 8)}
    assert max(fixed.values()) / min(fixed.values()) < 1.6, fixed  # alpha / r held: about flat
    assert rand[1] / fixed[1] == pytest.approx(6.0, rel=0.01)  # r = 1: s = 10 against the preset's 10 / 6


# ------------------------------------------------------------------ warnings: the degenerate cases, and only those
def test_sweep_cells_warn_only_where_degenerate(vit, config_alpha):
    """At the sweep's budgets with the configs' alpha: LoRA and RandLoRA are silent; VeRA says its budget buys
    entries of d, not rank (r > min(out, in) = 64), and nothing about its scaling."""
    for budget in SWEEP_BUDGETS:
        for method in ("lora", "randlora", "vera"):
            alpha = config_alpha[method]
            m, got = record(match_budget, vit, method, budget, target_modules=VIT_TARGETS,
                            **({} if alpha is None else {"alpha": alpha}))
            if method != "vera":
                assert got == [] and m.warnings == (), (method, budget, m.warnings)
                assert method == "lora" or min(m.ranks.values()) >= 2  # RandLoRA: r = 1 nowhere
                continue
            assert [w.category for w in got] == [BudgetWarning], [str(w.message) for w in got]
            assert m.warning_categories == ("BudgetWarning",)
            assert "buys" in m.warnings[0] and "not rank" in m.warnings[0] and "flat" in m.warnings[0]


def test_scaling_warnings_name_the_comparison_and_the_fix(vit):
    # VeRA at the RandLoRA paper's alpha = 1 on Kaiming bases
    m, got = record(match_budget, vit, "vera", 5e3, target_modules=VIT_TARGETS, alpha=1.0)
    assert [w.category for w in got] == [BudgetWarning, ScalingWarning]
    assert m.warning_categories == ("BudgetWarning", "ScalingWarning")
    msg = str(got[1].message)
    assert "246x smaller than VeRA's own" in msg and "head alone" in msg and "Leave alpha unset" in msg
    # RandLoRA matched to r = 1 with the preset's fixed alpha = 10
    m, got = record(match_budget, vit, "randlora", 4e4, target_modules=VIT_TARGETS, alpha=10.0)
    assert [w.category for w in got] == [ScalingWarning] and 1 in m.rank_counts
    msg = str(got[0].message)
    assert "randlora at r=1" in msg and "scaling alpha / r = 10" in msg and "pass scaling=" in msg
    # the same budget with the scaling held: r = 1 is still noted (lambda redundant), not as a scaling problem
    m, got = record(match_budget, vit, "randlora", 4e4, target_modules=VIT_TARGETS, scaling=10 / 6)
    assert [w.category for w in got] == [BudgetWarning] and "scaling alpha / r" not in m.warnings[0]


def test_scaling_warnings_without_a_budget():
    assert len(scaling_warnings("vera", {"r": 256, "alpha": 1.0})) == 1
    assert "256x smaller" in scaling_warnings("vera", {"r": 256, "alpha": 1.0})[0]
    assert scaling_warnings("vera", {"r": 256}) == []  # alpha unset: s = 1
    assert scaling_warnings("vera", {"r": 8, "alpha": 1.0}) == []  # s = 0.125 >= 0.1
    assert scaling_warnings("lora", {"r": 64, "alpha": 1.0}) == []
    assert scaling_warnings("randlora", {"r": 6, "alpha": 10.0, "target_modules": VIT_TARGETS}) == []


def test_framework_records_the_warnings(vit):
    """``inject_adapter`` returns the warnings (class and message) that train.py prints and writes to results.json
    (``adapter_warnings``, also for a rank set directly); the record passes the schema."""
    from omegaconf import OmegaConf

    from randlora import results as rf
    from randlora.tasks.base import Network
    from randlora.training.build import inject_adapter

    def run(overrides):
        cfg = compose_cfg(["adapter=vera", *overrides])
        a = OmegaConf.to_container(cfg.adapter, resolve=False)
        a["seed"] = 0
        return inject_adapter(Network(copy.deepcopy(vit), VIT_TARGETS), OmegaConf.create(a))

    assert run(["adapter.r=32"])["warnings"] == []
    got = run(["adapter.r=256", "adapter.alpha=1"])["warnings"]
    assert [w["category"] for w in got] == ["ScalingWarning"] and "256x smaller" in got[0]["message"]
    info = run(["adapter.budget=5e3", "adapter.alpha=1"])
    assert [w["category"] for w in info["warnings"]] == ["BudgetWarning", "ScalingWarning"]
    assert [w["message"] for w in info["warnings"]] == info["budget_match"]["warnings"]
    rec = {**rf.new_record({"adapter": {"method": "vera"}, "seed": 1}, run_dir="/tmp/x"),
           "adapter_warnings": info["warnings"], "budget_match": info["budget_match"]}
    assert not [e for e in rf.check(rec) if "adapter_warnings" in e or "budget_match" in e]
    bad = {**rec, "adapter_warnings": [{"category": "BudgetWarning"}]}
    assert [e for e in rf.check(bad) if "adapter_warnings" in e]


def test_config_check_matches_with_the_runs_tolerance_and_stays_quiet():
    """The meta-device config check matches the budget as the run will (``adapter.budget_tolerance``,
    ``adapter.scaling``) and leaves the warnings to the run, which prints and records them once."""
    from randlora.training.config import validate_config
    with pytest.raises(ValueError, match="below the smallest lora adapter"):  # 3,584 is +3.9 %
        validate_config(compose_cfg(["adapter=lora", "adapter.budget=3450"]))
    validate_config(compose_cfg(["adapter=lora", "adapter.budget=3450", "adapter.budget_tolerance=0.05"]))
    with pytest.raises(ValueError, match="give alpha or scaling, not both"):
        validate_config(compose_cfg(["adapter=randlora", "adapter.budget=4e4", "adapter.scaling=1.5"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        validate_config(compose_cfg(["adapter=vera", "adapter.budget=5e3", "adapter.alpha=1"]))
        validate_config(compose_cfg(["adapter=randlora", "adapter.budget=4e4", "adapter.alpha=null",
                                     "adapter.scaling=1.5"]))


@pytest.mark.integration  # runs the training pipeline (one batch)
def test_a_run_records_and_prints_its_warnings_once(tmp_path, capsys):
    """A VeRA run at the old alpha = 1 (no budget): results.json has the ScalingWarning in ``adapter_warnings``
    and the record passes the schema; stderr has it once."""
    from randlora import results as rf
    from randlora.train import run
    res = run(compose_cfg(["model=tiny_vit", "adapter=vera", "adapter.r=256", "adapter.alpha=1", "trainer=cpu",
                           "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                           "trainer.limit_test_batches=1"], tmp_path))
    assert [w["category"] for w in res["adapter_warnings"]] == ["ScalingWarning"]
    assert "256x smaller than VeRA's own" in res["adapter_warnings"][0]["message"]
    assert "budget_match" not in res and not rf.check(res)
    assert capsys.readouterr().err.count("256x smaller than VeRA's own") == 1
