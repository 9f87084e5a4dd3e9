"""Optimizer defaults that train well: weight decay only on matrices, bf16 gradients summed in fp32.

Parameter groups are also checked end to end: tests/test_pipeline_multiproc.py's reference trains the Hugging Face
model with the same groups and the pipeline's parameters must match it after every step.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from hybrid_ds.config import ModelConfig, TrainConfig, load_config_dict
from test_config import effective
from hybrid_ds.runtime.engine import parameter_groups
from hybrid_ds.models.resolve import resolve_model
from hybrid_ds.runtime.plan import build_plan

DEFAULT = TrainConfig.model_fields["no_weight_decay"].default


def tiny_hf_config(name: str):
    return resolve_model(ModelConfig(name=name)).hf_config


def _names(model: torch.nn.Module, params: list) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in params}


def test_gpt2_decays_only_its_matrices():
    """GPT-2: the Conv1D weights decay; biases, LayerNorm gains, wte (tied to lm_head) and wpe do not."""
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config("gpt2-tiny"))
    decay, exempt = parameter_groups(model, DEFAULT)
    assert exempt["weight_decay"] == 0.0 and "weight_decay" not in decay   # the decay group takes the optimizer's
    decayed = _names(model, decay["params"])
    assert decayed == {n for n, p in model.named_parameters() if p.ndim == 2 and ".h." in n and n.endswith("weight")}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
            "transformer.h.0.attn.c_attn.bias", "transformer.h.0.ln_1.weight"} <= _names(model, exempt["params"])
    assert len(decay["params"]) + len(exempt["params"]) == len(list(model.parameters()))


def test_kinds_are_chosen_one_by_one():
    """An untied head decays (a matrix, not an nn.Embedding); each kind can be left out; [] is one flat list."""
    config = tiny_hf_config("llama-tiny")
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert not config.tie_word_embeddings
    decay, exempt = parameter_groups(model, DEFAULT)
    assert "lm_head.weight" in _names(model, decay["params"])
    assert _names(model, exempt["params"]) == {n for n, p in model.named_parameters()
                                               if p.ndim == 1 or n == "model.embed_tokens.weight"}
    _, norms = parameter_groups(model, ["norm"])
    assert _names(model, norms["params"]) == {n for n, p in model.named_parameters() if p.ndim == 1}
    flat = parameter_groups(model, [])
    assert isinstance(flat, list) and all(isinstance(p, torch.nn.Parameter) for p in flat)


def test_no_weight_decay_rejects_an_unknown_kind():
    from hybrid_ds.errors import UserError

    with pytest.raises(UserError, match="train.no_weight_decay"):
        load_config_dict({"model": {"name": "gpt2-tiny"}, "train": {"no_weight_decay": ["norms"]}})


@pytest.mark.parametrize("zero, given, expected", [
    (1, None, "fp32"), (2, None, "fp32"),        # bf16 with ZeRO-1/2: summed in fp32 unless asked otherwise
    (1, "bf16", "bf16"),                         # the config's own choice wins
    (0, None, None), (3, None, None),            # DeepSpeed's default: ZeRO-0 allows no other; ZeRO-3 sums in fp32
])
def test_bf16_accumulates_in_fp32_by_default(zero, given, expected):
    raw = {"model": {"name": "gpt2-tiny"}, "bf16": {"enabled": True}, "zero_optimization": {"stage": zero}}
    if given:
        raw["data_types"] = {"grad_accum_dtype": given}
    cfg = load_config_dict(raw)
    assert cfg.grad_accum_dtype == expected
    assert effective(cfg).get("data_types", {}).get("grad_accum_dtype") == expected


def test_fp32_runs_are_left_as_deepspeed_makes_them():
    cfg = load_config_dict({"model": {"name": "gpt2-tiny"}, "zero_optimization": {"stage": 1}})
    assert cfg.grad_accum_dtype is None and "data_types" not in effective(cfg)


def test_bf16_accumulation_over_many_micro_batches_warns():
    """The plan (shown by --dry-run and at the start of training) warns; at ZeRO-0 it names the stage to use."""
    base = {"model": {"name": "gpt2-tiny"}, "data": {"seq_len": 64}, "bf16": {"enabled": True},
            "train_micro_batch_size_per_gpu": 1}
    bf16 = {**base, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "bf16"}}
    few, many = (build_plan(load_config_dict({**bf16, "gradient_accumulation_steps": n}), 1) for n in (4, 8))
    assert not any("grad_accum_dtype" in w for w in few.warnings)
    assert any('bf16 sums the gradients of 8 micro-batches' in w and 'set it to "fp32"' in w for w in many.warnings)
    zero0 = build_plan(load_config_dict({**base, "gradient_accumulation_steps": 8}), 1)
    assert any("set zero_optimization.stage 1" in w for w in zero0.warnings)
    default = build_plan(load_config_dict({**base, "zero_optimization": {"stage": 1},
                                           "gradient_accumulation_steps": 8}), 1)
    assert not any("grad_accum_dtype" in w for w in default.warnings)


def test_every_stage_has_two_groups():
    """A last stage of only a final norm and a tied embedding has nothing to decay: its exempt parameters are split
    over two groups, both without decay, since DeepSpeed's ZeRO optimizers reduce the gradient norm once per group
    over all stages and a stage with fewer groups hangs the others (test_train_multiproc's ZeRO-2 run at pp=2)."""
    head = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(8), "embed": torch.nn.Embedding(16, 8)})
    groups = parameter_groups(head, DEFAULT)
    assert [g["name"] for g in groups] == ["no_decay:last", "no_decay"]
    assert all(g["weight_decay"] == 0.0 and g["params"] for g in groups)
    assert sum(len(g["params"]) for g in groups) == 3
    matrices = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    groups = parameter_groups(matrices, DEFAULT)
    assert [g["name"] for g in groups] == ["decay", "decay:last"] and all(g["params"] for g in groups)
    assert not any("weight_decay" in g for g in groups)   # both take the optimizer's
