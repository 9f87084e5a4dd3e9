"""``python -m hybrid_ds.launcher [the deepspeed command's arguments]``: DeepSpeed's launcher behind a first process that
passes a stop request on to the ranks and waits for them.

DeepSpeed 0.19.8's ``deepspeed`` command has no signal handler (hybrid_ds.runtime.preemption): a SIGTERM ends it at
once with 143 while its ``launch.py`` and the ranks are still saving, and a container runtime, which signals its first
process and tears the container down once that process exits, would kill the save. Started through this module, the
first process is this one: it runs the ``deepspeed`` command in a session of its own (so a Ctrl-C in the terminal
reaches this process alone), turns SIGTERM and SIGINT into the same signal to every rank (each finishes its step,
saves, exits 0; a second Ctrl-C ends them at once), waits for the command to end and exits with its code: 0 once every
rank saved and exited. Before the ranks exist, or where they run on other nodes (pdsh), the signal goes to the
``deepspeed`` command itself.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import psutil

LAUNCH_MODULE = "deepspeed.launcher.launch"


def ranks_of(runner: int) -> list[psutil.Process]:
    """The ranks under the ``deepspeed`` command ``runner``: the children of its ``deepspeed.launcher.launch``."""
    try:
        below = psutil.Process(runner).children(recursive=True)
        launches = {p.pid for p in below if LAUNCH_MODULE in p.cmdline()}
        return [p for p in below if p.ppid() in launches]
    except psutil.Error:
        return []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    runner = subprocess.Popen([deepspeed, *argv], start_new_session=True)

    def forward(signum: int, frame: FrameType | None) -> None:
        for process in ranks_of(runner.pid) or [psutil.Process(runner.pid)]:
            try:
                process.send_signal(signum)
            except psutil.Error:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return runner.wait()


if __name__ == "__main__":
    sys.exit(main())
