"""What every item of the seam shares: the DeepSpeed version it was written for, the registry of the internals it
requires, the syntax-tree test of what a DeepSpeed function's code does, and the one-line error for an internal that
is gone (:class:`~hybrid_ds.errors.IncompatibleDeepSpeed`: the internal, both DeepSpeed versions, and why hybrid_ds
needs it).

A *requirement* is one internal the seam relies on, checked by a callable returning a true value when it holds.
Static ones (they need nothing but DeepSpeed's classes and modules) are made with :func:`requirement` at import time
and kept in :data:`REGISTRY`, where ``tests/test_deepspeed_seam.py`` takes each away in turn; an item checks its own
with :func:`require` before it changes anything. A check that needs an instance (an optimizer's attributes, a built
module's bounds) calls :func:`demand` directly.

The code of a DeepSpeed function is tested with :func:`code_has` and :func:`code_count`: its syntax tree, not its
text, so that a comment or a string never satisfies a check. A pattern is a Python fragment (an expression or one
statement) compared node by node (types and fields, ignoring ``ctx`` and positions), where ``...`` matches any
subtree; in a call, a last positional argument ``...`` stands for any further arguments and any keywords (so
``f(...)`` is any call of ``f``), and in a dict ``**...`` for any further entries.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import deepspeed

from hybrid_ds.errors import IncompatibleDeepSpeed

WRITTEN_FOR = "0.19.8"


@dataclass(frozen=True)
class Requirement:
    """One DeepSpeed internal: ``key`` (unique in :data:`REGISTRY`), ``internal`` (named by the error), ``holds``
    (true when it is there: ``holds()`` returns neither None nor False nor raises) and ``why`` hybrid_ds needs it."""

    key: str
    internal: str
    holds: Callable[[], Any]
    why: str


REGISTRY: dict[str, Requirement] = {}


def requirement(key: str, internal: str, holds: Callable[[], Any], why: str) -> Requirement:
    """A static requirement, registered under ``key`` (a module registering it again, when reloaded, replaces it)."""
    made = Requirement(key, internal, holds, why)
    known = REGISTRY.get(key)
    if known is not None and known.internal != internal:
        raise ValueError(f"two seam requirements under the key {key!r}: {known.internal!r} and {internal!r}")
    REGISTRY[key] = made
    return made


def require(*requirements: Requirement) -> None:
    """The one-line error for the first of ``requirements`` that does not hold."""
    for item in requirements:
        demand(item.internal, item.holds, item.why)


def demand(internal: str, get: Callable[[], Any], why: str) -> Any:
    """``get()``, or the one-line error naming ``internal`` when it raises (a name, a key or a source is gone, or
    the source does not parse) or returns False or None. For checks that need an instance; static ones are
    :func:`requirement`\\ s."""
    try:
        value = get()
    except (AttributeError, KeyError, OSError, TypeError, SyntaxError):
        value = None
    if value is None or value is False:
        raise IncompatibleDeepSpeed(f"hybrid_ds needs DeepSpeed {WRITTEN_FOR}'s {internal} "
                                    f"(found DeepSpeed {deepspeed.__version__} without it): {why}")
    return value


def code_has(function: Any, *patterns: str) -> bool:
    """Whether the code of ``function`` holds a node matching each of ``patterns``, in this order: each match at or
    after the previous one's position (OSError without a source, SyntaxError for a pattern that is not Python)."""
    nodes = _positioned_nodes(function)
    at = (0, 0)
    for pattern in patterns:
        wanted = _pattern(pattern)
        found = [where for where, node in nodes if where >= at and _matches(wanted, node)]
        if not found:
            return False
        at = min(found)
    return True


def code_count(function: Any, pattern: str) -> int:
    """How many nodes of the code of ``function`` match ``pattern``."""
    wanted = _pattern(pattern)
    return sum(_matches(wanted, node) for _, node in _positioned_nodes(function))


def _positioned_nodes(function: Any) -> list[tuple[tuple[int, int], ast.AST]]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return [((node.lineno, node.col_offset), node) for node in ast.walk(tree) if hasattr(node, "lineno")]


def _pattern(text: str) -> ast.AST:
    body = ast.parse(textwrap.dedent(text).strip()).body
    if len(body) != 1:
        raise SyntaxError(f"a pattern is one expression or statement: {text!r}")
    return body[0].value if isinstance(body[0], ast.Expr) else body[0]


def _is_wildcard(node: Any) -> bool:
    return isinstance(node, ast.Constant) and node.value is Ellipsis


def _matches(pattern: Any, node: Any) -> bool:
    if _is_wildcard(pattern):
        return True
    if isinstance(pattern, list):
        return isinstance(node, list) and len(pattern) == len(node) and all(map(_matches, pattern, node))
    if not isinstance(pattern, ast.AST):
        return pattern == node
    if type(pattern) is not type(node):
        return False
    if isinstance(pattern, ast.Call) and pattern.args and _is_wildcard(pattern.args[-1]) and not pattern.keywords:
        head = pattern.args[:-1]
        return _matches(pattern.func, node.func) and _matches(head, node.args[:len(head)])
    if isinstance(pattern, ast.Dict) and None in pattern.keys:
        return _dict_holds(pattern, node)
    return all(_matches(getattr(pattern, field), getattr(node, field, None))
               for field in pattern._fields if field not in ("ctx", "type_comment"))


def _dict_holds(pattern: ast.Dict, node: ast.Dict) -> bool:
    """A dict pattern with ``**...``: each of its other entries matches an entry of ``node``."""
    entries = list(zip(node.keys, node.values))
    return all(any(_matches(key, k) and _matches(value, v) for k, v in entries)
               for key, value in _entries(pattern))


def _entries(pattern: ast.Dict) -> Iterator[tuple[Any, Any]]:
    for key, value in zip(pattern.keys, pattern.values):
        if key is not None:
            yield key, value
        elif not _is_wildcard(value):
            raise SyntaxError("in a dict pattern, ** takes only ...")


def undecorated(function: Callable) -> Callable:
    """``function`` without DeepSpeed's ``instrument_w_nvtx`` (ZeRO-3's ``step``, ``DeepSpeedEngine.backward``), which
    keeps it in its closure and sets no ``__wrapped__``."""
    inner = [c.cell_contents for c in function.__closure__ or () if inspect.isfunction(c.cell_contents)]
    return inner[0] if inner else function
