"""Shape builders: a family's config dict -> the tensors Hugging Face builds for it, for the estimator. Pure Python.

Each builder takes the config dict of one model (a preset's kwargs or a ``config.json``, keys already in
the family's own names) and returns the keyword arguments of :class:`hybrid_ds.estimate.architecture.Arch`.
The family table (:mod:`hybrid_ds.config.families`) says which builder a model type uses and with which
defaults; nothing here branches on a model type. tests/test_families.py holds every count against the
model built on the meta device.

>>> shape = llama_like({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}, DecoderDefaults())
>>> shape["head_dim"], shape["kv_heads"], shape["tied"]
(16, 4, 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

Tensor = tuple[str, int]       # (module path, elements)


class Linear(NamedTuple):
    """A linear layer of a block (``nn.Linear``, GPT-2's ``Conv1D``): what a LoRA adapter wraps."""

    module: str        # path inside its block ("self_attn.q_proj"); a head layer's from the model's root
    n_in: int
    n_out: int
    bias: bool = True


def _linear(module: str, n_in: int, n_out: int, bias: bool = True) -> list[Tensor]:
    return [(module, n_in * n_out)] + ([(module, n_out)] if bias else [])


def _weights(linears: list[Linear]) -> list[Tensor]:
    return [t for layer in linears for t in _linear(*layer)]


def _norm(module: str, h: int, bias: bool = True) -> list[Tensor]:
    return [(module, h)] + ([(module, h)] if bias else [])


def gpt2(c: dict[str, Any]) -> dict[str, Any]:
    # GPT2Config defaults: n_inner None = 4h, gelu_new, 0.1 dropouts, tied; Conv1D layers with biases.
    h, n_pos, vocab = c["n_embd"], c.get("n_positions", 1024), c.get("vocab_size", 50257)
    ffn = c.get("n_inner") or 4 * h
    linears = [Linear("attn.c_attn", h, 3 * h), Linear("attn.c_proj", h, h), Linear("mlp.c_fc", h, ffn),
               Linear("mlp.c_proj", ffn, h)]
    return dict(layers=c["n_layer"], hidden=h, heads=c["n_head"], kv_heads=c["n_head"], head_dim=h // c["n_head"],
                ffn=ffn, vocab=vocab, max_positions=n_pos, embedding=[("wte", vocab * h), ("wpe", n_pos * h)],
                block=_norm("ln_1", h) + _norm("ln_2", h) + _weights(linears), linears=linears,
                head=_norm("ln_f", h) + [("lm_head", vocab * h)], tied=vocab * h,
                act=c.get("activation_function", "gelu_new"), learned_positions=True,
                attn_dropout=c.get("attn_pdrop", 0.1), resid_dropout=c.get("resid_pdrop", 0.1),
                embd_dropout=c.get("embd_pdrop", 0.1), softmax_fp32=False, fused_qkv=True)


@dataclass(frozen=True)
class DecoderDefaults:
    """What a Llama-like config class fills in for keys a preset or config.json leaves out (transformers 5.24),
    and the family's fixed choices."""

    tied: bool = False              # tie_word_embeddings
    kv_heads: int | None = None     # num_key_value_heads (None: as many as query heads)
    ffn: int = 11008                # intermediate_size
    vocab: int = 32000              # vocab_size
    act: str = "silu"               # hidden_act
    head_dim: int | None = None     # head_dim (None: hidden_size // num_attention_heads)
    qkv_bias: bool = False          # q/k/v projections always carry biases (Qwen2), whatever attention_bias says
    norm: str = "rmsnorm"           # "rmsnorm", or "rmsnorm_fp32" (Gemma computes its norms in fp32)
    sliding: str = "never"          # "never", "always" (Mistral) or "use_sliding_window" (Qwen2's switch)


def llama_like(c: dict[str, Any], d: DecoderDefaults) -> dict[str, Any]:
    """Llama's layout: embed_tokens, rotary, SwiGLU/GeGLU blocks of q/k/v/o and gate/up/down, RMSNorm."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads", d.kv_heads) or heads
    hd = c.get("head_dim") or d.head_dim or h // heads
    ffn, vocab = c.get("intermediate_size", d.ffn), c.get("vocab_size", d.vocab)
    qkv_bias = d.qkv_bias or c.get("attention_bias", False)
    mlp_bias = c.get("mlp_bias", False)
    tied = c.get("tie_word_embeddings", d.tied)
    linears = [Linear("self_attn.q_proj", h, heads * hd, qkv_bias), Linear("self_attn.k_proj", h, kv * hd, qkv_bias),
               Linear("self_attn.v_proj", h, kv * hd, qkv_bias),
               Linear("self_attn.o_proj", heads * hd, h, c.get("attention_bias", False)),
               Linear("mlp.gate_proj", h, ffn, mlp_bias), Linear("mlp.up_proj", h, ffn, mlp_bias),
               Linear("mlp.down_proj", ffn, h, mlp_bias)]
    block = (_norm("input_layernorm", h, bias=False) + _norm("post_attention_layernorm", h, bias=False)
             + _weights(linears))
    out = ("lm_head", vocab * h)
    return dict(layers=c["num_hidden_layers"], hidden=h, heads=heads, kv_heads=kv, head_dim=hd, ffn=ffn, vocab=vocab,
                max_positions=c.get("max_position_embeddings", 2048), embedding=[("embed_tokens", vocab * h)],
                block=block, linears=linears, head=_norm("norm", h, bias=False) + [out], tied=vocab * h if tied else 0,
                act=c.get("hidden_activation") or c.get("hidden_act", d.act), gated=True, norm=d.norm, rotary_dim=hd,
                attn_dropout=c.get("attention_dropout", 0.0), sliding_window=_sliding_window(c, d.sliding))


def _sliding_window(c: dict[str, Any], sliding: str) -> int:
    if sliding == "always" or (sliding == "use_sliding_window" and c.get("use_sliding_window", False)):
        return c.get("sliding_window", 4096) or 0
    return 0


def phi(c: dict[str, Any]) -> dict[str, Any]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv, hd = c.get("num_key_value_heads") or heads, h // heads
    ffn, vocab = c.get("intermediate_size", 8192), c.get("vocab_size", 51200)
    linears = [Linear("self_attn.q_proj", h, heads * hd), Linear("self_attn.k_proj", h, kv * hd),
               Linear("self_attn.v_proj", h, kv * hd), Linear("self_attn.dense", heads * hd, h),
               Linear("mlp.fc1", h, ffn), Linear("mlp.fc2", ffn, h)]
    block = (_norm("input_layernorm", h) + (_norm("q_layernorm", hd) + _norm("k_layernorm", hd)
                                            if c.get("qk_layernorm") else []) + _weights(linears))
    return dict(layers=c["num_hidden_layers"], hidden=h, heads=heads, kv_heads=kv, head_dim=hd, ffn=ffn, vocab=vocab,
                max_positions=c.get("max_position_embeddings", 2048), embedding=[("embed_tokens", vocab * h)],
                block=block, linears=linears, head=_norm("final_layernorm", h) + _linear("lm_head", h, vocab),
                parallel="one_norm",
                tied=vocab * h if c.get("tie_word_embeddings", False) else 0,
                act=c.get("hidden_act", "gelu_new"), rotary_dim=int(hd * c.get("partial_rotary_factor", 0.5)),
                attn_dropout=c.get("attention_dropout", 0.0), resid_dropout=c.get("resid_pdrop", 0.0),
                embd_dropout=c.get("embd_pdrop", 0.0), attn_out_copy=True)


def gpt_neox(c: dict[str, Any]) -> dict[str, Any]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    ffn, vocab, bias = c.get("intermediate_size", 24576), c.get("vocab_size", 50432), c.get("attention_bias", True)
    linears = [Linear("attention.query_key_value", h, 3 * h, bias), Linear("attention.dense", h, h, bias),
               Linear("mlp.dense_h_to_4h", h, ffn), Linear("mlp.dense_4h_to_h", ffn, h)]
    block = _norm("input_layernorm", h) + _norm("post_attention_layernorm", h) + _weights(linears)
    tied = c.get("tie_word_embeddings", False)
    return dict(layers=c["num_hidden_layers"], hidden=h, heads=heads, kv_heads=heads, head_dim=h // heads, ffn=ffn,
                vocab=vocab, max_positions=c.get("max_position_embeddings", 2048),
                embedding=[("embed_in", vocab * h)], block=block, linears=linears, tied=vocab * h if tied else 0,
                head=_norm("final_layer_norm", h) + [("lm_head", vocab * h)],
                act=c.get("hidden_act", "gelu"), parallel="two_norms" if c.get("use_parallel_residual", True) else "",
                rotary_dim=int(h // heads * c.get("rotary_pct", 0.25)), attn_dropout=c.get("attention_dropout", 0.0),
                resid_dropout=c.get("hidden_dropout", 0.0), embd_dropout=c.get("hidden_dropout", 0.0),
                fused_qkv=True, attn_out_copy=True)


def opt(c: dict[str, Any]) -> dict[str, Any]:
    h, ffn, vocab = c["hidden_size"], c.get("ffn_dim", 3072), c.get("vocab_size", 50272)
    proj, n_pos = c.get("word_embed_proj_dim", 768), c.get("max_position_embeddings", 2048)
    bias = c.get("enable_bias", True)
    linears = [Linear("self_attn.k_proj", h, h, bias), Linear("self_attn.v_proj", h, h, bias),
               Linear("self_attn.q_proj", h, h, bias), Linear("self_attn.out_proj", h, h, bias),
               Linear("fc1", h, ffn, bias), Linear("fc2", ffn, h, bias)]
    block = _norm("self_attn_layer_norm", h) + _norm("final_layer_norm", h) + _weights(linears)
    final_norm = c.get("do_layer_norm_before", True) and not c.get("_remove_final_layer_norm", False)
    embedding = [("embed_tokens", vocab * proj), ("embed_positions", (n_pos + 2) * h)]
    head = _norm("decoder.final_layer_norm", h) if final_norm else []
    if proj != h:
        embedding += _linear("project_in", proj, h, bias=False)
        head += _linear("project_out", h, proj, bias=False)
    tied = c.get("tie_word_embeddings", True)
    head.append(("lm_head", vocab * proj))
    return dict(layers=c["num_hidden_layers"], hidden=h, heads=c["num_attention_heads"], kv_heads=c["num_attention_heads"],
                head_dim=h // c["num_attention_heads"], ffn=ffn, vocab=vocab, max_positions=n_pos, embedding=embedding,
                block=block, linears=linears, head=head, tied=vocab * proj if tied else 0,
                act=c.get("activation_function", "relu"),
                learned_positions=True, position_ids_per_token=True, attn_dropout=c.get("attention_dropout", 0.0),
                resid_dropout=c.get("dropout", 0.1))


def bert(c: dict[str, Any]) -> dict[str, Any]:
    h, ffn, vocab = c["hidden_size"], c.get("intermediate_size", 3072), c.get("vocab_size", 30522)
    n_pos, types = c.get("max_position_embeddings", 512), c.get("type_vocab_size", 2)
    linears = [Linear("attention.self.query", h, h), Linear("attention.self.key", h, h),
               Linear("attention.self.value", h, h), Linear("attention.output.dense", h, h),
               Linear("intermediate.dense", h, ffn), Linear("output.dense", ffn, h)]
    block = _norm("attention.output.LayerNorm", h) + _norm("output.LayerNorm", h) + _weights(linears)
    embedding = [("word_embeddings", vocab * h), ("position_embeddings", n_pos * h),
                 ("token_type_embeddings", types * h)] + _norm("embeddings.LayerNorm", h)
    transform = [Linear("cls.predictions.transform.dense", h, h)]
    head = _weights(transform) + _norm("transform.LayerNorm", h) + _linear("decoder", h, vocab)
    return dict(layers=c["num_hidden_layers"], hidden=h, heads=c["num_attention_heads"], kv_heads=c["num_attention_heads"],
                head_dim=h // c["num_attention_heads"], ffn=ffn, vocab=vocab, max_positions=n_pos, embedding=embedding,
                block=block, linears=linears, head_linears=transform, head=head, tied=vocab * h,
                act=c.get("hidden_act", "gelu"), learned_positions=True,
                attn_dropout=c.get("attention_probs_dropout_prob", 0.1), resid_dropout=c.get("hidden_dropout_prob", 0.1),
                embd_dropout=c.get("hidden_dropout_prob", 0.1), softmax_fp32=False, token_types=True,
                head_transform=True)
