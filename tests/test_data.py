"""Data loads from every source and tokenizer, packs losslessly, masks for MLM, and feeds sharded, resumable
micro-batches from its cache."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid_ds.config import DataConfig
from hybrid_ds.data import MaskingRule, MicroBatches, check_vocab, load_data, padded_vocab_size, predicted_tokens
from hybrid_ds.data import packing
from hybrid_ds.data.feed import eval_batches
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
    """50 blocks, 2 ranks x 3: the ranks read disjoint samples, each epoch reads every block once (no tail is
    dropped: the 9th global micro-batch holds the last 2 blocks of epoch 0 and the first 4 of epoch 1)."""
    blocks = fake_blocks(50)
    ranks = [MicroBatches(blocks, micro_batch=3, dp_rank=r, dp=2, seed=7) for r in range(2)]
    stream = np.concatenate([it.sample_indices(k) for k in range(25) for it in ranks])  # 150 samples: 3 epochs
    for epoch in range(3):
        assert sorted(stream[epoch * 50:(epoch + 1) * 50]) == list(range(50))
        assert np.array_equal(stream[epoch * 50:(epoch + 1) * 50], ranks[0].order(epoch))
    assert not np.array_equal(stream[:50], stream[50:100])  # a new permutation each epoch


def test_the_data_position_is_global_across_data_parallel_sizes():
    """Saved at dp 2 x micro 2 after 5 micro-batches (20 samples), resumed at dp 1 x micro 4 and at dp 4 x
    micro 1: together the new ranks read exactly the samples an uninterrupted run reads next."""
    blocks = fake_blocks(37)
    saved = [MicroBatches(blocks, 2, dp_rank=r, dp=2, seed=9) for r in range(2)]
    for it in saved:
        for _ in range(5):
            next(it)
    state = json.loads(json.dumps(saved[0].state_dict()))
    assert state["samples"] == 20
    straight = MicroBatches(blocks, 1, seed=9)
    want = np.concatenate([straight.sample_indices(k) for k in range(20, 60)])
    for micro, dp in ((4, 1), (1, 4), (2, 2)):
        resumed = [MicroBatches(blocks, micro, dp_rank=r, dp=dp, seed=9) for r in range(dp)]
        for it in resumed:
            it.load_state_dict(state)
        got = [[next(it)[1] for _ in range(40 // (micro * dp))] for it in resumed]
        stream = torch.cat([got[r][k] for k in range(40 // (micro * dp)) for r in range(dp)])
        assert torch.equal(stream[:, 0], torch.from_numpy(want * 8)), (micro, dp)  # fake block b starts at b * 8


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


def read_blocks(batches) -> list[int]:
    """Indices (into fake_blocks) of the blocks one pass of ``batches`` reads, in order."""
    return [int(ids[i, 0]) // ids.shape[1] for (ids, *_), _ in itertools.islice(batches, batches.per_epoch)
            for i in range(len(ids))]


def test_evaluation_reads_a_fixed_sample_from_the_whole_held_out_split():
    """eval_batches: a seeded sample reaching the split's last part (not its first blocks in file order), the
    same at every evaluation and for every layout reading as many blocks, disjoint across data-parallel ranks."""
    blocks = fake_blocks(400)
    ranks = [read_blocks(eval_batches(blocks, 2, 4, dp_rank=r, dp=2, seed=3)) for r in range(2)]
    assert all(len(r) == 8 for r in ranks) and not set(ranks[0]) & set(ranks[1])
    sample = sorted(ranks[0] + ranks[1])
    assert max(sample) >= 300 and min(sample) < 100, sample  # spread over the split
    assert read_blocks(eval_batches(blocks, 2, 4, dp_rank=1, dp=2, seed=3)) == ranks[1]  # every evaluation
    assert sorted(read_blocks(eval_batches(blocks, 4, 4, seed=3))) == sample  # pp=2 x dp=1 at micro 4: same blocks
    assert set(read_blocks(eval_batches(blocks, 2, 4, dp=1, seed=3))) < set(sample)  # a smaller sample: part of it
    assert sorted(read_blocks(eval_batches(blocks, 4, 4, seed=4))) != sample  # another seed, another sample
    small = [read_blocks(eval_batches(fake_blocks(11), 2, 8, dp_rank=r, dp=2, seed=3)) for r in range(2)]
    assert sorted(small[0] + small[1]) != list(range(8)) and len(set(small[0] + small[1])) == 8  # all but a tail


def test_eval_token_count_and_masks_are_fixed(bert_tok):
    """predicted_tokens: causal LM predicts all but each block's first token; masked LM its masked tokens,
    which are the same at every evaluation."""
    import datasets

    blocks = fake_blocks(40, seq_len=16)
    causal = eval_batches(blocks, 2, 3, dp_rank=1, dp=2, seed=5)
    assert predicted_tokens(causal) == 3 * 2 * 15 and causal.consumed == 0
    mlm = MaskingRule(bert_tok)
    ids = torch.randint(1000, 30000, (40, 16), generator=torch.Generator().manual_seed(0))
    masked = datasets.Dataset.from_dict({"input_ids": ids.numpy()})
    first, again = (list(itertools.islice(eval_batches(masked, 2, 3, seed=5, task="masked_lm", mlm=mlm), 3))
                    for _ in range(2))
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0][0], b[0][0]) for a, b in zip(first, again))
    assert predicted_tokens(eval_batches(masked, 2, 3, seed=5, task="masked_lm", mlm=mlm)) == \
        sum(int((labels != -100).sum()) for _, labels in first) > 0


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


def test_vocab_checks(gpt2_tok):
    assert padded_vocab_size(50257) == 50304 and padded_vocab_size(30522) == 30528
    check_vocab(gpt2_tok, 50304)
    with pytest.raises(UserError, match="50257 tokens but the model's vocabulary has 256.*vocab_from_tokenizer"):
        check_vocab(gpt2_tok, 256)


# ---------------------------------------------------------------- hub datasets, offline

HUB_TRAIN = [f"Training document {i} tells of the {i} apples in the orchard." for i in range(40)]
HUB_VALIDATION = [f"Held-out document {i} counts {i} pears instead." for i in range(8)]

# Run in a fresh process: `datasets` reads HF_HOME / HF_DATASETS_CACHE and HF_HUB_OFFLINE when imported.
HUB_LOADER = """
import json, sys
from hybrid_ds.config import DataConfig
from hybrid_ds.data import load_data
from hybrid_ds.errors import UserError

