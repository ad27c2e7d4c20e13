"""Image classification data for every vision / vision-language run.

Sources (``data.source``):
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download).
* ``synthetic``: class-conditional Gaussian blobs, generated from the seed.
* ``hf``: a Hugging Face dataset, by hub id (``data.hub_id``) or from a local ``save_to_disk`` folder
  or image folder (``data.path``).
* ``imagefolder``: a torchvision-style folder of class sub-folders (``data.path``).

k-shot sampling (``data.shots=k``) and subsetting (``data.fraction=0.5``) depend only on the data
config and ``data.seed``, never on the model or the method, so every method of a sweep sees the
same images.
"""
from __future__ import annotations

import copy
import os

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..models import SourceUnavailableError, offline_message
from .samplers import EpochSeededSampler

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class DataConfigError(ValueError):
    pass


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
    def __init__(self, ds, image_key, label_key, transform):
        self.ds, self.image_key, self.label_key, self.transform = ds, image_key, label_key, transform
        self.labels = torch.tensor(ds[label_key])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        return self.transform(row[self.image_key]), int(row[self.label_key])


class Subset(Dataset):
    def __init__(self, base, indices):
        self.base, self.indices = base, [int(i) for i in indices]
        self.labels = base.labels[torch.as_tensor(self.indices, dtype=torch.long)]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


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
    """k indices per class, chosen by a generator seeded with ``seed`` only."""
    if not isinstance(shots, int) or shots <= 0:
        raise DataConfigError(f"data.shots must be a positive integer (images per class), got {shots!r}")
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < shots:
            name = class_names[c] if class_names and c < len(class_names) else c
            raise DataConfigError(f"data.shots={shots} is larger than class {name!r}, which has only "
                                  f"{len(idx)} training images; use data.shots<={len(idx)} or data.fraction")
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


