"""Adapter methods for parameter-efficient fine-tuning, in pure PyTorch (no Lightning, no Hydra).

``inject(model, method, **options)`` adapts a model in place; ``merge`` / ``unmerge`` fold the
update into the base weights and back; ``adapter_state_dict`` / ``load_adapter_state_dict`` (and
``save_adapter`` / ``load_adapter`` for files) save only what was trained; ``count_trainable``,
``parameter_table``, ``match_budget`` and ``lora_equivalent_rank`` compare methods at equal budgets.

Layout: ``layers.py`` (the ``Update`` interface and the two wrappers), ``bases.py`` (shared random
bases), one file per method (``lora.py``, ``dora.py``, ``vera.py``, ``randlora.py``, ``dora_dr.py``,
``nola.py``: options class, update, bases), ``registry.py`` (the list of methods), ``targets.py``
(which layers), ``inject.py`` (inject / merge / inspect), ``counting.py`` (counts, budgets),
``state.py`` (state dicts and files), ``peft.py`` (``export_peft`` / ``import_peft``: the Hugging Face
PEFT adapter format, conventions translated), ``lowrank.py`` (``to_lora``: any update as a rank-k LoRA by
truncated SVD, with the error per layer).
"""
from .counting import (BudgetMatch, BudgetWarning, ScalingWarning, count_total, count_trainable,
                       format_parameter_table, lora_equivalent_rank, match_budget, parameter_table, scaling_warnings)
from .inject import (adapted_layers, adapter_meta, bases_checksum, check_rank, compute_paths, format_paths, inject, is_adapted,
                     merge, shared_bases, unload, unmerge)
from .lowrank import (LayerTruncation, delta_spectra, format_truncation, overall_error, rank_for_energy, to_lora,
                      truncation)
from .peft import PEFT_VERSION, export_peft, import_peft, peft_state
from .randlora import num_bases
from .registry import DEFAULTS, FUNCTION_OPTIONS, METHODS, REGISTRY, get_method, resolve_options
from .state import adapter_state_dict, diff_meta, load_adapter, load_adapter_state_dict, save_adapter
from .targets import adaptable_modules, clean_name, find_targets

__all__ = ["BudgetMatch", "BudgetWarning", "ScalingWarning", "DEFAULTS", "FUNCTION_OPTIONS", "METHODS", "PEFT_VERSION", "REGISTRY",
           "LayerTruncation", "adaptable_modules", "adapted_layers", "adapter_meta", "adapter_state_dict", "bases_checksum",
           "check_rank",
           "clean_name", "compute_paths", "count_total", "count_trainable", "delta_spectra", "diff_meta", "export_peft",
           "find_targets", "format_parameter_table", "format_paths", "format_truncation", "get_method", "import_peft",
           "inject", "is_adapted", "load_adapter", "load_adapter_state_dict", "lora_equivalent_rank",
           "match_budget", "merge", "num_bases", "overall_error", "parameter_table", "peft_state", "rank_for_energy",
           "resolve_options", "save_adapter", "scaling_warnings", "shared_bases", "to_lora", "truncation", "unload",
           "unmerge"]
