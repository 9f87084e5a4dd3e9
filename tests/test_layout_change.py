"""Resume on another layout: a checkpoint saved at one (engine, stages, dp, ZeRO stage, boundaries) continues
at another through DeepSpeed's universal checkpoints, weights, optimizer moments, schedule and data position.

Each transition: run A straight for 8 steps; run B saves at step 4 at the first layout and resumes at the
second. B's steps 5-8 must give A's losses (fp32, dropout off: the layouts compute the same sums in another
order; the global batch is 8 samples at every layout). Optimizer moments lost or reset, a data position counted per rank, or the schedule restarted would
each move the losses far beyond the 1e-5 allowed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_multiproc import ROOT, checkpoint_logits, summary, tiny_config, train

pytestmark = pytest.mark.multiproc

NO_DROPOUT = {"gpt2-tiny": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
              "llama-tiny": {}}


def layout_config(tmp_path: Path, name: str, stages: int, zero: int = 1, partition=None, **train) -> Path:
    config = tiny_config(tmp_path, name, stages, zero=zero, save_interval=4, eval_interval=0, **train)
    raw = json.loads(config.read_text())
    raw["model"]["overrides"] = NO_DROPOUT[name]
    raw["gradient_accumulation_steps"] = 2 * stages  # 2 processes: a global batch of 8 at every layout
    if partition is not None:
        raw["pipeline"]["partition"] = partition
    config.write_text(json.dumps(raw))
    return config


def continue_elsewhere(tmp_path: Path, name: str, first: dict, then: dict) -> tuple[list[float], list[float], Path]:
    """(A's losses, B's losses after resuming, B's config)."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    straight = layout_config(tmp_path / "a", name, **first)
    train(straight, 2)
    saved = layout_config(tmp_path / "b", name, max_steps=4, **first)
    train(saved, 2)
    resumed = layout_config(tmp_path / "b", name, **then)
    proc = train(resumed, 2, "--resume")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return summary(straight)["losses"], summary(resumed)["losses"], resumed


TRANSITIONS = {
    "pp2xdp1->pp1xdp2": ("gpt2-tiny", dict(stages=2), dict(stages=1)),
    "pp1xdp2->pp2xdp1": ("gpt2-tiny", dict(stages=1), dict(stages=2)),
    "zero1-pipeline->zero2-plain": ("gpt2-tiny", dict(stages=2, zero=1), dict(stages=1, zero=2)),
    "zero2-plain->zero1-pipeline": ("gpt2-tiny", dict(stages=1, zero=2), dict(stages=2, zero=1)),
    "partition[1,3]->[3,1]": ("llama-tiny", dict(stages=2, partition=[1, 3]), dict(stages=2, partition=[3, 1])),
}


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_a_run_continues_on_another_layout(tmp_path, transition):
    name, first, then = TRANSITIONS[transition]
    want, got, _ = continue_elsewhere(tmp_path, name, first, then)
    assert len(want) == 8 and len(got) == 4, (want, got)
    assert max(abs(a - b) for a, b in zip(want[4:], got)) < 1e-5, (want[4:], got)
    assert want[-1] < want[0] - 0.1, want  # it learns: equal losses are not a flat line
