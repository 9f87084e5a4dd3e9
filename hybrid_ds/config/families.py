"""The family table: everything hybrid_ds knows about a named Hugging Face architecture, in one entry. Pure Python.

A pipeline of a model is ``[embedding, block 0, ..., block n-1, head]``. The embedding runs on the
first stage, the blocks are spread over the stages, the head (final norm and output projection) runs
on the last stage. One :class:`Family` entry says, for one ``model_type``:

- its task (causal or masked LM: the Hugging Face auto class, the loss, the attention mask);
- the config key names it uses (GPT-2's ``n_layer`` for ``num_hidden_layers``: transformers' attribute_map);
- the module paths the adapter (hybrid_ds.models) materializes per stage, how the embedding part
  combines them and how position ids are made;
- the class name of its blocks (what ``pipeline.partition: "type:REGEX"`` matches);
- the shape builder the estimator counts parameters and activations with (hybrid_ds.config.shapes).

Adapters, presets, the estimator and export all read this table. Adding a named family is one entry
here plus its line in tests/test_parity.py; a decoder-only model type without an entry goes to the
generic adapter (hybrid_ds/models/generic/), which finds the same fields from the model's structure.
Nothing here imports torch: the embed functions only call the modules they are given.

>>> FAMILIES["gpt2"].keys.layers, FAMILIES["bert"].task, TASKS["masked_lm"].auto_class
('n_layer', 'masked_lm', 'AutoModelForMaskedLM')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, NamedTuple

from hybrid_ds.config import shapes
from hybrid_ds.config.shapes import DecoderDefaults


@dataclass(frozen=True)
class Task:
    """What a task means to the Hugging Face model: its auto class, its loss and how tokens attend."""

    auto_class: str          # transformers.<auto_class>.from_config / from_pretrained
    loss: str                # transformers.loss.loss_utils.<loss>(logits, labels, vocab_size)
    bidirectional: bool      # every token sees every other (BERT), else causal
    token_types: bool        # the model takes token_type_ids (segment ids)


TASKS = {
    "causal_lm": Task("AutoModelForCausalLM", "ForCausalLMLoss", bidirectional=False, token_types=False),
    "masked_lm": Task("AutoModelForMaskedLM", "ForMaskedLMLoss", bidirectional=True, token_types=True),
}


class ConfigKeys(NamedTuple):
    """The config dict keys one family uses for its layer count, hidden size and head count."""

    layers: str
    hidden: str
    heads: str


# embed(modules, inputs_embeds, attention_mask, token_type_ids, position_ids) -> hidden states.
# `modules` maps the last name of each path in Family.embedding ("wpe", "drop") to the built module.
EmbedFn = Callable[[dict[str, Any], Any, Any, Any, Any], Any]


def _add_positions_then_dropout(mods, embeds, mask, types, positions):  # gpt2
    return mods["drop"](embeds + mods["wpe"](positions))


def _identity(mods, embeds, mask, types, positions):  # llama, mistral, qwen2, gemma (it scales inside)
    return embeds


def _dropout(name: str) -> EmbedFn:
    return lambda mods, embeds, mask, types, positions: mods[name](embeds)


class ScalarOp(NamedTuple):
    """An elementwise op the model applies to the hidden states or logits outside its modules, with a constant.

    Replayed as the model runs it, ``x.<name>(value)`` (``x.<name>()`` without a value): Granite's
    ``inputs_embeds * embedding_multiplier``, Cohere's ``logits * logit_scale``, Gemma 2's final soft-cap
    ``tanh(logits / cap) * cap``. ``value`` is the constant exactly as the model's op saw it (a 0-dim tensor's
    value after its dtype's rounding).

    >>> apply_ops(7.0, (ScalarOp("__truediv__", 2.0), ScalarOp("__mul__", 3.0)))
    10.5
    """

    name: str                  # "mul", "div", "tanh", "float" (a tensor method)
    value: float | None = None


class RouterAux(NamedTuple):
    """The load-balancing loss of a Mixture-of-Experts model's routers, added to the LM loss times ``coef``.

    transformers' ``load_balancing_loss_func`` (Switch Transformer, eqs. 4-6), which the model runs when
    ``output_router_logits`` is set. Each block adds its routers' share to running sums that travel with
    the activations (hybrid_ds.models.router_loss.add_router_stats); the head turns them into the loss.
    """

    router_class: str   # the class whose output[index] is a router's logits (the model's _can_record_outputs)
    index: int
    experts: int
    top_k: int
    coef: float         # router_aux_loss_coef


def apply_ops(x: Any, ops: tuple[ScalarOp, ...]) -> Any:
    """``x`` with ``ops`` applied in order."""
    for op in ops:
        x = getattr(x, op.name)() if op.value is None else getattr(x, op.name)(op.value)
    return x


def apply_in_order(steps: tuple[str | ScalarOp, ...]) -> EmbedFn:
    """Modules (by name) and scalar ops applied in order to the embeddings alone (what the generic adapter
    found before block 0: an embedding dropout, Granite's embedding multiplier)."""
    def embed(mods, embeds, mask, types, positions):
        for step in steps:
            embeds = apply_ops(embeds, (step,)) if isinstance(step, ScalarOp) else mods[step](embeds)
        return embeds
    return embed


def _opt(mods, embeds, mask, types, positions):
    if mods.get("project_in") is not None:
        embeds = mods["project_in"](embeds)
    return embeds + mods["embed_positions"](mask, 0, position_ids=positions)


def _bert(mods, embeds, mask, types, positions):
    return mods["embeddings"](inputs_embeds=embeds, token_type_ids=types)


_STANDARD = ConfigKeys("num_hidden_layers", "hidden_size", "num_attention_heads")


@dataclass(frozen=True)
class Family:
    model_type: str
    token_embedding: str             # the token embedding: the weight a tied output projection shares
    embedding: tuple[str, ...]       # the rest of the embedding part (positions, dropout); absent ones skipped
    embed: EmbedFn                   # how the embedding part combines them
    blocks: str                      # the nn.ModuleList of transformer blocks
    final: tuple[str, ...]           # modules after the last block, applied in order (norms, projections)
    output: str                      # the output projection; its weight may be tied to token_embedding
    output_bias: str | None = None   # a bias applied after a tied projection (BERT's cls.predictions.bias)
    rotary: str | None = None        # module giving (cos, sin) from position ids; rebuilt on each stage
    positions: str = "arange"        # "arange", "cumsum" (OPT: from the padding mask, not given to masks),
                                     # "absolute" (BERT: the embedding makes its own) or "none" (Mamba 2)
    rotary_per_layer_type: bool = False  # the rotary module is called once per layer type (Gemma 3: local and
                                         # global bases); each block gets the (cos, sin) of config.layer_types[i]
    head_ops: tuple[ScalarOp, ...] = ()   # applied to the final hidden states before the output projection
    logit_ops: tuple[ScalarOp, ...] = ()  # applied to the logits after the output projection (scales, soft-caps)
    # keywords the model adds to every masking_utils call (Doge: allow_is_causal_skip=False materializes the mask)
    mask_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    router_aux: RouterAux | None = None   # a Mixture-of-Experts model's router loss (with output_router_logits)
    task: str = "causal_lm"          # a key of TASKS
    block_class: str = ""            # the Hugging Face class of one block ("LlamaDecoderLayer")
    block_returns_tuple: bool = False  # a block returns (hidden_states, ...) and the model uses only the first
    unmasked_layer_types: tuple[str, ...] = ()  # config.layer_types whose blocks get attention_mask=None (MLPs)
    unrotated_layer_types: tuple[str, ...] = ()  # those whose blocks get position_embeddings=None (OLMo-hybrid's
                                                 # linear attention)
    # transformers' attribute_map of the config class: generic key -> the family's own key
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    # the estimator's shape builder (hybrid_ds.config.shapes); None: the estimator reads the model's structure
    shape: Callable[[dict[str, Any]], dict[str, Any]] | None = field(default=None, compare=False)

    @property
    def embedding_modules(self) -> tuple[str, ...]:
        return (self.token_embedding, *self.embedding)

    @property
    def head_modules(self) -> tuple[str, ...]:
        return (*self.final, self.output)

    @property
    def keys(self) -> ConfigKeys:
        return ConfigKeys(*(self.aliases.get(key, key) for key in _STANDARD))

    @property
    def task_info(self) -> Task:
        return TASKS[self.task]


def _decoder(model_type: str, block_class: str, defaults: DecoderDefaults, norm: str = "model.norm",
             dropout: str | None = None, shape: Callable | None = None) -> Family:
    """The layout most decoder-only models share: embed_tokens, layers, rotary_emb, norm, lm_head."""
    return Family(model_type, "model.embed_tokens", (f"model.{dropout}",) if dropout else (),
                  _dropout(dropout) if dropout else _identity, "model.layers", (norm,), "lm_head",
                  rotary="model.rotary_emb", block_class=block_class,
                  shape=shape or partial(shapes.llama_like, d=defaults))


_GPT2_KEYS = MappingProxyType({"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                               "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"})

# Each decoder's DecoderDefaults are its transformers 5.24 config class defaults for the keys a preset
# or config.json may leave out (tests/test_families.py builds every preset and override on the meta device).
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gpt2", "transformer.wte", ("transformer.wpe", "transformer.drop"), _add_positions_then_dropout,
           "transformer.h", ("transformer.ln_f",), "lm_head", block_class="GPT2Block", aliases=_GPT2_KEYS,
           shape=shapes.gpt2),
    _decoder("llama", "LlamaDecoderLayer", DecoderDefaults()),
    _decoder("mistral", "MistralDecoderLayer", DecoderDefaults(kv_heads=8, ffn=14336, sliding="always")),
    _decoder("qwen2", "Qwen2DecoderLayer", DecoderDefaults(kv_heads=32, ffn=22016, vocab=151936, qkv_bias=True,
                                                           sliding="use_sliding_window")),
    _decoder("gemma", "GemmaDecoderLayer", DecoderDefaults(tied=True, kv_heads=16, ffn=24576, vocab=256000,
                                                           act="gelu_pytorch_tanh", head_dim=256,
                                                           norm="rmsnorm_fp32")),
    _decoder("phi", "PhiDecoderLayer", DecoderDefaults(), norm="model.final_layernorm", dropout="embed_dropout",
             shape=shapes.phi),
    Family("gpt_neox", "gpt_neox.embed_in", ("gpt_neox.emb_dropout",), _dropout("emb_dropout"),
           "gpt_neox.layers", ("gpt_neox.final_layer_norm",), "lm_head", rotary="gpt_neox.rotary_emb",
           block_class="GPTNeoXLayer", shape=shapes.gpt_neox),
    Family("opt", "model.decoder.embed_tokens", ("model.decoder.embed_positions", "model.decoder.project_in"),
           _opt, "model.decoder.layers", ("model.decoder.final_layer_norm", "model.decoder.project_out"),
           "lm_head", positions="cumsum", block_class="OPTDecoderLayer", shape=shapes.opt),
    Family("bert", "bert.embeddings.word_embeddings", ("bert.embeddings",), _bert, "bert.encoder.layer",
           ("cls.predictions.transform",), "cls.predictions.decoder", output_bias="cls.predictions.bias",
           positions="absolute", task="masked_lm", block_class="BertLayer", shape=shapes.bert),
)}


__all__ = ["FAMILIES", "TASKS", "ConfigKeys", "EmbedFn", "Family", "RouterAux", "ScalarOp", "Task", "apply_in_order", "apply_ops"]
