"""What the report writes: the paper's table layouts (Markdown and LaTeX that compiles), and figures sized
for a paper with readable ticks, titles and legends (read from the PNG and the matplotlib figure)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from randlora.report import collect, summarize, write_report
from randlora.report.plots import DOUBLE_COLUMN_IN, DPI, SINGLE_COLUMN_IN, log_ticks, metric_vs_data_figure, metric_vs_figure
from tests.report_jobs import make_multirun, results

TASKS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"]


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.fixture
def budget_sweep(tmp_path):
    """LoRA / VeRA / RandLoRA at budgets 4K, 20K, 80K (3 seeds) and full fine-tuning, on digits."""
    jobs = []
    for m, base, step in (("lora", 0.80, 0.03), ("vera", 0.64, 0.02), ("randlora", 0.75, 0.035)):
        for i, b in enumerate((4e3, 2e4, 8e4)):
            for s in (1, 2, 3):
                r = results(m, b, seed=s, acc=base + step * i + 0.004 * s, r=i + 1, adapter=int(b * 1.01))
                r["overrides"] += ["sweep=budget_sweep", "trainer.max_epochs=1"]
                r["perf"] = {"step_time_s": 0.01 * (i + 1) * (2 if m == "randlora" else 1), "samples_per_s": 100.0,
                             "peak_memory_mb": 300.0 + 40 * i}
                jobs.append(r)
    for s in (1, 2, 3):
        r = results("full", None, seed=s, acc=0.9 + 0.003 * s, r=None, adapter=5_000_000)
        r["overrides"] += ["sweep=budget_sweep", "trainer.max_epochs=1"]
        jobs.append(r)
    return make_multirun(tmp_path, "budget", jobs)


@pytest.fixture
def commonsense(tmp_path):
    """LoRA-32 and RandLoRA-30 on commonsense_170k, per-task test metrics as CausalLMTask logs them."""
    jobs = []
    for m, r, bonus in (("lora", 32, 0.0), ("randlora", 30, 0.01)):
        for s in (1, 2):
            accs = {t: 0.6 + 0.03 * i + bonus + 0.001 * s for i, t in enumerate(TASKS)}
            rec = results(m, None, seed=s, acc=sum(accs.values()) / 8, dataset="commonsense_170k", model="llama3_8b",
                          r=r)
            rec["metrics"].update({f"test/acc_{t}": a for t, a in accs.items()})
            rec["config"]["data"]["tasks"] = TASKS
            jobs.append(rec)
    return make_multirun(tmp_path, "cs", jobs)


def test_dataset_table_layout_and_latex_bold_best(tmp_path):
    jobs = []
    for ds, (lo, ra, ft) in {"cars": (0.773, 0.831, 0.844), "dtd": (0.767, 0.789, 0.777)}.items():
        for s in (1, 2):
            jobs += [results("lora", None, seed=s, acc=lo, dataset=ds, r=32),
                     results("randlora", None, seed=s, acc=ra, dataset=ds, r=6),
                     results("full", None, seed=s, acc=ft, dataset=ds, r=None)]
    out = tmp_path / "out"
    md = write_report([make_multirun(tmp_path, "t11", jobs)], out, plots=False)
    table = md.split("### tiny_vit, 100%: test/acc (%)", 1)[1].split("\n\n")[1].splitlines()
    assert table[0] == "| Dataset | FT | LoRA-32 | RandLoRA-6 |"  # the paper's Table 11 names
    assert table[2] == "| cars | **84.4** ± 0.0 | 77.3 ± 0.0 | 83.1 ± 0.0 |"
    assert table[3] == "| dtd | 77.7 ± 0.0 | 76.7 ± 0.0 | **78.9** ± 0.0 |"
    assert table[4] == "| *Average* | **81.0** | 77.0 | **81.0** |"  # ties at the printed precision: both bold
    tex = (out / "tables" / "datasets_tiny_vit_100pct.tex").read_text()
    assert "\\begin{tabular}{lrrr}" in tex and tex.count("\\toprule") == 1 and tex.count("\\bottomrule") == 1
    assert tex.count("\\midrule") == 2  # under the header, above the average
    assert "cars & \\textbf{84.4}" in tex and "tiny\\_vit" in tex and "test/acc (\\%)" in tex
    assert "\\input{tables/datasets_tiny_vit_100pct.tex}" in (out / "report.tex").read_text()


def test_budget_sweep_table_and_figures(budget_sweep, tmp_path):
    out = tmp_path / "out"
    md = write_report([budget_sweep], out)
    table = md.split("per adapter budget", 1)[1].split("\n\n")[1].splitlines()
    assert table[0] == "| Budget | LoRA | VeRA | RandLoRA |"
    assert [row.split(" |")[0] for row in table[2:]] == ["| 4K", "| 20K", "| 80K"]
    assert "FT: 90.6 ± 0.3 (5M trainable parameters)" in md
    assert "## Paired comparison with lora" in md
    for name in ("acc_vs_params", "acc_vs_step_time", "acc_vs_memory"):  # one panel: one column wide, 300 dpi
        w, h = png_size(out / f"{name}.png")
        assert w == round(SINGLE_COLUMN_IN * DPI) and 600 < h < 1200, (name, w, h)
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (out / "acc_vs_shots.png").exists()


def test_log_axis_has_readable_ticks_title_and_legend_outside(budget_sweep):
    """The issue's plot: one x tick across 4e3-8e4, the legend over the curves, no model in the title."""
    assert log_ticks(4e3, 8e4) == [5e3, 1e4, 2e4, 5e4]
    assert log_ticks(3e3, 7e3) == [3e3, 4e3, 5e3, 6e3, 7e3]
    summary = summarize(collect([budget_sweep]))
    fig = metric_vs_figure(summary, "trainable", "test/acc")
    fig.canvas.draw()
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["5K", "10K", "20K", "50K"]
    assert ax.get_title() == "tiny_vit · digits · 100%" and ax.get_ylabel() == "test accuracy (%)"
    assert ax.get_legend() is None and len(fig.legends) == 1
    legend = fig.legends[0].get_window_extent()
    assert legend.y1 <= ax.get_window_extent().y0  # below the panel, not over the data
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["FT (5M params)", "LoRA", "VeRA", "RandLoRA"]  # method names only: shared overrides dropped
    assert fig.get_size_inches()[0] == pytest.approx(SINGLE_COLUMN_IN)
    slow = [dict(s, step_time_s=s["step_time_s"] * 100) for s in summary]  # 1-6 s per step: seconds, not 6K ms
    for times, unit in ((summary, "ms"), (slow, "s")):
        fig = metric_vs_figure(times, "step_time_s", "test/acc")
        fig.canvas.draw()
        ax = fig.axes[0]
        assert ax.get_xlabel() == f"step time ({unit}, median over steps)"
        assert not any("K" in t.get_text() for t in ax.get_xticklabels())


