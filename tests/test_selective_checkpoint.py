"""``train.selective_checkpoint``: one part of every block (its attention or its MLP) recomputed in backward computes
bit for bit what the block computes without it and keeps fewer activations; what it cannot run with is one line; the
estimator drops that part's saved tensors. ``model.attn_implementation: flex_attention`` (GPU only: no CPU backward)
is refused on CPU in one line, and its forward on packed documents is checked here against sdpa's."""

from __future__ import annotations

import pytest
import torch

from hybrid_ds.config import load_config_dict
from hybrid_ds.config.checks import check_device
from hybrid_ds.errors import UserError
from hybrid_ds.runtime.parity import check_parity
from hybrid_ds.runtime.plan import build_plan


def config(name: str, part: str | None, overrides: dict | None = None, **top):
    train = {"selective_checkpoint": part, **top.pop("train", {})}
    return load_config_dict({"model": {"name": name, "overrides": overrides or {}}, "data": {"seq_len": 32},
                             "train": train, "train_micro_batch_size_per_gpu": 2, **top})


def stages_of(cfg, stages: int = 1):
    from hybrid_ds.runtime.pipeline import SequentialStages

    return SequentialStages(build_plan(cfg, world_size=stages))


def run(name: str, part: str | None, overrides: dict | None = None):
    """Loss, gradients and the bytes autograd saved in forward, of a training-mode step (dropout on) of 2 stages."""
    from hybrid_ds.runtime.parity import sample_batch

    pipe = stages_of(config(name, part, overrides, pipeline={"stages": 2}), stages=2)
    batch = sample_batch(pipe.plan.resolved.hf_config.vocab_size, 32, "causal_lm")
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.untyped_storage().nbytes() if tensor.layout == torch.strided else 0)
        return tensor

    torch.manual_seed(7)  # the same dropout masks with and without
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = pipe.loss_fn(pipe.forward((batch["input_ids"], batch["attention_mask"])), batch["labels"])
    loss.backward()
    return loss.detach(), pipe.named_gradients(), sum(saved)


@pytest.mark.parametrize("name, part, overrides", [
    ("gpt2-tiny", "attention", {}),                        # dropout in attention and after it: the masks restored
    ("llama-tiny", "mlp", {}),
    ("mixtral-tiny", "mlp", {"output_router_logits": True}),  # the router's logits, made inside, feed the loss
])
def test_a_recomputed_part_computes_what_the_block_computes(name, part, overrides):
    loss, grads, saved = run(name, None, overrides)
    part_loss, part_grads, part_saved = run(name, part, overrides)
    assert torch.equal(part_loss, loss)
    assert grads.keys() == part_grads.keys()
    assert all(torch.equal(part_grads[key], g) for key, g in grads.items())
    assert part_saved < 0.9 * saved, (part_saved, saved)


@pytest.mark.parametrize("make, key, says", [
    (lambda: stages_of(config("bert-tiny", "mlp")), "train.selective_checkpoint", "no mlp module"),
    (lambda: stages_of(config("opt-tiny", "mlp")), "train.selective_checkpoint", "use 'attention'"),
    (lambda: config("llama-tiny", "mlp", pipeline={"activation_checkpoint_interval": 1}),
     "train.selective_checkpoint", "whole layers"),
    (lambda: config("llama-tiny", "mlp", pipeline={"stages": 2, "schedule": "zb-h1"}), "pipeline.schedule",
     "selective_checkpoint 'mlp'"),
    (lambda: config("llama-tiny", "mlp", train={"tiled_mlp": 2}), "train.selective_checkpoint", "tile by tile"),
    (lambda: config("llama-tiny", "attention", pipeline={"sequence_parallel": 2}), "train.selective_checkpoint",
     "all-to-all"),
    (lambda: config("llama-tiny", "mlp", zero_optimization={"stage": 2}), "train.selective_checkpoint",
     "needs the pipeline engine"),
    (lambda: check_device(config("llama-tiny", None, model={"name": "llama-tiny",
                                                             "attn_implementation": "flex_attention"}), "cpu"),
     "model.attn_implementation", "GPUs only"),
    (lambda: build_plan(config("gpt2-tiny", None, model={"name": "gpt2-tiny", "attn_implementation": "flex_attention"}),
                        world_size=1), "model.attn_implementation", "GPT2LMHeadModel does not support FlexAttention"),
    (lambda: build_plan(config("bert-tiny", None, model={"name": "bert-tiny", "attn_implementation": "flex_attention"}),
                        world_size=1), "model.attn_implementation", "attention_probs_dropout_prob is 0.1"),
    (lambda: check_parity(config("llama-tiny", None, model={"name": "llama-tiny",
                                                             "attn_implementation": "flex_attention"}), 1),
     "model.attn_implementation", "GPUs only"),  # hybrid-ds parity runs on the CPU
])
def test_what_cannot_be_recomputed_is_one_line(make, key, says):
    with pytest.raises(UserError) as err:
        make()
    assert err.value.key == key and says in err.value.message and "\n" not in str(err.value), err.value


def test_the_estimator_drops_the_recomputed_part():
    """Llama-3-8B at 8k tokens: every block no longer keeps its MLP's intermediates (or its attention's q, k, v,
    output and log-sum-exp), and one block's is the stage's working set while its backward recomputes it."""
    from dataclasses import replace

    from hybrid_ds.estimate.activations import block_activation_terms
    from hybrid_ds.estimate.architecture import arch_from_preset
    from hybrid_ds.estimate.run import Run, run_from_config
    from hybrid_ds.estimate.stages import RECOMPUTED_TERMS, stage_estimates

    arch = arch_from_preset("llama3-8b")
    run = Run(arch, 2, 2, 1, 1, 8, 8192, zero=1, precision="bf16", fused_loss=True)
    terms = block_activation_terms(arch, 8192, 1, "bf16")
    for part in ("attention", "mlp"):
        dropped = sum(terms.get(k, 0.0) for k in RECOMPUTED_TERMS[part])
        assert dropped > 0.05 * sum(terms.values())
        for whole, selective in zip(stage_estimates(run), stage_estimates(replace(run, selective_checkpoint=part))):
            assert whole.activations - selective.activations == pytest.approx(
                whole.blocks * whole.in_flight * dropped - dropped)
    assert run_from_config(config("llama-tiny", "mlp"), 1).selective_checkpoint == "mlp"


def test_the_estimator_counts_the_recomputed_forward():
    """The step's hardware FLOPs grow by the recomputed part's forward: each block's MLP (or attention) once more per
    token; whole blocks with activation checkpointing, the MLP with train.tiled_mlp."""
    from dataclasses import replace

    from hybrid_ds.estimate.architecture import arch_from_preset
    from hybrid_ds.estimate.flops import block_flops
    from hybrid_ds.estimate.run import Run
    from hybrid_ds.estimate.step import estimate

    arch = arch_from_preset("llama3-8b")
    run = Run(arch, 2, 2, 1, 1, 8, 8192, zero=1, precision="bf16", fused_loss=True)
    base = estimate(run)
    assert base.hardware_flops == base.model_flops
    for change, part in (({"selective_checkpoint": "mlp"}, "mlp"), ({"selective_checkpoint": "attention"}, "attention"),
                         ({"tiled_mlp": 4}, "mlp"), ({"checkpoint_interval": 1}, None)):
        extra = estimate(replace(run, **change)).hardware_flops - base.hardware_flops
        assert extra == pytest.approx(run.tokens_per_step * arch.layers * block_flops(arch, 8192, 0, part)), change
