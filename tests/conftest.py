import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# A run that names no folder of its own writes under paths.root_dir (${oc.env:PROJECT_ROOT,.}/logs): during the
# tests that is a temporary folder, never the repository (checked at the end of the session, below).
os.environ["PROJECT_ROOT"] = tempfile.mkdtemp(prefix="randlora-tests-")
_WRITTEN_BY_RUNS = ("logs", "outputs", "multirun", "wandb", "lightning_logs")
_PRESENT_AT_START = {d for d in _WRITTEN_BY_RUNS if (ROOT / d).exists()}

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# tests/test_cuda.py needs a GPU: collected only where one is (`make test-cuda`), never skipped in place
collect_ignore = [] if torch.cuda.is_available() else ["test_cuda.py"]

torch.set_num_threads(1)  # robust to other processes on 2 cores (OpenMP oversubscription is 50x slower)


class TinyNet(nn.Module):
    """Square, wide, narrow Linear layers, a fused-qkv MultiheadAttention and a head."""

    def __init__(self, d=12, hidden=20, classes=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.sq = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.down(torch.nn.functional.gelu(self.up(x)))
        x = self.sq(x)
        return self.head(x.mean(1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 5, 12, generator=g), torch.randint(0, 3, (4,), generator=g)


@pytest.fixture
def interrupt(monkeypatch):
    """``callbacks.kill_at_step=N`` stops the run in-process after step N by raising
    tests.helpers.Interrupted (no checkpoint is saved at that step)."""
    import randlora.training.callbacks as callbacks
    from tests.helpers import Interrupted

    def stop(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise Interrupted(f"interrupted after step {trainer.global_step}")
    monkeypatch.setattr(callbacks.KillAtStep, "on_train_batch_end", stop)


def pytest_sessionfinish(session, exitstatus):
    """The suite writes nothing into the repository tree: a folder a run would create there fails it."""
    new = [d for d in _WRITTEN_BY_RUNS if (ROOT / d).exists() and d not in _PRESENT_AT_START]
    if new:
        print(f"\nerror: the tests wrote {new} into the repository ({ROOT}); a test must write under tmp_path")
        session.exitstatus = 1


# The two tiers. Unit: the library, the configs, loaders and messages, in about a minute
# (`make test-unit`). Integration: whatever runs the training pipeline, the CLI or other processes (DDP,
# FSDP, sweeps, kill / resume, W&B, benchmarks); `make test` runs both, and so does CI.
INTEGRATION_FILES = {"test_fsdp.py", "test_compile.py", "test_train.py", "test_sweeps.py", "test_multirun.py",
                     "test_resume.py", "test_wandb.py", "test_reliability.py", "test_run_record.py",
                     "test_distributed.py", "test_cuda.py", "test_export.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).name in INTEGRATION_FILES or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)
