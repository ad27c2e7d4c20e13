"""The ``results.json`` of a training job: its schema as data, and the helpers that write and check it.

One job, one file: ``<run_dir>/results.json``. The writer (``randlora/train.py``, and ``randlora/training/launch.py``
for a job that died) builds the record with :func:`new_record` and :func:`summary_fields`, adds
:func:`provenance`; the report (``randlora/report/``) reads its columns through :func:`report_fields`;
``docs/results-schema.md`` is generated from :data:`SCHEMA` (``python -m randlora.results --markdown``) and
a test keeps the two equal; :func:`check` validates a record against the schema.

A field's ``when`` says in which records it is present:

* ``always``: from the first write (``"status": "running"``), also in the record the sweep writes for a job
  that never started;
* ``started``: once the job has built its model and data (a job that fails before lacks it);
* ``completed``: filled once ``"status": "completed"`` (the section may be present, empty, before);
* ``sometimes``: only where its meaning says so (a budget was given, a GPU, a method ...).

No Lightning or Hydra import here: the report and the docs read this module without the training stack.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

RESULTS_FILE = "results.json"
WHEN = ("always", "started", "completed", "sometimes")
TYPES = ("string", "integer", "number", "boolean", "object", "array", "any")


@dataclass(frozen=True)
class Field:
    """One key of results.json.

    ``type``: JSON type names joined by ``|`` (``"integer|null"``). An ``object`` either has named
    ``fields`` (a closed set: other keys are an error) or ``values`` (any key, values of that type), or
    neither (free-form, e.g. the resolved config). An ``array`` has ``items``: a type name, or the
    fields of its object items. ``column``: the report's name for the value (one row per job);
    ``aggregate``: how the report combines a configuration's seeds (``common``: the most common value,
    ``mean``, ``max``); ``identifies``: one of the fields that say which job this is (the W&B config
    keys, the report's grouping)."""

    name: str
    type: str
    meaning: str
    when: str = "always"
    fields: tuple["Field", ...] = ()
    values: str | None = None
    items: "str | tuple[Field, ...] | None" = None
    column: str | None = None
    aggregate: str | None = None
    identifies: bool = False

    def __post_init__(self):
        bad = [t for t in self.type.split("|") if t not in TYPES + ("null",)]
        if bad or self.when not in WHEN:
            raise ValueError(f"field {self.name}: type {self.type!r} / when {self.when!r} not one of "
                             f"{TYPES + ('null',)} / {WHEN}")

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self.type.split("|"))

    def get(self, name: str) -> "Field":
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")


F = Field  # the schema below reads as a table

_SUMMARY = (
    F("method", "string", "adapter method: full, lora, dora, vera, randlora, dora_dr, nola", identifies=True,
      column="method"),
    F("model", "string", "model config name (`model.name`)", identifies=True, column="model"),
    F("dataset", "string", "data config name (`data.name`)", identifies=True, column="dataset"),
    F("task", "string", "classification | clip | causal_lm", identifies=True, column="task"),
    F("seed", "integer", "the run seed (head init, data order)", identifies=True, column="seed"),
    F("r", "integer|null", "the rank the adapter was built with (after a budget was matched: the rank on most "
      "layers, `budget_match.rank_counts` has the others); null for full fine-tuning", identifies=True, column="r"),
    F("budget", "number|null", "`adapter.budget` when given, else null", identifies=True, column="budget"),
    F("shots", "integer|null", "training images per class (`data.shots`), or null for the whole set",
      identifies=True, column="shots"),
    F("fraction", "number", "fraction of the training set (`data.fraction`; 1.0 for all of it)", identifies=True,
      column="fraction"),
    F("sweep", "string|null", "sweep / W&B group name (`group`), or null", identifies=True, column="sweep"),
)

