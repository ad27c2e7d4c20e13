"""Exporting finished runs (python -m randlora.export), evaluating PEFT adapters in the framework
(adapter.from_peft) and the low-rank truncation error of runs (results.json lowrank, the report's table).

Real runs of the pipeline (tiny ViT on digits, tiny LLaMA on the bundled instruction data, a few steps each)
are exported and the exports loaded by the libraries themselves: PEFT's PeftModel.from_pretrained, timm's
load_state_dict, transformers' from_pretrained and the framework's model.pretrained=. Every output is compared
with the run's own network (the framework's Classifier / causal LM with the run's adapter file loaded) at
float32 tolerance.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import ROOT, compose_cfg, env

peft = pytest.importorskip("peft")  # a dev dependency (pyproject `dev` extra); never missing in CI

TOL = dict(rtol=1e-5, atol=1e-5)
QUICK = ["trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1", "trainer.num_sanity_val_steps=0"]
VIT = ["model=tiny_vit_digits", "data=digits"]
LLAMA = ["model=tiny_llama", "data=commonsense_tiny"]
RUNS = {  # name: overrides (on QUICK)
    "vit_lora": VIT + ["adapter=lora", "adapter.r=4"],
    "vit_vera": VIT + ["adapter=vera", "adapter.r=16"],
    "vit_randlora": VIT + ["adapter=randlora", "adapter.r=4"],
    "vit_randlora_sparse": VIT + ["adapter=randlora_sparse", "adapter.r=8"],
    "vit_dora": VIT + ["adapter=dora", "adapter.r=4"],
    "vit_nola": VIT + ["adapter=nola"],
    "vit_full": VIT + ["adapter=full"],
    "llama_lora": LLAMA + ["adapter=lora", "adapter.r=4"],
    "llama_randlora": LLAMA + ["adapter=randlora", "adapter.r=4"],
    "llama_dora": LLAMA + ["adapter=dora", "adapter.r=4"],
    "clip_lora": ["model=tiny_clip", "data=digits", "adapter=lora", "adapter.r=4"],
}
PEFT_RUNS = ["vit_lora", "vit_vera", "vit_randlora", "vit_randlora_sparse", "vit_dora", "llama_lora",
             "llama_randlora", "llama_dora"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> completed run folder (trained in-process through randlora.train.run)."""
    from randlora.train import run
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, overrides in RUNS.items():
        folder = base / name
        res = run(compose_cfg(QUICK + overrides, out_dir=folder))
        assert res["status"] == "completed"
        out[name] = folder
    return out


def results(folder) -> dict:
    return json.loads((Path(folder) / "results.json").read_text())


# ------------------------------------------------------------------------ the run's own network, as trained

def reference(folder):
    """(cfg, network): the framework's network of the run (Classifier / causal LM) with the run's adapter file
    loaded, built the way train.run builds it."""
    import lightning as L

    from randlora.adapters import load_adapter
    from randlora.models import build_model
    from randlora.training.build import task_class
    rec = results(folder)
    cfg = OmegaConf.create(rec["config"])
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    bundle = build_model(cfg.model)
    net = task_class(cfg, bundle).network(bundle, SimpleNamespace(num_classes=rec["data"].get("num_classes")),
                                          dict(cfg.task), int(cfg.seed)).net
    load_adapter(net, Path(folder) / "checkpoints" / "adapter.safetensors")
    return cfg, net.eval()


def fresh_base(cfg, num_classes=10):
    """The plain base model as its library builds it: timm's classifier (the run's backbone weights, a
    throw-away head) or the transformers LM."""
    import timm

    from randlora.models import build_model
    backbone = build_model(cfg.model).backbone
    if cfg.task.kind != "classification":
        return backbone.eval()
    model = timm.create_model(cfg.model.arch, num_classes=num_classes, **dict(cfg.model.kwargs))
    state = dict(backbone.state_dict())
    state.update({"head.weight": torch.zeros(num_classes, model.num_features), "head.bias": torch.zeros(num_classes)})
    model.load_state_dict(state, strict=True)
    return model.eval()


