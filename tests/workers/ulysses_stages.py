"""On every rank of a sequence-parallel group (the whole world): the pipeline's stages of a tiny model, built as each
pipeline rank builds them and run one after another in this process (SequentialStages) on this rank's shard of the
tokens, against the same stages on the whole sequence. The shards' losses and gradients are summed over the group.
Prints one JSON line per case from rank 0 (the largest differences over the ranks) and the worst of them.

Usage: ulysses_stages.py [--break positions] (positions that restart in every shard, for the test that must fail).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from hybrid_ds.config import load_config_dict
from hybrid_ds.models import layers
from hybrid_ds.models.head_loss import materialize
from hybrid_ds.models.sequence_parallel import SequenceShard
from hybrid_ds.runtime.engine import init_distributed
from hybrid_ds.runtime.parity import sample_batch
from hybrid_ds.runtime.pipeline import SequentialStages, world_shard
from hybrid_ds.runtime.plan import build_plan

CASES = [  # (preset, stages, document mask, fused loss); mistral with a window of 8 tokens, a quarter of the sequence
    ("llama-tiny", 2, False, True),
    ("llama-tiny", 1, True, False),
    ("qwen2-tiny", 2, True, True),
    ("mistral-tiny", 2, True, False),
    ("mistral-tiny", 1, False, True),
    ("gpt2-tiny", 2, False, True),  # learned positions, the embedding tied to the head
]
SEQ = 32


def batch_of(vocab: int, documents: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    batch = sample_batch(vocab, SEQ, "causal_lm", batch=2, pad_last=3)
    mask = batch["attention_mask"]
    if documents:  # document ids (data.document_mask): documents straddling the shards, the padded tail 0
        mask = mask.clone()
        mask[0, 5:], mask[0, 19:] = 2, 3
        mask[1, 13:] = 2
        mask[1, SEQ - 3:] = 0
    return (batch["input_ids"], mask), batch["labels"]


def case(preset: str, stages: int, documents: bool, fused: bool, shard: SequenceShard) -> dict:
    model = {"name": preset, **({"overrides": {"sliding_window": 8}} if preset == "mistral-tiny" else {})}
    raw = {"model": model, "data": {"seq_len": SEQ, "document_mask": documents},
           "pipeline": {"stages": stages}, "train": {"fused_loss": fused}, "train_micro_batch_size_per_gpu": 2}
    plan = build_plan(load_config_dict(raw), world_size=stages)
    whole, sharded = SequentialStages(plan), SequentialStages(plan, sequence=shard)
    inputs, labels = batch_of(plan.resolved.hf_config.vocab_size, documents)
    results = []
    for pipe in (whole, sharded):
        for module in pipe.modules():
            module.eval()  # no dropout
        outputs = pipe.forward(inputs)
        loss = pipe.loss_fn(outputs, labels)
        loss.backward()
        results.append((loss.detach(), materialize(outputs).detach(), pipe.named_gradients()))
    (loss, logits, grads), (shard_loss, shard_logits, shard_grads) = results
    dist.all_reduce(shard_loss, group=shard.group)
    for g in shard_grads.values():
        dist.all_reduce(g, group=shard.group)
    assert shard_grads.keys() == grads.keys()
    return {"case": f"{preset} pp={stages}{' documents' if documents else ''}{' fused' if fused else ''}",
            "loss": abs(shard_loss - loss).item() / loss.item(),
            "logits": (shard_logits - logits[:, shard.of(SEQ)]).abs().max().item(),
            "grads": max(((shard_grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                         for k, g in grads.items())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--break", dest="broken", choices=["positions"])
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()  # hybrid_ds's: gloo on CPU, without compiling DeepSpeed's shm op
    torch.set_num_threads(1)
    if args.broken == "positions":
        layers._shard_of = lambda positions, part: None if positions is None else positions[:, :part.stop - part.start]
    shard = world_shard()
    results = [case(*c, shard) for c in CASES]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        keys = ("loss", "logits", "grads")
        for i, r in enumerate(results):
            print(json.dumps({**r, **{k: max(rank[i][k] for rank in gathered) for k in keys}}))
        print(json.dumps({"worst": [max(rank[i][k] for rank in gathered for i in range(len(results))) for k in keys]}))


if __name__ == "__main__":
    main()
