"""Causal-LM instruction tuning and the commonsense evaluation (randlora/tasks/causal_lm.py,
randlora/data/commonsense.py, configs/data/commonsense_*, configs/experiment/paper/commonsense_*).

Run with OMP_NUM_THREADS=1 on a shared CPU. The end-to-end runs are marked slow (about 10 s together;
the whole file about 30 s)."""
from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from randlora.adapters import count_total, find_targets, get_method, match_budget  # noqa: E402
from randlora.data import commonsense as cs  # noqa: E402
from randlora import instructions as ins  # noqa: E402
from randlora.models import SourceUnavailableError  # noqa: E402
from randlora.tasks.causal_lm import dedupe_rows, is_correct, summarise  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "gate_up_proj", "down_proj"]


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import randlora.train  # noqa: F401  (registers the config resolvers)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


# ------------------------------------------------------------------------------ answer extraction
@pytest.mark.parametrize("text, fmt, expected", [
    ("the correct answer is true", "truefalse", "true"),
    ("The correct answer is False.", "truefalse", "false"),
    ("it is untrue that ... the answer is false", "truefalse", "false"),   # whole words only
    ("no verdict here", "truefalse", None),
    ("the correct answer is solution2", "solution", "solution2"),
    ("Solution 1 is better", "solution", "solution1"),
    ("solution3", "solution", None),
    ("the correct answer is answer4", "answer", "answer4"),
    ("Answer5, then answer2", "answer", "answer5"),                        # the first one counts
    ("the correct answer is answer", "answer", None),
    ("the correct answer is option1", "option", "option1"),
    ("OPTION2", "option", "option2"),
    ("the correct answer is ending3", "ending", "ending3"),
    ("ending5", "ending", None),
])
def test_extract_answer_every_format(text, fmt, expected):
    assert ins.extract_answer(text, fmt) == expected


def test_answer_format_candidates_and_gold():
    assert [ins.answer_format(a) for a in ("true", "False", "solution2", "answer5", "option1", "ending4", "maybe")] \
        == ["truefalse", "truefalse", "solution", "answer", "option", "ending", None]
    rec = {"instruction": "Q?\n\nAnswer1: a\n\nAnswer2: b\n\nAnswer3: c\n\nAnswer format: answer1/answer2/answer3",
           "input": "", "output": "the correct answer is answer2"}
    assert ins.candidates(rec, "answer") == ["answer1", "answer2", "answer3"]
    assert ins.gold_answer(rec) == "answer2"                       # from output when there is no answer field
    assert ins.candidates({"instruction": "no format line"}, "ending") == ["ending1", "ending2", "ending3", "ending4"]
    assert is_correct("the correct answer is answer2 because", "answer2", "answer")
    assert not is_correct("the correct answer is answer3", "answer2", "answer")
    assert not is_correct("garbage", "true", "truefalse")


def test_prompt_is_alpaca():
    p = ins.prompt_text({"instruction": "Do X", "input": ""})
    assert p.startswith("Below is an instruction that describes a task.") and p.endswith("### Response:\n")
    q = ins.prompt_text({"instruction": "Do X", "input": "ctx"})
    assert "### Input:\nctx\n\n### Response:\n" in q


# ----------------------------------------------------------------------------------- bundled data
def test_bundled_set_every_task_and_format():
    files = list(ins.BUNDLED_DIR.rglob("*.json"))
    assert sum(f.stat().st_size for f in files) < 300 * 1024
    dm = cs.InstructionDataModule(**_tiny_data_cfg())
    dm.setup("fit")
    assert len(dm.train_records) + len(dm.val_records) == 400 and len(dm.val_records) == 40
    by_task = {}
    for r in dm.test_records:
        by_task.setdefault(r["task"], []).append(r)
    assert sorted(by_task) == sorted(ins.TASK_DIRS) and all(len(v) == 20 for v in by_task.values())
    for task, recs in by_task.items():
        fmts = {ins.answer_format(r["answer"]) for r in recs}
        assert fmts == {ins.TASK_FORMATS[task]}, task
        for r in recs:
            assert r["answer"] in ins.candidates(r, ins.TASK_FORMATS[task])
    train_prompts = {r["instruction"] for r in dm.train_records + dm.val_records}
    assert not train_prompts & {r["instruction"] for r in dm.test_records}
    corpus = list(ins.bundled_corpus())
    assert len(corpus) == 560 and corpus == list(ins.bundled_corpus())


