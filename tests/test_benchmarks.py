"""The benchmark harness in its smallest configuration (tiny models, 2 timed steps, in-process), and
the results page (benchmarks/RESULTS.md) against the files and commands it cites."""
import argparse
import fnmatch
import glob
import importlib
import importlib.util
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from benchmarks import layer, run

EXPECTED = ["full", "lora", "vera", "vera-same-r", "randlora", "randlora-bf16-bases"]


def _have_peft():
    return run.peft_available()[0]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "latest.md"
    res = run.main(["--quick", "--steps", "2", "--warmup", "1", "--memory", "none", "--out", str(out)],
                   log=lambda *a: None)
    return res, out


@pytest.mark.integration
def test_every_model_has_every_row_with_finite_times(quick):
    res, _ = quick
    assert set(res["models"]) == {"vit", "clip", "llama"}
    for key, m in res["models"].items():
        methods = [r["method"] for r in m["rows"]]
        want = EXPECTED + (["peft-lora", "peft-vera", "peft-randlora"] if _have_peft() else [])
        if key == "clip" and _have_peft():
            want.append(run.SAME_TARGETS)  # ours on PEFT's (Linear-only) targets
        assert sorted(methods) == sorted(want), (key, methods)
        for r in m["rows"]:
            assert not r["error"], (key, r["method"], r["error"])
            assert len(r["times_s"]) == 2, (key, r["method"])
            assert all(math.isfinite(t) and t > 0 for t in r["times_s"]), (key, r["method"], r["times_s"])
            assert math.isfinite(r["loss"]), (key, r["method"])
            assert r["trainable"] > 0
            if r["method"] != "full":
                assert r["adapter_params"] > 0, (key, r["method"])


def test_budgets_paths_and_ratios(quick):
    res, _ = quick
    for key, m in res["models"].items():
        rows = {r["method"]: r for r in m["rows"]}
        lora, rand = rows["lora"], rows["randlora"]
        # match_budget: RandLoRA's adapter count is close to LoRA's
        assert 0.5 < rand["adapter_params"] / lora["adapter_params"] < 2.0, key
        assert rand["paths"] and ("factorised" in rand["paths"] or "merged" in rand["paths"]), rand["paths"]
        if key == "clip":  # attn.in_proj_weight is adapted, through the self-attention path
            assert "materialised" not in rand["paths"] and "not run" not in rand["paths"], rand["paths"]
        for name in ("randlora_vs_lora_time", "vera_vs_lora_time", "full_vs_lora_time"):
            v, paired = m["ratios"][name]
            assert math.isfinite(v) and v > 0 and math.isfinite(paired), (key, name, v)
        if _have_peft():
            assert rows["peft-randlora"]["r"] == rand["r"]
            same = rows.get(run.SAME_TARGETS, rand)
            assert same["targets"] == rows["peft-randlora"]["targets"]
            assert same["adapter_params"] == rows["peft-randlora"]["adapter_params"], key
            assert math.isfinite(m["ratios"]["peft_vs_ours_randlora_time"][0])


@pytest.mark.integration
def test_compiled_rows_run_interleaved_with_their_eager_twins(tmp_path):
    """--compile adds each configuration compiled (aot_eager here: the same graphs as inductor, no
    C++ build), times it in the same rounds, and reports the target ratios among compiled rows."""
    torch._dynamo.reset()
    out = tmp_path / "c.md"
    res = run.main(["--quick", "--models", "vit", "--methods", "lora,vera-same-r,randlora", "--compile", "blocks",
                    "--compile-backend", "aot_eager", "--steps", "2", "--warmup", "1", "--memory", "none",
                    "--out", str(out)], log=lambda *a: None)
    torch._dynamo.reset()
    m = res["models"]["vit"]
    rows = {r["method"]: r for r in m["rows"]}
    assert set(rows) == {"lora", "vera-same-r", "randlora", "lora+compiled", "vera-same-r+compiled",
                         "randlora+compiled"}
    for name, r in rows.items():
        assert not r["error"], (name, r["error"])
        assert len(r["times_s"]) == 2
        if name.endswith(run.COMPILED):  # its own timings, not a list shared with its eager twin
            assert r["times_s"] is not rows[name[:-len(run.COMPILED)]]["times_s"]
        assert bool(r["compiled"]) == name.endswith("+compiled")
        assert math.isfinite(r["loss"])
    assert rows["randlora+compiled"]["paths"] == rows["randlora"]["paths"]
    assert res["warmup"] >= 2  # the first compiled step compiles, the second may recompile
    for name in ("randlora_vs_lora_time", "vera_vs_lora_time"):
        assert math.isfinite(m["ratios_compiled"][name][0]), name
    text = out.read_text()
    assert "vit (compiled)" in text and "### Compiled rows" in text and "ours randlora [compiled]" in text
    assert len([ln for ln in m["compile_table"] if ln.startswith("| ours")]) == 3
    with pytest.raises(SystemExit, match="compile.mode='fast'"):
        run.main(["--quick", "--compile", "blocks", "--compile-mode", "fast"])


