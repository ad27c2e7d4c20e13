"""Causal language models through transformers (LLaMA3-8B, Qwen2-0.5B, Phi3-mini) and a tiny twin."""
from __future__ import annotations

import torch

from . import ModelBundle, SourceUnavailableError, offline_message

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_causal_lm(cfg) -> ModelBundle:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[cfg.get("dtype", "float32")]
    if cfg.get("tiny"):
        from .tiny_tokenizer import tiny_tokenizer
        tok = tiny_tokenizer(vocab_size=int(cfg.tiny.vocab_size))
        t = dict(cfg.tiny)
        t["vocab_size"] = len(tok)
        model_type = t.pop("model_type", "llama")
        config = AutoConfig.for_model(model_type, **t, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(int(cfg.get("init_seed", 0)))
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    else:
        from transformers import AutoTokenizer
        source = cfg.pretrained
        try:
            tok = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except Exception as e:
            raise SourceUnavailableError(offline_message(
                f"the causal LM {cfg.name}", str(source),
                "Download it on a machine with network (huggingface-cli download <id>) and pass "
                "model.pretrained=/path/to/local/folder (a save_pretrained folder).", e)) from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    if cfg.get("gradient_checkpointing"):
        # transformers >= 5.2x renamed it; frozen embeddings need input grads for adapters inside checkpoints
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()
        model.config.use_cache = False
    return ModelBundle(backbone=model, kind="causal_lm", default_targets=list(cfg.targets), tokenizer=tok)
