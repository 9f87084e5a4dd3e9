"""``pipeline.sequence_parallel``: what the config and the model are checked for before any process starts (one line
naming the key, what was given and what would do), the layout's arithmetic, and a block whose attention does not
exchange over the group stopping the run. The runs themselves: tests/test_sequence_parallel_multiproc.py."""

from __future__ import annotations

import pytest
import torch

from hybrid_ds.config import load_config_dict
from hybrid_ds.errors import UserError
from hybrid_ds.runtime.plan import build_plan


def config(name: str = "llama-tiny", sp: int = 2, stages: int = 1, seq: int = 32, overrides: dict | None = None,
           **top):
    raw = {"model": {"name": name, "overrides": overrides or {}}, "data": {"seq_len": seq},
           "pipeline": {"stages": stages, "sequence_parallel": sp}, "train_micro_batch_size_per_gpu": 1, **top}
    return load_config_dict(raw)


def refusal(build) -> UserError:
    with pytest.raises(UserError) as err:
        build()
    assert "\n" not in str(err.value)
    return err.value


def test_layout_counts_sequence_parallel_ranks_into_the_world_not_the_batch():
    plan = build_plan(config(sp=2, stages=2, gradient_accumulation_steps=4), world_size=8)
    layout = plan.layout
    assert (layout.stages, layout.sp, layout.dp, layout.data_ranks, layout.train_batch) == (2, 2, 2, 4, 8)
    from hybrid_ds.config.deepspeed import effective_deepspeed_config

    ds = effective_deepspeed_config(plan.config, layout, "cpu")
    assert ds["train_batch_size"] == 16  # DeepSpeed's arithmetic: micro x accumulation x its 4 data ranks
    assert build_plan(config(sp=2, stages=2)).layout.world_size == 4  # the world one replica needs
    assert plan.zero_stage == 0 and build_plan(config(sp=2, zero_optimization={"stage": 1}), 2).zero_stage == 1


@pytest.mark.parametrize("make, key, says", [
    (lambda: build_plan(config(sp=3, seq=48)), "pipeline.sequence_parallel", "does not divide llama's 4 attention heads"),
    (lambda: build_plan(config(overrides={"num_key_value_heads": 1})), "pipeline.sequence_parallel",
     "does not divide llama's 1 key/value heads"),
    (lambda: build_plan(config(seq=33)), "pipeline.sequence_parallel", "does not divide data.seq_len 33"),
    (lambda: build_plan(config(), world_size=3), "pipeline.sequence_parallel", "does not divide the 3 ranks"),
    (lambda: build_plan(config("bert-tiny")), "pipeline.sequence_parallel", "its embedding makes the positions"),
    (lambda: build_plan(config("mixtral-tiny", overrides={"output_router_logits": True})),
     "pipeline.sequence_parallel", "router loss"),
    (lambda: config(zero_optimization={"stage": 2}), "pipeline.sequence_parallel", "needs the pipeline engine"),
    (lambda: config(train={"compile": True}), "train.compile", "not available with pipeline.sequence_parallel 2"),
    (lambda: config(sp=1, sequence_parallel_size=2), "sequence_parallel_size", "set pipeline.sequence_parallel"),
    (lambda: build_plan(config("gemma-tiny")), "pipeline.sequence_parallel", "gemma's 1 key/value heads"),
])
def test_what_cannot_be_split_is_one_line(make, key, says):
    err = refusal(make)
    assert err.key == key and says in err.message, err


def test_a_model_without_positions_is_refused(tmp_path):
    """Mamba 2 (no attention, no positions: a recurrent scan reads the sequence in order)."""
    from test_generic_adapter import run_config, saved, tiny_config

    folder = saved(tmp_path, tiny_config("mamba2", num_heads=8, num_hidden_layers=2))
    cfg = run_config(folder, "eager").replace(pipeline={"sequence_parallel": 2}, data={"seq_len": 32})
    err = refusal(lambda: build_plan(cfg))
    assert "its blocks take no positions" in err.message, err


def test_a_block_whose_attention_does_not_exchange_stops_the_run():
    """The attention implementation taken back from the block's config (as a model whose attention does not go
    through transformers' interface would have it): its first forward raises, naming the key."""
    from hybrid_ds.models.sequence_parallel import SequenceShard
    from hybrid_ds.runtime.pipeline import SequentialStages

    plan = build_plan(config(sp=1))
    shard = SequenceShard(None, 0, 1, lambda group, tensor: tensor)
    ids = torch.randint(0, 256, (1, 32))
    SequentialStages(plan, sequence=shard).forward((ids, torch.ones_like(ids)))  # exchanging: runs
    stages = SequentialStages(plan, sequence=shard)
    stages.builders[0].shared["sequence_config"]._attn_implementation = "sdpa"
    err = refusal(lambda: stages.forward((ids, torch.ones_like(ids))))
    assert err.key == "pipeline.sequence_parallel" and "attention interface" in err.message


