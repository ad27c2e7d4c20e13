"""Image datasets in the layouts researchers already have on disk (no download, ever).

* ``torchvision``: a torchvision dataset class with ``root=data.path`` and ``download=False``, one
  set of constructor arguments per split (``data.torchvision.train / val / test``), or one set split
  at random as the paper's code splits Caltech (``data.torchvision.random_split``).
* ``ucf101_midframes``: the aTLAS / CoOp UCF101 layout (``UCF-101-midframes/`` with
  ``split_zhou_UCF101.json``).
* ``cub_200_2011``: the CUB-200-2011 archive (``CUB_200_2011/images.txt``, ``classes.txt``, ...).
* ``voc2007_crops``: PASCAL VOC 2007 as single-label classification, one sample per annotated object
  cropped to its box (the paper's code, following aTLAS); ``VOCdevkit/VOC2007`` as torchvision's
  VOC classes expect it.

Each loader returns datasets with a ``labels`` tensor and the source's own label names (or None),
so the curated class list can be checked against them (randlora/data/classnames.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import SourceUnavailableError
from .subsets import Subset

# What torchvision's class reads under root=..., relative to it: checked before anything is loaded
# (source_problems), so a missing or misplaced root is one line, not a RuntimeError from deep inside.
TORCHVISION_LAYOUT = {
    "Food101": ["food-101/meta", "food-101/images"],
    "DTD": ["dtd/dtd/labels", "dtd/dtd/images"],
    "Flowers102": ["flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"],
    "OxfordIIITPet": ["oxford-iiit-pet/images", "oxford-iiit-pet/annotations"],
    "StanfordCars": ["stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
                     "stanford_cars/cars_train", "stanford_cars/cars_test",
                     "stanford_cars/cars_test_annos_withlabels.mat"],
    "FGVCAircraft": ["fgvc-aircraft-2013b/data/variants.txt", "fgvc-aircraft-2013b/data/images"],
    "Country211": ["country211/train", "country211/valid", "country211/test"],
    "Caltech101": ["caltech101/101_ObjectCategories"],
    "Caltech256": ["caltech256/256_ObjectCategories"],
    "GTSRB": ["gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv"],
    "STL10": ["stl10_binary/train_X.bin", "stl10_binary/test_X.bin"],
    "SVHN": ["train_32x32.mat", "test_32x32.mat"],
    "MNIST": ["MNIST/raw"],
    "CIFAR10": ["cifar-10-batches-py"],
    "CIFAR100": ["cifar-100-python"],
}
# where the class keeps its labels, and its label names when they come from the data files
# (a hard-coded torchvision list, e.g. Flowers102.classes, is not evidence of the files' order)
_LABELS = {"Food101": "_labels", "DTD": "_labels", "Flowers102": "_labels", "OxfordIIITPet": "_labels",
           "FGVCAircraft": "_labels", "StanfordCars": "_samples", "GTSRB": "_samples", "Country211": "targets",
           "Caltech101": "y", "Caltech256": "y", "STL10": "labels", "SVHN": "labels", "MNIST": "targets",
           "CIFAR10": "targets", "CIFAR100": "targets"}
_NAMES = {"Food101": "classes", "DTD": "classes", "OxfordIIITPet": "classes", "FGVCAircraft": "classes",
          "StanfordCars": "classes", "Country211": "classes", "Caltech101": "categories", "Caltech256": "categories",
          "STL10": "classes", "MNIST": "classes", "CIFAR10": "classes", "CIFAR100": "classes"}
DOWNLOAD_HINT = {
    "StanfordCars": "the original URL is gone: follow aTLAS DATASETS.md (Kaggle images + devkit + "
                    "cars_test_annos_withlabels.mat) to build <root>/stanford_cars/",
}

LAYOUTS = {
    "ucf101_midframes": ["UCF-101-midframes/split_zhou_UCF101.json"],
    "cub_200_2011": ["CUB_200_2011/images.txt", "CUB_200_2011/classes.txt", "CUB_200_2011/image_class_labels.txt",
                     "CUB_200_2011/train_test_split.txt", "CUB_200_2011/images"],
    "voc2007_crops": ["VOCdevkit/VOC2007/ImageSets/Main", "VOCdevkit/VOC2007/Annotations",
                      "VOCdevkit/VOC2007/JPEGImages"],
}
LAYOUT_HINT = {
    "ucf101_midframes": "aTLAS DATASETS.md 'Setup Guide for UCF101': UCF-101-midframes.zip and split_zhou_UCF101.json "
                        "(CoOp's split) extracted under data.path",
    "cub_200_2011": "the CUB_200_2011.tgz archive (data.caltech.edu/records/65de6-vp158) extracted under data.path",
    "voc2007_crops": "VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar extracted under data.path "
                     "(torchvision.datasets.VOCDetection(root, year='2007', image_set=..., download=True) writes it)",
}


def missing_paths(root, required) -> list[str]:
    return [r for r in required if not os.path.exists(os.path.join(root, r))]


# ------------------------------------------------------------------------------------- datasets
class ReadError(ValueError):
    """An image of the dataset could not be read (one line naming it)."""


def _open_rgb_or_raise(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoder error: name the file
        raise ReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


class ListImages(Dataset):
    """(path, label[, box]) records read with PIL; ``labels`` is a tensor."""

    def __init__(self, records, transform):
        self.records, self.transform = list(records), transform
        self.labels = torch.tensor([r[1] for r in self.records], dtype=torch.long)

    def __len__(self):
        return len(self.records)

    def path(self, i):
        return self.records[i][0]

    def __getitem__(self, i):
        rec = self.records[int(i)]
        img = _open_rgb_or_raise(rec[0])
        if len(rec) > 2:  # an object box (left, top, right, bottom)
            img = img.crop(rec[2])
        return self.transform(img), int(rec[1])


class TorchvisionImages(Dataset):
    """A torchvision dataset with its labels as a tensor; the transform is ours."""

    def __init__(self, ds, labels, transform):
        self.ds, self.labels, self.transform = ds, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        try:
            img, y = self.ds[int(i)]
        except (OSError, SyntaxError, ValueError) as e:
            raise ReadError(f"cannot read item {int(i)} of {type(self.ds).__name__} at {self.ds.root}: "
                            f"{type(e).__name__}: {e}") from None
        if not hasattr(img, "convert"):  # tensors / arrays of some classes
            from torchvision.transforms.functional import to_pil_image
            img = to_pil_image(img)
        return self.transform(img), int(y)


def _tv_labels(name, ds) -> torch.Tensor:
    raw = getattr(ds, _LABELS[name])
    if name in ("StanfordCars", "GTSRB"):
        raw = [s[1] for s in raw]
    return torch.as_tensor(list(map(int, raw)) if not torch.is_tensor(raw) else raw.tolist(), dtype=torch.long)


def load_torchvision(spec: dict, root, make_tf):
    """(train, val or None, test, source label names) from ``torchvision.datasets.<spec['cls']>``.

    ``spec``: ``cls``, and either ``train`` / ``val`` / ``test`` constructor keyword arguments (val may
    be null), or ``random_split: {train_fraction, seed}`` with one ``train`` set: the set is cut as
    ``torch.utils.data.random_split(set, [int(n f), n - int(n f)], generator=Generator().manual_seed(seed))``
    cuts it (the paper's Caltech101 / Caltech256 split: 80 / 20, seed 0).
    """
    import torchvision.datasets as tvd
    name = spec.get("cls")
    if name not in _LABELS:
        raise ValueError(f"data.source=torchvision needs data.torchvision.cls, one of {', '.join(sorted(_LABELS))} "
                         f"(got {name!r}; a dataset without a torchvision class has no torchvision layout)")
    cls = getattr(tvd, name)
    built = {}
    for split in ("train", "val", "test"):
        kw = spec.get(split)
        if kw is None:
            built[split] = None
            continue
        try:
            ds = cls(root=str(root), download=False, **dict(kw))
        except RuntimeError as e:  # torchvision's "Dataset not found ..."
            raise SourceUnavailableError(torchvision_message(name, root, e)) from None
        labels = _tv_labels(name, ds)
        built[split] = TorchvisionImages(ds, labels, make_tf(split == "train"))
        if spec.get("random_split"):
            break
    names_attr = _NAMES.get(name)
    source_names = list(getattr(built["train"].ds, names_attr)) if names_attr else None
    rs = spec.get("random_split")
    if rs:
        whole = built["train"]
        n = len(whole)
        n_train = int(n * float(rs.get("train_fraction", 0.8)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(rs.get("seed", 0)))).tolist()
        test_ds = TorchvisionImages(whole.ds, whole.labels, make_tf(False))
        return Subset(whole, perm[:n_train]), None, Subset(test_ds, perm[n_train:]), source_names
    return built["train"], built["val"], built["test"], source_names


def torchvision_message(name, root, err=None) -> str:
    need = ", ".join(TORCHVISION_LAYOUT.get(name, []))
    hint = DOWNLOAD_HINT.get(name, f"torchvision.datasets.{name}(root={str(root)!r}, download=True) on a machine with "
                                   "network writes it")
    why = f" ({str(err).strip().splitlines()[0]})" if err is not None and str(err).strip() else ""
    return (f"torchvision {name} not found under data.path={str(root)!r}{why}: it needs {need}; {hint} "
            "(docs/datasets.md)")


def load_layout(layout: str, root, make_tf, splits: dict):
    """(train, val or None, test, source label names) of one of :data:`LAYOUTS`."""
    miss = missing_paths(root, LAYOUTS[layout])
    if miss:
        raise SourceUnavailableError(f"data.path={str(root)!r} is not the {layout} layout: missing "
                                     f"{', '.join(miss)}; {LAYOUT_HINT[layout]} (docs/datasets.md)")
    reader = {"ucf101_midframes": _ucf101, "cub_200_2011": _cub, "voc2007_crops": _voc}[layout]
    return reader(Path(root), make_tf, splits)


def _by_role(splits, make_tf, records):
    """(train, val, test) datasets: ``records(split)`` lists the (path, label[, box]) of a published
    split; a role without a split (``splits[role]`` is None) is None."""
    return [None if splits.get(role) is None else ListImages(records(splits[role]), make_tf(role == "train"))
            for role in ("train", "val", "test")]


def _ucf101(root: Path, make_tf, splits):
    base = root / "UCF-101-midframes"
    table = json.loads((base / "split_zhou_UCF101.json").read_text())
    names = {}

    def records(split):
        if split not in table:
            raise ValueError(f"split_zhou_UCF101.json has no split {split!r} (splits: {sorted(table)})")
        for _, label, cname in table[split]:
            names.setdefault(int(label), cname)
        return [(str(base / rel), int(label)) for rel, label, _ in table[split]]
    sets = _by_role(splits, make_tf, records)
    source_names = [names[i] for i in range(len(names))] if sorted(names) == list(range(len(names))) else None
    return (*sets, source_names)


def _cub(root: Path, make_tf, splits):
    base = root / "CUB_200_2011"

    def read(f):
        return [ln.split(maxsplit=1) for ln in (base / f).read_text().splitlines() if ln.strip()]
    paths = {i: p for i, p in read("images.txt")}
    label = {i: int(c) - 1 for i, c in read("image_class_labels.txt")}
    is_train = {i: s.strip() == "1" for i, s in read("train_test_split.txt")}
    source_names = [c.split(".", 1)[-1] for _, c in sorted(read("classes.txt"), key=lambda r: int(r[0]))]

    def records(split):
        if split not in ("train", "test"):
            raise ValueError(f"CUB-200-2011 has the splits train and test, not {split!r}")
        ids = sorted((i for i in paths if is_train[i] == (split == "train")), key=int)
        return [(str(base / "images" / paths[i]), label[i]) for i in ids]
    sets = _by_role(splits, make_tf, records)
    return (*sets, source_names)


VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def _voc(root: Path, make_tf, splits):
    import xml.etree.ElementTree as ET
    base = root / "VOCdevkit" / "VOC2007"
    index = {c: i for i, c in enumerate(VOC_CLASSES)}

    def records(split):
        listing = base / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise SourceUnavailableError(f"PASCAL VOC 2007 split list {listing} does not exist (splits: train, val, "
                                         "trainval, test; the test split comes with VOCtest_06-Nov-2007.tar)")
        recs = []
        for image_id in listing.read_text().split():
            tree = ET.parse(base / "Annotations" / f"{image_id}.xml")
            for obj in tree.findall("object"):
                box = obj.find("bndbox")
                xyxy = tuple(int(float(box.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax"))
                recs.append((str(base / "JPEGImages" / f"{image_id}.jpg"), index[obj.find("name").text.strip()], xyxy))
        return recs
    return (*_by_role(splits, make_tf, records), list(VOC_CLASSES))