def inputs(cfg):
    """(x, f): a fixed input and f(model) = the model's outputs (logits) on it."""
    torch.manual_seed(0)
    if cfg.task.kind == "classification":
        x = torch.randn(3, 3, 32, 32)
        return x, lambda m: m(x)
    ids = torch.randint(3, 300, (2, 10))
    return ids, lambda m: m(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------- peft

@pytest.mark.parametrize("name", PEFT_RUNS)
def test_peft_export_loads_in_peft_with_the_runs_outputs(runs, name, tmp_path):
    from randlora.export import export_run
    rec = export_run(runs[name], "peft", tmp_path / "peft")
    cfg, net = reference(runs[name])
    _, f = inputs(cfg)
    with torch.no_grad(), _quiet():
        want = f(net)
        got = f(peft.PeftModel.from_pretrained(fresh_base(cfg), str(tmp_path / "peft")).eval())
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, **TOL)
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    method = results(runs[name])["method"]
    assert conf["peft_type"] == {"lora": "LORA", "dora": "LORA", "vera": "VERA", "randlora": "RANDLORA"}[method]
    assert conf.get("use_dora", False) == (method == "dora")
    if cfg.task.kind == "classification":  # timm's own names: the head is timm's, the layers without "backbone."
        assert conf["modules_to_save"] == ["head"]
        assert not any("backbone" in t for t in json.dumps(conf["target_modules"]).split('"'))
    record = json.loads((tmp_path / "peft" / "export.json").read_text())
    assert record == rec and record["method"] == method and record["run_dir"] == str(runs[name].resolve())
    assert record["trainable"] == results(runs[name])["params"]["trainable"]
    import hashlib
    assert record["results_sha256"] == hashlib.sha256((runs[name] / "results.json").read_bytes()).hexdigest()
    assert record["git_commit"] == results(runs[name])["provenance"]["git"]["commit"]


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *a):
        return self._w.__exit__(*a)


# -------------------------------------------------------------------------------------------- merged

@pytest.mark.parametrize("name", ["vit_randlora_sparse", "vit_dora", "vit_nola", "vit_full"])
def test_merged_vit_loads_in_timm_and_through_model_pretrained(runs, name, tmp_path):
    import timm
    from safetensors.torch import load_file

    from randlora.export import export_run
    from randlora.models import build_model
    export_run(runs[name], "merged", tmp_path / "m")
    cfg, net = reference(runs[name])
    x, f = inputs(cfg)
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    model = timm.create_model(cfg.model.arch, num_classes=10, **dict(cfg.model.kwargs)).eval()
    model.load_state_dict(state, strict=True)  # timm's own state dict, the trained head as timm's head
    with torch.no_grad():
        want = f(net)
        torch.testing.assert_close(f(model), want, **TOL)
        # randlora's model.pretrained= builds the merged backbone (the head is a task's own), with the overrides
        # export.json gives (the run's model config pins its shipped asset's SHA-256: the export is another file)
        record = json.loads((tmp_path / "m" / "export.json").read_text())
        over = compose_cfg(record["load"].split("in randlora: ")[1].split() + ["data=digits"])
        assert over.model.pretrained == str((tmp_path / "m" / "model.safetensors").resolve())
        backbone = build_model(over.model).backbone.eval()
        torch.testing.assert_close(net.head(backbone(x)), want, **TOL)
    assert record["format"] == "merged" and record["method"] == results(runs[name])["method"]
    assert record["num_classes"] == 10 and record["files"] == ["model.safetensors"]


def test_merged_llama_loads_in_transformers_and_through_model_pretrained(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from randlora.export import export_run
    from randlora.models import build_model
    export_run(runs["llama_randlora"], "merged", tmp_path / "m")
    cfg, net = reference(runs["llama_randlora"])
    _, f = inputs(cfg)
    with torch.no_grad():
        want = f(net)
        torch.testing.assert_close(f(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()), want, **TOL)
        record = json.loads((tmp_path / "m" / "export.json").read_text())
        over = compose_cfg(record["load"].split("in randlora: ")[1].split() + ["data=commonsense_tiny"])
        assert over.model.pretrained == str((tmp_path / "m").resolve()) and over.model.tiny is None
        bundle = build_model(over.model)
        torch.testing.assert_close(f(bundle.backbone.eval()), want, **TOL)
    assert bundle.tokenizer("a b c").input_ids == reference_tokenizer(cfg)("a b c").input_ids


def reference_tokenizer(cfg):
    from randlora.models import build_model
    return build_model(cfg.model).tokenizer


def test_open_clip_run_exports_to_peft_and_merged(runs, tmp_path):
    """open_clip's CLIP (LoRA on nn.MultiheadAttention.in_proj_weight and the MLPs of both towers): the PEFT
    folder and the merged state dict (through randlora's model.pretrained=) give the run's embeddings."""
    import lightning as L

    from randlora.export import export_run
    from randlora.models import build_model
    export_run(runs["clip_lora"], "peft", tmp_path / "peft")
    export_run(runs["clip_lora"], "merged", tmp_path / "merged")
    cfg, net = reference(runs["clip_lora"])
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16), torch.randint(1, 50, (2, 16))

    def f(m):
        return torch.cat([m.encode_image(x), m.encode_text(t)], 1)
    with torch.no_grad(), _quiet():
        want = f(net)
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # tiny_clip: random weights from the seed
        pm = peft.PeftModel.from_pretrained(build_model(cfg.model).backbone.eval(), str(tmp_path / "peft")).eval()
        torch.testing.assert_close(f(pm.base_model.model), want, **TOL)
        over = compose_cfg(["model=tiny_clip", "data=digits", f"model.pretrained={tmp_path / 'merged' / 'model.safetensors'}"])
        torch.testing.assert_close(f(build_model(over.model).backbone.eval()), want, **TOL)


