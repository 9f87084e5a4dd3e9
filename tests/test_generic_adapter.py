"""The generic decoder-only adapter: models with no named family match Hugging Face, or are refused clearly.

Each accepted model is a tiny random model saved to a folder and compared with ``check_parity`` on one
and two stages. Each refused one raises a one-line UserError that names the model type, what could
not be mapped, the named families and how to add one.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hybrid_ds.config import load_config_dict  # noqa: E402
from hybrid_ds.errors import UserError  # noqa: E402
from hybrid_ds.config.families import FAMILIES  # noqa: E402
from hybrid_ds.models.resolve import get_family  # noqa: E402
from hybrid_ds.models.generic import generic_family, meta_causal_lm  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            num_local_experts=4, num_experts_per_tok=2)


def tiny_config(model_type: str, **overrides):
    """A tiny config of ``model_type``: the TINY sizes its config class knows, then ``overrides``."""
    cls = transformers.CONFIG_MAPPING[model_type]
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    return cls(**{k: v for k, v in {**TINY, **overrides}.items() if k in known or k in overrides})


def saved(tmp_path, config) -> str:
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    return str(tmp_path)


def run_config(folder: str, attn: str = "sdpa"):
    return load_config_dict({"model": {"name": folder, "pretrained": True, "attn_implementation": attn},
                             "train_micro_batch_size_per_gpu": 1})


# model_type -> overrides. What each adds beyond Llama's layout, and so what the parity check covers:
ACCEPTED = {
    "qwen3": dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=4,  # q/k norms; full and
                  max_window_layers=2),                                           # sliding layers (window 4 < 16)
    "olmo2": {},                           # norms after attention and MLP, q/k norms
    "starcoder2": dict(sliding_window=4),  # LayerNorm with biases; one sliding mask for all layers, no layer_types;
                                           # tied head through the generic path
    "stablelm": {},                        # partial rotary, LayerNorm
    "helium": {},                          # Llama-like, untied head
    "smollm3": dict(num_hidden_layers=4),  # rotary skipped in some layers (no_rope_layers), inside the block; tied
    "exaone4": dict(num_hidden_layers=4, sliding_window=4),  # sliding and full layers, post-norms
    "gptj": dict(n_embd=64, n_head=4, rotary_dim=8, n_positions=128),  # no rotary module: it is inside attention
    "jetmoe": dict(num_hidden_layers=2),   # mixture-of-experts blocks (attention experts too), tied head
    # hybrids: linear-attention / SSM / conv layers get the 2-D padding mask (create_recurrent_attention_mask)
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1),  # Mamba and attention layers
    "qwen3_next": dict(num_hidden_layers=4, full_attention_interval=2,  # gated delta-net and attention layers
                       num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,  # (its default
                       linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,  # 512 experts
                       linear_num_value_heads=4),                                                # take minutes)
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"], num_hidden_layers=4,
                     num_dense_layers=1, num_experts=4, moe_intermediate_size=32),  # short convolutions
    "mamba2": dict(num_heads=8, num_hidden_layers=2),  # no attention, no position ids; eager (no sdpa)
    "doge": {},                            # every mask made with allow_is_causal_skip=False
    "nemotron_h": dict(num_hidden_layers=4, layer_types=["linear_attention", "moe", "full_attention", "mlp"],
                       mamba_num_heads=8, mamba_head_dim=16, moe_intermediate_size=32,  # MLP and MoE layers:
                       moe_shared_expert_intermediate_size=32),                         # no mask at all
    "olmo_hybrid": dict(num_hidden_layers=4),  # (cos, sin) for its attention layers only, none for linear ones
    "bamba": dict(num_hidden_layers=4, attn_layer_indices=[1, 3], mamba_n_heads=8),  # blocks return (hidden,
                                                                                     # attention weights)
    # position ids arange(T) expanded to (4, B, T): row 0 to masks and blocks, rows 1-3 to the 3-axis rotary
    "qwen3_5_text": dict(num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2,
                         linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                         linear_num_value_heads=4),
}
ATTENTION = {"mamba2": "eager"}  # model.attn_implementation where the model has no sdpa

# model_type -> (overrides, what the error must say). Each is refused for a structural reason.
REFUSED = {
    "t5": ({}, "encoder-decoder"),
    "bart": (dict(d_model=64, encoder_layers=1, decoder_layers=1), "encoder-decoder"),
    "gemma4_text": ({}, "embed_tokens_per_layer"),                                   # per-layer embeddings
    "bloom": (dict(n_layer=2, n_head=4), "requires alibi"),                          # ALiBi bias from the mask
    "mamba": (dict(num_hidden_layers=2), "attention mask that no masking_utils helper made"),
    "glm_moe_dsa": ({}, "block 1 gets prev_topk_indices=Unused"),  # uses what block 0 returns after the hidden states
}


@pytest.mark.parametrize("model_type", sorted(ACCEPTED))
def test_generic_adapter_matches_hugging_face(model_type, tmp_path):
    from hybrid_ds.runtime.parity import check_parity

    assert model_type not in FAMILIES
    config = tiny_config(model_type, **ACCEPTED[model_type])
    folder = saved(tmp_path, config)
    for stages in (1, 2):
        report = check_parity(run_config(folder, ATTENTION.get(model_type, "sdpa")), stages)
        assert report.exact, "\n".join(report.lines())  # bit for bit, as the named families (fp32, CPU)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_generic_adapter_refuses_what_it_cannot_map(model_type):
    overrides, reason = REFUSED[model_type]
    config = tiny_config(model_type, **overrides)
    with pytest.raises(UserError) as err:
        get_family(model_type, config)
    message = str(err.value)
    assert "\n" not in message
    assert f"model_type {model_type!r}" in message and reason in message, message
    assert "named families: " in message and "to add one, add a Family entry" in message


def test_refusal_reaches_the_user_from_the_config(tmp_path):
    """Through the whole path a run takes: config -> plan. A model whose parity would fail is never built."""
    from hybrid_ds.runtime.plan import build_plan

    folder = saved(tmp_path, tiny_config("starcoder2", embedding_dropout=0.1))
    with pytest.raises(UserError, match="model_type 'starcoder2'.* applies dropout to the hidden states between the"):
        build_plan(run_config(folder), world_size=1)


def test_parity_would_catch_what_the_adapter_refuses(tmp_path, monkeypatch):
    """Granite mapped as if it were Llama (its embedding and logit multipliers dropped) fails parity."""
    from hybrid_ds.config.families import _decoder
    from hybrid_ds.runtime.parity import check_parity
    from hybrid_ds.config.shapes import DecoderDefaults

    monkeypatch.setitem(FAMILIES, "granite", _decoder("granite", "GraniteDecoderLayer", DecoderDefaults()))
    folder = saved(tmp_path, tiny_config("granite", embedding_multiplier=12.0, logits_scaling=8.0))
    report = check_parity(run_config(folder), stages=1)
    assert not report.ok and report.max_logit_diff > 1e-2, "\n".join(report.lines())


def test_dropout_outside_modules_is_accepted_only_when_it_does_nothing():
    """StarCoder2 applies embedding dropout as a function: fine at p=0, not reproducible at p>0."""
    assert get_family("starcoder2", tiny_config("starcoder2")).embedding == ()
    with pytest.raises(UserError, match="applies dropout to the hidden states"):
        get_family("starcoder2", tiny_config("starcoder2", embedding_dropout=0.1))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma", "phi", "gpt_neox"])
def test_generic_adapter_finds_what_the_named_families_say(model_type):
    """On the named families of this layout the generic mapping equals the hand-written one."""
    named = FAMILIES[model_type]
    found = generic_family(model_type, meta_causal_lm(model_type, tiny_config(model_type)))
    fields = ("token_embedding", "embedding", "blocks", "final", "output", "rotary", "positions", "task",
              "block_class")
    assert {f: getattr(found, f) for f in fields} == {f: getattr(named, f) for f in fields}


def test_named_families_come_first_and_unknown_types_without_a_config_are_refused():
    assert get_family("llama") is FAMILIES["llama"]
    assert get_family("llama", tiny_config("llama")) is FAMILIES["llama"]
    with pytest.raises(UserError, match="model_type 'qwen3' is not supported; supported: .*to add one"):
        get_family("qwen3")


def test_the_trace_leaves_the_model_and_transformers_as_they_were():
    """The meta-device trace patches mask helpers, block forwards and the loss: all restored, refused or not."""
    import importlib

    from transformers import masking_utils

    helper = masking_utils.create_causal_mask
    for model_type, overrides, refused in (("granite", {}, False), ("starcoder2", dict(embedding_dropout=0.1), True)):
        skeleton = meta_causal_lm(model_type, tiny_config(model_type, **overrides))
        if refused:
            with pytest.raises(UserError):
                generic_family(model_type, skeleton)
        else:
            generic_family(model_type, skeleton)
        modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        assert masking_utils.create_causal_mask is helper and modeling.create_causal_mask is helper
        assert all("forward" not in vars(block) for block in skeleton.model.layers)
        assert "_loss_function" not in vars(skeleton)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in skeleton.modules())
        assert skeleton.training


def test_linear_attention_layers_need_the_recurrent_mask(tmp_path, monkeypatch):
    """Qwen3-Next's gated delta-net layers without their padding mask (the pads leak into the state) fail parity."""
    from hybrid_ds.models import layers, masks
    from hybrid_ds.runtime.parity import check_parity

    def no_padding_mask(family, config, index, *args):
        linear = config.layer_types[index] == "linear_attention"
        return None if linear else masks.attention_mask_4d(family, config, index, *args)

    assert masks.LAYER_HELPERS["linear_attention"] == ("create_recurrent_attention_mask", {})
    folder = saved(tmp_path, tiny_config("qwen3_next", **ACCEPTED["qwen3_next"]))
    monkeypatch.setattr(layers, "attention_mask_4d", no_padding_mask)  # the glue only: the adapter still accepts
    report = check_parity(run_config(folder), stages=1)
    assert not report.exact and report.max_logit_diff > 1e-3, "\n".join(report.lines())


