"""Layout, batch arithmetic and layer -> stage maps (pure functions) agree with DeepSpeed's own."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from hybrid_ds.cli import main
from hybrid_ds.errors import UserError
from hybrid_ds.config.topology import (bubble_fraction, layer_flops, partition_balanced, partition_layers,
                                partition_uniform, resolve_layout)

ROOT = Path(__file__).resolve().parents[1]


def test_batch_numbers_are_derived_like_deepspeed():
    assert resolve_layout(8, 2, 12, micro_batch=4, grad_accum=8).train_batch == 4 * 8 * 4
    assert resolve_layout(8, 2, 12, micro_batch=4, train_batch=64).grad_accum == 4
    assert resolve_layout(8, 2, 12, train_batch=64, grad_accum=2).micro_batch == 8
    assert resolve_layout(8, 2, 12, train_batch=64).micro_batch == 16
    layout = resolve_layout(6, 3, 12, micro_batch=1, grad_accum=1)
    assert (layout.dp, layout.grad_accum, layout.train_batch) == (2, 1, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=4, stages=3, n_layers=12, micro_batch=1), "not divisible by 3 stages; valid stages: [1, 2, 4]"),
    (dict(world_size=4, stages=4, n_layers=2, micro_batch=1), "4 stages need at least 4 layers; the model has 2"),
    (dict(world_size=4, stages=2, n_layers=12, micro_batch=4, grad_accum=8, train_batch=60), "60 != "),
    (dict(world_size=4, stages=2, n_layers=12, micro_batch=3, train_batch=64), "not a multiple of"),
    (dict(world_size=2, stages=1, n_layers=12), "not set"),
])
def test_impossible_layouts_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_layout(**kwargs)


def test_bubble_and_its_warning():
    assert bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert bubble_fraction(1, 1) == 0
    assert resolve_layout(2, 2, 12, micro_batch=1, grad_accum=8).warnings() == []
    (warning,) = resolve_layout(2, 2, 12, micro_batch=1, grad_accum=4).warnings()
    assert "20.0%" in warning and "4 x stages=8" in warning


def test_partitions_match_deepspeed():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import utils as ds_utils

    rng = random.Random(0)
    for _ in range(300):
        n, parts = rng.randint(1, 40), rng.randint(1, 8)
        weights = [rng.choice([0, 1, 7, 1000, rng.randint(0, 10**6)]) for _ in range(n)]
        assert partition_balanced(weights, parts) == [int(x) for x in ds_utils.partition_balanced(weights, parts)]
        assert partition_uniform(n, parts) == [int(x) for x in ds_utils.partition_uniform(n, parts)]


def test_partition_methods():
    params = [100, 10, 10, 10, 10, 100]  # embedding, 4 blocks, head
    classes = ["Embedding", "Block", "Block", "Block", "Block", "Head"]
    assert partition_layers("uniform", params, classes, 2) == [0, 3, 6]
    assert partition_layers("parameters", params, classes, 2) == [0, 3, 6]
    assert partition_layers("type:block", params, classes, 2) == [0, 3, 6]
    assert partition_layers([3, 1], params, classes, 2) == [0, 4, 6]
    assert partition_layers([0, 4], params, classes, 2) == [0, 1, 6]
    assert partition_layers([1, 2, 1], params, classes, 3) == [0, 2, 4, 6]
    with pytest.raises(UserError, match="middle stage"):
        partition_layers([2, 0, 2], params, classes, 3)


def test_validate_explicit_partition_on_llama(capsys):
    """llama-tiny has 4 blocks: [1, 3] puts the embedding and block 0 on stage 0."""
    rc = main(["validate", str(ROOT / "configs/gpt.json"), "--json", "--set", "model.name=llama-tiny",
               "--set", "pipeline.partition=[1, 3]", "--set", "data.seq_len=64"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert plan["stage_plan"][0]["layers"] == ["embedding", "block 0"]
    assert plan["stage_plan"][1]["layers"] == ["block 1", "block 2", "block 3", "head"]


def test_tied_weight_counts_on_both_stages(capsys):
    """gpt2 ties wte and lm_head: each of the two stages holds the 38.6M-parameter matrix."""
    rc = main(["validate", str(ROOT / "configs/gpt.json"), "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0
    wte = 50257 * 768
    assert sum(s["params"] for s in plan["stage_plan"]) == plan["params"] + wte


def test_presets_command_json(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["gpt2"] == {"name": "gpt2", "family": "gpt2", "layers": 12, "hidden": 768, "heads": 12,
                            "published": 124_000_000, "params": 124_439_808}
    assert all(type(row["params"]) is int and row["params"] > 0 for row in rows.values())
    assert rows["llama2-70b"]["params"] == pytest.approx(69.0e9, rel=0.02)


def test_flops_partition_balances_compute_not_parameters():
    """GPT-2 small: the tied head (2 x 50257 x 768 FLOPs per token) is compute on the last stage, not on
    stage 0 where the same weight is a free lookup; "parameters" puts it on both and splits 6 + 6."""
    embedding, block, head = 38_597_376 + 786_432, 7_087_872, 38_597_376 + 1536
    params = [embedding, *[block] * 12, head]
    classes = ["Embedding", *["Block"] * 12, "Head"]
    assert partition_layers("parameters", params, classes, 2) == [0, 7, 14]
    assert partition_layers("flops", params, classes, 2, seq_len=128, hidden=768) == [0, 10, 14]
    assert partition_layers("flops", params, classes, 2, seq_len=1024, hidden=768) == [0, 9, 14]
    flops = layer_flops(params, 128, 768)
    stage0, stage1 = sum(flops[:10]), sum(flops[10:])
    assert abs(stage0 - stage1) / max(stage0, stage1) < 0.1
