"""The one exception type for user mistakes.

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2. Anything else that
escapes is a bug in hybrid_ds and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """A mistake the user can fix: a bad config value, a missing file, an impossible layout.

    ``key`` is the dotted JSON path (``pipeline.stages``) or a file name; the message says what
    was given and what would be valid.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def suggest(value: Any, choices: Iterable[str]) -> str:
    """A ``did you mean`` tail for an unknown name, or a list of valid names when none is close.

    >>> suggest("stgaes", ["stages", "partition"])
    "did you mean 'stages'?"
    """
    choices = sorted(set(choices))
    close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"valid: {shown}"


class IncompatibleDeepSpeed(UserError):
    """The installed DeepSpeed lacks an internal hybrid_ds relies on (see :mod:`hybrid_ds.deepspeed_seam`).

    The fix is on the user's side: install the DeepSpeed version the seam was written for.
    """

    def __init__(self, message: str):
        super().__init__("", message)
