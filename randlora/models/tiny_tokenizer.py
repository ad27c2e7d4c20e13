"""A byte-level BPE tokenizer trained locally (``tokenizers``) for the tiny CPU language model."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512, split_space_runs: bool = False):
    """The BPE tokenizer of ``model=tiny_llama``, trained on ``instructions.bundled_corpus()``.

    ``split_space_runs`` (the tokenizer of ``model=tiny_llama_pretrained``): a run of two or more
    whitespace characters is a piece of its own, so no word takes the last space of a run. The
    LLM-Adapters evaluation prompt ends in a newline and 16 spaces where the training text goes on
    with the response; byte-level pre-tokenisation alone cuts the two differently (the first word of
    the response takes the 16th space), so the answer the model was trained to write never follows
    the evaluation prompt's last token. With the runs split, both cut at the same place."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..instructions import bundled_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = byte_level if not split_space_runs else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s{2,}"), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(bundled_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