def _tiny_data_cfg(**kw):
    from omegaconf import OmegaConf
    d = OmegaConf.to_container(OmegaConf.load(CONFIGS / "data" / "commonsense_tiny.yaml"))
    d.update(kw)
    return d


def test_tokenisation_cutoff_eos_and_response_only_loss():
    from randlora.models.tiny_tokenizer import tiny_tokenizer
    tok = tiny_tokenizer(512)
    rec = {"instruction": "Please answer with true or false: is ice cold?", "input": "",
           "output": "the correct answer is true", "answer": "true"}
    ids, labels = cs.training_example(tok, rec, cutoff_len=256, train_on_inputs=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and labels == ids
    ids2, labels2 = cs.training_example(tok, rec, cutoff_len=256, train_on_inputs=False)
    assert ids2 == ids
    # LLM-Adapters masks as many tokens as its prompt alone encodes to
    n_prompt = len(cs.encode(tok, ins.train_prompt(rec)))
    assert all(x == -100 for x in labels2[:n_prompt]) and labels2[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:], skip_special_tokens=True).strip().endswith("answer is true")
    # the tidy template masks the tokens shared with the prompt's own encoding
    ids3, labels3 = cs.training_example(tok, rec, cutoff_len=256, train_on_inputs=False, template="alpaca")
    n3 = len(cs.encode(tok, ins.prompt_text(rec)))
    assert all(x == -100 for x in labels3[:n3]) and labels3[n3:] == ids3[n3:]
    assert tok.decode(ids3[n3:], skip_special_tokens=True).strip() == "the correct answer is true"
    short, _ = cs.training_example(tok, rec, cutoff_len=10, train_on_inputs=True)
    assert len(short) == 10


def test_local_folder_layout_and_missing_file(tmp_path):
    recs = json.loads((ins.BUNDLED_DIR / "train.json").read_text())
    (tmp_path / "ft-training_set").mkdir()
    (tmp_path / "ft-training_set" / "commonsense_15k.json").write_text(json.dumps(recs[:30]))
    for d in ("boolq", "piqa"):
        (tmp_path / "dataset" / d).mkdir(parents=True)
        src = ins.BUNDLED_DIR / "dataset" / d / "test.json"
        (tmp_path / "dataset" / d / "test.json").write_text(src.read_text())
    cfg = _tiny_data_cfg(path=str(tmp_path), train_file="commonsense_15k.json", tasks=["boolq", "piqa"], val_size=5)
    dm = cs.InstructionDataModule(**cfg)
    dm.setup("fit")
    assert len(dm.train_records) == 25 and len(dm.test_records) == 40
    with pytest.raises(SourceUnavailableError, match="hellaswag"):
        cs.InstructionDataModule(**{**cfg, "tasks": ["boolq", "hellaswag"]}).setup("fit")


# ------------------------------------------------------------------------------------ offline hub
@pytest.mark.parametrize("data", ["commonsense_170k", "commonsense_15k"])
def test_offline_hub_source_fails_fast_before_training(tmp_path, data):
    from randlora.train import run
    cfg = compose(["model=tiny_llama", f"data={data}", "adapter=lora", "trainer=cpu", f"paths.output_dir={tmp_path}"])
    t0 = time.time()
    with pytest.raises(SourceUnavailableError) as e:
        run(cfg)
    assert time.time() - t0 < 15
    msg = str(e.value)
    # every source of the job in one message: the training set and the 8 test sets
    assert msg.splitlines()[0].startswith("9 sources of this job are not available (HF_HUB_OFFLINE=1 is set)")
    assert cfg.data.train_source in msg and all(str(u) in msg for u in cfg.data.test_sources.values())
    assert "data.path=" in msg and "LLM-Adapters" in msg
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "failed" and "SourceUnavailableError" in res["error"]
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------- DDP metric rows
def test_rows_from_all_ranks_are_deduplicated():
    # two ranks; the distributed sampler repeated record 0 on rank 1 to even out the shards
    rank0 = [[0, 1, 1, 0], [2, 1, 0, 1], [4, 2, 1, -1]]
    rank1 = [[1, 1, 1, 1], [3, 2, 0, -1], [0, 1, 1, 0], [-1, -1, -1, -1]]
    rows = dedupe_rows(rank0 + rank1)
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
    s = summarise(rows, ["val", "boolq", "piqa"])
    assert s["boolq"]["n"] == 3 and s["boolq"]["acc"] == pytest.approx(2 / 3) and s["boolq"]["ll_acc"] == 2 / 3
    assert s["piqa"]["acc"] == 0.5 and s["piqa"]["ll_acc"] is None and "val" not in s


