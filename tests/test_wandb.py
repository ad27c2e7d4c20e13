"""W&B never fails a run and never holds it up for long (randlora/loggers.py), with the real wandb:
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

    from randlora.loggers import finish_wandb
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

    from randlora.loggers import build_loggers
    cfg = compose_cfg(["logger=wandb", f"logger.wandb.probe_timeout={PROBE}", *overrides])
    out = tmp_path / "run"
    t0 = time.monotonic()
    loggers, notes = build_loggers(cfg, str(out), "job")
    for lg in loggers:
        lg.log_metrics({"train/loss": 1.0}, step=0)
    elapsed = time.monotonic() - t0
    wandb = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
    return out, loggers, wandb, notes, elapsed


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
    from randlora.loggers import probe_server
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