# ---------------------------------------------------------------------------------- datamodule
class ImageDataModule(L.LightningDataModule):
    def __init__(self, name: str, source: str, hub_id: str | None = None, path: str | None = None,
                 hub_config: str | None = None,
                 train_split: str = "train", val_split: str | None = None, test_split: str = "test",
                 image_key: str = "image", label_key: str = "label", class_names=None,
                 shots: int | None = None, fraction: float = 1.0, val_fraction: float = 0.1,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, image_size: int = 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 augment: str = "none", num_classes: int | None = None, synthetic: dict | None = None,
                 **_ignored):
        super().__init__()
        self.name, self.source, self.hub_id, self.path, self.hub_config = name, source, hub_id, path, hub_config
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.image_key, self.label_key = image_key, label_key
        self.class_names = list(class_names) if class_names else None
        self.shots, self.fraction, self.val_fraction = shots, fraction, val_fraction
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.image_size, self.mean, self.std, self.augment = image_size, tuple(mean), tuple(std), augment
        self.num_classes = num_classes
        self.synthetic = dict(synthetic or {})
        self.train_set = self.val_set = self.test_set = None
        # the training order follows the run seed (set by the framework), the subsets follow data.seed
        self.order_seed = int(_ignored.get("order_seed", seed))

    # -- loading
    def _load_raw(self):
        """(train, val or None, test) datasets with a ``labels`` tensor, before sampling."""
        src = self.source
        if src in ("digits", "synthetic"):
            images, labels = _digits() if src == "digits" else _synthetic(self.seed, **self.synthetic)
            if src == "digits":
                self.class_names = self.class_names or DIGIT_NAMES
            else:
                self.class_names = self.class_names or [f"class {i}" for i in range(int(labels.max()) + 1)]
            tf = TensorTransform(self.image_size, self.mean, self.std)
            # fixed 80 / 20 train / test split of the whole set, independent of the run seed
            tr, te = split_indices(labels, 0.2, seed=1234)
            full = TensorImages(images, labels, tf)
            return Subset(full, tr), None, Subset(full, te)
        if src == "imagefolder":
            return self._load_imagefolder()
        if src == "hf":
            return self._load_hf()
        raise DataConfigError(f"unknown data.source {src!r}; choose digits, synthetic, hf or imagefolder")

    def _tf(self, train):
        return pil_transform(self.image_size, self.mean, self.std, train, self.augment)

    def _load_imagefolder(self):
        from torchvision.datasets import ImageFolder
        if not self.path or not os.path.isdir(self.path):
            raise SourceUnavailableError(f"data.path={self.path!r} is not a folder; an image folder needs "
                                         f"<path>/{self.train_split}/<class>/*.png and <path>/{self.test_split}/...")
        sets = []
        for split in (self.train_split, self.val_split, self.test_split):
            if split is None:
                sets.append(None)
                continue
            d = os.path.join(self.path, split)
            if not os.path.isdir(d):
                raise SourceUnavailableError(f"image folder split {d!r} does not exist")
            ds = ImageFolder(d, transform=self._tf(split == self.train_split), allow_empty=True)
            if sets and ds.classes != sets[0].classes:
                # each ImageFolder numbers the class folders it finds: a split missing one would shift labels
                raise DataConfigError(
                    f"image folder split {d!r} has classes {ds.classes[:10]} but {self.train_split!r} has "
                    f"{sets[0].classes[:10]}; every split needs the same class sub-folders (an empty folder for "
                    "a class without images)")
            ds.labels = torch.tensor(ds.targets)
            sets.append(ds)
        self.class_names = self.class_names or sets[0].classes
        return tuple(sets)

    def _load_hf(self):
        import datasets
        try:
            if self.path and os.path.exists(os.path.join(self.path, "dataset_dict.json")):
                dd = datasets.load_from_disk(self.path)
            elif self.path:
                if not os.path.isdir(self.path):
                    raise FileNotFoundError(self.path)
                dd = datasets.load_dataset("imagefolder", data_dir=self.path)
            else:
                if not self.hub_id:
                    raise DataConfigError(f"dataset {self.name!r} needs data.hub_id or data.path")
                dd = datasets.load_dataset(self.hub_id, self.hub_config)
        except DataConfigError:
            raise
        except Exception as e:
            raise SourceUnavailableError(offline_message(
                f"dataset {self.name}", self.path or self.hub_id,
                "Download it on a machine with network (datasets.load_dataset(id).save_to_disk(folder)) and "
                "pass data.path=/that/folder (a save_to_disk folder or an image folder).", e)) from None
        for split in (self.train_split, self.test_split):
            if split not in dd:
                raise DataConfigError(f"dataset {self.name!r} has no split {split!r} (splits: {list(dd)}); "
                                      "set data.train_split / data.test_split")
        cols = dd[self.train_split].column_names
        if self.label_key not in cols:
            raise DataConfigError(f"dataset {self.name!r} has no label column {self.label_key!r} (columns: "
                                  f"{cols}); a classification dataset needs labels: set data.label_key=<column>")
        if self.image_key not in cols:
            raise DataConfigError(f"dataset {self.name!r} has no image column {self.image_key!r} (columns: "
                                  f"{cols}); set data.image_key=<column>")
        feat = dd[self.train_split].features[self.label_key]
        if self.class_names is None and hasattr(feat, "names"):
            self.class_names = [n.replace("_", " ") for n in feat.names]
        out = []
        for split in (self.train_split, self.val_split, self.test_split):
            out.append(None if split is None or split not in dd else
                       HFImages(dd[split], self.image_key, self.label_key, self._tf(split == self.train_split)))
        return tuple(out)

    # -- lightning hooks
    def setup(self, stage=None):
        if self.train_set is not None:
            return
        train, val, test = self._load_raw()
        if len(train) == 0:
            raise DataConfigError(f"dataset {self.name!r} has an empty training split")
        n_cls = int(max(train.labels.max(), test.labels.max())) + 1
        if self.num_classes is not None and int(self.num_classes) != n_cls:
            raise DataConfigError(f"data.num_classes={self.num_classes} but the labels span {n_cls} classes")
        self.num_classes = n_cls
        if self.class_names is None:
            self.class_names = [str(i) for i in range(n_cls)]
        if len(self.class_names) < n_cls:
            raise DataConfigError(f"{len(self.class_names)} class names for {n_cls} classes")
        if val is None:  # hold out part of train, stratified and seed-independent of the method
            tr_idx, va_idx = split_indices(train.labels, self.val_fraction, self.seed)
            val, train = Subset(self._read_for_eval(train), va_idx), Subset(train, tr_idx)
        if self.shots is not None:
            train = Subset(train, few_shot_indices(train.labels, self.shots, self.seed, self.class_names))
        if self.fraction != 1.0:
            train = Subset(train, fraction_indices(len(train), self.fraction, self.seed))
        self.train_set, self.val_set, self.test_set = train, val, test

    def _read_for_eval(self, ds):
        """``ds`` with the evaluation transform: validation items held out of the training split must
        not go through the training augmentation (random crops and flips made val/acc noisy)."""
        if isinstance(ds, Subset):
            return Subset(self._read_for_eval(ds.base), ds.indices)
        if self.source not in ("hf", "imagefolder"):
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
