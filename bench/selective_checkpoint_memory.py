"""Peak memory of a forward and backward pass with ``train.selective_checkpoint`` (each block's attention or MLP
recomputed in backward) against none, and the estimator's prediction of the saving.

One process on CPU, as bench/tiled_mlp_memory.py (whose measurement this reuses): llama-tiny's stages at the preset's
widths (hidden 64, MLP 176, 4 heads, 2 key/value heads, 4 blocks), fp32, micro-batch 1, the fused loss, one stage.
For each length and part: the peak of live tensor bytes from the start of the forward to the end of the backward, the
seconds of that pass (median of ``--repeat``), and the estimator's activation bytes (hybrid_ds.estimate, runtime
"cpu") with and without the part. The estimator's saving is every block's part no longer kept, less the one block's
part that exists again while its backward recomputes it (counted on top of the peak); the measured one is where the
peak really falls. Goal: the estimator's saving within 10% of the measured one.
The loss and gradients are held bit for bit to the ones without by tests/test_selective_checkpoint.py.

Usage: ``python bench/selective_checkpoint_memory.py [--lengths 2048 8192]``; prints a table and writes
bench/results/selective_checkpoint_memory.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402
from tiled_mlp_memory import measure, run_config  # noqa: E402

GOAL = 0.10


def estimated_activations(length: int, part: str | None) -> float:
    from hybrid_ds.estimate.run import run_from_config
    from hybrid_ds.estimate.stages import stage_estimates
    from hybrid_ds.models.shape import model_arch

    cfg = run_config(length, {"selective_checkpoint": part}, intermediate=None)
    return stage_estimates(run_from_config(cfg, 1, model_arch(cfg.model)), "cpu", 0.0)[0].activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = []
    print("llama-tiny (hidden 64, MLP 176, 4 blocks), fp32: peak live bytes of forward + backward")
    for length in args.lengths:
        base = measure(length, 0, args.repeat, intermediate=None)
        base_estimate = estimated_activations(length, None)
        rows.append({**base, "part": None, "estimated_activations": base_estimate})
        print(f"{length:>6} none:      {base['peak_bytes'] / 2**20:8.1f} MiB, {base['seconds']:.2f} s")
        for part in ("attention", "mlp"):
            row = measure(length, 0, args.repeat, {"selective_checkpoint": part}, intermediate=None)
            estimate = estimated_activations(length, part)
            row.update(part=part, estimated_activations=estimate, peak_ratio=row["peak_bytes"] / base["peak_bytes"],
                       time_ratio=row["seconds"] / base["seconds"],
                       measured_saving=base["peak_bytes"] - row["peak_bytes"], estimated_saving=base_estimate - estimate)
            row["saving_error"] = row["estimated_saving"] / row["measured_saving"] - 1
            row["goal_met"] = abs(row["saving_error"]) <= GOAL
            rows.append(row)
            print(f"{length:>6} {part + ':':<10} {row['peak_bytes'] / 2**20:8.1f} MiB ({row['peak_ratio']:.2f}x), "
                  f"{row['seconds']:.2f} s ({row['time_ratio']:.2f}x); saving {row['measured_saving'] / 2**20:.1f} MiB, "
                  f"estimated {row['estimated_saving'] / 2**20:.1f} MiB ({row['saving_error']:+.1%})")
    result = {"model": "llama-tiny", "goal": f"estimated saving within {GOAL:.0%} of the measured", "rows": rows}
    print(f"wrote {write_result('selective_checkpoint_memory', result)}")


if __name__ == "__main__":
    main()
