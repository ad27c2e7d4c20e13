"""A run folder is an append-only record: who may write it, what a resume must match, what it keeps.

* **Lock.** A run folder in use holds ``.lock`` with an ``fcntl`` lock of the process that writes it
  (the kernel drops it when that process dies, so a killed run never blocks a resume). A second run
  started on the folder is refused, naming the holder's PID, before Hydra writes anything there
  (``RunFolderCallback``, a Hydra callback, for ``hydra.run.dir`` and ``resume=``).
* **Resume keeps the run's settings.** ``resume=<run>`` re-applies the run's recorded overrides and
  its recorded resolved config. A new override that changes what the run computes is refused,
  naming it; overrides of where and how it runs (``INFRA``) may change.
* **Identity.** Checkpoints and results.json record the base model (name, class, a fingerprint of
  the frozen weights) and the dataset (name, source, split sizes, class count, a fingerprint of
  the labels); a resume or an evaluation of a checkpoint on another model or dataset is refused
  before anything is written, naming what differs.
* **History.** results.json keeps every attempt (``attempts``); ``csv/metrics.csv`` keeps every row
  written before the checkpoint a resume starts from (rows after it are replayed by the resume).
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import re
import socket
import sys
from pathlib import Path

# ------------------------------------------------------------------------------- classification
# Keys a resumed run takes from this attempt, never from the record: what the attempt is.
ATTEMPT = ("resume", "ckpt_path", "train", "test", "paths", "callbacks.kill_at_step", "adapter.from_peft")
# Keys that may change between attempts of one run: where and how it runs, what it logs. The base
# weights and the dataset may move (model.pretrained, data.path): their fingerprints are checked.
# Precision is not here: it changes the numbers a run computes.
INFRA = ("trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
         "trainer.enable_progress_bar", "trainer.log_every_n_steps", "trainer.deterministic",
         "trainer.num_sanity_val_steps", "data.num_workers", "data.path", "model.pretrained", "adapter.path",
         "compile", "logger", "callbacks", "tags", "group", "optimized_metric", "task_name",
         "lowrank_error")
# config groups whose choice only selects infrastructure (their computation keys are still compared)
INFRA_GROUPS = ("trainer", "logger", "callbacks", "paths", "hydra")


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def is_attempt(key: str) -> bool:
    return _under(key, ATTEMPT) or key.startswith("hydra")


def is_infra(key: str) -> bool:
    return _under(key, INFRA)


class RunFolderError(ValueError):
    """A request that would mix, overwrite or misrecord a run folder. One line, with the fix."""


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def hostname() -> str:
    return socket.gethostname()


# ------------------------------------------------------------------------------------ names
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_file_name(value, key: str) -> str:
    """``value`` as a plain file name (no folder part, no ``..``): config values used to name files
    inside a run folder must never point outside it."""
    text = str(value)
    if not _SAFE.match(text) or ".." in text:
        raise RunFolderError(f"{key}={text!r} is used as a file name in the run folder and must be a plain name "
                             "(letters, digits, '.', '_', '-'; no '/' or '..'), e.g. {key}=train".replace("{key}", key))
    return text


def safe_name_resolver(value) -> str:
    return check_file_name(value, "task_name")


RESUMES = "resumes"  # <run>/resumes/<time>_<id>/: each resume's own Hydra config and log


def resume_run_dir(resume, default: str) -> str:
    """Hydra's run folder for this job: for ``resume=<run folder>``, ``<run>/resumes/<time>_<id>`` (the
    attempt's own Hydra config and log, inside the run it continues; the run's ``.hydra/`` stays the
    record of its start); else ``default``."""
    if resume and Path(str(resume)).is_dir():
        return str(Path(str(resume)).resolve() / RESUMES / Path(default).name)
    return default


# ------------------------------------------------------------------------------------ lock
_HELD: dict[str, object] = {}


def _lock_path(folder) -> Path:
    return Path(folder) / ".lock"


def acquire(folder) -> None:
    """Lock ``folder`` for this process (idempotent); RunFolderError naming the holder if another
    live process has it. The lock dies with the process (fcntl), so stale locks never block."""
    import fcntl
    folder = Path(folder).resolve()
    key = str(folder)
    if key in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    f = open(_lock_path(folder), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        who = _holder(f)
        f.close()
        pid = who["pid"]
        raise RunFolderError(
            f"run folder {folder} is in use by process {pid} on {who['host']} (since {who['since']}); "
            f"two runs must not write one folder: wait for it to end (or stop it: kill {pid}), or use another "
            "folder") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now()}))
    f.flush()
    _HELD[key] = f


def lock_holder(folder) -> dict | None:
    """{"pid", "host", "since"} of the live process that holds ``folder``'s lock, else None; reads the
    lock file without writing it."""
    import fcntl
    path = _lock_path(Path(folder).resolve())
    if str(Path(folder).resolve()) in _HELD or not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _holder(f)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def _holder(f) -> dict:
    """{"pid", "host", "since"} a lock file records ("?" where it does not)."""
    f.seek(0)
    try:
        who = json.loads(f.read() or "{}")
    except ValueError:
        who = {}
    return {k: who.get(k, "?") for k in ("pid", "host", "since")}


def is_held(folder) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return str(Path(folder).resolve()) in _HELD


def release(folder) -> None:
    import fcntl
    f = _HELD.pop(str(Path(folder).resolve()), None)
    if f is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        finally:
            f.close()


def holds_run(folder) -> bool:
    """Whether ``folder`` already holds a run's results or checkpoints."""
    folder = Path(folder)
    return (folder / "results.json").exists() or any((folder / "checkpoints").glob("*.ckpt"))


