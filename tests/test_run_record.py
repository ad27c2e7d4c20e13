"""A run folder is an append-only record, and nothing the framework reads runs code:

* a pickled payload in a checkpoint never runs, on every load path (ours, Lightning's fit / test,
  the FSDP strategy's), nor in pretrained weights, HF folders or adapter files;
* config values never name files outside the run folder (task_name);
* a resume keeps the run's settings (a new override that changes the computation is refused, naming
  it), its base model and dataset (checked by fingerprint), its history (attempts) and writes only
  into its folder; checkpoints and adapter files are verified against checksums;
* a folder in use is locked; ``last.ckpt`` is the newest state after a move or copy; a kill during
  the first save resumes from the complete checkpoint; a full disk leaves a clear failed state.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import randlora.training.callbacks as callbacks
from randlora.train import run
from tests.helpers import ROOT, Interrupted, compose_cfg, env, results, train_cli

BASE = ["model=tiny_vit", "adapter=randlora", "trainer=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "data.batch_size=16", "seed=3"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed tiny run (2 epochs of 3 steps); tests copy it."""
    d = tmp_path_factory.mktemp("finished") / "run"
    run(compose_cfg(BASE, d))
    return d


@pytest.fixture(scope="module")
def halfway(tmp_path_factory):
    """A run interrupted in its second epoch: checkpoints at the end of the first (step 3)."""
    d = tmp_path_factory.mktemp("halfway") / "run"
    stop = callbacks.KillAtStep.on_train_batch_end

    def raising(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise Interrupted()
    callbacks.KillAtStep.on_train_batch_end = raising
    try:
        with pytest.raises(Interrupted):
            run(compose_cfg([*BASE, "callbacks.kill_at_step=4"], d))
    finally:
        callbacks.KillAtStep.on_train_batch_end = stop
    return d


def copy_run(src, dst) -> Path:
    shutil.copytree(src, dst)
    lock = Path(dst) / ".lock"
    if lock.exists():
        lock.unlink()
    return Path(dst)


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_unchanged(folder, before: dict) -> None:
    """Every file of ``folder`` as in ``before`` (a snapshot), the lock file aside."""
    after = snapshot(folder)
    after.pop(".lock", None)
    assert after == {k: v for k, v in before.items() if k != ".lock"}


# ------------------------------------------------------------------------------ no code execution
class Payload:
    """Unpickling this object creates ``marker`` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant_payload(ckpt_path, marker) -> None:
    """Add a payload to an otherwise real checkpoint (checksums left as they were)."""
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ck["loops"]["payload"] = Payload(marker)
    torch.save(ck, ckpt_path)
    assert not Path(marker).exists()
    torch.load(ckpt_path, weights_only=False)  # the payload is live: a full unpickler runs it
    assert Path(marker).exists()
    Path(marker).unlink()


def one_clear_line(err, *fragments):
    text = str(err)
    assert "\n" not in text and len(text) < 1500, text
    for f in fragments:
        assert f in text, text


@pytest.mark.parametrize("how", ["resume_folder", "resume_file", "ckpt_path_train", "ckpt_path_eval"])
def test_payload_in_checkpoint_never_runs(how, halfway, tmp_path):
    part = copy_run(halfway, tmp_path / "run")
    ck = part / "checkpoints" / "last.ckpt"
    marker = tmp_path / "PWNED"
    plant_payload(ck, marker)
    before = (part / "results.json").read_bytes()
    extra = {"resume_folder": [f"resume={part}"], "resume_file": [f"resume={ck}"],
             "ckpt_path_train": [f"ckpt_path={ck}"], "ckpt_path_eval": ["train=false", f"ckpt_path={ck}"]}[how]
    with pytest.raises(ValueError) as e:
        run(compose_cfg([*BASE, *extra], tmp_path / "new"))
    one_clear_line(e.value, str(ck), "not loaded", "could run code")
    assert not marker.exists()
    assert (part / "results.json").read_bytes() == before


def test_payload_refused_by_lightnings_own_loads(halfway, tmp_path):
    """trainer.fit / trainer.test(ckpt_path=...) read through AtomicCheckpointIO: weights-only too."""
    import lightning as L

    from randlora.training.checkpoints import AtomicCheckpointIO, CheckpointError
    from randlora.models import build_model
    from randlora.training.build import build_datamodule, build_task
    ck = tmp_path / "last.ckpt"
    shutil.copy(halfway / "checkpoints" / "last.ckpt", ck)
    marker = tmp_path / "PWNED"
    plant_payload(ck, marker)
    cfg = compose_cfg(BASE)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    task = build_task(cfg, build_model(cfg.model), dm)
    for call in ("fit", "test"):
        trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, plugins=[AtomicCheckpointIO()], limit_train_batches=1,
                            limit_val_batches=1, limit_test_batches=1)
        with pytest.raises(CheckpointError, match="could run code"):
            getattr(trainer, call)(task, datamodule=dm, ckpt_path=str(ck), weights_only=False)
        assert not marker.exists()


def test_payload_refused_by_the_fsdp_strategy_load(halfway, tmp_path):
    """Lightning's FSDP strategy reads a full checkpoint with a full unpickler; ours reads it weights-only."""
    from randlora.training.checkpoints import CheckpointError
    from randlora.training.distributed import AdapterFSDPStrategy
    from randlora.models import build_model
    from randlora.training.build import build_datamodule, build_task
    cfg = compose_cfg(BASE)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    task = build_task(cfg, build_model(cfg.model), dm)
    from types import SimpleNamespace
    task._trainer = SimpleNamespace(state=SimpleNamespace(fn="validate"))  # not fitting: no optimizer to load
    strategy = AdapterFSDPStrategy(on_cpu=True)
    strategy._lightning_module = task
    strategy.model = task
    ck = tmp_path / "last.ckpt"
    shutil.copy(halfway / "checkpoints" / "last.ckpt", ck)
    loaded = strategy.load_checkpoint(str(ck))  # a clean file loads, weights into the module
    assert loaded["global_step"] == 3
    marker = tmp_path / "PWNED"
    plant_payload(ck, marker)
    with pytest.raises(CheckpointError, match="could run code"):
        strategy.load_checkpoint(str(ck))
    assert not marker.exists()


def test_payload_in_pretrained_weights_hf_folder_and_adapter_file_never_runs(tmp_path):
    from randlora.adapters import load_adapter
    from randlora.models import build_model
    marker = tmp_path / "PWNED"
    evil = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Payload(marker)}, evil)
    for model in ("tiny_vit", "tiny_clip"):
        with pytest.raises(Exception):
            build_model(compose_cfg([f"model={model}", f"model.pretrained={evil}"]).model)
        assert not marker.exists()
    # a Hugging Face folder whose pytorch_model.bin holds the payload
    from transformers import AutoConfig

    from randlora.models.tiny_tokenizer import tiny_tokenizer
    hf = tmp_path / "hf"
    tok = tiny_tokenizer(vocab_size=64)
    tok.save_pretrained(hf)
    AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2).save_pretrained(hf)
    torch.save({"model.embed_tokens.weight": torch.zeros(len(tok), 16), "x": Payload(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(Exception):
        build_model(compose_cfg(["model=tiny_llama", "~model.tiny", f"model.pretrained={hf}"]).model)
    assert not marker.exists()
    # a pickle named like an adapter file
    fake = tmp_path / "adapter.safetensors"
    fake.write_bytes(evil.read_bytes())
    with pytest.raises(ValueError, match="cannot read adapter file"):
        load_adapter(torch.nn.Linear(2, 2), fake)
    assert not marker.exists()


# ------------------------------------------------------------------------------ paths stay inside
def test_task_name_cannot_name_a_file_outside_the_run_folder(tmp_path):
    with pytest.raises(ValueError, match=r"task_name='\.\./\.\./x' .* plain name"):
        run(compose_cfg([*BASE, "task_name=../../x"], tmp_path / "a" / "b" / "run"))
    out = train_cli(["task_name=../../x", f"hydra.run.dir={tmp_path / 'a' / 'b' / 'cli'}"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "task_name='../../x'" in out.stderr
    assert not list(tmp_path.rglob("x.log")) and not (tmp_path / "a" / "b" / "cli" / ".hydra").exists()


# ------------------------------------------------------------------------------ checksums
def _flip_byte_in_largest_tensor(ckpt: Path) -> None:
    import zipfile
    with zipfile.ZipFile(ckpt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(ckpt, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x5A]))


def test_flipped_bytes_in_a_checkpoint_are_refused_and_keep_the_run(halfway, tmp_path):
    part = copy_run(halfway, tmp_path / "run")
    ck = part / "checkpoints" / "last.ckpt"
    _flip_byte_in_largest_tensor(ck)
    torch.load(ck, weights_only=True)  # still a readable checkpoint: only the numbers changed
    before = snapshot(part)
    with pytest.raises(ValueError) as e:
        run(compose_cfg([*BASE, f"resume={part}"], tmp_path / "x"))
    one_clear_line(e.value, f"checkpoint {ck} is corrupt: tensor", "does not match its checksum")
    assert_unchanged(part, before)


def test_flipped_bytes_in_an_adapter_file_are_refused_old_files_still_load(finished, tmp_path):
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from randlora.adapters import load_adapter
    from randlora.tasks.classification import Classifier
    from randlora.models import build_model
    src = finished / "checkpoints" / "adapter.safetensors"
    bundle = lambda: build_model(compose_cfg(BASE).model)  # noqa: E731
    net = lambda: Classifier(bundle().backbone, 64, 10)  # noqa: E731
    load_adapter(net(), src)
    bad = tmp_path / "bad.safetensors"
    data = bytearray(src.read_bytes())
    data[-3] ^= 0x5A  # inside the last tensor's bytes
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupt: tensor .* does not match its checksum"):
        load_adapter(net(), bad)
    # a file written before checksums existed (metadata "adapter" only) loads as before
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(src)), str(old), metadata={"adapter": meta["adapter"]})
    assert "tensor_crc32" in meta and _json.loads(meta["tensor_crc32"])
    load_adapter(net(), old)


# ------------------------------------------------------------------------------ resume keeps the run
def hydra_job_cfg(overrides, out_dir):
    """A config composed as the CLI composes it: the job's overrides known to run() (HydraConfig)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from tests.helpers import CONFIGS
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(out_dir)
    return cfg


@pytest.fixture
def hydra_job():
    from hydra.core.hydra_config import HydraConfig
    yield hydra_job_cfg
    HydraConfig.instance().cfg = None


def test_resume_reapplies_the_runs_overrides(hydra_job, tmp_path, interrupt):
    """Started with trainer.max_epochs=3, resumed with nothing but resume=: trains to 3 epochs (the
    default is 5), with the run's overrides in results.json."""
    over = ["model=tiny_vit", "trainer=cpu", "trainer.max_epochs=3", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "data.batch_size=16"]
    part = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(hydra_job([*over, "callbacks.kill_at_step=3"], part))
    res = run(hydra_job([f"resume={part}"], tmp_path / "attempt"))
    ck = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 6 and res["config"]["trainer"]["max_epochs"] == 3
    assert results(part)["overrides"] == over
    assert [a["command_overrides"] for a in results(part)["attempts"]] == [
        [*over, "callbacks.kill_at_step=3"], [f"resume={part}"]]


@pytest.mark.parametrize("override,named", [
    ("trainer.max_epochs=5", "trainer.max_epochs=5"),
    ("optim.lr=0.1", "optim.lr=0.1"),
    ("model=tiny_vit_digits", "model=tiny_vit_digits"),
    ("data=synthetic", "data=synthetic"),
    ("trainer.precision=bf16-mixed", "trainer.precision=bf16-mixed"),
])
def test_resume_refuses_an_override_that_changes_the_computation(override, named, hydra_job, halfway, tmp_path):
    part = copy_run(halfway, tmp_path / "run")
    before = snapshot(part)
    with pytest.raises(ValueError) as e:
        run(hydra_job([f"resume={part}", override], tmp_path / "attempt"))
    one_clear_line(e.value, named)
    assert_unchanged(part, before)


def test_an_infrastructure_group_that_changes_the_computation_is_refused(hydra_job, tmp_path):
    """trainer=gpu selects where the run goes, and also bf16 precision: the precision change is named."""
    from omegaconf import OmegaConf

    from randlora.training.folder import hydra_compose, resume_config
    cfg = hydra_job([*BASE, "resume=x"], tmp_path)
    recorded = OmegaConf.to_container(cfg, resolve=True)
    with pytest.raises(ValueError) as e:
        resume_config(cfg, recorded, BASE, ["resume=x", "trainer=gpu"], compose=hydra_compose)
    one_clear_line(e.value, "trainer=gpu changes trainer.precision ('32-true' in the run, 'bf16-mixed' with it)")
    same, overrides = resume_config(cfg, recorded, BASE, ["resume=x", "trainer=ddp_cpu"], compose=hydra_compose)
    assert same.trainer.devices == 2 and same.trainer.max_epochs == 2 and "trainer=ddp_cpu" in overrides


def test_resume_allows_infrastructure_overrides(hydra_job, halfway, tmp_path):
    part = copy_run(halfway, tmp_path / "run")
    res = run(hydra_job([f"resume={part}", "data.num_workers=0", "trainer.enable_progress_bar=false",
                         "callbacks.adapter_checkpoint=false", "logger=csv"], tmp_path / "attempt"))
    assert res["status"] == "completed"


def test_resume_outside_hydra_refuses_a_changed_setting_and_another_model_or_data(halfway, tmp_path):
    """run(cfg) without a Hydra job: every setting that changes the computation must equal the run's."""
    part = copy_run(halfway, tmp_path / "run")
    before = snapshot(part)
    for change, named in ((["model=tiny_vit_digits"], "model.name"), (["data=synthetic"], "data.name"),
                          (["trainer.max_epochs=3"], "trainer.max_epochs: 3 here, 2 in the run")):
        base = [o for o in BASE if o.split("=")[0] not in {c.split("=")[0] for c in change}]
        with pytest.raises(ValueError) as e:
            run(compose_cfg([*base, *change, f"resume={part}"], tmp_path / "x"))
        one_clear_line(e.value, named)
    assert_unchanged(part, before)


def test_evaluating_a_checkpoint_on_another_model_or_dataset_is_refused(finished, tmp_path):
    ck = finished / "checkpoints" / "last.ckpt"
    for change, named in ((["model=tiny_vit_digits"], "model name: checkpoint 'tiny_vit', this run 'tiny_vit_digits'"),
                          (["data=synthetic"], "data name: checkpoint 'digits', this run 'synthetic'")):
        base = [o for o in BASE if o.split("=")[0] not in {c.split("=")[0] for c in change}]
        with pytest.raises(ValueError) as e:
            run(compose_cfg([*base, *change, "train=false", f"ckpt_path={ck}"], tmp_path / change[0].replace("=", "_")))
        one_clear_line(e.value, named)


def test_moved_base_weights_resume_other_weights_are_refused(tmp_path, interrupt):
    """model.pretrained may move (a location): the weights' fingerprint must match."""
    from safetensors.torch import load_file, save_file
    src = ROOT / "assets" / "tiny_vit_digits04.safetensors"
    moved, other = tmp_path / "moved.safetensors", tmp_path / "other.safetensors"
    shutil.copy(src, moved)
    w = load_file(str(src))
    save_file({k: v * 1.01 for k, v in w.items()}, str(other))
    over = ["trainer=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1"]
    part = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(compose_cfg([*over, "callbacks.kill_at_step=3"], part))
    with pytest.raises(ValueError) as e:
        run(compose_cfg([*over, f"model.pretrained={other}", f"resume={part}"], tmp_path / "x"))
    one_clear_line(e.value, "another base model", "model fingerprint")
    assert run(compose_cfg([*over, f"model.pretrained={moved}", f"resume={part}"], tmp_path / "x"))["status"] == \
        "completed"


@pytest.mark.slow
def test_resume_writes_nothing_outside_its_folder_cli(tmp_path):
    """The resume's own Hydra config and log go to <run>/resumes/<time>/; the run's .hydra/ stays."""
    part = tmp_path / "run"
    out = train_cli([*BASE, "callbacks.kill_at_step=4", f"hydra.run.dir={part}"])
    assert out.returncode == -9
    start_hydra = (part / ".hydra" / "overrides.yaml").read_bytes()
    logs = tmp_path / "logs"
    out = train_cli([f"resume={part}", f"paths.log_dir={logs}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert not logs.exists()
    (attempt,) = list((part / "resumes").iterdir())
    assert (attempt / ".hydra" / "overrides.yaml").is_file() and (attempt / "train.log").is_file()
    assert (part / ".hydra" / "overrides.yaml").read_bytes() == start_hydra
    r = results(part)
    assert r["status"] == "completed" and r["config"]["trainer"]["max_epochs"] == 2
    assert [a["status"] for a in r["attempts"]] == ["interrupted", "completed"]
    # a new override that changes the computation is refused before Hydra writes this attempt's folder
    out = train_cli([f"resume={part}", "trainer.max_epochs=4"])
    assert out.returncode == 2 and "the override trainer.max_epochs=4 changes what the run computes" in out.stderr
    assert len(list((part / "resumes").iterdir())) == 1
    from randlora.report import collect
    assert [r["status"] for r in collect([tmp_path])] == ["completed"]  # resumes/ folders are not jobs


# ------------------------------------------------------------------------------ locks
def _hold_lock(folder):
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from randlora.training import folder as runfolder
        runfolder.acquire({str(folder)!r})
        print("locked", flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env())
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_folder_in_use_is_refused_naming_the_pid_and_a_dead_holder_never_blocks(halfway, tmp_path):
    part = copy_run(halfway, tmp_path / "run")
    holder = _hold_lock(part)
    try:
        before = snapshot(part)
        with pytest.raises(ValueError) as e:
            run(compose_cfg([*BASE, f"resume={part}"], tmp_path / "x"))
        one_clear_line(e.value, f"in use by process {holder.pid}")
        with pytest.raises(ValueError, match=f"in use by process {holder.pid}"):
            run(compose_cfg(BASE, part))  # a new run into the folder
        out = train_cli([*BASE, f"hydra.run.dir={part}"])
        assert out.returncode == 2 and f"in use by process {holder.pid}" in out.stderr
        out = train_cli([f"resume={part}"])
        assert out.returncode == 2 and f"in use by process {holder.pid}" in out.stderr
        assert snapshot(part) == before and not (part / "resumes").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (as a SIGKILLed run does): its lock went with it
    assert run(compose_cfg([*BASE, f"resume={part}"], tmp_path / "x"))["status"] == "completed"


def test_a_new_run_never_overwrites_a_finished_one(finished, tmp_path):
    done = copy_run(finished, tmp_path / "run")
    before = snapshot(done)
    with pytest.raises(ValueError, match="already holds a run .* resume="):
        run(compose_cfg(BASE, done))
    out = train_cli([*BASE, f"hydra.run.dir={done}"])
    assert out.returncode == 2 and "already holds a run" in out.stderr
    after = snapshot(done)
    after.pop(".lock", None)
    before.pop(".lock", None)
    assert after == before


# ------------------------------------------------------------------------------ newest checkpoint
def test_last_ckpt_stays_the_newest_state_after_the_folder_is_moved(halfway, tmp_path):
    moved = copy_run(halfway, tmp_path / "moved")  # a copy: the checkpoint records the old folder
    run(compose_cfg([*BASE, f"resume={moved}"], tmp_path / "x"))
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert not any("-v" in n for n in names), names  # Lightning wrote last-v1.ckpt next to a stale last.ckpt
    ck = torch.load(moved / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 6


def test_kill_during_the_first_save_resumes_from_the_complete_checkpoint(halfway, tmp_path):
    """Lightning saves epoch=0-step=3.ckpt, then last.ckpt: a kill in between left no last.ckpt (and,
    after a SIGKILL, the temporary file of the interrupted save)."""
    part = copy_run(halfway, tmp_path / "run")
    ckdir = part / "checkpoints"
    (ckdir / "last.ckpt").unlink()
    (ckdir / "last.ckpt.tmp-999999999").write_bytes(b"partial")  # a dead process's temporary file
    assert [p.name for p in ckdir.glob("*.ckpt")] == ["epoch=0-step=3.ckpt"]
    res = run(compose_cfg([*BASE, f"resume={part}"], tmp_path / "x"))
    assert res["status"] == "completed"
    assert res["attempts"][-1]["resumed_from"]["global_step"] == 3
    assert not list(ckdir.glob("*.tmp-*"))


# ------------------------------------------------------------------------------ full disk
def _disk_full_after(monkeypatch, saves_ok: int, results_too: bool = False):
    """torch.save in checkpoint writes fails with ENOSPC after ``saves_ok`` saves (having written part
    of the file); with ``results_too`` results.json writes fail from then on too."""
    from randlora.training import checkpoints as checkpoint_io
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > saves_ok:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(checkpoint_io.torch, "save", save)
    if results_too:
        real_write = Path.write_text

        def write_text(self, data, *a, **k):
            if calls["n"] > saves_ok and self.name.startswith(".results.json.tmp"):
                real_write(self, data[:10], *a, **k)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(self, data, *a, **k)
        monkeypatch.setattr(Path, "write_text", write_text)
    return real_save


@pytest.mark.parametrize("where", ["checkpoint", "adapter_file"])
def test_full_disk_leaves_a_failed_state_and_a_resumable_checkpoint(where, monkeypatch, tmp_path):
    """The disk fills during the second epoch's checkpoint, or while the adapter file is written at
    the end (its temporary file was left behind)."""
    import safetensors.torch
    part = tmp_path / "run"
    if where == "checkpoint":
        real_save = _disk_full_after(monkeypatch, saves_ok=2)  # epoch 0: top-k + last; epoch 1 fails
        undo = lambda: monkeypatch.setattr(torch, "save", real_save)  # noqa: E731
    else:
        real_save_file = safetensors.torch.save_file

        def full(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(safetensors.torch, "save_file", full)
        undo = lambda: monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)  # noqa: E731
    with pytest.raises(OSError):
        run(compose_cfg(BASE, part))
    r = results(part)
    assert r["status"] == "failed" and "No space left on device" in r["error"]
    assert not [p for p in part.rglob("*") if ".tmp-" in p.name]
    undo()
    assert run(compose_cfg([*BASE, f"resume={part}"], tmp_path / "x"))["status"] == "completed"


def test_full_disk_that_also_stops_results_json_says_so(monkeypatch, tmp_path, capsys):
    part = tmp_path / "run"
    _disk_full_after(monkeypatch, saves_ok=2, results_too=True)
    with pytest.raises(OSError):
        run(compose_cfg(BASE, part))
    err = capsys.readouterr().err
    assert f"the failure could not be recorded in {part / 'results.json'}" in err and "'running'" in err
    assert "No space left on device" in err
    assert results(part)["status"] == "running"
    assert not [p for p in part.rglob("*") if ".tmp-" in p.name]


# ------------------------------------------------------------------------------ NaN advice
def test_non_finite_loss_advice_is_a_new_run_not_a_resume(tmp_path):
    from types import SimpleNamespace

    from randlora.training.callbacks import NonFiniteGuard
    (tmp_path / "last.ckpt").write_bytes(b"x")
    guard = NonFiniteGuard(str(tmp_path))
    t = SimpleNamespace(global_step=7, current_epoch=1)
    with pytest.raises(FloatingPointError) as e:
        guard.on_train_batch_end(t, None, torch.tensor(float("nan")), None, 3)
    one_clear_line(e.value, "last good checkpoint", "Resuming would repeat the same steps", "start a new run",
                   "optim.lr")


def test_results_json_keeps_the_first_attempt(halfway, tmp_path):
    part = copy_run(halfway, tmp_path / "run")
    first = results(part)
    run(compose_cfg([*BASE, f"resume={part}"], tmp_path / "x"))
    a0 = results(part)["attempts"][0]
    assert a0["started"] == first["attempts"][0]["started"] and a0["status"] == "failed"
    assert a0["command_overrides"] == first["attempts"][0]["command_overrides"]
    assert json.dumps(results(part)["identity"]) == json.dumps(first["identity"])


def test_results_json_records_what_the_run_trained_with(tmp_path):
    """results.json conforms to the schema in code (randlora/results.py) and records the resolved learning
    rate and the other defaults the run filled in, the package versions, the code's git state and the
    hardware (it recorded optim.lr: null, the composed value, before)."""
    from randlora.results import check
    res = run(compose_cfg(["model=tiny_vit", "adapter=randlora", "trainer=cpu", "data.epochs=1",
                           "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                           "trainer.limit_test_batches=1"], tmp_path))
    rec = json.loads((tmp_path / "results.json").read_text())
    assert check(rec) == [] and rec == json.loads(json.dumps(res, default=str))
    assert rec["config"]["optim"]["lr"] == 1e-2 == rec["provenance"]["lr"]  # RandLoRA's vision LR (lr_by_task)
    resolved = rec["provenance"]["resolved_defaults"]
    assert resolved["optim.lr"] == 1e-2 and resolved["trainer.max_epochs"] == 1  # from data.epochs
    p = rec["provenance"]
    assert p["packages"]["torch"] and p["hardware"]["devices"] == 1 and "commit" in p["git"]
    assert rec["bases_checksum"] and len(rec["bases_checksum"]) == 16


def test_budget_match_is_recorded(tmp_path):
    res = run(compose_cfg(["model=tiny_vit", "adapter=lora", "adapter.budget=5000", "trainer=cpu",
                           "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                           "trainer.limit_test_batches=1"], tmp_path))
    m = res["budget_match"]
    assert abs(m["achieved"] - 5000) / 5000 <= m["tolerance"] == 0.02 and abs(m["deviation"]) <= 0.02
    assert sum(m["rank_counts"].values()) == len(m["ranks"]) == 12  # 4 blocks x qkv, fc1, fc2
    assert res["params"]["adapter"] == m["achieved"]
