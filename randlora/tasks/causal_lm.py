"""Instruction tuning of a causal LM and the commonsense evaluation of the paper (§5.4, App. C.4).

Training: the prompt (``task.prompt_template``: ``llm_adapters``, the paper's template byte for byte,
or ``alpaca``) plus the record's output and EOS, cut at ``task.cutoff_len`` (paper 256); the loss
covers the whole sequence (``task.train_on_inputs: true``, the paper's code) or only the response
(``false``). docs/commonsense.md describes the protocol and where it differs from the paper's code.

Evaluation (``task.evaluator``):

* ``generate`` (default): greedy decoding (``task.num_beams`` > 1 for beam search; the paper used 4)
  of up to ``task.max_new_tokens`` tokens, stopping at the model's end-of-sequence tokens (its
  generation config's, as transformers does for the upstream script), then the answer is extracted
  (``task.answer_extraction``): ``paper`` (default) / ``llm_adapters`` decode prompt + generation,
  cut the response at "### Response:" and take the first match of the task's case-sensitive
  alternatives, as the upstream evaluation scripts; ``lenient`` takes the first whole-word,
  case-insensitive answer token of the continuation. It is compared with the gold answer. Logged as
  ``test/acc_<task>`` and ``test/acc`` (mean of the per-task accuracies), and ``val/acc``.
* ``loglik``: ranks the candidate answers (from the record's "Answer format: ..." line) by the
  log-likelihood of ``<prompt><answer_prefix><candidate>``; one forward pass per candidate, no
  decoding. Logged as ``test/ll_acc_<task>``, ``test/ll_acc`` and ``val/ll_acc``.
* ``both``.

Metrics are exact under DDP: every rank keeps one row per record (its position, task, and whether
each evaluator got it right); at the end of the epoch the rows of all ranks are gathered and
de-duplicated by position (the distributed sampler repeats records to even out the ranks), and
every rank logs the same numbers.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from ..adapters import adapted_layers, merge, unmerge
from ..instructions import (
    ANSWER_EXTRACTIONS,
    PROMPT_TEMPLATES,
    extract_answer,
    extract_answer_upstream,
    response_text,
)
from .base import AdapterTask, Network

EVALUATORS = ("generate", "loglik", "both")
_TASK_DEFAULTS = {"cutoff_len": 256, "train_on_inputs": True, "evaluator": "generate", "num_beams": 1,
                  "max_new_tokens": 32, "answer_prefix": "the correct answer is ", "merge_for_test": False,
                  "loglik_batch_size": 0, "prompt_template": "llm_adapters", "answer_extraction": "paper"}


def options(task_cfg) -> dict:
    """The task's options with their defaults, checked (one ValueError per bad value)."""
    if isinstance(task_cfg, DictConfig):
        task_cfg = OmegaConf.to_container(task_cfg, resolve=True)
    t = dict(task_cfg or {})
    opts = {k: (t[k] if t.get(k) is not None else v) for k, v in _TASK_DEFAULTS.items()}
    if opts["evaluator"] not in EVALUATORS:
        raise ValueError(f"task.evaluator={opts['evaluator']!r}; choose one of {list(EVALUATORS)}")
    if opts["prompt_template"] not in PROMPT_TEMPLATES:
        raise ValueError(f"task.prompt_template={opts['prompt_template']!r}; choose one of {list(PROMPT_TEMPLATES)}")
    if opts["answer_extraction"] not in ANSWER_EXTRACTIONS:
        raise ValueError(f"task.answer_extraction={opts['answer_extraction']!r}; choose one of "
                         f"{list(ANSWER_EXTRACTIONS)}")
    for k in ("cutoff_len", "num_beams", "max_new_tokens"):
        if isinstance(opts[k], bool) or not isinstance(opts[k], int) or opts[k] < 1:
            raise ValueError(f"task.{k}={opts[k]!r} must be a positive integer")
    if opts["cutoff_len"] < 8:
        raise ValueError(f"task.cutoff_len={opts['cutoff_len']} is too short for a prompt (paper: 256)")
    return opts


