"""The results.json schema in code (randlora/results.py): the docs are generated from it, records are
checked against it, the report reads through it, and the provenance it defines is collected truthfully."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path


from randlora import results as R

ROOT = Path(__file__).resolve().parents[1]


def test_docs_are_generated_from_the_schema():
    """docs/results-schema.md is `python -m randlora.results --markdown`: edit the schema, regenerate."""
    doc = (ROOT / "docs" / "results-schema.md").read_text()
    assert doc == R.markdown(), "docs/results-schema.md is stale: python -m randlora.results --markdown > " \
                                "docs/results-schema.md"
    for path, f in R.walk():  # every field, nested ones included, has a row
        assert f"| `{f.name}` |" in doc, path
    for section in ("params", "perf", "provenance", "provenance.git", "provenance.hardware", "budget_match",
                    "attempts", "identity.model"):
        assert f"\n### {section}\n" in doc, section


def test_cli_prints_the_doc_and_checks_files(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "randlora.results", "--markdown"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == R.markdown()
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"status": "completed", "seed": "one"}))
    proc = subprocess.run([sys.executable, "-m", "randlora.results", str(bad)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and f"{bad}: seed: str 'one', expected integer" in proc.stdout


def test_report_and_wandb_fields_come_from_the_schema():
    """The old hand-kept lists (train.RUN_FIELDS, report.RESULT_COLUMNS) are derived from the schema."""
    from randlora.report import RESULT_COLUMNS
    assert R.RUN_FIELDS == ("status", "method", "model", "dataset", "task", "seed", "r", "budget", "shots",
                            "fraction", "sweep")
    for path, f in R.report_fields():
        if f.aggregate:
            assert f.column in RESULT_COLUMNS, path
    assert {"trainable", "step_time_s", "peak_memory_mb", "lr", "budget_deviation", "ci_low", "ci_high"} \
        <= set(RESULT_COLUMNS)
    assert R.field("perf.step_time_s").aggregate == "mean" and R.field("perf.peak_memory_mb").aggregate == "max"


def _cfg(**over):
    cfg = {"adapter": {"method": "lora", "r": None, "budget": 5000.0}, "model": {"name": "tiny_vit"},
           "data": {"name": "digits", "shots": 4, "fraction": 1.0}, "task": {"kind": "classification"}, "seed": 3,
           "group": "budget_sweep"}
    cfg.update(over)
    return cfg


def test_new_record_conforms_and_check_names_every_departure(tmp_path):
    rec = R.new_record(_cfg(), run_dir=tmp_path, overrides=["adapter=lora"], config=_cfg())
    assert list(rec) == [f.name for f in R.SCHEMA if f.when == "always"]
    assert rec["status"] == "running" and rec["method"] == "lora" and rec["budget"] == 5000.0 and rec["shots"] == 4
    assert R.check(rec) == []
    # a completed record must carry the started / completed fields
    done = dict(rec, status="completed")
    missing = R.check(done)
    assert "compile: missing" in missing and "provenance: missing" in missing and "bases_checksum: missing" in missing
    # unknown keys, wrong types, inside closed sections and array items too
    bad = dict(rec, seed="3", extra=1, params={"trainable": 1.5, "oops": 2},
               attempts=[{"started": "t", "ended": None, "status": "running", "error": None, "pid": 1, "host": "h",
                          "command_overrides": ["a", 3], "resumed_from": None, "what": 1}])
    problems = R.check(bad)
    assert "seed: str '3', expected integer" in problems
    assert "extra: not in the schema (randlora/results.py)" in problems
    assert "params.trainable: float 1.5, expected integer" in problems
    assert "params.oops: not in the schema (randlora/results.py)" in problems
    assert "attempts[0].command_overrides[1]: int 3, expected string" in problems
    assert "attempts[0].what: not in the schema (randlora/results.py)" in problems
    assert R.check(dict(done), missing_ok=[p.split(":")[0] for p in missing]) == []


def test_summary_fields_read_a_dictconfig():
    from omegaconf import OmegaConf
    got = R.summary_fields(OmegaConf.create(_cfg(seed="7")))
    assert got == {"method": "lora", "model": "tiny_vit", "dataset": "digits", "task": "classification", "seed": 7,
                   "r": None, "budget": 5000.0, "shots": 4, "fraction": 1.0, "sweep": "budget_sweep"}


def test_budget_record_from_match_budget():
    from torch import nn

    from randlora.adapters import match_budget
    net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    m = match_budget(net, "lora", 640, target_modules=["0", "1", "2", "3"])  # 5 x 128: r=1 and r=2 mixed
    rec = R.budget_record(m)
    assert rec["achieved"] == m.trainable == 640 and rec["deviation"] == 0.0 and rec["knob"] == "r"
    assert rec["rank_counts"] == {"1": 3, "2": 1} and set(rec["ranks"]) == {"0", "1", "2", "3"}
    base = R.new_record(_cfg(), run_dir="/r", config={})
    assert R.check(dict(base, budget_match=rec)) == []


def test_resolved_defaults_are_the_keys_the_run_filled_in():
    composed = {"optim": {"lr": None, "schedule": "cosine"}, "trainer": {"max_epochs": None}, "adapter": {"r": 4}}
    resolved = {"optim": {"lr": 0.01, "schedule": "cosine"}, "trainer": {"max_epochs": 10},
                "adapter": {"r": 4, "alpha": 4.0}}
    assert R.resolved_defaults(composed, resolved) == {"optim.lr": 0.01, "trainer.max_epochs": 10,
                                                       "adapter.alpha": 4.0}


def test_provenance_versions_hardware_and_lr():
    import torch  # noqa: F401  (so the GPU fields are read through it, as in a training process)
    p = R.provenance({"optim": {"lr": 0.003}}, {"optim": {"lr": None}}, devices=2)
    assert p["lr"] == 0.003 and p["resolved_defaults"] == {"optim.lr": 0.003}
    for name, dist in (("torch", "torch"), ("lightning", "lightning"), ("timm", "timm"), ("open_clip", "open_clip_torch"),
                       ("transformers", "transformers"), ("datasets", "datasets"), ("hydra", "hydra-core")):
        assert p["packages"][name] == metadata.version(dist), name
    assert set(R.PACKAGES) <= set(p["packages"]) and "cuda" in p["packages"]
    hw = p["hardware"]
    assert hw["devices"] == 2 and hw["cpu_count"] == os.cpu_count() and hw["cpu"] and hw["memory_gb"] > 0
    assert hw["gpu_count"] == torch.cuda.device_count()
    base = R.new_record(_cfg(), run_dir="/r", config={})
    assert R.check(dict(base, provenance=p)) == []
    json.dumps(p)  # plain JSON


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_git_state_commit_dirty_and_not_a_checkout(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    assert R.git_state(repo) == {"commit": None, "dirty": None}  # no commit yet
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert R.git_state(repo) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert R.git_state(repo) == {"commit": head, "dirty": True}
    # a package folder inside another checkout (site-packages in a repo's .venv) is not that checkout
    inner = repo / ".venv" / "site-packages"
    inner.mkdir(parents=True)
    assert R.git_state(inner) == {"commit": None, "dirty": None}
    assert R.git_state(tmp_path) == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # git missing: null, no exception
    assert R.git_state(repo) == {"commit": None, "dirty": None}


def test_git_state_of_this_checkout():
    """The code randlora was imported from: this worktree's HEAD (tests run from a git checkout)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:  # a source tree without git (an sdist): then there is nothing to compare
        assert R.git_state() == {"commit": None, "dirty": None}
        return
    state = R.git_state()
    assert state["commit"] == head.stdout.strip() and isinstance(state["dirty"], bool)
