"""Bytes autograd saves for backward in each part of a model, per micro-batch. Pure Python.

Korthikanti et al. 2022's catalogue of saved tensors, with the kernels these Hugging Face models
really call; :mod:`hybrid_ds.estimate` multiplies them by the micro-batches DeepSpeed's 1F1B
TrainSchedule keeps in flight. bench/estimator_accuracy.py holds them against autograd graphs on CPU.

>>> round(korthikanti_layer_bytes(seq=2048, batch=1, hidden=12288, heads=96) / 2**30, 2)  # sbh(34 + 5as/h)
2.67
"""

from __future__ import annotations

from hybrid_ds.estimate.architecture import Arch

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Tensors an activation function saves, in units of its input (b x s x ffn): torch's fused kernels save
# their input; Hugging Face's python GELUs save every intermediate; ReLU saves its output, which is
# also the next linear's input and so costs nothing extra.
_ACT_SAVES = {"relu": 0, "gelu_new": 4, "gelu_fast": 4, "quick_gelu": 2}


def korthikanti_layer_bytes(seq: int, batch: int, hidden: int, heads: int) -> float:
    """Korthikanti et al. 2022, eq. 1: one GPT layer, 16-bit activations, 1-byte dropout masks, no recompute."""
    return seq * batch * hidden * (34 + 5 * heads * seq / hidden)


def block_activation_terms(arch: Arch, seq: int, batch: int, precision: str, attn: str = "sdpa",
                           runtime: str = "cuda", block: int = 0, sp: int = 1, documents: bool = False
                           ) -> dict[str, float]:
    """Bytes autograd saves in block ``block`` for one micro-batch, by term, on one of ``sp`` sequence-parallel ranks
    (hybrid_ds.models.sequence_parallel): 1/sp of the tokens, and inside attention 1/sp of the heads over all of
    them; a materialized mask (a sliding window's, or ``documents``: data.document_mask's block-diagonal one) is the
    whole sequence's on every rank.

    ``runtime`` "cuda" assumes what GPUs run: dropout keeps 1-byte masks, ``sdpa`` takes a fused
    (flash / memory-efficient) kernel that saves q, k, v, the output and the log-sum-exp but no s x s
    matrix. "cpu" is what bench/estimator_accuracy.py measures: CPU dropout keeps a mask of the tensor's
    dtype, and CPU sdpa with attention dropout falls back to the math kernel, computing 16-bit attention
    in fp32. Batches are packed (no padding), so sdpa gets no mask and grouped k, v stay grouped.

    Under Korthikanti's assumptions (Megatron's fused GeLU, attention scores materialized, LayerNorm
    statistics left out) the terms add up to their eq. 1 exactly:

    >>> from dataclasses import replace
    >>> from hybrid_ds.estimate.architecture import arch_from_preset
    >>> gpt3 = replace(arch_from_preset("gpt3-175b"), act="gelu")
    >>> terms = block_activation_terms(gpt3, 2048, 1, "bf16", attn="eager")
    >>> sum(terms.values()) - terms["norm statistics"] == korthikanti_layer_bytes(2048, 1, 12288, 96)
    True
    """
    w, tokens, h = DTYPE_BYTES[precision], seq * batch / sp, arch.hidden
    mask = 1 if runtime == "cuda" else w
    stat = 4 if runtime == "cuda" else w
    norms = 1 if arch.parallel == "one_norm" else 2
    norm_inputs = 1 if arch.parallel else 2
    terms: dict[str, float] = {}
    if arch.norm == "layernorm":
        terms["norm inputs"] = norm_inputs * w * tokens * h
        terms["norm statistics"] = norms * 2 * stat * tokens
    else:  # Hugging Face RMSNorm: fp32 copy of the input, rsqrt, the normalized tensor the weight multiplies
        terms["norm inputs"] = norm_inputs * 4 * tokens * h
        terms["norm statistics"] = norms * 4 * tokens
        terms["normalized"] = norms * (4 if arch.norm == "rmsnorm_fp32" else w) * tokens * h
    terms["linear inputs"] = (1 if arch.parallel == "one_norm" else 2) * w * tokens * h
    terms.update(_attention_terms(arch, seq, batch, w, attn, runtime, sp, documents))
    terms["output projection input"] = w * tokens * arch.heads * arch.head_dim
    if arch.rotary_dim:
        terms["rotary cos/sin"] = 2 * seq / sp * arch.rotary_dim * w
    act = _ACT_SAVES.get(arch.act, 1)
    if arch.experts and arch.experts.routed[block]:
        terms.update(_expert_terms(arch, block, tokens, w, act))
    else:
        terms["mlp"] = (3 + act if arch.gated else act + 1) * w * tokens * arch.ffn
    if arch.resid_dropout > 0:
        terms["dropout masks"] = 2 * mask * tokens * h
    return terms


def _expert_terms(arch: Arch, block: int, tokens: int, w: int, act: int) -> dict[str, float]:
    """An MoE layer: the router's fp32 scores and choices, then each token's top-k experts save what a dense
    MLP of one expert's width saves, plus the token's rows gathered in and weighted out. An approximation from
    the shapes (transformers' fused experts loop over the experts a batch hits)."""
    e, h = arch.experts, arch.hidden
    weights = 3 if arch.gated else 2
    expert_ffn = e.routed[block] / (e.count * weights * h)
    shared_ffn = max(0, e.always[block] - e.count * h) / (weights * h)   # what is not the router: shared experts
    saves = 3 + act if arch.gated else act + 1
    terms = {"router": 2 * 4 * tokens * e.count + 12 * tokens * e.top_k,
             "experts": w * tokens * e.top_k * (saves * expert_ffn + 2 * h)}
    if shared_ffn:
        terms["shared experts"] = saves * w * tokens * shared_ffn
    return terms


