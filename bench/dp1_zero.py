"""Benchmark: fp32 ZeRO-1 at dp=1 as hybrid_ds now runs it (ZeRO-0, no data-parallel reduction) against DeepSpeed's
ZeRO-1 (its default 5e8-element bucket), pp=1, one process, one thread, GPT-2 small.

Both engines live in one process, built from the same seed (same weights) and stepped alternately (A B B A ...) on
the same micro-batches, so drift on a shared machine hits both alike and their losses must agree (the same
maths). Reported: median step time (wall and this process's CPU seconds: on a shared machine the CPU seconds are
the steadier figure) of each after warm-up, and the median time of the two instructions that differ, ReduceGrads
(ZeRO-1 copies every gradient through its buckets) and OptimizerStep (ZeRO-1 steps a flat fp32 copy and copies
it back into the parameters).

    python bench/dp1_zero.py [--model gpt2] [--seq-len 128] [--grad-accum 2] [--steps 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_config, median, own_cpu_s, single_process_env, write_result  # noqa: E402
from overhead import folded  # noqa: E402


def build(cfg: Any, as_configured: bool) -> tuple[Any, dict[str, list[float]]]:
    """A pipeline engine for ``cfg`` at world size 1 and the per-step seconds of its ReduceGrads and OptimizerStep."""
    import torch

    import hybrid_ds.config.deepspeed
    import hybrid_ds.runtime.plan
    from hybrid_ds.seam.instruments import wrap_pipeline_instructions
    from hybrid_ds.runtime.engine import build_pipeline_engine

    choose = hybrid_ds.config.deepspeed.zero_stage_to_run
    if as_configured:  # DeepSpeed's ZeRO-1 as the config asks, and as hybrid_ds ran it before
        hybrid_ds.config.deepspeed.zero_stage_to_run = lambda requested, *_: requested
    try:
        torch.manual_seed(0)
        engine = build_pipeline_engine(hybrid_ds.runtime.plan.build_plan(cfg, 1))
    finally:
        hybrid_ds.config.deepspeed.zero_stage_to_run = choose
    times: dict[str, list[float]] = defaultdict(list)

    def wrap(kind: type, fn: Any) -> Any:
        if kind.__name__ not in ("ReduceGrads", "OptimizerStep"):
            return fn

        def timed(engine: Any, *args: Any, **kwargs: Any) -> Any:
            tick = time.perf_counter()
            out = fn(engine, *args, **kwargs)
            times[kind.__name__].append(time.perf_counter() - tick)
            return out
        return timed

    wrap_pipeline_instructions(engine, wrap)
    return engine, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    single_process_env()
    import torch

    from hybrid_ds.config import load_config_dict
    from hybrid_ds.data import load_data
    from hybrid_ds.runtime.engine import init_distributed

    init_distributed()
    torch.set_num_threads(1)  # one core stands for one device (PITFALLS: benchmarks on CPU)
    raw = bench_config(args.model, args.seq_len, 1, args.grad_accum)
    new_cfg = load_config_dict(raw)
    raw["zero_optimization"] = {"stage": 1, "reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8)}
    old_cfg = load_config_dict(raw)
    engines = {"zero0": build(new_cfg, False), "zero1": build(old_cfg, True)}
    data = load_data(new_cfg.data, "causal_lm")
    vocab = engines["zero0"][0].module.builder.resolved.hf_config.vocab_size
    batches = {name: folded(data.train_batches(1, 0, 1, 0), vocab) for name in engines}
    steps: dict[str, list[dict[str, float]]] = defaultdict(list)
    order = ["zero0", "zero1"]
    for k in range(args.warmup + args.steps):
        for name in (order if k % 2 == 0 else order[::-1]):
            engine, _ = engines[name]
            torch.manual_seed(k)  # the same dropout masks for both engines
            tick, cpu = time.perf_counter(), own_cpu_s()
            loss = engine.train_batch(data_iter=batches[name]).item()
            steps[name].append({"s": time.perf_counter() - tick, "cpu_s": own_cpu_s() - cpu, "loss": loss})
    result: dict[str, Any] = {"model": args.model, "seq_len": args.seq_len, "grad_accum": args.grad_accum,
                              "threads": torch.get_num_threads(), "warmup_steps": args.warmup,
                              "optimizers": {n: type(e.optimizer).__name__ for n, (e, _) in engines.items()},
                              "max_loss_diff": max(abs(a["loss"] - b["loss"])
                                                   for a, b in zip(steps["zero0"], steps["zero1"])),
                              "steps": steps}
    for name, (_, times) in engines.items():
        result[f"{name}_median_s"] = median([s["s"] for s in steps[name][args.warmup:]])
        result[f"{name}_median_cpu_s"] = median([s["cpu_s"] for s in steps[name][args.warmup:]])
        for kind, seconds in times.items():
            result[f"{name}_{kind}_median_s"] = median(seconds[args.warmup:])
    result["ratio"] = result["zero0_median_s"] / result["zero1_median_s"]
    result["cpu_ratio"] = result["zero0_median_cpu_s"] / result["zero1_median_cpu_s"]
    print({k: v for k, v in result.items() if k != "steps"})
    print(f"wrote {write_result('dp1_zero', result)}")


if __name__ == "__main__":
    main()
