"""Benchmark: the default config (configs/gpt.json on CPU, as ``make train`` runs it) from launch to first step,
and its hardware efficiency.

One launch of ``deepspeed --num_gpus 2 bench/train_worker.py --config configs/gpt.json`` (CPU accelerator,
its ``on_cpu`` section: GPT-2 small, 2 stages, micro-batch 2 x 4, seq_len 128, ZeRO-1, fp32, one thread
per rank as ``init_distributed`` sets it). The worker follows ``hybrid_ds.runtime.train.run`` (no checkpoints or
evaluation) and stamps each start-up phase; then it takes steady-state steps, and at the end every rank
measures a 1-thread fp32 GEMM at the same time.

* start-up: seconds from launch to the end of the first step, split into phases (launcher, imports,
  process group, data from the cache, plan on the meta device, stage modules, ``deepspeed.initialize``,
  first step);
* hardware efficiency: model FLOP/s (``common.training_flops_per_token`` x tokens/s) over the sum of the
  ranks' concurrent GEMM rates (the machine's matmul peak as the ranks see it).

``--cli`` also times the real command (``deepspeed launch/train.py --config configs/gpt.json``, one step,
no checkpoint, no evaluation) from launch to exit.

    python bench/default_config.py [--steps 3] [--cli]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import launch, matmul_peak, median, steady, training_flops_per_token, write_result  # noqa: E402

CONFIG = "configs/gpt.json"
PHASES = [  # (name, what it covers); each ends at the worker's stamp of the same name
    ("interpreter", "deepspeed launcher up, ranks spawned, Python started"),
    ("imports", "import torch, deepspeed, transformers, hybrid_ds"),
    ("process_group", "init_distributed (gloo)"),
    ("data", "tokenizer + packed data from the cache"),
    ("engine", "plan, stage modules, deepspeed.initialize"),
    ("first_step", "first train_batch"),
]


def phase_table(phases_at: dict[str, float]) -> list[dict[str, Any]]:
    """Durations of the phases from their end stamps (seconds since launch).

    >>> phase_table({"interpreter": 5, "imports": 9, "process_group": 9.5, "data": 11, "engine": 20,
    ...              "first_step": 30})[4]
    {'phase': 'engine', 'covers': 'plan, stage modules, deepspeed.initialize', 's': 9, 'share': 0.3}
    """
    rows, before = [], 0.0
    total = phases_at["first_step"]
    for name, covers in PHASES:
        seconds = phases_at[name] - before
        rows.append({"phase": name, "covers": covers, "s": round(seconds, 3), "share": round(seconds / total, 3)})
        before = phases_at[name]
    return rows


def efficiency(result: dict[str, Any], warmup: int) -> dict[str, Any]:
    times, clean = steady(result, warmup)
    tokens_per_s = result["tokens_per_step"] / median(times)
    per_token = training_flops_per_token(result["matmul_params"], result["layers"], result["hidden"],
                                         result["seq_len"])
    achieved = tokens_per_s * per_token
    peak = sum(result["gemm_flops_per_rank"])
    return {"tokens_per_s": tokens_per_s, "step_s": median(times), "clean_steps": clean,
            "steady_steps": len(result["steps"]) - 1 - warmup, "flops_per_token": per_token, "achieved_flops": achieved,
            "peak_flops": peak, "efficiency": achieved / peak}


def time_cli(folder: Path) -> float:
    """Launch to exit of the real training command for one step (no checkpoint, no evaluation)."""
    sets = ["train.max_steps=1", "train.save_dir=null", "train.eval_interval=0"]
    return launch(2, "launch/train.py", ["--config", CONFIG, *sum((["--set", s] for s in sets), [])],
                  folder / "cli.log")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="clean steady-state steps wanted")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=90.0, help="stop measuring steps after this long")
    parser.add_argument("--cli", action="store_true", help="also time the real training command")
    parser.add_argument("--out", default="default_config")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        out = folder / "worker.json"
        worker_args = ["--config", CONFIG, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--budget-s", str(args.budget_s), "--gemm", "--out", str(out)]
        launch_s = launch(2, "bench/train_worker.py", worker_args, folder / "worker.log")
        run = json.loads(out.read_text())
        gemm_2_threads = matmul_peak(2)   # the same machine from one process, for reference
        cli_s = time_cli(folder) if args.cli else None
    phases = phase_table(run["phases_at_s"])
    result = {
        "config": CONFIG, "layout": f"stages={run['stages']} x dp={run['dp']}, micro {run['micro_batch']} x "
                                    f"{run['grad_accum']}, seq_len {run['seq_len']}, {run['threads']} thread(s)/rank",
        "launch_to_first_step_s": run["phases_at_s"]["first_step"], "phases": phases,
        "dominant_phase": max(phases, key=lambda row: row["s"])["phase"], "calls_s": run["calls_s"],
        "launch_to_exit_s": launch_s, "cli_one_step_launch_to_exit_s": cli_s,
        **efficiency(run, args.warmup), "gemm_2_threads_one_process": gemm_2_threads, "run": run,
    }
    split = ", ".join(f"{row['phase']} {row['s']:.1f}" for row in phases)
    calls = ", ".join(f"{name} {s:.1f}" for name, s in run["calls_s"].items())
    print(f"launch -> first step: {result['launch_to_first_step_s']:.1f} s ({split}); within engine: {calls}")
    print(f"efficiency: {result['tokens_per_s']:.0f} tokens/s x {result['flops_per_token'] / 1e6:.0f} MFLOP/token = "
          f"{result['achieved_flops'] / 1e9:.1f} GFLOP/s of {result['peak_flops'] / 1e9:.1f} GFLOP/s GEMM peak "
          f"(2 ranks x 1 thread) = {result['efficiency']:.1%}")
    if cli_s:
        print(f"real command, 1 step, launch -> exit: {cli_s:.1f} s")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