@pytest.mark.parametrize("world, stages, sp", [(8, 2, 2), (8, 1, 4), (12, 3, 2), (4, 4, 1)])
def test_printed_groups_are_the_groups_the_run_makes(world, stages, sp):
    """``validate``'s sequence groups (config.topology.process_groups, pure Python) are those the runtime makes from
    DeepSpeed's own PipeDataParallelTopology, and its pipeline and data groups DeepSpeed's."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from hybrid_ds.config.topology import process_groups, resolve_layout
    from hybrid_ds.runtime.pipeline import sequence_groups

    layout = resolve_layout(world, stages, 12, 1, sp=sp)
    topology = PipeDataParallelTopology(num_pp=stages, num_dp=layout.data_ranks)
    groups = process_groups(layout)
    assert groups["sequence"] == sequence_groups(topology, sp)
    assert groups["pipeline"] == topology.get_axis_comm_lists("pipe")
    assert groups["data"] == topology.get_axis_comm_lists("data")


def test_validate_prints_the_layout_and_its_groups(tmp_path, capsys):
    import json

    from hybrid_ds.cli import main

    path = tmp_path / "sp.json"
    path.write_text(json.dumps({"model": {"name": "llama-tiny"}, "data": {"seq_len": 64},
                                "pipeline": {"stages": 2, "sequence_parallel": 2}, "train_micro_batch_size_per_gpu": 1}))
    assert main(["validate", str(path), "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "world size 8 = stages=2 x sp=2 x dp=2" in out
    assert "sequence (a replica's 2 shards of each sequence, attention's all-to-all): [0, 1] [2, 3] [4, 5] [6, 7]" in out


def test_compare_and_plan_weigh_sequence_parallelism(capsys):
    """Llama-3-8B on 8x H100 at 32k tokens: sp=4 holds a quarter of the activations, so at pp=2 x sp=4 the longest
    sequence that fits is about 4x pp=2 x dp=4's; the estimate counts the all-to-alls; ``plan`` searches sp and prints
    each layout's longest sequence; an sp the heads do not divide is an invalid column, not a crash."""
    from dataclasses import replace

    from hybrid_ds.cli import main
    from hybrid_ds.estimate.architecture import arch_from_preset
    from hybrid_ds.estimate.step import estimate, longest_sequence
    from hybrid_ds.estimate.gpus import get_gpu, make_cluster
    from hybrid_ds.estimate.run import Run

    cluster = make_cluster(8, get_gpu("h100"))
    run = Run(arch_from_preset("llama3-8b"), 8, 2, 1, 1, 16, 32768, zero=1, precision="bf16", checkpoint_interval=1,
              fused_loss=True, sp=4)
    sp4, dp4 = estimate(run, cluster), estimate(replace(run, sp=1, dp=4), cluster)
    assert 0.24 < sp4.binding.activations / dp4.binding.activations < 0.26
    assert sp4.stages[0].comm["sequence all-to-all"] > 0 and "sequence all-to-all" not in dp4.stages[0].comm
    assert 3.5 < longest_sequence(run, cluster.memory) / longest_sequence(replace(run, sp=1, dp=4), cluster.memory) < 4.5
    overrides = ["--set", "model.overrides.max_position_embeddings=131072"]
    assert main(["compare", "llama3-8b", "--gpus", "8", "--stages", "2", "--sp", "4", "--seq-len", "32768",
                 "--checkpoint", "1", *overrides]) == 0
    out = capsys.readouterr().out
    assert "pp2 x sp4 x dp1 ZeRO-1" in out and "longest seq" in out
    assert main(["compare", "llama3-8b", "--gpus", "6", "--sp", "3", "--seq-len", "3072"]) == 0
    assert "does not divide llama3-8b's 32 attention and 8 key/value heads" in capsys.readouterr().out
    assert main(["compare", "bert-large", "--gpus", "2", "--sp", "2", "--seq-len", "512"]) == 0  # refused at run time
    assert "2 is not available for bert-large: its embedding makes the positions" in capsys.readouterr().out
    assert main(["plan", "llama3-8b", "--gpus", "8", "--seq-len", "32768", "--global-batch", "64", "--top", "0",
                 *overrides]) == 0
    table = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:4] == ["rank", "stages", "schedule", "sp"])
    assert table[header].endswith("longest seq") and {line.split()[3] for line in table[header + 1:] if line} > {"1"}
