"""``train.float8`` against bf16 over 50 steps of real training: the loss with the blocks' linear layers in float8
(torchao) within 1% of the bf16 run's (issue 30's criterion), on this CPU (torchao's CPU path; the speed belongs to a
Hopper GPU: bench/gpu_mfu.py's "float8" lever).

Two launches of launch/train.py (2 processes: 2 pipeline stages, ZeRO-1, bf16) from the same seed on the built-in
data: a llama of 4 blocks at width 256 (MLP 688, 4 heads, 2 key/value heads, vocabulary from the GPT-2 tokenizer),
seq 128, micro-batch 4 x 2, AdamW at 1e-3. Per step: the relative loss difference; reported: the largest, and the
mean over the last 10 steps. Goal: every step within 1%.

Usage: ``PYTHONPATH=.float8 python bench/float8_loss.py [--steps 50]`` (the Makefile's torchao, kept out of .venv);
writes bench/results/float8_loss.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import launch, write_result  # noqa: E402

GOAL = 0.01


def config(steps: int, float8: bool, folder: Path) -> dict:
    return {"model": {"name": "llama-tiny", "vocab_from_tokenizer": True, "overrides": {
                "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 2}},
            "data": {"seq_len": 128, "cache_dir": str(folder / "data")}, "pipeline": {"stages": 2},
            "train": {"max_steps": steps, "seed": 1234, "save_dir": str(folder / ("float8" if float8 else "bf16")),
                      "eval_interval": 0, "float8": float8},
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
            "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    losses, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for float8 in (False, True):
            name = "float8" if float8 else "bf16"
            path = folder / f"{name}.json"
            path.write_text(json.dumps(config(args.steps, float8, folder)))
            seconds[name] = launch(2, "launch/train.py", ["--config", str(path)], folder / f"{name}.log")
            losses[name] = json.loads((folder / name / "summary.json").read_text())["losses"]
    relative = [abs(a - b) / b for a, b in zip(losses["float8"], losses["bf16"])]
    tail = relative[-10:]
    result = {"steps": args.steps, "losses_bf16": losses["bf16"], "losses_float8": losses["float8"],
              "relative_diff": relative, "max_relative_diff": max(relative), "last10_mean_relative_diff":
              sum(tail) / len(tail), "goal": f"every step within {GOAL:.0%}", "goal_met": max(relative) <= GOAL,
              "launch_seconds": seconds}
    print(f"{args.steps} steps, bf16 {losses['bf16'][0]:.3f} -> {losses['bf16'][-1]:.3f}, float8 "
          f"{losses['float8'][0]:.3f} -> {losses['float8'][-1]:.3f}; relative difference at most "
          f"{result['max_relative_diff']:.2%}, last 10 steps {result['last10_mean_relative_diff']:.2%} "
          f"({'met' if result['goal_met'] else 'MISSED'}: {result['goal']})")
    print(f"wrote {write_result('float8_loss', result)}")


if __name__ == "__main__":
    main()