# ---------------------------------------------------------------------------------------------- lora

def svd_truth(merged: dict, base: dict, names, k: int) -> dict:
    """{layer: ||dW - dW_k||_F / ||dW||_F}, dW = merged weight - base weight, from numpy's SVD in float64."""
    import numpy as np
    out = {}
    for n in names:
        dw = (merged[f"{n}.weight"].double() - base[f"{n}.weight"].double()).numpy()
        s = np.linalg.svd(dw, compute_uv=False)
        out[n] = float(np.sqrt((s[k:] ** 2).sum() / (s ** 2).sum()))
    return out


@pytest.mark.parametrize("name", ["vit_randlora", "vit_vera", "vit_dora"])
def test_lora_export_errors_equal_the_svd_truth(runs, name, tmp_path):
    from safetensors.torch import load_file

    from randlora.export import export_run
    export_run(runs[name], "lora", tmp_path / "lora", rank=2)
    export_run(runs[name], "merged", tmp_path / "merged")
    trunc = json.loads((tmp_path / "lora" / "truncation.json").read_text())
    cfg, net = reference(runs[name])
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = fresh_base(cfg).state_dict()
    names = [row["name"] for row in trunc["layers"]]
    assert len(names) == 12 and all(not n.startswith("backbone.") for n in names)
    truth = svd_truth(merged, base, names, 2)
    for row in trunc["layers"]:
        assert row["rank"] == 2 and row["full_rank"] == 64
        assert math.isclose(row["rel_error"], truth[row["name"]], rel_tol=2e-3, abs_tol=1e-4), row
    assert trunc["mean_rel_error"] == pytest.approx(sum(truth.values()) / len(truth), rel=2e-3)
    assert 0.05 < trunc["overall_rel_error"] < 1.0
    # at full rank the LoRA is the update itself: PEFT's outputs are the run's
    export_run(runs[name], "lora", tmp_path / "full_rank", rank=64)
    _, f = inputs(cfg)
    with torch.no_grad(), _quiet():
        got = f(peft.PeftModel.from_pretrained(fresh_base(cfg), str(tmp_path / "full_rank")).eval())
        torch.testing.assert_close(got, f(net), **TOL)
    full = json.loads((tmp_path / "full_rank" / "truncation.json").read_text())
    assert full["max_rel_error"] < 1e-6


def test_lora_export_of_a_llama_by_energy(runs, tmp_path):
    from randlora.export import export_run
    export_run(runs["llama_dora"], "lora", tmp_path / "lora", energy=0.9)
    trunc = json.loads((tmp_path / "lora" / "truncation.json").read_text())
    assert trunc["requested"] == {"rank": None, "energy": 0.9}
    assert all(row["energy"] >= 0.9 - 1e-9 and row["rel_error"] <= math.sqrt(0.1) + 1e-9 for row in trunc["layers"])
    conf = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and not conf["use_dora"] and conf["task_type"] == "CAUSAL_LM"


# ------------------------------------------------------------------------------------------ refusals

def _refused(run_dir, fmt, out, message, **kw):
    """The export is refused with ``message`` on one line, and ``out`` is left as it was."""
    from randlora.export import ExportError, export_run
    before = sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else None
    with pytest.raises(ExportError) as e:
        export_run(run_dir, fmt, out, **kw)
    text = str(e.value)
    assert message in text and "\n" not in text
    assert (sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else None) == before


