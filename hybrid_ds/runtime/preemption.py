"""Stopping a run cleanly when a scheduler asks: SIGTERM or SIGINT to any rank, or DeepSpeed's launcher gone.

What DeepSpeed 0.19.8's launcher does with a signal (measured): the ``deepspeed`` command (launcher/runner.py)
has no handler unless it drives pdsh, so ``kill -TERM`` ends it at once with 143 while its child
``deepspeed.launcher.launch`` and the ranks train on as orphans. ``launch.py`` on SIGTERM/SIGINT sends SIGTERM to
each rank in turn, waits up to 30 s for that rank to exit, then SIGKILLs it, and exits 1.

So each rank, while :class:`StopRequest` is active, turns SIGTERM and SIGINT into a request (a flag, nothing
else: a rank never dies mid-step), and takes the exit of its ``launch.py`` or of the process that started
``launch.py`` (the ``deepspeed`` command) as a request too. At each step boundary every rank calls
:meth:`StopRequest.agreed`: one all-reduce (MAX) of a small code over the world, so all ranks stop after the
same step, however many of them saw the signal.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

import psutil
import torch

LAUNCHER_GONE = 1  # a code below every signal number, so a signal's name wins when both are seen
REASONS = {LAUNCHER_GONE: "the deepspeed launcher's exit", signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
LAUNCH_MODULE = "deepspeed.launcher.launch"


def launcher_pids() -> tuple[int, int] | None:
    """(pid of this rank's ``deepspeed.launcher.launch``, pid of its parent) when it has one, else None.

    Under torchrun (which forwards signals itself) or a plain ``python`` there is nothing to watch.
    """
    try:
        parent = psutil.Process(os.getppid())
        if LAUNCH_MODULE not in parent.cmdline():
            return None
        return parent.pid, parent.ppid()
    except psutil.Error:
        return None


def launcher_gone(pids: tuple[int, int]) -> bool:
    """Whether ``launch.py`` or its parent exited: a process whose parent exits is re-parented at once, while the
    dead parent may linger as a zombie that still looks alive."""
    launch, runner = pids
    if os.getppid() != launch:
        return True
    try:
        return psutil.Process(launch).ppid() != runner
    except psutil.Error:
        return True


class StopRequest:
    """``with StopRequest(group) as stop:`` ... ``reason = stop.agreed()`` at each step boundary (every rank).

    ``group``: the process group to agree over (gloo; None = the default group). Outside the ``with`` block the
    signals have their previous handlers again.
    """

    def __init__(self, group: Any = None):
        self.group = group
        self.code = 0
        self.interrupted = False  # a SIGINT was seen
        self.watched = launcher_pids()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _request(self, signum: int, frame: FrameType | None) -> None:
        """Only a flag: the step under way finishes. A second SIGINT (Ctrl-C again) ends the rank at once, as
        Python's default handler does."""
        if signum == signal.SIGINT and self.interrupted:
            signal.signal(signal.SIGINT, self.previous.get(signal.SIGINT, signal.default_int_handler))
            raise KeyboardInterrupt
        self.interrupted = self.interrupted or signum == signal.SIGINT
        self.code = max(self.code, signum)

    def agreed(self) -> str | None:
        """The reason to stop now, the same on every rank, or None to go on."""
        if self.watched and launcher_gone(self.watched):
            self.code = max(self.code, LAUNCHER_GONE)
        code = torch.tensor([self.code], dtype=torch.int64)
        torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return REASONS.get(int(code), f"signal {int(code)}") if int(code) else None


def gloo_group() -> Any:
    """A gloo group over the world for :class:`StopRequest` (None where the default group is gloo already, as on
    CPU): agreeing needs no accelerator stream. Every rank must call it, in the same order as other groups."""
    if torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo")
