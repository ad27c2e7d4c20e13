"""The report's statistics (randlora/report/stats.py, keys.py) against scipy, on constructed sweeps:
95 % intervals over seeds, paired comparisons with a baseline, labels that name only what differs,
the registry's method order."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from randlora.report import collect, compare, compare_to_baseline, paired_test, summarize, t_interval, write_report
from randlora.report.keys import minimal_variants
from tests.report_jobs import make_multirun, results


def test_t_interval_matches_scipy():
    vals = [0.50, 0.60, 0.90, 0.70]
    lo, hi = t_interval(vals)
    exp = stats.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=stats.sem(vals))
    assert (lo, hi) == pytest.approx(exp)
    assert t_interval([0.5]) == (None, None) and t_interval([]) == (None, None)


def test_summary_interval_over_seeds_and_n1(tmp_path):
    accs = [0.50, 0.60, 0.90, 0.70]
    folder = make_multirun(tmp_path, "s", [results("vera", 1e5, seed=i, acc=a) for i, a in enumerate(accs)]
                           + [results("lora", 1e5, seed=0, acc=0.75)])
    by = {s["method"]: s for s in summarize(collect([folder]))}
    exp = stats.t.interval(0.95, 3, loc=np.mean(accs), scale=stats.sem(accs))
    assert (by["vera"]["ci_low"], by["vera"]["ci_high"]) == pytest.approx(exp)
    assert by["lora"]["ci_low"] is None and by["lora"]["n_seeds"] == 1
    md = write_report([folder], tmp_path / "out", plots=False)
    row = next(line for line in md.splitlines() if line.startswith("| vera |"))
    assert f"[{exp[0] * 100:.2f}, {exp[1] * 100:.2f}]" in row
    lora = next(line for line in md.splitlines() if line.startswith("| lora |"))
    assert "| n=1 |" in lora


def test_paired_tests_match_scipy():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.9, size=7)
    other = base + rng.normal(0.01, 0.02, size=7)
    got = paired_test(other - base)  # 7 pairs: Wilcoxon signed-rank
    ref = stats.wilcoxon(other, base)
    assert got["test"] == "wilcoxon" and got["p"] == pytest.approx(ref.pvalue) and got["statistic"] == ref.statistic
    got = paired_test((other - base)[:4])  # 4 pairs: paired t
    ref = stats.ttest_rel(other[:4], base[:4])
    assert got["test"] == "t" and got["p"] == pytest.approx(ref.pvalue) and got["statistic"] == pytest.approx(ref.statistic)
    got = paired_test([0.02, 0.02, 0.02])  # no spread: t undefined, sign test
    assert got["test"] == "sign" and got["p"] == pytest.approx(stats.binomtest(3, 3).pvalue)
    assert paired_test([0.02])["test"] is None and paired_test([0.02])["note"] == "1 pair: no test"
    assert paired_test([0.0] * 8)["p"] == 1.0


def test_compare_counts_wins_ties_losses_and_interval():
    pairs = [(0.80, 0.85), (0.70, 0.70004), (0.90, 0.88), (0.60, 0.65)]
    c = compare(pairs, tie=0.0005)
    assert (c["n"], c["wins"], c["ties"], c["losses"]) == (4, 2, 1, 1)
    d = np.array([o - b for b, o in pairs])
    assert c["mean_diff"] == pytest.approx(d.mean())
    assert (c["ci_low"], c["ci_high"]) == pytest.approx(stats.t.interval(0.95, 3, loc=d.mean(), scale=stats.sem(d)))
    loss = compare([(1.0, 0.8), (1.0, 0.9)], higher=False)  # a loss metric: lower is better
    assert (loss["wins"], loss["losses"]) == (2, 0)


def _seeds(method, dataset, means, budget=1e5, r=None):
    return [results(method, budget, seed=s, acc=m, dataset=dataset, r=r) for s, m in enumerate(means, 1)]


def test_baseline_comparison_over_datasets_is_wilcoxon_on_dataset_means(tmp_path):
    """Seven datasets, both methods at one budget: seven pairs of per-dataset means over three seeds."""
    rng = np.random.default_rng(1)
    jobs, lora_means, rand_means = [], [], []
    for i in range(7):
        lo = rng.uniform(0.6, 0.9, 3)
        ra = lo + rng.normal(0.01, 0.02, 3)
        if i == 3:
            ra = lo.copy()  # a tie
        jobs += _seeds("lora", f"ds{i}", lo) + _seeds("randlora", f"ds{i}", ra)
        lora_means.append(lo.mean())
        rand_means.append(ra.mean())
    folder = make_multirun(tmp_path, "w", jobs)
    (c,) = compare_to_baseline(summarize(collect([folder])), "lora")
    d = np.array(rand_means) - np.array(lora_means)
    assert c["method"] == "randlora" and c["n"] == 7 and len(c["datasets"]) == 7
    assert c["ties"] == 1 and c["wins"] == int((d > 0.0005).sum()) and c["losses"] == int((d < -0.0005).sum())
    assert c["test"] == "wilcoxon" and c["p"] == pytest.approx(stats.wilcoxon(d).pvalue)
    assert c["mean_diff"] == pytest.approx(d.mean())
    md = write_report([folder], tmp_path / "out", plots=False)
    line = next(x for x in md.split("## Paired comparison with lora", 1)[1].splitlines() if "RandLoRA" in x)
    assert f"| 7 | {c['wins']} / 1 / {c['losses']} |" in line and "| Wilcoxon |" in line


def test_pairing_by_budget_and_with_the_baselines_only_size(tmp_path):
    """A budget sweep pairs budget with budget; a fixed-rank table pairs RandLoRA-6 with the LoRA-32 that
    is the baseline's only size on each dataset; a size with several baseline candidates is left unpaired."""
    jobs = []
    for b, (lo, ra) in {4e3: (0.7, 0.72), 2e4: (0.75, 0.74), 8e4: (0.8, 0.83)}.items():
        jobs += _seeds("lora", "digits", [lo, lo + 0.01], budget=b) + _seeds("randlora", "digits", [ra, ra + 0.01], budget=b)
    jobs += _seeds("vera", "digits", [0.6, 0.61], budget=1e3)  # no LoRA at 1K, and LoRA has 3 sizes here
    for ds, (lo, ra) in {"cars": (0.77, 0.83), "dtd": (0.767, 0.789)}.items():
        jobs += _seeds("lora", ds, [lo], budget=None, r=32) + _seeds("randlora", ds, [ra], budget=None, r=6)
    folder = make_multirun(tmp_path, "p", jobs)
    by = {c["method"]: c for c in compare_to_baseline(summarize(collect([folder])), "lora")}
    rl = by["randlora"]
    assert rl["n"] == 5 and (rl["wins"], rl["ties"], rl["losses"]) == (4, 0, 1)
    pairs = {(ds, b["budget"] or b["r"], o["budget"] or o["r"]) for ds, _, b, o in rl["pairs"]}
    assert pairs == {("digits", 4e3, 4e3), ("digits", 2e4, 2e4), ("digits", 8e4, 8e4), ("cars", 32, 6), ("dtd", 32, 6)}
    assert by["vera"]["n"] == 0 and len(by["vera"]["unpaired"]) == 1  # nothing to pair with
    md = write_report([folder], tmp_path / "out", plots=False)
    assert "no lora size to pair with" in md


