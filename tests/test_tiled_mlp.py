"""``train.tiled_mlp``: each block's MLP runs a tile of the sequence at a time (DeepSpeed's TiledMLP) and computes
what it computes on the whole sequence; what it cannot run with is one line. The engine runs with it under sequence
parallelism in tests/test_sequence_parallel_multiproc.py; the memory it saves in bench/tiled_mlp_memory.py."""

from __future__ import annotations

import pytest
import torch

from hybrid_ds.config import load_config_dict
from hybrid_ds.errors import UserError
from hybrid_ds.runtime.plan import build_plan


def config(name: str, tiles: int, overrides: dict | None = None, **top):
    return load_config_dict({"model": {"name": name, "overrides": overrides or {}}, "data": {"seq_len": 32},
                             "train": {"tiled_mlp": tiles}, "train_micro_batch_size_per_gpu": 2, **top})


def stages_of(cfg):
    from hybrid_ds.runtime.pipeline import SequentialStages

    return SequentialStages(build_plan(cfg, world_size=1))


def run(name: str, tiles: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    """Logits, gradients, and the rows each call of each block's MLP's first layer saw."""
    from hybrid_ds.models.head_loss import materialize
    from hybrid_ds.runtime.parity import sample_batch

    pipe = stages_of(config(name, tiles))
    for module in pipe.modules():
        module.eval()
    batch = sample_batch(pipe.plan.resolved.hf_config.vocab_size, 32, "causal_lm")
    calls: list[int] = []
    for _, module in pipe.layers_per_stage[0]:
        if hasattr(module, "layer"):  # a Block
            first = next(module.layer.mlp.children())
            first.register_forward_pre_hook(lambda m, args: calls.append(args[0].numel() // args[0].shape[-1]))
    outputs = pipe.forward((batch["input_ids"], batch["attention_mask"]))
    loss = pipe.hf_loss_fn(outputs, batch["labels"])
    loss.backward()
    return materialize(outputs).detach(), pipe.named_gradients(), calls


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "mixtral-tiny"])
def test_a_tiled_mlp_computes_what_the_mlp_computes(name):
    """4 tiles (Mixtral: its experts' layer routed tile by tile): logits within 1e-6 and every gradient within 1e-6 of
    its largest element (the weights' gradients are summed tile by tile); the MLP ran on 4 tiles of 16 of the batch's
    64 tokens, in forward and again in backward."""
    logits, grads, calls = run(name, 0)
    tiled_logits, tiled_grads, tiled_calls = run(name, 4)
    assert (tiled_logits - logits).abs().max() <= 1e-6
    assert grads.keys() == tiled_grads.keys()
    for key, g in grads.items():
        assert (tiled_grads[key] - g).abs().max() <= 1e-6 * max(g.abs().max().item(), 1e-6), key
    assert set(calls) == {64} and set(tiled_calls) == {16} and len(tiled_calls) == 2 * 4 * len(calls)


@pytest.mark.parametrize("make, key, says", [
    (lambda: stages_of(config("opt-tiny", 2)), "train.tiled_mlp", "no `mlp` module"),
    (lambda: stages_of(config("mixtral-tiny", 2, {"output_router_logits": True})), "train.tiled_mlp", "router loss"),
    (lambda: config("llama-tiny", 2, pipeline={"stages": 2, "schedule": "zb-h1"}), "pipeline.schedule", "tiled_mlp"),
    (lambda: config("llama-tiny", 2, train={"tiled_mlp": 2, "compile": True}), "train.compile", "tiled_mlp 2"),
    (lambda: config("llama-tiny", 2, zero_optimization={"stage": 2}), "train.tiled_mlp", "needs the pipeline engine"),
])
def test_what_cannot_be_tiled_is_one_line(make, key, says):
    with pytest.raises(UserError) as err:
        make()
    assert err.value.key == key and says in err.value.message and "\n" not in str(err.value), err.value


def test_the_estimator_keeps_one_tile_of_the_mlps_intermediates():
    """Llama-3-8B at 32k tokens: without tiles every block keeps its MLP's intermediates (gate, up, activation,
    product: 4 x 14,336 wide) per micro-batch in flight; with 8 tiles none is kept, and one tile of one block's is the
    stage's working set."""
    from dataclasses import replace

    from hybrid_ds.config import load_config_dict
    from hybrid_ds.estimate.activations import block_activation_terms
    from hybrid_ds.estimate.architecture import arch_from_preset
    from hybrid_ds.estimate.run import Run, run_from_config
    from hybrid_ds.estimate.stages import stage_estimates

    arch = arch_from_preset("llama3-8b")
    run = Run(arch, 2, 2, 1, 1, 8, 32768, zero=1, precision="bf16", fused_loss=True)
    mlp = block_activation_terms(arch, 32768, 1, "bf16")["mlp"]
    assert mlp == 4 * 2 * 32768 * 14336
    for whole, tiled in zip(stage_estimates(run), stage_estimates(replace(run, tiled_mlp=8))):
        assert whole.activations - tiled.activations == pytest.approx(whole.blocks * whole.in_flight * mlp - mlp / 8)
    cfg = load_config_dict({"model": {"name": "llama-tiny"}, "data": {"seq_len": 64}, "train": {"tiled_mlp": 4},
                            "train_micro_batch_size_per_gpu": 1})
    assert run_from_config(cfg, 1).tiled_mlp == 4
