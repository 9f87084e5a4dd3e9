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


# ---------------------------------------------------------------- the engine: pipeline.sequence_parallel end to end

SP_MODELS = {"llama-tiny": {}, "qwen2-tiny": {"tie_word_embeddings": True},  # the tie summed between stages
             "mistral-tiny": {"sliding_window": 4}}  # a window of a quarter of the sequence


@pytest.fixture(scope="module")
def sp_folders(tmp_path_factory):
    """A saved random init of each model (the HF reference and the run start from it)."""
    import torch
    import transformers

    from hybrid_ds.config import ModelConfig
    from hybrid_ds.models.resolve import resolve_model

    out = {}
    for name, overrides in SP_MODELS.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        config = resolve_model(ModelConfig(name=name, overrides=overrides)).hf_config
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        out[name] = folder
    return out


def with_documents(batches: list[dict]) -> list[dict]:
    """The batches with document ids for attention masks (data.document_mask): documents that straddle the shards'
    boundary (token 8 of 16 at sp=2), each document's first token not predicted from the one before."""
    import torch

    from test_pipeline_multiproc import SEQ

    ids = torch.tensor([[1] * 5 + [2] * 6 + [3] * (SEQ - 11), [1] * 9 + [2] * (SEQ - 9)])
    out = []
    for b in batches:
        starts = torch.zeros_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        out.append({"input_ids": b["input_ids"], "attention_mask": ids,
                    "labels": b["input_ids"].masked_fill(starts, -100)})
    return out


SP_RUNS = [  # (model, stages, dp, document mask, ZeRO stage, schedule, activation checkpointing and train.tiled_mlp)
    ("llama-tiny", 2, 1, False, 1, "zb-h1", False),
    ("qwen2-tiny", 2, 1, True, 2, "1f1b", False),
    ("mistral-tiny", 1, 2, True, 1, "1f1b", True),
]


@pytest.mark.parametrize("name,stages,dp,documents,zero,schedule,recompute", SP_RUNS, ids=[
    f"{n}-pp{s}-dp{d}{'-documents' if doc else ''}-zero{z}-{sc}{'-recompute-tiled' if r else ''}"
    for n, s, d, doc, z, sc, r in SP_RUNS])
def test_sequence_parallel_runs_train_as_the_hugging_face_model(name, stages, dp, documents, zero, schedule, recompute,
                                                                sp_folders, tmp_path):
    """pp=2 x sp=2 and pp=1 x sp=2 x dp=2 on 4 gloo processes, ZeRO-1 and ZeRO-2 (partitioned over sp x dp), 1F1B
    and ZB-H1, a tied embedding, activation checkpointing (the recomputed forward exchanges again) with a tiled MLP
    (train.tiled_mlp: DeepSpeed's TiledMLP, recomputing each tile in backward): the eval loss and 4 steps' losses equal the HF model's under torch AdamW within 1e-5, and so does every
    parameter on every rank after them (gradients summed over the shards and averaged over the replicas)."""
    from test_pipeline_multiproc import SEQ, assert_params_match, launch, make_batches, reference

    steps = 4
    batches = make_batches("llama-tiny", steps * dp)
    batches = with_documents(batches) if documents else batches
    run = launch(tmp_path, sp_folders[name], batches, stages=stages, nproc=4, steps=steps,
                 pipeline={"stages": stages, "sequence_parallel": 2, "schedule": schedule,
                           "activation_checkpoint_interval": int(recompute)},
                 train={"fused_loss": False, "tiled_mlp": 2 if recompute else 0},
                 data={"seq_len": SEQ, "document_mask": documents}, zero_optimization={"stage": zero})
    ref = reference(name, sp_folders[name], batches, steps, dp=dp, documents=documents)
    assert run["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert_params_match(run["ranks"], ref["params"])
    assert run["ranks"][0]["optimizer"] == "DeepSpeedZeroOptimizer"
    engine = "PartitionedGradientsPipelineEngine" if zero == 2 else "OneBackwardPipelineEngine"
    assert {rank["engine"] for rank in run["ranks"]} == {engine}


def test_a_shard_received_by_the_wrong_rank_fails_the_comparison(sp_folders, tmp_path):
    """The last stage's sp ranks swapped (each gets the other's shard of the hidden states): the losses differ."""
    from test_pipeline_multiproc import SEQ, launch, make_batches, reference

    batches = make_batches("llama-tiny", 1)
    run = launch(tmp_path, sp_folders["llama-tiny"], batches, 2, 4, 1, "--swap-shards",
                 pipeline={"stages": 2, "sequence_parallel": 2}, data={"seq_len": SEQ})
    ref = reference("llama-tiny", sp_folders["llama-tiny"], batches, 1)
    assert abs(run["losses"][0] - ref["losses"][0]) > 1e-3



def test_parity_checks_each_ranks_shard_under_the_launcher(tmp_path):
    """``hybrid-ds parity`` of an sp=2 config on 2 ranks (as ``deepspeed --num_gpus 2 --no_local_rank --module
    hybrid_ds.cli parity`` starts it): each rank's shard of a padded batch through the stages, the shards' losses and gradients summed,
    against the Hugging Face model (Llama at 2 stages, the fused loss too); on 4 ranks it is one line naming the key."""
    config = tmp_path / "sp.json"
    config.write_text(json.dumps({"model": {"name": "llama-tiny"}, "pipeline": {"stages": 2, "sequence_parallel": 2},
                                  "train_micro_batch_size_per_gpu": 1}))
    cli = Path(__file__).resolve().parents[1] / "hybrid_ds" / "cli.py"
    done = warm_ranks.run(cli, ["parity", config], nproc=2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "llama-tiny (2 stages x sequence_parallel 2)" in done.stdout and "parity          OK" in done.stdout
    assert done.stdout.count("parity          OK") == 1  # rank 0 reports
    done = warm_ranks.run(cli, ["parity", config], nproc=4)
    assert done.returncode == 2 and "pipeline.sequence_parallel: 2, but parity runs on 4 processes" in done.stderr