PARAMS = F("params", "object", "parameter counts ({} until the model is built)", fields=(
    F("trainable", "integer", "parameters the optimiser updates (adapter + head / trainable_modules)",
      when="started", column="trainable", aggregate="common"),
    F("total", "integer", "all parameters of the adapted model", when="started", column="total", aggregate="common"),
    F("ratio", "number", "trainable / total", when="started", column="ratio", aggregate="common"),
    F("adapter", "integer", "adapter parameters alone (full fine-tuning: = trainable)", when="started",
      column="adapter_params", aggregate="common"),
    F("lora_equivalent_rank", "number|null", "the LoRA rank with the same adapter parameters on the same "
      "layers (null for full fine-tuning)", when="started", column="lora_equivalent_rank", aggregate="common"),
    F("adapter_during_training", "integer", "DoRA-DR: adapter parameters trained before pruning",
      when="sometimes"),
    F("adapter_stored", "integer", "DoRA-DR: adapter parameters kept after pruning", when="sometimes"),
))

METRICS = F("metrics", "object", "final metrics: every scalar the trainer logged last, then the test metrics "
            "(`test/acc`; commonsense: `test/acc_<task>` per task and `test/acc` their mean); {} until completed",
            values="number")

_PATHS = F("compute_paths", "object", "RandLoRA only: how many adapted layers ran each compute path "
           "(factorised / merged), at the first and the last step", when="sometimes", fields=(
               F("first_step", "object", "{path: layers} at the first step", values="integer"),
               F("last_step", "object", "{path: layers} at the last step", values="integer")))

PERF = F("perf", "object", "speed and memory of training ({} until completed)", fields=(
    F("step_time_s", "number|null", "median training step (CUDA: timed with CUDA events); null when no step "
      "was timed", when="completed", column="step_time_s", aggregate="mean"),
    F("samples_per_s", "number|null", "steady-state throughput: the first 3 steps and steps over 10x the median "
      "(a compile for a new batch shape) are not counted", when="completed", column="samples_per_s",
      aggregate="mean"),
    F("slow_steps", "integer", "steps over 10x the median (not counted in samples_per_s)", when="sometimes"),
    F("peak_memory_mb", "number|null", "peak during training (fit incl. validation): the CUDA allocator's, or "
      "the process's max RSS on CPU (both reset at train start: each job of a multirun reports its own)",
      when="completed", column="peak_memory_mb", aggregate="max"),
    F("memory_at_train_start_mb", "number", "CUDA only: allocated when training started", when="sometimes"),
    _PATHS,
    F("train_time_s", "number", "wall time of fit (and test), seconds", when="completed"),
))

COMPILE = F("compile", "object", "torch.compile as applied (`compile.*`)", when="started", fields=(
    F("enabled", "boolean", "whether the model was compiled"),
    F("scope", "string", "blocks | model", when="sometimes"),
    F("mode", "string|null", "torch.compile mode (null: inductor's default)", when="sometimes"),
    F("backend", "string", "torch.compile backend", when="sometimes"),
    F("fullgraph", "boolean", "torch.compile fullgraph", when="sometimes"),
    F("dynamic", "boolean|null", "torch.compile dynamic (null: automatic)", when="sometimes"),
    F("modules", "integer", "modules compiled", when="sometimes"),
    F("classes", "array", "their classes", when="sometimes", items="string"),
    F("adapted_layers_not_compiled", "integer", "adapted layers outside the compiled blocks (they run eager)",
      when="sometimes"),
))

DATA = F("data", "object", "what the run trained and evaluated on (`ImageDataModule.sampling_summary()`); {} for "
         "instruction data", when="started", fields=(
             F("shots_requested", "integer|null", "`data.shots`", when="sometimes"),
             F("fraction", "number", "`data.fraction`", when="sometimes"),
             F("train_per_class_min", "integer", "fewest training images of a class: k-shot takes every image of "
               "a class that has fewer than k (the paper's code does the same)", when="sometimes"),
             F("train_per_class_max", "integer", "most training images of a class", when="sometimes"),
             F("classes_below_shots", "integer", "classes with fewer than k images", when="sometimes"),
             F("train_size", "integer", "images trained on", when="sometimes"),
             F("train_pool_size", "integer", "images available for training (after any held-out validation, before "
               "shots and fraction)", when="sometimes"),
             F("val_size", "integer", "validation images", when="sometimes"),
             F("test_size", "integer", "test images", when="sometimes"),
             F("val_source", "string", "\"split 'validation'\", or \"held out: data.val_fraction=0.05 of 'train'\"",
               when="sometimes"),
             F("num_classes", "integer", "classes", when="sometimes"),
             F("class_names", "string|null", "where the class names come from: curated (vision_datasets.json) | "
               "source | config | builtin | null", when="sometimes"),
         ))

