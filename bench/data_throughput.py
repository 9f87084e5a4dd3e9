"""Benchmark: tokenize + pack the built-in corpus vs a plain tokenizer loop over the same text.

Prints tokens/s of both, their ratio (target >= 0.8), and the time to reload the packed corpus from
the cache (target < 2 s). Both are measured side by side in this one run; results also go to
bench/results/data_throughput.json.

    python bench/data_throughput.py [--seq-len 1024] [--repeats 3]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from hybrid_ds.config import DataConfig
from hybrid_ds.data import load_data
from hybrid_ds.data.packing import load_tokenizer, pack
from hybrid_ds.data.sources import load_documents


def plain_loop(tokenizer, texts, batch_size=1000) -> int:
    tokens = 0
    for i in range(0, len(texts), batch_size):
        tokens += sum(len(ids) for ids in tokenizer(texts[i:i + batch_size], add_special_tokens=False)["input_ids"])
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(None, "causal_lm")
    train, _ = load_documents(DataConfig())
    texts = train["text"]
    plain, ours = [], []
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
        start = time.perf_counter()
        n_tokens = plain_loop(tokenizer, texts)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        blocks = pack(train, tokenizer, args.seq_len, "causal_lm")
        ours.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as cache:
        cfg = DataConfig(seq_len=args.seq_len, cache_dir=cache)
        load_data(cfg, "causal_lm")
        start = time.perf_counter()
        reloaded = load_data(cfg, "causal_lm")
        reload_s = time.perf_counter() - start
    result = {
        "documents": len(texts), "tokens": n_tokens, "blocks": len(blocks), "seq_len": args.seq_len,
        "plain_tokens_per_s": n_tokens / min(plain), "pack_tokens_per_s": n_tokens / min(ours),
        "ratio": min(plain) / min(ours), "cached_reload_s": reload_s, "reloaded_blocks": len(reloaded.train),
    }
    print(f"plain tokenizer loop : {result['plain_tokens_per_s']:>12,.0f} tokens/s")
    print(f"tokenize + pack      : {result['pack_tokens_per_s']:>12,.0f} tokens/s")
    print(f"ratio                : {result['ratio']:.2f} (target >= 0.8)")
    print(f"cached reload        : {reload_s:.2f} s (target < 2 s) for {len(reloaded.train)} blocks of {args.seq_len}")
    out = Path(__file__).parent / "results" / "data_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
