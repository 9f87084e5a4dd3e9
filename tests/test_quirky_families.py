"""Dense families with one quirk each, through the generic adapter, bit for bit with Hugging Face.

Each quirk is understood once by the generic adapter (hybrid_ds/models/generic/checks.py) and serves every
family that has it:

- scalar ops outside the modules on the embeddings (Granite's ``embedding_multiplier``) or on the logits
  (Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma 2/3's final soft-cap ``tanh(x / c) * c``),
  replayed as :class:`hybrid_ds.config.families.ScalarOp`;
- a rotary module called once per layer type (Gemma 3's local and global rotary bases);
- blocks that take ``position_ids`` through ``**kwargs`` (Cohere 2).

The rest (attention soft-capping, query pre-attention scaling, residual and attention multipliers, parallel
attention + MLP, sliding and global layers) lives inside the blocks, which the pipeline runs as they are.
Every case runs at one and two stages, with a right-padded row, under eager and SDPA attention.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_generic_adapter import run_config, saved, tiny_config  # noqa: E402

from hybrid_ds.config import load_config_dict  # noqa: E402
from hybrid_ds.errors import UserError  # noqa: E402
from hybrid_ds.config.families import FAMILIES  # noqa: E402
from hybrid_ds.models import resolve  # noqa: E402
from hybrid_ds.runtime.parity import check_parity  # noqa: E402

ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

# name -> (model_type, overrides). Sliding windows of 4 over the 16-token parity batch, so that local and
# global layers differ; multipliers away from 1 so that a dropped one shows.
CASES = {
    "gemma2": ("gemma2", dict(num_hidden_layers=4, sliding_window=4)),  # soft-caps 50 (attention), 30 (logits)
    "gemma2-untied-no-softcap": ("gemma2", dict(sliding_window=4, tie_word_embeddings=False,
                                                final_logit_softcapping=None, query_pre_attn_scalar=8)),
    "gemma3_text": ("gemma3_text", dict(num_hidden_layers=4, sliding_window=4, layer_types=ALTERNATING,
                                        final_logit_softcapping=30.0)),   # rotary bases 1e4 local, 1e6 global
    "gemma3_text-untied": ("gemma3_text", dict(num_hidden_layers=4, sliding_window=4, layer_types=ALTERNATING,
                                               tie_word_embeddings=False, attn_logit_softcapping=20.0)),
    "granite": ("granite", dict(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                                attention_multiplier=0.015)),
    "granite-tied": ("granite", dict(embedding_multiplier=12.0, logits_scaling=8.0, tie_word_embeddings=True)),
    "cohere": ("cohere", dict(logit_scale=0.25)),                        # parallel block, tied head
    "cohere-qk-norm-untied": ("cohere", dict(use_qk_norm=True, tie_word_embeddings=False)),
    "cohere2": ("cohere2", dict(num_hidden_layers=4, sliding_window=4, layer_types=ALTERNATING)),
}
SDPA_UNSUPPORTED = {"gemma2"}  # Gemma2ForCausalLM has no SDPA path


def _folder(tmp_path, name):
    model_type, overrides = CASES[name]
    return saved(tmp_path, tiny_config(model_type, **overrides))


def _config(folder, attn):
    return load_config_dict({"model": {"name": folder, "pretrained": True, "attn_implementation": attn},
                             "train_micro_batch_size_per_gpu": 1})


@pytest.mark.parametrize("name", sorted(CASES))
def test_quirky_family_is_bit_exact(name, tmp_path):
    model_type = CASES[name][0]
    assert model_type not in FAMILIES  # the generic adapter maps it
    folder = _folder(tmp_path, name)
    for attn in ("eager", "sdpa"):
        if attn == "sdpa" and model_type in SDPA_UNSUPPORTED:
            continue
        for stages in (1, 2):
            report = check_parity(_config(folder, attn), stages)
            assert report.exact, f"{attn}\n" + "\n".join(report.lines())


def test_what_each_quirk_maps_to():
    """The ops and rotary rule the adapter found, read back: the values are the configs'."""
    def family(name):
        model_type, overrides = CASES[name]
        config = tiny_config(model_type, **overrides)
        config._attn_implementation = "eager"
        return resolve.get_family(model_type, config)

    assert [tuple(op) for op in family("gemma2").logit_ops] == [("div", 30.0), ("tanh", None), ("mul", 30.0)]
    assert family("gemma2-untied-no-softcap").logit_ops == ()
    assert family("gemma3_text").rotary_per_layer_type and not family("gemma2").rotary_per_layer_type
    assert [tuple(op) for op in family("granite").logit_ops] == [("div", 8.0)]
    assert [tuple(op) for op in family("cohere").logit_ops] == [("mul", 0.25)]


@pytest.mark.parametrize("name, broken, field", [
    ("gemma2", dict(logit_ops=()), "the final soft-cap"),
    ("cohere", dict(logit_ops=()), "the logit scale"),
])
def test_parity_fails_without_the_quirk(name, broken, field, tmp_path, monkeypatch):
    """Negative controls: the adapter's mapping with one quirk dropped no longer matches."""
    folder = _folder(tmp_path, name)
    found = resolve.get_family

    def without_quirk(model_type, hf_config=None):
        return dataclasses.replace(found(model_type, hf_config), **broken)

    monkeypatch.setattr(resolve, "get_family", without_quirk)
    report = check_parity(_config(folder, "eager"), stages=2)
    assert not report.ok, f"dropping {field} went unnoticed"


def test_gemma3_blocks_need_their_own_layer_types_rotary_base(tmp_path, monkeypatch):
    """Negative control: every block given the global layers' (cos, sin) no longer matches."""
    from hybrid_ds.models import layers

    folder = _folder(tmp_path, "gemma3_text")
    built = layers.Block.__init__

    def global_rotary_everywhere(self, *args, **kwargs):
        built(self, *args, **kwargs)
        self.rotary_kwargs = {"layer_type": "full_attention"}

    monkeypatch.setattr(layers.Block, "__init__", global_rotary_everywhere)
    assert not check_parity(_config(folder, "eager"), stages=2).ok


def test_granite_embedding_multiplier_is_replayed(tmp_path, monkeypatch):
    """Granite's embedding multiplier is an op on the embeddings between the embedding and block 0."""
    from hybrid_ds.config.families import apply_in_order

    folder = _folder(tmp_path, "granite")
    found = resolve.get_family
    monkeypatch.setattr(resolve, "get_family", lambda t, c=None: dataclasses.replace(found(t, c),
                                                                                     embed=apply_in_order(())))
    assert not check_parity(_config(folder, "eager"), stages=1).ok


def test_sdpa_on_a_model_without_it_names_the_setting(tmp_path):
    folder = _folder(tmp_path, "gemma2")
    from hybrid_ds.runtime.plan import build_plan

    with pytest.raises(UserError) as err:
        build_plan(_config(folder, "sdpa"), world_size=1)
    assert str(err.value) == ("model.attn_implementation: 'sdpa': Gemma2ForCausalLM does not support SDPA "
                              "attention; set it to 'eager'")
    default = run_config(folder, None)  # no kernel asked for: what Hugging Face picks, eager for Gemma 2, sdpa for Granite
    assert default.model.attn_implementation is None
    assert resolve.resolve_model(default.model).hf_config._attn_implementation == "eager"
    granite = resolve.resolve_model(run_config(_folder(tmp_path / "g", "granite"), None).model).hf_config
    assert granite._attn_implementation == "sdpa"
