"""Test worker: the first rank converts a checkpoint for longer than the process group's timeout while the others
wait (``hybrid_ds.runtime.checkpoint.resume.converted_on_rank_0``).

``FOLDER SECONDS [--fail]``: the process group times out after 3 s; the conversion sleeps SECONDS, then writes a marker
or (``--fail``) raises a UserError that every rank must report. ``--impatient`` waits on the default group instead,
as before the patient group (the negative control).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from hybrid_ds.errors import UserError
from hybrid_ds.runtime import engine
from hybrid_ds.runtime.checkpoint.resume import converted_on_rank_0


def convert(folder: Path, seconds: float, fail: bool) -> None:
    time.sleep(seconds)
    if fail:
        raise UserError("CHECKPOINT", f"{folder} cannot be converted to a universal checkpoint: a test's failure")
    (folder / "converted").write_text("yes")


def run(args: argparse.Namespace) -> int:
    engine.init_distributed(timeout_minutes=3 / 60)
    if args.impatient:
        engine.patient_group = lambda: None  # the default group and its 3 s timeout
    converted_on_rank_0(args.folder, lambda: convert(args.folder, args.seconds, args.fail))
    torch.distributed.barrier()
    print(f"rank {torch.distributed.get_rank()} saw {(args.folder / 'converted').read_text()}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--fail", action="store_true")
    parser.add_argument("--impatient", action="store_true")
    parser.add_argument("--local_rank", type=int, default=0)
    try:
        sys.exit(run(parser.parse_args()))
    except UserError as err:
        print(f"hybrid-ds: error: {err}", file=sys.stderr, flush=True)
        os._exit(2)
