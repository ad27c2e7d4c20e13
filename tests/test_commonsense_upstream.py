"""The commonsense protocol against the upstream strings (tests/fixtures/llm_adapters_commonsense.json):
LLM-Adapters' training and evaluation templates byte for byte on real test records, its tokenisation
of a training sequence, and its answer extraction (the RandLoRA paper's cut of the response and
LLM-Adapters' own) on tricky outputs. The fixture holds the upstream templates, real records of the
8 test sets as stored at the cited commit, and what the upstream functions returned for them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from randlora.data import commonsense as cs

from randlora import instructions as ins
from randlora.tasks.causal_lm import is_correct
from tests.helpers import compose_cfg

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "llm_adapters_commonsense.json").read_text(encoding="utf-8"))
UPSTREAM_TASK = {"boolq": "boolq", "piqa": "piqa", "social_i_qa": "siqa", "hellaswag": "hellaswag",
                 "winogrande": "winogrande", "ARC-Easy": "arc_e", "ARC-Challenge": "arc_c", "openbookqa": "obqa"}


def test_templates_are_byte_identical():
    assert FIXTURE["source"]["commit"] == "816657208af4db747803f87ba40a4c71383fed7a"
    assert FIXTURE["paper_code"]["commit"] == "4ac565ecd611b47d3d4ea0ec3a49b5c1acad2a0c"
    assert {e["task"] for e in FIXTURE["records"]} == set(ins.TASK_DIRS) - {"hellaswag"}
    t = FIXTURE["templates"]
    assert ins.LLM_ADAPTERS_TRAIN_WITH_INPUT + "{output}" == t["train_with_input"]
    assert ins.LLM_ADAPTERS_TRAIN_NO_INPUT + "{output}" == t["train_no_input"]
    assert ins.LLM_ADAPTERS_EVAL_WITH_INPUT == t["eval_with_input"]
    assert ins.LLM_ADAPTERS_EVAL_NO_INPUT == t["eval_no_input"]
    # the two upstream files differ in whitespace: training's first line ends in two spaces (one with an
    # input), its blank lines carry the 16-space indentation; evaluation's do not
    assert "request.  \n\n" in t["train_no_input"] and "request. \n\n" in t["eval_no_input"]
    assert "request.\n\n" in t["eval_with_input"] and "\n" + " " * 16 + "\n" in t["train_with_input"]


@pytest.mark.parametrize("i", range(len(FIXTURE["records"])))
def test_rendered_prompts_of_real_records_equal_upstream(i):
    e = FIXTURE["records"][i]
    rec = cs._clean(e["record"], "fixture record")  # as the datamodule stores it
    assert rec["answer"] == e["record"]["answer"]   # the gold answer is compared as given upstream
    assert ins.train_prompt(rec) + rec["output"] == e["upstream_train_prompt"]
    assert ins.train_prompt(rec) == e["upstream_train_user_prompt"]
    assert ins.eval_prompt(rec) == e["upstream_eval_prompt_with_input"]
    if not rec["input"]:  # every record of the 8 test sets: what commonsense_evaluate.py passes
        assert ins.eval_prompt(rec) == e["upstream_eval_prompt_instruction_only"]
    # the tidy template is a different text (numbers with it are not comparable with the paper's)
    assert ins.eval_prompt(rec, "alpaca") != ins.eval_prompt(rec)


def _bos_tokenizer():
    """The tiny BPE tokenizer with a BOS-adding post-processor, like the LLaMA / Phi-3 tokenizers."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from randlora.models.tiny_tokenizer import tiny_tokenizer
    base = tiny_tokenizer(512)
    backend = base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str())
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", base.bos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _upstream_tokenize(tok, text, cutoff, add_eos=True):
    # LLM-Adapters' finetune.py tokenize(): truncate to cutoff_len, append EOS when there is room
    ids = tok(text, truncation=True, max_length=cutoff)["input_ids"]
    if ids[-1] != tok.eos_token_id and len(ids) < cutoff and add_eos:
        ids = ids + [tok.eos_token_id]
    return ids


@pytest.mark.parametrize("cutoff", [256, 40])
def test_training_sequences_are_upstream_tokenisation(cutoff):
    tok = _bos_tokenizer()
    for e in FIXTURE["records"]:
        rec = cs._clean(e["record"], "fixture record")
        want = _upstream_tokenize(tok, e["upstream_train_prompt"], cutoff)
        ids, labels = cs.training_example(tok, rec, cutoff_len=cutoff, train_on_inputs=True)
        assert ids == want and labels == want
        # train_on_inputs=False: -100 on as many tokens as the user prompt alone encodes to
        n = len(_upstream_tokenize(tok, e["upstream_train_user_prompt"], cutoff, add_eos=False))
        _, masked = cs.training_example(tok, rec, cutoff_len=cutoff, train_on_inputs=False)
        assert masked == ([-100] * n + want[n:])[: len(want)]


@pytest.mark.parametrize("mode", ["paper", "llm_adapters"])
def test_answer_extraction_equals_upstream(mode):
    cases = FIXTURE["extraction_cases"]
    assert any(c["paper"] != c["llm_adapters"] for c in cases)  # the two scripts' cut differs somewhere
    for c in cases:
        fmt = ins.TASK_FORMATS[UPSTREAM_TASK[c["upstream_dataset"]]]
        got = ins.extract_answer_upstream(ins.response_text(c["decoded"], mode), fmt)
        assert got == c[mode], c
        # is_correct scores exactly the upstream "label == predict"
        for gold in ins.FORMATS[fmt][1]:
            assert is_correct(c["decoded"], gold, fmt, mode) == (gold == c[mode])


def test_lenient_extraction_stays_a_named_option():
    decoded = ins.eval_prompt({"instruction": "Q?", "input": ""}) + "The correct answer is True"
    assert not is_correct(decoded, "true", "truefalse", "paper")          # upstream: case-sensitive
    assert is_correct("The correct answer is True", "true", "truefalse", "lenient")
    assert is_correct("it is untrue", "true", "truefalse", "paper")        # upstream: no word boundaries
    assert not is_correct("it is untrue", "true", "truefalse", "lenient")


def test_the_paper_protocol_is_the_default():
    from randlora.tasks.causal_lm import options
    cfg = compose_cfg(["model=tiny_llama", "data=commonsense_tiny"])
    assert cfg.task.prompt_template == "llm_adapters" and cfg.task.answer_extraction == "paper"
    assert options({})["prompt_template"] == "llm_adapters" and options({})["answer_extraction"] == "paper"
    # every paper experiment states them (tests/test_causal_lm.py::test_paper_experiment_configs_compose)
    with pytest.raises(ValueError, match="answer_extraction"):
        options({"answer_extraction": "strict"})
    with pytest.raises(ValueError, match="prompt_template"):
        options({"prompt_template": "chat"})