def test_refusals_before_any_work(runs, tmp_path):
    lora = runs["vit_lora"]
    _refused(lora, "onnx", tmp_path / "a", "unknown format 'onnx'; choose one of peft, merged, lora")
    _refused(runs["vit_nola"], "peft", tmp_path / "b", "--format peft cannot hold a 'nola' run")
    _refused(runs["vit_full"], "peft", tmp_path / "c", "--format peft cannot hold a 'full' run")
    _refused(runs["vit_full"], "lora", tmp_path / "d", "--format lora cannot hold a full fine-tune", rank=4)
    _refused(lora, "lora", tmp_path / "e", "--format lora needs the LoRA rank: give --rank k")
    _refused(lora, "lora", tmp_path / "e", "--rank 0 must be a positive integer", rank=0)
    _refused(lora, "merged", tmp_path / "e", "--rank / --energy apply to --format lora only", rank=4)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    _refused(lora, "peft", busy, f"--out {busy} exists and is not empty")
    from randlora.export import export_run
    export_run(lora, "peft", busy, force=True)  # --force writes next to the other files
    assert (busy / "keep.txt").read_text() == "mine" and (busy / "adapter_config.json").is_file()
    _refused(tmp_path, "peft", tmp_path / "f", "is not a run folder (no results.json)")


def test_refuses_dora_dr_for_peft_and_unfinished_or_failed_runs(runs, tmp_path):
    from randlora.train import run
    failed = tmp_path / "failed"
    with pytest.raises(ValueError):
        run(compose_cfg(QUICK + VIT + ["trainer.max_epochs=-5"], out_dir=failed))
    assert results(failed)["status"] == "failed"
    _refused(failed, "merged", tmp_path / "o1", "holds a run with status 'failed': ValueError: trainer.max_epochs=-5")
    running = tmp_path / "running"
    shutil.copytree(runs["vit_lora"], running)
    rec = results(running)
    (running / "results.json").write_text(json.dumps(dict(rec, status="running")))
    _refused(running, "peft", tmp_path / "o2", "holds a run with status 'running'; only a completed run")
    dora_dr = tmp_path / "dora_dr"
    shutil.copytree(runs["vit_lora"], dora_dr)  # only results.json is read before the refusal
    (dora_dr / "results.json").write_text(json.dumps(dict(rec, method="dora_dr")))
    _refused(dora_dr, "peft", tmp_path / "o3", "--format peft cannot hold a 'dora_dr' run")


def test_a_changed_base_model_is_refused(runs, tmp_path):
    from randlora.export import ExportError, export_run
    moved = tmp_path / "moved"
    shutil.copytree(runs["vit_lora"], moved)
    rec = results(moved)
    rec["config"]["model"]["pretrained"] = None  # random weights instead of the run's file
    (moved / "results.json").write_text(json.dumps(rec))
    with pytest.raises(ExportError, match="is not the one the run trained"):
        export_run(moved, "merged", tmp_path / "o")