def test_report_written(quick):
    res, out = quick
    md = out.read_text()
    assert md == res["markdown"]
    assert "## Summary against the targets" in md and "command: `python -m benchmarks.run --quick" in md
    for key in ("vit", "clip", "llama"):
        assert f"| {key} | " in md
        assert f"## {key}: " in md
    assert md.count("| ours randlora | ") == 3
    assert out.with_suffix(".json").exists()
    assert torch.get_num_threads() >= 1


def test_memory_measurement_in_process():
    job = dict(model="vit", size="tiny", batch=2, llama_layers=1, seq=16, device="cpu", dtype="float32",
               autocast=False, steps=2, threads=1,
               config=dict(method="randlora", kind="randlora", impl="ours", r=4, targets=["qkv", "fc1", "fc2"],
                           path="auto"))
    old = torch.get_num_threads()
    try:
        m = run.measure_memory(job)
    finally:
        torch.set_num_threads(old)
    assert math.isfinite(m["peak_mb"]) and m["peak_mb"] > 0 and m["extra_mb"] >= 0


def test_layer_cost_model():
    T, d, r = 1000, 768, 32
    k = 768
    f = lambda row, path=None: layer.cost(row, T, d, d, r, k, path, 4)[0]  # noqa: E731
    assert f("base") == 4 * T * d * d
    assert f("full") == 6 * T * d * d
    assert f("lora") == 4 * T * d * d + 12 * T * r * d
    assert f("randlora", "factorised") == 4 * T * d * d + 10 * T * k * d
    assert f("randlora", "merged") == 6 * T * d * d + 6 * d * d * k


def test_profile_tool_tables_and_memory_breakdown(capsys):
    from benchmarks import profile
    profile.main(["--model", "vit", "--method", "randlora", "--tiny", "--steps", "1", "--rows", "5"])
    out = capsys.readouterr().out
    assert "ours randlora" in out and "aten::" in out
    profile.main(["--model", "clip", "--method", "lora", "--tiny", "--memory"])
    out = capsys.readouterr().out
    assert "saved for backward" in out and "MB" in out


def test_operator_counts_vera_close_to_lora():
    """At ViT/CLIP sizes a bf16 GPU step is launch-bound, so the operators an adapted layer runs are
    its cost. VeRA at LoRA's r runs LoRA's GEMMs (no more) and fewer than 5 more small operators per
    layer (3.8 now; it ran 6 more before its branch built diag(b) B diag(d) in one outer product)."""
    from benchmarks import ops

    res = ops.run(models=["vit"], methods=["lora", "vera-same-r", "randlora-merged"], log=lambda *a: None)
    rows = {r["method"]: r for r in res["vit"]["rows"]}
    lora, vera = rows["lora"], rows["vera-same-r"]
    assert lora["layers"] == vera["layers"] == 12  # model=tiny_vit: 4 blocks x (qkv, fc1, fc2)
    assert vera["ops"]["mm"] <= lora["ops"]["mm"]
    assert 0 < vera["vs_lora_per_layer"] < 5
    assert rows["randlora-merged"]["vs_lora_per_layer"] < 5
    assert lora["optimizer"] == vera["optimizer"]  # same number of trained tensors


def test_sparse_basis_products_agree_with_dense():
    from benchmarks import sparse_bases
    (row,) = sparse_bases.main(["--quick", "--out", ""])
    assert row["same"] and row["k"] == 768
    assert abs(row["density"] - 2 / 768 ** 0.5) < 0.01  # P(+-1) = 1/s each, s = sqrt(768)
    assert row["dense dW"] > 0 and row["sparse dW"] > 0