def _is_ddp_child() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except Exception:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


class RunFolderCallback(_HydraCallback):
    """Hydra callback (configs/hydra/default.yaml): checks the run folder before Hydra writes its
    ``.hydra/`` and log there. Refuses a folder another process holds, a fresh run into a folder
    that already holds a run (resume it instead), and a ``task_name`` that is not a plain name;
    then takes the lock, which ``randlora.train.run`` keeps until the job ends."""

    def on_run_start(self, config, **kwargs):
        if _is_ddp_child():  # DDP ranks > 0 write into their parent's folder, which holds the lock
            return
        try:
            check_file_name(config.get("task_name", "train"), "task_name")
            resume = config.get("resume")
            if resume and Path(str(resume)).is_dir():
                acquire(resume)
                # a new override that changes the computation is refused before Hydra writes this
                # attempt's folder (run() checks the full config against the checkpoint's record)
                run_dir = Path(str(resume))
                recorded = recorded_overrides(run_dir, None, read_results(run_dir / "results.json"))
                if recorded is not None:
                    merge_overrides(recorded, [str(o) for o in config.hydra.overrides.task])
                return
            out = Path(str(config.hydra.run.dir))
            acquire(out)
            if holds_run(out):
                raise RunFolderError(
                    f"{out} already holds a run (results.json / checkpoints): a new run would overwrite it; "
                    f"continue it with resume={out}, or choose another hydra.run.dir")
        except RunFolderError as e:
            _fail(str(e))

    def on_multirun_start(self, config, **kwargs):
        if _is_ddp_child():
            return
        try:
            check_file_name(config.get("task_name", "train"), "task_name")
            # a sweep folder that already holds jobs: randlora.training.sweep.SweepResume
        except RunFolderError as e:
            _fail(str(e))


# ------------------------------------------------------------------------------------ identity
def model_fingerprint(module) -> str:
    """A cheap fingerprint of a model's weights: SHA-256 over, for every state-dict entry (sorted by
    name), its name, dtype, shape and 64 evenly spaced elements. It tells apart architectures and
    weight files (two trainings or two checkpoints differ almost everywhere); it does not see an
    edit of a few weights, and reads 64 numbers per tensor whatever the model's size."""
    import torch
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.is_meta or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(64, flat.numel())).round().long()
        sample = flat[idx.to(flat.device)].to("cpu", torch.float64)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(cfg, backbone) -> dict:
    t = type(backbone)
    return {"name": cfg.model.get("name"), "arch": cfg.model.get("arch"),
            "class": f"{t.__module__}.{t.__qualname__}", "fingerprint": model_fingerprint(backbone)}


