"""``train.compile`` in real training (2 pipeline stages, activation checkpointing around every block, ZeRO-1) trains as
eager training does."""

from __future__ import annotations

import json
import re

import pytest

from test_train_multiproc import summary, tiny_config, train

pytestmark = pytest.mark.multiproc


def test_compiled_training_matches_eager(tmp_path):
    """llama-tiny cut to 2 layers (no dropout), one block on each of 2 stages, checkpointing every block: the same train and eval losses
    within 1e-5 with and without compile, and the compile time is in the progress output."""
    runs = {}
    for compiled in (False, True):
        folder = tmp_path / ("compiled" if compiled else "eager")
        folder.mkdir()
        config = tiny_config(folder, "llama-tiny", stages=2, zero=1, max_steps=4, eval_interval=2,
                             compile=compiled)
        raw = json.loads(config.read_text())
        raw["model"]["overrides"] = {"num_hidden_layers": 2}
        raw["pipeline"].update(activation_checkpoint_interval=1, partition="uniform")  # a block on each stage
        config.write_text(json.dumps(raw))
        proc = train(config, 2)
        runs[compiled] = summary(config), proc.stdout + proc.stderr
    (eager, eager_log), (compiled, log) = runs[False], runs[True]
    assert compiled["losses"] == pytest.approx(eager["losses"], abs=1e-5, rel=0)
    assert compiled["eval_loss"] == pytest.approx(eager["eval_loss"], abs=1e-5, rel=0)
    assert re.search(r"step 1: compiled 2 blocks into 2 graphs over 2 ranks in [\d.]+ s of the step's", log), log[-3000:]
    assert re.search(r"step 2 eval: compiled 2 more block graphs over 2 ranks", log), log[-3000:]
    assert not re.search(r"compiled \d+ (blocks|more)", eager_log)
