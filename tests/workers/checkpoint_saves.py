"""Test worker: ``hybrid_ds.runtime.checkpoint.save`` on every rank of a gloo group, with an engine that writes one
file per rank as DeepSpeed's ``save_checkpoint`` does (a stage's layers, a rank's partition).

``SAVE_DIR STEP`` saves ``step_STEP``; ``--die`` makes every rank exit 3 once its own file is written, as a job
killed in the middle of a save.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

from hybrid_ds.runtime import checkpoint
from hybrid_ds.runtime.engine import init_distributed


class FilesEngine:
    """What ``checkpoint.save`` asks of DeepSpeed's engine, writing ``part-rank{R}.pt`` into the tag's folder."""

    optimizer = None

    def __init__(self, die: bool):
        self.die = die

    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters, client_state):
        assert save_latest is False
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        rank = torch.distributed.get_rank()
        torch.save({"rank": rank, "weights": torch.arange(4.0) + rank}, folder / f"part-rank{rank}.pt")
        if self.die:
            torch.distributed.barrier()  # every rank's part is written: the job dies before the save completes
            os._exit(3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("save_dir", type=Path)
    parser.add_argument("step", type=int)
    parser.add_argument("--die", action="store_true")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()
    checkpoint.save(FilesEngine(args.die), args.save_dir, args.step, {"samples": args.step}, {"engine": "test"})
    sys.exit(0)
