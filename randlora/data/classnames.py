"""Curated class names and zero-shot prompt templates of the paper's image datasets.

The lists live in ``vision_datasets.json`` (next to this file). They reproduce, byte for byte, what the
RandLoRA vision-language code builds (it follows aTLAS and mlfoundations/task_vectors): the names it
reads from the dataset files after its own clean-up (CIFAR-100's raw torchvision names with their
underscores, Caltech's folder names with '-' -> ' ', ...) and its per-dataset template lists.
docs/datasets.md cites the source of every list.

A curated list is only right if its i-th name belongs to label i of the copy that is loaded. Where a
source names its labels (hub ``ClassLabel`` names, image-folder names, torchvision ``classes``),
:func:`align` compares those names with the list's ``keys`` (the raw names of the canonical source)
and either confirms the order, returns the permutation that maps the source's labels onto the
curated order, or says which name does not fit.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

DATA_FILE = Path(__file__).with_name("vision_datasets.json")


@functools.cache
def _table() -> dict:
    return json.loads(DATA_FILE.read_text())["datasets"]


def names() -> list[str]:
    """The datasets that have a curated entry."""
    return sorted(_table())


def entry(dataset: str | None) -> dict | None:
    """The curated entry of ``dataset`` (classes, templates, keys, aliases, sources), or None."""
    if not dataset:
        return None
    e = _table().get(str(dataset))
    return None if e is None else dict(e)


def classes(dataset: str) -> list[str] | None:
    e = entry(dataset)
    return None if e is None else list(e["classes"])


def templates(dataset: str) -> list[str] | None:
    e = entry(dataset)
    return None if e is None else list(e["templates"])


def normalise(name) -> str:
    """A label name reduced for comparison: a leading ``NNN.`` index dropped (Caltech-256 and CUB
    folders), lower case, every run of non-alphanumeric characters one space."""
    s = re.sub(r"^\d+\.", "", str(name).strip())
    return re.sub(r"[^0-9a-z]+", " ", s.lower()).strip()


def unnamed(source_names) -> bool:
    """True when a source's label "names" are only the label ids ("0", "1", ... or "1", "2", ...)."""
    if not source_names:
        return True
    s = [str(n).strip() for n in source_names]
    return s in ([str(i) for i in range(len(s))], [str(i + 1) for i in range(len(s))])


class ClassOrderError(ValueError):
    """The loaded copy's label names contradict the curated list."""


def align(dataset: str, source_names, where: str) -> list[int] | None:
    """How label ids of a source map onto the curated order of ``dataset``.

    Returns None when the source's labels already are in curated order (or carry no names, so there
    is nothing to check), else ``perm`` with ``perm[source_label] = curated_label``. Raises
    :class:`ClassOrderError` naming the first label that matches no curated class.
    """
    e = entry(dataset)
    if e is None or source_names is None or (unnamed(source_names) and not e.get("digit_names")):
        return None
    src = [str(n) for n in source_names]
    aliases = {normalise(k): normalise(v) for k, v in (e.get("aliases") or {}).items()}
    lookup = {}
    for forms in (e.get("keys") or [], e["classes"]):
        for i, n in enumerate(forms):
            lookup.setdefault(normalise(n), i)
    if len(src) != len(e["classes"]):
        raise ClassOrderError(
            f"{where} has {len(src)} labels but the curated {dataset} list has {len(e['classes'])} classes; "
            f"this is not the dataset the config names (check data.path / data.hub_id)")
    perm = []
    for i, n in enumerate(src):
        k = normalise(n)
        k = aliases.get(k, k)
        if k not in lookup:
            raise ClassOrderError(
                f"{where}: label {i} is named {n!r}, which matches no class of the curated {dataset} list "
                f"(label {i} there is {e['classes'][i]!r}); check that data.path / data.hub_id holds {dataset}, "
                "or set data.class_names=source to use the copy's own names")
        perm.append(lookup[k])
    seen = {}
    for i, c in enumerate(perm):
        if c in seen:
            raise ClassOrderError(f"{where}: labels {seen[c]} ({src[seen[c]]!r}) and {i} ({src[i]!r}) both match the "
                                  f"curated {dataset} class {e['classes'][c]!r}")
        seen[c] = i
    return None if perm == list(range(len(perm))) else perm