def test_attention_path_benchmark_compares_both_paths(tmp_path):
    """benchmarks.attn_path times each method with the self-attention path and with the materialised
    fallback; the fallback rows really run the fallback (RandLoRA reports 'materialised' layers)."""
    from benchmarks import attn_path

    out = tmp_path / "attn.md"
    text = attn_path.main(["--size", "tiny", "--steps", "1", "--warmup", "0", "--out", str(out)])
    assert out.read_text() == text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "materialised" not in rows["randlora r=4 fast"] and "factorised" in rows["randlora r=4 fast"]
    assert "materialised x4" in rows["randlora r=4 fallback"]
    for method in ("lora r=4", "randlora r=4", "vera r=4"):
        ratio = float(rows[f"{method} fast"].split(" | ")[3])
        assert math.isfinite(ratio) and ratio > 0
    assert "RandLoRA / LoRA step:" in text


@pytest.mark.integration
def test_ddp_benchmark_two_ranks_skip_the_bases(tmp_path):
    """benchmarks.ddp runs two gloo ranks; plain DDP broadcasts RandLoRA's bases before every step,
    the framework's setting broadcasts nothing (LoRA has no buffer to send)."""
    from benchmarks import ddp

    out = tmp_path / "ddp.md"
    res = ddp.main(["--size", "tiny", "--models", "llama", "--steps", "1", "--warmup", "0", "--out", str(out)])
    rows = {r["name"].split(" (")[0]: r for r in res["llama"]["rows"]}
    assert rows["randlora, DDP default"]["bytes"] > 0
    assert rows["randlora, constants skipped"]["bytes"] == 0
    assert all(len(r["times"]) == 1 and r["times"][0] > 0 for r in rows.values())
    assert "no longer broadcast per step" in out.read_text()


# ---- benchmarks/RESULTS.md stays a results page -------------------------------------------------------
# It holds the current numbers with the file, commit and command behind each; the history lives in
# benchmarks/ARCHIVE.md and superseded raw files in benchmarks/results/archive/. These checks keep a
# reader's copy-paste working: every file the pages cite exists, every command they show parses.

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
RAW_PATH = re.compile(r"results/[\w.*/-]*")
BENCH_CMD = re.compile(r"python -m benchmarks\.(\w+)([^`\n]*)")
GPU_STAGES = re.compile(r"bash benchmarks/gpu_session\.sh ([^`\n]*)")


class _Parsed(Exception):
    """Raised in place of running a benchmark once its argument parser accepted the command."""


def _cited_paths(text: str) -> set[str]:
    """``results/...`` paths a page cites, relative to benchmarks/ ('a.md/.json' cites both files)."""
    out = set()
    for m in RAW_PATH.findall(text):
        m = m.rstrip(".")
        pair = re.fullmatch(r"(.*)\.(\w+)/\.(\w+)", m)
        out.update([f"{pair[1]}.{pair[2]}", f"{pair[1]}.{pair[3]}"] if pair else [m])
    return out


def _exists(rel: str) -> bool:
    return bool(glob.glob(str(BENCH_DIR / rel))) if "*" in rel else (BENCH_DIR / rel).exists()


def _accepts(module: str, argv: list[str], monkeypatch) -> None:
    """Run ``benchmarks.<module>``'s own argument parser on ``argv`` (as ``python -m`` would hand it
    over), stopping right after parsing: no benchmark runs."""
    assert importlib.util.find_spec(f"benchmarks.{module}"), f"RESULTS.md names a missing benchmarks.{module}"
    mod = importlib.import_module(f"benchmarks.{module}")
    src = Path(mod.__file__).read_text()
    assert 'if __name__ == "__main__":' in src, f"`python -m benchmarks.{module}` does nothing: no __main__ block"
    if "ArgumentParser" not in src:  # positional words only (probe_fw_memory's adapter names)
        assert not any(a.startswith("-") for a in argv), f"benchmarks.{module} takes no options, shown {argv}"
        return
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)  # an unknown option or a bad value exits here (status 2)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        mod.main(argv)
    except _Parsed:
        pass
    except SystemExit as e:
        pytest.fail(f"benchmarks/RESULTS.md shows `python -m benchmarks.{module} {shlex.join(argv)}`, which its "
                    f"parser refuses (exit {e.code}): fix the command on the page")
    else:
        pytest.fail(f"benchmarks.{module}.main never parsed its arguments")
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)


