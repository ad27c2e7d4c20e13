"""Instruction data for causal LMs: the 8-task commonsense benchmark of LLM-Adapters (paper §5.4).

Records follow the LLM-Adapters format: ``instruction``, ``input`` (often empty), ``output`` ("the
correct answer is true") and ``answer`` ("true"). Training uses commonsense_170k or its 15k subset;
testing uses BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c and OBQA, each scored by the
answer token of its format (true/false, solution1/2, answerN, ending1-4, option1/2).

Where records come from (``data.*``):

* ``path``: a local folder in the LLM-Adapters layout, ``<path>/<train_file>`` (or
  ``<path>/ft-training_set/<train_file>``) and ``<path>/dataset/<task dir>/test.json`` (or
  ``<path>/<task dir>/test.json``). ``path: bundled`` is the small synthetic set shipped in
  ``randlora/data/bundled/commonsense_tiny`` (offline; tests and the CPU demo).
* otherwise ``train_source`` / ``test_sources``: each a Hugging Face hub id (loaded with
  ``datasets.load_dataset(id, split=...)``), a URL of a JSON file (``datasets``' json builder) or a
  local JSON / JSON-lines file.

Every source is read in ``setup()``, which the framework calls before the model is built, so a
missing file or an unreachable hub fails at once with :class:`~randlora.models.SourceUnavailableError`.

Tokenisation needs the model's tokenizer, which the datamodule does not own: the task hands it over
with :meth:`InstructionDataModule.attach_tokenizer` (``CausalLMTask.setup`` does so), together with
the prompt options (cutoff length, loss on the whole sequence or the answer only, prompt template).

Prompt templates and answer extraction: :mod:`randlora.instructions`.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataConfigError, SourceUnavailableError, offline_message
from .samplers import EpochSeededSampler
from ..instructions import (BUNDLED_DIR, TASK_DIRS, answer_format, candidates, check_template, eval_prompt,
                            gold_answer, read_json_records, record_format, train_prompt)

# ------------------------------------------------------------------------------------- loading
HOW_LOCAL = ("Provide local files instead: on a machine with network, download the LLM-Adapters data "
             "(github.com/AGI-Edgerunners/LLM-Adapters: ft-training_set/commonsense_170k.json or "
             "commonsense_15k.json, and dataset/<task>/test.json for boolq, piqa, social_i_qa, hellaswag, "
             "winogrande, ARC-Easy, ARC-Challenge, openbookqa), copy them into one folder in that layout and pass "
             "data.path=/that/folder (or data.train_source=/file.json and data.test_sources.<task>=/file.json); "
             "data=commonsense_tiny runs offline on the bundled synthetic set.")
SHORT_FIX = ("download it on a machine with network and pass data.path=<a folder in the LLM-Adapters layout> "
             "(docs/commonsense.md), or data.{key}=/path/to/file.json")


def source_kind(source: str) -> str:
    """``file`` (an existing local file), ``missing`` (a local path that does not exist), ``url`` or
    ``hub`` (a Hugging Face dataset id)."""
    src = str(source)
    if os.path.isfile(src):
        return "file"
    if src.startswith(("http://", "https://")):
        return "url"
    if src.endswith((".json", ".jsonl")) or src.startswith((".", os.path.sep, "~")) or src.count("/") >= 2 \
            or os.path.isdir(os.path.dirname(src) or "\0"):
        return "missing"
    return "hub"


def source_problem(source: str, what: str, key: str, hub) -> str | None:
    """Why ``source`` cannot be read now (one line with its fix), or None."""
    from ..hub import cached_dataset, url_status
    kind, src = source_kind(source), str(source)
    fix = SHORT_FIX.format(key=key)
    if kind == "missing":
        return f"{what}: local file {src!r} does not exist; {fix}"
    if kind == "url":
        if not hub.online:
            return f"{what} ({src}) is a URL, which datasets reads only with the network (never from a cache): {fix}"
        why = url_status(src)
        return None if why is None else f"{what} ({src}): its host is unreachable ({why}): {fix}"
    if kind == "hub" and not hub.online and not cached_dataset(src):
        from datasets import config
        return (f"{what} (hub dataset {src}) is not in the local datasets cache ({config.HF_DATASETS_CACHE}): on a "
                f"machine with network run datasets.load_dataset({src!r}) and copy that cache here, or {fix}")
    return None


def source_problems(data_cfg: dict, hub) -> list[str]:
    """Every source of an instruction dataset config (training file, each task's test file) that cannot
    be read now; empty when all can (``randlora.sources.check_sources`` reports them together)."""
    d = dict(data_cfg)
    try:
        dm = InstructionDataModule(**d)
    except DataConfigError:
        return []  # a config error: setup() reports it
    problems = []
    wanted = [("train_source", "the training set", None)] + [(f"test_sources.{t}", f"the {t} test set", t)
                                                            for t in dm.tasks]
    for key, what, task in wanted:
        what = f"{what} of {dm.name}"
        try:
            src = dm._train_source() if task is None else dm._test_source(task)
        except SourceUnavailableError as e:  # a file missing from data.path's folder
            problems.append(str(e).split(" Provide local files instead")[0])
            continue
        except DataConfigError:
            continue
        why = source_problem(src, what, key, hub)
        if why:
            problems.append(why)
    return problems


def load_records(source: str, what: str, split: str = "train") -> list[dict]:
    """Records from a local JSON / JSON-lines file, a URL of one, or a hub id (``datasets``). With the
    hub unreachable, a URL or an uncached hub id fails at once, without a network attempt."""
    from ..hub import hub_status
    src = str(source)
    kind = source_kind(src)
    if kind == "file":
        try:
            return read_json_records(Path(src))
        except (OSError, ValueError) as e:
            raise SourceUnavailableError(f"could not read {what} from {src!r}: {e} (expected a JSON list of "
                                         "records with instruction / input / output / answer)") from None
    if kind == "missing":
        raise SourceUnavailableError(f"{what}: local file {src!r} does not exist. {HOW_LOCAL}")
    hub = hub_status()
    if not hub.online:
        why = source_problem(src, what, "train_source" if "training" in what else "test_sources.<task>", hub)
        if why:
            raise SourceUnavailableError(why)
    import datasets
    try:  # offline, datasets serves a prepared copy of a hub dataset from its cache
        if kind == "url":
            ds = datasets.load_dataset("json", data_files={split: src}, split=split)
        else:
            ds = datasets.load_dataset(src, split=split)
    except Exception as e:
        raise SourceUnavailableError(offline_message(what, src, HOW_LOCAL, e)) from None
    return ds.to_list()


def _first_existing(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


# ------------------------------------------------------------------------------------- datasets
class Records(Dataset):
    """A list of records; items carry their position (``index``) for exact distributed metrics."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return {**self.records[i], "index": i}


class InstructionDataModule(L.LightningDataModule):
    """Training, validation and per-task test records of an instruction-tuning benchmark.

    The validation set (``val_size`` records, paper: 120) is held out from the training records by a
    generator seeded with ``seed`` only. ``fraction`` and ``shots`` (k records per gold answer) subset
    the remaining training records, also from ``seed`` only.
    """

    def __init__(self, name: str = "commonsense", source: str = "instructions", path: str | None = None,
                 train_file: str = "commonsense_170k.json", train_source: str | None = None,
                 train_split: str = "train", test_sources: dict | None = None, test_split: str = "train",
                 tasks=None, val_size: int = 120, max_test_per_task: int | None = None,
                 shots: int | None = None, fraction: float = 1.0, seed: int = 0, batch_size: int = 16,
                 eval_batch_size: int | None = None, num_workers: int = 0, **_ignored):
        super().__init__()
        if source != "instructions":
            raise DataConfigError(f"InstructionDataModule reads data.source=instructions, got {source!r}")
        self.name, self.path, self.train_file = name, path, train_file
        self.train_source, self.train_split = train_source, train_split
        self.test_sources, self.test_split = dict(test_sources or {}), test_split
        self.tasks = list(tasks) if tasks else list(TASK_DIRS)
        unknown = [t for t in self.tasks if t not in TASK_DIRS and t not in self.test_sources]
        if unknown:
            raise DataConfigError(f"data.tasks has unknown task(s) {unknown}; known: {list(TASK_DIRS)} "
                                  "(or give data.test_sources.<name>=<source> for a new one)")
        self.val_size = int(val_size or 0)
        self.max_test_per_task = max_test_per_task
        self.shots, self.fraction, self.seed = shots, float(fraction), int(seed)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        # the training order follows the run seed (passed by the framework); the subsets follow data.seed
        self.order_seed = int(_ignored.get("order_seed", seed))
        self.train_records = self.val_records = self.test_records = None
        self.tokenizer = None
        self.options: dict = {}

    # -- sources
    def _root(self) -> Path | None:
        if self.path is None:
            return None
        return BUNDLED_DIR if str(self.path) == "bundled" else Path(os.path.expanduser(str(self.path)))

    def _train_source(self) -> str:
        root = self._root()
        if root is not None:
            f = Path(self.train_file)
            tried = [f] if f.is_absolute() else [root / f, root / "ft-training_set" / f]
            hit = _first_existing(tried)
            if hit is None:
                raise SourceUnavailableError(f"training set of {self.name}: none of {[str(p) for p in tried]} "
                                             f"exists (data.path={self.path}, data.train_file={self.train_file}). "
                                             + HOW_LOCAL)
            return str(hit)
        if not self.train_source:
            raise DataConfigError(f"dataset {self.name!r} needs data.path=<folder> or data.train_source=<hub id, "
                                  "URL or JSON file>")
        return str(self.train_source)

    def _test_source(self, task: str) -> str:
        root = self._root()
        if root is not None:
            d = TASK_DIRS.get(task, task)
            tried = [root / "dataset" / d / "test.json", root / d / "test.json"]
            hit = _first_existing(tried)
            if hit is None:
                raise SourceUnavailableError(f"test set {task!r} of {self.name}: none of "
                                             f"{[str(p) for p in tried]} exists (data.path={self.path}). "
                                             + HOW_LOCAL)
            return str(hit)
        src = self.test_sources.get(task)
        if not src:
            raise DataConfigError(f"dataset {self.name!r} has no source for test task {task!r}: set "
                                  f"data.test_sources.{task}=<hub id, URL or JSON file> or data.path=<folder>")
        return str(src)

    # -- lightning hooks
    def setup(self, stage=None):
        if self.train_records is not None:
            return
        train = load_records(self._train_source(), f"the training set of {self.name}", self.train_split)
        tests = []
        for task in self.tasks:
            recs = load_records(self._test_source(task), f"the {task} test set of {self.name}", self.test_split)
            if self.max_test_per_task is not None:
                recs = recs[: int(self.max_test_per_task)]
            if not recs:
                raise DataConfigError(f"the {task} test set of {self.name} is empty")
            tests += [{**_clean(r, f"{task} test record {i}"), "task": task} for i, r in enumerate(recs)]
        train = [_clean(r, f"training record {i}") for i, r in enumerate(train)]
        if len(train) <= self.val_size:
            raise DataConfigError(f"{self.name}: {len(train)} training records cannot spare data.val_size="
                                  f"{self.val_size} for validation; lower data.val_size")
        order = list(range(len(train)))
        random.Random(self.seed).shuffle(order)
        val = [{**train[i], "task": "val"} for i in sorted(order[: self.val_size])]
        train = [train[i] for i in sorted(order[self.val_size:])]
        if self.shots is not None:
            train = _shots(train, int(self.shots), self.seed)
        if self.fraction != 1.0:
            if not 0 < self.fraction <= 1:
                raise DataConfigError(f"data.fraction={self.fraction} must be in (0, 1]")
            k = max(1, round(len(train) * self.fraction))
            keep = sorted(random.Random(self.seed + 1).sample(range(len(train)), k))
            train = [train[i] for i in keep]
        self.train_records, self.val_records, self.test_records = train, val, tests

    @property
    def test_tasks(self) -> list[str]:
        return list(self.tasks)

    # -- tokenisation (the task provides the tokenizer)
    def attach_tokenizer(self, tokenizer, cutoff_len: int = 256, train_on_inputs: bool = True,
                         answer_prefix: str = "the correct answer is ", loglik: bool = False,
                         prompt_template: str = "llm_adapters") -> None:
        """Give the datamodule the model's tokenizer and the prompt options; called by the task."""
        if cutoff_len is None or int(cutoff_len) < 8:
            raise DataConfigError(f"task.cutoff_len={cutoff_len!r} must be an integer >= 8 (paper: 256)")
        check_template(prompt_template)
        if tokenizer.pad_token_id is None:
            raise DataConfigError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.tokenizer = tokenizer
        self.options = {"cutoff_len": int(cutoff_len), "train_on_inputs": bool(train_on_inputs),
                        "answer_prefix": answer_prefix, "loglik": bool(loglik), "prompt_template": prompt_template}

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError("InstructionDataModule has no tokenizer: call dm.attach_tokenizer(tokenizer, ...) "
                               "first (CausalLMTask does it in its setup hook)")
        if self.train_records is None:
            self.setup("fit")

    def train_dataloader(self):
        self._need_tokenizer()
        # epoch-seeded order: a resumed run replays the data order of an uninterrupted one
        sampler = EpochSeededSampler(len(self.train_records), self.order_seed)
        return DataLoader(Records(self.train_records), batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=TrainCollate(self.tokenizer, **self._train_opts()))

    def val_dataloader(self):
        self._need_tokenizer()
        if not self.val_records:
            return []
        return self._eval_loader(self.val_records, with_loss=True)

    def test_dataloader(self):
        self._need_tokenizer()
        return self._eval_loader(self.test_records, with_loss=False)

    def _train_opts(self):
        o = self.options
        return {"cutoff_len": o["cutoff_len"], "train_on_inputs": o["train_on_inputs"],
                "template": o["prompt_template"]}

    def _eval_loader(self, records, with_loss):
        o = self.options
        collate = EvalCollate(self.tokenizer, cutoff_len=o["cutoff_len"], train_on_inputs=o["train_on_inputs"],
                              answer_prefix=o["answer_prefix"], loglik=o["loglik"], with_loss=with_loss,
                              template=o["prompt_template"])
        return DataLoader(Records(records), batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0, collate_fn=collate)


def _clean(r: dict, what: str) -> dict:
    if not isinstance(r, dict) or not r.get("instruction"):
        raise DataConfigError(f"{what} has no 'instruction' field (LLM-Adapters format: instruction, input, "
                              f"output, answer): {str(r)[:200]}")
    out = {"instruction": str(r["instruction"]), "input": str(r.get("input") or ""),
           "output": str(r.get("output") or "")}
    out["answer"] = gold_answer(r)
    if not out["output"]:
        out["output"] = f"the correct answer is {out['answer']}"
    return out


def _shots(train: list[dict], k: int, seed: int) -> list[dict]:
    if k <= 0:
        raise DataConfigError(f"data.shots must be a positive integer (records per answer), got {k!r}")
    by_answer: dict[str, list[int]] = {}
    for i, r in enumerate(train):
        by_answer.setdefault(r["answer"], []).append(i)
    rng = random.Random(seed)
    keep = []
    for ans in sorted(by_answer):
        idx = by_answer[ans]
        keep += rng.sample(idx, min(k, len(idx)))
    return [train[i] for i in sorted(keep)]


# ------------------------------------------------------------------------------------ tokenising
def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the model's BOS first (added if the tokenizer does not add it)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def training_example(tokenizer, record: dict, cutoff_len: int, train_on_inputs: bool,
                     template: str = "llm_adapters") -> tuple[list, list]:
    """(input_ids, labels) of prompt + output + EOS, cut at ``cutoff_len`` (EOS only when the cut left
    room, as LLM-Adapters' ``tokenize``); labels -100 on the prompt when ``train_on_inputs`` is false:
    on as many tokens as the prompt alone encodes to (LLM-Adapters' ``user_prompt_len``) with the
    ``llm_adapters`` template, on the tokens shared with the prompt's encoding with ``alpaca``."""
    prompt = train_prompt(record, template)
    ids = encode(tokenizer, prompt + record["output"])[:cutoff_len]
    eos = tokenizer.eos_token_id
    if eos is not None and len(ids) < cutoff_len and ids[-1] != eos:
        ids = ids + [eos]
    labels = list(ids)
    if not train_on_inputs:
        prompt_ids = encode(tokenizer, prompt)[:cutoff_len]
        n_prompt = len(prompt_ids) if template == "llm_adapters" else _common_prefix(prompt_ids, ids)
        n_prompt = min(n_prompt, len(ids))
        labels[:n_prompt] = [-100] * n_prompt
    return ids, labels


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if left:
                out[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def pad_batch(tokenizer, pairs: list[tuple[list, list]]) -> dict:
    """(input_ids, labels) pairs as one right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    ids = _pad([p[0] for p in pairs], tokenizer.pad_token_id)
    labels = _pad([p[1] for p in pairs], -100)
    mask = _pad([[1] * len(p[0]) for p in pairs], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TrainCollate:
    """Right-padded input_ids / attention_mask / labels (-100 on padding)."""

    def __init__(self, tokenizer, cutoff_len: int, train_on_inputs: bool, template: str = "llm_adapters"):
        self.tokenizer, self.cutoff_len, self.train_on_inputs = tokenizer, cutoff_len, train_on_inputs
        self.template = template

    def __call__(self, items: list[dict]) -> dict:
        return pad_batch(self.tokenizer, [training_example(self.tokenizer, r, self.cutoff_len, self.train_on_inputs,
                                                        self.template) for r in items])


class EvalCollate:
    """What evaluation needs for a batch of records:

    * ``prompt_ids`` / ``prompt_mask``: left-padded prompts for generation;
    * ``answers``, ``formats`` (the answer format scored: :func:`record_format`), ``tasks`` (lists of
      str), ``index`` (LongTensor, the record positions);
    * with ``loglik``: ``cand_ids`` / ``cand_mask`` / ``cand_labels`` (prompt + answer prefix + each
      candidate, left-padded, labels only on the tokens after the shared context), ``cand_owner`` (which record)
      and ``cand_text``;
    * with ``with_loss``: ``input_ids`` / ``attention_mask`` / ``labels`` as in training (validation loss).
    """

    def __init__(self, tokenizer, cutoff_len: int, train_on_inputs: bool, answer_prefix: str,
                 loglik: bool, with_loss: bool, template: str = "llm_adapters"):
        self.tokenizer, self.cutoff_len, self.train_on_inputs = tokenizer, cutoff_len, train_on_inputs
        self.answer_prefix, self.loglik, self.with_loss = answer_prefix, loglik, with_loss
        self.template = template

    def __call__(self, items: list[dict]) -> dict:
        tok = self.tokenizer
        prompts = [encode(tok, eval_prompt(r, self.template)) for r in items]
        out = {"prompt_ids": _pad(prompts, tok.pad_token_id, left=True),
               "prompt_mask": _pad([[1] * len(p) for p in prompts], 0, left=True),
               "answers": [r["answer"] for r in items],
               "formats": [record_format(r) for r in items],
               "tasks": [r.get("task", "") for r in items],
               "index": torch.tensor([int(r["index"]) for r in items], dtype=torch.long)}
        if self.with_loss:
            pairs = [training_example(tok, r, self.cutoff_len, self.train_on_inputs, self.template) for r in items]
            out.update(pad_batch(tok, pairs))
        if self.loglik:
            seqs, labels, owner, texts = [], [], [], []
            prefix = self.answer_prefix.rstrip()
            for i, r in enumerate(items):
                ctx_text = eval_prompt(r, self.template) + prefix
                ctx = encode(tok, ctx_text)
                sep = " " if self.answer_prefix.endswith(" ") else ""
                for c in candidates(r, answer_format(r["answer"])):
                    ids = encode(tok, ctx_text + sep + c)
                    n = min(_common_prefix(ctx, ids), len(ids) - 1)
                    seqs.append(ids)
                    labels.append([-100] * n + ids[n:])
                    owner.append(i)
                    texts.append(c)
            if seqs:
                # left-padded, so the scored tokens are the last positions of every row
                out["cand_ids"] = _pad(seqs, tok.pad_token_id, left=True)
                out["cand_mask"] = _pad([[1] * len(s) for s in seqs], 0, left=True)
                out["cand_labels"] = _pad(labels, -100, left=True)
            else:
                out["cand_ids"] = out["cand_mask"] = out["cand_labels"] = torch.zeros(0, 1, dtype=torch.long)
            out["cand_owner"] = torch.tensor(owner, dtype=torch.long)
            out["cand_text"] = texts
        return out
