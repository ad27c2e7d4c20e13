"""The errors a user can fix. ``python train.py`` prints any of them as one line (no traceback) and
exits with status 2; a multirun records it in the job's results.json and goes on."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the request (config, weights, data): printed as one message, no traceback."""


class SourceUnavailableError(UserError, RuntimeError):
    """Weights or data could not be read: offline, wrong id, missing file, not a weights file, or
    weights of another architecture (the message says which)."""


class DataConfigError(UserError, ValueError):
    """A data setting that cannot work with this dataset (a missing split or column, shots that a
    class cannot supply, a validation set that would be empty ...)."""


def short_error(err: Exception, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (cut at ``limit`` characters)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:limit]}" if text else type(err).__name__


def offline_message(what: str, source: str, how: str, err: Exception) -> str:
    """A load error of a hub source that the preflight did not catch (offline, or a wrong id)."""
    return (f"could not load {what} from {source!r} ({short_error(err)}). "
            f"This machine may be offline or the id may be wrong. {how}")