# -------------------------------------------------------------------------- evaluators on a model
@pytest.fixture(scope="module")
def tiny_task():
    from randlora.models import build_model
    from randlora.training.build import build_task
    cfg = compose(["model=tiny_llama", "data=commonsense_tiny", "adapter=randlora", "task.evaluator=both",
                   "task.max_new_tokens=6", "optim.lr=1e-3", "optim.weight_decay=0.0"])
    task = build_task(cfg, build_model(cfg.model), None)
    with torch.no_grad():  # move the adapter away from its zero init so the update matters
        for _, p in task.net.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    dm = cs.InstructionDataModule(**_tiny_data_cfg(max_test_per_task=2))
    dm.setup("fit")
    task.attach(dm)
    return task.eval(), dm


def test_loglik_scores_match_unpadded_sums(tiny_task):
    task, dm = tiny_task
    batch = next(iter(dm.test_dataloader()))
    scores = task.candidate_scores(batch["cand_ids"], batch["cand_mask"], batch["cand_labels"])
    for j in (0, 1, len(scores) - 1):
        keep = batch["cand_mask"][j].bool()
        ids, labels = batch["cand_ids"][j][keep], batch["cand_labels"][j][keep]
        with torch.no_grad():
            logp = torch.log_softmax(task.net(input_ids=ids[None]).logits[0, :-1].float(), -1)
        tgt = labels[1:]
        ref = logp[tgt != -100].gather(1, tgt[tgt != -100][:, None]).sum()
        assert scores[j].item() == pytest.approx(ref.item(), abs=1e-3)
    # the scored tokens are exactly the candidate's tokens
    j = 0
    lab = batch["cand_labels"][j]
    text = dm.tokenizer.decode(lab[lab != -100])
    assert text.strip() == batch["cand_text"][j]


@pytest.mark.integration
def test_generation_runs_eager_when_the_blocks_are_compiled(tiny_task):
    """Decoding with a KV cache would specialise every compiled layer on its cache slot (2 graphs per
    layer) and exhaust the recompile limit, leaving training eager; generate_texts runs eager."""
    import copy

    from torch._dynamo.utils import counters

    from randlora.compile import compile_model
    task, dm = tiny_task
    batch = next(iter(dm.test_dataloader()))
    want = task.generate_texts(batch["prompt_ids"][:2], batch["prompt_mask"][:2])
    compiled = copy.deepcopy(task)
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_model(compiled.net, {"backend": "eager"})
        assert compiled.generate_texts(batch["prompt_ids"][:2], batch["prompt_mask"][:2]) == want
        assert counters["stats"]["unique_graphs"] == 0  # nothing was traced while decoding
        with torch.no_grad():  # while the forward pass itself is compiled
            compiled.net(input_ids=batch["prompt_ids"][:2], attention_mask=batch["prompt_mask"][:2], use_cache=False)
        assert counters["stats"]["unique_graphs"] >= 1
    finally:
        torch._dynamo.reset()


def test_evaluation_prompts_and_decoding_are_the_upstream_texts(tiny_task):
    """The eval batches carry LLM-Adapters' evaluation prompt; with the upstream extraction the prompt and
    the continuation are decoded together, as the upstream script decodes its sequences."""
    task, dm = tiny_task
    batch = next(iter(dm.test_dataloader()))
    recs = dm.test_records[:2]
    tok = dm.tokenizer
    for i, r in enumerate(recs):
        keep = batch["prompt_mask"][i].bool()
        assert tok.decode(batch["prompt_ids"][i][keep], skip_special_tokens=True) == ins.eval_prompt(r)
    cont = task.generate_texts(batch["prompt_ids"][:2], batch["prompt_mask"][:2])
    full = task.generate_texts(batch["prompt_ids"][:2], batch["prompt_mask"][:2], with_prompt=True)
    for r, c, f in zip(recs, cont, full):
        assert f.startswith(ins.eval_prompt(r)) and ins.response_text(f, "paper") == c.strip()
    assert batch["formats"][:2] == [ins.TASK_FORMATS[r["task"]] for r in recs]


