"""Image classification data for every vision / vision-language run.

Sources (``data.source``):
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download).
* ``synthetic``: class-conditional Gaussian blobs, generated from the seed.
* ``hf``: a Hugging Face dataset, by hub id (``data.hub_id``, ``data.hub_config``, ``data.hub_revision``)
  or from a local ``save_to_disk`` folder or image folder (``data.path``).
* ``imagefolder``: a torchvision-style folder of class sub-folders (``data.path``), e.g. an ILSVRC
  ``train/`` + ``val/`` tree or the aTLAS DTD / EuroSAT / SUN397 layouts.
* ``torchvision``: a torchvision dataset class on ``root=data.path`` (``data.torchvision``), never downloading.
* ``ucf101_midframes``, ``cub_200_2011``, ``voc2007_crops``: the paper's own preparations of UCF101,
  CUB-200-2011 and PASCAL VOC 2007 (randlora/data/vision_sources.py).

Class names: a dataset with a curated list (randlora/data/vision_datasets.json, the names and templates
the paper's code uses) gets it, after the loaded copy's own label names are checked against it (a copy
that orders its classes differently is remapped to the curated order; one whose names do not fit is
refused). ``data.class_names=source`` uses the copy's names, a list sets them.

Splits: ``data.val_split`` names a published validation split; without one, ``data.val_fraction`` of
the training split is held out (stratified, ``data.seed``). k-shot sampling (``data.shots=k``) takes k
images per class, or every image of a class that has fewer (the paper's code does the same), and
subsetting (``data.fraction=0.5``) depend only on the data config and ``data.seed``, never on the
model or the method, so every method of a sweep sees the same images. ``sampling_summary()`` reports
what was used (results.json ``data``).
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import DataConfigError, SourceUnavailableError, offline_message
from . import classnames as curated
from . import vision_sources as vs
from .samplers import EpochSeededSampler
from .subsets import Relabel, Subset

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LOCAL_LAYOUTS = tuple(vs.LAYOUTS)
SOURCES = ("digits", "synthetic", "hf", "imagefolder", "torchvision") + LOCAL_LAYOUTS


# ------------------------------------------------------------------------------------ datasets
class TensorImages(Dataset):
    """Images already in memory as a float tensor (N, C, H, W) in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


class HFImages(Dataset):
    def __init__(self, ds, image_key, label_key, transform, where: str = "dataset"):
        self.ds, self.image_key, self.label_key, self.transform = ds, image_key, label_key, transform
        self.where = where
        self.labels = torch.tensor(ds[label_key])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        try:
            row = self.ds[int(i)]
            img = row[self.image_key]
            if not hasattr(img, "convert"):
                raise TypeError(f"column {self.image_key!r} holds {type(img).__name__}, not an image")
            img.load()
        except Exception as e:  # noqa: BLE001 - any decoder error: one line naming the row
            raise vs.ReadError(f"cannot read image {int(i)} of {self.where}: {type(e).__name__}: {e}") from None
        return self.transform(img), int(row[self.label_key])


