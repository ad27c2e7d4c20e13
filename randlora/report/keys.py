"""Which jobs are one experiment, in which order they are shown, and what their labels say.

A configuration is (method, model, dataset, size setting, data regime, variant): its seeds are
averaged. The *setting* is the budget when one was given, else the rank; the *regime* is k-shot or a
fraction of the training set; the *variant* is every other command-line override that changes the
experiment (``adapter.distribution=binary``, a learning rate ...). Labels name only what differs
between the configurations shown (:func:`minimal_variants`).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from .collect import num

# the paper's names for the methods (tables, plots); the report's CSVs keep the config names
DISPLAY = {"full": "FT", "lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "randlora": "RandLoRA",
           "dora_dr": "DoRA-DR", "nola": "NoLA"}
# the commonsense tasks in the paper's order (Table 15) and names
TASK_DISPLAY = {"boolq": "BoolQ", "piqa": "PIQA", "siqa": "SIQA", "hellaswag": "HellaSwag",
                "winogrande": "WinoGrande", "arc_e": "ARC-e", "arc_c": "ARC-c", "obqa": "OBQA"}


def method_order() -> tuple[str, ...]:
    """The adapter registry's order (``randlora.adapters.METHODS``): full first, then as registered."""
    from ..adapters import METHODS
    return tuple(METHODS)


def method_rank(method: Any) -> tuple:
    order = method_order()
    m = str(method)
    return (order.index(m), "") if m in order else (len(order), m)


def display_method(method: Any) -> str:
    return DISPLAY.get(str(method), str(method))


def regime(row: dict) -> tuple:
    """Sortable data regime: k-shot first (by k), then fractions of the training set."""
    if row.get("shots") is not None:
        return (0, float(row["shots"]))
    f = row.get("fraction")
    return (1, 1.0 if f is None else float(f))


def regime_label(row: dict) -> str:
    kind, v = regime(row)
    return f"{v:g}-shot" if kind == 0 else f"{v * 100:g}%"


def regime_of(key: tuple) -> dict:
    """A row-like dict of a :func:`regime` tuple (for :func:`regime_label`)."""
    kind, v = key
    return {"shots": v} if kind == 0 else {"fraction": v}


def setting(row: dict) -> tuple:
    """The size setting: the budget if one was given, else the rank (None for full)."""
    if row.get("budget") is not None:
        return ("budget", float(row["budget"]))
    r = num(row.get("r"))
    if r is not None:
        return ("r", r)
    return ("none", 0.0)


def human(x: Any) -> str:
    """A count in K / M / G (3 significant digits): 98304 -> 98.3K."""
    v = num(x)
    if v is None:
        return ""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def setting_label(s: dict) -> str:
    if s.get("budget") is not None:
        return f"budget {human(s['budget'])}"
    if s.get("r") is not None:
        return f"r={s['r']}"
    return "-"


# Overrides that do not change the experiment: the seed (what the report averages over), where and
# how the job ran, and the choices the rest of the key already holds.
NOT_EXPERIMENT = ("seed", "trainer", "trainer.devices", "trainer.num_nodes", "trainer.accelerator",
                  "trainer.strategy", "data.num_workers", "data.eval_batch_size", "logger", "wandb", "callbacks",
                  "resume", "ckpt_path", "group", "paths", "output_dir", "compile", "model", "data",
                  "adapter.r", "adapter.budget", "data.shots", "data.fraction")
NOT_EXPERIMENT_PREFIXES = ("hydra.", "paths.", "logger.", "wandb.", "callbacks.")


def variant(row: dict) -> str:
    """The command-line overrides that make this run another experiment than its method / model /
    dataset / size / regime say (``adapter.distribution=binary``, ``task.loss=...``, another learning
    rate ...), sorted; "" for none. Seeds of one experiment share it, so they are averaged together,
    and runs that differ otherwise are never averaged as if they were seeds."""
    out = []
    for o in row.get("overrides") or []:
        key, eq, value = str(o).lstrip("+~").partition("=")
        if not eq or key in NOT_EXPERIMENT or key.startswith(NOT_EXPERIMENT_PREFIXES):
            continue
        if key == "adapter" and value == str(row.get("method")):
            continue
        out.append(f"{key}={value}")
    return " ".join(sorted(out))


def config_key(row: dict) -> tuple:
    """(method, model, dataset, r-or-budget, shots-or-fraction, variant): the rows averaged over seeds."""
    return (str(row.get("method")), str(row.get("model")), str(row.get("dataset")),
            setting(row), regime(row), variant(row))


def minimal_variants(variants: Iterable[str]) -> dict[str, str]:
    """{variant: what of it tells it apart}: an override every variant holds with the same value
    (``sweep=budget_sweep``, ``trainer.max_epochs=1`` on every job of a sweep) is dropped from all."""
    vs = sorted(set(variants))
    tokens = [set(v.split()) for v in vs]
    shared = set.intersection(*tokens) if tokens else set()
    return {v: " ".join(t for t in v.split() if t not in shared) for v in vs}


def label(method: Any, shown_variant: str) -> str:
    """``randlora [adapter.distribution=binary]``: the method, and its variant when it has one."""
    return f"{method} [{shown_variant}]" if shown_variant else str(method)


def column_label(s: dict, show_setting: bool) -> str:
    """A paper-style name: LoRA-32 (a rank), LoRA 100K (a budget), FT; plus the shown variant."""
    name = display_method(s["method"])
    if show_setting:
        if s.get("budget") is not None:
            name += f" {human(s['budget'])}"
        elif s.get("r") is not None and s["method"] != "full":
            name += f"-{s['r']}"
    if s.get("shown_variant"):
        name += f" [{s['shown_variant']}]"
    return name


def natural(text: Any) -> list:
    """Sort key that puts job 2 before job 10."""
    import re
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(text)) if t]


def sort_configs(summary: Sequence[dict]) -> list[dict]:
    """Configurations in the report's order: method (registry order), variant, then size."""
    return sorted(summary, key=lambda s: (method_rank(s["method"]), s.get("shown_variant") or "",
                                          s["trainable"] if s.get("trainable") is not None else -1,
                                          setting(s)))
