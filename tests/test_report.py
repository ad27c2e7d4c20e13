"""The results report (randlora/report/) on fake multirun folders laid out as in docs/results-schema.md."""
import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from randlora import report
from randlora.report import ReportError, collect, summarize, write_report
from tests.report_jobs import ACC, HEAD, SIZES, make_multirun, results

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
@pytest.fixture
def sweep(tmp_path):
    """2 methods x 2 budgets x 3 seeds, plus a failed, an unfinished and a still-running job."""
    jobs = [results(m, b, seed=s + 1, acc=ACC[(m, b)][s]) for (m, b) in SIZES for s in range(3)]
    jobs.append(results("randlora", 1e6, seed=4, status="failed",
                        error="RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"))
    jobs.append(None)  # unfinished: .hydra/ but no results.json
    jobs.append(results("lora", 1e6, seed=5, status="running"))
    return make_multirun(tmp_path, "2025-01-02_10-00-00_a1b2c3", jobs)


@pytest.fixture
def second(tmp_path):
    """Another multirun: a fourth seed of lora@1e5 on digits, and both methods on a second dataset."""
    jobs = [results("lora", 1e5, seed=4, acc=0.85)]
    jobs += [results(m, 1e5, seed=s, acc=0.6 + 0.01 * s + (0.05 if m == "randlora" else 0), dataset="cifar10")
             for m in ("lora", "randlora") for s in (1, 2)]
    return make_multirun(tmp_path, "2025-01-03_09-30-00_d4e5f6", jobs)


@pytest.fixture
def shots_sweep(tmp_path):
    jobs = []
    for m, bonus in (("lora", 0.0), ("randlora", 0.03)):
        for s in (1, 2):
            for k in (1, 2, 4, 16):
                jobs.append(results(m, 1e5, seed=s, shots=k, acc=0.3 + 0.03 * k + bonus))
            for f in (0.5, 1.0):
                jobs.append(results(m, 1e5, seed=s, fraction=f, acc=0.8 + 0.1 * f + bonus))
    return make_multirun(tmp_path, "2025-01-04_08-00-00_0a1b2c", jobs)


def by_config(summary):
    return {(s["method"], s["budget"], s["dataset"]): s for s in summary}


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "randlora.report", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


# --------------------------------------------------------------------------------------------

def test_collect_finds_every_job_with_its_status(sweep):
    rows = collect([sweep])
    assert len(rows) == 15
    statuses = sorted(r["status"] for r in rows)
    assert statuses.count("completed") == 12
    assert {"failed", "unfinished", "running"} <= set(statuses)
    unfinished = next(r for r in rows if r["status"] == "unfinished")
    assert Path(unfinished["run_dir"]).name == "13"
    assert unfinished["overrides"] == ["adapter=lora", "seed=9"]  # read from .hydra/overrides.yaml


def test_table_two_methods_two_budgets(sweep):
    summary = summarize(collect([sweep]), "test/acc")
    assert len(summary) == 4
    table = by_config(summary)
    for (m, b), (r, adapter) in SIZES.items():
        s = table[(m, b, "digits")]
        assert s["trainable"] == adapter + HEAD
        assert s["adapter_params"] == adapter
        assert s["r"] == r
        assert s["n_seeds"] == 3 and s["seeds"] == [1, 2, 3]
        assert s["mean"] == pytest.approx(statistics.mean(ACC[(m, b)]))
        assert s["std"] == pytest.approx(statistics.stdev(ACC[(m, b)]))
        assert s["lora_equivalent_rank"] == pytest.approx(adapter / (2 * 768 * 16))
        assert s["step_time_s"] == pytest.approx(0.014)  # mean of 0.013, 0.014, 0.015
        assert s["peak_memory_mb"] == 503.0  # peak over seeds
    # the failed and running jobs are not averaged in
    assert table[("randlora", 1e6, "digits")]["n_runs"] == 3
    assert table[("lora", 1e6, "digits")]["n_runs"] == 3


