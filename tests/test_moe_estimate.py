"""The estimator on Mixture-of-Experts models: total and active parameters against the model cards and the meta
model, FLOPs per token with the top-k experts, partitions by active (flops) and all (parameters) experts."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from hybrid_ds.config import presets
from hybrid_ds.estimate.architecture import Experts, arch_from_preset
from hybrid_ds.config import ModelConfig, load_config_dict
from hybrid_ds.estimate.flops import block_flops, forward_flops_per_token
from hybrid_ds.estimate.run import partition, run_from_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hybrid_ds.models.resolve import count_params, meta_model, resolve_model  # noqa: E402
from hybrid_ds.models.shape import model_arch  # noqa: E402
from test_families import assert_counts_match  # noqa: E402
from test_generic_adapter import saved, tiny_config  # noqa: E402

MOE_PRESETS = ["mixtral-8x7b", "qwen3-30b-a3b"]


def inactive_by_name(model, top_k: int) -> int:
    """Elements of the routed experts a token skips, found by name ("mlp.experts.") instead of by structure."""
    experts = [p for name, p in model.named_parameters() if ".mlp.experts." in name]
    return sum(p.numel() - p.numel() * top_k // p.shape[0] for p in experts)


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_total_and_active_parameters_match_the_model_card(name):
    """Mixtral-8x7B: 46.7B total, 12.9B per token; Qwen3-30B-A3B: 30.5B total, 3.3B activated."""
    preset = presets.get_preset(name)
    arch = model_arch(ModelConfig(name=name))
    skeleton = meta_model(resolve_model(ModelConfig(name=name)))
    assert arch.params == count_params(skeleton)
    assert arch.active_params == arch.params - inactive_by_name(skeleton, skeleton.config.num_experts_per_tok)
    assert arch.params == pytest.approx(preset.published_params, rel=0.01)
    assert arch.active_params == pytest.approx(preset.published_active, rel=0.02)


@pytest.mark.parametrize("model_type, overrides", [
    ("mixtral", {}),
    ("qwen3_moe", dict(moe_intermediate_size=32, mlp_only_layers=[1])),   # block 1 dense
])
def test_moe_counts_match_the_meta_model(model_type, overrides, tmp_path):
    """A saved tiny MoE folder (read on the meta device, as any model the generic adapter maps): per layer and
    per stage as the plan counts them, and the experts a token skips as found by name."""
    folder = saved(tmp_path, tiny_config(model_type, **overrides))
    model = ModelConfig(name=folder, pretrained=True)
    assert_counts_match(model)
    arch, skeleton = model_arch(model), meta_model(resolve_model(model))
    assert arch.experts.count == 4 and arch.experts.top_k == 2
    assert arch.active_params == arch.params - inactive_by_name(skeleton, 2) < arch.params
    assert sum(arch.stage_expert_params([0, 2, arch.layers + 2])) == sum(arch.experts.routed)
    assert (arch.experts.routed[1] == 0) == (model_type == "qwen3_moe")


def test_forward_flops_are_twice_the_active_parameters_plus_attention():
    """Two ways to the same number for Mixtral-8x7B: per-block formulas (attention from its shape, the MoE layer
    from the elements a token passes) against 2 FLOPs per active weight plus the s x s attention products."""
    arch, seq = model_arch(ModelConfig(name="mixtral-8x7b")), 2048
    norms = 2 * arch.hidden * arch.layers + arch.hidden
    matmul_weights = arch.active_params - arch.vocab * arch.hidden - norms   # the embedding is a lookup
    expected = 2 * matmul_weights + arch.layers * 4 * seq * arch.heads * arch.head_dim
    assert forward_flops_per_token(arch, seq) == pytest.approx(expected, rel=1e-9)
    assert forward_flops_per_token(arch, seq) == pytest.approx(26.57e9, rel=1e-3)   # 12.9B active, seq 2048
    dense = replace(arch, experts=replace(arch.experts, top_k=arch.experts.count))   # every expert for every token
    extra = 2 * sum(arch.experts.routed) * (1 - arch.experts.top_k / arch.experts.count)
    assert forward_flops_per_token(dense, seq) - forward_flops_per_token(arch, seq) == pytest.approx(extra)


def test_flops_partition_counts_active_experts_and_the_plan_agrees(tmp_path):
    """4 blocks, the first two with 16 experts (top-2), the last two dense: "parameters" balances memory (the
    expert blocks weigh most), "flops" compute (each token uses 2 of 16 experts); the plan splits as predicted."""
    from hybrid_ds.runtime.plan import build_plan

    folder = saved(tmp_path, tiny_config("qwen3_moe", num_hidden_layers=4, num_experts=16, mlp_only_layers=[2, 3],
                                         moe_intermediate_size=128, intermediate_size=128))
    arch = model_arch(ModelConfig(name=folder, pretrained=True))
    splits = {}
    for method in ("flops", "parameters"):
        cfg = load_config_dict({"model": {"name": folder, "pretrained": True}, "data": {"seq_len": 64},
                                "pipeline": {"stages": 2, "partition": method}, "train_micro_batch_size_per_gpu": 1})
        splits[method] = partition(run_from_config(cfg, 2, arch))
        assert splits[method] == build_plan(cfg, 2).boundaries, method
    assert splits == {"parameters": [0, 2, 6], "flops": [0, 3, 6]}, (arch.layer_params(), arch.layer_active_params())


def test_block_flops_of_a_hand_made_moe_arch():
    """Pure arithmetic: 8 experts of 300 elements, top-2, and a 40-element router: a token passes 600 + 40."""
    arch = replace(arch_from_preset("llama-tiny"), experts=Experts(8, 2, (2400, 0, 0, 0), (40, 0, 0, 0)))
    dense = arch_from_preset("llama-tiny")
    mlp = 2 * dense.hidden * dense.ffn * 3
    assert block_flops(arch, 16, 0) == block_flops(dense, 16) - mlp + 2 * 640
    assert block_flops(arch, 16, 1) == block_flops(dense, 16)
    assert arch.layer_active_params()[1] == arch.layer_params()[1] - 1800


def test_compare_reports_active_parameters_expert_memory_and_flops(capsys):
    from hybrid_ds.cli import main

    assert main(["compare", "mixtral-8x7b", "--gpus", "32", "--stages", "4", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    est = entry["estimate"]
    assert est["params"] == 46_702_792_704 and est["active_params"] == 12_879_925_248
    assert est["experts"] == {"count": 8, "top_k": 2}
    stages = est["stage_estimates"]
    assert sum(s["expert_params"] for s in stages) == 32 * 8 * 3 * 4096 * 14336
    for s in stages:   # experts are 96.6% of Mixtral's parameters; each stage's states are mostly experts
        ratio = s["expert_state_bytes"] / (s["bytes"]["params"] + s["bytes"]["grads"] + s["bytes"]["master"]
                                           + s["bytes"]["optimizer_states"])
        assert math.isclose(ratio, s["expert_params"] / s["params"], rel_tol=1e-9) and ratio > 0.85
    assert est["forward_flops_per_token"] == pytest.approx(26.57e9, rel=1e-3)
    assert main(["compare", "mixtral-8x7b", "--gpus", "32", "--stages", "4"]) == 0
    out = capsys.readouterr().out
    assert "(46.7B, 12.9B active)" in out and "of it experts" in out
    assert main(["plan", "qwen3-30b-a3b", "--gpus", "16", "--top", "0"]) == 0
    assert "(30.5B, 3.4B active parameters)" in capsys.readouterr().out


def test_dry_run_estimate_shows_experts_per_stage(capsys, monkeypatch, tmp_path):
    from hybrid_ds.cli import main

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": {"name": "mixtral-tiny"}, "pipeline": {"stages": 2},
                                  "data": {"seq_len": 32}, "train_micro_batch_size_per_gpu": 1}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "254.8K, 156.5K active parameters" in out and "routed experts (states)" in out
    assert "98.3K = " in out and "with the top-2 of 4 experts" in out
