"""Multi-process test worker: a few DeepSpeed pipeline steps on fixed batches; results go to --out.

Run by tests through the ``deepspeed`` launcher, exactly as a user runs training. Writes
``losses.json`` (rank 0: the eval loss of the first batch, then the loss of every step) and
``params-rank{R}.pt`` (this rank's parameters by Hugging Face name, the global gradient norm of every step and
the most gradient bytes the rank held after any micro-batch's backward pass, ``seam.instruments.gradient_tensors``).
"""

import argparse
import json
from pathlib import Path

import torch

from hybrid_ds.seam.instruments import gradient_tensors, storage_bytes, wrap_pipeline_instructions
from hybrid_ds.config import load_config
from hybrid_ds.runtime.engine import build_pipeline_engine, data_parallel, init_distributed
from hybrid_ds.runtime.plan import build_plan


def record_gradient_bytes(engine) -> list[int]:
    """Append to the returned list the gradient bytes this rank holds after each pass that adds gradients."""
    held = []

    def wrap(kind, fn):
        if kind.__name__ not in ("BackwardPass", "WeightPass"):  # WeightPass: pipeline.schedule zb-h1
            return fn

        def backward_then_measure(engine, *args, **kwargs):
            out = fn(engine, *args, **kwargs)
            found = gradient_tensors(engine)
            held.append(storage_bytes([t for kind in ("param.grad", "partition", "buckets")
                                                      for t in found.get(kind, [])]))
            return out
        return backward_then_measure

    wrap_pipeline_instructions(engine, wrap)
    return held


def micro_batches(batches, step, grad_accum, dp, dp_rank):
    """Step ``step``'s micro-batches for one data-parallel rank, in DeepSpeed's (inputs, labels) form."""
    for j in range(grad_accum):
        b = batches[(step * grad_accum + j) * dp + dp_rank]
        inputs = (b["input_ids"], b["attention_mask"]) + ((b["token_type_ids"],) if "token_type_ids" in b else ())
        yield inputs, b["labels"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--zero-as-configured", action="store_true",
                        help="keep the config's ZeRO stage where hybrid_ds would run another (the reference)")
    parser.add_argument("--break-schedule", choices=["skip-w", "repeat-w"],
                        help="pipeline.schedule zb-h1 with micro-batch 1's W left out or run twice (a negative control)")
    parser.add_argument("--swap-shards", action="store_true",
                        help="pipeline.sequence_parallel: the last stage's sp ranks swapped, so that each receives the "
                             "other's shard (a negative control)")
    args = parser.parse_args()
    if args.swap_shards:
        import hybrid_ds.runtime.pipeline as pipeline

        groups = pipeline.sequence_groups
        pipeline.sequence_groups = lambda topology, sp: [
            ranks[::-1] if topology.get_coord(ranks[0]).pipe == topology.get_dim("pipe") - 1 else ranks
            for ranks in groups(topology, sp)]
    if args.zero_as_configured:
        import hybrid_ds.config.deepspeed

        hybrid_ds.config.deepspeed.zero_stage_to_run = lambda requested, *_: requested

    world = init_distributed()
    plan = build_plan(load_config(args.config), world)
    engine = build_pipeline_engine(plan)
    if args.break_schedule:
        program = list(engine._zb_program)
        at = program.index(("weight", 1))
        program[at:at + 1] = [] if args.break_schedule == "skip-w" else [("weight", 1)] * 2
        engine._zb_program = program
    from deepspeed.runtime.pipe.schedule import ReduceGrads
    reduce_grads = engine._INSTRUCTION_MAP[ReduceGrads].__name__  # before record_gradient_bytes wraps the map
    batches = torch.load(args.batches)
    gas, dp = plan.layout.grad_accum, plan.layout.dp
    dp_rank = data_parallel(engine, plan.layout.sp)[0]  # the replica: its sequence-parallel ranks share its batches
    losses = [engine.eval_batch(micro_batches(batches, 0, gas, dp, dp_rank)).item()]
    held = record_gradient_bytes(engine)
    norms = []
    for step in range(args.steps):
        losses.append(engine.train_batch(micro_batches(batches, step, gas, dp, dp_rank)).item())
        norm = engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))

    out = Path(args.out)
    rank = torch.distributed.get_rank()
    params = {f"{path}.{name}": p.detach().clone()
              for path, module in engine.module.builder.built_modules().items()
              for name, p in module.named_parameters()}
    params.update({path: p.detach().clone() for path, p in engine.module.builder.built_parameters().items()})
    torch.save({"stage": engine.stage_id, "dp_rank": dp_rank, "engine": type(engine).__name__, "params": params, "norms": norms,
                "grad_bytes": max(held), "offload": bool(getattr(engine.optimizer, "cpu_offload", False)),
                "optimizer": type(engine.optimizer).__name__, "reduce_grads": reduce_grads},
               out / f"params-rank{rank}.pt")
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
