"""Image classification: a (frozen, adapted) backbone plus a trainable linear head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .base import AdapterTask, Network


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


class ClassificationTask(AdapterTask):
    model_kind = "vision"  # the ModelBundle kind this task trains

    @classmethod
    def network(cls, bundle, data, task_cfg: dict, seed: int) -> Network:
        """The backbone with a linear head over the dataset's classes (initialised from ``seed``); the
        head trains in full next to the adapter."""
        torch.manual_seed(seed)
        net = Classifier(bundle.backbone, bundle.feature_dim, data.num_classes)
        return Network(net, list(bundle.default_targets), ["head"])

    @classmethod
    def from_config(cls, net, bundle, data, task_cfg: dict, optim: dict, adapter: dict) -> "ClassificationTask":
        return cls(net, optim, adapter, num_classes=data.num_classes,
                   label_smoothing=float(task_cfg.get("label_smoothing") or 0.0))

    def __init__(self, net: nn.Module, optim: dict, adapter: dict, *, num_classes: int, label_smoothing: float = 0.0):
        super().__init__(net, optim, adapter)
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        logits = self(x)
        loss = self.add_regularizer(F.cross_entropy(logits, y, label_smoothing=self.label_smoothing))
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _eval(self, batch, metric, stage):
        x, y = batch
        logits = self(x)
        metric(logits, y)
        self.log_eval_loss(stage, F.cross_entropy(logits, y, reduction="none"))  # the mean over samples
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True, batch_size=len(y))

    def validation_step(self, batch, _):
        self._eval(batch, self.val_acc, "val")

    def test_step(self, batch, _):
        self._eval(batch, self.test_acc, "test")
