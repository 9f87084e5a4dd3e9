"""LoRA through the pipeline (``model.lora``): each stage's adapters are peft's, and together they compute what
``get_peft_model`` computes on the whole Hugging Face model: loss, logits and every adapter gradient, at 1 and 2
stages, for the named families and the generic adapter's."""

from __future__ import annotations

import pytest
import torch

from hybrid_ds.config import load_config_dict
from hybrid_ds.errors import UserError
from hybrid_ds.models import lora
from hybrid_ds.runtime.parity import check_parity
from hybrid_ds.runtime.pipeline import SequentialStages
from hybrid_ds.runtime.plan import build_plan
from test_generic_adapter import ACCEPTED, ATTENTION, run_config, saved, tiny_config
from test_parity import FAMILIES

LORA = {"r": 4, "alpha": 8}


def config(name: str, **adapters) -> object:
    return load_config_dict({"model": {"name": name, "lora": {**LORA, **adapters}},
                             "train_micro_batch_size_per_gpu": 1, "data": {"seq_len": 16}})


def assert_parity(cfg) -> None:
    for stages in (1, 2):
        report = check_parity(cfg, stages)
        assert report.ok, "\n".join(report.lines())


@pytest.mark.parametrize("name", FAMILIES + ["mixtral-tiny", "qwen3-moe-tiny"])
def test_lora_matches_peft(name):
    """Every linear layer adapted (peft's all-linear); B set to random values so that A has gradients too."""
    assert_parity(config(name))


# peft refuses "all-linear" on Mamba layers (their out_proj and conv1d): these name their targets
NAMED_TARGETS = {"mamba2": ["in_proj"], "nemotron_h": ["in_proj", "q_proj", "v_proj", "up_proj"]}


@pytest.mark.parametrize("model_type", sorted(ACCEPTED))
def test_lora_matches_peft_for_the_generic_adapter(model_type, tmp_path):
    folder = saved(tmp_path, tiny_config(model_type, **ACCEPTED[model_type]))
    cfg = run_config(folder, ATTENTION.get(model_type, "sdpa"))
    targets = NAMED_TARGETS.get(model_type, "all-linear")
    assert_parity(cfg.replace(model={"lora": {**LORA, "target_modules": targets}}))
    if model_type in NAMED_TARGETS:
        with pytest.raises(UserError, match="peft: .* incompatible with Mamba-based models"):
            build_plan(cfg.replace(model={"lora": LORA}, data={"seq_len": 16}), world_size=1)


def test_named_targets_rank_stabilized_scaling_and_dropout():
    """Targets by name, alpha / sqrt(r), and dropout (off in eval mode, as peft's)."""
    assert_parity(config("llama-tiny", target_modules=["q_proj", "v_proj"], use_rslora=True, dropout=0.1, r=8))


def test_a_stage_without_its_adapters_fails_parity(monkeypatch):
    """The check that a whole stage's adapters are there: leave out the second stage's and parity fails."""
    real = lora.add_adapters

    def only_first_block(module, path, targets, cfg, seed):
        return module.requires_grad_(False) if path.endswith(".1") else real(module, path, targets, cfg, seed)

    monkeypatch.setattr("hybrid_ds.models.build.add_adapters", only_first_block)
    report = check_parity(config("gpt2-tiny"), stages=2)
    assert not report.ok
    assert report.unmatched_grads and all(".h.1." in name for name in report.unmatched_grads), report.unmatched_grads


def test_base_is_frozen_and_only_adapters_train():
    plan = build_plan(config("gpt2-tiny").replace(pipeline={"stages": 2, "partition": [1, 1]}), world_size=2)
    pipe = SequentialStages(plan)
    trainable = {n for n, p in pipe.named_parameters().items() if p.requires_grad}
    assert trainable and all(lora.is_adapter(n) for n in trainable)
    assert {n.rpartition(".lora_")[0] for n in trainable} == set(plan.lora_targets.paths())
    embedding = pipe.builders[0].built_modules()["transformer.wte"].weight
    assert not embedding.requires_grad  # the tied embedding, on both stages


def test_adapters_do_not_depend_on_the_layout():
    one = SequentialStages(build_plan(config("llama-tiny"), world_size=1)).named_parameters()
    two = SequentialStages(build_plan(config("llama-tiny").replace(pipeline={"stages": 2}), world_size=2))
    for name, param in two.named_parameters().items():
        assert torch.equal(param, one[name]), name


@pytest.mark.parametrize("targets, message", [
    (["nothing"], r"\['nothing'\]: peft: Target modules \{'nothing'\} not found in the base model"),
    (["lm_head"], "adapts 'lm_head', outside the transformer blocks"),
    (["attn"], r"\['attn'\]: peft: Target module GPT2Attention.* is not supported"),
])
def test_bad_targets_are_named(targets, message):
    with pytest.raises(UserError, match=message) as err:
        build_plan(config("gpt2-tiny", target_modules=targets), world_size=1)
    assert err.value.key == "model.lora.target_modules"


def test_a_linear_layer_with_its_own_forward_is_refused(tmp_path):
    """Phi-MoE's router is an nn.Linear whose forward returns a tuple: peft's adapter (in get_peft_model's model too)
    crashes on it, so all-linear is refused with the module named; naming the targets without it works."""
    folder = saved(tmp_path, tiny_config("phimoe", num_hidden_layers=2, num_local_experts=4))
    cfg = run_config(folder)
    with pytest.raises(UserError, match="adapts 'model.layers.0.mlp.router', a PhimoeTopKRouter"):
        build_plan(cfg.replace(model={"lora": LORA}, data={"seq_len": 16}), world_size=1)
    assert_parity(cfg.replace(model={"lora": {**LORA, "target_modules": ["q_proj", "v_proj"]}}))


def test_a_stage_with_nothing_to_train_is_refused():
    """A last stage of only the head (what "flops" gives a tiny model whose 50k-row head outweighs its blocks)."""
    with pytest.raises(UserError, match="stage 1 holds head and no LoRA adapter") as err:
        build_plan(config("gpt2-tiny").replace(pipeline={"stages": 2, "partition": [2, 0]}), world_size=2)
    assert err.value.key == "pipeline.partition"


def test_lora_needs_the_pipeline_engine():
    with pytest.raises(UserError, match="needs the pipeline engine"):
        load_config_dict({"model": {"name": "gpt2-tiny", "lora": LORA}, "zero_optimization": {"stage": 3}})