def test_batched_left_padded_generation_matches_single(tiny_task):
    task, dm = tiny_task
    batch = next(iter(dm.test_dataloader()))
    texts = task.generate_texts(batch["prompt_ids"][:3], batch["prompt_mask"][:3])
    for i in range(3):
        keep = batch["prompt_mask"][i].bool()
        alone = task.generate_texts(batch["prompt_ids"][i][keep][None], batch["prompt_mask"][i][keep][None])
        assert alone[0] == texts[i]


def test_merge_for_test_gives_the_same_scores_and_restores_weights(tiny_task):
    task, dm = tiny_task
    batch = next(iter(dm.test_dataloader()))
    args = (batch["cand_ids"], batch["cand_mask"], batch["cand_labels"])
    before = task.candidate_scores(*args)
    w0 = task.net.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    task.opts["merge_for_test"] = True
    try:
        task.on_test_start()
        assert task.net.model.layers[0].self_attn.q_proj.merged
        merged = task.candidate_scores(*args)
    finally:
        task.on_test_end()
        task.opts["merge_for_test"] = False
    assert torch.allclose(merged, before, atol=1e-3)
    assert not task.net.model.layers[0].self_attn.q_proj.merged
    assert torch.allclose(task.net.model.layers[0].self_attn.q_proj.base_layer.weight, w0, atol=1e-6)


# ------------------------------------------------------------------ LLaMA3-8B budgets on meta
def _meta_model(config):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _per_layer_counts(model, targets, method, r):
    spec = get_method(method)
    opts = spec.options(r=r)
    found = find_targets(model, targets)
    first = [t for t in found if ".layers.0." in t.name]
    return sum(spec.num_trainable(t.out_features, t.in_features, opts) for t in first), \
        sum(spec.num_trainable(t.out_features, t.in_features, opts) for t in found)


def test_llama3_8b_randlora30_matches_lora32_on_meta():
    from transformers import LlamaConfig
    model = _meta_model(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256))
    assert all(p.is_meta for p in model.parameters())
    total = count_total(model)
    assert total == 8_030_261_248
    rl_block, rl_all = _per_layer_counts(model, LLAMA_TARGETS, "randlora", 30)
    lo_block, lo_all = _per_layer_counts(model, LLAMA_TARGETS, "lora", 32)
    assert rl_block == 3 * 137 * (30 + 4096) + 2 * 35 * (30 + 1024) == 1_769_566
    assert lo_block == 1_769_472
    assert 100 * rl_all / total == pytest.approx(0.705, abs=0.005)
    assert 100 * lo_all / total == pytest.approx(0.705, abs=0.005)
    # the budget matcher picks RandLoRA-30 for the LoRA-32 budget (formulas only: nothing is allocated)
    picked = match_budget(model, "randlora", lo_all, target_modules=LLAMA_TARGETS)
    assert picked["r"] == 30 and picked.trainable == rl_all and "layer_options" not in picked
    # Table 15's pairs: RandLoRA-60 / -30 / -15 within 2 % of LoRA-16 / -32 / -64 (0.35 / 0.7 / 1.4 %)
    for lora_r, rand_r, pct in ((16, 60, 0.35), (32, 30, 0.7), (64, 15, 1.4)):
        lo = _per_layer_counts(model, LLAMA_TARGETS, "lora", lora_r)[1]
        rl = _per_layer_counts(model, LLAMA_TARGETS, "randlora", rand_r)[1]
        assert abs(rl - lo) / lo < 0.02 and 100 * lo / total == pytest.approx(pct, rel=0.02)


