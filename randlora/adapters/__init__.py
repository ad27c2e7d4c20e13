"""Adapter methods for parameter-efficient fine-tuning, in pure PyTorch.

``inject(model, method, **options)`` adapts a model in place; ``merge`` / ``unmerge`` fold the
update into the base weights and back; ``adapter_state_dict`` / ``load_adapter_state_dict`` (and
``save_adapter`` / ``load_adapter`` for files) save only what was trained; ``count_trainable``,
``parameter_table``, ``match_budget`` and ``lora_equivalent_rank`` compare methods at equal budgets.
"""
from .core import (DEFAULTS, METHODS, adaptable_modules, adapted_layers, adapter_meta, adapter_state_dict,
                   compute_paths, count_total, count_trainable, find_targets, format_parameter_table,
                   format_paths, inject, is_adapted,
                   load_adapter, load_adapter_state_dict, lora_equivalent_rank, match_budget, merge,
                   parameter_table, resolve_options, save_adapter, shared_bases, unmerge)
from .randlora import num_bases

__all__ = ["DEFAULTS", "METHODS", "adaptable_modules", "adapted_layers", "adapter_meta", "adapter_state_dict",
           "compute_paths", "count_total", "count_trainable", "find_targets", "format_parameter_table",
           "format_paths", "inject", "is_adapted",
           "load_adapter", "load_adapter_state_dict", "lora_equivalent_rank", "match_budget", "merge",
           "num_bases", "parameter_table", "resolve_options", "save_adapter", "shared_bases", "unmerge"]
