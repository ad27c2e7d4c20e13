"""Causal language models through transformers (LLaMA3-8B, Qwen2-0.5B, Phi3-mini) and a tiny twin.

``model.pretrained`` is a hub id or a local ``save_pretrained`` folder; ``model.model_type`` is the
architecture the config expects (``llama``, ``qwen2``, ``phi3``): a folder or hub copy of another
architecture is refused before its weights are read. ``model.sha256`` ({file: hex digest}) pins the
files of a local folder (the shipped ``assets/tiny_llama_commonsense``): a missing or changed file is
refused before anything is read. A local folder with ``model.safetensors`` is loaded from it only
(never from a pickle beside it). With the hub unreachable, everything is read
from the local cache only (``local_files_only``), without retries.
"""
from __future__ import annotations

import json
import os

import torch

from . import ModelBundle, SourceUnavailableError, checksum_problem, is_local_path, short_error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _cached_weights(repo: str) -> bool:
    """Whether the weights of hub model ``repo`` are complete in the local cache (every shard of a
    sharded checkpoint)."""
    from ..hub import cached_hub_file
    for name in WEIGHT_FILES:
        path = cached_hub_file(repo, name)
        if path is None:
            continue
        if not name.endswith(".index.json"):
            return True
        try:
            shards = set(json.loads(open(path, encoding="utf-8").read())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        return all(cached_hub_file(repo, s) for s in shards)
    return False


def _cached_tokenizer(repo: str) -> bool:
    from ..hub import cached_hub_file
    return bool(cached_hub_file(repo, "tokenizer_config.json")) and any(
        cached_hub_file(repo, f) for f in TOKENIZER_FILES)


def _folder_problem(path: str, expected_type: str | None, sha256=None) -> str | None:
    """Why a local path is not a save_pretrained folder of the expected architecture, or not the files
    ``sha256`` pins (None if it is)."""
    if not os.path.exists(path):
        return f"local folder {path!r} does not exist"
    if not os.path.isdir(path):
        return (f"{path!r} is a file, not a save_pretrained folder (a folder with config.json, the weights and "
                "the tokenizer files)")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        return f"{path!r} has no config.json: not a save_pretrained folder"
    try:
        model_type = json.loads(open(cfg_file, encoding="utf-8").read()).get("model_type")
    except (OSError, ValueError) as e:
        return f"{cfg_file!r} is not valid JSON ({short_error(e)})"
    if expected_type and model_type != expected_type:
        return (f"{path!r} holds a {model_type!r} model, not the {expected_type!r} architecture this config builds; "
                "pass a folder of that model or the matching model= config")
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        return f"{path!r} has no weights ({' / '.join(WEIGHT_FILES)})"
    return checksum_problem(path, sha256)


HOW = ("on a machine with network run `hf download {id}` (gated models: `hf auth login` first) and copy the cache "
       "folder ({cache}) here, or save it with save_pretrained and pass model.pretrained=/path/to/that/folder")


def source_problems(cfg, hub) -> list[str]:
    if cfg.get("tiny") or not cfg.get("pretrained"):
        return []
    name, source = cfg.get("name"), str(cfg.get("pretrained"))
    if is_local_path(source):
        why = _folder_problem(os.path.expanduser(source), cfg.get("model_type"), cfg.get("sha256"))
        return [f"the causal LM {name}: {why}"] if why else []
    if hub.online:  # the hub serves it (an id that does not exist fails at load, naming the id)
        return []
    from ..hub import hub_cache_dir
    fix = HOW.format(id=source, cache=hub_cache_dir())
    problems = []
    if not _cached_weights(source):
        problems.append(f"weights of {name} (hub model {source}: config.json and {' or '.join(WEIGHT_FILES[:2])}) "
                        f"are not in the local cache: {fix}")
    elif not _cached_config(source):
        problems.append(f"the config of {name} (hub model {source}: config.json) is not in the local cache: {fix}")
    if not _cached_tokenizer(source):
        problems.append(f"tokenizer of {name} (hub model {source}: tokenizer_config.json and "
                        f"{' / '.join(TOKENIZER_FILES)}) is not in the local cache: {fix}")
    return problems


def _cached_config(repo: str) -> bool:
    from ..hub import cached_hub_file
    return bool(cached_hub_file(repo, "config.json"))


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

        from ..hub import hub_cache_dir, hub_status
        name, source = cfg.get("name"), str(cfg.pretrained)
        expected = cfg.get("model_type")
        local = is_local_path(source)
        if local:
            source = os.path.expanduser(source)
            why = _folder_problem(source, expected, cfg.get("sha256"))
            if why:
                raise SourceUnavailableError(f"the causal LM {name}: {why}")
        hub = hub_status()
        offline = local or not hub.online
        where = "the folder" if local else ("the local cache (the hub is unreachable: " + str(hub.reason) + ")"
                                            if not hub.online else "the hub")
        fix = "" if local else " " + HOW.format(id=source, cache=hub_cache_dir())
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=offline)
        except Exception as e:  # noqa: BLE001
            raise SourceUnavailableError(f"the config of causal LM {name} ({source}) could not be read from {where} "
                                         f"({short_error(e)}).{fix}") from None
        if expected and config.model_type != expected:
            raise SourceUnavailableError(f"the causal LM {name}: {source} is a {config.model_type!r} model, not the "
                                         f"{expected!r} architecture this config builds")
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        except Exception as e:  # noqa: BLE001
            raise SourceUnavailableError(f"the tokenizer of causal LM {name} ({source}) could not be read from {where} "
                                         f"({short_error(e)}).{fix}") from None
        try:
            safe = {"use_safetensors": True} if local and os.path.isfile(os.path.join(source, "model.safetensors")) else {}
            model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, local_files_only=offline,
                                                         **safe)
        except Exception as e:  # noqa: BLE001
            raise SourceUnavailableError(f"the weights of causal LM {name} ({source}) could not be read from {where} "
                                         f"({short_error(e)}).{fix}") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    if cfg.get("gradient_checkpointing"):
        # transformers >= 5.2x renamed it; frozen embeddings need input grads for adapters inside checkpoints
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()
        model.config.use_cache = False
    return ModelBundle(backbone=model, kind="causal_lm", default_targets=list(cfg.targets), tokenizer=tok)
