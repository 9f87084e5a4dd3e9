"""The one exception type for user mistakes.

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2. Anything else that
escapes is a bug in hybrid_ds and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable
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

    def __reduce__(self) -> tuple:  # raised in datasets' map workers (data.num_proc), re-raised in the main process
        return UserError, (self.key, self.message)


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


def first_line(err: Exception) -> str:
    """The first line of an exception's message (at most 200 characters), or its type's name: for a one-line error
    that quotes what a library raised."""
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


class IncompatibleDeepSpeed(UserError):
    """The installed DeepSpeed lacks an internal hybrid_ds relies on (see :mod:`hybrid_ds.seam`).

    The fix is on the user's side: install the DeepSpeed version the seam was written for.
    """

    def __init__(self, message: str):
        super().__init__("", message)


# ---------------------------------------------------------------- command-line numbers


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (a flag's 0 must not read as "not given").

    >>> at_least(1)("4")
    4
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse ``type``: a number in (0, 1], e.g. an efficiency."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are a :class:`UserError` (one line, exit 2) instead of usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        flag, sep, detail = message.partition(": ")
        if sep and flag.startswith("argument "):
            raise UserError(flag.removeprefix("argument ").split("/")[0], f"{detail}; see {self.prog} --help")
        raise UserError("", f"{message}; see {self.prog} --help")
