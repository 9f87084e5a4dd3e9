"""What each stage recomputes instead of receiving: position ids and the 4-D attention mask of a block.

Both are made with the helpers the Hugging Face model itself uses, so a block gets exactly what it would
get inside the whole model. The generic adapter's trace (models/generic/trace.py) checks a model's blocks
against the same choice of mask helper.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from transformers import masking_utils

from hybrid_ds.families import Family


def position_ids(family: Family, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Position ids as the family's model computes them when none are given."""
    if family.positions == "cumsum":  # OPT: padding-aware
        return (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
    if family.positions in ("absolute", "none"):  # BERT: the embedding uses its own buffer; Mamba 2: none
        return None
    return torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)


def attention_mask_4d(family: Family, config: Any, layer_index: int, hidden: torch.Tensor,
                      attention_mask: torch.Tensor, positions: torch.Tensor | None) -> Any:
    """The mask the Hugging Face model gives block ``layer_index``, from the same helper it uses."""
    if family.task_info.bidirectional:
        return masking_utils.create_bidirectional_mask(config=config, inputs_embeds=hidden,
                                                       attention_mask=attention_mask)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer_index] in family.unmasked_layer_types:
        return None
    name, extra = mask_helper(family, config, layer_index)
    kwargs = {} if family.positions == "cumsum" else {"position_ids": positions}
    return getattr(masking_utils, name)(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                                        cache=None, **kwargs, **extra)


def mask_helper(family: Family, config: Any, layer_index: int) -> tuple[str, dict[str, Any]]:
    """The name of the masking_utils helper for block ``layer_index`` and the keywords it is given.

    A layer type in ``config.layer_types`` maps to its helper as in transformers' own table
    (``LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING``: "linear_attention" and "conv" layers get the 2-D padding
    mask of ``create_recurrent_attention_mask``); other configs use the sliding-window helper when they have
    a ``sliding_window``. Looked up by name, so that the generic adapter's trace sees the call.
    """
    layer_types = getattr(config, "layer_types", None)
    helper = LAYER_HELPERS.get(layer_types[layer_index]) if layer_types else None
    if helper is None:
        sliding = (layer_types[layer_index] == "sliding_attention" if layer_types
                   else getattr(config, "sliding_window", None) is not None)
        helper = ("create_sliding_window_causal_mask" if sliding else "create_causal_mask", {})
    name, extra = helper
    return name, {**extra, **family.mask_kwargs}


def _layer_helpers() -> dict[str, tuple[str, dict[str, Any]]]:
    """transformers' layer type -> mask function table as (helper name, fixed keywords)."""
    table = {}
    for layer_type, fn in masking_utils.LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.items():
        if isinstance(fn, partial):
            table[layer_type] = (fn.func.__name__, dict(fn.keywords))
        elif callable(fn):  # the "hybrid" patterns map to a dict of layer types: not one layer's type
            table[layer_type] = (fn.__name__, {})
    return table


LAYER_HELPERS = _layer_helpers()
