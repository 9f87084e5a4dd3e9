"""Names that may live on the Hugging Face Hub (a model, a tokenizer, a dataset): the local cache first, then the hub
asked once, with a short timeout.

Left to themselves, transformers and datasets ask the hub for a name that is not in the cache and, when it cannot be
reached, retry with back-off for half a minute or more (``Retrying in 8s [Retry 5/5]``) before the error. Here a
name is looked up in the local cache only (``local_files_only``, or hub-offline mode for datasets); only when it is
not there is the hub asked, once (:func:`hub_unreachable`: one request, :data:`HUB_TIMEOUT_S`), and when it does not
answer the run stops at once with one line naming the name, the cache looked in and ``HF_HUB_OFFLINE``. With a
network, a name that is not cached downloads as it does with transformers. Pure Python: huggingface_hub is imported
inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

from hybrid_ds.errors import UserError, first_line

HUB_TIMEOUT_S = 5.0


@functools.cache
def hub_unreachable() -> str | None:
    """None when the hub answers one request within :data:`HUB_TIMEOUT_S` (any HTTP status); else why not, as a
    phrase. Asked once per process."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # httpx's connect, DNS and timeout errors, a proxy's refusal
        return f"the hub ({constants.ENDPOINT}) cannot be reached: {first_line(err)}"
    return None


def not_cached(key: str, name: str, what: str, why: str) -> UserError:
    """The one line for a name that is neither local nor reachable."""
    from huggingface_hub import constants

    return UserError(key, f"{name!r} is not a local folder and the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                          f"holds no {what} of it; {why}; download it where there is a network (runs then read the "
                          "cache), or name a local folder; HF_HUB_OFFLINE=1 skips asking the hub")


def from_cache_or_hub(load: Callable[..., Any], key: str, name: str, what: str) -> Any:
    """``load(local_files_only=True)``; where that finds nothing, ``load(local_files_only=False)`` when the hub answers,
    else :func:`not_cached`'s line. Errors of the second load are the caller's to word."""
    try:
        return load(local_files_only=True)
    except Exception:  # not cached; the libraries raise several unrelated types for it, and the hub's load says why
        pass
    why = hub_unreachable()
    if why:
        raise not_cached(key, name, what, why)
    return load(local_files_only=False)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub (and datasets, where imported) in offline mode: cached files only, no request and no retry.
    For libraries without ``local_files_only`` (``datasets.load_dataset``)."""
    from huggingface_hub import constants

    targets = [constants] + ([sys.modules["datasets"].config] if "datasets" in sys.modules else [])
    before = [target.HF_HUB_OFFLINE for target in targets]
    for target in targets:
        target.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for target, value in zip(targets, before):
            target.HF_HUB_OFFLINE = value
