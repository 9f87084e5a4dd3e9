"""On every rank of a sequence-parallel group (the whole world): one Hugging Face decoder layer run on this rank's
shard of the tokens, its attention exchanging over the group (hybrid_ds.models.sequence_parallel), against the same
layer on the whole sequence in this process. Prints one JSON line per case from rank 0: the largest differences of
the output, of the input's gradient (this rank's shard) and of the weights' gradients (summed over the group).

Usage: ulysses_layer.py [--kv-heads 2] [--break {positions,shard}] (a deliberately wrong shard, for the test that
must fail). Four heads; the group's size must divide the key/value heads.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.distributed as dist
from transformers import AutoConfig

from hybrid_ds.config.families import FAMILIES
from hybrid_ds.models.masks import attention_mask_4d, position_ids
from hybrid_ds.models.sequence_parallel import SequenceShard, use_sequence_parallel
from hybrid_ds.runtime.engine import init_distributed
from hybrid_ds.runtime.pipeline import world_shard

CASES = [  # (model type, attention, documents, extra config)
    ("llama", "sdpa", False, {}),
    ("llama", "eager", True, {}),
    ("qwen2", "sdpa", True, {}),
    ("mistral", "sdpa", False, {"sliding_window": 8}),
    ("mistral", "eager", True, {"sliding_window": 8}),
]
BATCH, SEQ = 2, 32


def documents_of(seq: int) -> torch.Tensor:
    """Document ids of two rows: documents that straddle shard boundaries, and a padded tail."""
    ids = torch.ones(BATCH, seq, dtype=torch.long)
    ids[0, 5:], ids[0, 19:] = 2, 3
    ids[1, 13:], ids[1, seq - 3:] = 2, 0
    return ids


def case(model_type: str, attn: str, documents: bool, extra: dict, shard: SequenceShard, broken: str | None,
         kv_heads: int) -> dict:
    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                  num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=64, **extra)
    config._attn_implementation = attn
    family = FAMILIES[model_type]
    torch.manual_seed(0)
    module = __import__(f"transformers.models.{model_type}.modeling_{model_type}", fromlist=["x"])
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[model_type]
    layer = getattr(module, f"{prefix}DecoderLayer")(config, 0).train()
    rotary = getattr(module, f"{prefix}RotaryEmbedding")(config)
    hidden = torch.randn(BATCH, SEQ, 64)
    weight = torch.randn(BATCH, SEQ, 64)
    mask2d = documents_of(SEQ) if documents else torch.ones(BATCH, SEQ, dtype=torch.long)

    def run(layer, hidden, positions, mask_positions):
        mask = attention_mask_4d(family, layer.self_attn.config, 0, torch.empty(BATCH, SEQ, 0), mask2d,
                                 mask_positions, documents)
        out = layer(hidden, attention_mask=mask, position_ids=positions,
                    position_embeddings=rotary(hidden, position_ids=positions))
        return out

    whole = hidden.clone().requires_grad_()
    positions = position_ids(family, mask2d, documents)
    out = run(layer, whole, positions, positions)
    (out * weight).sum().backward()

    sp_layer = copy.deepcopy(layer)
    sp_layer.zero_grad()
    use_sequence_parallel(sp_layer.self_attn.config, shard)
    part = shard.of(SEQ)
    if broken == "shard":  # every rank takes the first shard's tokens
        part = slice(0, SEQ // shard.size)
    mine = hidden[:, part].clone().requires_grad_()
    shard_positions = positions.expand(BATCH, -1)[:, part]
    if broken == "positions":  # positions that restart in every shard
        shard_positions = position_ids(family, mask2d[:, :SEQ // shard.size], documents).expand(BATCH, -1)
    sp_out = run(sp_layer, mine, shard_positions, positions)
    (sp_out * weight[:, shard.of(SEQ)]).sum().backward()
    grads = [p.grad.clone() for p in sp_layer.parameters()]
    for g in grads:
        dist.all_reduce(g, group=shard.group)
    return {"case": f"{model_type}/{attn}/{'documents' if documents else 'causal'}",
            "output": (sp_out - out[:, shard.of(SEQ)]).abs().max().item(),
            "input_grad": (mine.grad - whole.grad[:, shard.of(SEQ)]).abs().max().item(),
            # relative to each weight's gradient: the group sums partial gradients in another order
            "weight_grads": max(((g - p.grad).abs().max() / p.grad.abs().max()).item()
                                for g, p in zip(grads, layer.parameters()))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--break", dest="broken", choices=["positions", "shard"])
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()  # hybrid_ds's: gloo on CPU, without compiling DeepSpeed's shm op
    shard = world_shard()
    torch.set_num_threads(1)
    results = [case(*c, shard, args.broken, args.kv_heads) for c in CASES]
    worst = [max(r[k] for r in results) for k in ("output", "input_grad", "weight_grads")]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, worst)
    if dist.get_rank() == 0:
        for r in results:
            print(json.dumps(r))
        print(json.dumps({"worst": [max(w[i] for w in gathered) for i in range(3)]}))


if __name__ == "__main__":
    main()