IDENTITY = F("identity", "object", "what a resume or an evaluation of a checkpoint must match", when="started",
             fields=(
                 F("model", "object", "the base model, before injection", fields=(
                     F("name", "string|null", "`model.name`"),
                     F("arch", "string|null", "`model.arch`"),
                     F("class", "string", "the backbone's class (module.qualname)"),
                     F("fingerprint", "string", "SHA-256 (16 hex) over every state-dict tensor's name, dtype, shape "
                       "and 64 evenly spaced values"))),
                 F("data", "object", "the dataset (its location, `data.path`, is not part of it)", fields=(
                     F("name", "string|null", "`data.name`"),
                     F("source", "string|null", "`data.source`"),
                     F("hub_id", "string|null", "`data.hub_id`"),
                     F("splits", "object", "{train, val, test}: examples per split", values="integer"),
                     F("classes", "integer|null", "classes (null for instruction data)"),
                     F("labels", "string", "SHA-256 (16 hex) of the labels of each split (instruction data: of its "
                       "records)"))),
             ))

_RESUMED = F("resumed_from", "object|null", "the checkpoint the attempt started from, or null", fields=(
    F("checkpoint", "string", "its path"),
    F("global_step", "integer", "its global step"),
    F("epoch", "integer|null", "its epoch"),
))

ATTEMPTS = F("attempts", "array", "every attempt on this run folder, oldest first (a resume adds one)",
             when="started", items=(
                 F("started", "string", "ISO 8601 time with offset"),
                 F("ended", "string|null", "ISO 8601 time, null while running"),
                 F("status", "string", "running | completed | failed | interrupted (it was running when it ended: "
                   "a kill)"),
                 F("error", "string|null", "the error of a failed attempt"),
                 F("pid", "integer", "process id"),
                 F("host", "string", "host name"),
                 F("command_overrides", "array", "the attempt's own command-line overrides", items="string"),
                 _RESUMED,
                 F("metrics", "object", "the attempt's final metrics (completed attempts)", when="sometimes",
                   values="number"),
                 # results.json written before attempt histories existed become one attempt of these keys
                 F("overrides", "array|null", "(a record older than attempt histories) the run's overrides",
                   when="sometimes", items="string"),
             ))

EXIT = F("exit", "object", "a job the sweep recorded as failed (its process ended without a final status: killed "
         "by a signal such as the out-of-memory killer's SIGKILL, or exited before recording its error)",
         when="sometimes", fields=(
             F("returncode", "integer|null", "negative for a signal; null when unknown"),
             F("signal", "integer|null", "the signal number, or null"),
             F("after_s", "number", "seconds after the job started"),
         ))

BUDGET_MATCH = F("budget_match", "object", "present when `adapter.budget` was given: what "
                 "`randlora.adapters.match_budget` chose (`budget_record`)", when="sometimes", fields=(
                     F("budget", "number", "the requested adapter parameters"),
                     F("achieved", "integer", "the adapter parameters the chosen ranks give on the targets"),
                     F("deviation", "number", "(achieved - budget) / budget", column="budget_deviation",
                       aggregate="common"),
                     F("tolerance", "number", "the accepted relative deviation"),
                     F("knob", "string", "the option matched: r (NoLA: k)"),
                     F("rank_counts", "object", "{value of the knob: layers}, most common first", values="integer"),
                     F("ranks", "object", "{layer: value of the knob} for every target", values="integer"),
                     F("warnings", "array", "degenerate regimes (also issued as BudgetWarning or its subclass "
                       "ScalingWarning; each is also in `adapter_warnings`)", items="string"),
                 ))

