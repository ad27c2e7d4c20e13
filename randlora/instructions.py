"""The LLM-Adapters instruction format of the commonsense benchmark (paper §5.4): the prompt
templates, the answer formats of the eight tasks, how an answer is read from generated text, and the
bundled synthetic set's text (the corpus of the tiny LLaMA's tokenizer).

Used by the data (``randlora.data.commonsense``: records -> prompts), the task
(``randlora.tasks.causal_lm``: generated text -> answer) and the tiny model's tokenizer
(``randlora.models.tiny_tokenizer``), so none of them imports another for it.

Prompts (``task.prompt_template``; docs/commonsense.md): ``llm_adapters`` (default) is the template
the paper trained and evaluated with, byte for byte: LLM-Adapters' ``finetune.py`` for training and
its ``commonsense_evaluate.py`` for evaluation (the two differ in whitespace; the RandLoRA paper's
commonsense code, a fork of DoRA's fork of LLM-Adapters, has the same strings). ``alpaca`` is the
tidy Alpaca template (one template, no indentation).

Answers (``task.answer_extraction``): ``paper`` and ``llm_adapters`` score as the upstream
evaluation scripts do: the response is the decoded prompt + generation cut at "### Response:" (the
last piece in the RandLoRA/DoRA script, the second in LLM-Adapters'), and the answer is the first
match of the task's case-sensitive alternatives (``true|false``, ``solution1|solution2``,
``answer1|...|answer5``, ``ending1|...|ending4``, ``option1|option2``), "" (wrong) when none
matches. ``lenient`` takes the first whole-word, case-insensitive answer token of the continuation.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import DataConfigError

BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "bundled" / "commonsense_tiny"

# short name (used in metric names) -> directory of the LLM-Adapters test set
TASK_DIRS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "siqa": "social_i_qa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_e": "ARC-Easy",
    "arc_c": "ARC-Challenge",
    "obqa": "openbookqa",
}
# answer format of each task
TASK_FORMATS = {"boolq": "truefalse", "piqa": "solution", "siqa": "answer", "hellaswag": "ending",
                "winogrande": "option", "arc_e": "answer", "arc_c": "answer", "obqa": "answer"}
# answer format -> (regex for the answer token, default candidates)
FORMATS = {
    "truefalse": (r"\b(true|false)\b", ["true", "false"]),
    "solution": (r"\bsolution\s?([12])\b", ["solution1", "solution2"]),
    "answer": (r"\banswer\s?([1-5])\b", ["answer1", "answer2", "answer3", "answer4", "answer5"]),
    "ending": (r"\bending\s?([1-4])\b", ["ending1", "ending2", "ending3", "ending4"]),
    "option": (r"\boption\s?([12])\b", ["option1", "option2"]),
}
_PREFIX = {"truefalse": "", "solution": "solution", "answer": "answer", "ending": "ending", "option": "option"}

# The tidy Alpaca prompt (task.prompt_template=alpaca), the same for training and evaluation
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# The templates the paper trained and evaluated with (task.prompt_template=llm_adapters), byte for byte:
# github.com/AGI-Edgerunners/LLM-Adapters @ 816657208af4db747803f87ba40a4c71383fed7a, finetune.py and
# commonsense_evaluate.py, generate_prompt (identical in github.com/PaulAlbert31/RandLoRA @ 4ac565e,
# commonsense_reasoning/). The lines sit inside an indented triple-quoted string, so each carries 16
# spaces; the training template's blank lines carry them too, the evaluation template's do not, and the
# first lines end in different runs of spaces. Training appends the record's output to its template.
_IND = " " * 16
_HEAD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
               "Write a response that appropriately completes the request.")
_HEAD_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.")
LLM_ADAPTERS_TRAIN_WITH_INPUT = (_HEAD_INPUT + " \n\n" + _IND + "### Instruction:\n" + _IND + "{instruction}\n"
                                 + _IND + "\n" + _IND + "### Input:\n" + _IND + "{input}\n" + _IND + "\n"
                                 + _IND + "### Response:\n" + _IND)
LLM_ADAPTERS_TRAIN_NO_INPUT = (_HEAD_NO_INPUT + "  \n\n" + _IND + "### Instruction:\n" + _IND + "{instruction}\n" + _IND
                               + "\n" + _IND + "### Response:\n" + _IND)
LLM_ADAPTERS_EVAL_WITH_INPUT = (_HEAD_INPUT + "\n\n" + _IND + "### Instruction:\n" + _IND + "{instruction}\n\n"
                                + _IND + "### Input:\n" + _IND + "{input}\n\n" + _IND + "### Response:\n" + _IND)
LLM_ADAPTERS_EVAL_NO_INPUT = (_HEAD_NO_INPUT + " \n\n" + _IND + "### Instruction:\n" + _IND + "{instruction}\n\n"
                              + _IND + "### Response:\n" + _IND)
PROMPT_TEMPLATES = ("llm_adapters", "alpaca")
RESPONSE_MARK = "### Response:"

# task.answer_extraction: paper (RandLoRA's evaluation script), llm_adapters (LLM-Adapters'), lenient (ours)
ANSWER_EXTRACTIONS = ("paper", "llm_adapters", "lenient")
# LLM-Adapters' extract_answer: per task, re.findall of these case-sensitive alternatives (no word boundaries)
UPSTREAM_PATTERNS = {"truefalse": r"true|false", "solution": r"solution1|solution2",
                     "answer": r"answer1|answer2|answer3|answer4|answer5", "ending": r"ending1|ending2|ending3|ending4",
                     "option": r"option1|option2"}


# ------------------------------------------------------------------------------- prompts, answers
def prompt_text(record: dict) -> str:
    """The tidy Alpaca prompt of a record, up to and including ``### Response:\\n``."""
    inp = (record.get("input") or "").strip()
    tpl = PROMPT_WITH_INPUT if inp else PROMPT_NO_INPUT
    return tpl.format(instruction=record["instruction"], input=inp)


