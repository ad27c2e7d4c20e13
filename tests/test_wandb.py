"""W&B never fails a run and never holds it up for long (randlora/training/loggers.py), with the real wandb:
an API key with a server that accepts TCP but never answers, a server that answers the probe but
refuses the run, an empty WANDB_MODE, an unwritable wandb/ folder. Each case ends with a run that
logs (offline, or CSV only) within a few seconds of the configured probe budget."""
from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from tests.helpers import compose_cfg, results, train_cli

KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B API key (40 hex digits)
PROBE = 1.0  # logger.wandb.probe_timeout in these tests (seconds)
SLACK = 8.0  # offline wandb.init starts wandb's service process: ~0.5-2 s, more on a loaded machine


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No credentials, settings files or netrc of the machine; wandb's state reset after the test."""
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_DIR", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    yield monkeypatch
    import wandb

    from randlora.training.loggers import finish_wandb
    finish_wandb()
    wandb.teardown()


@pytest.fixture
def silent_server():
    """A TCP endpoint that accepts connections and never sends a byte (a firewalled or hung server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


@pytest.fixture
def refusing_server():
    """An HTTP server that answers the probe (GET) but refuses every API call (POST: 401)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def do_POST(self):
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _build(tmp_path, *overrides):
    """build_loggers as run() calls it, then one logged metric (what the trainer does first); the
    time excludes importing wandb and Lightning (run() has imported Lightning by then)."""
    import lightning.pytorch.loggers  # noqa: F401
    import wandb  # noqa: F401

    from randlora.training.loggers import build_loggers
    cfg = compose_cfg(["logger=wandb", f"logger.wandb.probe_timeout={PROBE}", *overrides])
    out = tmp_path / "run"
    t0 = time.monotonic()
    loggers, notes = build_loggers(cfg, str(out), "job")
    for lg in loggers:
        lg.log_metrics({"train/loss": 1.0}, step=0)
    elapsed = time.monotonic() - t0
    from lightning.pytorch.loggers import WandbLogger
    wb = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    return out, loggers, wb, notes, elapsed


