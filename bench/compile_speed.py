"""Benchmark: ``train.compile`` (each block compiled by torch.compile, CPU inductor) against eager, step time.

One process, one thread, two pipeline engines at ``stages=1`` built from the same config and seed (so the
same weights), one with ``train.compile: true``; each engine's first step is timed on its own, and the
compiled one's compile seconds (``hybrid_ds.runtime.compile_blocks.clock``) are reported apart from it. Then
steps alternate (A B, B A, ...) on the same micro-batches, as bench/overhead.py takes them (dropout off,
so that both must give the same losses), and the medians of the steps no other process disturbed give the ratio compiled / eager (below 1: compile helps).
Inductor's on-disk cache starts empty (a temporary ``TORCHINDUCTOR_CACHE_DIR``) unless ``--warm-cache``,
so the compile time is what a first run pays.

    python bench/compile_speed.py [--models gpt2,llama-100m] [--seq-len 128] [--grad-accum 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLEAN_CORES, bench_config, single_process_env, wait_for_quiet, write_result  # noqa: E402
from overhead import build_ours, folded, ours_step, summarize, timed_step  # noqa: E402


NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # GPT-2's; llama has none by default


def measure_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from hybrid_ds.runtime.compile_blocks import clock
    from hybrid_ds.config import load_config_dict
    from hybrid_ds.data import load_data

    raw = bench_config(model, args.seq_len, args.micro_batch, args.grad_accum)
    if raw["model"]["name"].startswith("gpt2"):  # dropout off: inductor draws other random numbers than eager
        raw["model"]["overrides"] = {**raw["model"].get("overrides", {}), **NO_DROPOUT}
    eager_cfg = load_config_dict(raw)
    data = load_data(eager_cfg.data, "causal_lm")
    # "ours" is the compiled engine and "baseline" the eager one, in overhead.py's pair records.
    engines = {"baseline": build_ours(eager_cfg)[0]}
    engines["ours"], plan = build_ours(eager_cfg.replace(train={"compile": True}))
    vocab = plan.resolved.hf_config.vocab_size
    batches = {name: folded(data.train_batches(args.micro_batch, 0, 1, eager_cfg.train.seed), vocab)
               for name in engines}
    first = {name: timed_step(engines[name], ours_step, batches[name], args.grad_accum, 0)
             for name in ("baseline", "ours")}
    blocks, graphs, compile_s = clock().take()
    pairs: list[dict[str, Any]] = []
    deadline = time.perf_counter() + args.budget_s
    while len(pairs) < args.warmup or (sum(p["clean"] for p in pairs[args.warmup:]) < args.steps
                                       and len(pairs) < args.warmup + 3 * args.steps
                                       and time.perf_counter() < deadline):
        waited = wait_for_quiet(CLEAN_CORES, args.quiet_wait) if pairs and not pairs[-1]["clean"] else 0.0
        order = ("ours", "baseline") if len(pairs) % 2 == 0 else ("baseline", "ours")
        pair = {name: timed_step(engines[name], ours_step, batches[name], args.grad_accum, len(pairs) + 1)
                for name in order}
        pair["clean"] = all(pair[name]["foreign_cores"] < CLEAN_CORES for name in order)
        pair["waited_s"] = waited
        pairs.append(pair)
    recompiled = clock().take()[1]
    stats = summarize(pairs[args.warmup:])
    result = {
        "model": model, "params": plan.total_params, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "threads": torch.get_num_threads(), "warmup_pairs": args.warmup,
        "blocks": blocks, "graphs": graphs, "graphs_after_first_step": recompiled, "compile_s": compile_s,
        "first_step_compiled_s": first["ours"]["s"], "first_step_eager_s": first["baseline"]["s"],
        "first_loss_diff": abs(first["ours"]["loss"] - first["baseline"]["loss"]),
        "max_loss_diff": max(abs(p["ours"]["loss"] - p["baseline"]["loss"]) for p in pairs),
        "compiled_median_s": stats.pop("ours_median_s"), "eager_median_s": stats.pop("baseline_median_s"),
        **stats,
        "pairs": [{"compiled_s": p["ours"]["s"], "eager_s": p["baseline"]["s"], "clean": p["clean"]} for p in pairs],
    }
    del engines
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama-100m")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="clean measured pairs per model, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="pairs after the first steps, not counted")
    parser.add_argument("--quiet-wait", type=float, default=10.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--budget-s", type=float, default=90.0, help="stop adding pairs after this long (per model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (default: empty)")
    parser.add_argument("--out", default="compile_speed")
    args = parser.parse_args(argv)

    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    single_process_env()
    import torch

    from hybrid_ds.runtime.engine import init_distributed

    init_distributed()
    torch.set_num_threads(args.threads)
    results = [measure_model(model, args) for model in args.models.split(",")]
    for r in results:
        print(f"{r['model']:>11}: compiled {r['compiled_median_s']:.3f} s  eager {r['eager_median_s']:.3f} s  "
              f"ratio {r['ratio']:.3f} (pairs {', '.join(f'{x:.3f}' for x in r['pair_ratios'])}; clean/disturbed "
              f"{r['clean_pairs']}/{r['disturbed_pairs']})  compile {r['compile_s']:.1f} s for {r['blocks']} blocks "
              f"in {r['graphs']} graph(s) (first step {r['first_step_compiled_s']:.1f} s against "
              f"{r['first_step_eager_s']:.1f} s eager)  loss diff {r['first_loss_diff']:.1e} first, "
              f"{r['max_loss_diff']:.1e} max", flush=True)
    out = {"torch": torch.__version__, "results": results}
    write_result(args.out, out)
    return out


if __name__ == "__main__":
    main()
