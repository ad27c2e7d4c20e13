"""Offline fails fast and completely (randlora/training/preflight.py): with the hub unreachable (an offline flag, or
an endpoint that refuses or never answers) a job reports every missing source (weights, tokenizer,
training set, each test set) in one message within seconds, before anything is downloaded or built;
sources in a local cache written in the libraries' exact layout count as available and load offline."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from randlora.models import SourceUnavailableError
from randlora.hub import OFFLINE_FLAGS, hub_status, probe
from randlora.training.preflight import check_sources
from tests.helpers import compose_cfg
from tests.hf_cache import write_hub_dataset, write_hub_repo


@pytest.fixture
def hub(monkeypatch):
    """Controls what the hub looks like to this process, and undoes everything a test changes: the
    cached status, the offline flags (environment and already-imported libraries), the endpoint."""
    import datasets.config as dc
    import huggingface_hub.constants as hc
    for k in OFFLINE_FLAGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(dc, "HF_DATASETS_OFFLINE", False)
    hub_status.cache_clear()

    class Hub:
        def offline_flag(self, name="HF_HUB_OFFLINE"):
            monkeypatch.setenv(name, "1")
            hub_status.cache_clear()

        def endpoint(self, url):
            monkeypatch.setattr(hc, "ENDPOINT", url)
            hub_status.cache_clear()

    yield Hub()
    hub_status.cache_clear()
    for k in OFFLINE_FLAGS:  # set_offline() wrote them; monkeypatch restores what was there before
        monkeypatch.delenv(k, raising=False)


def _refusing_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connections are refused
    return port


@pytest.fixture
def silent_endpoint():
    """A server that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def _serve(status: int):
    class H(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *a):
            pass
    server = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _lm_job(tmp_path, *extra):
    return compose_cfg(["model=llama3_8b", "data=commonsense_170k", "adapter=lora", "trainer=cpu", *extra],
                       out_dir=tmp_path)


def _problems(msg: str) -> list[str]:
    return [ln for ln in msg.splitlines() if ln.startswith("  - ")]


# ------------------------------------------------------------------------------ one message, fast
@pytest.mark.parametrize("flag", OFFLINE_FLAGS)
def test_offline_flag_reports_every_missing_source_at_once(tmp_path, hub, flag):
    from randlora.train import run
    hub.offline_flag(flag)
    cfg = _lm_job(tmp_path)
    t0 = time.time()
    with pytest.raises(SourceUnavailableError) as e:
        run(cfg)
    assert time.time() - t0 < 15
    msg = str(e.value)
    lines = _problems(msg)
    assert msg.startswith(f"11 sources of this job are not available ({flag}=1 is set)") and len(lines) == 11
    assert "weights of llama3_8b" in lines[0] and "tokenizer of llama3_8b" in lines[1]
    assert "zwhe99/commonsense_170k" in lines[2]
    for task, url in cfg.data.test_sources.items():
        assert sum(url in ln and f"data.test_sources.{task}=" in ln for ln in lines) == 1
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "failed" and res["error"].startswith("SourceUnavailableError: 11 sources")
    assert not (tmp_path / "checkpoints").exists()


def test_refusing_endpoint_counts_as_offline_and_puts_the_libraries_offline(tmp_path, hub):
    import datasets.config as dc
    import huggingface_hub.constants as hc

    from randlora.train import run
    hub.endpoint(f"http://127.0.0.1:{_refusing_port()}")
    t0 = time.time()
    status = hub_status()
    assert not status.online and "unreachable" in status.reason and time.time() - t0 < 2
    assert hc.HF_HUB_OFFLINE and dc.HF_HUB_OFFLINE  # no loader of this process tries the network again
    with pytest.raises(SourceUnavailableError) as e:
        run(_lm_job(tmp_path))
    assert time.time() - t0 < 15 and len(_problems(str(e.value))) == 11 and "unreachable" in str(e.value)


@pytest.mark.integration
def test_an_endpoint_that_never_answers_is_bounded(hub, silent_endpoint):
    hub.endpoint(silent_endpoint)
    t0 = time.time()
    status = hub_status()
    took = time.time() - t0
    assert not status.online and "no answer within 3 s" in status.reason and 2.5 < took < 4.5
    t0 = time.time()
    assert hub_status() is status and time.time() - t0 < 0.01  # decided once per process


def test_an_answering_endpoint_counts_as_online(hub):
    ok, down = _serve(200), _serve(503)
    try:
        hub.endpoint(f"http://127.0.0.1:{ok.server_port}")
        assert hub_status().online
        # online, hub sources are the hub's to serve; a URL is checked at its own host (here: nothing listens)
        url = f"http://127.0.0.1:{_refusing_port()}/boolq/test.json"
        with pytest.raises(SourceUnavailableError) as e:
            check_sources(_lm_job("/tmp/unused", "data.tasks=[boolq]", f"data.test_sources.boolq={url}"))
        lines = _problems(str(e.value))
        assert len(lines) == 1 and url in lines[0] and "its host is unreachable" in lines[0]
        assert probe(f"http://127.0.0.1:{down.server_port}") == "it answered HTTP 503"
    finally:
        ok.shutdown()
        down.shutdown()


