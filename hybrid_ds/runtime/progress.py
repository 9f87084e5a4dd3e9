"""Rank 0's account of a run as it goes: a progress bar in a terminal, plain lines in a log.

With a terminal (standard error is one) a tqdm bar shows loss, learning rate, tokens/s and step time, and our lines
(evaluations, checkpoints) print above it. Without one (a batch job's log, ``| tee``) there is no bar: one plain line
every ``steps_per_print`` steps, and at the first and last step, so a log reads line by line instead of one line of
``\\r``-joined redraws. Only rank 0 prints; the other ranks' :class:`Progress` says nothing.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool, every: int | None, stream: TextIO | None = None):
        self.total, self.first, self.enabled = total, initial + 1, enabled
        self.every = every if every and every > 0 else 10
        stream = stream or sys.stderr
        self.bar: Any = None
        if enabled and stream.isatty():
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train", file=stream)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, step_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", step_s=f"{step_s:.1f}")
            self.bar.update(1)
        elif step % self.every == 0 or step in (self.first, self.total):
            print(f"step {step}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s, "
                  f"{step_s:.2f} s/step", flush=True)

    def write(self, line: str) -> None:
        """One of our lines (rank 0 only), above the bar where there is one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