LOWRANK = F("lowrank", "object", "\"full rank matters\": the trained update truncated to the rank of the LoRA with the "
            "same parameter count (`lowrank_error`: auto = small models, true, false; "
            "`randlora.training.build.lowrank_summary`); absent for full fine-tuning", when="sometimes", fields=(
                F("rank", "integer", "k = floor(params.lora_equivalent_rank), at least 1", column="lowrank_rank",
                  aggregate="common"),
                F("overall_rel_error", "number", "||dW - dW_k||_F / ||dW||_F over all adapted layers stacked "
                  "(0: the update fits in rank k, 1: nothing of it does)", column="lowrank_error", aggregate="mean"),
                F("mean_rel_error", "number", "the per-layer relative errors' mean", column="lowrank_mean_error",
                  aggregate="mean"),
                F("max_rel_error", "number", "the largest per-layer relative error"),
                F("rank99_mean", "number", "mean over layers of the smallest rank keeping 99 % of ||dW||_F^2",
                  column="lowrank_rank99", aggregate="mean"),
                F("layers", "object", "{layer: relative error at rank k}", values="number"),
            ))

ADAPTER_SOURCE = F("adapter_source", "object", "present when `adapter.from_peft` was given: the Hugging Face PEFT "
                   "adapter the run imported and evaluated (`method` and `r` are then the imported adapter's)",
                   when="sometimes", fields=(
                       F("path", "string", "the PEFT adapter folder (absolute)"),
                       F("adapter_config_sha256", "string", "SHA-256 of its adapter_config.json"),
                       F("weights_sha256", "string", "SHA-256 of its adapter_model.safetensors (or .bin)"),
                       F("peft_type", "string|null", "`peft_type` of adapter_config.json (LORA, VERA, RANDLORA)"),
                   ))
ADAPTER_WARNINGS = F("adapter_warnings", "array", "present when the adapter was built in a regime where a comparison "
                     "measures something else than the method (`randlora.adapters`: BudgetWarning for a budget's "
                     "degenerate regimes, ScalingWarning for a scaling far from the method's convention, with or "
                     "without a budget; docs/budgets.md §3); also printed to stderr", when="sometimes", items=(
                         F("category", "string", "the warning class: BudgetWarning | ScalingWarning"),
                         F("message", "string", "what is being compared, and what to set instead"),
                     ))

PACKAGES = ("python", "torch", "torchvision", "lightning", "timm", "open_clip", "transformers", "peft", "datasets",
            "hydra", "numpy", "randlora")
# import name -> distribution name, for those that differ
_DISTRIBUTIONS = {"open_clip": "open_clip_torch", "hydra": "hydra-core"}

PROVENANCE = F("provenance", "object", "what produced the numbers (`provenance()`)", when="started", fields=(
    F("lr", "number|null", "the learning rate the run trained with (`optim.lr` after the method's per-task "
      "default was applied)", column="lr", aggregate="common"),
    F("resolved_defaults", "object", "{dotted config key: value} for every key the config left null or unset and "
      "the run resolved (the learning rate, the epochs, the bases dtype, ...)"),
    F("packages", "object", "installed versions: " + ", ".join(PACKAGES) + " (null: not installed), and "
      "cuda (torch's CUDA build, null without)", values="string|null"),
    F("git", "object", "the code's git checkout", fields=(
        F("commit", "string|null", "HEAD of the checkout the randlora package was imported from; null when it "
          "is not a git checkout or git is missing"),
        F("dirty", "boolean|null", "whether tracked or untracked files differ from that commit; null as above"))),
    F("hardware", "object", "the machine", fields=(
        F("host", "string", "host name"),
        F("platform", "string", "OS and architecture"),
        F("cpu", "string", "CPU model"),
        F("cpu_count", "integer|null", "logical CPUs"),
        F("memory_gb", "number|null", "physical memory"),
        F("gpu", "string|null", "GPU model (the first device's; null without CUDA)"),
        F("gpu_count", "integer", "CUDA devices visible"),
        F("devices", "integer|null", "devices the run used (world size x nodes), as the writer says"))),
))

