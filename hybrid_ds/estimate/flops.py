"""FLOPs of a model's layers per token, forward and training (Narayanan et al. 2021's counting). Pure Python.

>>> a = arch_from_preset("gpt3-175b")
>>> round(a.params / 1e9, 1)          # Narayanan et al. 2021, Table 1: 174.6B
174.6
"""

from __future__ import annotations

import math  # noqa: F401 (the doctests)

from hybrid_ds.estimate.architecture import Arch, arch_from_preset  # noqa: F401 (the doctests use arch_from_preset)


# ---------------------------------------------------------------- FLOPs


def block_flops(arch: Arch, seq: int, block: int = 0, part: str | None = None) -> float:
    """Forward matmul FLOPs per token of block ``block``. Causal attention is counted as the full s x s product,
    as Narayanan et al. 2021 (eq. 3) and Megatron-LM count it, not halved as FlashAttention papers do.
    A Mixture-of-Experts layer costs 2 FLOPs per element a token passes: its router, its shared experts and
    the top-k routed experts it is sent to (:meth:`hybrid_ds.estimate.architecture.Experts.active`).

    ``part`` "attention" or "mlp": that module's share alone (what train.selective_checkpoint recomputes).

    >>> a = arch_from_preset("gpt3-175b")
    >>> math.isclose(block_flops(a, 2048), 24 * a.hidden**2 * (1 + 2048 / (6 * a.hidden)))
    True
    >>> block_flops(a, 2048, part="attention") + block_flops(a, 2048, part="mlp") == block_flops(a, 2048)
    True
    """
    h, q, kv = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    attention = 2 * h * (q + 2 * kv) + 2 * q * h + 4 * seq * q
    if arch.experts and arch.experts.routed[block]:
        mlp = 2 * arch.experts.active(block)
    else:
        mlp = 2 * h * arch.ffn * (3 if arch.gated else 2)
    return {"attention": attention, "mlp": mlp}[part] if part else attention + mlp


def blocks_flops(arch: Arch, seq: int, lo: int = 0, hi: int | None = None, part: str | None = None) -> float:
    """Forward FLOPs per token of the blocks among pipeline layers [lo, hi) (default: every block; ``part``: of
    their attention or MLP alone)."""
    hi = arch.layers + 2 if hi is None else hi
    return sum(block_flops(arch, seq, layer - 1, part) for layer in range(max(lo, 1), min(hi, arch.layers + 1)))


def forward_flops_per_token(arch: Arch, seq: int) -> float:
    """Forward FLOPs of one token through the whole model: every block (top-k experts) and the head."""
    return blocks_flops(arch, seq) + head_flops(arch)


def training_flops(arch: Arch, seq: int, lo: int = 0, hi: int | None = None, frozen: bool = False) -> float:
    """Forward and backward FLOPs per token of pipeline layers [lo, hi): 3 passes, as each matmul's backward computes
    the gradients of both its operands. With ``frozen`` weights (a LoRA run's base) a layer's backward computes only
    its input's gradient, 2 passes, except attention's two products of activations, whose both operands need theirs;
    the adapters' own r-wide matmuls are left out (under 1% at r 16 of a 576-wide model).

    >>> a = arch_from_preset("gpt2")
    >>> training_flops(a, 1024) == 3 * forward_flops_per_token(a, 1024)
    True
    >>> attention = 4 * 1024 * a.heads * a.head_dim * a.layers
    >>> math.isclose(training_flops(a, 1024, frozen=True), 2 * forward_flops_per_token(a, 1024) + attention)
    True
    """
    hi = arch.layers + 2 if hi is None else hi
    blocks = blocks_flops(arch, seq, lo, hi)
    forward = blocks + (head_flops(arch) if hi == arch.layers + 2 else 0.0)
    if not frozen:
        return 3 * forward
    n_blocks = max(0, min(hi, arch.layers + 1) - max(lo, 1))
    return 2 * forward + n_blocks * 4 * seq * arch.heads * arch.head_dim


def head_flops(arch: Arch) -> float:
    """Forward FLOPs per token of the output projection (and BERT's transform)."""
    return 2 * arch.hidden * arch.vocab + (2 * arch.hidden**2 if arch.head_transform else 0)


def narayanan_training_days(tokens: float, params: float, gpus: int, flops_per_gpu: float) -> float:
    """Narayanan et al. 2021, eq. 4: end-to-end time ~ 8 T P / (n X) (forward, backward and recompute).

    >>> round(narayanan_training_days(300e9, 174.6e9, 1024, 140e12), 1)   # the paper: ~34 days
    33.8
    """
    return 8 * tokens * params / (gpus * flops_per_gpu) / 86400
