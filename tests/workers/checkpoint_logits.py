"""Multi-process test worker: load a run's latest checkpoint into a PipelineEngine, save logits of a batch."""

import argparse
from pathlib import Path

import torch

from hybrid_ds import checkpoint
from hybrid_ds.config import load_config
from hybrid_ds.engine import build_pipeline_engine, init_distributed
from hybrid_ds.train import prepare


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    world = init_distributed()
    plan, _ = prepare(load_config(args.config), world)
    engine = build_pipeline_engine(plan)
    checkpoint.resume(engine, checkpoint.latest_checkpoint(Path(plan.config.train.save_dir)))
    ids = torch.load(args.batch)
    # One micro-batch of the configured size: DeepSpeed returns the logits of the last micro-batch only.
    micro = [((ids, torch.ones_like(ids)), ids)]
    _, logits = engine.eval_batch(iter(micro), return_logits=True, num_micro_batches=1)
    if engine.is_last_stage():
        torch.save(logits, args.out)


if __name__ == "__main__":
    main()
