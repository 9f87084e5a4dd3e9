"""The fused head loss (hybrid_ds.models.head_loss) against Hugging Face's loss on the materialized logits."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss, ForMaskedLMLoss

from hybrid_ds.config.families import ScalarOp
from hybrid_ds.models.head_loss import HeadLogits, fused_lm_loss, materialize

SOFT_CAP = (ScalarOp("__truediv__", 30.0), ScalarOp("tanh"), ScalarOp("__mul__", 30.0))  # Gemma 2's final soft-cap
VOCAB, HIDDEN = 37, 8


def _head(bias: str, ops: tuple, dtype=torch.float32) -> tuple[HeadLogits, list[torch.Tensor]]:
    """A head over a [2, 7] batch: ``bias`` "linear" (the projection's own), "added" (a tied head's) or "none"."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, HIDDEN, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=gen).to(dtype).requires_grad_()
    b = (torch.randn(VOCAB, generator=gen) * 0.5).to(dtype).requires_grad_()
    kwargs = {"linear": {"bias": b}, "added": {"added_bias": b}, "none": {}}[bias]
    return HeadLogits(hidden, weight, ops=ops, **kwargs), [hidden, weight] + ([b] if bias != "none" else [])


def _labels() -> torch.Tensor:
    labels = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    labels[0, 2] = labels[1, 5:] = -100
    return labels


def _loss_and_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [loss.detach(), *torch.autograd.grad(loss * 3.0, params)]  # 3: the loss's incoming gradient is used


def _assert_within(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """max |got - want| relative to max |want|, as hybrid-ds parity measures gradients."""
    diff = ((got - want).abs().max() / want.abs().max()).item()
    assert diff <= tolerance, (diff, got, want)


@pytest.mark.parametrize("bias", ["linear", "added", "none"])
@pytest.mark.parametrize("ops", [(), SOFT_CAP], ids=["plain", "soft-cap"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "masked"])
def test_fused_loss_and_gradients_match_hugging_face(causal, ops, bias):
    """Loss and the gradients of hidden states, weight and bias within 1e-5 (fp32), blocks of 3 rows over 14."""
    head, params = _head(bias, ops)
    labels = _labels()
    hf = (ForCausalLMLoss if causal else ForMaskedLMLoss)(materialize(head), labels, VOCAB)
    want = _loss_and_grads(hf, params)
    got = _loss_and_grads(fused_lm_loss(head, labels, shift=causal, block_rows=3), params)
    for g, w in zip(got, want):
        _assert_within(g, w, 1e-5)


def test_a_frozen_head_gets_no_weight_gradient_computed(monkeypatch):
    """LoRA freezes the head: only the hidden states' gradient is made, equal to Hugging Face's; no weight-sized
    fp32 sum is kept."""
    import hybrid_ds.models.head_loss as head_loss

    made = []
    monkeypatch.setattr(head_loss._Grads, "scaled", lambda self, g, real=head_loss._Grads.scaled:
                        made.append(self) or real(self, g))
    head, (hidden, weight, bias) = _head("added", SOFT_CAP)
    weight.requires_grad_(False), bias.requires_grad_(False)
    labels = _labels()
    want = _loss_and_grads(ForCausalLMLoss(materialize(head), labels, VOCAB), [hidden])
    got = _loss_and_grads(fused_lm_loss(head, labels, shift=True, block_rows=3), [hidden])
    for g, w in zip(got, want):
        _assert_within(g, w, 1e-5)
    assert made and made[0].weight is None and made[0].bias is None


def test_without_grad_it_computes_the_loss_only():
    head, _ = _head("linear", SOFT_CAP)
    with torch.no_grad():
        loss = fused_lm_loss(head, _labels(), shift=True, block_rows=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ForCausalLMLoss(materialize(head), _labels(), VOCAB), rtol=1e-5, atol=0)


def test_bf16_gradients_are_those_of_the_bf16_model():
    """bf16 hidden states and weight: within bf16 rounding of Hugging Face's loss on the bf16 logits."""
    head, params = _head("added", SOFT_CAP, torch.bfloat16)
    want = _loss_and_grads(ForCausalLMLoss(materialize(head), _labels(), VOCAB), params)
    got = _loss_and_grads(fused_lm_loss(head, _labels(), shift=True, block_rows=5), params)
    assert [g.dtype for g in got[1:]] == [torch.bfloat16] * 3
    for g, w in zip(got, want):
        _assert_within(g.float(), w.float(), 2e-2)


def test_without_a_predicted_token_the_loss_is_nan_as_hugging_face_s():
    head, params = _head("none", ())
    labels = torch.full((2, 7), -100)
    assert ForMaskedLMLoss(materialize(head), labels, VOCAB).isnan()
    loss = fused_lm_loss(head, labels, shift=False)
    assert loss.isnan()
    loss.backward()
    assert all(p.grad is not None and p.grad.count_nonzero() == 0 for p in params)
