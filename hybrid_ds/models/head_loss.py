"""The LM loss of the output head without a [tokens, vocab] fp32 tensor (``train.fused_loss``).

The head layers (hybrid_ds.models.layers) do not compute logits: they return :class:`HeadLogits`, the final
hidden states with the projection, bias and scalar ops still to apply. The loss then either materializes them
and runs Hugging Face's loss (``fused_loss: false``, bit for bit what the model computes), or runs
:func:`fused_lm_loss`: a block of rows at a time, the block's logits are computed from its hidden states and the
weight into one fp32 buffer, which becomes in place their softmax and then their gradient (softmax minus
one-hot), from which the gradients of the hidden states, weight and biases are accumulated right away, in the
forward pass, as Liger's fused linear cross-entropy does; backward only scales them by the loss's incoming
gradient. The same three matmuls as the ordinary path, no recomputation. Held at once: the weight's gradient
(which autograd allocates anyway), the hidden states' and one [block, vocab] buffer (a few more for scalar ops,
whose autograd runs on the block).

DeepSpeed's ``chunked_cross_entropy`` is the same arithmetic given the logits; taking it per block would add
its own [block, vocab] buffers (gradient, probabilities) to ours, so the in-place version is written out here.
Blocks of rows are sized to ``BLOCK_ELEMENTS``: each block's matmuls re-read the whole weight, which costs
little at a few hundred rows (measured on CPU: 65-row blocks ran these matmuls 2x slower, 262-row blocks as fast
as one matmul over all rows).
Anything that needs the logits themselves (parity, tests) calls :func:`materialize`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from hybrid_ds.config.families import ScalarOp, apply_ops

IGNORE_INDEX = -100
# Logits per block: 2**25, one 128 MiB fp32 buffer whatever the vocabulary (261 rows at Llama 3's 128,256), enough
# rows for each block's matmuls to run as fast as one over all rows.
BLOCK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class HeadLogits:
    """Logits not yet computed: ``apply_ops(F.linear(hidden, weight, bias) + added_bias, ops)``.

    ``bias`` is the projection module's own (phi's untied ``lm_head.bias``); ``added_bias`` is a tied head's,
    added after the projection (BERT's ``cls.predictions.bias``); ``ops`` are parameter-free scalar ops
    (Gemma 2's soft-cap, Cohere's logit scale). The same ops in the same order as the model's layers run them.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    added_bias: torch.Tensor | None = None
    ops: tuple[ScalarOp, ...] = ()

    def logits(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of ``hidden`` (default: all of this head's hidden states)."""
        x = F.linear(self.hidden if hidden is None else hidden, self.weight, self.bias)
        if self.added_bias is not None:
            x = x + self.added_bias
        return apply_ops(x, self.ops)

    def add_bias(self, bias: torch.Tensor) -> Any:
        """Itself plus a bias; materialized where the bias would not come right after the projection."""
        if self.added_bias is None and not self.ops:
            return replace(self, added_bias=bias)
        return self.logits() + bias

    def then(self, ops: tuple[ScalarOp, ...]) -> HeadLogits:
        return replace(self, ops=self.ops + tuple(ops))


def materialize(logits: Any) -> torch.Tensor:
    """Real logits from a head's output (a tensor already, or :class:`HeadLogits`)."""
    return logits.logits() if isinstance(logits, HeadLogits) else logits


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """A causal LM's targets: the label of token n + 1 at n (tokens < n predict n); the last predicts nothing."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def fused_lm_loss(head: HeadLogits, labels: torch.Tensor, shift: bool, block_rows: int | None = None,
                  count: torch.Tensor | None = None) -> torch.Tensor:
    """Hugging Face's ``ForCausalLMLoss`` (``shift``) or ``ForMaskedLMLoss`` of ``head``'s logits, fp32: the mean
    over tokens whose label is not -100 (NaN if there are none, as there), without ``num_items_in_batch``.
    ``block_rows``: tokens per block (default: ``BLOCK_ELEMENTS`` logits per block). ``count``: divide the sum by
    this instead (a shard of a sequence: the whole sequence's predicted tokens)."""
    if shift:
        labels = shifted_labels(labels)
    hidden = head.hidden.reshape(-1, head.hidden.shape[-1])
    targets = labels.reshape(-1).to(hidden.device)
    rows = block_rows or max(1, BLOCK_ELEMENTS // head.weight.shape[0])
    tensors = (hidden, head.weight, head.bias, head.added_bias)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _FusedHeadCrossEntropy.apply(*tensors, targets, head.ops, rows, need_grad, count)


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``apply_ops(hidden @ weight.T + bias + added_bias, ops)``, a block of rows at a time.

    With ``need_grad`` the forward pass also computes every input's gradient (of the mean, so that backward only
    scales them by the loss's incoming gradient); without it (evaluation) only the loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, added_bias, targets, ops, block_rows, need_grad, count=None):
        valid = targets != IGNORE_INDEX
        targets = torch.where(valid, targets, torch.zeros_like(targets))  # an index to gather; its row is masked
        # inf without a predicted token: the loss is then NaN, as HF's
        inv_count = 1.0 / (valid.sum() if count is None else count).float()
        row_scale = torch.where(valid, inv_count, 0.0)  # the mean's gradient; 0 on ignored rows
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        trained_bias = any(b is not None and b.requires_grad for b in (bias, added_bias))
        grads = _Grads(hidden, weight, weight.requires_grad, trained_bias) if need_grad else None
        for start in range(0, hidden.shape[0], block_rows):
            rows = slice(start, start + block_rows)
            pre = F.linear(hidden[rows], weight, bias)  # autograd is off inside forward
            if added_bias is not None:
                pre += added_bias
            with torch.enable_grad():  # only the scalar ops' autograd, from the block's logits
                logits = apply_ops(pre.requires_grad_(), ops) if ops and need_grad else apply_ops(pre, ops)
            # fp32, and its own buffer where the ops' autograd may still need their output
            work = logits.detach().to(torch.float32, copy=bool(ops))
            target_logit = work.gather(1, targets[rows, None])[:, 0]
            row_max = work.amax(1, keepdim=True)
            exp_sum = work.sub_(row_max).exp_().sum(1)  # work: exp(logit - max), in place
            losses = row_max[:, 0] + exp_sum.log() - target_logit
            total += torch.where(valid[rows], losses, 0.0).sum()
            if grads is not None:  # softmax minus one-hot, times the mean's scale, in place
                scale = row_scale[rows, None]
                work.mul_(scale / exp_sum[:, None]).scatter_add_(1, targets[rows, None], -scale)
                d_logits = work.to(logits.dtype)  # as cross_entropy's gradient is cast by .float()'s backward
                d_pre = torch.autograd.grad(logits, pre, d_logits)[0] if ops else d_logits
                grads.add(rows, hidden[rows], d_pre)
        ctx.grads = grads
        return total * inv_count

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "result", None) is not None:  # a split backward's W: what its B computed
            result, ctx.result = ctx.result, None
            return result
        grads, ctx.grads = ctx.grads, None  # dropped, so that autograd can take the gradients without copying them
        d_hidden, d_weight, d_bias = grads.scaled(grad_loss)
        needs = ctx.needs_input_grad
        result = (d_hidden if needs[0] else None, d_weight if needs[1] else None, d_bias if needs[2] else None,
                  d_bias if needs[3] else None, None, None, None, None, None)
        if _SPLIT_BACKWARD[0]:  # B of pipeline.schedule zb-h1: W calls again for the weight's and bias's
            ctx.result = result
        return result


_SPLIT_BACKWARD = [False]


@contextlib.contextmanager
def split_backward() -> Iterator[None]:
    """While open, a backward through the fused loss keeps its gradients for a second call: the B pass of a split
    backward (``pipeline.schedule: zb-h1``) takes the hidden states' gradient, its W pass the weight's and bias's."""
    _SPLIT_BACKWARD[0] = True
    try:
        yield
    finally:
        _SPLIT_BACKWARD[0] = False


class _Grads:
    """The gradients of the hidden states, the weight and the (one) bias, filled block by block; a frozen weight's
    (LoRA's) and bias's are not computed.

    The weight's and bias's sums over blocks are kept in fp32 whatever the weight's dtype, so that a bf16 model
    gets the gradient of one full matmul rounded once, as in the ordinary path, not one rounding per block.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, trained_weight: bool, trained_bias: bool):
        self.dtype, self.weight_value = weight.dtype, weight
        self.hidden = torch.empty_like(hidden)
        self.weight: torch.Tensor | None = None   # the first block's share, then the sum (fp32)
        self.bias: torch.Tensor | None = None
        self.trained_weight, self.has_bias = trained_weight, trained_bias

    def add(self, rows: slice, hidden: torch.Tensor, d_logits: torch.Tensor) -> None:
        """Add one block's share, given d loss / d (its logits before the scalar ops)."""
        self.hidden[rows] = d_logits @ self.weight_value
        if self.trained_weight:
            if self.weight is None:
                self.weight = (d_logits.t() @ hidden).float()
            elif self.dtype == torch.float32:
                self.weight.addmm_(d_logits.t(), hidden)
            else:
                self.weight += d_logits.t() @ hidden
        if self.has_bias:
            bias = d_logits.sum(0, dtype=torch.float32)
            self.bias = bias if self.bias is None else self.bias.add_(bias)

    def scaled(self, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        """The gradients times the loss's incoming gradient, in the inputs' dtypes (in place where they are)."""
        scale = grad_loss.float()
        if self.weight is None and self.trained_weight:  # no rows at all
            self.weight = torch.zeros_like(self.weight_value, dtype=torch.float32)
        if self.bias is None and self.has_bias:
            self.bias = torch.zeros(self.weight_value.shape[0], device=self.weight_value.device)
        weight = self.weight.mul_(scale).to(self.dtype) if self.weight is not None else None
        bias = self.bias.mul_(scale).to(self.dtype) if self.bias is not None else None
        return self.hidden.mul_(scale.to(self.hidden.dtype)), weight, bias