def test_a_model_that_never_skips_its_causal_mask_gets_it_materialized():
    """Doge adds its dynamic mask onto the causal mask, so it asks for one even without padding; so does the glue."""
    from hybrid_ds.models.masks import attention_mask_4d

    config = tiny_config("doge")
    config._attn_implementation = "sdpa"  # as the built model's config says
    family = get_family("doge", config)
    assert dict(family.mask_kwargs) == {"allow_is_causal_skip": False}
    hidden, unpadded = torch.zeros(1, 8, 64), torch.ones(1, 8, dtype=torch.long)
    positions = torch.arange(8).unsqueeze(0)
    assert attention_mask_4d(family, config, 0, hidden, unpadded, positions) is not None
    plain = get_family("llama", tiny_config("llama"))  # sdpa skips the mask of an unpadded causal batch
    assert attention_mask_4d(plain, config, 0, hidden, unpadded, positions) is None


def test_position_ids_may_be_indexed_on_leading_axes_only():
    """Qwen 3.5 indexes rows of an expanded arange: accepted; an index that could reorder or drop positions is not."""
    from hybrid_ds.models.generic.checks import _leading_index

    out = torch.empty(2, 8, device="meta")
    assert _leading_index(0, out, 8) and _leading_index((slice(1, None),), out, 8) and _leading_index((Ellipsis,), out, 8)
    assert not _leading_index(([0, 1],), out, 8)  # a list: any order
    assert not _leading_index((torch.zeros(1, dtype=torch.long),), out, 8)
    assert not _leading_index((Ellipsis, slice(1, None)), torch.empty(2, 7, device="meta"), 8)  # positions dropped
