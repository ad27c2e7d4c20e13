"""Machine / software description written at the top of every benchmark report."""
from __future__ import annotations

import datetime
import os
import platform
import sys

import torch

from randlora.results import cpu_model


def version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:  # optional dependency missing
        return "not installed"


def describe(device: torch.device, command: str) -> list[str]:
    """Markdown bullet lines: machine, CPU/GPU, versions, date, command, load."""
    gpu = "none"
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return [
        f"- machine: `{platform.node()}`, {platform.system()} {platform.release()}, Python {sys.version.split()[0]}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- GPU: {gpu}",
        f"- versions: torch {torch.__version__}, peft {version('peft')}, timm {version('timm')}, "
        f"open_clip {version('open_clip')}, transformers {version('transformers')}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- load average (1/5/15 min) at the start: {load}",
    ]


def write_report(text: str, out: str | None, log=None) -> None:
    """Write a Markdown report to ``out`` (parents created; nothing when ``out`` is empty or None)."""
    if not out:
        return
    from pathlib import Path
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    if log is not None:
        log(f"wrote {out}")


def loadavg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
