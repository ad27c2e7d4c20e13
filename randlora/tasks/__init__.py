"""LightningModules that own the loss and the metrics of each kind of experiment, by ``task.kind``."""
from .causal_lm import CausalLMTask
from .classification import ClassificationTask
from .clip import ClipTask

TASKS = {"classification": ClassificationTask, "clip": ClipTask, "causal_lm": CausalLMTask}