def test_labels_name_only_what_differs(tmp_path):
    """`lora [sweep=budget_sweep trainer.max_epochs=1]` repeated overrides every run shares."""
    def job(method, seed, acc, *more):
        r = results(method, 1e5, seed=seed, acc=acc)
        r["overrides"] += ["sweep=budget_sweep", "trainer.max_epochs=1", *more]
        return r
    folder = make_multirun(tmp_path, "l", [job("lora", 1, 0.8), job("randlora", 1, 0.82), job("lora", 2, 0.81),
                                           job("randlora", 1, 0.85, "optim.lr=0.001")])
    summary = summarize(collect([folder]))
    assert sorted(s["label"] for s in summary) == ["lora", "randlora", "randlora [optim.lr=0.001]"]
    assert {s["variant"] for s in summary} == {"sweep=budget_sweep trainer.max_epochs=1",
                                              "optim.lr=0.001 sweep=budget_sweep trainer.max_epochs=1"}
    md = write_report([folder], tmp_path / "out", plots=False)
    assert "[sweep=" not in md and "trainer.max_epochs=1]" not in md
    assert "Left out of the labels, as every configuration of its model has them: `sweep=budget_sweep`, " \
        "`trainer.max_epochs=1`." in md
    assert minimal_variants(["a=1 b=2", "a=1 b=3", "a=1"]) == {"a=1 b=2": "b=2", "a=1 b=3": "b=3", "a=1": ""}
    # another model's runs (another sweep, without these overrides) do not bring them back
    other = make_multirun(tmp_path, "m", [results("lora", 1e5, seed=1, acc=0.7, model="vit_b16")])
    labels = {(s["model"], s["label"]) for s in summarize(collect([folder, other]))}
    assert labels == {("tiny_vit", "lora"), ("tiny_vit", "randlora"), ("tiny_vit", "randlora [optim.lr=0.001]"),
                      ("vit_b16", "lora")}


def test_method_order_is_the_registrys(tmp_path):
    from randlora.adapters import METHODS
    methods = ["nola", "dora_dr", "vera", "dora", "randlora", "lora", "full"]
    folder = make_multirun(tmp_path, "o", [results(m, None, seed=1, acc=0.8, r=4) for m in methods])
    got = [s["method"] for s in summarize(collect([folder]))]
    assert got == [m for m in METHODS if m in methods] == ["full", "lora", "dora", "vera", "randlora", "dora_dr", "nola"]
