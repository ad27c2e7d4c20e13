"""Every input refused before work starts, one test per row of docs/refused-inputs.md.

The tests read the rows of that document (example overrides, the message excerpt, the function that
checks it), so the table and the tests cannot drift: a row whose input is accepted, whose message
changed, or that is checked elsewhere fails here. The second table of the document lists the refusals
tested by tests/test_reliability.py (``BAD``); a test checks that it matches that list row for row.
"""
from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

import pytest

from randlora.training.config import check_known_keys, known_keys, validate_config
from tests.bad_inputs import BAD
from tests.helpers import ROOT, compose_cfg, refused_in_one_line, train_cli

DOC = ROOT / "docs" / "refused-inputs.md"
PKG = str(ROOT / "randlora")


def doc_rows(section: str) -> list[tuple[str, list[str], str, str]]:
    """(key, overrides, message excerpt, checked in) of each row of the table under ``## <section>``."""
    text = DOC.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    rows = []
    for line in text[start:end if end > 0 else None].splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, line
        key, example, message, where = (re.sub(r"^`|`$", "", c) for c in cells)
        rows.append((key, example.split(), message.replace("\\|", "|"), where))
    assert rows, f"no rows under '## {section}' in {DOC}"
    return rows


NEW = doc_rows("Refused since issue 20")
EARLIER = doc_rows("Refused before issue 20")
SWEEP = doc_rows("Refused when a sweep folder is continued")


def _raised_in(exc: BaseException) -> str:
    """``randlora/<module>.py::<function>`` of the innermost randlora frame that raised ``exc``."""
    where = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        path = frame.f_code.co_filename
        if path.startswith(PKG):
            where = f"{Path(path).relative_to(ROOT)}::{frame.f_code.co_name}"
    return where


def _refusal(overrides, message, where) -> str:
    error = refused_in_one_line(overrides, message)
    assert _raised_in(error) == where
    return str(error)


@pytest.mark.parametrize("key,overrides,message,where", NEW, ids=[" ".join(o) for _, o, _, _ in NEW])
def test_refused_since_issue_20(key, overrides, message, where):
    """Each row was accepted silently, or failed late with a traceback or a misleading message."""
    text = _refusal(overrides, message, where)
    assert key in text  # the line names the key


@pytest.mark.parametrize("key,overrides,message,where", EARLIER, ids=[" ".join(o) for _, o, _, _ in EARLIER])
def test_refused_before_issue_20(key, overrides, message, where):
    _refusal(overrides, message, where)


LOCK_HOLDER = ("import sys; from randlora.training.folder import acquire; acquire(sys.argv[1]); "
               "print('locked', flush=True); sys.stdin.read()")


@pytest.mark.parametrize("key,overrides,message,where", SWEEP, ids=[k for k, _, _, _ in SWEEP])
def test_refused_when_a_sweep_is_continued(key, overrides, message, where, tmp_path):
    """A sweep folder with one job (the example's overrides) whose recorded config has the row's key
    edited, as if a default changed since it ran (``.lock``: whose folder another process holds)."""
    import subprocess

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from randlora.training.folder import RunFolderError, release
    from randlora.training.sweep import check_sweep_folder
    task = [o for o in overrides if o != "-m"]
    sweep = tmp_path / "s"
    job = sweep / "0"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(task), job / ".hydra" / "overrides.yaml")
    holder = None
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            recorded = OmegaConf.to_container(compose(config_name="train", overrides=task), resolve=False)
            if key == ".lock":
                (job / "results.json").write_text('{"status": "running"}')
                holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(job)], cwd=ROOT,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                assert holder.stdout.readline().strip() == "locked"
            else:
                *path, name = key.split(".")
                node = recorded
                for part in path:
                    node = node[part]
                node[name] = 7
            OmegaConf.save(OmegaConf.create(recorded), job / ".hydra" / "config.yaml")
            cfg = compose(config_name="train", overrides=[*task, f"hydra.sweep.dir={sweep}"],
                          return_hydra_config=True)
            with pytest.raises(RunFolderError) as e:
                check_sweep_folder(cfg)
    finally:
        release(sweep)
        if holder is not None:
            holder.kill()
            holder.wait()
    text = str(e.value)
    assert message in text and str(job) in text
    assert "\n" not in text and len(text) < 1500
    assert _raised_in(e.value) == where
    assert sorted(p.name for p in job.iterdir()) == sorted([".hydra"] + (["results.json", ".lock"] if holder else []))


def test_earlier_table_is_test_reliability_bad():
    assert [(o, m) for _, o, m, _ in EARLIER] == [(list(o), m) for o, m in BAD]


@pytest.mark.slow
def test_shipped_configs_use_known_keys_only():
    """Every option of every config group composes to a config whose keys are all known, so the key
    check refuses typos and never a shipped config."""
    root = ROOT / "configs"
    n = 0
    for group in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
        for f in sorted((root / group).rglob("*.yaml")):
            option = f.relative_to(root / group).with_suffix("").as_posix()
            prefix = "+" if group in ("basis", "paper") else ""  # not in train.yaml's defaults list
            check_known_keys(compose_cfg([f"{prefix}{group}={option}"]))
            n += 1
    assert n > 100


def test_known_keys_follow_the_yaml_files(tmp_path):
    """A key added to a shipped YAML file is known without touching randlora/training/config.py; a
    ``# @package`` header places a file's keys where Hydra puts them."""
    (tmp_path / "data").mkdir()
    (tmp_path / "setting").mkdir()
    (tmp_path / "train.yaml").write_text("defaults:\n  - data: a\nseed: 1\noptim: {lr: 1}\n")
    (tmp_path / "data" / "a.yaml").write_text("name: a\nnew_key: 3\nsub: {x: 1}\n")
    (tmp_path / "setting" / "k.yaml").write_text("# @package data\nshots: 1\n")
    tree = known_keys(str(tmp_path))
    assert tree["data"] == {"name": None, "new_key": None, "sub": {"x": None}, "shots": None}
    assert tree["optim"] == {"lr": None} and tree["seed"] is None
    check_known_keys({"seed": 2, "data": {"new_key": 1, "sub": {"x": 2}}}, config_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data\.sub\.y is not a known key of data\.sub"):
        check_known_keys({"data": {"sub": {"y": 2}}}, config_dir=str(tmp_path))


@pytest.mark.slow
def test_cli_refusal_is_one_line_exit_2_no_traceback(tmp_path):
    out = train_cli(["++trainer.max_epoch=3", f"hydra.run.dir={tmp_path}"], timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines == ["error: trainer.max_epoch is not a known key of trainer (it would be ignored); "
                     "did you mean trainer.max_epochs? Fix the spelling or remove it"], out.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


if __name__ == "__main__":  # print the computed "checked in" of rows (to write new rows of the table)
    for ov in sys.argv[1:]:
        try:
            validate_config(compose_cfg(ov.split()))
            print(ov, "ACCEPTED")
        except ValueError as e:
            print(f"| `{ov}` | {e} | `{_raised_in(e)}` |")