def test_a_vision_job_lists_its_missing_weights(tmp_path, hub):
    hub.offline_flag()
    with pytest.raises(SourceUnavailableError) as e:
        check_sources(compose_cfg(["model=dinov2_vitb14", "data=digits"]))
    lines = _problems(str(e.value))
    assert len(lines) == 1 and "timm/vit_base_patch14_dinov2.lvd142m/model.safetensors" in lines[0]
    assert "model.pretrained=" in lines[0]


# -------------------------------------------------------------------------- a local cache counts
def test_sources_in_local_caches_count_as_available_and_load_offline(tmp_path, hub, monkeypatch):
    """llama3_8b in the hub cache (a tiny model under that id), zwhe99/commonsense_170k in the datasets
    cache, the test sets as local files: nothing is missing offline, and the job's model and data load."""
    import datasets.config as dc
    import huggingface_hub.constants as hc
    import torch
    from safetensors.torch import save
    from transformers import AutoConfig, AutoModelForCausalLM

    from randlora.data import commonsense as cs

    from randlora import instructions as ins
    from randlora.models import build_model
    from randlora.models.tiny_tokenizer import tiny_tokenizer
    hub.offline_flag()
    tok = tiny_tokenizer(512)
    tok.save_pretrained(tmp_path / "tok")
    conf = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1)
    files = {f.name: f.read_bytes() for f in (tmp_path / "tok").iterdir()}
    files["config.json"] = conf.to_json_string()
    state = AutoModelForCausalLM.from_config(conf).state_dict()
    files["model.safetensors"] = save({k: v.contiguous() for k, v in state.items()})
    write_hub_repo(tmp_path / "hub", "meta-llama/Meta-Llama-3-8B", files)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    train = json.loads((ins.BUNDLED_DIR / "train.json").read_text())
    write_hub_dataset(tmp_path / "datasets", "zwhe99/commonsense_170k", {"train": train})
    monkeypatch.setattr(dc, "HF_DATASETS_CACHE", tmp_path / "datasets")
    tests = [f"data.test_sources.{t}={ins.BUNDLED_DIR / 'dataset' / ins.TASK_DIRS[t] / 'test.json'}"
             for t in ("boolq", "piqa")]
    cfg = _lm_job(tmp_path, "data.tasks=[boolq,piqa]", "model.gradient_checkpointing=false", *tests)
    check_sources(cfg)  # nothing missing
    t0 = time.time()
    dm = cs.InstructionDataModule(**{k: v for k, v in dict(cfg.data).items()})
    dm.setup("fit")
    assert len(dm.train_records) + len(dm.val_records) == len(train) and len(dm.test_records) == 40
    bundle = build_model(cfg.model)
    assert bundle.backbone.dtype == torch.bfloat16 and time.time() - t0 < 15
    # a hub dataset id that is not in the cache is still reported, alone
    with pytest.raises(SourceUnavailableError) as e:
        check_sources(_lm_job(tmp_path, "data.tasks=[boolq,piqa]", "data.train_source=someone/not-cached", *tests))
    assert len(_problems(str(e.value))) == 1 and "someone/not-cached" in str(e.value)


def test_vision_tags_in_the_hub_cache_count_as_available(tmp_path, hub, monkeypatch):
    import huggingface_hub.constants as hc

    from randlora.models import source_problems
    hub.offline_flag()
    write_hub_repo(tmp_path, "timm/vit_base_patch16_224.orig_in21k_ft_in1k", {"model.safetensors": b"x"})
    write_hub_repo(tmp_path, "timm/vit_base_patch32_clip_224.openai", {"open_clip_pytorch_model.bin": b"x"})
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    for name, missing in (("vit_b16", 0), ("clip_vitb32", 0), ("dinov2_vitb14", 1), ("clip_vitl14", 1)):
        cfg = dict(compose_cfg([f"model={name}"]).model)
        assert len(source_problems(cfg, hub_status())) == missing, name


def test_a_missing_local_file_is_reported_whatever_the_hub(tmp_path, hub):
    hub.offline_flag()
    with pytest.raises(SourceUnavailableError) as e:
        check_sources(compose_cfg(["model=tiny_vit", f"model.pretrained={tmp_path / 'nope.safetensors'}",
                                   "data=digits"]))
    assert "does not exist" in str(e.value)
    check_sources(compose_cfg(["model=tiny_vit_digits", "data=digits"]))  # the shipped file: nothing missing


def test_weights_file_cache_download_or_one_line():
    """The one rule both tag resolvers (open_clip, timm) follow: cache first, a download only when the hub
    answers, any failure one line with the fix."""
    from randlora.hub import HubStatus, weights_file
    calls = []
    online, offline = HubStatus(online=True), HubStatus(online=False, reason="HF_HUB_OFFLINE=1")
    assert weights_file("w", "/cache/f", lambda: calls.append(1), "fix", offline) == "/cache/f" and calls == []
    assert weights_file("w", None, lambda: "/downloaded", "fix", online) == "/downloaded"
    with pytest.raises(SourceUnavailableError, match=r"^w are not in the local cache and the hub is unreachable "
                                                     r"\(HF_HUB_OFFLINE=1\): fix$"):
        weights_file("w", None, lambda: calls.append(1), "fix", offline)
    assert calls == []

    def broken():
        raise OSError("connection reset\nby peer")
    with pytest.raises(SourceUnavailableError) as e:
        weights_file("w", None, broken, "fix", online)
    assert str(e.value).startswith("could not download w (") and str(e.value).endswith("): fix")
    assert "\n" not in str(e.value)
