"""What a run prints by default: our lines, not DeepSpeed's chatter.

DeepSpeed prints ``SEED_LAYERS=...`` and its topology from the PipelineModule's constructor, warns "Attempting to
get learning rate from scheduler before it has started" on every rank while the engine is built, and "Setting
accelerator to CPU" at its import on a machine without a GPU (the CLI installs the filter before that import). ``train --verbose``
(or ``HYBRID_DS_VERBOSE=1``) keeps all of it; by default :func:`deepspeed_prints_off` swallows the constructor's
prints and :func:`quiet_deepspeed_logger` drops the scheduler's warning. DeepSpeed's other warnings and errors stay.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator

VERBOSE_ENV = "HYBRID_DS_VERBOSE"
_CHATTER = ("Attempting to get learning rate from scheduler before it has started",
            # DeepSpeed's accelerator detection on a machine without a GPU, at its import: validate, plan, train
            "Setting accelerator to CPU. If you have GPU or other accelerator",
            # WarmupDecayLR/WarmupCosineLR on every rank: hybrid_ds.config.deepspeed.schedule_warnings says it once
            "is less than warmup_num_steps")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def deepspeed_prints_off() -> Iterator[None]:
    """Standard output swallowed around a DeepSpeed constructor that prints (unless verbose)."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return verbose() or not any(text in record.getMessage() for text in _CHATTER)


def quiet_deepspeed_logger() -> None:
    """DeepSpeed's logger ("DeepSpeed", which its import configures and keeps) without its known chatter (unless
    verbose); installed once, before or after DeepSpeed is imported."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropChatter) for f in logger.filters):
        logger.addFilter(_DropChatter())
