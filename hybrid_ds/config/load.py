"""Reading a run config: ``extends`` chains, the ``on_cpu``/``on_gpu`` profiles and ``--set`` overrides. Pure Python."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

from hybrid_ds.config.schema import PROFILES, RunConfig, deep_merge
from hybrid_ds.errors import UserError


# ---------------------------------------------------------------- loading


# More --set overrides from the environment, ";"-separated, applied after the command line's to every config file
# read: a CI job or a test shrinks the README's commands as written (tests/test_readme.py).
SET_ENV = "HYBRID_DS_SET"


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), profile: str | None = None) -> RunConfig:
    """Read ``path`` (following ``extends``), merge the ``on_cpu``/``on_gpu`` section of ``profile``,
    apply ``--set`` overrides and then those of ``$HYBRID_DS_SET``, validate."""
    from_env = [item.strip() for item in os.environ.get(SET_ENV, "").split(";") if item.strip()]
    source = str(path) + (f" ({SET_ENV}: {'; '.join(from_env)})" if from_env else "")
    return load_config_dict(_read_with_extends(Path(path), chain=()), [*overrides, *from_env], profile, source=source)


def load_config_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), profile: str | None = None,
                     source: str = "<dict>") -> RunConfig:
    raw = copy.deepcopy(raw)
    for name in PROFILES:
        section = raw.pop(f"on_{name}", {})
        if not isinstance(section, dict):
            raise UserError(f"on_{name}", f"must be an object of keys to change on a {name} machine, got {section!r}")
        if name == profile:
            raw = deep_merge(raw, section)
            source += f" with on_{name}" if section else ""
    for item in overrides:
        apply_override(raw, item)
    return RunConfig(raw, source=source)


# A JSON string (kept), or a // line comment or /* block */ comment (blanked, its newlines kept for error positions).
_STRING_OR_COMMENT = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.S)


def strip_comments(text: str) -> str:
    """JSON with ``//`` and ``/* */`` comments (as README's example and VS Code's .jsonc have) as plain JSON.

    >>> strip_comments('{"url": "http://x", // the host\\n "n": 1 /* one */}')
    '{"url": "http://x",            \\n "n": 1          }'
    """
    return _STRING_OR_COMMENT.sub(lambda m: m.group(0) if m.group(0).startswith('"')
                                  else re.sub(r"[^\n]", " ", m.group(0)), text)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(str(path), "config file not found")
    try:
        data = json.loads(strip_comments(path.read_text()))
    except json.JSONDecodeError as err:
        raise UserError(str(path), f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise UserError(str(path), f"a config must be a JSON object, got {type(data).__name__}")
    return data


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(p.name for p in (*chain, resolved))
        raise UserError("extends", f"cycle: {cycle}")
    data = _read_json(path)
    parents = data.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise UserError("extends", f"must be a file name or a list of them, got {parents!r}")
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise UserError("extends", f"{parent!r} (named in {path}) not found")
        merged = deep_merge(merged, _read_with_extends(parent_path, (*chain, resolved)))
    return deep_merge(merged, data)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=VALUE`` in place; VALUE is JSON where it parses, else a string.

    >>> cfg = {"pipeline": {"stages": 2}}
    >>> apply_override(cfg, "pipeline.stages=4"); apply_override(cfg, "model.name=gpt2")
    >>> cfg
    {'pipeline': {'stages': 4}, 'model': {'name': 'gpt2'}}
    """
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError("--set", f"expected KEY.PATH=VALUE, got {item!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parents[: i + 1])
            raise UserError("--set", f"{key}: {prefix} is {child!r}, not an object")
        node = child
    node[leaf] = value