def test_std_over_seeds(tmp_path):
    accs = [0.50, 0.60, 0.90, 0.70]
    folder = make_multirun(tmp_path, "2025-02-01_00-00-00_aaaaaa",
                           [results("vera", 1e5, seed=i, acc=a) for i, a in enumerate(accs)]
                           + [results("lora", 1e5, seed=0, acc=0.75)])
    table = by_config(summarize(collect([folder])))
    s = table[("vera", 1e5, "digits")]
    assert s["std"] == pytest.approx(0.17078251276599332)  # sample std, ddof=1
    assert s["std"] == pytest.approx(statistics.stdev(accs))
    assert s["mean"] == pytest.approx(0.675)
    single = table[("lora", 1e5, "digits")]
    assert single["n_seeds"] == 1 and single["std"] is None
    md = write_report([folder], tmp_path / "out", plots=False)
    assert "67.50 ± 17.08" in md  # accuracy shown in percent


def test_runs_of_other_experiments_are_not_averaged_as_seeds(tmp_path):
    """Two basis distributions (same method, model, dataset, budget, one seed each) are two rows, each
    labelled with what differs; the seeds of one experiment still average, whatever ran them."""
    def job(dist, seed, acc, *more):
        r = results("randlora", 1e5, seed=seed, acc=acc)
        r["overrides"] = r["overrides"] + [f"+basis={dist}", *more]
        return r
    folder = make_multirun(tmp_path, "2025-02-01_00-00-00_aaaaaa",
                           [job("uniform", 1, 0.5), job("binary", 1, 0.9), job("binary", 2, 0.7, "trainer=ddp"),
                            job("binary", 3, 0.8, "data.num_workers=8", "hydra.job.chdir=false")])
    summary = summarize(collect([folder]))
    got = {s["label"]: (s["n_seeds"], round(s["mean"], 6), s["variant"]) for s in summary}
    assert {s["method"] for s in summary} == {"randlora"}
    assert got == {"randlora [basis=uniform]": (1, 0.5, "basis=uniform"),
                   "randlora [basis=binary]": (3, 0.8, "basis=binary")}
    assert all(not s["duplicate_seeds"] for s in summary)
    md = write_report([folder], tmp_path / "out", plots=False)
    assert "randlora [basis=binary]" in md and "randlora [basis=uniform]" in md


def test_metric_is_selectable(sweep):
    table = by_config(summarize(collect([sweep]), "val/acc"))
    assert table[("lora", 1e5, "digits")]["mean"] == pytest.approx(statistics.mean(ACC[("lora", 1e5)]) + 0.01)
    table = by_config(summarize(collect([sweep]), "no/such"))
    assert table[("lora", 1e5, "digits")]["mean"] is None
    assert table[("lora", 1e5, "digits")]["n_seeds"] == 0