def check_template(template: str) -> None:
    if template not in PROMPT_TEMPLATES:
        raise DataConfigError(f"task.prompt_template={template!r}; choose one of {list(PROMPT_TEMPLATES)}")


def _render(record: dict, template: str, with_input: str, no_input: str) -> str:
    """``alpaca``: prompt_text; ``llm_adapters``: the template with or without the input, chosen by the
    input's Python truthiness as LLM-Adapters does (the input used as given)."""
    check_template(template)
    if template == "alpaca":
        return prompt_text(record)
    inp = record.get("input")
    return (with_input if inp else no_input).format(instruction=record["instruction"], input=inp)


def train_prompt(record: dict, template: str = "llm_adapters") -> str:
    """What precedes the record's output in a training sequence. ``llm_adapters``: LLM-Adapters'
    finetune.py ``generate_prompt`` without the output (its input test is Python truthiness: an empty
    input selects the no-input template, and the input is used as given)."""
    return _render(record, template, LLM_ADAPTERS_TRAIN_WITH_INPUT, LLM_ADAPTERS_TRAIN_NO_INPUT)


def eval_prompt(record: dict, template: str = "llm_adapters") -> str:
    """The prompt a model answers at evaluation. ``llm_adapters``: commonsense_evaluate.py's
    ``generate_prompt(instruction, input)``. (That script passes the instruction only; every record of
    the 8 test sets has an empty input, so passing the record's input changes nothing there.)"""
    return _render(record, template, LLM_ADAPTERS_EVAL_WITH_INPUT, LLM_ADAPTERS_EVAL_NO_INPUT)