def test_shots_figure_ticks_and_two_column_width(tmp_path):
    jobs = []
    for ds in ("digits", "cifar10"):
        for m, bonus in (("lora", 0.0), ("randlora", 0.03)):
            for s in (1, 2):
                jobs += [results(m, 1e5, seed=s, shots=k, dataset=ds, acc=0.3 + 0.03 * k + bonus) for k in (1, 2, 4, 16)]
                jobs += [results(m, 1e5, seed=s, fraction=f, dataset=ds, acc=0.8 + 0.1 * f + bonus) for f in (0.5, 1.0)]
    folder = make_multirun(tmp_path, "k", jobs)
    summary = summarize(collect([folder]))
    fig = metric_vs_data_figure(summary, "test/acc", per_dataset=True)
    fig.canvas.draw()
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 2 and fig.get_size_inches()[0] == pytest.approx(DOUBLE_COLUMN_IN)
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["1", "2", "4", "16", "50%", "100%"]
    assert fig.get_suptitle() == "tiny_vit" and [a.get_title() for a in axes] == ["cifar10", "digits"]
    out = tmp_path / "out"
    write_report([folder], out)
    assert png_size(out / "acc_vs_shots_per_dataset.png")[0] == round(DOUBLE_COLUMN_IN * DPI)
    assert png_size(out / "acc_vs_shots.png")[0] == round(SINGLE_COLUMN_IN * DPI)  # one panel: the average


def test_commonsense_per_task_table(commonsense, tmp_path):
    out = tmp_path / "out"
    md = write_report([commonsense], out, plots=False)
    table = md.split("llama3_8b, commonsense_170k, 100%: test/acc (%) per task", 1)[1].split("\n\n")[1].splitlines()
    assert table[0] == "| Method | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Average |"
    lora, rand = table[2].split(" | "), table[3].split(" | ")
    assert lora[0] == "| LoRA-32" and rand[0] == "| RandLoRA-30"
    assert lora[1] == "60.15" and rand[1] == "**61.15**"  # best of each column in bold
    assert rand[-1] == "**71.65** |"
    tex = (out / "tables" / "tasks_llama3_8b_commonsense_170k_100pct.tex").read_text()
    assert "\\begin{tabular}{l" + "r" * 9 + "}" in tex and "\\resizebox{\\linewidth}" in tex


def test_latex_report_compiles(budget_sweep, commonsense, tmp_path):
    out = tmp_path / "out"
    write_report([budget_sweep, commonsense], out)
    tex = (out / "report.tex").read_text()
    assert tex.startswith("\\documentclass") and tex.rstrip().endswith("\\end{document}")
    for name in re.findall(r"\\input\{(tables/[^}]+)\}", tex) + re.findall(r"\\includegraphics(?:\[[^]]*\])?\{([^}]+)\}", tex):
        assert (out / name).is_file(), name
    for table in (out / "tables").glob("*.tex"):  # balanced environments, booktabs rules
        t = table.read_text()
        assert t.count("\\begin{") == t.count("\\end{") and "\\toprule" in t and "\\bottomrule" in t, table.name
        # an unescaped % comments out the rest of its line (only a line-ending one, after {, is meant)
        assert "%" not in t.replace("\\%", "").replace("{%\n", ""), table.name
    if shutil.which("pdflatex") is None:  # the structure above is what can be checked without TeX
        return
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "report.tex"], cwd=out,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (out / "report.pdf").read_bytes()[:5] == b"%PDF-"
