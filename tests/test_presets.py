"""Presets match their sources (published parameter counts), and the tiny ones run real forwards."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from hybrid_ds.errors import UserError
from hybrid_ds.config.presets import PRESETS, describe, get_preset, is_preset, n_layers

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = sorted(name for name, p in PRESETS.items() if p.published_params is not None)
TINY = sorted(name for name, p in PRESETS.items() if p.published_params is None)
AUTO_CLASS = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM}

# Flat legacy kwargs that config classes move into `rope_parameters` (under another name for neox).
ROPE_KWARGS = {"rope_theta": "rope_theta", "rotary_pct": "partial_rotary_factor",
               "partial_rotary_factor": "partial_rotary_factor"}

# How each family normally treats its output head: Gemma, Qwen2 (small sizes), GPT-2, OPT and BERT
# tie it to the input embedding; Llama, Mistral, GPT-NeoX and Phi do not.
TIED_TINY = {"gpt2-tiny", "bert-tiny", "opt-tiny", "qwen2-tiny", "gemma-tiny"}


# Keys a config class does not declare but its model reads (getattr(config, "head_dim", hidden // heads)), and
# published config.json files set: Qwen3-30B-A3B's heads are 128 wide with hidden 2048 and 32 heads.
UNDECLARED = {"qwen3_moe": {"head_dim"}}


def hf_config(preset):
    return transformers.CONFIG_MAPPING[preset.model_type](**preset.config)


def build(preset, device):
    with torch.device(device):
        return AUTO_CLASS[preset.task].from_config(hf_config(preset))


def unique_params(model) -> int:
    # parameters() yields each Parameter once, so a tied embedding/head counts once.
    return sum(p.numel() for p in model.parameters())


def test_required_presets_exist():
    assert set(PUBLISHED) == {
        "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
        "gpt3-125m", "gpt3-350m", "gpt3-760m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b",
        "gpt3-175b", "bert-base", "bert-large", "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b",
        "mixtral-8x7b", "qwen3-30b-a3b"}
    # One tiny preset per family, and per Mixture-of-Experts type the generic adapter maps.
    assert sorted(PRESETS[name].model_type for name in TINY) == sorted(
        ["gpt2", "bert", "llama", "mistral", "qwen2", "gpt_neox", "opt", "gemma", "phi", "mixtral", "qwen3_moe"])


@pytest.mark.parametrize("name", PUBLISHED)
def test_param_count_matches_published(name):
    preset = get_preset(name)
    model = build(preset, "meta")
    assert all(p.is_meta for p in model.parameters()), "meta build allocated real memory"
    measured = unique_params(model)
    assert measured == pytest.approx(preset.published_params, rel=0.02), (
        f"{name}: {measured:,} parameters, published {preset.published_params:,}")


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_runs_forward(name):
    preset = get_preset(name)
    model = build(preset, "cpu").eval()
    vocab = hf_config(preset).vocab_size
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 40, vocab)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_is_small_and_rotary_friendly(name):
    preset, cfg = get_preset(name), hf_config(get_preset(name))
    assert 2 <= n_layers(preset) <= 4
    assert 32 <= cfg.hidden_size <= 64 and cfg.num_attention_heads == 4
    assert 256 <= cfg.vocab_size <= 512 and cfg.max_position_embeddings >= 128
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rotary = getattr(cfg, "rope_parameters", None)
    if rotary:  # rotary splits each head (or its rotary part) into two halves
        assert int(head_dim * rotary.get("partial_rotary_factor", 1.0)) % 2 == 0
    assert head_dim % 2 == 0


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_ties_head_as_its_family_does(name):
    model = build(get_preset(name), "meta")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (name in TIED_TINY)


def test_tiny_presets_keep_family_quirks():
    llama, gemma = hf_config(get_preset("llama-tiny")), hf_config(get_preset("gemma-tiny"))
    assert (llama.num_attention_heads, llama.num_key_value_heads) == (4, 2)
    assert gemma.num_key_value_heads == 1 and gemma.head_dim == 16
    assert hf_config(get_preset("gpt-neox-tiny")).rope_parameters["partial_rotary_factor"] == 0.25
    assert hf_config(get_preset("phi-tiny")).rope_parameters["partial_rotary_factor"] == 0.5
    assert hf_config(get_preset("mistral-tiny")).sliding_window < 128


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_keys_exist_and_take_effect(name):
    # Config classes accept any kwarg silently, so a misspelt key would just be ignored.
    preset = get_preset(name)
    config_class = transformers.CONFIG_MAPPING[preset.model_type]
    defaults = {**config_class().to_dict(), **getattr(config_class, "attribute_map", {})}
    unknown = set(preset.config) - set(defaults) - set(ROPE_KWARGS) - UNDECLARED.get(preset.model_type, set())
    assert not unknown, f"{name}: keys the config class does not know: {sorted(unknown)}"
    cfg = hf_config(preset)
    for key, value in preset.config.items():
        actual = cfg.rope_parameters[ROPE_KWARGS[key]] if key in ROPE_KWARGS else getattr(cfg, key)
        assert actual == value, f"{name}.{key}"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_describe_agrees_with_hf_config(name):
    preset = get_preset(name)
    cfg = hf_config(preset)
    info = describe(preset)
    assert info["name"] == name and info["family"] == cfg.model_type
    assert info["layers"] == n_layers(preset) == cfg.num_hidden_layers
    assert (info["hidden"], info["heads"]) == (cfg.hidden_size, cfg.num_attention_heads)
    assert info["published"] == preset.published_params


@pytest.mark.parametrize("name", ["llama3-8b", "gpt-neox-tiny", "phi-tiny"])
def test_building_a_config_leaves_the_preset_unchanged(name):
    # Config classes fill nested dicts (rope_parameters) in place; presets are shared data.
    preset = get_preset(name)
    before = copy.deepcopy(preset.config)
    build(preset, "meta")
    assert preset.config == before


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UserError) as err:
        get_preset("lama-tiny")
    assert err.value.key == "model.name"
    assert "'lama-tiny'" in err.value.message and "'llama-tiny'" in err.value.message
    with pytest.raises(UserError, match="gpt3-1.3b"):
        get_preset("gpt3-1.3B")


def test_is_preset():
    assert is_preset("gpt2-tiny") and not is_preset("gpt2-tinyy")


def test_names_are_lowercase_dashes_and_sourced():
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert re.fullmatch(r"[a-z0-9]+(?:[.-][a-z0-9]+)*", name), name
        assert preset.source.strip(), name


def test_presets_module_does_not_import_torch():
    code = "import sys, hybrid_ds.config.presets; assert 'torch' not in sys.modules, 'torch'; " \
           "assert 'transformers' not in sys.modules, 'transformers'"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
