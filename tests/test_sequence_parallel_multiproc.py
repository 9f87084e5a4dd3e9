"""Ulysses sequence parallelism (hybrid_ds.models.sequence_parallel): a Hugging Face decoder layer on each rank's
shard of the tokens, attention exchanged over the group, computes what the layer computes on the whole sequence:
llama, qwen2 (grouped key/value heads), mistral with a sliding window, sdpa and eager, with and without document
masks (documents straddling the shards, a padded tail) (tests/workers/ulysses_layer.py); and so do the pipeline's
stages, embedding to loss (tests/workers/ulysses_stages.py). 2-process runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import warm_ranks

WORKERS = Path(__file__).resolve().parent / "workers"


def worst(*argv: str, worker: str = "ulysses_layer.py", cases: int = 5) -> list[float]:
    done = warm_ranks.run(WORKERS / worker, list(argv), nproc=2, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == cases + 1, done.stdout  # the cases, then the worst over them and the ranks
    return lines[-1]["worst"]


def test_a_sharded_layer_computes_what_the_whole_layer_computes():
    output, input_grad, weight_grads = worst()
    # each rank's output and input gradient (equal here, bit for bit); weight gradients summed over the group, in
    # another order: relative to each weight's gradient
    assert output <= 1e-6 and input_grad <= 1e-6 and weight_grads <= 1e-5


@pytest.mark.parametrize("broken", ["positions", "shard"])
def test_positions_that_do_not_follow_the_shard_or_a_wrong_shard_fail(broken):
    assert min(worst("--break", broken)[:2]) > 1e-2


def test_sharded_stages_compute_the_whole_sequences_loss_logits_and_gradients():
    """llama (pp=2 and 1), qwen2, mistral with a window of 8 of 32 tokens, gpt2 (learned positions, tied head); with
    and without document masks; the fused loss and Hugging Face's: the shards' losses summed over the group equal the
    loss, each shard's logits are the whole sequence's rows, the summed gradients its gradients."""
    loss, logits, grads = worst(worker="ulysses_stages.py", cases=6)
    assert loss <= 1e-6 and logits <= 1e-6 and grads <= 1e-5


def test_stages_fail_when_the_shards_positions_restart():
    loss, logits, grads = worst("--break", "positions", worker="ulysses_stages.py", cases=6)
    assert logits > 1e-3 and grads > 1e-2