def _offline_runs(out):
    return list((out / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("mode", ["online", "auto"])
def test_key_and_unanswering_server_log_offline_within_the_probe_budget(tmp_path, wandb_env, silent_server, mode,
                                                                        capsys):
    """The server wandb would use (WANDB_BASE_URL) accepts TCP and never answers: offline at once,
    and the line names that server (not a host wandb does not use)."""
    wandb_env.setenv("WANDB_API_KEY", KEY)
    wandb_env.setenv("WANDB_BASE_URL", silent_server)
    out, loggers, wb, notes, elapsed = _build(tmp_path, f"logger.wandb.mode={mode}")
    assert elapsed < PROBE + SLACK, elapsed
    assert len(wb) == 1 and wb[0].experiment.settings.mode == "offline"
    assert _offline_runs(out)
    err = capsys.readouterr().err
    assert f"W&B: logging offline because the W&B server {silent_server} is not reachable" in err
    assert any("wandb sync" in n and silent_server in n for n in notes)


def test_online_init_failure_falls_back_to_offline(tmp_path, wandb_env, refusing_server, capsys):
    """The server answers the probe but refuses the run (401): wandb.init raises, the run logs offline."""
    wandb_env.setenv("WANDB_API_KEY", KEY)
    wandb_env.setenv("WANDB_BASE_URL", refusing_server)
    out, loggers, wb, notes, elapsed = _build(tmp_path, "logger.wandb.mode=online", "logger.wandb.init_timeout=3")
    assert elapsed < PROBE + 3 + 10 + SLACK, elapsed  # + wandb's own 10 s grace after init_timeout
    assert len(wb) == 1 and wb[0].experiment.settings.mode == "offline"
    assert _offline_runs(out)
    assert "W&B: wandb.init (online) failed: CommError" in capsys.readouterr().err
    assert any("wandb.init (online) failed" in n for n in notes)


def test_empty_wandb_mode_is_ignored_not_fatal(tmp_path, wandb_env, silent_server, capsys):
    """WANDB_MODE= (set, empty) makes wandb refuse its settings with a validation traceback."""
    wandb_env.setenv("WANDB_MODE", "")
    wandb_env.setenv("WANDB_API_KEY", KEY)
    wandb_env.setenv("WANDB_BASE_URL", silent_server)
    out, loggers, wb, notes, elapsed = _build(tmp_path, "logger.wandb.mode=online")
    assert elapsed < PROBE + SLACK, elapsed
    assert len(wb) == 1 and wb[0].experiment.settings.mode == "offline"
    assert "W&B: WANDB_MODE='' is not a W&B mode" in capsys.readouterr().err


def test_unwritable_wandb_folder_runs_without_wandb(tmp_path, wandb_env, capsys):
    """wandb/ cannot hold files (a file of that name; as root, permissions would not stop wandb):
    offline fails too, so the job continues with CSV metrics only, and says so in one line."""
    wandb_env.setenv("WANDB_MODE", "offline")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb").write_text("not a folder")
    out, loggers, wb, notes, elapsed = _build(tmp_path)
    assert elapsed < SLACK, elapsed
    assert wb == [] and [type(lg).__name__ for lg in loggers] == ["CSVLogger"]
    err = capsys.readouterr().err
    assert "W&B: wandb.init (offline) failed: NotADirectoryError" in err
    assert any(n.startswith("W&B: not logged") and "csv" in n for n in notes)


def test_probe_reports_what_did_not_answer(silent_server, refusing_server):
    from randlora.training.loggers import probe_server
    t0 = time.monotonic()
    why = probe_server(silent_server, timeout=0.5)
    assert why is not None and time.monotonic() - t0 < 1.5
    assert probe_server(refusing_server, timeout=2) is None
    assert probe_server("https://no-such-host.invalid", timeout=2) is not None  # DNS fails (RFC 2606)


@pytest.mark.slow
def test_train_py_with_key_and_no_network_completes(tmp_path, silent_server):
    """The issue's case end to end: logged in (a key), no network; the run completes, logs offline,
    prints the fall-back and the sync command, and no traceback."""
    out = train_cli(["model=tiny_vit", "trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                     "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "logger=wandb",
                     f"logger.wandb.probe_timeout={PROBE}", f"hydra.run.dir={tmp_path}"],
                    extra_env={"WANDB_API_KEY": KEY, "WANDB_MODE": "online", "WANDB_BASE_URL": silent_server,
                               "NETRC": str(tmp_path / "no-netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "cfg")},
                    timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"logging offline because the W&B server {silent_server} is not reachable" in out.stderr
    assert "wandb sync" in out.stdout
    assert results(tmp_path)["status"] == "completed"
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_ddp_run_logs_one_wandb_run_without_warnings(tmp_path):
    """Two DDP ranks: rank 0 holds the one W&B run; rank 1 neither starts one nor fails writing the
    summary into its placeholder (it printed 'writing the W&B summary failed')."""
    out = train_cli(["model=tiny_vit", "trainer=ddp_cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                     "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "logger=wandb",
                     f"hydra.run.dir={tmp_path}"],
                    extra_env={"WANDB_MODE": "offline", "NETRC": str(tmp_path / "no-netrc"),
                               "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "W&B summary failed" not in out.stderr and "Traceback" not in out.stderr
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    assert results(tmp_path)["status"] == "completed"


# ------------------------------------------------------------------------------------------------------------
# What an offline run holds: parsed from wandb's own transaction log (run-<id>.wandb), not mocked. wandb 0.31
# writes nothing else offline (no files/config.yaml or wandb-summary.json; its Python datastore reader is gone):
# the file is LevelDB's log format (32 KiB blocks of CRC32 / length / type-framed chunks) holding wandb's
# protobuf ``Record`` messages, decoded with wandb's own ``wandb_internal_pb2``.

def wandb_records(path):
    import struct

    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]  # wandb's header: magic, 0xBEE1, version
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (2, 3):  # first / middle chunk of a record spanning blocks
            buf = chunk if kind == 2 else buf + chunk
            continue
        whole, buf = (chunk if kind == 1 else buf + chunk), b""
        record = pb.Record()
        record.ParseFromString(whole)
        yield record


class OfflineRun:
    """The run as the W&B API would show it: run record, config and summary folded in order, metric
    definitions, history rows."""

    def __init__(self, run_dir, wait_s: float = 60.0):
        import json
        import time
        files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, files
        # wandb's service process writes the run file: run.finish() can return before the file holds the run's
        # last records (seen on a loaded machine: the run record and config missing), so wait for its exit record
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:  # a file being written may end inside a record
                if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(files[0])):
                    break
            except Exception:  # noqa: BLE001 - read it again
                pass
            time.sleep(0.2)
        records = list(wandb_records(files[0]))
        self.config, self.summary, self.metrics, self.history, self.summaries = {}, {}, {}, [], []
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                self.group, self.tags, self.name = r.run.run_group, set(r.run.tags), r.run.display_name
                self.config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                self.config.update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "summary":
                upd = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update}
                self.summaries.append(upd)
                self.summary.update(upd)
            elif kind == "metric":
                self.metrics[r.metric.name or r.metric.glob_name] = r.metric
            elif kind == "history":
                self.history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})


@pytest.fixture
def offline_wandb(wandb_env):
    wandb_env.setenv("WANDB_MODE", "offline")
    return wandb_env


def test_publish_results_sets_sortable_summary_and_plottable_config(tmp_path, offline_wandb):
    """publish_results puts a results.json record into the run: the identifying fields, trainable
    parameters, learning rate and budget deviation as config (W&B's scatter and parallel-coordinates
    panels plot config against summary), params/ and perf/ as summary; val/acc keeps the max and last W&B
    made of its history; and the report reads it all back."""
    from randlora.training.loggers import build_loggers, finish_wandb, publish_results
    from randlora.report import wandb_run_to_row
    from randlora.results import check, new_record, provenance
    # a generous init_timeout: on a loaded machine the 10 s default can pass and the run falls back to CSV only
    # (the fallback is the tested behaviour elsewhere; here the run must exist)
    cfg = compose_cfg(["logger=wandb", "model=tiny_vit", "adapter=lora", "adapter.budget=5000", "data.shots=4",
                       "group=budget_sweep", "logger.wandb.init_timeout=120"])
    loggers, notes = build_loggers(cfg, str(tmp_path), "lora-tiny_vit-digits-s42", r=1)
    assert not [n for n in notes if "not logged" in n], notes
    (wb,) = [lg for lg in loggers if type(lg).__name__ == "FlatWandbLogger"]
    for step, acc in enumerate((0.5, 0.7, 0.6)):
        wb.log_metrics({"val/acc": acc, "val/loss": 2.0 - acc}, step=step)
    wb.log_metrics({"test/acc": 0.65}, step=3)
    record = new_record(cfg, run_dir=tmp_path, overrides=["adapter=lora"], config={"optim": {"lr": 0.01}})
    record.update(status="completed", r=1, params={"trainable": 5706, "total": 213130, "ratio": 0.0268,
                                                   "adapter": 5056, "lora_equivalent_rank": 1.41},
                  metrics={"val/acc": 0.6, "val/loss": 1.4, "test/acc": 0.65},
                  perf={"step_time_s": 0.012, "samples_per_s": 2650.0, "peak_memory_mb": 512.0, "train_time_s": 3.0},
                  provenance=provenance({"optim": {"lr": 0.01}}, {"optim": {"lr": None}}),
                  budget_match={"budget": 5000.0, "achieved": 5056, "deviation": 0.0112, "tolerance": 0.02,
                                "knob": "r", "rank_counts": {"1": 12}, "ranks": {"blocks.0.attn.qkv": 1},
                                "warnings": []},
                  lowrank={"rank": 1, "overall_rel_error": 0.41, "mean_rel_error": 0.39, "max_rel_error": 0.57,
                           "rank99_mean": 3.5, "layers": {"blocks.0.attn.qkv": 0.41}})
    assert check(record, missing_ok=("compile", "data", "identity", "attempts", "bases_checksum")) == []
    publish_results(loggers, record)
    finish_wandb()

    run = OfflineRun(tmp_path)
    assert run.config["method"] == "lora" and run.config["budget"] == 5000 and run.config["shots"] == 4
    assert run.config["params.trainable"] == 5706 and run.config["params.adapter"] == 5056
    assert run.config["provenance.lr"] == 0.01 and run.config["budget_match.deviation"] == 0.0112
    assert run.summary["status"] == "completed" and run.summary["params/trainable"] == 5706
    assert run.summary["perf/step_time_s"] == 0.012 and run.summary["perf/peak_memory_mb"] == 512.0
    assert run.summary["val/acc"] == {"max": 0.7, "last": 0.6}  # sortable by its best, not overwritten
    assert run.summary["val/loss"] == {"min": 1.3, "last": 1.4} and run.summary["test/acc"] == 0.65
    assert run.summary["budget_match/deviation"] == 0.0112
    assert run.summary["lowrank/overall_rel_error"] == 0.41 and run.summary["lowrank/rank"] == 1
    assert "lowrank/layers" not in run.summary  # per-layer values stay in results.json

    class ApiRun:  # what wandb.Api().runs() returns, filled from the offline file
        summary, config, state, group = run.summary, run.config, "finished", run.group
        url = "https://wandb.ai/e/p/runs/x"
    row = wandb_run_to_row(ApiRun())
    assert (row["method"], row["budget"], row["shots"], row["r"], row["sweep"]) == ("lora", 5000, 4, 1, "budget_sweep")
    assert row["trainable"] == 5706 and row["step_time_s"] == 0.012 and row["lr"] == 0.01
    assert row["budget_deviation"] == 0.0112 and row["status"] == "completed"
    assert row["lowrank_error"] == 0.41 and row["lowrank_rank"] == 1  # the report's "Full rank matters" table
    assert row["metrics"] == {"val/acc": 0.6, "val/loss": 1.4, "test/acc": 0.65}


@pytest.mark.slow
def test_training_job_run_is_grouped_tagged_flat_and_sortable(tmp_path, offline_wandb):
    """A real job (tiny ViT, a few steps) with logger=wandb offline: the run is grouped by its sweep, tagged
    by method, budget, dataset and shots, named apart from the sweep's other jobs; its config is flat (dot
    keys, the learning rate as trained); val/acc / val/loss keep their best; the parameter counts and the
    step time reach the summary; and results.json follows the schema."""
    from randlora.results import check
    from randlora.train import run as train
    from tests.helpers import FAST, results
    cfg = compose_cfg(["model=tiny_vit", "adapter=lora", "adapter.budget=5000", "data.shots=8", "group=mysweep",
                       "logger=wandb", *FAST], tmp_path)
    train(cfg)
    rec = results(tmp_path)
    assert rec["status"] == "completed"
    assert check(rec) == [] and rec["provenance"]["lr"] == rec["config"]["optim"]["lr"]

    run = OfflineRun(tmp_path)
    assert run.group == "mysweep"
    assert {"method:lora", "budget:5000", "data:digits", "shots:8", "model:tiny_vit", "r:1"} <= run.tags
    assert run.name.endswith("-b5000-k8")
    objects = sorted(k for k, v in run.config.items() if isinstance(v, dict) and v and k != "_wandb")
    assert objects == [], f"nested config values: {objects}"
    assert run.config["optim.lr"] == 0.01 and run.config["data.shots"] == 8 and run.config["adapter.method"] == "lora"
    assert run.config["method"] == "lora" and run.config["dataset"] == "digits" and run.config["budget"] == 5000
    assert str(run.metrics["val/acc"].summary).split() == ["max:", "true", "last:", "true"]
    assert str(run.metrics["val/loss"].summary).split() == ["min:", "true", "last:", "true"]
    assert run.metrics["*"].step_metric == "trainer/global_step"
    assert any(isinstance(u.get("val/acc"), dict) and "max" in u["val/acc"] for u in run.summaries)
    assert run.summary["params/trainable"] == rec["params"]["trainable"]
    assert run.summary["perf/step_time_s"] == pytest.approx(rec["perf"]["step_time_s"], rel=1e-6)
    assert all("trainer/global_step" in row for row in run.history)