@pytest.mark.parametrize("name", ["qwen2", "phi3"])
def test_qwen2_phi3_paper_pairs_on_meta(name):
    from transformers import Phi3Config, Qwen2Config
    if name == "qwen2":
        conf = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
        targets, pairs = LLAMA_TARGETS, {16: (10, 1.18), 32: (5, 2.33)}
    else:
        conf = Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32064)
        targets, pairs = PHI3_TARGETS, {16: (40, 0.57), 32: (20, 1.14), 64: (10, 2.28)}
    model = _meta_model(conf)
    total = count_total(model)
    for lora_r, (rand_r, pct) in pairs.items():
        lo = _per_layer_counts(model, targets, "lora", lora_r)[1]
        rl = _per_layer_counts(model, targets, "randlora", rand_r)[1]
        assert 100 * lo / total == pytest.approx(pct, rel=0.03)
        assert abs(rl - lo) / lo < 0.06, (lora_r, rand_r, rl, lo)


# ------------------------------------------------------------------------ paper experiment configs
PAPER = {"llama3": ("llama3_8b", {16: 60, 32: 30, 64: 15}, 4), "qwen2": ("qwen2_0_5b", {16: 10, 32: 5}, 16),
         "phi3": ("phi3_mini", {16: 40, 32: 20, 64: 10}, 16)}


@pytest.mark.integration
def test_paper_experiment_configs_compose():
    names = sorted(p.stem for p in (CONFIGS / "experiment" / "paper").glob("commonsense_*.yaml"))
    assert len(names) == 21  # 19 + the DoRA-16/32 baselines on LLaMA3 (Table 6)
    for key, (model, pairs, micro) in PAPER.items():
        runs = [("lora", r) for r in pairs] + [("randlora", r) for r in pairs.values()] + [("vera", 1024)]
        if key == "llama3":
            runs += [("dora", 16), ("dora", 32)]
        for method, r in runs:
            cfg = compose([f"experiment=paper/commonsense_{method}{r}_{key}"])
            assert cfg.model.name == model and cfg.adapter.method == method and cfg.adapter.r == r
            assert cfg.data.name == "commonsense_170k" and cfg.data.epochs == 3 and cfg.data.source == "instructions"
            assert cfg.effective_batch_size == 16 and cfg.data.batch_size == micro
            assert cfg.optim.warmup_steps == 100 and cfg.adapter.weight_decay == 0 and cfg.adapter.dropout == 0.05
            assert cfg.task.cutoff_len == 256 and cfg.task.kind == "causal_lm"
            # the paper's prompt template and answer extraction (docs/commonsense.md)
            assert (cfg.task.prompt_template, cfg.task.answer_extraction) == ("llm_adapters", "paper")
            assert cfg.adapter.alpha == 2 * r
            assert cfg.adapter.lr == (1e-2 if method == "vera" else 1e-4)
            if method == "dora":
                assert cfg.adapter.detach_norm is True
            if method == "randlora":
                assert cfg.adapter.scale_sqrt_n is True


# --------------------------------------------------------------------------------- end to end
def _losses(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("lora", ["adapter.lr=1e-2"]),
    ("vera", ["adapter.lr=3e-2", "adapter.r=64", "adapter.alpha=128"]),
    ("randlora", ["adapter.lr=1e-2"]),
])
@pytest.mark.integration
def test_tiny_llama_trains_and_evaluates_through_the_framework(tmp_path, method, extra):
    from randlora.train import run
    cfg = compose(["model=tiny_llama", "data=commonsense_tiny", f"adapter={method}", "trainer=cpu",
                   f"paths.output_dir={tmp_path}", "trainer.log_every_n_steps=1", "data.fraction=0.2",
                   "data.epochs=2", "data.val_size=8", "data.max_test_per_task=3", "task.max_new_tokens=12",
                   "task.evaluator=both", "callbacks.adapter_checkpoint=false"] + extra)
    res = run(cfg)
    assert res["status"] == "completed"
    losses = _losses(tmp_path)
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02, losses
    m = res["metrics"]
    for prefix in ("test/acc", "test/ll_acc"):
        per_task = {t: m[f"{prefix}_{t}"] for t in ins.TASK_DIRS}
        assert all(0.0 <= v <= 1.0 for v in per_task.values())
        assert m[prefix] == pytest.approx(sum(per_task.values()) / len(per_task))
    assert 0.0 <= m["val/acc"] <= 1.0 and 0.0 <= m["val/ll_acc"] <= 1.0 and math.isfinite(m["val/loss"])
    assert res["params"]["trainable"] == res["params"]["adapter"] > 0
