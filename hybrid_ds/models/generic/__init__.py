"""The generic adapter: a Family for a decoder-only model that no named family describes.

It maps the layout most Hugging Face decoder-only models share (token embedding, a list of blocks,
one rotary module, final norms, an output projection) from the model's own structure, then proves
the mapping by running the model once on the meta device with every part recorded:

- the token embedding's output reaches block 0 unchanged, or through modules called on it alone
  (an embedding dropout), each block's output is the next block's input, and the last block's output
  reaches the output projection only through modules called on it alone (the final norm);
- the logits are the output projection's output, and the loss is ``ForCausalLMLoss`` of them;
- each block gets exactly what the pipeline gives it: the mask from the same ``masking_utils`` helper
  that :func:`hybrid_ds.models.layers.attention_mask_4d` picks for that block, the rotary module's
  ``(cos, sin)``, ``position_ids`` made by ``arange``, and nothing else;
- every submodule or parameter of the model has a place in the pipeline;
- a Mixture-of-Experts model's router loss (``output_router_logits``) is transformers' own
  ``load_balancing_loss_func``, which the blocks' running sums reproduce (``router``).

Scalar ops outside the modules on the embeddings, the final hidden states or the logits (Granite's
multipliers, Cohere's logit scale, Gemma's soft-cap) are recorded and replayed (``ScalarOp``); a rotary
module called once per layer type (Gemma 3) gives each block its type's (cos, sin). Hybrid models get per
layer type the mask helper of transformers' own table (linear-attention, SSM and conv layers: the 2-D padding
mask), no mask where the model gives none (Nemotron-H's MLP layers), the model's ``allow_is_causal_skip``;
blocks that return (hidden_states, ...) whose rest the model drops (Bamba), and models without position ids
(Mamba 2) are mapped too. Anything else (per-layer inputs, a mask helper the pipeline does not use, an
extra tower) is refused with a UserError: a structure it cannot map is never turned into a wrong model.
That the numbers match is what ``hybrid-ds parity`` then checks.

``structure`` maps the model (ModelMap), ``trace`` runs the recorded forward, ``checks`` reads the record.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hybrid_ds.errors import UserError
from hybrid_ds.config.families import Family
from hybrid_ds.models.generic.router import router_aux
from hybrid_ds.models.generic.checks import FlowChecker, check_unplaced
from hybrid_ds.models.generic.structure import find_model_map, first_line, refuse
from hybrid_ds.models.generic.trace import trace_model


def meta_causal_lm(model_type: str, hf_config: Any) -> nn.Module:
    """The causal-LM model of ``hf_config`` on the meta device (the config is copied, never changed)."""
    import transformers

    if getattr(hf_config, "is_encoder_decoder", False):
        raise refuse(model_type, "it is an encoder-decoder model, not decoder-only")
    try:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - the model's own code rejecting its config, in many types
        _check_attention(hf_config)
        raise refuse(model_type, f"it cannot be built as a causal LM ({first_line(err)})") from None


def _check_attention(hf_config: Any) -> None:
    """A model without the attention kernel asked for (Gemma 2 has no SDPA path) is a setting to change, not a refusal."""
    import transformers

    cls = transformers.AutoModelForCausalLM._model_mapping.get(type(hf_config), None)
    asked = getattr(hf_config, "_attn_implementation", None)
    if cls is not None and asked == "sdpa" and not getattr(cls, "_supports_sdpa", True):
        raise UserError("model.attn_implementation", f"'sdpa': {cls.__name__} does not support SDPA attention; "
                                                     "set it to 'eager'")


def generic_family(model_type: str, skeleton: nn.Module) -> Family:
    """The Family of ``skeleton`` (a causal LM on the meta device), or a UserError saying why there is none."""
    config = skeleton.config
    if getattr(config, "is_encoder_decoder", False):
        raise refuse(model_type, "it is an encoder-decoder model, not decoder-only")
    model_map = find_model_map(model_type, skeleton)
    aux = router_aux(model_type, skeleton, model_map.blocks)
    with _router_loss_off(config):  # the trace maps the LM loss; router_aux checked the router loss
        trace = trace_model(model_type, skeleton, model_map)
    checker = FlowChecker(model_type, skeleton, model_map, trace)
    for call in trace.calls:
        checker.visit(call)
    family = checker.family()
    check_unplaced(model_type, skeleton, model_map, family, trace)
    return dataclasses.replace(family, router_aux=aux)


@contextmanager
def _router_loss_off(config: Any):
    saved = getattr(config, "output_router_logits", None)
    if saved:
        config.output_router_logits = False
    try:
        yield
    finally:
        if saved:
            config.output_router_logits = saved
