"""Ulysses sequence parallelism (hybrid_ds.models.sequence_parallel): a Hugging Face decoder layer on each rank's
shard of the tokens, attention exchanged over the group, computes what the layer computes on the whole sequence:
llama, qwen2 (grouped key/value heads), mistral with a sliding window, sdpa and eager, with and without document
masks (documents straddling the shards, a padded tail). One 2-process run (tests/workers/ulysses_layer.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import warm_ranks

WORKER = Path(__file__).resolve().parent / "workers" / "ulysses_layer.py"


def worst(*argv: str, nproc: int = 2) -> list[float]:
    done = warm_ranks.run(WORKER, list(argv), nproc=nproc, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 6, done.stdout  # five cases and the worst over them and the ranks
    return lines[-1]["worst"]


def test_a_sharded_layer_computes_what_the_whole_layer_computes():
    output, input_grad, weight_grads = worst()
    # each rank's output and input gradient (equal here, bit for bit); weight gradients summed over the group, in
    # another order: relative to each weight's gradient
    assert output <= 1e-6 and input_grad <= 1e-6 and weight_grads <= 1e-5


@pytest.mark.parametrize("broken", ["positions", "shard"])
def test_positions_that_do_not_follow_the_shard_or_a_wrong_shard_fail(broken):
    assert min(worst("--break", broken)[:2]) > 1e-2
