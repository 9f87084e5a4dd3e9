"""What every item of the seam shares: the DeepSpeed version it was written for, and the one-line error for an internal
that is gone (:class:`~hybrid_ds.errors.IncompatibleDeepSpeed`: the internal, both DeepSpeed versions, and why
hybrid_ds needs it)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import deepspeed

from hybrid_ds.errors import IncompatibleDeepSpeed

WRITTEN_FOR = "0.19.8"


def require(internal: str, get: Callable[[], Any], why: str) -> Any:
    """``get()``, or the one-line error when it raises (a name or source is gone) or returns False or None."""
    try:
        value = get()
    except (AttributeError, KeyError, OSError, TypeError):
        value = None
    if value is None or value is False:
        raise IncompatibleDeepSpeed(f"hybrid_ds needs DeepSpeed {WRITTEN_FOR}'s {internal} "
                                    f"(found DeepSpeed {deepspeed.__version__} without it): {why}")
    return value


def source_has(function: Any, *texts: str) -> bool:
    """Whether ``texts`` occur in this order in the source of ``function`` (OSError without a source)."""
    source, at = inspect.getsource(function), 0
    for text in texts:
        at = source.find(text, at)
        if at < 0:
            return False
    return True
