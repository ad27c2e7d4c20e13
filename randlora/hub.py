"""The Hugging Face hub as this process sees it: reachable or not, and what its local caches hold.

Without a network a hub library retries every request for tens of seconds. :func:`hub_status`
decides once per process whether the hub is reachable: an offline flag (``HF_HUB_OFFLINE``,
``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``) says it is not; otherwise one request to the endpoint
the hub libraries use (``huggingface_hub.constants.ENDPOINT``, i.e. ``HF_ENDPOINT``) answers it,
bounded by :data:`PROBE_TIMEOUT_S`. When the hub is unreachable every Hugging Face library of this
process is put offline (their own flags), so no loader retries.

A hub source counts as available offline when the loader would find it in the local cache: a model
file in the ``huggingface_hub`` cache (``HF_HUB_CACHE``), a dataset in the ``datasets`` cache
(``HF_DATASETS_CACHE``). A URL is never available offline (``datasets`` does not serve a cached URL
without the network). The model and data loaders use these lookups for their ``source_problems``;
``randlora.training.preflight`` collects them for a whole job.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass


OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HubStatus:
    online: bool
    reason: str | None = None   # why the hub counts as unreachable (None when online)
    endpoint: str = ""


def offline_flag() -> str | None:
    """The environment variable that puts the Hugging Face libraries offline, if one is set."""
    return next((k for k in OFFLINE_FLAGS if os.environ.get(k, "").strip().lower() in _TRUE), None)


def hub_endpoint() -> str:
    try:
        from huggingface_hub import constants
        return constants.ENDPOINT
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``url`` answers an HTTP request within ``timeout`` seconds, else why it did not.

    The request runs in a daemon thread joined with the timeout, so a name lookup that hangs (which
    the socket timeout does not cover) cannot hold the caller longer either."""
    out: dict = {}

    def ask():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                out["status"] = r.status
        except urllib.error.HTTPError as e:  # an HTTP answer: the server is there
            out["status"] = e.code
        except Exception as e:  # noqa: BLE001 - refused, unknown host, TLS, timeout ...
            if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                out["error"] = f"no answer within {timeout:g} s"
            else:
                out["error"] = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"

    t = threading.Thread(target=ask, daemon=True, name="randlora-hub-probe")
    t.start()
    t.join(timeout + 0.5)
    if t.is_alive() or not out:
        return f"no answer within {timeout:g} s"
    if "error" in out:
        return out["error"]
    if out["status"] >= 500:
        return f"it answered HTTP {out['status']}"
    return None


@functools.lru_cache(maxsize=1)
def hub_status() -> HubStatus:
    """Whether the Hugging Face hub is reachable from this process (decided once, then cached;
    ``hub_status.cache_clear()`` forgets it). When it is not, the hub libraries are put offline."""
    endpoint = hub_endpoint()
    flag = offline_flag()
    if flag:
        status = HubStatus(False, f"{flag}={os.environ[flag]} is set", endpoint)
    else:
        why = probe(endpoint)
        status = HubStatus(why is None, None if why is None else f"the hub at {endpoint} is unreachable ({why})",
                           endpoint)
    if not status.online:
        set_offline()
    return status


def set_offline() -> None:
    """Put every Hugging Face library of this process (and its child processes) offline: they read
    their flags at import, so the modules already imported get their flag set too. From then on a
    hub source comes from the local cache or fails at once, without retries."""
    for k in OFFLINE_FLAGS:
        os.environ[k] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_HUB_OFFLINE = True
        ds.HF_DATASETS_OFFLINE = True


@functools.lru_cache(maxsize=None)
def url_status(url: str) -> str | None:
    """None when the host of ``url`` answers (one bounded probe per host and process), else why not."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    return probe(f"{parts.scheme}://{parts.netloc}/")


# --------------------------------------------------------------------------------- local caches
def hub_cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def cached_hub_file(repo_id: str, filename: str, repo_type: str = "model", revision: str | None = None) -> str | None:
    """The path of ``filename`` of hub repository ``repo_id`` in the local ``huggingface_hub`` cache, or
    None (the lookup the hub libraries themselves make offline)."""
    from huggingface_hub import try_to_load_from_cache
    try:
        path = try_to_load_from_cache(repo_id, filename, repo_type=repo_type, revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def cached_dataset(repo_id: str) -> bool:
    """Whether ``datasets.load_dataset(repo_id)`` finds a prepared copy in the ``datasets`` cache
    (``HF_DATASETS_CACHE``) when the hub is unreachable: the same lookup ``datasets`` makes."""
    try:
        from datasets import config
        from datasets.load import CachedDatasetModuleFactory
        CachedDatasetModuleFactory(repo_id, cache_dir=str(config.HF_DATASETS_CACHE)).get_module()
        return True
    except Exception:  # noqa: BLE001 - not cached (or not a dataset id at all)
        return False


def is_url(source) -> bool:
    return str(source).startswith(("http://", "https://"))


def download_hint(repo_id: str, files: list[str] | None = None, repo_type: str = "model") -> str:
    """The command that puts a hub repository (or some of its files) into the local cache."""
    what = " ".join([repo_id] + list(files or []))
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return (f"on a machine with network run `hf download{kind} {what}` and copy its cache folder "
            f"({hub_cache_dir()}) here (or set HF_HUB_CACHE to a copy)")


def weights_file(what: str, cached: str | None, download, fix: str, hub: HubStatus) -> str:
    """The local file of a library's named weights: ``cached`` when the cache has it, else ``download()``
    when the hub answers, else one SourceUnavailableError saying what is missing and ``fix``."""
    from .errors import SourceUnavailableError, short_error
    if cached:
        return cached
    if not hub.online:
        raise SourceUnavailableError(f"{what} are not in the local cache and the hub is unreachable ({hub.reason}): "
                                     + fix)
    try:
        return download()
    except Exception as e:  # noqa: BLE001 - any download failure: one line with the fix
        raise SourceUnavailableError(f"could not download {what} ({short_error(e)}): " + fix) from None
