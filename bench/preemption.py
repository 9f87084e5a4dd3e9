"""SIGTERM to exit at the CPU default config (``configs/gpt.json`` as ``make train`` runs it), per target.

Starts ``deepspeed --num_gpus 2 launch/train.py`` on the config (CPU profile: GPT-2 small, pp=2, seq 128,
saving into a temporary folder), sends SIGTERM to the target once the progress bar shows step 2, and times
the signal to the last process's exit (the helper of ``tests/test_stop_multiproc.py``: it reads the output
to EOF and fails if any process outlives it).

Usage: ``DS_ACCELERATOR=cpu python bench/preemption.py [runner] [launch] [rank]`` (default: runner rank);
prints one line per target.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_stop_multiproc import start_and_signal  # noqa: E402


def main(targets: list[str]) -> None:
    for target in targets:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps({"extends": str(ROOT / "configs" / "gpt.json"),
                                          "train": {"save_dir": str(Path(tmp) / "run")}}))
            rc, seconds, output, _ = start_and_signal(config, target)
            steps = re.findall(r"step_s=([\d.]+)", output)
            stopped = next((line for line in output.splitlines() if "stopped by" in line), "no stop line")
            print(f"{target}: signal -> last exit {seconds:.1f} s; deepspeed command rc {rc}; "
                  f"last step times {steps[-3:]} s; {stopped.strip()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["runner", "rank"])
