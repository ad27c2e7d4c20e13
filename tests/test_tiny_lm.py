"""The tiny causal LM pretrained here (``assets/tiny_llama_commonsense``, ``model=tiny_llama_pretrained``):
its pretraining text holds no test record, the shipped files are pinned by their SHA-256 (a damaged
copy is refused), the pretraining is deterministic, and adapting it improves on it
(``experiment=commonsense_quickstart``)."""
from __future__ import annotations

import json
import random
import shutil
from types import SimpleNamespace

import pytest
import torch

from randlora.instructions import eval_prompt, train_prompt
from randlora.models import SourceUnavailableError, build_model, file_sha256, source_problems
from randlora.pretrain import (LM_ARCH, LM_FILES, LM_OUT, LM_SEEDS, LM_TASKS, LM_VOCAB, bundled,
                               bundled_test_instructions, lm_corpus, pretrain_lm)
from tests.helpers import compose_cfg, results, train_cli

QUICKSTART = ["experiment=commonsense_quickstart"]
OFFLINE = SimpleNamespace(online=False, reason="test")  # a local folder never needs the hub


def _model_cfg(**over):
    cfg = compose_cfg(["model=tiny_llama_pretrained"]).model
    for k, v in over.items():
        cfg[k] = v
    return cfg


def test_pretraining_text_has_no_test_record():
    held_out = bundled_test_instructions()
    assert len(held_out) == 8 * bundled.TEST_PER_TASK  # every test record of the eight tasks, all distinct
    corpus = lm_corpus()
    assert len(corpus) > 1000
    texts = [train_prompt(r) + r["output"] + "\n" + eval_prompt(r) for r in corpus]
    assert not any(q in t for t in texts for q in held_out)
    # only the four pretraining tasks (their answer formats), never the other four's
    formats = {r["answer"].rstrip("12345") for r in corpus}
    assert formats == {"true", "false", "solution", "answer", "ending"}
    # the generator does write test records for these seeds: the corpus leaves them out
    order = [name for name, _ in bundled.TASKS]
    raw = {r["instruction"] for s in LM_SEEDS for t in LM_TASKS
           for r in dict(bundled.TASKS)[t](random.Random(s * 1000 + order.index(t)))}
    assert raw & held_out


def test_shipped_files_match_the_recorded_sha256_and_load():
    cfg = _model_cfg()
    assert set(cfg.sha256) == set(LM_FILES)
    for name, digest in cfg.sha256.items():
        assert file_sha256(LM_OUT / name) == digest, name
    assert sum((LM_OUT / n).stat().st_size for n in LM_FILES) < 2 * 1024 * 1024
    assert source_problems(cfg, OFFLINE) == []
    bundle = build_model(cfg)
    assert bundle.kind == "causal_lm" and bundle.backbone.config.model_type == "llama"
    for k, v in LM_ARCH.items():  # the architecture the pretraining builds
        assert getattr(bundle.backbone.config, k) == v, k
    # the shipped tokenizer is the tiny tokenizer with whitespace runs split, trained from the bundled corpus;
    # the evaluation prompt's tokens are a prefix of the training text's (the response starts on a boundary)
    from randlora.data.commonsense import encode
    from randlora.models.tiny_tokenizer import tiny_tokenizer
    rec = lm_corpus()[0]
    text = eval_prompt(rec) + rec["output"]
    assert bundle.tokenizer(text)["input_ids"] == tiny_tokenizer(LM_VOCAB, split_space_runs=True)(text)["input_ids"]
    prompt = encode(bundle.tokenizer, eval_prompt(rec))
    assert encode(bundle.tokenizer, text)[:len(prompt)] == prompt


@pytest.mark.parametrize("damage", ["flip_weight_byte", "tokenizer_edited", "weights_missing"])
def test_a_damaged_copy_is_refused_before_loading(tmp_path, damage):
    copy = tmp_path / "lm"
    shutil.copytree(LM_OUT, copy)
    if damage == "flip_weight_byte":
        data = bytearray((copy / "model.safetensors").read_bytes())
        data[-5] ^= 0x01  # inside a tensor: the file still parses
        (copy / "model.safetensors").write_bytes(bytes(data))
    elif damage == "tokenizer_edited":
        tok = json.loads((copy / "tokenizer.json").read_text())
        tok["added_tokens"][0]["content"] = "<PAD>"
        (copy / "tokenizer.json").write_text(json.dumps(tok))
    else:
        (copy / "model.safetensors").unlink()
        (copy / "pytorch_model.bin").write_bytes(b"not read")
    cfg = _model_cfg(pretrained=str(copy))
    [problem] = source_problems(cfg, OFFLINE)  # the preflight names it
    assert ("SHA-256" in problem) if damage != "weights_missing" else ("has no model.safetensors" in problem)
    with pytest.raises(SourceUnavailableError, match="SHA-256|has no model.safetensors"):
        build_model(cfg)
    shutil.copytree(LM_OUT, tmp_path / "intact")  # the same copy undamaged loads
    assert build_model(_model_cfg(pretrained=str(tmp_path / "intact"))).kind == "causal_lm"


def test_pretraining_is_deterministic():
    records = lm_corpus()[:48]
    torch.set_num_threads(1)
    a, _ = pretrain_lm(records, steps=3, seed=0, batch_size=8)
    b, _ = pretrain_lm(records, steps=3, seed=0, batch_size=8)
    c, _ = pretrain_lm(records, steps=3, seed=1, batch_size=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.integration
def test_adapting_the_pretrained_lm_beats_the_base(tmp_path):
    """The quick start (RandLoRA, seed 42), cut to 10 of its 30 epochs to keep the test short, against the same
    model untrained (train=false). The base never saw the four held-out tasks and answers winogrande in no
    valid format (0 %); adapted, it answers in winogrande's format and the held-out tasks gain (measured at 10
    epochs: winogrande 0 -> 30 %, the four summed 0.60 -> 0.90; at 30 epochs 0.60 -> 1.35)."""
    base = train_cli([*QUICKSTART, "train=false", f"hydra.run.dir={tmp_path / 'base'}"], timeout=300)
    assert base.returncode == 0, base.stderr[-3000:]
    tuned = train_cli([*QUICKSTART, "trainer.max_epochs=10", f"hydra.run.dir={tmp_path / 'tuned'}"], timeout=300)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    mb, mt = results(tmp_path / "base")["metrics"], results(tmp_path / "tuned")["metrics"]
    new = ("winogrande", "arc_e", "arc_c", "obqa")
    assert mb["test/acc_winogrande"] == 0.0 and mt["test/acc_winogrande"] >= 0.2, (mb, mt)
    assert sum(mt[f"test/acc_{t}"] for t in new) > sum(mb[f"test/acc_{t}"] for t in new) + 0.1, (mb, mt)
