"""Multi-process test worker: load a run's latest checkpoint into its engine, save the logits of a batch.

ZeRO 0/1 runs load into a PipelineEngine and save the last stage's logits (``--initial``: ``{"initial": ...,
"trained": ...}`` as below). ZeRO-2/3 runs load into the
plain engine (the HF model on DeepSpeed's ordinary engine) and save ``{"initial": ..., "trained": ...}``:
the logits of the engine as built (the run's own seeded random init), then after loading the checkpoint.
"""

import argparse
from pathlib import Path

import torch

from hybrid_ds.runtime import checkpoint
from hybrid_ds.config import load_config
from hybrid_ds.runtime.engine import build_pipeline_engine, build_plain_engine, device, init_distributed
from hybrid_ds.models.head_loss import materialize
from hybrid_ds.runtime.train import prepare


def pipeline_logits(plan, ids, initial=False):
    engine = build_pipeline_engine(plan)

    def forward():
        # One micro-batch of the configured size: DeepSpeed returns the logits of the last micro-batch only.
        micro = [((ids, torch.ones_like(ids)), ids)]
        _, logits = engine.eval_batch(iter(micro), return_logits=True, num_micro_batches=1)
        logits = logits[0] if isinstance(logits, tuple) else logits  # (logits, router loss) of a MoE model
        with torch.no_grad():
            return materialize(logits)  # the head returns HeadLogits, computed here

    before = forward() if initial else None
    checkpoint.resume(engine, checkpoint.latest_checkpoint(Path(plan.config.train.save_dir)))
    result = {"initial": before, "trained": forward()} if initial else forward()
    return result if engine.is_last_stage() and engine.grid.get_data_parallel_rank() == 0 else None


def plain_logits(plan, ids):
    engine = build_plain_engine(plan)

    def forward():  # every rank runs it: ZeRO-3 gathers each layer's parameters from all ranks
        engine.engine.eval()
        with torch.no_grad():
            return engine.engine(input_ids=ids.to(device())).logits.float().cpu()

    initial = forward()
    checkpoint.resume(engine, checkpoint.latest_checkpoint(Path(plan.config.train.save_dir)))
    result = {"initial": initial, "trained": forward()}
    return result if torch.distributed.get_rank() == 0 else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--initial", action="store_true", help="pipeline: also the logits before loading")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    world = init_distributed()
    plan, _ = prepare(load_config(args.config), world)
    ids = torch.load(args.batch)
    result = pipeline_logits(plan, ids, args.initial) if plan.config.pipeline_engine else plain_logits(plan, ids)
    if result is not None:
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