out = {}
for name, kwargs in json.loads(sys.argv[1]).items():
    try:
        data = load_data(DataConfig(seq_len=8, **kwargs), "causal_lm")
        out[name] = {"train": [list(b) for b in data.train["input_ids"]], "eval": [list(b) for b in data.eval["input_ids"]]}
    except UserError as err:
        out[name] = {"key": err.key, "error": str(err)}
print(json.dumps(out))
"""


def cache_hub_dataset(home: Path, repo: str, splits: dict[str, list[str]]) -> None:
    """Leave ``repo`` (ORG/NAME) in ``home``'s `datasets` cache as ``load_dataset(repo)`` leaves it after a download.

    The files are laid out as a hub dataset repository holds them (``data/SPLIT-00000-of-00001.parquet``),
    prepared by `datasets`' own builder into ``home/datasets/NAME/default/0.0.0/HASH/``; a hub download
    writes the same under ``ORG___NAME``, the folder that ``load_dataset(repo)`` reads when offline.
    """
    import datasets

    org, name = repo.split("/")
    folder = home / "repo" / name
    (folder / "data").mkdir(parents=True)
    for split, texts in splits.items():
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    cache = home / "datasets"
    datasets.load_dataset_builder(str(folder), cache_dir=str(cache)).download_and_prepare()
    (cache / name).rename(cache / f"{org}___{name}")


def test_hub_dataset_from_the_local_cache(tmp_path, gpt2_tok):
    """data.source ORG/NAME read offline from the `datasets` cache: its documents become the packed blocks,
    its validation split the eval blocks (or eval_fraction of its training split), and a dataset or split
    that is not there is one line naming the key."""
    home = tmp_path / "hf-home"
    cache_hub_dataset(home, "acme/tiny-corpus", {"train": HUB_TRAIN, "validation": HUB_VALIDATION})
    cache_dir = str(tmp_path / "packed")
    cases = {"eval_split": dict(source="acme/tiny-corpus", eval_split="validation", cache_dir=cache_dir),
             "held_out": dict(source="acme/tiny-corpus", eval_fraction=0.25, cache_dir=cache_dir),
             "missing": dict(source="acme/no-such-corpus", cache_dir=cache_dir),
             "bad_split": dict(source="acme/tiny-corpus", eval_split="test", cache_dir=cache_dir)}
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_CACHE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", HUB_LOADER, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    eos = gpt2_tok.eos_token_id

    def stream(texts):
        return [t for text in texts for t in gpt2_tok(text)["input_ids"] + [eos]]

    def documents(blocks):  # the whole documents (the last block ends mid-document or at its EOS)
        return gpt2_tok.decode([t for b in blocks for t in b]).split(gpt2_tok.eos_token)[:-1]

    train, evals = out["eval_split"]["train"], out["eval_split"]["eval"]
    flat = [t for b in train for t in b]
    assert flat == stream(HUB_TRAIN)[:len(flat)] and len(flat) > len(stream(HUB_TRAIN)) - 8  # lossless, in order
    assert [t for b in evals for t in b] == stream(HUB_VALIDATION)[:8 * len(evals)] and evals

    train, evals = documents(out["held_out"]["train"]), documents(out["held_out"]["eval"])
    assert set(train) | set(evals) <= set(HUB_TRAIN)   # whole documents, all from the training split
    assert not set(train) & set(evals) and 8 <= len(evals) <= 10  # 25% of 40, less a cut-off last one

    missing = out["missing"]
    assert missing["key"] == "data.source" and "'acme/no-such-corpus'" in missing["error"], missing
    assert out["bad_split"]["key"] == "data.eval_split" and "'test'" in out["bad_split"]["error"], out["bad_split"]
    assert "'train', 'validation'" in out["bad_split"]["error"]
    assert all("\n" not in out[case]["error"] for case in ("missing", "bad_split"))
