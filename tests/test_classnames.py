"""The curated class names and prompt templates of the paper's 22 image datasets
(randlora/data/vision_datasets.json) against the configs and the facts of their upstream sources."""
import collections
import json
import re

import pytest

from randlora.data import classnames as cn
from tests.helpers import ROOT, compose_cfg

PAPER = ["caltech101", "caltech256", "cars", "cifar10", "cifar100", "country211", "cub200", "dtd", "eurosat",
         "fgvc_aircraft", "flowers102", "food101", "gtsrb", "imagenet", "mnist", "oxford_pets", "pascal_voc",
         "resisc45", "stl10", "sun397", "svhn", "ucf101"]
# duplicates present in the upstream list itself (CLIP's ImageNet names, kept for comparability)
UPSTREAM_DUPLICATES = {"imagenet": {"missile", "sunglasses"}}


def test_every_paper_dataset_has_curated_names_and_templates():
    assert sorted(cn.names()) == sorted(PAPER)
    for name in PAPER:
        cfg = compose_cfg([f"data={name}", "model=clip_vitb32"])
        e = cn.entry(name)
        names, n = e["classes"], cfg.data.num_classes
        assert len(names) == n, name
        assert all(isinstance(c, str) and c.strip() == c and c for c in names), name
        dups = {c for c, k in collections.Counter(names).items() if k > 1}
        assert dups == UPSTREAM_DUPLICATES.get(name, set()), (name, dups)
        # never a bare label id, except where the digits are the classes (MNIST, SVHN)
        ids = [c for i, c in enumerate(names) if c in (str(i), str(i + 1))]
        assert (ids == names) if e.get("digit_names") else not ids, name
        for t in e["templates"]:
            assert t.count("{}") == 1 and t.format("x") != t, (name, t)
        keys = e.get("keys")
        if keys is not None:
            assert len(keys) == n and len(set(keys)) == n, name
        assert e["names_source"] and e["templates_source"]


def test_no_truncated_or_raw_hub_names():
    c100 = cn.classes("cifar100")
    # the hub's uoft-cs/cifar100 truncates "crab" to "cra"; CIFAR's own meta file (torchvision) has "crab"
    assert "cra" not in c100 and c100[26] == "crab"
    # torchvision's CIFAR-100 classes are the meta file's fine label names, alphabetical, raw (underscores)
    assert c100 == sorted(c100) and "aquarium_fish" in c100 and "maple_tree" in c100
    # Caltech: folder names cleaned as the paper's code cleans them ("-" -> " ", " 101" dropped)
    c256 = cn.classes("caltech256")
    assert c256[0] == "ak47" and c256[1] == "american flag" and c256[14] == "bonsai" and c256[-1] == "clutter"
    c101 = cn.classes("caltech101")
    assert "BACKGROUND_Google" not in c101 and c101[:4] == ["Faces", "Faces_easy", "Leopards", "Motorbikes"]
    # EuroSAT's folder names map to OpenAI's names; Pets title-cased like torchvision
    assert cn.classes("eurosat")[0] == "annual crop land" and cn.entry("eurosat")["keys"][0] == "AnnualCrop"
    assert cn.classes("oxford_pets")[:2] == ["Abyssinian", "American Bulldog"]
    # no empty or purely numeric name outside the digit datasets
    for name in PAPER:
        e = cn.entry(name)
        for c in e["classes"]:
            assert not re.fullmatch(r"\s*|\d+", c) or e.get("digit_names"), (name, c)


def test_label_order_of_the_canonical_sources():
    """The curated order is the order of the source each config loads: sorted folder names for ImageFolder
    layouts (DTD, SUN397, EuroSAT, ImageNet wnids, Country211 codes, Caltech folders), sorted meta keys for
    Food-101, numbered folders for Caltech-256."""
    def sorted_keys(name):
        e = cn.entry(name)
        k = e.get("keys", e["classes"])
        return k == sorted(k)
    for name in ("dtd", "sun397", "eurosat", "imagenet", "country211", "caltech101", "caltech256", "food101",
                 "cifar100", "cifar10", "stl10", "resisc45", "oxford_pets"):
        assert sorted_keys(name), name
    keys = cn.entry("caltech256")["keys"]
    assert [int(k.split(".")[0]) for k in keys] == list(range(1, 258))
    assert cn.entry("imagenet")["keys"][:2] == ["n01440764", "n01443537"]
    assert cn.classes("imagenet")[:2] == ["tench", "goldfish"]


def test_templates_follow_the_paper_code():
    assert cn.templates("mnist") == ['a photo of the number: "{}".']
    assert len(cn.templates("imagenet")) == 80 and cn.templates("imagenet")[0] == "a bad photo of a {}."
    assert cn.templates("flowers102") == ["a photo of a {}, a type of flower."]
    assert cn.templates("fgvc_aircraft") == ["a photo of a {}, a type of aircraft.",
                                             "a photo of the {}, a type of aircraft."]
    data = json.loads((ROOT / "randlora" / "data" / "vision_datasets.json").read_text())
    assert "PaulAlbert31/RandLoRA" in data["_about"]


@pytest.mark.parametrize("source_names,expect", [
    (None, None),                                              # unnamed: nothing to check
    ([str(i) for i in range(10)], None),                       # ids as names: nothing to check
    (["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"], None),
    (["truck", "ship", "horse", "frog", "dog", "deer", "cat", "bird", "automobile", "airplane"],
     list(range(9, -1, -1))),
])
def test_align_confirms_or_remaps(source_names, expect):
    assert cn.align("cifar10", source_names, "copy") == expect


def test_align_refuses_names_that_do_not_fit():
    names = cn.entry("cifar10")["classes"][:9] + ["lorry"]
    with pytest.raises(cn.ClassOrderError, match=r"label 9 is named 'lorry'.*data.class_names=source"):
        cn.align("cifar10", names, "copy")
    with pytest.raises(cn.ClassOrderError, match=r"has 3 labels but the curated cifar10 list has 10"):
        cn.align("cifar10", ["a", "b", "c"], "copy")
    twice = cn.entry("cifar10")["classes"][:9] + ["airplane"]
    with pytest.raises(cn.ClassOrderError, match="both match"):
        cn.align("cifar10", twice, "copy")
    # the hub's truncated CIFAR-100 name is a known alias
    hub = ["cra" if c == "crab" else c for c in cn.classes("cifar100")]
    assert cn.align("cifar100", hub, "copy") is None