def test_cli(runs, tmp_path):
    """One process end to end: the lora format, its summary line; a refusal is one line, exit status 2."""
    out = tmp_path / "lora"
    p = subprocess.run([sys.executable, "-m", "randlora.export", str(runs["vit_randlora"]), "--format", "lora",
                        "--out", str(out), "--rank", "3"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "relative truncation error over all layers" in p.stdout
    assert json.loads((out / "truncation.json").read_text())["layers"][0]["rank"] == 3
    from randlora.export import main
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([str(runs["vit_randlora"]), "--format", "lora", "--out", str(tmp_path / "x")]) == 2
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: --format lora needs the LoRA rank")


# --------------------------------------------------------------------------------- adapter.from_peft

def test_a_peft_trained_adapter_evaluates_in_the_framework_as_in_peft(tmp_path):
    """PEFT get_peft_model on timm's classifier -> a few AdamW steps -> save_pretrained -> train.py train=false
    adapter.from_peft=<folder>: the framework's test accuracy and loss are PEFT's own on the same test set."""
    import torch.nn.functional as F

    from randlora.train import run
    from randlora.training.build import build_datamodule
    over = QUICK + VIT + ["trainer.limit_test_batches=1.0"]
    cfg = compose_cfg(over)
    data = build_datamodule(cfg)
    data.setup("fit")
    base = fresh_base(cfg)
    torch.manual_seed(1)
    base.head.reset_parameters()
    model = peft.get_peft_model(base, peft.RandLoraConfig(r=8, target_modules=["qkv", "fc1", "fc2"],
                                                          modules_to_save=["head"], save_projection=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i, (x, y) in zip(range(4), data.train_dataloader()):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(tmp_path / "peft"))
    data.setup("test")
    n = correct = 0
    total = 0.0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            logits = model(x)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            n += len(y)
    res = run(compose_cfg(over + ["train=false", f"adapter.from_peft={tmp_path / 'peft'}"], out_dir=tmp_path / "run"))
    assert res["status"] == "completed" and res["method"] == "randlora" and res["r"] == 8
    assert res["metrics"]["test/acc"] == pytest.approx(correct / n, abs=1e-6)
    assert res["metrics"]["test/loss"] == pytest.approx(total / n, rel=1e-5)
    assert 0.1 < correct / n  # a trained adapter, not chance on an untouched head
    import hashlib
    src = results(tmp_path / "run")["adapter_source"]
    assert src["path"] == str((tmp_path / "peft").resolve()) and src["peft_type"] == "RANDLORA"
    assert src["adapter_config_sha256"] == hashlib.sha256((tmp_path / "peft" / "adapter_config.json")
                                                          .read_bytes()).hexdigest()
    from randlora.results import check
    assert check(results(tmp_path / "run")) == []


def test_from_peft_of_our_own_export_reproduces_the_runs_test_metrics(runs, tmp_path):
    """A run exported to PEFT and evaluated back through adapter.from_peft gives the run's own test metrics."""
    from randlora.export import export_run
    from randlora.train import run
    export_run(runs["llama_lora"], "peft", tmp_path / "peft")
    res = run(compose_cfg(QUICK + LLAMA + ["train=false", f"adapter.from_peft={tmp_path / 'peft'}"],
                          out_dir=tmp_path / "eval"))
    want = {k: v for k, v in results(runs["llama_lora"])["metrics"].items() if k.startswith("test/")}
    assert res["method"] == "lora" and res["r"] == 4 and "test/acc" in want
    assert {k: v for k, v in res["metrics"].items() if k.startswith("test/")} == pytest.approx(want, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------- full rank matters (lowrank)

def test_runs_record_the_truncation_error_at_the_equal_budget_rank(runs, tmp_path):
    from safetensors.torch import load_file

    from randlora.export import export_run
    from randlora.report import write_report
    from randlora.results import check
    rec = results(runs["vit_randlora"])
    assert check(rec) == []
    low = rec["lowrank"]
    k = int(math.floor(rec["params"]["lora_equivalent_rank"] + 1e-9))
    assert low["rank"] == k
    export_run(runs["vit_randlora"], "merged", tmp_path / "merged")
    cfg, _ = reference(runs["vit_randlora"])
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = fresh_base(cfg).state_dict()
    names = [n[len("backbone."):] for n in low["layers"]]
    truth = svd_truth(merged, base, names, k)
    for n, err in low["layers"].items():
        assert math.isclose(err, truth[n[len("backbone."):]], rel_tol=2e-3, abs_tol=1e-4), n
    assert low["mean_rel_error"] == pytest.approx(sum(truth.values()) / len(truth), rel=2e-3)
    assert "lowrank" not in results(runs["vit_full"])  # no adapter update
    assert results(runs["vit_lora"])["lowrank"]["overall_rel_error"] < 1e-5  # LoRA fits its own rank
    text = write_report([str(runs["vit_randlora"]), str(runs["vit_lora"])], tmp_path / "report", plots=False)
    assert "## Full rank matters" in text
    assert f"| {k} | {low['overall_rel_error']:.4f} | {low['mean_rel_error']:.4f} |" in text


def test_lowrank_error_off_and_auto_threshold(runs):
    from randlora.training.build import LOWRANK_AUTO_COST, lowrank_wanted
    cfg, net = reference(runs["vit_randlora"])
    assert lowrank_wanted(OmegaConf.create({**OmegaConf.to_container(cfg), "lowrank_error": "auto"}), net)
    assert not lowrank_wanted(OmegaConf.create({**OmegaConf.to_container(cfg), "lowrank_error": False}), net)
    # Llama-3-8B's targets (q, k, v, up, down on 32 layers) are far past the automatic threshold
    cost = 32 * (4096 * 4096 * 4096 + 2 * 1024 * 4096 * 1024 + 2 * 14336 * 4096 * 4096)
    assert cost > 100 * LOWRANK_AUTO_COST