SCHEMA: tuple[Field, ...] = (
    F("status", "string", "running | completed | failed (a job still \"running\" when nothing holds its folder "
      "was killed)", column="status"),
    F("error", "string|null", "failed: \"ExceptionType: first line of the message\"", column="error"),
    *_SUMMARY,
    PARAMS,
    METRICS,
    PERF,
    F("run_dir", "string", "the run folder (absolute)", column="recorded_run_dir"),
    F("overrides", "array", "the run's own command-line overrides (a resume re-applies them; each attempt's "
      "command line is in `attempts`)", items="string", column="overrides"),
    F("config", "object", "the resolved config (`paths` included)"),
    COMPILE,
    DATA,
    IDENTITY,
    ATTEMPTS,
    LOWRANK,
    F("bases_checksum", "string|null", "SHA-256 (16 hex) of the shared random bases (RandLoRA, VeRA, NoLA); null "
      "for methods without", when="completed"),
    PROVENANCE,
    BUDGET_MATCH,
    ADAPTER_SOURCE,
    ADAPTER_WARNINGS,
    EXIT,
)

IDENTIFYING = tuple(f.name for f in SCHEMA if f.identifies)
# the fields the W&B config and the report's grouping use (the old train.RUN_FIELDS: "status" first)
RUN_FIELDS = ("status",) + IDENTIFYING


def field(path: str) -> Field:
    """The field at a dotted path (``"perf.step_time_s"``); KeyError if the schema has none."""
    parts = path.split(".")
    node = next((f for f in SCHEMA if f.name == parts[0]), None)
    if node is None:
        raise KeyError(f"results.json has no field {parts[0]!r}")
    for p in parts[1:]:
        node = node.get(p)
    return node


def walk(fields: Iterable[Field] = SCHEMA, prefix: str = "") -> Iterator[tuple[str, Field]]:
    """Every (dotted path, field) of the schema, depth first (array items are not entered)."""
    for f in fields:
        path = f"{prefix}{f.name}"
        yield path, f
        yield from walk(f.fields, path + ".")


def report_fields() -> list[tuple[str, Field]]:
    """(dotted path, field) of every field the report reads into its rows (``Field.column``)."""
    return [(p, f) for p, f in walk() if f.column]


def lookup(record: Mapping, path: str, default=None):
    """The value at a dotted path of a record (``default`` where a part is missing or not an object)."""
    node: Any = record
    for p in path.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return node


# ------------------------------------------------------------------------------------------- writing
def _cfg_get(cfg, path: str, default=None):
    """A dotted key of a config-like mapping (a dict or an OmegaConf DictConfig)."""
    node = cfg
    for p in path.split("."):
        if node is None:
            return default
        try:
            node = node.get(p)
        except AttributeError:
            return default
    return default if node is None else node


def summary_fields(cfg) -> dict:
    """The identifying fields (:data:`IDENTIFYING`) of the job a config describes: ``cfg`` is the
    composed config, a DictConfig or a plain dict with ``adapter``, ``model``, ``data``, ``task``,
    ``seed`` and ``group``. ``r`` is the configured rank (the writer replaces it with the built one)."""
    seed = _cfg_get(cfg, "seed")
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        pass
    fraction = _cfg_get(cfg, "data.fraction", 1.0)
    return {"method": _cfg_get(cfg, "adapter.method"), "model": _cfg_get(cfg, "model.name"),
            "dataset": _cfg_get(cfg, "data.name"), "task": _cfg_get(cfg, "task.kind"), "seed": seed,
            "r": _cfg_get(cfg, "adapter.r"), "budget": _cfg_get(cfg, "adapter.budget"),
            "shots": _cfg_get(cfg, "data.shots"), "fraction": float(fraction), "sweep": _cfg_get(cfg, "group")}


