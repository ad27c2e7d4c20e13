"""Every source a job reads, checked before anything is downloaded or built.

A job reads up to four kinds of source: model weights, a tokenizer, a training set and test sets,
each a local path, a Hugging Face hub id (open_clip and timm tags resolve to one) or a URL.
:func:`check_sources` asks the model and data loaders which of theirs are unavailable
(``source_problems(cfg, hub)``: a local path that does not exist, or a hub source that is not in the
local cache while the hub is unreachable, see :mod:`randlora.hub`) and raises one
:class:`~randlora.errors.SourceUnavailableError` that lists every one of them with its fix, instead
of the hub libraries' tens of seconds of retries per source and one report per attempt.
"""
from __future__ import annotations

from ..errors import SourceUnavailableError
from ..hub import HubStatus, hub_status


def source_problems(cfg, hub: HubStatus | None = None) -> list[str]:
    """Every source of the job ``cfg`` (model, tokenizer, datasets) that cannot be read, one line each
    with its fix; empty when all can."""
    from omegaconf import OmegaConf

    from ..data import commonsense, images
    from ..models import source_problems as model_problems
    hub = hub or hub_status()

    def plain(c):
        return OmegaConf.to_container(c, resolve=True) if OmegaConf.is_config(c) else dict(c or {})

    model_cfg, data_cfg = plain(cfg.model), plain(cfg.data)
    problems = list(model_problems(model_cfg, hub))
    data = commonsense if data_cfg.get("source") == "instructions" else images
    return problems + list(data.source_problems(data_cfg, hub))


def check_sources(cfg, hub: HubStatus | None = None) -> None:
    """Raise one :class:`SourceUnavailableError` listing every unavailable source of the job, before
    anything is downloaded or built; return quietly when every source can be read."""
    hub = hub or hub_status()
    problems = source_problems(cfg, hub)
    if not problems:
        return
    n = len(problems)
    where = f" ({hub.reason})" if not hub.online else ""
    head = (f"{n} source{'s' if n > 1 else ''} of this job {'are' if n > 1 else 'is'} not available{where}; "
            "nothing was downloaded or built:")
    raise SourceUnavailableError("\n".join([head] + [f"  - {p}" for p in problems]))
