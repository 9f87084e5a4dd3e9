"""train.fused_loss in real training: pp=2 on 2 gloo ranks gives Hugging Face's loss's losses, fused or not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_multiproc import summary, tiny_config, train  # noqa: E402

pytestmark = pytest.mark.multiproc


def test_fused_loss_trains_as_the_full_logits_do_at_two_stages(tmp_path):
    """gpt2-tiny (tied head across the two stages), 4 steps of 4 micro-batches with an evaluation: the fused
    loss's run and Hugging Face's-loss run report the same training and eval losses (to fp32 rounding)."""
    runs = {}
    for fused in (True, False):
        (tmp_path / f"fused-{fused}").mkdir()
        config = tiny_config(tmp_path / f"fused-{fused}", "gpt2-tiny", 2, max_steps=4, fused_loss=fused)
        train(config)
        runs[fused] = summary(config)
    fused, full = runs[True], runs[False]
    assert len(fused["losses"]) == len(full["losses"]) == 4
    assert fused["losses"] != full["losses"], "the switch changed nothing: not two different losses"
    for got, want in zip(fused["losses"] + [fused["eval_loss"]], full["losses"] + [full["eval_loss"]]):
        assert abs(got - want) <= 1e-5 * abs(want), (fused, full)