def new_record(cfg, *, run_dir, overrides: Iterable[str] = (), config: Mapping | None = None) -> dict:
    """The record a job writes first (``"status": "running"``): every ``always`` field, in schema order.

    ``cfg``: the job's config (see :func:`summary_fields`); ``run_dir``: its folder; ``overrides``: its
    command-line overrides; ``config``: the resolved config as a plain dict (the writer's)."""
    rec = {"status": "running", "error": None, **summary_fields(cfg), "params": {}, "metrics": {}, "perf": {},
           "run_dir": str(run_dir), "overrides": [str(o) for o in overrides],
           "config": dict(config) if config is not None else {}}
    return {f.name: rec[f.name] for f in SCHEMA if f.name in rec}


def budget_record(match) -> dict:
    """The ``budget_match`` section from what ``randlora.adapters.match_budget`` returned (a ``BudgetMatch``)."""
    return {"budget": float(match.budget), "achieved": int(match.trainable), "deviation": float(match.deviation),
            "tolerance": float(match.tolerance), "knob": str(match.knob),
            "rank_counts": {str(k): int(v) for k, v in match.rank_counts.items()},
            "ranks": {str(k): int(v) for k, v in match.ranks.items()}, "warnings": [str(w) for w in match.warnings]}


# ------------------------------------------------------------------------------------------- provenance
def flatten(d, prefix: str = "") -> dict:
    """Nested mappings as one level of dotted keys (an empty mapping stays a value)."""
    out = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    return out


def resolved_defaults(composed: Mapping | None, resolved: Mapping) -> dict:
    """{dotted key: value} of the keys ``composed`` left null (or had not) that ``resolved`` sets."""
    before = flatten(composed or {})
    return {k: v for k, v in flatten(resolved).items() if v is not None and before.get(k) is None}


def package_versions(names: Iterable[str] = PACKAGES) -> dict:
    """{name: installed version or None}, from the installed distributions' metadata (nothing imported)."""
    from importlib import metadata
    out: dict = {}
    for name in names:
        if name == "python":
            out[name] = platform.python_version()
            continue
        try:
            out[name] = metadata.version(_DISTRIBUTIONS.get(name, name))
        except metadata.PackageNotFoundError:
            out[name] = None
    torch = sys.modules.get("torch")
    out["cuda"] = getattr(getattr(torch, "version", None), "cuda", None) if torch is not None else None
    return out


def code_root() -> Path:
    """The folder the randlora package was imported from sits in (a checkout's root, or site-packages)."""
    return Path(__file__).resolve().parent.parent