def is_correct(generated: str, gold: str, fmt: str, extraction: str = "lenient") -> bool:
    """Whether a generated text answers ``gold``. ``lenient``: ``generated`` is the continuation and its
    first answer token of the format counts. ``paper`` / ``llm_adapters``: ``generated`` is the decoded
    prompt + continuation; the answer is LLM-Adapters' extraction from the response cut as that script
    cuts it, compared with the gold answer as given. Records of no known format: the gold text appearing
    in the response."""
    if extraction == "lenient":
        if fmt:
            return extract_answer(generated, fmt) == gold
        return bool(gold) and gold in str(generated).lower()
    response = response_text(generated, extraction)
    if fmt:
        return extract_answer_upstream(response, fmt) == gold
    return bool(gold) and gold in response


def dedupe_rows(rows) -> list[list[int]]:
    """Rows ``[index, task, gen_ok, ll_ok]`` with one row per index (first kept), sorted by index."""
    seen = {}
    for r in rows:
        r = [int(x) for x in r]
        if r[0] >= 0 and r[0] not in seen:
            seen[r[0]] = r
    return [seen[k] for k in sorted(seen)]


def summarise(rows, task_names: list[str]) -> dict:
    """{task: {"n", "acc", "ll_acc"}} from de-duplicated rows (acc None when not evaluated)."""
    out = {}
    for code, name in enumerate(task_names):
        mine = [r for r in rows if r[1] == code]
        if not mine:
            continue
        gen = [r[2] for r in mine if r[2] >= 0]
        ll = [r[3] for r in mine if r[3] >= 0]
        out[name] = {"n": len(mine), "acc": sum(gen) / len(gen) if gen else None,
                     "ll_acc": sum(ll) / len(ll) if ll else None}
    return out