def _labels_digest(sets) -> str:
    import torch
    h = hashlib.sha256()
    for ds in sets:
        labels = getattr(ds, "labels", None) if ds is not None else None
        if labels is None:
            h.update(b"-")
            continue
        h.update(torch.as_tensor(labels).to(torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _records_digest(parts) -> str:
    h = hashlib.sha256()
    for recs in parts:
        for r in recs or []:
            h.update(json.dumps(r, sort_keys=True, default=str).encode())
            h.update(b"\n")
        h.update(b"|")
    return h.hexdigest()[:16]


def data_identity(cfg, dm) -> dict:
    """Name, source, hub id, split sizes, class count and a fingerprint of the labels (image data)
    or of the records (instruction data). The location (data.path) is not part of it."""
    d = cfg.data
    out = {"name": d.get("name"), "source": d.get("source"), "hub_id": d.get("hub_id")}
    if getattr(dm, "train_records", None) is not None:
        parts = [dm.train_records, dm.val_records, dm.test_records]
        out["splits"] = {k: len(v or []) for k, v in zip(("train", "val", "test"), parts)}
        out["classes"] = None
        out["labels"] = _records_digest(parts)
    else:
        sets = [getattr(dm, f"{k}_set", None) for k in ("train", "val", "test")]
        out["splits"] = {k: (len(s) if s is not None else 0) for k, s in zip(("train", "val", "test"), sets)}
        out["classes"] = getattr(dm, "num_classes", None)
        out["labels"] = _labels_digest(sets)
    return out


def identity_diffs(recorded: dict, current: dict, what: str) -> list[str]:
    out = []
    for k in sorted(set(recorded) | set(current)):
        if recorded.get(k) != current.get(k):
            out.append(f"{what} {k}: checkpoint {recorded.get(k)!r}, this run {current.get(k)!r}")
    return out


def check_identity(record: dict | None, model_id: dict, data_id: dict, hint: str) -> None:
    """RunFolderError naming every difference between the checkpoint's model / dataset and this run's."""
    if not record:
        return
    diffs = []
    if record.get("model"):
        diffs += identity_diffs(record["model"], model_id, "model")
    if record.get("data"):
        diffs += identity_diffs(record["data"], data_id, "data")
    if diffs:
        raise RunFolderError("the checkpoint was trained on another base model or dataset: " + "; ".join(diffs[:6])
                             + f"; {hint}")


# ------------------------------------------------------------------------------------ configs
def flatten(d, prefix="") -> dict:
    out = {}
    if isinstance(d, dict):
        if not d and prefix:
            out[prefix] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def _set_path(d: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def _del_path(d: dict, path: str) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    d.pop(keys[-1], None)


def computed_config(cfg_dict: dict) -> dict:
    """The part of a resolved config that determines what a run computes (INFRA and ATTEMPT keys out)."""
    return {k: v for k, v in flatten(cfg_dict).items() if not is_attempt(k) and not is_infra(k)}


def override_key(o: str) -> str:
    key = o.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def _group_touches(override: str, key: str) -> bool:
    """Whether an override ``group=choice`` or ``a.b=v`` may have set ``key``."""
    k = override_key(override)
    return key == k or key.startswith(k + ".") or key.startswith(k.replace("/", ".") + ".")


def _show(v) -> str:
    return "unset" if v is _MISSING else repr(v)


_MISSING = object()


def merge_overrides(recorded_overrides: list[str] | None, current_overrides: list[str]):
    """({key: override} a resumed run composes with, the infrastructure overrides given now), or
    RunFolderError naming a new override that changes what the run computes."""
    recorded = [o for o in (recorded_overrides or []) if not is_attempt(override_key(o))]
    by_key = {override_key(o): o for o in recorded}
    keep = dict(by_key)
    infra_given = []
    for o in current_overrides:
        k = override_key(o)
        if is_attempt(k) or by_key.get(k) == o:
            continue
        if is_infra(k) or k in INFRA_GROUPS:
            keep[k] = o
            infra_given.append(o)
            continue
        was = by_key.get(k)
        raise RunFolderError(
            f"resume: the override {o} changes what the run computes"
            + (f" (the run was started with {was})" if was else " and is not one of the run's overrides")
            + "; a resumed run keeps its recorded settings: drop it, or start a new run to train with it")
    return keep, infra_given


def resume_config(cfg, recorded_config: dict, recorded_overrides: list[str] | None,
                  current_overrides: list[str] | None, compose=None):
    """(config, overrides) a resumed run continues with, or RunFolderError naming what may not change.

    ``recorded_config``: the run's resolved config (from its checkpoint or results.json).
    ``current_overrides``: this command's overrides, or None when unknown (``run(cfg)`` called outside
    Hydra): then every key that changes the computation must already equal the record.
    ``compose(overrides)``: composes the config for a list of overrides (Hydra's compose API).
    """
    from omegaconf import OmegaConf
    if current_overrides is None or compose is None:
        cur = OmegaConf.to_container(cfg, resolve=True)
        rec, now_ = computed_config(recorded_config), computed_config(cur)
        diffs = [k for k in sorted(set(rec) | set(now_)) if rec.get(k, _MISSING) != now_.get(k, _MISSING)]
        if diffs:
            shown = "; ".join(f"{k}: {_show(now_.get(k, _MISSING))} here, {_show(rec.get(k, _MISSING))} in the run"
                              for k in diffs[:6])
            raise RunFolderError(f"resume: this configuration differs from the run's in what it computes ({shown}); "
                                 "a resumed run keeps its recorded settings: drop these changes, or start a new run")
        return cfg, [o for o in (recorded_overrides or []) if not is_attempt(override_key(o))]
    keep, infra_given = merge_overrides(recorded_overrides, current_overrides)
    attempt = [o for o in current_overrides if is_attempt(override_key(o))]
    composed = compose(list(keep.values()) + attempt)
    new = OmegaConf.to_container(composed, resolve=True)
    rec, now_ = flatten(recorded_config), flatten(new)
    for k in sorted(set(rec) | set(now_)):
        a, b = rec.get(k, _MISSING), now_.get(k, _MISSING)
        if a == b or is_attempt(k):
            continue
        culprit = next((o for o in infra_given if _group_touches(o, k)), None)
        if is_infra(k):
            if culprit is not None or a is _MISSING:
                continue  # given now, or new: this attempt's value
        elif culprit is not None:
            raise RunFolderError(f"resume: {culprit} changes {k} ({_show(a)} in the run, {_show(b)} with it), which "
                                 "changes what the run computes; keep the run's value (add "
                                 f"{k}={a if a is not _MISSING else 'null'}) or start a new run")
        # the record wins: a setting the run recorded (also one the config files changed since it started)
        if a is _MISSING:
            _del_path(new, k)
        else:
            _set_path(new, k, a)
    out = OmegaConf.create(new)
    OmegaConf.set_struct(out, True)
    return out, list(keep.values())


def current_overrides() -> list[str] | None:
    """This Hydra job's overrides, or None outside a Hydra job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return list(HydraConfig.get().overrides.task)
    except Exception:
        return None


def hydra_compose(overrides: list[str]):
    """Compose ``train.yaml`` with ``overrides`` through the running Hydra app (or a fresh one)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .config import CONFIG_DIR
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def recorded_overrides(run_dir: Path | None, record: dict | None, results: dict | None) -> list[str] | None:
    """The run's overrides: from its checkpoint's record, its results.json, or the .hydra/ of its start."""
    if record and record.get("overrides") is not None:
        return list(record["overrides"])
    if results and results.get("overrides"):
        return list(results["overrides"])
    if run_dir is not None:
        p = run_dir / ".hydra" / "overrides.yaml"
        if p.is_file():
            from omegaconf import OmegaConf
            return [str(o) for o in OmegaConf.load(p)]
    if results and results.get("overrides") is not None:
        return list(results["overrides"])
    return None


# ------------------------------------------------------------------------------------ results.json
def read_results(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def attempts_before(previous: dict | None) -> list[dict]:
    """The attempt history of an earlier results.json (a run written before histories existed
    becomes its first attempt). An attempt still marked "running" was interrupted: nothing holds
    its folder any more (this process has the lock)."""
    if not previous:
        return []
    history = [dict(a) for a in previous.get("attempts") or []]
    if not history:
        history = [{k: previous.get(k) for k in ("status", "error", "started", "ended", "overrides", "metrics")}]
    for a in history:
        if a.get("status") == "running":
            a["status"] = "interrupted"
    return history


# ------------------------------------------------------------------------------------ metrics.csv
def _row_step(row: dict):
    try:
        return int(float(row.get("step")))
    except (TypeError, ValueError):
        return None


def _row_epoch(row: dict):
    try:
        return int(float(row.get("epoch")))
    except (TypeError, ValueError):
        return None


def make_csv_writer(log_dir: str, resume_step: int | None = None, resume_epoch: int | None = None):
    """Lightning's CSV experiment writer, made durable and append-only:

    * every logged row is written at once (Lightning buffered up to 100 steps, lost by a SIGKILL),
      and a header change rewrites the file atomically;
    * on resume from a checkpoint at global step S in epoch E, the earlier file's rows before S are
      kept (Lightning deleted the file) and rows the resume replays are not written twice: earlier
      rows at steps >= S are dropped (the resume writes them again), and the resume's own rows
      before S or of epochs before E (Lightning re-runs the end of an epoch it restarts in) are
      not written."""
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    folder = Path(log_dir)
    path = folder / ExperimentWriter.NAME_METRICS_FILE
    prev = path.with_name(path.name + ".prev")
    kept, header = [], []
    if resume_step is not None:
        # keep the earlier rows safe from Lightning's deletion: a kill before they are written back
        # leaves them in metrics.csv.prev, which the next resume reads
        if path.exists() and not prev.exists():
            os.replace(path, prev)
        if prev.exists():
            with open(prev, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                kept = [r for r in reader if (_row_step(r) is not None and _row_step(r) < resume_step)]

    class DurableWriter(ExperimentWriter):
        def __init__(self):
            super().__init__(str(folder))
            if resume_step is not None:
                keys = sorted(set(header) | {k for r in kept for k in r})
                self.metrics_keys = keys
                self._write_all(kept, keys)
                if prev.exists():
                    prev.unlink()

        def _check_log_dir_exists(self):
            if resume_step is None:  # a new run: Lightning's (a stale file of no run is replaced)
                super()._check_log_dir_exists()
            # a resume: the earlier rows were set aside above and are written back, not deleted

        def _write_all(self, rows, keys):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                with open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=keys)
                    w.writeheader()
                    w.writerows(rows)
                os.replace(tmp, path)
            finally:
                if tmp.exists():
                    tmp.unlink()

        def _rewrite_with_new_header(self, fieldnames):
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            self._write_all(rows, fieldnames)

        def log_metrics(self, metrics_dict, step=None):
            if resume_step is not None and step is not None:
                epoch = metrics_dict.get("epoch")
                try:
                    epoch = int(float(epoch)) if epoch is not None else None
                except (TypeError, ValueError):
                    epoch = None
                if step < resume_step or (resume_epoch is not None and epoch is not None and epoch < resume_epoch):
                    return
            super().log_metrics(metrics_dict, step)
            self.save()

    return DurableWriter()


def use_durable_csv(loggers, resume_step: int | None = None, resume_epoch: int | None = None) -> None:
    """Give every CSVLogger of ``loggers`` the durable, append-only writer (before it writes)."""
    from lightning.pytorch.loggers import CSVLogger
    for lg in loggers:
        if isinstance(lg, CSVLogger) and getattr(lg, "_experiment", None) is None:
            lg._experiment = make_csv_writer(lg.log_dir, resume_step, resume_epoch)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it over ``path``; on failure (a full disk) the
    previous file stays and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def config_record(cfg) -> dict:
    """The config for results.json, resolved (the concrete seed, bases dtype, paths); as written where an
    interpolation cannot be resolved (a Hydra runtime key outside a Hydra job)."""
    from omegaconf import OmegaConf
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - any resolver error: keep the unresolved form
        return OmegaConf.to_container(cfg, resolve=False)
