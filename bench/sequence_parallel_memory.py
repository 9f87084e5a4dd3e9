"""Activation bytes per rank under Ulysses sequence parallelism (hybrid_ds.models.sequence_parallel) against one
rank holding the whole sequence, at 2k, 8k and 32k tokens (document masks up to 8k: their dense mask at 32k would
not fit here), on CPU.

One launch of 2 ranks (``deepspeed --num_gpus 2``). For each length: the pipeline's stages of llama-tiny (hidden 64,
4 heads, 2 key/value heads, 4 blocks, fp32, micro-batch 1, the fused loss), built as a one-stage pipeline, run
forward and loss on the whole sequence (sp=1) and on each rank's half (sp=2), under
``torch.autograd.graph.saved_tensors_hooks``: the bytes of the distinct storages saved for backward, parameters
excluded (what tests/test_estimate.py and bench/estimator_accuracy.py measure for the estimator). Goals (issue 29):
each rank's bytes within 10% of 1/sp of sp=1's; the estimator's activation bytes (hybrid_ds.estimate, runtime
"cpu") within 5% of the measured ones at sp=1 and sp=2.

Usage: ``python bench/sequence_parallel_memory.py [--lengths 2048 8192 32768]``; prints a table and writes
bench/results/sequence_parallel_memory.json. ``--worker`` is the launcher's entry point.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import launch, write_result  # noqa: E402

DOCUMENTS_UP_TO = 8192


def saved_bytes(pipe, inputs, labels) -> int:
    """Bytes of the distinct storages autograd saves in forward and loss, parameters excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for m in pipe.modules() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pipe.loss_fn(pipe.forward(inputs), labels)
    del loss
    return sum(seen.values())


def estimated_bytes(length: int, documents: bool, sp: int) -> float:
    """The estimator's activation bytes per rank for the same run: one stage, fp32, micro-batch 1, CPU kernels."""
    from hybrid_ds.estimate.run import run_from_config
    from hybrid_ds.estimate.stages import stage_estimates
    from hybrid_ds.models.shape import model_arch

    cfg = run_config(length, documents, sp)
    return stage_estimates(run_from_config(cfg, sp, model_arch(cfg.model)), "cpu", 0.0)[0].activations


def run_config(length: int, documents: bool, sp: int = 1):
    from hybrid_ds.config import load_config_dict

    return load_config_dict({"model": {"name": "llama-tiny", "overrides": {"max_position_embeddings": length}},
                             "data": {"seq_len": length, "document_mask": documents},
                             "pipeline": {"sequence_parallel": sp}, "train_micro_batch_size_per_gpu": 1})


def worker(out: Path, lengths: list[int]) -> None:
    import torch
    import torch.distributed as dist

    from hybrid_ds.runtime.engine import init_distributed
    from hybrid_ds.runtime.pipeline import SequentialStages, world_shard
    from hybrid_ds.runtime.plan import build_plan

    init_distributed()  # hybrid_ds's: gloo on CPU, without compiling DeepSpeed's shm op
    torch.set_num_threads(1)
    shard = world_shard()
    rows = []
    for length in lengths:
        for documents in (False, True) if length <= DOCUMENTS_UP_TO else (False,):
            plan = build_plan(run_config(length, documents), world_size=1)
            ids = torch.randint(0, plan.resolved.hf_config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(ids)
            if documents:  # documents of 1,000 tokens
                mask = torch.arange(length).div(1000, rounding_mode="floor").add(1).unsqueeze(0)
            whole = saved_bytes(SequentialStages(plan), (ids, mask), ids)
            sharded = saved_bytes(SequentialStages(plan, sequence=shard), (ids, mask), ids)
            rows.append({"seq_len": length, "documents": documents, "sp1_bytes": whole, "sp2_bytes": sharded})
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.out), args.lengths)
        return
    with tempfile.TemporaryDirectory() as tmp:
        launch(2, "bench/sequence_parallel_memory.py",
               ["--worker", "--out", tmp, "--lengths", *map(str, args.lengths)], Path(tmp) / "log.txt",
               env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout_s=3600)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
    rows = []
    print("saved-for-backward bytes per rank, llama-tiny (hidden 64), MiB: sp=1 | sp=2 per rank (ratio to sp=1's) "
          "| the estimator's at sp=1, sp=2 (error)")
    for r0, r1 in zip(*ranks):
        row = {**r0, "sp2_bytes": [r0["sp2_bytes"], r1["sp2_bytes"]]}
        row["ratio"] = max(row["sp2_bytes"]) / row["sp1_bytes"]
        row["within_goal"] = row["ratio"] <= 0.5 * 1.1
        row["estimated_bytes"] = [estimated_bytes(row["seq_len"], row["documents"], sp) for sp in (1, 2)]
        row["estimate_error"] = [e / m - 1 for e, m in zip(row["estimated_bytes"],
                                                              (row["sp1_bytes"], max(row["sp2_bytes"])))]
        row["estimate_within_goal"] = max(map(abs, row["estimate_error"])) <= 0.05
        rows.append(row)
        print(f"{row['seq_len']:>6} {'documents' if row['documents'] else 'causal':>9}: {row['sp1_bytes'] / 2**20:8.1f} | "
              + ", ".join(f"{b / 2**20:.1f}" for b in row["sp2_bytes"]) + f" ({row['ratio']:.3f}; goal <= 0.55: "
              f"{'met' if row['within_goal'] else 'MISSED'}) | "
              + ", ".join(f"{e / 2**20:.1f}" for e in row["estimated_bytes"])
              + f" ({', '.join(f'{x:+.1%}' for x in row['estimate_error'])}; goal 5%: "
              f"{'met' if row['estimate_within_goal'] else 'MISSED'})")
    print(f"wrote {write_result('sequence_parallel_memory', {'model': 'llama-tiny', 'rows': rows})}")


if __name__ == "__main__":
    main()
