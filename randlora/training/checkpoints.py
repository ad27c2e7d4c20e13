"""Checkpoint files: written atomically with checksums, read weights-only and verified.

* Writing: to a temporary file in the same folder, fsync, then an atomic rename over the target, so a
  kill or a full disk during a save leaves the previous checkpoint (and no temporary file, except
  after a SIGKILL: ``remove_stale_temporaries`` clears those of dead processes).
* Every file carries ``randlora_checksums``: a CRC-32 of each tensor's bytes (keyed by its path in
  the checkpoint, e.g. ``state_dict/net.head.weight``) and a SHA-256 of every other value. CRC-32 is
  for corruption (flipped bytes on a disk or in a copy), not for tampering: whoever can rewrite the
  file can rewrite its checksums.
* Reading: ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only and
  refuses anything else, so a pickled payload never runs. Every read path uses it: ours
  (``load_checkpoint_file``), Lightning's (``AtomicCheckpointIO.load_checkpoint``, used by
  ``trainer.fit/test(ckpt_path=...)``) and the FSDP strategy's (``randlora/training/distributed.py``).
  Files without checksums (written before they existed) load unverified.
"""
from __future__ import annotations

import hashlib
import os
import re
import zlib
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..adapters import FUNCTION_OPTIONS, adapter_meta, bases_checksum, clean_name, diff_meta, is_adapted
from ..adapters.state import jsonable

