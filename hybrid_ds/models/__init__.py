"""Model families: where each Hugging Face architecture keeps its parts.

One entry per Hugging Face ``model_type``. A pipeline of a model is
``[embedding, block 0, ..., block n-1, head]``: the embedding modules run on the first stage, the
blocks are spread over the stages, the head modules (final norm, LM head) run on the last stage.
Adding a family means adding one entry here plus its parity test.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_ds.errors import UserError, suggest


@dataclass(frozen=True)
class Family:
    model_type: str
    embedding: tuple[str, ...]   # module paths run before the first block; absent optional ones are skipped
    blocks: str                  # path of the nn.ModuleList of transformer blocks
    head: tuple[str, ...]        # module paths run after the last block (final norm, projections, LM head)
    task: str = "causal_lm"      # "causal_lm" (AutoModelForCausalLM) or "masked_lm" (AutoModelForMaskedLM)


def _decoder(model_type: str, norm: str = "model.norm") -> Family:
    """The llama layout shared by most decoder-only models (embed_tokens, layers, norm, lm_head)."""
    return Family(model_type, ("model.embed_tokens",), "model.layers", (norm, "lm_head"))


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gpt2", ("transformer.wte", "transformer.wpe"), "transformer.h", ("transformer.ln_f", "lm_head")),
    _decoder("llama"),
    _decoder("mistral"),
    _decoder("qwen2"),
    _decoder("gemma"),
    _decoder("phi", norm="model.final_layernorm"),
    Family("gpt_neox", ("gpt_neox.embed_in",), "gpt_neox.layers", ("gpt_neox.final_layer_norm", "embed_out")),
    Family("opt", ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
           "model.decoder.layers",
           ("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head")),
    Family("bert", ("bert.embeddings",), "bert.encoder.layer", ("cls",), task="masked_lm"),
)}


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UserError("model.name",
                        f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))} "
                        f"({suggest(model_type, FAMILIES)}); to add one, add a Family entry in "
                        "hybrid_ds/models/__init__.py and a parity test")
    return FAMILIES[model_type]
