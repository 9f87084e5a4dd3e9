"""Peak memory of a forward and backward pass with and without ``train.tiled_mlp`` (DeepSpeed's TiledMLP runs each
block's MLP a tile of the sequence at a time), for sequences where the MLP's intermediate activations dominate.

One process on CPU: llama-tiny's stages (hidden 64, 4 blocks) with a wide MLP (intermediate 2,048: 32x the hidden
size, as the MLP dominates a long sequence's activations when the sequence is far longer than the hidden size is
wide), fp32, micro-batch 1, the fused loss, built as a one-stage pipeline (SequentialStages). For each length and
tile count: the peak of live tensor bytes from the start of the forward to the end of the backward (torch's profiler,
``profile_memory``: every allocation and free, parameters excluded as they were allocated before), and the seconds
of that pass (median of ``--repeat``). The loss and gradients are held to the untiled ones by tests/test_tiled_mlp.py.

Usage: ``python bench/tiled_mlp_memory.py [--lengths 4096 16384] [--tiles 4 16]``; prints a table and writes
bench/results/tiled_mlp_memory.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

INTERMEDIATE = 2048


def run_config(length: int, train: dict, intermediate: int | None = INTERMEDIATE):
    """llama-tiny at ``length`` tokens (its MLP ``intermediate`` wide; None: the preset's), fp32, micro-batch 1."""
    from hybrid_ds.config import load_config_dict

    overrides = {"max_position_embeddings": length, **({"intermediate_size": intermediate} if intermediate else {})}
    return load_config_dict({"model": {"name": "llama-tiny", "overrides": overrides}, "data": {"seq_len": length},
                             "train": train, "train_micro_batch_size_per_gpu": 1})


def measure(length: int, tiles: int, repeat: int, train: dict | None = None,
            intermediate: int | None = INTERMEDIATE) -> dict:
    """Peak live bytes of a forward + backward and its median seconds, with ``tiles`` (and the ``train`` keys)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hybrid_ds.runtime.pipeline import SequentialStages
    from hybrid_ds.runtime.plan import build_plan

    torch.manual_seed(0)
    pipe = SequentialStages(build_plan(run_config(length, {"tiled_mlp": tiles, **(train or {})}, intermediate),
                                       world_size=1))
    ids = torch.randint(0, pipe.plan.resolved.hf_config.vocab_size, (1, length))
    inputs, labels = (ids, torch.ones_like(ids)), ids

    def step() -> None:
        loss = pipe.loss_fn(pipe.forward(inputs), labels)
        loss.backward()
        for module in pipe.modules():
            module.zero_grad(set_to_none=True)

    step()  # first call: lazy allocations outside the measurement
    seconds = []
    for _ in range(repeat):
        tick = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - tick)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return {"seq_len": length, "tiles": tiles, "peak_bytes": peak, "seconds": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--tiles", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = []
    print(f"llama-tiny, hidden 64, intermediate {INTERMEDIATE}, 4 blocks, fp32: peak live bytes of forward + backward")
    for length in args.lengths:
        base = measure(length, 0, args.repeat)
        rows.append(base)
        print(f"{length:>6} untiled: {base['peak_bytes'] / 2**20:8.1f} MiB, {base['seconds']:.2f} s")
        for tiles in args.tiles:
            row = measure(length, tiles, args.repeat)
            row["peak_ratio"] = row["peak_bytes"] / base["peak_bytes"]
            row["time_ratio"] = row["seconds"] / base["seconds"]
            rows.append(row)
            print(f"{length:>6} {tiles:>2} tiles: {row['peak_bytes'] / 2**20:8.1f} MiB ({row['peak_ratio']:.2f}x), "
                  f"{row['seconds']:.2f} s ({row['time_ratio']:.2f}x)")
    print(f"wrote {write_result('tiled_mlp_memory', {'model': 'llama-tiny', 'intermediate_size': INTERMEDIATE, 'rows': rows})}")


if __name__ == "__main__":
    main()
