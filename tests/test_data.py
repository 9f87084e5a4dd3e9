"""Data: sources, tokenizers, lossless packing, MLM masking, sharded and resumable micro-batches, the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybrid_ds.config import DataConfig
from hybrid_ds.data import MaskingRule, MicroBatches, check_vocab, load_data, padded_vocab_size
from hybrid_ds.data import packing
from hybrid_ds.data.packing import load_tokenizer, pack
from hybrid_ds.data.sources import builtin_chapters, load_documents
from hybrid_ds.errors import UserError

DOCS = ["In the beginning was the word.", "A second document, somewhat longer than the first one is.",
        "Third.", "And a fourth document to close the corpus with a few more tokens than before."]


@pytest.fixture(scope="module")
def gpt2_tok():
    return load_tokenizer(None, "causal_lm")


@pytest.fixture(scope="module")
def bert_tok():
    return load_tokenizer(None, "masked_lm")


def docs_dataset(texts):
    import datasets

    return datasets.Dataset.from_dict({"text": texts})


def test_offline_tokenizers_are_the_real_ones(gpt2_tok, bert_tok):
    assert gpt2_tok("Hello world")["input_ids"] == [15496, 995]
    assert len(gpt2_tok) == 50257 and gpt2_tok.eos_token_id == 50256
    assert len(bert_tok) == 30522 and bert_tok("hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_builtin_corpus_is_the_world_english_bible_without_footnotes():
    chapters = builtin_chapters()
    assert len(chapters) == 1189  # chapters of the 66 books
    assert chapters[0].startswith("In the beginning God created the heavens and the earth.")
    assert not any("{" in c for c in chapters)
    train, held_out = load_documents(DataConfig())
    assert len(train) + len(held_out) == 1189 and 10 < len(held_out) < 50
    assert not set(held_out["text"]) & set(train["text"])


@pytest.mark.parametrize("seq_len", [4, 7, 16])
def test_causal_packing_is_lossless(gpt2_tok, seq_len):
    blocks = pack(docs_dataset(DOCS), gpt2_tok, seq_len, "causal_lm")
    stream = [t for d in DOCS for t in gpt2_tok(d)["input_ids"] + [gpt2_tok.eos_token_id]]
    flat = [t for block in blocks["input_ids"] for t in block]
    assert all(len(b) == seq_len for b in blocks["input_ids"])
    assert flat == stream[:len(stream) // seq_len * seq_len]


def test_mlm_blocks_are_cls_body_sep(bert_tok):
    blocks = pack(docs_dataset(DOCS), bert_tok, 10, "masked_lm")["input_ids"]
    assert all(b[0] == bert_tok.cls_token_id and b[-1] == bert_tok.sep_token_id and len(b) == 10 for b in blocks)
    stream = [t for d in DOCS for t in bert_tok(d, add_special_tokens=False)["input_ids"] + [bert_tok.sep_token_id]]
    assert [t for b in blocks for t in b[1:-1]] == stream[:len(stream) // 8 * 8]


def fake_blocks(n: int, seq_len: int = 8):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)})


def test_data_parallel_shards_are_disjoint_and_cover_the_epoch():
    blocks = fake_blocks(50)
    ranks = [MicroBatches(blocks, micro_batch=3, dp_rank=r, dp=2, seed=7) for r in range(2)]
    per_epoch = ranks[0].per_epoch
    assert per_epoch == 50 // 6
    seen = [np.concatenate([it.sample_indices(k) for k in range(per_epoch)]) for it in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == per_epoch * 6  # all but the tail shorter than micro x dp
    next_epoch = np.concatenate([ranks[0].sample_indices(per_epoch + k) for k in range(per_epoch)])
    assert not np.array_equal(next_epoch, seen[0])  # a new permutation each epoch


def test_first_and_last_stage_iterators_agree():
    blocks = fake_blocks(40)
    first, last = (MicroBatches(blocks, 2, dp_rank=1, dp=2, seed=3) for _ in range(2))
    for _ in range(25):
        (ids_a, mask_a), labels_a = next(first)
        (ids_b, _), labels_b = next(last)
        assert torch.equal(ids_a, ids_b) and torch.equal(labels_a, labels_b) and torch.equal(ids_a, labels_a)
        assert mask_a.dtype == torch.int64 and bool(mask_a.all())


def test_resumed_iterator_continues_exactly(bert_tok):
    blocks = fake_blocks(30)
    for task, mlm in (("causal_lm", None), ("masked_lm", MaskingRule(bert_tok))):
        straight = MicroBatches(blocks, 2, seed=5, task=task, mlm=mlm)
        expected = [next(straight) for _ in range(40)]
        first = MicroBatches(blocks, 2, seed=5, task=task, mlm=mlm)
        for _ in range(17):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint
        resumed = MicroBatches(blocks, 2, seed=5, task=task, mlm=mlm)
        resumed.load_state_dict(state)
        for want in expected[17:]:
            got = next(resumed)
            assert all(torch.equal(a, b) for a, b in zip(got[0], want[0])) and torch.equal(got[1], want[1])


def test_resume_with_another_seed_is_refused():
    batches = MicroBatches(fake_blocks(10), 2, seed=5)
    with pytest.raises(UserError, match="train.resume"):
        MicroBatches(fake_blocks(10), 2, seed=6).load_state_dict(batches.state_dict())


def test_mlm_masking_statistics(bert_tok):
    rule = MaskingRule(bert_tok, 0.15)
    ids = torch.randint(1000, 30000, (64, 512))
    ids[:, 0], ids[:, -1] = bert_tok.cls_token_id, bert_tok.sep_token_id
    inputs, labels = rule.apply(ids, [0])
    chosen = labels != -100
    assert chosen.float().mean().item() == pytest.approx(0.15 * 510 / 512, abs=0.005)
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS] and [SEP] are never predicted
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (inputs == bert_tok.mask_token_id) & chosen
    kept = (inputs == ids) & chosen
    n = chosen.sum().item()
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.02)
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / 30522, abs=0.02)
    assert torch.equal(rule.apply(ids, [0])[0], inputs)  # deterministic for a seed
    assert not torch.equal(rule.apply(ids, [1])[0], inputs)


@pytest.mark.parametrize("suffix", ["txt", "jsonl", "csv", "parquet"])
def test_local_files(tmp_path, suffix):
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS * 20})
    path = tmp_path / f"corpus.{suffix}"
    if suffix == "txt":
        path.write_text("\n".join(DOCS * 20))
    else:
        {"jsonl": ds.to_json, "csv": ds.to_csv, "parquet": ds.to_parquet}[suffix](str(path))
    data = load_data(DataConfig(source=str(path), seq_len=16, cache_dir=str(tmp_path / "cache"),
                                eval_fraction=0.1), "causal_lm")
    assert len(data.train) > len(data.eval) > 0


def test_packed_corpus_is_cached(tmp_path, monkeypatch):
    cfg = DataConfig(seq_len=256, cache_dir=str(tmp_path))
    first = load_data(cfg, "causal_lm")
    monkeypatch.setattr(packing, "pack", lambda *a, **k: pytest.fail("a cached corpus was packed again"))
    again = load_data(cfg, "causal_lm")
    assert again.train["input_ids"][:3] == first.train["input_ids"][:3] and len(again.train) == len(first.train)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written folders left


@pytest.mark.parametrize("data, key, detail", [
    (dict(source="missing/corpus.txt"), "data.source", "no such file"),
    (dict(source="{tmp}/empty.txt"), "data.source", "no documents"),
    (dict(source="{tmp}/short.txt", seq_len=4096), "data.seq_len", "fewer tokens than one block"),
    (dict(source="{tmp}/other.jsonl", text_column="text"), "data.text_column", "'body'"),
    (dict(tokenizer="{tmp}/no-tokenizer"), "data.tokenizer", "no tokenizer"),
])
def test_bad_data_gives_one_clear_error(tmp_path, data, key, detail):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "short.txt").write_text("only a few words here\n" * 3)
    (tmp_path / "other.jsonl").write_text('{"body": "text"}\n')
    (tmp_path / "no-tokenizer").mkdir()
    data = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in data.items()}
    with pytest.raises(UserError) as err:
        load_data(DataConfig(cache_dir=str(tmp_path / "cache"), eval_fraction=0.5, **data), "causal_lm")
    assert err.value.key == key and detail in err.value.message, str(err.value)


def test_vocab_checks(gpt2_tok):
    assert padded_vocab_size(50257) == 50304 and padded_vocab_size(30522) == 30528
    check_vocab(gpt2_tok, 50304)
    with pytest.raises(UserError, match="50257 tokens but the model's vocabulary has 256.*vocab_from_tokenizer"):
        check_vocab(gpt2_tok, 256)