def test_results_page_is_short_and_its_files_and_commands_are_real(monkeypatch):
    text = (BENCH_DIR / "RESULTS.md").read_text()
    n = len(text.splitlines())
    assert n <= 160, (f"benchmarks/RESULTS.md has {n} lines: keep current numbers there (~150 lines) and move "
                      "history and superseded runs to benchmarks/ARCHIVE.md")
    for page in ("RESULTS.md", "ARCHIVE.md"):
        missing = sorted(p for p in _cited_paths((BENCH_DIR / page).read_text()) if not _exists(p))
        assert not missing, f"benchmarks/{page} cites raw files that do not exist: {missing}"
    commands = BENCH_CMD.findall(text)
    assert len(commands) >= 8, commands  # every benchmark section names its command
    for module, rest in commands:
        _accepts(module, shlex.split(rest), monkeypatch)
    stages = set(re.findall(r"^\s+([a-z][a-z0-9|-]*)\)", (BENCH_DIR / "gpu_session.sh").read_text(), re.M))
    stages = {s for label in stages for s in label.split("|")}
    for words in GPU_STAGES.findall(text):
        shown = [w for w in shlex.split(words) if not w.startswith(("<", "..."))]
        assert set(shown) <= stages, f"gpu_session.sh has no stage {sorted(set(shown) - stages)}: {sorted(stages)}"


def test_every_raw_result_file_is_cited_current_ones_by_the_results_page(monkeypatch):
    """A raw file under results/ is a current result that RESULTS.md cites; a superseded one lives in
    results/archive/ and is cited by ARCHIVE.md or RESULTS.md; a .json is covered by its .md twin.
    The scripts' default outputs are current files."""
    results = _cited_paths((BENCH_DIR / "RESULTS.md").read_text())
    archive = _cited_paths((BENCH_DIR / "ARCHIVE.md").read_text())

    def cited(rel: str, pages: set[str]) -> bool:
        twin = rel[:-5] + ".md" if rel.endswith(".json") else rel
        return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(twin, p) for p in pages)

    files = sorted(str(p.relative_to(BENCH_DIR)) for p in (BENCH_DIR / "results").rglob("*") if p.is_file())
    current = [f for f in files if not f.startswith("results/archive/")]
    uncited = [f for f in current if not cited(f, results)]
    assert not uncited, f"RESULTS.md does not cite {uncited}: cite them, or git mv them to results/archive/"
    stale = [f for f in files if f.startswith("results/archive/") and not cited(f, results | archive)]
    assert not stale, f"archived raw results that neither page cites: {stale}"
    for module in ("run", "layer", "ops", "attn_path", "ddp", "sparse_bases"):
        seen = {}
        real = argparse.ArgumentParser.parse_args

        def keep_defaults(self, args=None, namespace=None):
            seen["out"] = real(self, [], namespace).out
            raise _Parsed

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep_defaults)
        with pytest.raises(_Parsed):
            importlib.import_module(f"benchmarks.{module}").main([])
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)
        out = seen["out"].removeprefix("benchmarks/")
        assert out.startswith("results/") and not out.startswith("results/archive/") and out in results, \
            f"benchmarks.{module} writes {seen['out']} by default, which is not a current file of RESULTS.md"


def test_benchmark_models_are_what_train_builds():
    """benchmarks.models builds through the framework: its tiny ViT is, bit for bit, the network ``adapt``
    builds for a job with model=tiny_vit (the same head initialisation for the job's seed and classes),
    with the job's default targets and trained head; ``model_network`` refuses a classifier without classes."""
    from omegaconf import OmegaConf

    from benchmarks.models import build_vit, model_config
    from randlora.errors import UserError
    from randlora.models import build_model
    from randlora.training.build import build_datamodule, model_network, task_class
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["model=tiny_vit"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    torch.manual_seed(int(cfg.seed))  # train.py seeds the job before it builds the model
    bundle = build_model(cfg.model)
    job = task_class(cfg, bundle).network(bundle, dm, OmegaConf.to_container(cfg.task), int(cfg.seed))
    net, _ = model_network(cfg.model, num_classes=dm.num_classes, seed=int(cfg.seed))
    a, b = job.net.state_dict(), net.net.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (net.targets, net.trainable_modules) == (job.targets, job.trainable_modules) == (["qkv", "fc1", "fc2"], ["head"])
    spec = build_vit("tiny", batch=2)
    assert type(spec.model) is type(job.net) and spec.trainable == ["head"] and spec.targets == job.targets
    assert spec.model.head.out_features == 100
    with pytest.raises(UserError, match="num_classes"):
        model_network(model_config("tiny_vit"))
