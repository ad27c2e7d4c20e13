"""What a user sees of one run (README quick start): Lightning's lines once (not also through Lightning's
own console handler), no progress bar when the output is not a terminal (one when it is), and the final
summary in the run's train.log as well as on stdout. One short real run shares the assertions. (After a
multirun, the sweep folder, the report command and the resume command: tests/test_sweep_resume.py.)"""
from __future__ import annotations

import io

import pytest

from tests.helpers import compose_cfg, train_cli

RUN = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
       "trainer.limit_test_batches=1"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("front") / "run"
    out = train_cli([*RUN, f"hydra.run.dir={out_dir}"], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, out_dir


@pytest.mark.integration
def test_lightning_lines_printed_once(quick):
    out, _ = quick
    both = out.stdout + out.stderr
    assert both.count("GPU available:") == 1, both[-3000:]
    assert both.count("`Trainer.fit` stopped") == 1
    assert "INFO: GPU available" not in out.stderr  # Lightning's own console handler is gone


@pytest.mark.integration
def test_summary_also_in_train_log(quick):
    out, run_dir = quick
    log = (run_dir / "train.log").read_text()
    assert "== randlora on tiny_vit_digits / digits (seed 42)" in out.stdout
    for line in ("== randlora on tiny_vit_digits / digits (seed 42)", "test accuracy", "trainable params",
                 f"run folder         {run_dir}"):
        assert line in log, log[-2000:]
    assert "GPU available:" in log  # Lightning's lines still reach the log file


@pytest.mark.integration
def test_no_progress_bar_when_output_is_not_a_terminal(quick):
    out, _ = quick
    assert "Epoch 0:" not in out.stdout + out.stderr


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_default_follows_the_terminal(monkeypatch):
    """trainer.enable_progress_bar=null (the default): on when stdout is a terminal; true / false force it."""
    from randlora.training.build import trainer_kwargs
    cfg = compose_cfg([])
    assert cfg.trainer.enable_progress_bar is None
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert trainer_kwargs(cfg)["enable_progress_bar"] is False
    monkeypatch.setattr("sys.stdout", _Terminal())
    assert trainer_kwargs(cfg)["enable_progress_bar"] is True
    assert trainer_kwargs(compose_cfg(["trainer.enable_progress_bar=false"]))["enable_progress_bar"] is False
