"""Per-family parameter counts: the shapes of a model and the tensors Hugging Face builds for it. Pure Python.

An :class:`Arch` is read from a preset or a local ``config.json`` by one builder per ``model_type``
(the ``FAMILIES`` registry). Its parameters are grouped as the pipeline groups them,
[embedding, block 0 .. n-1, head]; a tied weight counts on every stage holding it. No torch, no
deepspeed, no transformers: tests/test_estimate.py holds these counts against models built on the meta device.

>>> arch = arch_from_preset("gpt3-175b")
>>> round(arch.params / 1e9, 1)          # Narayanan et al. 2021, Table 1: 174.6B
174.6
>>> tiny = arch_from_preset("gpt2-tiny")   # tied wte: counted in the embedding and again in the head
>>> tiny.layer_params(), stage_boundaries(tiny, "parameters", 2, seq_len=64)
([24576, 49984, 49984, 16512], [0, 2, 4])
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid_ds import presets
from hybrid_ds.errors import UserError
from hybrid_ds.topology import partition_layers

Tensor = tuple[str, int]       # (module path, elements)


@dataclass(frozen=True)
class Arch:
    """Shapes of one model and what its forward pass saves for backward."""

    name: str
    family: str
    task: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_positions: int
    embedding: tuple[Tensor, ...]   # the pipeline's embedding layer
    block: tuple[Tensor, ...]       # one transformer block
    head: tuple[Tensor, ...]        # final norm + output projection (the tied weight again, where tied)
    tied: int = 0                   # elements of the weight shared by embedding and head (0 = untied)
    act: str = "gelu"               # MLP activation (Hugging Face ACT2FN name)
    gated: bool = False             # SwiGLU / GeGLU: act(gate(x)) * up(x)
    norm: str = "layernorm"         # "layernorm", "rmsnorm" (llama), "rmsnorm_fp32" (gemma)
    parallel: str = ""              # "" sequential; "two_norms" (gpt_neox); "one_norm" (phi)
    rotary_dim: int = 0             # rotary dims per head (0: learned or absolute positions)
    learned_positions: bool = False
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0      # p of the two residual dropouts of each block
    embd_dropout: float = 0.0
    softmax_fp32: bool = True       # eager attention computes softmax in fp32 (llama and most newer models)
    fused_qkv: bool = False         # one q/k/v projection; with rotary, v keeps its whole output alive
    attn_out_copy: bool = False     # sdpa's output is copied (not viewed) into the output projection
    sliding_window: int = 0         # local attention window (Mistral): sdpa then gets a materialized mask
    position_ids_per_token: bool = False  # OPT: position ids from the padding mask, one per token
    head_extra: int = 0             # extra hidden-sized tensors the head saves (BERT's transform: 2)

    def layer_params(self) -> list[int]:
        """Elements of [embedding, block 0 .. n-1, head], a tied weight in both embedding and head."""
        block = sum(n for _, n in self.block)
        return [sum(n for _, n in self.embedding), *[block] * self.layers, sum(n for _, n in self.head)]

    @property
    def params(self) -> int:
        """Unique parameters of the whole model."""
        return sum(self.layer_params()) - self.tied

    def stage_params(self, parts: list[int]) -> list[int]:
        """Parameters each stage holds; the tied weight once per stage that holds it."""
        per_layer, last = self.layer_params(), len(self.layer_params()) - 1
        return [sum(per_layer[lo:hi]) - (self.tied if lo == 0 and hi == last + 1 else 0)
                for lo, hi in zip(parts, parts[1:])]

    def tensors(self) -> list[Tensor]:
        """Every parameter tensor of the model once (for ZeRO-3's persistence threshold)."""
        head = list(self.head)
        if self.tied:  # the shared weight is the head's only tensor of that size; it lives in the embedding
            head.remove(next(t for t in head if t[1] == self.tied))
        return [*self.embedding, *[t for _ in range(self.layers) for t in self.block], *head]

    def largest_module(self) -> int:
        """Elements of the module with the most direct parameters (DeepSpeed's largest_layer_params)."""
        largest = 0
        for part in (self.embedding, self.block, self.head):
            sizes: dict[str, int] = {}
            for module, n in part:
                sizes[module] = sizes.get(module, 0) + n
            largest = max(largest, *sizes.values())
        return largest


def _linear(module: str, n_in: int, n_out: int, bias: bool = True) -> list[Tensor]:
    return [(module, n_in * n_out)] + ([(module, n_out)] if bias else [])


def _norm(module: str, h: int, bias: bool = True) -> list[Tensor]:
    return [(module, h)] + ([(module, h)] if bias else [])


def _gpt2(c: dict[str, Any]) -> dict[str, Any]:
    # GPT2Config defaults: n_inner None = 4h, gelu_new, 0.1 dropouts, tied; Conv1D layers with biases.
    h, n_pos, vocab = c["n_embd"], c.get("n_positions", 1024), c.get("vocab_size", 50257)
    ffn = c.get("n_inner") or 4 * h
    block = (_norm("ln_1", h) + _linear("attn.c_attn", h, 3 * h) + _linear("attn.c_proj", h, h)
             + _norm("ln_2", h) + _linear("mlp.c_fc", h, ffn) + _linear("mlp.c_proj", ffn, h))
    return dict(layers=c["n_layer"], hidden=h, heads=c["n_head"], kv_heads=c["n_head"], head_dim=h // c["n_head"],
                ffn=ffn, vocab=vocab, max_positions=n_pos, embedding=[("wte", vocab * h), ("wpe", n_pos * h)],
                block=block, head=_norm("ln_f", h) + [("lm_head", vocab * h)], tied=vocab * h,
                act=c.get("activation_function", "gelu_new"), learned_positions=True,
                attn_dropout=c.get("attn_pdrop", 0.1), resid_dropout=c.get("resid_pdrop", 0.1),
                embd_dropout=c.get("embd_pdrop", 0.1), softmax_fp32=False, fused_qkv=True)


# model_type -> (tie_word_embeddings, kv heads, intermediate_size, vocab, activation) defaults of the
# Hugging Face config classes (transformers 5.24), for keys a preset or config.json leaves out.
_DECODER_DEFAULTS = {
    "llama": (False, None, 11008, 32000, "silu"), "mistral": (False, 8, 14336, 32000, "silu"),
    "qwen2": (False, 32, 22016, 151936, "silu"), "gemma": (True, 16, 24576, 256000, "gelu_pytorch_tanh"),
}


def _llama_like(c: dict[str, Any], model_type: str) -> dict[str, Any]:
    tie_default, kv_default, ffn_default, vocab_default, act_default = _DECODER_DEFAULTS[model_type]
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads", kv_default) or heads
    hd = c.get("head_dim") or (256 if model_type == "gemma" else h // heads)
    ffn, vocab = c.get("intermediate_size", ffn_default), c.get("vocab_size", vocab_default)
    qkv_bias = model_type == "qwen2" or c.get("attention_bias", False)
    mlp_bias = c.get("mlp_bias", False)
    tied = c.get("tie_word_embeddings", tie_default)
    block = (_norm("input_layernorm", h, bias=False) + _linear("q_proj", h, heads * hd, qkv_bias)
             + _linear("k_proj", h, kv * hd, qkv_bias) + _linear("v_proj", h, kv * hd, qkv_bias)
             + _linear("o_proj", heads * hd, h, c.get("attention_bias", False))
             + _norm("post_attention_layernorm", h, bias=False) + _linear("gate_proj", h, ffn, mlp_bias)
             + _linear("up_proj", h, ffn, mlp_bias) + _linear("down_proj", ffn, h, mlp_bias))
    out = ("lm_head", vocab * h)
    return dict(layers=c["num_hidden_layers"], hidden=h, heads=heads, kv_heads=kv, head_dim=hd, ffn=ffn, vocab=vocab,
                max_positions=c.get("max_position_embeddings", 2048), embedding=[("embed_tokens", vocab * h)],
                block=block, head=_norm("norm", h, bias=False) + [out], tied=vocab * h if tied else 0,
                act=c.get("hidden_activation") or c.get("hidden_act", act_default), gated=True,
                norm="rmsnorm_fp32" if model_type == "gemma" else "rmsnorm", rotary_dim=hd,
                attn_dropout=c.get("attention_dropout", 0.0), sliding_window=_sliding_window(c, model_type))


def _sliding_window(c: dict[str, Any], model_type: str) -> int:
    if model_type == "mistral":
        return c.get("sliding_window", 4096) or 0
    if model_type == "qwen2" and c.get("use_sliding_window", False):
        return c.get("sliding_window", 4096) or 0
    return 0


def _phi(c: dict[str, Any]) -> dict[str, Any]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv, hd = c.get("num_key_value_heads") or heads, h // heads
    ffn, vocab = c.get("intermediate_size", 8192), c.get("vocab_size", 51200)
    block = (_norm("input_layernorm", h) + _linear("q_proj", h, heads * hd) + _linear("k_proj", h, kv * hd)
             + _linear("v_proj", h, kv * hd) + _linear("dense", heads * hd, h)
             + (_norm("q_layernorm", hd) + _norm("k_layernorm", hd) if c.get("qk_layernorm") else [])
             + _linear("fc1", h, ffn) + _linear("fc2", ffn, h))
    return dict(layers=c["num_hidden_layers"], hidden=h, heads=heads, kv_heads=kv, head_dim=hd, ffn=ffn, vocab=vocab,
                max_positions=c.get("max_position_embeddings", 2048), embedding=[("embed_tokens", vocab * h)],
                block=block, head=_norm("final_layernorm", h) + _linear("lm_head", h, vocab), parallel="one_norm",
                act=c.get("hidden_act", "gelu_new"), rotary_dim=int(hd * c.get("partial_rotary_factor", 0.5)),
                attn_dropout=c.get("attention_dropout", 0.0), resid_dropout=c.get("resid_pdrop", 0.0),
                embd_dropout=c.get("embd_pdrop", 0.0), attn_out_copy=True)


def _gpt_neox(c: dict[str, Any]) -> dict[str, Any]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    ffn, vocab, bias = c.get("intermediate_size", 24576), c.get("vocab_size", 50432), c.get("attention_bias", True)
    block = (_norm("input_layernorm", h) + _norm("post_attention_layernorm", h)
             + _linear("attention.query_key_value", h, 3 * h, bias) + _linear("attention.dense", h, h, bias)
             + _linear("mlp.dense_h_to_4h", h, ffn) + _linear("mlp.dense_4h_to_h", ffn, h))
    tied = c.get("tie_word_embeddings", False)
    return dict(layers=c["num_hidden_layers"], hidden=h, heads=heads, kv_heads=heads, head_dim=h // heads, ffn=ffn,
                vocab=vocab, max_positions=c.get("max_position_embeddings", 2048),
                embedding=[("embed_in", vocab * h)], block=block, tied=vocab * h if tied else 0,
                head=_norm("final_layer_norm", h) + [("lm_head", vocab * h)],
                act=c.get("hidden_act", "gelu"), parallel="two_norms" if c.get("use_parallel_residual", True) else "",
                rotary_dim=int(h // heads * c.get("rotary_pct", 0.25)), attn_dropout=c.get("attention_dropout", 0.0),
                resid_dropout=c.get("hidden_dropout", 0.0), embd_dropout=c.get("hidden_dropout", 0.0),
                fused_qkv=True, attn_out_copy=True)


def _opt(c: dict[str, Any]) -> dict[str, Any]:
    h, ffn, vocab = c["hidden_size"], c.get("ffn_dim", 3072), c.get("vocab_size", 50272)
    proj, n_pos = c.get("word_embed_proj_dim", 768), c.get("max_position_embeddings", 2048)
    bias = c.get("enable_bias", True)
    block = (_linear("self_attn.k_proj", h, h, bias) + _linear("self_attn.v_proj", h, h, bias)
             + _linear("self_attn.q_proj", h, h, bias) + _linear("self_attn.out_proj", h, h, bias)
             + _norm("self_attn_layer_norm", h) + _linear("fc1", h, ffn, bias) + _linear("fc2", ffn, h, bias)
             + _norm("final_layer_norm", h))
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
                block=block, head=head, tied=vocab * proj if tied else 0, act=c.get("activation_function", "relu"),
                learned_positions=True, position_ids_per_token=True, attn_dropout=c.get("attention_dropout", 0.0),
                resid_dropout=c.get("dropout", 0.1))


def _bert(c: dict[str, Any]) -> dict[str, Any]:
    h, ffn, vocab = c["hidden_size"], c.get("intermediate_size", 3072), c.get("vocab_size", 30522)
    n_pos, types = c.get("max_position_embeddings", 512), c.get("type_vocab_size", 2)
    block = (_linear("attention.self.query", h, h) + _linear("attention.self.key", h, h)
             + _linear("attention.self.value", h, h) + _linear("attention.output.dense", h, h)
             + _norm("attention.output.LayerNorm", h) + _linear("intermediate.dense", h, ffn)
             + _linear("output.dense", ffn, h) + _norm("output.LayerNorm", h))
    embedding = [("word_embeddings", vocab * h), ("position_embeddings", n_pos * h),
                 ("token_type_embeddings", types * h)] + _norm("embeddings.LayerNorm", h)
    head = _linear("transform.dense", h, h) + _norm("transform.LayerNorm", h) + _linear("decoder", h, vocab)
    return dict(layers=c["num_hidden_layers"], hidden=h, heads=c["num_attention_heads"], kv_heads=c["num_attention_heads"],
                head_dim=h // c["num_attention_heads"], ffn=ffn, vocab=vocab, max_positions=n_pos, embedding=embedding,
                block=block, head=head, tied=vocab * h, act=c.get("hidden_act", "gelu"), learned_positions=True,
                attn_dropout=c.get("attention_probs_dropout_prob", 0.1), resid_dropout=c.get("hidden_dropout_prob", 0.1),
                embd_dropout=c.get("hidden_dropout_prob", 0.1), softmax_fp32=False, head_extra=2)


# model_type -> shape builder. A family missing here is estimated only when a preset or config.json of a
# known family names it; adding one is one builder plus its line in tests/test_estimate.py's meta-count test.
FAMILIES = {"gpt2": _gpt2, "phi": _phi, "gpt_neox": _gpt_neox, "opt": _opt, "bert": _bert,
            **{t: (lambda c, t=t: _llama_like(c, t)) for t in _DECODER_DEFAULTS}}


# transformers' ``attribute_map`` of the families that have one: the generic names a config (or an
# override) may use for the family's own keys.
ALIASES = {"gpt2": {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                    "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}}


def arch_from_config_dict(name: str, model_type: str, config: dict[str, Any]) -> Arch:
    if model_type not in FAMILIES:
        raise UserError("model.name", f"{name}: no parameter formulas for model_type {model_type!r}; "
                                      f"the estimator knows {', '.join(sorted(FAMILIES))}")
    aliases = ALIASES.get(model_type, {})
    config = {aliases.get(key, key): value for key, value in config.items()}
    task = "masked_lm" if model_type == "bert" else "causal_lm"
    return Arch(name=name, family=model_type, task=task, **FAMILIES[model_type](config))


def arch_from_preset(name: str, overrides: dict[str, Any] | None = None) -> Arch:
    preset = presets.get_preset(name)
    return arch_from_config_dict(name, preset.model_type, {**preset.config, **(overrides or {})})


def arch_from_model(name: str, pretrained: bool = False, overrides: dict[str, Any] | None = None) -> Arch:
    """A preset, or the ``config.json`` of a local folder or of a hub model in the local Hugging Face cache."""
    if presets.is_preset(name) and not pretrained:
        return arch_from_preset(name, overrides)
    path = _local_config_json(name)
    if path is None:
        raise UserError("model.name", f"{name!r}: not a preset and no config.json found locally; "
                                      "the estimator reads architecture numbers without downloading")
    config = json.loads(path.read_text())
    return arch_from_config_dict(name, config.get("model_type", "?"), {**config, **(overrides or {})})


def _local_config_json(name: str) -> Path | None:
    if (Path(name) / "config.json").is_file():
        return Path(name) / "config.json"
    import os

    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{name.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1] if found else None


# ---------------------------------------------------------------- stages


def stage_boundaries(arch: Arch, method: str | list[int], stages: int, seq_len: int) -> list[int]:
    """Stage boundaries over [embedding, blocks..., head], as hybrid_ds.plan computes them."""
    key = tuple(method) if isinstance(method, list) else method
    return list(_partition(key, tuple(arch.layer_params()), stages, seq_len, arch.hidden))


@functools.lru_cache(maxsize=256)
def _partition(method: str | tuple[int, ...], per_layer: tuple[int, ...], stages: int, seq_len: int,
               hidden: int) -> tuple[int, ...]:
    # `plan` asks for the same split of one model many times; the balanced split is O(layers^2 x stages).
    classes = ["Embedding", *["Block"] * (len(per_layer) - 2), "Head"]
    method = list(method) if isinstance(method, tuple) else method
    return tuple(partition_layers(method, list(per_layer), classes, stages, seq_len, hidden))


__all__ = ["FAMILIES", "Arch", "Tensor", "arch_from_config_dict", "arch_from_model", "arch_from_preset",
           "stage_boundaries"]