class CausalLMTask(AdapterTask):
    model_kind = "causal_lm"  # the ModelBundle kind this task trains

    @classmethod
    def network(cls, bundle, data, task_cfg: dict, seed: int) -> Network:
        return Network(bundle.backbone, list(bundle.default_targets), [])

    @classmethod
    def from_config(cls, net, bundle, data, task_cfg: dict, optim: dict, adapter: dict) -> "CausalLMTask":
        return cls(net, optim, adapter, tokenizer=bundle.tokenizer, task_cfg=task_cfg)

    def __init__(self, net, optim: dict, adapter: dict, *, tokenizer, task_cfg=None):
        if tokenizer is None:
            raise ValueError("a causal-LM task needs the model's tokenizer (the model bundle has none)")
        opts = options(task_cfg)
        super().__init__(net, optim, adapter)
        self.tokenizer = tokenizer
        self.opts = opts
        self.evaluator = opts["evaluator"]
        self.extraction = opts["answer_extraction"]
        self.task_names: list[str] = ["val"]
        self._rows: list[list[int]] = []
        self._merged_for_test = False
        self.last_summary: dict = {}

    # -- wiring: the datamodule tokenises with our tokenizer and prompt options
    def attach(self, datamodule) -> None:
        datamodule.attach_tokenizer(self.tokenizer, cutoff_len=self.opts["cutoff_len"],
                                    train_on_inputs=self.opts["train_on_inputs"],
                                    answer_prefix=self.opts["answer_prefix"],
                                    loglik=self.evaluator in ("loglik", "both"),
                                    prompt_template=self.opts["prompt_template"])
        names = getattr(datamodule, "test_tasks", None)
        if names:
            self.task_names = ["val"] + [t for t in names if t != "val"]

    def setup(self, stage=None):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "attach_tokenizer"):
            self.attach(dm)

    def forward(self, **batch):
        return self.net(**batch)

    # -- training
    def training_step(self, batch, _):
        out = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"], use_cache=False)
        n = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        return out.loss

    # -- evaluation
    def _task_code(self, name: str) -> int:
        if name not in self.task_names:
            self.task_names.append(name)
        return self.task_names.index(name)

    @torch.no_grad()
    def generate_texts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       with_prompt: bool = False) -> list[str]:
        """Decoded continuations of left-padded prompts (greedy, or beam search with num_beams > 1);
        ``with_prompt``: each prompt (without its padding) and its continuation decoded together, as the
        upstream evaluation decodes its (unpadded, batch-1) sequences."""
        from transformers import GenerationConfig
        tok = self.tokenizer
        # the model's own end-of-sequence tokens (e.g. Qwen2-Instruct's and Phi-3's lists), as transformers
        # uses them when the upstream script passes a generation config without any
        eos = getattr(getattr(self.net, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tok.eos_token_id
        cfg = GenerationConfig(max_new_tokens=self.opts["max_new_tokens"], num_beams=self.opts["num_beams"],
                               do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                               bos_token_id=tok.bos_token_id, use_cache=True)
        # eager even when the blocks are compiled: decoding with a KV cache specialises every layer on its
        # cache slot (2 graphs per layer and step kind), which would exhaust dynamo's recompile limit and
        # leave the training steps after it running eager
        with torch.compiler.set_stance("force_eager"):
            seqs = self.net.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=cfg)
        new = seqs[:, prompt_ids.shape[1]:]
        if not with_prompt:
            return tok.batch_decode(new, skip_special_tokens=True)
        rows = [torch.cat([p[m.bool()], n.to(p.device)]) for p, m, n in zip(prompt_ids, prompt_mask, new)]
        return [tok.decode(r, skip_special_tokens=True) for r in rows]

    @torch.no_grad()
    def candidate_scores(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the log-probabilities of the labelled tokens (labels != -100) of each left-padded
        sequence. Only the logits of the last positions (those that predict labelled tokens) are
        computed (``logits_to_keep``), so a 128k vocabulary costs little memory."""
        step = int(self.opts["loglik_batch_size"]) or ids.shape[0]
        scores = []
        for s in range(0, ids.shape[0], step):
            i, m, y = ids[s:s + step], mask[s:s + step], labels[s:s + step]
            width = i.shape[1]
            labelled = y != -100
            first = torch.where(labelled.any(1), labelled.float().argmax(1), torch.full_like(y[:, 0], width - 1))
            keep = min(width, int(width - first.min()) + 1)
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            logits = self.net(input_ids=i, attention_mask=m, position_ids=pos, logits_to_keep=keep,
                              use_cache=False).logits
            tgt = y[:, width - keep + 1:]
            sel = tgt != -100
            lp = torch.log_softmax(logits[:, :-1][sel].float(), dim=-1).gather(1, tgt[sel][:, None]).squeeze(1)
            rows = torch.arange(tgt.shape[0], device=tgt.device)[:, None].expand_as(tgt)[sel]
            scores.append(torch.zeros(tgt.shape[0], device=lp.device).index_add_(0, rows, lp))
        return torch.cat(scores) if scores else torch.zeros(0)

    def _loglik_correct(self, batch) -> list[int]:
        n = len(batch["answers"])
        if batch["cand_ids"].shape[0] == 0:
            return [-1] * n
        scores = self.candidate_scores(batch["cand_ids"], batch["cand_mask"], batch["cand_labels"]).tolist()
        best: dict[int, tuple[float, int]] = {}
        for j, (o, sc) in enumerate(zip(batch["cand_owner"].tolist(), scores)):
            if o not in best or sc > best[o][0]:
                best[o] = (sc, j)
        return [int(batch["cand_text"][best[i][1]] == batch["answers"][i]) if i in best else -1 for i in range(n)]

    def _eval_step(self, batch, stage: str):
        n = len(batch["answers"])
        if "input_ids" in batch:
            out = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"], use_cache=False)
            self.log_eval_loss(stage, out.loss, n)  # batch token-means, weighted by the batch's examples
        gen_ok = [-1] * n
        if self.evaluator in ("generate", "both"):
            texts = self.generate_texts(batch["prompt_ids"], batch["prompt_mask"],
                                        with_prompt=self.extraction != "lenient")
            gen_ok = [int(is_correct(t, a, f, self.extraction))
                      for t, a, f in zip(texts, batch["answers"], batch["formats"])]
        ll_ok = self._loglik_correct(batch) if self.evaluator in ("loglik", "both") else [-1] * n
        for i in range(n):
            task = "val" if stage == "val" else batch["tasks"][i]
            self._rows.append([int(batch["index"][i]), self._task_code(task), gen_ok[i], ll_ok[i]])

    def _gather_rows(self) -> list[list[int]]:
        local = torch.tensor(self._rows, dtype=torch.long, device=self.device).reshape(-1, 4)
        self._rows = []
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            sizes = self.all_gather(torch.tensor([local.shape[0]], device=self.device)).flatten()
            width = max(1, int(sizes.max()))
            pad = torch.full((width, 4), -1, dtype=torch.long, device=self.device)
            pad[: local.shape[0]] = local
            local = self.all_gather(pad).reshape(-1, 4)
        return dedupe_rows(local.cpu().tolist())

    def _epoch_end(self, stage: str) -> dict:
        summary = summarise(self._gather_rows(), self.task_names)
        self.last_summary = summary
        if stage == "val":
            s = summary.get("val")
            if s and s["acc"] is not None:
                self.log("val/acc", s["acc"], prog_bar=True, sync_dist=True)
            if s and s["ll_acc"] is not None:
                self.log("val/ll_acc", s["ll_acc"], sync_dist=True)
            return summary
        tasks = {k: v for k, v in summary.items() if k != "val"}
        for key, prefix in (("acc", "test/acc"), ("ll_acc", "test/ll_acc")):
            accs = {k: v[key] for k, v in tasks.items() if v[key] is not None}
            for name, acc in accs.items():
                self.log(f"{prefix}_{name}", acc, sync_dist=True)
            if accs:
                self.log(prefix, sum(accs.values()) / len(accs), sync_dist=True)
        if self._trainer is None or self.trainer.is_global_zero:
            print(format_summary(tasks), flush=True)
        return summary

    def validation_step(self, batch, _):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._epoch_end("val")

    def test_step(self, batch, _):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._epoch_end("test")

    def on_validation_epoch_start(self):
        self._rows = []

    def on_test_epoch_start(self):
        self._rows = []

    # -- optional: evaluate the test set on merged weights (as the paper's evaluation script)
    def on_test_start(self):
        super().on_test_start()  # the cross-rank check of the constant buffers comes first
        if self.opts["merge_for_test"] and adapted_layers(self.net):
            merge(self.net)
            self._merged_for_test = True

    def on_test_end(self):
        if self._merged_for_test:
            unmerge(self.net)
            self._merged_for_test = False


def format_summary(tasks: dict) -> str:
    """A per-task accuracy table (generation and / or log-likelihood), with the average."""
    if not tasks:
        return ""
    has_gen = any(v["acc"] is not None for v in tasks.values())
    has_ll = any(v["ll_acc"] is not None for v in tasks.values())
    head = f"{'task':<12}{'n':>6}" + (f"{'acc':>9}" if has_gen else "") + (f"{'ll_acc':>9}" if has_ll else "")
    lines = ["", "commonsense evaluation", head]

    def cell(x):
        return f"{100 * x:>8.2f}%" if x is not None else f"{'-':>9}"

    for name, v in tasks.items():
        lines.append(f"{name:<12}{v['n']:>6}" + (cell(v["acc"]) if has_gen else "")
                     + (cell(v["ll_acc"]) if has_ll else ""))
    avg = lambda k: (sum(v[k] for v in tasks.values() if v[k] is not None)  # noqa: E731
                     / max(1, sum(v[k] is not None for v in tasks.values())))
    lines.append(f"{'average':<12}{sum(v['n'] for v in tasks.values()):>6}" + (cell(avg("acc")) if has_gen else "")
                 + (cell(avg("ll_acc")) if has_ll else ""))
    return "\n".join(lines)
