"""CLIP vision-language fine-tuning (paper §4.2): both towers adapted, classes scored by the text
embeddings of class-name prompts.

Training loss (``loss``):
* ``in_batch`` (default): image-to-text cross-entropy over the prompts of the *distinct* classes in
  the batch (the paper's in-batch objective, with duplicate classes merged so that two images of one
  class do not compete against identical logits, a quirk of the official code).
* ``in_batch_official``: the official code's form, one prompt per image, target = first occurrence.
* ``all_classes``: cross-entropy over every class prompt (exact, costs a text pass over all classes).

``logit_scale``: ``exp`` (default) multiplies cosine similarities by exp(logit_scale) = 100, CLIP's
trained temperature; ``raw`` multiplies by logit_scale itself (about 4.6), as the official code did.
Evaluation always scores every class. ``text_tower: frozen`` is the vision-only variant: only the
image tower is adapted and the zero-shot text head is computed once and kept frozen.

Class head (``head``): ``single`` embeds ``prompt.format(name)`` per class; ``ensemble`` averages the
normalised embeddings of the dataset's curated templates per class and normalises the mean (CLIP's
prompt ensemble); ``auto`` (default) is what the paper's code does: the ensemble for the vision-only
experiments (``text_tower: frozen``, paper §5.2) and the single prompt "An image of {}" for
vision-language training and evaluation (§5.3). Class names come from the data module: the curated
names of the paper's datasets, never bare label ids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from .base import AdapterTask, Network

LOSSES = ("in_batch", "in_batch_official", "all_classes")
SCALES = ("exp", "raw")
TOWERS = ("train", "frozen")
HEADS = ("auto", "single", "ensemble")


class ClipTask(AdapterTask):
    model_kind = "clip"  # the ModelBundle kind this task trains

    @classmethod
    def network(cls, bundle, data, task_cfg: dict, seed: int) -> Network:
        """CLIP itself; with ``text_tower: frozen`` only the image tower's layers are targets."""
        targets = list(bundle.default_targets)
        if task_cfg.get("text_tower", "train") == "frozen":  # adapt the image tower only
            alt = "|".join(t.replace(".", r"\.") for t in targets)
            targets = rf"visual\..*\.({alt})"
        return Network(bundle.backbone, targets, [])

    @classmethod
    def after_inject(cls, net, method: str, task_cfg: dict) -> None:
        """The temperature stays frozen for adapters; full fine-tuning of a frozen text tower trains the
        image tower and the temperature only."""
        if method != "full":
            net.logit_scale.requires_grad_(False)
        elif task_cfg.get("text_tower", "train") == "frozen":
            for name, p in net.named_parameters():
                if not name.startswith("visual.") and name != "logit_scale":
                    p.requires_grad_(False)

    @classmethod
    def from_config(cls, net, bundle, data, task_cfg: dict, optim: dict, adapter: dict) -> "ClipTask":
        return cls(net, optim, adapter, tokenizer=bundle.tokenizer, class_names=data.class_names,
                   templates=getattr(data, "templates", None), prompt=task_cfg.get("prompt", "An image of {}"),
                   loss=task_cfg.get("loss", "in_batch"), logit_scale=task_cfg.get("logit_scale", "exp"),
                   text_tower=task_cfg.get("text_tower", "train"), head=task_cfg.get("head", "auto"))

    def __init__(self, net, optim: dict, adapter: dict, *, tokenizer, class_names, prompt: str = "An image of {}",
                 loss: str = "in_batch", logit_scale: str = "exp", text_tower: str = "train", templates=None,
                 head: str = "auto"):
        for key, value, allowed in (("loss", loss, LOSSES), ("logit_scale", logit_scale, SCALES),
                                    ("text_tower", text_tower, TOWERS), ("head", head, HEADS)):
            if value not in allowed:
                raise ValueError(f"task.{key}={value!r}; choose one of {list(allowed)}")
        if not class_names:
            raise ValueError("CLIP needs class names (it scores the text of each class): the dataset has unnamed "
                             "labels and no curated list; set data.class_names=[...] in label order")
        if "{}" not in str(prompt):
            raise ValueError(f"task.prompt={prompt!r} needs a {{}} where the class name goes")
        if head == "auto":
            head = "ensemble" if text_tower == "frozen" and templates else "single"
        if head == "ensemble" and not templates:
            raise ValueError("task.head=ensemble needs the dataset's prompt templates; this dataset has no curated "
                             "templates (randlora/data/vision_datasets.json): use task.head=single")
        super().__init__(net, optim, adapter)
        self.tokenizer = tokenizer
        self.class_names = list(class_names)
        self.prompts = [prompt.format(c) for c in self.class_names]
        self.loss_kind, self.scale_kind, self.text_tower, self.head_kind = loss, logit_scale, text_tower, head
        self.templates = list(templates) if head == "ensemble" else [prompt]
        self.register_buffer("prompt_tokens", self.tokenizer(self.prompts), persistent=False)
        if head == "ensemble":  # class-major: the templates of class 0, then of class 1, ...
            self.register_buffer("head_tokens", self.tokenizer([t.format(c) for c in self.class_names
                                                                for t in self.templates]), persistent=False)
        self._frozen_head = None
        n = len(self.class_names)
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.test_acc = MulticlassAccuracy(n, average="micro")

    def _scale(self):
        s = self.net.logit_scale
        return s.exp() if self.scale_kind == "exp" else s

    def encode_text(self, idx):
        return F.normalize(self.net.encode_text(self.prompt_tokens[idx]), dim=-1)

    def _ensemble_head(self):
        """Per class: the mean of its templates' normalised text embeddings, normalised again."""
        feats = []
        for chunk in self.head_tokens.split(1024):
            feats.append(F.normalize(self.net.encode_text(chunk), dim=-1))
        per_class = torch.cat(feats).view(len(self.class_names), len(self.templates), -1)
        return F.normalize(per_class.mean(1), dim=-1)

    def _head(self):
        if self.head_kind == "ensemble":
            return self._ensemble_head()
        return self.encode_text(torch.arange(len(self.prompts), device=self.device))

    def class_head(self):
        if self.text_tower == "frozen":
            if self._frozen_head is None:
                with torch.no_grad():
                    self._frozen_head = self._head()
            return self._frozen_head
        return self._head()

    def forward(self, images):
        img = F.normalize(self.net.encode_image(images), dim=-1)
        return self._scale() * img @ self.class_head().t()

    def training_step(self, batch, _):
        x, y = batch
        img = F.normalize(self.net.encode_image(x), dim=-1)
        if self.loss_kind == "all_classes" or self.text_tower == "frozen":
            logits, target = self._scale() * img @ self.class_head().t(), y
        elif self.loss_kind == "in_batch":
            classes, target = torch.unique(y, return_inverse=True)
            logits = self._scale() * img @ self.encode_text(classes).t()
        else:  # official: one prompt per image, target = first image of the same class
            logits = self._scale() * img @ self.encode_text(y).t()
            target = (y[:, None] == y[None, :]).float().argmax(dim=1)
        loss = self.add_regularizer(F.cross_entropy(logits, target))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def on_validation_epoch_start(self):
        self._eval_head = None

    def _eval(self, batch, metric, stage):
        x, y = batch
        if getattr(self, "_eval_head", None) is None:  # text features once per evaluation pass
            with torch.no_grad():
                self._eval_head = self.class_head()
        img = F.normalize(self.net.encode_image(x), dim=-1)
        logits = self._scale() * img @ self._eval_head.t()
        metric(logits, y)
        self.log_eval_loss(stage, F.cross_entropy(logits, y, reduction="none"))  # the mean over samples
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True, batch_size=len(y))

    def on_test_epoch_start(self):
        self._eval_head = None

    def validation_step(self, batch, _):
        self._eval(batch, self.val_acc, "val")

    def test_step(self, batch, _):
        self._eval(batch, self.test_acc, "test")