CHECKSUM_KEY = "randlora_checksums"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not weights-only, or corrupt. One line."""


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def checksums(obj) -> dict:
    """{"tensors": {path: crc32 hex}, "other": sha256 hex} of every leaf of a (nested) checkpoint dict,
    in a fixed order (dict keys sorted by their text), the checksum entry itself excluded."""
    tensors: dict[str, str] = {}
    other = hashlib.sha256()

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            meta = f"{x.dtype}{tuple(x.shape)}"
            tensors[path or "."] = f"{zlib.crc32(_tensor_bytes(x)):08x}:{meta}"
        elif isinstance(x, dict):
            for k in sorted(x, key=lambda k: (type(k).__name__, str(k))):
                if not path and k == CHECKSUM_KEY:
                    continue
                walk(x[k], f"{path}/{k}" if path else str(k))
        elif isinstance(x, (list, tuple)):
            other.update(f"{path}:{type(x).__name__}[{len(x)}]\n".encode())
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")
        else:
            other.update(f"{path}={type(x).__name__}:{x!r}\n".encode())

    walk(obj, "")
    return {"version": 1, "tensors": tensors, "other": other.hexdigest()}


def verify(checkpoint: dict, path) -> None:
    """Raise CheckpointError if ``checkpoint`` does not match the checksums it carries (none: no check)."""
    saved = checkpoint.get(CHECKSUM_KEY) if isinstance(checkpoint, dict) else None
    if not saved:
        return
    now = checksums(checkpoint)
    bad = sorted(k for k in set(saved.get("tensors", {})) | set(now["tensors"])
                 if saved.get("tensors", {}).get(k) != now["tensors"].get(k))
    if bad:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: tensor {bad[0]} does not match its checksum"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            + "; it was not loaded. Move it aside to resume from an earlier checkpoint, or start a new run")
    if saved.get("other") != now["other"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its non-tensor entries (step counters, loop "
                              "state) do not match their checksum; it was not loaded")


_VERIFIED: set = set()  # files verified by this process, by (path, inode, size, mtime): not hashed twice


def _file_key(path):
    st = os.stat(path)
    return (os.path.abspath(str(path)), st.st_ino, st.st_size, st.st_mtime_ns)


def load_checkpoint_file(path, map_location="cpu", check: bool = True) -> dict:
    """A checkpoint loaded weights-only (no code runs) and verified against its checksums (once per
    process and file version: run() verifies the file before Lightning loads it again)."""
    import pickle
    try:
        ckpt = torch.load(str(path), map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"it references {found.group(1)}" if found else "it is not a weights-only file"
        raise CheckpointError(
            f"checkpoint {path} holds Python objects that are not tensors or plain values ({why}); randlora "
            "checkpoints never do, so it was not written by randlora or was altered. It was not loaded "
            "(loading it could run code)") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first} (truncated, or not a torch "
                              "checkpoint)") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} is a {type(ckpt).__name__}, not a Lightning checkpoint dict")
    if check:
        key = _file_key(path)
        if key not in _VERIFIED:
            verify(ckpt, path)
            _VERIFIED.add(key)
    return ckpt


_TMP = re.compile(r"\.tmp-(\d+)$")


def remove_stale_temporaries(folder) -> list[str]:
    """Delete ``*.tmp-<pid>`` files in ``folder`` left by processes that no longer run (a SIGKILL
    during a save); files of live processes are kept. Returns the names removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.search(p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive (or another user's): not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed


def write_atomic(path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync, rename over ``path``. On any
    failure (a kill, a full disk) the previous file stays and the temporary file is removed."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        checkpoint = dict(checkpoint)
        checkpoint[CHECKSUM_KEY] = checksums(checkpoint)
        write_atomic(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        # weights-only whatever Lightning asks for: randlora checkpoints hold tensors and plain values
        return load_checkpoint_file(path, map_location=map_location)


def newest_checkpoint(folder) -> Path | None:
    """The checkpoint in ``folder`` with the most optimizer steps (``last.ckpt`` on a tie), or None.
    Each candidate is read weights-only; one that cannot be is refused, never skipped."""
    folder = Path(folder)
    best, best_key = None, None
    for p in sorted(folder.glob("*.ckpt")) if folder.is_dir() else []:
        if not p.is_file():
            continue
        ck = load_checkpoint_file(p, check=False)
        key = (int(ck.get("global_step", -1)), int(ck.get("epoch", -1)), p.name == "last.ckpt")
        del ck
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best


# ----------------------------------------------------------------------- what a checkpoint holds
def trained_keys(pl_module) -> set[str]:
    """The state-dict keys a checkpoint keeps: every trained parameter, and the persistent buffers of
    the modules that own one (an adapter's own state, e.g. DoRA-DR's importance scores and masks;
    everything for full fine-tuning). Frozen weights and constants are rebuilt from the model source
    and the seed. Names are the plain model's, also under FSDP's wrappers."""
    keys = set()
    for mname, module in pl_module.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        prefix = f"{mname}." if mname else ""
        keys |= {clean_name(prefix + n) for n, p in own if p.requires_grad}
        keys |= {clean_name(prefix + n) for n, b in module.named_buffers(recurse=False)
                 if b is not None and n not in module._non_persistent_buffers_set}
    return keys


def check_checkpoint(net, checkpoint: dict) -> None:
    """Raise a ValueError if ``checkpoint`` was not trained with ``net``'s adapter: another method,
    other targets or trainable modules (so other tensor shapes), other random bases, or an option that
    changes what the adapter computes (``FUNCTION_OPTIONS``: r, alpha, ...). Options that do not
    (compute path, dropout, init, ...) may differ."""
    saved_meta = checkpoint.get("adapter_meta")
    if saved_meta is not None and is_adapted(net):
        function = tuple(f"options.{k}:" for k in FUNCTION_OPTIONS)
        diffs = [d for d in diff_meta(jsonable(adapter_meta(net)), jsonable(saved_meta))
                 if not d.startswith("options.") or d.startswith(function)]
        if diffs:
            raise ValueError("the checkpoint was trained with another adapter: " + "; ".join(diffs)
                             + "; resume with the checkpoint's adapter settings")
    saved = checkpoint.get("bases_checksum")
    mine = bases_checksum(net)
    if saved is not None and mine is not None and saved != mine:
        theirs = ((saved_meta or {}).get("options") or {}).get("bases_dtype", "float32")
        ours = adapter_meta(net)["options"].get("bases_dtype", "float32")
        if theirs != ours:
            raise ValueError(
                f"the checkpoint was trained with random bases stored as {theirs}, this run stores them as "
                f"{ours} (adapter.bases_dtype follows trainer.precision unless set); resume with "
                f"adapter.bases_dtype={theirs}")
        raise ValueError(f"the checkpoint was trained with other random bases (checksum {saved}, this run "
                         f"{mine}); resume with the same adapter.seed, adapter.distribution and targets")


def load_trained_tensors(pl_module, checkpoint: dict) -> None:
    """Load a checkpoint's trained tensors into an (unwrapped) task, for evaluation without training.
    Every trained parameter must be in it, and nothing it holds may be unknown here."""
    sd = checkpoint["state_dict"]
    own = pl_module.state_dict()
    unexpected = sorted(set(sd) - set(own))
    missing = sorted({n for n, p in pl_module.named_parameters() if p.requires_grad} - set(sd))
    if unexpected or missing:
        raise ValueError(f"the checkpoint does not fit this model: missing trained tensors {missing[:5]}, "
                         f"unknown tensors {unexpected[:5]}")
    wrong = [f"{k}: model {tuple(own[k].shape)}, checkpoint {tuple(v.shape)}" for k, v in sd.items()
             if tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"the checkpoint's tensor shapes differ from this model's: {wrong[:5]}")
    pl_module.load_state_dict(sd, strict=False)


class TrainedTensors(L.Callback):
    """Checkpoints hold the trained tensors only (``trained_keys``), the adapter's record, a checksum
    of the random bases and the run's record (settings, base model and dataset, checked by a resume:
    ``randlora.training.folder``); a checkpoint of another adapter is refused when it is loaded."""

    def __init__(self, run_record: dict | None = None):
        self.run_record = run_record

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        keep = trained_keys(pl_module)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        net = pl_module.net
        checkpoint["adapter_meta"] = adapter_meta(net) if is_adapted(net) else None
        checkpoint["bases_checksum"] = bases_checksum(net)
        if self.run_record is not None:
            checkpoint["randlora_run"] = self.run_record

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        check_checkpoint(pl_module.net, checkpoint)
