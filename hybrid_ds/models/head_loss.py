"""The LM loss of the output head without a [tokens, vocab] fp32 tensor (``train.fused_loss``).

The head layers (hybrid_ds.models.layers) do not compute logits: they return :class:`HeadLogits`, the final
hidden states with the projection, bias and scalar ops still to apply. The loss then either materializes them
and runs Hugging Face's loss (``fused_loss: false``, bit for bit what the model computes), or runs
:func:`fused_lm_loss`: blocks of rows at a time, each block's logits are computed from its hidden states, its
cross-entropy and the block's gradient taken by DeepSpeed's ``chunked_cross_entropy`` (Triton on CUDA), and
the gradients of the hidden states, weight and biases accumulated right away, in the forward pass, as Liger's
fused linear cross-entropy does: backward only scales them by the incoming gradient, so the head costs the
three matmuls of the ordinary path and no recomputation. Held at once: the weight's gradient (which autograd
allocates anyway), the hidden states' gradient and a few [block, vocab] temporaries.
Anything that needs the logits themselves (parity, tests) calls :func:`materialize`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy

from hybrid_ds.families import ScalarOp, apply_ops

IGNORE_INDEX = -100
# Rows per block: 2**23 logits, 32 MiB in fp32, so a block's temporaries stay near 200 MiB at any vocabulary
# (65 rows at Llama 3's 128,256) while each block's matmuls still have enough rows to run near full speed.
BLOCK_ELEMENTS = 1 << 23


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


def fused_lm_loss(head: HeadLogits, labels: torch.Tensor, shift: bool, block_rows: int | None = None) -> torch.Tensor:
    """Hugging Face's ``ForCausalLMLoss`` (``shift``) or ``ForMaskedLMLoss`` of ``head``'s logits, fp32: the mean
    over tokens whose label is not -100 (NaN if there are none, as there), without ``num_items_in_batch``."""
    if shift:  # tokens < n predict n; the last position predicts nothing
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    hidden = head.hidden.reshape(-1, head.hidden.shape[-1])
    targets = labels.reshape(-1).to(hidden.device)
    rows = block_rows or max(1, BLOCK_ELEMENTS // head.weight.shape[0])
    tensors = (hidden, head.weight, head.bias, head.added_bias)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _FusedHeadCrossEntropy.apply(*tensors, targets, head.ops, rows, need_grad)


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``apply_ops(hidden @ weight.T + bias + added_bias, ops)``, a block of rows at a time.

    With ``need_grad`` the forward pass also computes every input's gradient (of the mean, so ready to be scaled
    by the loss's incoming gradient in backward); without it (evaluation) only the loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, added_bias, targets, ops, block_rows, need_grad):
        inv_count = 1.0 / (targets != IGNORE_INDEX).sum().float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = _Grads(hidden, weight, bias is not None or added_bias is not None) if need_grad else None
        for start in range(0, hidden.shape[0], block_rows):
            rows = slice(start, start + block_rows)
            pre = F.linear(hidden[rows], weight, bias)  # autograd is off inside forward
            if added_bias is not None:
                pre = pre + added_bias
            with torch.enable_grad():
                pre.requires_grad_(need_grad)
                loss = chunked_cross_entropy(apply_ops(pre, ops), targets[rows], IGNORE_INDEX, reduction="sum")
            total += loss.detach()
            if grads is not None:
                grads.add(rows, hidden[rows], torch.autograd.grad(loss, pre, inv_count.to(loss.dtype))[0])
        ctx.grads = grads
        return total * inv_count

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # dropped, so that autograd can take the gradients without copying them
        d_hidden, d_weight, d_bias = grads.scaled(grad_loss)
        needs = ctx.needs_input_grad
        return (d_hidden if needs[0] else None, d_weight if needs[1] else None, d_bias if needs[2] else None,
                d_bias if needs[3] else None, None, None, None, None)


class _Grads:
    """The gradients of the hidden states, the weight and the (one) bias, filled block by block.

    The weight's and bias's sums over blocks are kept in fp32 whatever the weight's dtype, so that a bf16 model
    gets the gradient of one full matmul rounded once, as in the ordinary path, not one rounding per block.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, has_bias: bool):
        self.dtype = weight.dtype
        self.hidden = torch.empty_like(hidden)
        self.weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        self.bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if has_bias else None
        self.weight_t = weight

    def add(self, rows: slice, hidden: torch.Tensor, d_logits: torch.Tensor) -> None:
        """Add one block's share, given d loss / d (its logits before the scalar ops)."""
        d_logits = d_logits.to(self.dtype)
        self.hidden[rows] = d_logits @ self.weight_t
        if self.dtype == torch.float32:
            self.weight.addmm_(d_logits.t(), hidden)
        else:
            self.weight += d_logits.t() @ hidden
        if self.bias is not None:
            self.bias += d_logits.sum(0, dtype=torch.float32)

    def scaled(self, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        """The gradients times the loss's incoming gradient, in the inputs' dtypes (in place where they are)."""
        scale = grad_loss.float()
        weight = self.weight.mul_(scale).to(self.dtype)
        bias = self.bias.mul_(scale).to(self.dtype) if self.bias is not None else None
        return self.hidden.mul_(scale.to(self.hidden.dtype)), weight, bias
