"""Train a run config: `deepspeed launch/train.py --config configs/gpt.json` (or plain `python`)."""

import sys

from hybrid_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