def test_failed_and_unfinished_jobs_are_listed(sweep, tmp_path):
    out = tmp_path / "out"
    md = write_report([sweep], out, plots=False)
    assert md == (out / "report.md").read_text()
    section = md.split("## Failed or unfinished jobs", 1)[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ") and "Job folder" not in ln]
    assert len(lines) == 3
    failed = next(ln for ln in lines if "| failed |" in ln)
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in failed
    assert "randlora" in failed and str(Path("2025-01-02_10-00-00_a1b2c3") / "12") in failed
    unfinished = next(ln for ln in lines if "| unfinished |" in ln)
    assert str(Path("2025-01-02_10-00-00_a1b2c3") / "13") in unfinished and "no results.json" in unfinished
    running = next(ln for ln in lines if "running" in ln)
    assert str(Path("2025-01-02_10-00-00_a1b2c3") / "14") in running


def test_unreadable_results_json_is_listed(tmp_path):
    folder = make_multirun(tmp_path, "2025-02-02_00-00-00_bbbbbb", [results()])
    (folder / "1").mkdir()
    (folder / "1" / "results.json").write_text('{"status": "compl')
    rows = collect([folder])
    bad = next(r for r in rows if r["status"] == "unreadable")
    assert bad["error"].startswith("JSONDecodeError")
    md = write_report([folder], tmp_path / "out", plots=False)
    assert "unreadable" in md.split("## Failed or unfinished jobs", 1)[1]


def test_outputs_and_plots_are_valid_png(sweep, tmp_path):
    out = tmp_path / "out"
    write_report([sweep], out)
    for name in ("report.md", "report.tex", "results.csv", "pivot.csv", "comparisons.csv", "acc_vs_params.png",
                 "acc_vs_params.pdf", "acc_vs_step_time.png", "acc_vs_memory.png"):
        assert (out / name).is_file(), name
    png = (out / "acc_vs_params.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    assert not (out / "acc_vs_shots.png").exists()  # shots do not vary in this sweep
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    row = next(r for r in rows if r["method"] == "randlora" and float(r["budget"]) == 1e6)
    assert int(row["trainable"]) == 1_001_472 + HEAD
    assert float(row["mean"]) == pytest.approx(statistics.mean(ACC[("randlora", 1e6)]))
    assert float(row["std"]) == pytest.approx(statistics.stdev(ACC[("randlora", 1e6)]))
    assert row["n_seeds"] == "3" and row["seeds"] == "1;2;3"


def test_acc_vs_shots_plot(shots_sweep, tmp_path):
    out = tmp_path / "out"
    md = write_report([shots_sweep], out)
    png = (out / "acc_vs_shots.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    assert "acc_vs_shots.png" in md
    summary = summarize(collect([shots_sweep]))
    assert len(summary) == 12  # 2 methods x (4 shots + 2 fractions)
    labels = [report.regime_label(s) for s in summary if s["method"] == "lora"]
    assert labels == ["1-shot", "2-shot", "4-shot", "16-shot", "50%", "100%"]


def test_two_folders_merge(sweep, second, tmp_path):
    rows = collect([sweep, second])
    assert len(rows) == 15 + 5
    table = by_config(summarize(rows))
    merged = table[("lora", 1e5, "digits")]
    accs = ACC[("lora", 1e5)] + [0.85]
    assert merged["seeds"] == [1, 2, 3, 4]
    assert merged["mean"] == pytest.approx(statistics.mean(accs))
    assert merged["std"] == pytest.approx(statistics.stdev(accs))
    assert table[("randlora", 1e5, "cifar10")]["mean"] == pytest.approx(0.665)
    # the same folder given twice (or nested) does not count jobs twice
    assert len(collect([sweep, sweep, sweep / "0"])) == 15

    datasets, prow = report.pivot(summarize(rows))
    assert datasets == ["cifar10", "digits"]
    rl = next(p for p in prow if p["method"] == "randlora" and p["budget"] == 1e5)
    assert rl["average"] == pytest.approx((0.665 + statistics.mean(ACC[("randlora", 1e5)])) / 2)
    lora_big = next(p for p in prow if p["method"] == "lora" and p["budget"] == 1e6)
    assert lora_big["cifar10"] is None and lora_big["n_datasets"] == 1

    md = write_report([sweep, second], tmp_path / "out", plots=False)
    table = md.split("### tiny_vit, 100%", 1)[1].split("\n\n", 2)[1]  # datasets as rows, methods as columns
    assert table.splitlines()[0] == "| Dataset | LoRA 100K | LoRA 1M | RandLoRA 100K | RandLoRA 1M |"
    assert table.splitlines()[-1].startswith("| *Average* | 72.5 | 87.0\\* |")
    with open(tmp_path / "out" / "pivot.csv") as f:
        header = next(csv.reader(f))
    assert header[-4:] == ["cifar10", "digits", "average", "n_datasets"]


def test_wandb_files_are_not_jobs(sweep):
    # W&B's local run folders inside a job are skipped, whatever they hold
    (sweep / "0" / "wandb" / "offline-run-1" / "files").mkdir(parents=True)
    (sweep / "0" / "wandb" / "offline-run-1" / "files" / "results.json").write_text("{}")
    assert len(collect([sweep])) == 15


def test_default_out_is_first_folder_report(sweep, second):
    write_report([sweep, second], plots=False)
    assert (sweep / "report" / "report.md").is_file()
    assert not (second / "report").exists()
    # the report folder of an earlier run is no job and is not picked up again
    assert len(collect([sweep])) == 15


def test_empty_folder_raises(tmp_path):
    with pytest.raises(ReportError, match="no results.json"):
        write_report([tmp_path])


def test_cli_empty_folder_exits_2(tmp_path):
    (tmp_path / "logs").mkdir()
    proc = run_cli(tmp_path / "logs")
    assert proc.returncode == 2
    assert "no results.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(tmp_path / "does_not_exist")
    assert proc.returncode == 2 and "no such folder" in proc.stderr


def test_cli_writes_report(sweep, second, tmp_path):
    out = tmp_path / "cli_out"
    proc = run_cli(sweep, second, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# Results report")
    assert "## Failed or unfinished jobs" in proc.stdout and "CUDA out of memory" in proc.stdout
    assert (out / "report.md").read_text().strip() == proc.stdout.strip()
    # averaged over the two datasets only the 100K budget remains (one x per method): no average panel
    assert not (out / "acc_vs_params.png").exists()
    assert (out / "acc_vs_params_per_dataset.png").read_bytes()[:8] == PNG_MAGIC


def test_main_metric_option(sweep, tmp_path, capsys):
    assert report.main([str(sweep), "--out", str(tmp_path / "o"), "--metric", "val/acc"]) == 0
    printed = capsys.readouterr().out
    assert "`val/acc` (%)" in printed and "| val/acc (%) |" in printed
    assert report.main([]) == 2


def test_cli_wandb_offline_is_one_clear_error(sweep, tmp_path):
    env = dict(os.environ, WANDB_MODE="offline")
    proc = run_cli(sweep, "--out", tmp_path / "o", "--wandb-group", "g", "--wandb-project", "p", env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "offline" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_collect_wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ReportError, match="offline"):
        report.collect_wandb("g", "p")


class FakeSummary:
    """Like wandb's HTTPSummary: a mapping whose nested values are mapping objects too."""

    def __init__(self, d):
        self._d = {k: FakeSummary(v) if isinstance(v, dict) else v for k, v in d.items()}

    def items(self):
        return self._d.items()


class FakeRun:
    def __init__(self, summary, config, state="finished"):
        self.summary = FakeSummary(summary)
        self.config = config
        self.state = state
        self.id = "abc123"
        self.path = ["ent", "proj", "abc123"]
        self.url = "https://wandb.ai/ent/proj/runs/abc123"


def test_wandb_run_conversion():
    res = results("randlora", 1e6, seed=2, acc=0.9)
    summary = {"test/acc": 0.9, "val/acc": 0.91, "_step": 100, "params": res["params"],
               "perf/step_time_s": 0.02, "perf/peak_memory_mb": 700.0}
    config = {k: res[k] for k in ("method", "model", "dataset", "task", "seed", "r", "budget", "shots",
                                  "fraction", "sweep")}
    config["fraction"] = {"value": 1.0, "desc": None}  # wandb's wrapped config value
    row = report.wandb_run_to_row(FakeRun(summary, config))
    assert row["status"] == "completed"
    assert (row["method"], row["dataset"], row["seed"], row["budget"], row["r"]) == \
        ("randlora", "digits", 2, 1e6, 64)
    assert row["fraction"] == 1.0
    assert row["trainable"] == 1_001_472 + HEAD
    assert row["metrics"] == {"test/acc": 0.9, "val/acc": 0.91}
    assert row["step_time_s"] == 0.02 and row["peak_memory_mb"] == 700.0
    assert row["run_dir"] == "https://wandb.ai/ent/proj/runs/abc123"

    crashed = report.wandb_run_to_row(FakeRun({}, config, state="crashed"))
    assert crashed["status"] == "failed" and "crashed" in crashed["error"]

    # what the training loggers send: flattened params/ and perf/ keys, config "adapter": {...}
    logged = FakeRun({"test/acc": 0.7, "params/trainable": 1234.0, "perf/step_time_s": 0.5},
                     {"adapter": {"method": "vera", "r": 256}, "params/trainable": 1234.0,
                      "model": {"name": "vit_b32"}, "data": {"name": "dtd"}, "seed": 3})
    logged.group = "budget_sweep"
    row2 = report.wandb_run_to_row(logged)
    assert (row2["method"], row2["r"], row2["model"], row2["dataset"], row2["seed"], row2["sweep"]) == \
        ("vera", 256, "vit_b32", "dtd", 3, "budget_sweep")
    assert row2["trainable"] == 1234 and row2["step_time_s"] == 0.5 and row2["metrics"] == {"test/acc": 0.7}

    # W&B rows go through the same summary as local ones
    s = summarize([row, dict(row, seed=3, metrics={"test/acc": 0.8})])
    assert len(s) == 1 and s[0]["mean"] == pytest.approx(0.85) and s[0]["n_seeds"] == 2
