"""The transformers internals hybrid_ds sets outside the DeepSpeed seam are checked to have taken effect before they
are relied on (hybrid_ds/seam/__init__.py lists them): a transformers that stopped reading one is one line, not a model
that silently attends both ways or a trace that records the wrong loss."""

from __future__ import annotations

import pytest
import torch
import transformers

from hybrid_ds.errors import UserError
from hybrid_ds.models.generic import trace
from hybrid_ds.models.resolve import use_attention


class ConfigIgnoringAttention(transformers.GPT2Config):
    """A config whose attention setting no longer goes where transformers 5.24 reads it."""

    @property
    def _attn_implementation(self):
        return None

    @_attn_implementation.setter
    def _attn_implementation(self, value):
        pass


def test_the_attention_kernel_is_read_back():
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2)
    use_attention(config, "sdpa")
    assert config._attn_implementation == "sdpa"
    with pytest.raises(UserError, match="model.attn_implementation: 'eager' did not take effect"):
        use_attention(ConfigIgnoringAttention(n_layer=1, n_embd=8, n_head=2), "eager")


class LossElsewhere(transformers.GPT2LMHeadModel):
    @property
    def loss_function(self):
        return lambda *a, **k: None


def test_the_traced_loss_is_the_one_the_model_calls():
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)
    with torch.device("meta"):
        model, other = transformers.GPT2LMHeadModel(config), LossElsewhere(config)
    with trace._recorded_loss(model, trace.Trace({})):
        assert model.loss_function is model._loss_function
    assert "_loss_function" not in vars(model)
    with pytest.raises(UserError, match="no longer reads _loss_function"):
        with trace._recorded_loss(other, trace.Trace({})):
            pass
    assert "_loss_function" not in vars(other)
