"""``train.compile``: each transformer block compiled with torch.compile, and the compile time made visible.

Regional compilation, as torchtitan compiles each TransformerBlock rather than the whole model: what is
compiled is the Hugging Face layer held by each :class:`hybrid_ds.models.layers.Block`, in place
(``nn.Module.compile``: parameter names, state dicts and checkpoints stay as they are). Position ids,
rotary cos/sin and the 4-D mask (``Derived``) are made outside the compiled region, once per micro-batch
and stage, as in eager mode; the pipeline's send/receive, activation checkpointing (DeepSpeed's
non-reentrant checkpoint around each Block) and ZeRO-1 all stay outside too.

Identical blocks share one graph: dynamo traces the layer's code with its parameters as graph inputs
(``torch._dynamo.config.inline_inbuilt_nn_modules``, torch's default), so a stage of twelve GPT-2 blocks
compiles once. A new graph is made, and shown in the progress output, for:
- a second kind of layer (sliding-window vs full attention: a different constant in the layer),
- a micro-batch without padding (the 4-D mask is None on SDPA's causal fast path) after one with it,
- evaluation (no grad, eval mode),
- a second sequence length: torch's automatic dynamic shapes recompile once with the sequence (and batch)
  dimension symbolic, and every later length reuses that graph, so a changing length never recompiles
  step after step. We do not mark dimensions dynamic up front: training sees one length, and a static
  graph is the faster one.

Written for torch 2.13: the compile-time callbacks (``torch._dynamo.callback_handler``, which also fires
for backward graphs compiled at their first backward) and the ``unique_graphs`` counter are torch-private.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from torch import nn


class CompileClock:
    """Seconds spent compiling in this process and graphs made, since the last :meth:`take`."""

    def __init__(self) -> None:
        from torch._dynamo.callback import callback_handler

        self.blocks = 0        # blocks set to compile, not yet reported
        self.seconds = 0.0     # compile seconds not yet reported
        self.reported_graphs = self.graphs()  # dynamo's counters live as long as the process
        self._started = 0.0
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def _start(self, _args: Any) -> None:
        self._started = time.perf_counter()

    def _end(self, _args: Any) -> None:
        self.seconds += time.perf_counter() - self._started

    @staticmethod
    def graphs() -> int:
        """Graphs dynamo made in this process (only blocks are compiled, so: block graphs)."""
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    def take(self) -> tuple[int, int, float]:
        """(blocks, graphs, seconds) new since the last call."""
        graphs = self.graphs()
        new = (self.blocks, graphs - self.reported_graphs, self.seconds)
        self.blocks, self.reported_graphs, self.seconds = 0, graphs, 0.0
        return new


_clock: CompileClock | None = None


def clock() -> CompileClock:
    global _clock
    if _clock is None:
        _clock = CompileClock()
    return _clock


def compile_blocks(modules: Iterable[nn.Module]) -> int:
    """Compile the Hugging Face layer of every Block in ``modules`` (and their children); return how many."""
    from hybrid_ds.models.layers import Block

    blocks = {id(m): m for module in modules for m in module.modules() if isinstance(m, Block)}
    for block in blocks.values():
        block.layer.compile()
    clock().blocks += len(blocks)
    return len(blocks)


def progress_line(when: str, step_seconds: float | None, group: Any = None) -> str | None:
    """What was compiled since the last call on any rank, as a line for the progress output, or None.

    Every rank calls it (one small all-gather over ``group``): graphs and blocks are summed over the ranks,
    seconds are the slowest rank's, since the step waits for it.
    """
    mine = torch.tensor(clock().take(), dtype=torch.float64)
    world = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
    gathered = [mine]
    if world > 1:
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine, group=group)
    every = torch.stack(gathered)
    blocks, graphs = int(every[:, 0].sum()), int(every[:, 1].sum())
    seconds = every[:, 2].max().item()
    if not graphs:
        return None
    ranks = f" over {world} ranks" if world > 1 else ""
    of_step = f" of the step's {step_seconds:.1f} s" if step_seconds is not None else ""
    plural = "s" if graphs > 1 else ""
    if blocks:
        return f"{when}: compiled {blocks} blocks into {graphs} graph{plural}{ranks} in {seconds:.1f} s{of_step}"
    return (f"{when}: compiled {graphs} more block graph{plural}{ranks} in {seconds:.1f} s{of_step} "
            "(a new shape or mode)")
