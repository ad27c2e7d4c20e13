"""What a method is to the rest of the library: a typed options class and a ``Method`` record.

Each method file (``lora.py``, ``vera.py``, ``randlora.py`` ...) defines

* an options dataclass derived from :class:`MethodOptions` (every option, its default and its
  meaning in one place; shape-independent checks in ``validate``), and
* ``METHOD = Method(name, options, update, ...)``, which ``registry.py`` lists.

Parameter counts are derived from the shapes the method's ``Update`` declares
(``Update.param_shapes``), the same shapes its constructor allocates, so counting, budgets and
state-dict checks can never disagree with what is built.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

# Options accepted by inject() for every method (not part of a method's options class).
COMMON = ("target_modules", "trainable_modules", "save_bases")


def function_option(default: Any, doc: str = "") -> Any:
    """A dataclass field for an option that changes what the adapter computes from its tensors (a
    checkpoint trained with another value is refused on resume). Options declared with a plain
    default (compute path, dropout, init, schedules ...) may differ between a run and its resume."""
    return field(default=default, metadata={"function": True, "doc": doc})


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class MethodOptions:
    """Options shared by the low-rank methods.

    ``r``: the rank (VeRA: rows of the shared projections; NoLA: rank of each basis).
    ``alpha``: the update is scaled by alpha / r; ``None`` takes the method's default
    (``default_alpha``: alpha = r, i.e. scaling 1, unless the method says otherwise).
    ``dropout``: dropout on the adapter branch's input (Linear targets only).
    """

    r: int = function_option(8, "rank")
    alpha: float | None = function_option(None, "scaling alpha / r; None: the method's default")
    dropout: float = 0.0

    # Options added after adapter records were first written whose default for new adapters computes something
    # else than those records did: {option: the value a stored record without it means} (see ``stored``).
    LEGACY: ClassVar[dict] = {}

    # the alpha an unset ``alpha`` resolves to (a function of the other options)
    def default_alpha(self) -> float:
        return float(self.r)

    def __post_init__(self):
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                           and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number (scaling = alpha / r), got {self.alpha!r}")
        if self.alpha is None:
            self.alpha = self.default_alpha()
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        seed = getattr(self, "seed", 0)
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.validate()

    def validate(self) -> None:
        """Method-specific, shape-independent checks (raise ValueError with the fix)."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def function_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("function"))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def stored(cls, options: dict) -> dict:
        """A stored record's options with the ``LEGACY`` value of every option it predates filled in."""
        return {**{k: v for k, v in cls.LEGACY.items() if k not in options}, **options}


@dataclass(frozen=True)
class Method:
    """One adapter method: its options, its per-layer update and how its shared bases are drawn.

    ``make_bases(layers, opts)``: the frozen random bases shared by every adapted layer (VeRA,
    RandLoRA, NoLA), from the list of (out, in, layer options) of the targets and the model-wide
    options; None for methods without bases.
    ``rank_limited``: r may not exceed min(out, in) of any target.
    ``knob``: the option ``match_budget`` tunes; ``knob_max``: its upper end (None: the smallest
    min(out, in) of the targets).
    ``schedule``: a class driving the method during training (DoRA-DR's pruning), built with
    ``schedule.for_model(model, total_steps)``; the training framework calls its ``regularizer``
    and ``after_step`` (see ``dora_dr.DynamicRankScheduler``).
    ``per_layer``: the options a layer may set for itself (``inject(..., layer_options=...)``), e.g.
    a rank per layer so that a parameter budget can be met exactly.
    """

    name: str
    options: type[MethodOptions]
    update: type
    make_bases: Callable | None = None
    rank_limited: bool = True
    knob: str = "r"
    knob_max: int | None = None
    schedule: type | None = None
    per_layer: tuple[str, ...] = ()

    def resolve(self, options: dict) -> MethodOptions:
        """The options object for ``options`` (defaults filled, values checked)."""
        allowed = set(self.options.names())
        unknown = sorted(set(options) - allowed - set(COMMON))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {self.name!r}; "
                             f"valid options: {sorted(allowed | set(COMMON))}")
        return self.options(**{k: v for k, v in options.items() if k in allowed})

    def for_layer(self, opts: MethodOptions, overrides: dict | None) -> MethodOptions:
        """The options of one layer: ``opts`` with that layer's own values (checked) in place."""
        if not overrides:
            return opts
        bad = sorted(set(overrides) - set(self.per_layer))
        if bad:
            allowed = list(self.per_layer) or "none"
            raise ValueError(f"option(s) {bad} cannot be set per layer for method {self.name!r} "
                             f"(per-layer options: {allowed})")
        return dataclasses.replace(opts, **overrides)

    def param_shapes(self, out_features: int, in_features: int, opts: MethodOptions) -> dict:
        return self.update.param_shapes(out_features, in_features, opts)

    def state_shapes(self, out_features: int, in_features: int, opts: MethodOptions) -> dict:
        """Shapes of everything a layer stores in an adapter state dict (parameters and the
        persistent buffers some methods keep, e.g. DoRA-DR's scores and masks)."""
        return {**self.update.param_shapes(out_features, in_features, opts),
                **self.update.buffer_shapes(out_features, in_features, opts)}

    def num_trainable(self, out_features: int, in_features: int, opts: MethodOptions) -> int:
        return sum(math.prod(s) for s in self.param_shapes(out_features, in_features, opts).values())