def _attention_terms(arch: Arch, seq: int, batch: int, w: int, attn: str, runtime: str, sp: int = 1,
                     documents: bool = False) -> dict[str, float]:
    tokens, q_width = seq * batch / sp, arch.heads * arch.head_dim  # sp: all tokens of heads / sp, the same bytes
    scores = arch.heads * seq * seq * batch / sp
    if attn == "flex_attention" or (attn == "sdpa" and (runtime == "cuda" or arch.attn_dropout == 0)):
        kv_width = arch.kv_heads * arch.head_dim
        out = {"softmax log-sum-exp": 4 * arch.heads * tokens}
        # a materialized mask: sdpa saves it, k, v repeated to all heads (FlexAttention's block mask is a few indices
        # per 128 x 128 tile: no mask)
        if attn == "sdpa" and (0 < arch.sliding_window < seq or documents):
            out["attention mask"] = w * batch * seq * seq
            kv_width = q_width
        qkv = q_width + 2 * kv_width
        if arch.fused_qkv and arch.rotary_dim:  # rotary makes new q, k; v is a view of the fused projection
            qkv += q_width + kv_width
        out["q, k, v"] = w * tokens * qkv
        if arch.attn_out_copy:
            out["attention output"] = w * tokens * q_width
        return out
    # math kernel (eager, or CPU sdpa with dropout): q, k, v after repeat_kv, and the s x s scores
    compute = 4 if (attn == "sdpa" and runtime == "cpu") else w
    if attn == "sdpa" or not arch.softmax_fp32:
        score_bytes = compute
    else:  # eager: softmax in fp32, then the copy in the model dtype that multiplies v
        score_bytes = 4 + (w if w < 4 else 0)
    out = {"q, k, v": 3 * compute * tokens * q_width, "attention scores": score_bytes * scores}
    if arch.attn_dropout > 0:
        out["attention dropout"] = ((compute if runtime == "cpu" else 1) + compute) * scores
    return out


def embedding_activation_bytes(arch: Arch, seq: int, batch: int, precision: str, runtime: str = "cuda") -> float:
    """Saved by the embedding layer: token ids, position ids, dropout mask (BERT: token types and LayerNorm)."""
    w, tokens, h = DTYPE_BYTES[precision], seq * batch, arch.hidden
    saved = 8 * tokens + (8 * (tokens if arch.position_ids_per_token else seq) if arch.learned_positions else 0)
    if arch.embd_dropout > 0:
        saved += (1 if runtime == "cuda" else w) * tokens * h
    if arch.token_types:
        saved += 8 * tokens + w * tokens * h + 2 * (4 if runtime == "cuda" else w) * tokens
    return saved


def head_activation_bytes(arch: Arch, seq: int, batch: int, precision: str, runtime: str = "cuda",
                          fused_loss: bool = False, frozen: bool = False) -> float:
    """Saved by the final norm, output projection and loss (fp32 log-softmax over the vocabulary). The fused
    loss (``train.fused_loss``) saves neither the projection's input nor the log-softmax: it makes the gradients
    in its forward pass (``fused_loss_bytes``). A ``frozen`` RMSNorm (LoRA) keeps no normalized tensor for its
    weight's gradient."""
    w, tokens, h = DTYPE_BYTES[precision], seq * batch, arch.hidden
    if arch.norm == "layernorm":
        norm = w * tokens * h + 2 * (4 if runtime == "cuda" else w) * tokens
    else:
        norm = 4 * tokens * h + 4 * tokens + (0 if frozen else (4 if arch.norm == "rmsnorm_fp32" else w) * tokens * h)
    if fused_loss:
        return norm + (2 if arch.head_transform else 0) * w * tokens * h + 8 * tokens
    return norm + (3 if arch.head_transform else 1) * w * tokens * h + 4 * tokens * arch.vocab + 8 * tokens


FUSED_LOSS_BLOCK = 1 << 25  # logits per block of hybrid_ds.models.head_loss (BLOCK_ELEMENTS)


def fused_loss_bytes(arch: Arch, tokens: int, precision: str, frozen: bool = False) -> float:
    """What the fused loss holds from its forward pass to its backward: the gradients of the hidden states (model
    dtype) and of the output weight (fp32 sum, until autograd adds it into ``.grad``; none for a ``frozen``
    weight, LoRA's), plus one block of logits (fp32, and the model dtype's copy in bf16/fp16) while it runs.

    >>> from hybrid_ds.estimate.architecture import arch_from_preset
    >>> arch = arch_from_preset("gpt2")
    >>> fused_loss_bytes(arch, 1024, "fp32") / 2**20   # 4 x 50257 x 768 + 4 x 1024 x 768 + 4 x 667 x 50257
    278.1...
    """
    w, h, vocab = DTYPE_BYTES[precision], arch.hidden, arch.vocab
    rows = min(tokens, max(1, FUSED_LOSS_BLOCK // vocab))
    block = rows * vocab * (4 if w == 4 else 4 + 2 * w)
    return (0 if frozen else 4 * vocab * h) + w * tokens * h + block


__all__ = ["DTYPE_BYTES", "block_activation_terms", "embedding_activation_bytes", "fused_loss_bytes", "head_activation_bytes",
           "korthikanti_layer_bytes"]