# ---------------------------------------------------------------------------------- transforms
class TensorTransform:
    """Resize a (C, H, W) tensor in [0, 1] to ``size``, make it 3-channel, normalise."""

    def __init__(self, size, mean, std):
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img):
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        if img.shape[-1] != self.size:
            img = F.interpolate(img[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return (img - self.mean) / self.std


def pil_transform(size, mean, std, train: bool, augment: str):
    from torchvision import transforms as T
    ops = []
    if train and augment == "clip":  # the paper's augmentation
        ops += [T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip()]
    else:
        ops += [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    ops += [T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), T.Normalize(mean, std)]
    if train and augment == "clip":
        ops.insert(0, T.Lambda(lambda im: im.convert("RGB")))
    return T.Compose(ops)


# ------------------------------------------------------------------------------------ sampling
def few_shot_indices(labels: torch.Tensor, shots: int, seed: int, class_names=None) -> list[int]:
    """k indices per class, chosen by a generator seeded with ``seed`` only; a class with fewer than
    k images gives all of them (the paper's code: ``ids[randperm(n)[-k:]]``, so Flowers102's
    10 training images per class are all used at 16 shots)."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0:
        raise DataConfigError(f"data.shots must be a positive integer (images per class), got {shots!r}")
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        out += idx[torch.randperm(len(idx), generator=g)[:shots]].tolist()
    return sorted(out)


def fraction_indices(n: int, fraction: float, seed: int) -> list[int]:
    if not (0 < fraction <= 1):
        raise DataConfigError(f"data.fraction must be in (0, 1], got {fraction!r}")
    g = torch.Generator().manual_seed(int(seed) + 1)
    k = max(1, round(n * fraction))
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def split_indices(labels: torch.Tensor, val_fraction: float, seed: int):
    """Stratified train / val split of one labelled set."""
    g = torch.Generator().manual_seed(int(seed) + 2)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * val_fraction))
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


# ------------------------------------------------------------------------------- hub / offline
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline_requested() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set now (the libraries read them once, at import)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def hub_offline(enabled: bool):
    """Make ``datasets`` and ``huggingface_hub`` local-only while loading: no request, no retry.
    Both read the environment once at import, so setting the variable later would not reach them."""
    if not enabled:
        yield
        return
    import datasets
    import huggingface_hub.constants as hc
    saved = (hc.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    hc.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def hub_cached(hub_id: str) -> bool:
    """Whether an offline ``datasets.load_dataset(hub_id)`` finds a prepared copy in the datasets cache
    (``HF_DATASETS_CACHE``), asked the way ``datasets`` itself looks it up. A hub snapshot alone does not
    count: datasets 5.2 offline reads only its own prepared cache."""
    try:
        from datasets import config
        from datasets.load import CachedDatasetModuleFactory
        CachedDatasetModuleFactory(hub_id, cache_dir=str(config.HF_DATASETS_CACHE)).get_module()
        return True
    except Exception:  # noqa: BLE001 - not cached (or not a dataset id at all)
        return False


# ---------------------------------------------------------------------------------- datamodule
class ImageDataModule(L.LightningDataModule):
    def __init__(self, name: str, source: str, hub_id: str | None = None, path: str | None = None,
                 hub_config: str | None = None, hub_revision: str | None = None,
                 train_split: str = "train", val_split: str | None = None, test_split: str = "test",
                 image_key: str = "image", label_key: str = "label", class_names=None,
                 shots: int | None = None, fraction: float = 1.0, val_fraction: float = 0.1,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, image_size: int = 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 augment: str = "none", num_classes: int | None = None, synthetic: dict | None = None,
                 torchvision: dict | None = None, check_class_order: bool = True, check_images: int = 4,
                 expected_sizes: dict | None = None, **_ignored):
        super().__init__()
        self.name, self.source, self.hub_id, self.path, self.hub_config = name, source, hub_id, path, hub_config
        self.hub_revision = hub_revision
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.image_key, self.label_key = image_key, label_key
        if isinstance(class_names, str) and class_names not in ("source", "curated"):
            raise DataConfigError(f"data.class_names={class_names!r}; use curated (default), source or a list of names")
        self.class_names_option = class_names if isinstance(class_names, str) else None
        self.class_names = list(class_names) if class_names is not None and not isinstance(class_names, str) else None
        self.shots, self.fraction, self.val_fraction = shots, fraction, val_fraction
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.image_size, self.mean, self.std, self.augment = image_size, tuple(mean), tuple(std), augment
        self.num_classes = num_classes
        self.synthetic = dict(synthetic or {})
        self.torchvision = dict(torchvision or {})
        self.check_class_order, self.check_images = bool(check_class_order), int(check_images or 0)
        self.expected_sizes = dict(expected_sizes or {})
        self.train_set = self.val_set = self.test_set = None
        self.source_names = None     # the loaded copy's own label names (None: unnamed / in-memory)
        self.templates = None        # curated zero-shot templates of this dataset (CLIP's prompt ensemble)
        self.names_origin = None     # "curated" | "source" | "config" | "builtin" | None (unnamed)
        self._summary = {}
        # the training order follows the run seed (set by the framework), the subsets follow data.seed
        self.order_seed = int(_ignored.get("order_seed", seed))
        # CLIP scores classes by their names: unnamed labels are refused for it before the model is built
        self.require_class_names = bool(_ignored.get("require_class_names", False))

    # -- loading
    def _load_raw(self):
        """(train, val or None, test) datasets with a ``labels`` tensor, before sampling."""
        src = self.source
        if src in ("digits", "synthetic") and self.path:
            raise DataConfigError(f"data.source={src} generates its images and does not read data.path={self.path!r}; "
                                  "drop data.path, or choose the source that reads it (hf, imagefolder, torchvision, ...)")
        if src in ("digits", "synthetic"):
            images, labels = _digits() if src == "digits" else _synthetic(self.seed, **self.synthetic)
            if src == "digits":
                self.source_names = list(DIGIT_NAMES)
            else:
                self.source_names = [f"class {i}" for i in range(int(labels.max()) + 1)]
            tf = TensorTransform(self.image_size, self.mean, self.std)
            # fixed 80 / 20 train / test split of the whole set, independent of the run seed
            tr, te = split_indices(labels, 0.2, seed=1234)
            full = TensorImages(images, labels, tf)
            return Subset(full, tr), None, Subset(full, te)
        if src == "imagefolder":
            return self._load_imagefolder()
        if src == "hf":
            return self._load_hf()
        if src == "torchvision":
            self._need_folder("a torchvision root")
            tr, va, te, self.source_names = vs.load_torchvision(self.torchvision, self.path, self._tf)
            return tr, va, te
        if src in LOCAL_LAYOUTS:
            self._need_folder(f"the {src} layout")
            splits = {"train": self.train_split, "val": self.val_split, "test": self.test_split}
            tr, va, te, self.source_names = vs.load_layout(src, self.path, self._tf, splits)
            return tr, va, te
        raise DataConfigError(f"unknown data.source {src!r}; choose one of {', '.join(SOURCES)}")

    def _tf(self, train):
        return pil_transform(self.image_size, self.mean, self.std, train, self.augment)

    def _need_folder(self, what: str):
        problem = _path_problem(self.path, what)
        if problem:
            raise SourceUnavailableError(f"dataset {self.name}: {problem}")

    def _load_imagefolder(self):
        from torchvision.datasets import ImageFolder
        self._need_folder(f"an image folder (<path>/{self.train_split}/<class>/*.jpg, <path>/{self.test_split}/...)")
        sets = []
        for split in (self.train_split, self.val_split, self.test_split):
            if split is None:
                sets.append(None)
                continue
            d = os.path.join(self.path, split)
            if not os.path.isdir(d):
                raise SourceUnavailableError(f"image folder split {d!r} does not exist")
            if not any(e.is_dir() for e in os.scandir(d)) and any(e.is_file() for e in os.scandir(d)):
                raise DataConfigError(
                    f"image folder split {d!r} holds images directly; it needs one sub-folder per class (for the "
                    "ILSVRC val/ folder: sort it into wnid folders with valprep.sh, see aTLAS DATASETS.md)")
            ds = ImageFolder(d, transform=self._tf(split == self.train_split), allow_empty=True)
            if sets and ds.classes != sets[0].classes:
                # each ImageFolder numbers the class folders it finds: a split missing one would shift labels
                raise DataConfigError(
                    f"image folder split {d!r} has classes {ds.classes[:10]} but {self.train_split!r} has "
                    f"{sets[0].classes[:10]}; every split needs the same class sub-folders (an empty folder for "
                    "a class without images)")
            ds.labels = torch.tensor(ds.targets)
            sets.append(ds)
        self.source_names = list(sets[0].classes)
        return tuple(sets)

    def _load_hf(self):
        import datasets
        offline = hub_offline_requested()
        try:
            if self.path:
                problem = _path_problem(self.path, "a save_to_disk folder (dataset_dict.json) or an image folder")
                if problem:
                    raise SourceUnavailableError(f"dataset {self.name}: {problem}")
                if os.path.exists(os.path.join(self.path, "dataset_dict.json")):
                    dd = datasets.load_from_disk(self.path)
                else:
                    with hub_offline(True):  # a local folder never needs the hub
                        dd = datasets.load_dataset("imagefolder", data_dir=self.path)
            else:
                if not self.hub_id:
                    raise DataConfigError(f"dataset {self.name!r} needs data.hub_id or data.path")
                with hub_offline(offline):
                    dd = datasets.load_dataset(self.hub_id, self.hub_config, revision=self.hub_revision)
        except (DataConfigError, SourceUnavailableError):
            raise
        except Exception as e:
            raise SourceUnavailableError(offline_message(
                f"dataset {self.name}", self.path or self.hub_id,
                "Download it on a machine with network (datasets.load_dataset(id).save_to_disk(folder)) and "
                "pass data.path=/that/folder (a save_to_disk folder or an image folder); docs/datasets.md lists "
                "the other local layouts.", e)) from None
        for split in (self.train_split, self.val_split, self.test_split):
            if split is not None and split not in dd:
                raise DataConfigError(f"dataset {self.name!r} has no split {split!r} (splits: {list(dd)}); "
                                      "set data.train_split / data.val_split / data.test_split")
        cols = dd[self.train_split].column_names
        if self.label_key not in cols:
            raise DataConfigError(f"dataset {self.name!r} has no label column {self.label_key!r} (columns: "
                                  f"{cols}); a classification dataset needs labels: set data.label_key=<column>")
        if self.image_key not in cols:
            raise DataConfigError(f"dataset {self.name!r} has no image column {self.image_key!r} (columns: "
                                  f"{cols}); set data.image_key=<column>")
        feat = dd[self.train_split].features[self.label_key]
        self.source_names = list(feat.names) if hasattr(feat, "names") else None
        where = self.path or self.hub_id
        return tuple(None if split is None else
                     HFImages(dd[split], self.image_key, self.label_key, self._tf(split == self.train_split),
                              where=f"{where} split {split!r}")
                     for split in (self.train_split, self.val_split, self.test_split))

    # -- class names
    def _resolve_names(self, sets):
        """Decide the class names; returns the datasets, relabelled where the copy orders its classes
        differently from the curated list."""
        entry = curated.entry(self.name)
        if self.class_names is not None:
            self.names_origin = "config"
            return sets
        option = self.class_names_option or "curated"
        if entry is not None:
            self.templates = list(entry["templates"])
        # a config that declares another class count describes another dataset: its own names apply
        fits = entry is not None and self.num_classes in (None, len(entry["classes"]))
        if option == "curated" and fits:
            if self.check_class_order and self.source not in ("digits", "synthetic"):
                perm = curated.align(self.name, self.source_names, where=f"dataset {self.name} ({self._where()})")
                if perm is not None:
                    sets = tuple(None if s is None else Relabel(s, perm) for s in sets)
            self.class_names, self.names_origin = list(entry["classes"]), "curated"
            return sets
        if not fits:
            self.templates = None
        names = self.source_names
        if names is not None and curated.unnamed(names) and not (entry and entry.get("digit_names")):
            names = None
        if names is not None:
            self.class_names = [str(n).replace("_", " ") for n in names] if self.source == "hf" else list(names)
            self.names_origin = "builtin" if self.source in ("digits", "synthetic") else "source"
        return sets

    def _where(self) -> str:
        if self.source == "hf":
            return f"data.path={self.path}" if self.path else f"hub {self.hub_id}"
        return f"data.path={self.path}" if self.path else self.source

    # -- lightning hooks
    def setup(self, stage=None):
        if self.train_set is not None:
            return
        train, val, test = self._resolve_names(self._load_raw())
        if len(train) == 0:
            raise DataConfigError(f"dataset {self.name!r} has an empty training split")
        if len(test) == 0:
            raise DataConfigError(f"dataset {self.name!r} has an empty test split {self.test_split!r}")
        spans = [int(s.labels.max()) + 1 for s in (train, val, test) if s is not None and len(s)]
        n_cls = len(self.class_names) if self.names_origin == "curated" else max(spans)
        if self.num_classes is not None and int(self.num_classes) != n_cls:
            raise DataConfigError(f"data.num_classes={self.num_classes} but the labels span {n_cls} classes")
        if max(spans) > n_cls:
            raise DataConfigError(f"dataset {self.name!r} has label {max(spans) - 1} but {n_cls} classes")
        self.num_classes = n_cls
        if self.class_names is None and self.require_class_names:
            raise DataConfigError(
                f"dataset {self.name!r} ({self._where()}) has unnamed labels and no curated class list, and CLIP "
                "scores classes by their names; set data.class_names=[name0, name1, ...] (label order)")
        if self.class_names is not None and len(self.class_names) < n_cls:
            raise DataConfigError(f"{len(self.class_names)} class names for {n_cls} classes")
        self._warn_sizes(train, val, test)
        if self.check_images:
            for role, ds in (("train", train), ("val", val), ("test", test)):
                _check_readable(ds, self.check_images, f"{self.name} {role} split")
        if val is None:  # hold out part of train, stratified and seed-independent of the method
            if not (isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1):
                raise DataConfigError(f"data.val_fraction={self.val_fraction!r} must be in (0, 1): the share of the "
                                      f"training split of {self.name} held out for validation")
            tr_idx, va_idx = split_indices(train.labels, self.val_fraction, self.seed)
            # val_fraction=0 is an explicit "no validation set" for library use (train.py refuses it);
            # a positive fraction that rounds to nothing is a mistake
            if not va_idx and self.val_fraction > 0:
                per_class = train.labels.bincount()
                raise DataConfigError(
                    f"data.val_fraction={self.val_fraction} holds out no image of the {len(train)} training images "
                    f"of {self.name} ({int(per_class.min())}-{int(per_class.max())} per class, rounded per class); "
                    "raise data.val_fraction or name a published validation split with data.val_split=<split>")
            val, train = Subset(self._read_for_eval(train), va_idx), Subset(train, tr_idx)
            val_source = f"held out: data.val_fraction={self.val_fraction} of {self.train_split!r}"
        else:
            if len(val) == 0:
                raise DataConfigError(f"validation split {self.val_split!r} of {self.name} is empty; set "
                                      "data.val_split=null to hold out data.val_fraction of the training split")
            val_source = f"split {self.val_split!r}"
        available = train.labels.bincount(minlength=n_cls)
        if self.shots is not None:
            train = Subset(train, few_shot_indices(train.labels, self.shots, self.seed))
        if self.fraction != 1.0:
            train = Subset(train, fraction_indices(len(train), self.fraction, self.seed))
        if len(train) == 0:
            raise DataConfigError(f"no training image of {self.name} is left after holding out the validation set "
                                  f"(data.val_fraction={self.val_fraction}); lower data.val_fraction")
        self.train_set, self.val_set, self.test_set = train, val, test
        used = train.labels.bincount(minlength=n_cls)
        present = used[available > 0]
        self._summary = {
            "shots_requested": self.shots, "fraction": self.fraction,
            "train_per_class_min": int(present.min()) if len(present) else 0,
            "train_per_class_max": int(present.max()) if len(present) else 0,
            "classes_below_shots": int((available[available > 0] < self.shots).sum()) if self.shots else 0,
            "train_size": len(train), "train_pool_size": int(available.sum()), "val_size": len(val), "test_size": len(test),
            "val_source": val_source, "num_classes": n_cls, "class_names": self.names_origin,
        }

    def sampling_summary(self) -> dict:
        """What the run trains and evaluates on (after ``setup``): requested shots, images per class
        actually used, split sizes and where the validation set came from."""
        return dict(self._summary)

    def _warn_sizes(self, train, val, test):
        got = {"train": len(train), "val": None if val is None else len(val), "test": len(test)}
        off = [f"{k} {got[k]} (expected {v})" for k, v in self.expected_sizes.items()
               if got.get(k) is not None and int(v) != got[k]]
        if off and self.fraction == 1.0 and self.names_origin == "curated":
            warnings.warn(f"dataset {self.name} ({self._where()}): split sizes differ from the paper's source: "
                          f"{', '.join(off)}; results may not be comparable (docs/datasets.md)", stacklevel=2)

    def _read_for_eval(self, ds):
        """``ds`` with the evaluation transform: validation items held out of the training split must
        not go through the training augmentation (random crops and flips made val/acc noisy)."""
        if isinstance(ds, Subset):
            return Subset(self._read_for_eval(ds.base), ds.indices)
        if isinstance(ds, Relabel):
            return Relabel(self._read_for_eval(ds.base), ds.perm)
        if isinstance(ds, TensorImages):
            return ds  # in-memory tensors: one deterministic transform for every split
        twin = copy.copy(ds)
        twin.transform = self._tf(False)
        return twin

    def _loader(self, ds, shuffle, bs):
        sampler = EpochSeededSampler(len(ds), self.order_seed) if shuffle else None
        return DataLoader(ds, batch_size=bs, sampler=sampler, shuffle=False if shuffle else None,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self):
        return self._loader(self.train_set, True, self.batch_size)

    def _eval_loader(self, ds):
        # Under DDP, Lightning's default sampler pads the last shard by repeating samples, which counts
        # them twice in accuracy; this sampler splits the set exactly (shards may differ by one batch).
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
            return DataLoader(ds, batch_size=self.eval_batch_size, num_workers=self.num_workers,
                              sampler=UnrepeatedDistributedSampler(ds, shuffle=False))
        return self._loader(ds, False, self.eval_batch_size)

    def val_dataloader(self):
        return self._eval_loader(self.val_set)

    def test_dataloader(self):
        return self._eval_loader(self.test_set)


def _check_readable(ds, k: int, what: str) -> None:
    """Decode ``k`` items spread over ``ds`` now: a folder of corrupt or non-image files fails here,
    in one line naming the file, not as a worker traceback in the middle of an epoch."""
    if ds is None or len(ds) == 0 or isinstance(_innermost(ds), TensorImages):
        return
    n = len(ds)
    for i in sorted({round(j * (n - 1) / max(1, k - 1)) for j in range(min(k, n))}):
        try:
            ds[i]
        except vs.ReadError as e:
            raise DataConfigError(f"{what}: {e}") from None
        except Exception as e:  # noqa: BLE001 - e.g. PIL's UnidentifiedImageError from ImageFolder
            raise DataConfigError(f"{what}: cannot read item {i} ({_item_path(ds, i) or 'no path'}): "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _innermost(ds):
    while isinstance(ds, (Subset, Relabel)):
        ds = ds.base
    return ds


def _item_path(ds, i):
    while isinstance(ds, (Subset, Relabel)):
        if isinstance(ds, Subset):
            i = ds.indices[i]
        ds = ds.base
    samples = getattr(ds, "samples", None) or getattr(ds, "records", None)
    return samples[i][0] if samples else None


def _path_problem(path, what: str) -> str | None:
    if not path:
        return f"data.path is not set; it must point to {what}"
    if not os.path.exists(path):
        return f"data.path={path!r} does not exist; it must point to {what}"
    if not os.path.isdir(path):
        return f"data.path={path!r} is a file; it must be a folder: {what}"
    return None


# --------------------------------------------------------------------------------- preflight
def source_problems(data_cfg, hub) -> list[str]:
    """One line per source of this image dataset that a run could not read, with the fix, found
    without downloading or decoding anything (folder and file names only). ``hub`` has ``online``
    (bool) and ``reason`` (str or None); a hub id is a problem only while the hub is unreachable and
    the id is not in the local Hugging Face cache."""
    d = dict(data_cfg)
    src, name, path = d.get("source"), d.get("name", "?"), d.get("path")
    guide = "see docs/datasets.md"
    if src in ("digits", "synthetic"):
        return []
    if src == "hf":
        if path:
            p = _path_problem(path, "a save_to_disk folder (dataset_dict.json) or an image folder")
            if p:
                return [f"data={name}: {p} ({guide})"]
            if not os.path.exists(os.path.join(path, "dataset_dict.json")) and not any(
                    e.is_dir() for e in os.scandir(path)):
                return [(f"data={name}: data.path={path!r} is neither a save_to_disk folder (no dataset_dict.json) "
                         f"nor an image folder (no sub-folders) ({guide})")]
            return []
        hub_id = d.get("hub_id")
        if not hub_id:
            return [f"data={name}: needs data.hub_id=<hub id> or data.path=<local copy> ({guide})"]
        # load_dataset also takes a local folder in the hub's layout as its id
        if getattr(hub, "online", False) or os.path.isdir(hub_id) or hub_cached(hub_id):
            return []
        why = getattr(hub, "reason", None) or "offline"
        config = f", {d['hub_config']!r}" if d.get("hub_config") else ""
        return [(f"data={name}: hub dataset {hub_id!r} is not in the local Hugging Face cache and the hub is "
                 f"unreachable ({why}); on a machine with network run python -c \"import datasets; "
                 f"datasets.load_dataset('{hub_id}'{config}).save_to_disk('<folder>')\" and pass "
                 f"data.path=<folder>, or use a local layout ({guide})")]
    if src == "imagefolder":
        p = _path_problem(path, "an image folder (<path>/<split>/<class>/*.jpg)")
        if p:
            return [f"data={name}: {p} ({guide})"]
        miss = [s for s in (d.get("train_split"), d.get("val_split"), d.get("test_split"))
                if s is not None and not os.path.isdir(os.path.join(path, s))]
        return [f"data={name}: data.path={path!r} has no split folder {s!r} ({guide})" for s in miss]
    if src == "torchvision":
        cls = (d.get("torchvision") or {}).get("cls")
        if cls not in vs.TORCHVISION_LAYOUT:
            return [f"data={name}: data.source=torchvision needs data.torchvision.cls, one of "
                    f"{', '.join(vs.TORCHVISION_LAYOUT)} (got {cls!r}); {name} has no torchvision layout ({guide})"]
        p = _path_problem(path, f"the root of torchvision.datasets.{cls}")
        if p:
            return [f"data={name}: {p}; {vs.torchvision_message(cls, path or '<root>')}"]
        if vs.missing_paths(path, vs.TORCHVISION_LAYOUT.get(cls, [])):
            return [f"data={name}: {vs.torchvision_message(cls, path)}"]
        return []
    if src in LOCAL_LAYOUTS:
        p = _path_problem(path, f"the {src} layout")
        miss = [] if p else vs.missing_paths(path, vs.LAYOUTS[src])
        if p or miss:
            what = p or f"data.path={path!r} lacks {', '.join(miss)}"
            return [f"data={name}: {what}; {vs.LAYOUT_HINT[src]} ({guide})"]
        return []
    return [f"data={name}: data.source={src!r} is unknown; choose one of {', '.join(SOURCES)}"]


def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return images, torch.tensor(d.target, dtype=torch.long)


def _synthetic(seed, num_classes=10, per_class=60, channels=3, size=8, noise=0.6, **_):
    g = torch.Generator().manual_seed(int(seed) + 99)
    protos = torch.rand(num_classes, channels, size, size, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = (protos[labels] + noise * torch.randn(len(labels), channels, size, size, generator=g)).clamp(0, 1)
    return images, labels
