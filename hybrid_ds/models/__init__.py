"""Model families: where each Hugging Face architecture keeps its parts, and the glue between them.

A pipeline of a model is ``[embedding, block 0, ..., block n-1, head]``. The embedding runs on the
first stage, the blocks are spread over the stages, the head (final norm and output projection) runs
on the last stage. Everything a family needs beyond the Hugging Face modules themselves is here: which
modules form each part, how the embedding part combines them, how position ids are made, and whether
attention is causal. Adding a family means adding one entry plus its parity test. A model type with
no entry goes to the generic adapter (models/generic/), which maps the common decoder-only layout from the
model's own structure or refuses it with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybrid_ds.errors import UserError, suggest

# embed(modules, inputs_embeds, attention_mask, token_type_ids, position_ids) -> hidden states.
# `modules` maps the last name of each path in Family.embedding ("wpe", "drop") to the built module.
EmbedFn = Callable[[dict[str, Any], Any, Any, Any, Any], Any]


def _add_positions_then_dropout(mods, embeds, mask, types, positions):  # gpt2
    return mods["drop"](embeds + mods["wpe"](positions))


def _identity(mods, embeds, mask, types, positions):  # llama, mistral, qwen2, gemma (it scales inside)
    return embeds


def _dropout(name: str) -> EmbedFn:
    return lambda mods, embeds, mask, types, positions: mods[name](embeds)


def _apply_in_order(names: tuple[str, ...]) -> EmbedFn:
    """Modules applied in order to the embeddings alone (what the generic adapter found before block 0)."""
    def embed(mods, embeds, mask, types, positions):
        for name in names:
            embeds = mods[name](embeds)
        return embeds
    return embed


def _opt(mods, embeds, mask, types, positions):
    if mods.get("project_in") is not None:
        embeds = mods["project_in"](embeds)
    return embeds + mods["embed_positions"](mask, 0, position_ids=positions)


def _bert(mods, embeds, mask, types, positions):
    return mods["embeddings"](inputs_embeds=embeds, token_type_ids=types)


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
                                     # or "absolute" (BERT: the embedding makes its own)
    task: str = "causal_lm"          # "causal_lm" or "masked_lm"

    @property
    def embedding_modules(self) -> tuple[str, ...]:
        return (self.token_embedding, *self.embedding)

    @property
    def head_modules(self) -> tuple[str, ...]:
        return (*self.final, self.output)


def _decoder(model_type: str, norm: str = "model.norm", dropout: str | None = None) -> Family:
    """The layout most decoder-only models share: embed_tokens, layers, rotary_emb, norm, lm_head."""
    return Family(model_type, "model.embed_tokens", (f"model.{dropout}",) if dropout else (),
                  _dropout(dropout) if dropout else _identity, "model.layers", (norm,), "lm_head",
                  rotary="model.rotary_emb")


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gpt2", "transformer.wte", ("transformer.wpe", "transformer.drop"), _add_positions_then_dropout,
           "transformer.h", ("transformer.ln_f",), "lm_head"),
    _decoder("llama"),
    _decoder("mistral"),
    _decoder("qwen2"),
    _decoder("gemma"),
    _decoder("phi", norm="model.final_layernorm", dropout="embed_dropout"),
    Family("gpt_neox", "gpt_neox.embed_in", ("gpt_neox.emb_dropout",), _dropout("emb_dropout"),
           "gpt_neox.layers", ("gpt_neox.final_layer_norm",), "lm_head", rotary="gpt_neox.rotary_emb"),
    Family("opt", "model.decoder.embed_tokens", ("model.decoder.embed_positions", "model.decoder.project_in"),
           _opt, "model.decoder.layers", ("model.decoder.final_layer_norm", "model.decoder.project_out"),
           "lm_head", positions="cumsum"),
    Family("bert", "bert.embeddings.word_embeddings", ("bert.embeddings",), _bert, "bert.encoder.layer",
           ("cls.predictions.transform",), "cls.predictions.decoder", output_bias="cls.predictions.bias",
           positions="absolute", task="masked_lm"),
)}


def get_family(model_type: str, hf_config: Any = None) -> Family:
    """The named family of ``model_type``, else the generic decoder-only adapter's mapping of ``hf_config``.

    The generic adapter (hybrid_ds/models/generic/) builds the model on the meta device from
    ``hf_config`` (overrides applied) and maps it, or raises a UserError saying what it cannot map.
    """
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if hf_config is None:
        raise UserError("model.name",
                        f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))} "
                        f"({suggest(model_type, FAMILIES)}); to add one, add a Family entry in "
                        "hybrid_ds/models/__init__.py and a parity test")
    from hybrid_ds.models.generic import generic_family, meta_causal_lm

    return generic_family(model_type, meta_causal_lm(model_type, hf_config))