def git_state(root: str | os.PathLike | None = None, timeout: float = 5.0) -> dict:
    """{"commit", "dirty"} of the git checkout at ``root`` (default: :func:`code_root`); both None when
    ``root`` is not the top of a git work tree (a package installed into site-packages, also one inside
    another repository's virtual environment), when git is missing, or when it does not answer in time."""
    root = Path(root) if root is not None else code_root()
    none = {"commit": None, "dirty": None}

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # status must not take the index lock
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
            return none
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):  # git missing, not executable, too slow
        return none
    if head.returncode != 0:  # a repository without commits
        return none
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gb() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return round(pages * size / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def hardware(devices: int | None = None) -> dict:
    """Host, OS, CPU model and count, memory, GPU model and count (CUDA, through torch when it is imported
    and CUDA is available), and ``devices``: how many the run used (the caller knows; None if not given)."""
    gpu, count = None, 0
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                count = torch.cuda.device_count()
                gpu = torch.cuda.get_device_name(0) if count else None
        except Exception:  # noqa: BLE001 - a broken driver must not fail the record
            pass
    return {"host": platform.node(), "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "memory_gb": _memory_gb(), "gpu": gpu,
            "gpu_count": count, "devices": None if devices is None else int(devices)}


def provenance(config: Mapping, composed: Mapping | None = None, *, devices: int | None = None,
               code_dir: str | os.PathLike | None = None) -> dict:
    """The ``provenance`` section of results.json: what produced the numbers.

    ``config``: the resolved config as a plain dict (every default applied: ``optim.lr`` is the learning
    rate the run trains with); ``composed``: the config as composed, before the run resolved its defaults
    (None: ``resolved_defaults`` is empty); ``devices``: the number of devices the run uses (world size);
    ``code_dir``: the checkout to describe (default: the one randlora was imported from).

    Returns ``{"lr", "resolved_defaults", "packages", "git", "hardware"}`` (see ``SCHEMA``). Takes a few
    milliseconds (two git commands, bounded by a timeout); never raises for a missing git or GPU."""
    lr = lookup(config, "optim.lr")
    return {"lr": None if lr is None else float(lr),
            "resolved_defaults": resolved_defaults(composed, config) if composed is not None else {},
            "packages": package_versions(), "git": git_state(code_dir), "hardware": hardware(devices)}


# ------------------------------------------------------------------------------------------- checking
def _type_ok(value, types: tuple[str, ...]) -> bool:
    for t in types:
        if t == "any" or (t == "null" and value is None):
            return True
        if t == "string" and isinstance(value, str):
            return True
        if t == "integer" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t == "boolean" and isinstance(value, bool):
            return True
        if t == "object" and isinstance(value, Mapping):
            return True
        if t == "array" and isinstance(value, list):
            return True
    return False


def _required(f: Field, status) -> bool:
    return f.when == "always" or (f.when in ("started", "completed") and status == "completed")


def _check_object(value: Mapping, fields: tuple[Field, ...], path: str, status, out: list[str]) -> None:
    known = {f.name for f in fields}
    for k in value:
        if k not in known:
            out.append(f"{path}{k}: not in the schema (randlora/results.py)")
    for f in fields:
        if f.name in value:
            _check_value(value[f.name], f, f"{path}{f.name}", status, out)
        elif _required(f, status):
            out.append(f"{path}{f.name}: missing")


def _check_value(value, f: Field, path: str, status, out: list[str]) -> None:
    if not _type_ok(value, f.types):
        out.append(f"{path}: {type(value).__name__} {value!r:.60}, expected {f.type}")
        return
    if isinstance(value, Mapping):
        if f.fields:
            # a section that is still empty ({} before the model is built / the job completed) is fine
            if value or status == "completed":
                _check_object(value, f.fields, path + ".", status, out)
        elif f.values:
            for k, v in value.items():
                if not _type_ok(v, tuple(f.values.split("|"))):
                    out.append(f"{path}.{k}: {type(v).__name__} {v!r:.60}, expected {f.values}")
    elif isinstance(value, list) and f.items is not None:
        for i, item in enumerate(value):
            if isinstance(f.items, str):
                if not _type_ok(item, tuple(f.items.split("|"))):
                    out.append(f"{path}[{i}]: {type(item).__name__} {item!r:.60}, expected {f.items}")
            elif not isinstance(item, Mapping):
                out.append(f"{path}[{i}]: {type(item).__name__}, expected object")
            else:
                _check_object(item, f.items, f"{path}[{i}].", status, out)


def check(record: Mapping, missing_ok: Iterable[str] = ()) -> list[str]:
    """Every way ``record`` departs from the schema, one line each (an empty list: it conforms).

    Checked: keys the schema does not know (also inside closed sections), types (NaN is a number),
    and presence by ``when`` and the record's status. ``missing_ok``: dotted paths whose absence is
    not reported."""
    out: list[str] = []
    if not isinstance(record, Mapping):
        return [f"results.json must be a JSON object, got {type(record).__name__}"]
    _check_object(record, SCHEMA, "", record.get("status"), out)
    skip = tuple(missing_ok)
    return [p for p in out if not (p.endswith(": missing") and p[: -len(": missing")] in skip)]


# ------------------------------------------------------------------------------------------- docs
_INTRO = """\
# `results.json`: one per training job

<!-- generated by `python -m randlora.results --markdown > docs/results-schema.md` from randlora/results.py;
     edit the schema there (tests/test_results_schema.py checks this file is up to date) -->

Every job of `python train.py` (a single run, or one job of a `-m` multirun) writes `results.json` in its
run folder. It is written atomically (temporary file + rename): first with `"status": "running"` when the
job starts, again once its model and data are built, then with `"completed"` or `"failed"`. The schema
below is the code's (`randlora.results.SCHEMA`): the writer, the report (`python -m randlora.report`,
which reads its columns through it) and this page use the same one, and `randlora.results.check(record)`
validates a file against it.

*When* a field is present: **always** from the first write (also in the record the sweep writes for a job
that never started); **started** once the job has built its model and data; **completed** filled once the
job completed (the section may be present, empty, before); **sometimes** where its meaning says so.
"""

_OUTRO = """\
## Resumes, multiruns, killed jobs

A resumed run keeps one `results.json`: the top-level fields describe the latest attempt (the final
metrics once it completes), `attempts` keeps the earlier ones. A resume refused before it starts
(a changed setting, another model, a corrupt checkpoint) leaves the file as it was. Each resume's own
Hydra config and log are in `<run_dir>/resumes/<time>_<id>/`; the run's `.hydra/` records its start.

Multirun layout: `logs/multiruns/<YYYY-MM-DD_HH-MM-SS>_<6 hex chars>/<job number>/results.json`, with
Hydra's `.hydra/` folder (config.yaml, overrides.yaml) in each job folder. A job folder that has
`.hydra/` but no `results.json`, or a `results.json` with status "running", is unfinished.

A local multirun runs each job in a process of its own (`randlora/training/launch.py`). When that process ends
without a final status (killed by a signal, e.g. the out-of-memory killer's SIGKILL, or exited before
`run()` could record its error), the sweep writes it: `"status": "failed"`, `"error": "killed by signal 9
(SIGKILL); ..."` (or `"exited with status N: <its last stderr line>"`, or `"stopped: the sweep received
SIGTERM"`), the last attempt closed the same way, and `exit` (above). A job that never started gets a
file with the job's config and the **always** fields.
"""


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped."""
    return re.sub(r"[^a-z0-9_ -]", "", title.lower()).replace(" ", "-")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type_text(f: Field) -> str:
    t = f.type.replace("|", " or ")
    if f.values:
        t += f" of {f.values.replace('|', ' or ')}"
    if isinstance(f.items, str):
        t += f" of {f.items}"
    elif f.items:
        t += " of objects"
    return t


def _table(fields: tuple[Field, ...], prefix: str, sub: list) -> list[str]:
    lines = ["| Field | Type | When | Meaning |", "|---|---|---|---|"]
    for f in fields:
        path = prefix + f.name
        has_sub = bool(f.fields) or (f.items is not None and not isinstance(f.items, str))
        meaning = f.meaning + (f" (see [{path}](#{_anchor(path)}))" if has_sub else "")
        lines.append(f"| `{f.name}` | {_md_cell(_type_text(f))} | {f.when} | {_md_cell(meaning)} |")
        if has_sub:
            sub.append((path, f))
    return lines


def markdown() -> str:
    """docs/results-schema.md: the schema as Markdown tables, one per section."""
    out = [_INTRO, "## Top level", ""]
    queue: list = []
    out += _table(SCHEMA, "", queue) + [""]
    while queue:
        path, f = queue.pop(0)
        out += [f"### {path}", ""]
        if f.items is not None and not isinstance(f.items, str):
            out += [f"Each item of `{path}`:", ""]
            out += _table(f.items, path + "[].", queue) + [""]
        else:
            out += _table(f.fields, path + ".", queue) + [""]
    out.append(_OUTRO)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m randlora.results",
                                description="The results.json schema; check results.json files against it.")
    p.add_argument("--markdown", action="store_true", help="print docs/results-schema.md")
    p.add_argument("files", nargs="*", help="results.json files to check (exit status 1 if one departs)")
    args = p.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
    bad = 0
    for name in args.files:
        import json
        try:
            problems = check(json.loads(Path(name).read_text()))
        except (OSError, ValueError) as e:
            problems = [f"unreadable: {type(e).__name__}: {e}"]
        for line in problems:
            print(f"{name}: {line}")
        bad += bool(problems)
    if not args.markdown and not args.files:
        p.print_usage(sys.stderr)
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
