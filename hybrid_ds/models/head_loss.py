"""The LM loss of the output head without a [tokens, vocab] fp32 tensor (``train.fused_loss``).

The head layers (hybrid_ds.models.layers) do not compute logits: they return :class:`HeadLogits`, the final
hidden states with the projection, bias and scalar ops still to apply. The loss then either materializes them
and runs Hugging Face's loss (``fused_loss: false``, bit for bit what the model computes), or runs
:func:`fused_lm_loss`: one block of vocabulary entries at a time (every row), the block's logits are computed
from the hidden states and the weight's rows, a first pass keeps each row's running log-sum-exp, and a second
computes the logits again and turns their gradient straight into the block's rows of the weight's gradient and
its share of the hidden states'. Held at once: the weight's gradient (which autograd allocates anyway), the
hidden states' and a few [tokens, block] temporaries. The gradients are taken in the forward pass, as Liger's
fused linear cross-entropy does, and backward scales them by the loss's incoming gradient.

DeepSpeed's ``chunked_cross_entropy`` (blocks of rows, given the logits) does not fit here: blocks of rows
recompute each block's logits from the whole weight, which the matmuls then re-read per block; at a few dozen
rows (what keeps the temporaries small at a 128k vocabulary) they ran 2x slower on CPU, and at a few hundred
rows the temporaries are half of what the full logits cost.
Anything that needs the logits themselves (parity, tests) calls :func:`materialize`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from hybrid_ds.families import ScalarOp, apply_ops

IGNORE_INDEX = -100
# Logits per block: 2**22, 16 MiB in fp32 (4096 vocabulary entries of 1024 tokens), so a block's few temporaries
# stay well under 100 MiB at any vocabulary, while each block's matmuls keep every row and thousands of columns.
BLOCK_ELEMENTS = 1 << 22


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


def fused_lm_loss(head: HeadLogits, labels: torch.Tensor, shift: bool, block_cols: int | None = None) -> torch.Tensor:
    """Hugging Face's ``ForCausalLMLoss`` (``shift``) or ``ForMaskedLMLoss`` of ``head``'s logits, fp32: the mean
    over tokens whose label is not -100 (NaN if there are none, as there), without ``num_items_in_batch``.
    ``block_cols``: vocabulary entries per block (default: ``BLOCK_ELEMENTS`` logits per block)."""
    if shift:  # tokens < n predict n; the last position predicts nothing
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    hidden = head.hidden.reshape(-1, head.hidden.shape[-1])
    targets = labels.reshape(-1).to(hidden.device)
    cols = block_cols or max(1, BLOCK_ELEMENTS // max(1, hidden.shape[0]))
    tensors = (hidden, head.weight, head.bias, head.added_bias)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _FusedHeadCrossEntropy.apply(*tensors, targets, head.ops, cols, need_grad)


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``apply_ops(hidden @ weight.T + bias + added_bias, ops)``, a block of vocabulary
    entries (all rows) at a time.

    Pass 1 keeps a running log-sum-exp per row and picks each row's target logit. With ``need_grad``, pass 2
    computes each block's logits again, their gradient (softmax minus one-hot, over the count of predicted
    tokens), and from it the block's rows of the weight's gradient (written once) and its share of the hidden
    states' gradient (summed in fp32): four matmuls where the ordinary path has three, none of them with few
    rows. Backward only scales these by the loss's incoming gradient. Without ``need_grad`` (evaluation) pass 1
    alone runs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, added_bias, targets, ops, block_cols, need_grad):
        head = _Blocks(hidden, weight, bias, added_bias, ops, block_cols)
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        log_sum_exp, target_logit = head.log_sum_exp(safe)
        inv_count = 1.0 / valid.sum().float()
        ctx.grads = head.gradients(safe, log_sum_exp, torch.where(valid, inv_count, 0.0)) if need_grad else None
        return torch.where(valid, log_sum_exp - target_logit, 0.0).sum() * inv_count

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # dropped, so that autograd can take the gradients without copying them
        scale = grad_loss.float()
        d_hidden, d_weight, d_bias = (None if g is None else g.mul_(scale.to(g.dtype)) for g in grads)
        needs = ctx.needs_input_grad
        return (d_hidden if needs[0] else None, d_weight if needs[1] else None, d_bias if needs[2] else None,
                d_bias if needs[3] else None, None, None, None, None)


class _Blocks:
    """The head's logits, one block of vocabulary entries at a time."""

    def __init__(self, hidden, weight, bias, added_bias, ops, block_cols):
        self.hidden, self.weight, self.bias, self.added_bias, self.ops = hidden, weight, bias, added_bias, ops
        self.starts = range(0, weight.shape[0], block_cols)
        self.cols = block_cols

    def pre_ops(self, start: int) -> torch.Tensor:
        """The block's logits before the scalar ops, as the model's layers compute them."""
        cols = slice(start, start + self.cols)
        x = F.linear(self.hidden, self.weight[cols], None if self.bias is None else self.bias[cols])
        return x if self.added_bias is None else x + self.added_bias[cols]

    def log_sum_exp(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: log-sum-exp of the logits (fp32), and the logit of ``targets``."""
        rows = self.hidden.shape[0]
        running_max = torch.full((rows,), -torch.inf, device=self.hidden.device)
        running_sum = torch.zeros(rows, device=self.hidden.device)
        target_logit = torch.zeros(rows, device=self.hidden.device)
        for start in self.starts:
            logits = apply_ops(self.pre_ops(start), self.ops).float()
            new_max = torch.maximum(running_max, logits.amax(-1))
            running_sum = (running_sum * torch.exp(running_max - new_max).nan_to_num(0.0)
                           + torch.exp(logits - new_max[:, None]).sum(-1))
            running_max = new_max
            inside = (targets >= start) & (targets < start + logits.shape[1])
            picked = logits.gather(1, (targets - start).clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
            target_logit = torch.where(inside, picked, target_logit)
        return running_max + torch.log(running_sum), target_logit

    def gradients(self, targets: torch.Tensor, log_sum_exp: torch.Tensor, row_scale: torch.Tensor) -> tuple:
        """d (sum of row_scale * row loss) / d (hidden, weight, bias) in the inputs' dtypes."""
        d_hidden = torch.zeros(self.hidden.shape, dtype=torch.float32, device=self.hidden.device)
        d_weight = torch.empty_like(self.weight)
        has_bias = self.bias is not None or self.added_bias is not None
        d_bias = torch.empty(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device) if has_bias else None
        for start in self.starts:
            pre = self.pre_ops(start)  # autograd is off inside forward: the scalar ops' alone is taken
            with torch.enable_grad():
                logits = apply_ops(pre.requires_grad_(), self.ops) if self.ops else pre
            d_logits = torch.exp(logits.detach().float() - log_sum_exp[:, None])
            inside = (targets >= start) & (targets < start + d_logits.shape[1])
            d_logits.scatter_add_(1, (targets - start).clamp(0, d_logits.shape[1] - 1)[:, None], -inside[:, None].float())
            d_logits = (d_logits * row_scale[:, None]).to(logits.dtype)  # as cross_entropy's, cast as .float()'s
            d_pre = torch.autograd.grad(logits, pre, d_logits)[0] if self.ops else d_logits
            cols = slice(start, start + d_pre.shape[1])
            d_weight[cols] = d_pre.t() @ self.hidden
            if d_pre.dtype == torch.float32:
                d_hidden.addmm_(d_pre, self.weight[cols])
            else:  # a bf16 matmul, summed over blocks in fp32
                d_hidden += (d_pre @ self.weight[cols]).float()
            if d_bias is not None:
                d_bias[cols] = d_pre.sum(0)
        return d_hidden.to(self.hidden.dtype), d_weight, d_bias