def response_text(decoded: str, extraction: str) -> str:
    """The response in a decoded prompt + generation, cut as the upstream evaluation scripts cut it:
    after the last "### Response:" (``paper``: RandLoRA's / DoRA's script) or between the first and the
    second (``llm_adapters``), stripped."""
    parts = str(decoded).split(RESPONSE_MARK)
    if extraction == "llm_adapters":
        return (parts[1] if len(parts) > 1 else parts[0]).strip()
    return parts[-1].strip()


def extract_answer_upstream(response: str, fmt: str) -> str:
    """LLM-Adapters' ``extract_answer``: the first match of the format's case-sensitive alternatives
    in the stripped response ("solution12" -> "solution1", "untrue" -> "true", "True" -> no match),
    "" when nothing matches."""
    if fmt not in UPSTREAM_PATTERNS:
        raise ValueError(f"unknown answer format {fmt!r}; choose one of {list(UPSTREAM_PATTERNS)}")
    found = re.findall(UPSTREAM_PATTERNS[fmt], str(response).strip())
    return found[0] if found else ""


def record_format(record: dict) -> str:
    """The answer format scored for a record: its task's (as the upstream script picks the pattern by
    dataset), else its gold answer's; "" when neither is known."""
    return TASK_FORMATS.get(record.get("task", "")) or answer_format(record.get("answer", "")) or ""


def answer_format(answer: str) -> str | None:
    """The format of a gold answer ("true" -> truefalse, "answer3" -> answer ...), None if unknown."""
    a = str(answer).strip().lower()
    for fmt, (pattern, _) in FORMATS.items():
        if re.fullmatch(pattern, a):
            return fmt
    return None


def extract_answer(text: str, fmt: str) -> str | None:
    """The first answer token of format ``fmt`` in generated ``text`` (normalised: "Answer 2" ->
    "answer2"), or None when the text holds none."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown answer format {fmt!r}; choose one of {list(FORMATS)}")
    m = re.search(FORMATS[fmt][0], str(text).lower())
    if m is None:
        return None
    return _PREFIX[fmt] + m.group(1)


def normalise_answer(answer: str) -> str:
    fmt = answer_format(answer)
    return extract_answer(answer, fmt) if fmt else str(answer).strip().lower()


def candidates(record: dict, fmt: str | None) -> list[str]:
    """Candidate answers of a record: its "Answer format: a/b/c" line, else the format's defaults."""
    text = f"{record.get('instruction', '')}\n{record.get('input') or ''}"
    m = re.search(r"answer format:\s*([^\n]+)", text, flags=re.IGNORECASE)
    if m:
        opts = [o.strip().lower() for o in m.group(1).split("/") if o.strip()]
        if len(opts) >= 2 and (fmt is None or all(answer_format(o) == fmt for o in opts)):
            return opts
    return list(FORMATS[fmt][1]) if fmt else []


def gold_answer(record: dict) -> str:
    """The record's ``answer``, else the answer token found in its ``output``."""
    ans = record.get("answer")
    if ans is not None and str(ans).strip():
        return normalise_answer(ans)
    out = str(record.get("output") or "")
    for fmt in FORMATS:
        got = extract_answer(out, fmt)
        if got:
            return got
    return out.strip().lower()


# ---------------------------------------------------------------------------------------- bundled
def read_json_records(path: Path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        data = next((v for v in data.values() if isinstance(v, list)), [])
    return list(data)


def bundled_corpus() -> Iterator[str]:
    """Texts of the bundled set (training prompts + outputs, test prompts + answers, in the default
    ``llm_adapters`` templates), in a fixed order: the corpus of the tiny LLaMA's tokenizer (which then
    merges the templates' runs of spaces into few tokens)."""
    for r in read_json_records(BUNDLED_DIR / "train.json"):
        yield train_prompt(r) + str(r.get("output", ""))
    for short, dirname in TASK_DIRS.items():
        for r in read_json_records(BUNDLED_DIR / "dataset" / dirname / "test.json"):
            yield eval_prompt(r) + str(r.get("answer", ""))
