"""What each stage recomputes instead of receiving: position ids and the 4-D attention mask of a block.

Both are made with the helpers the Hugging Face model itself uses, so a block gets exactly what it would
get inside the whole model. The generic adapter's trace (models/generic/trace.py) checks a model's blocks
against the same choice of mask helper.

With ``data.document_mask`` the int64 mask that travels between stages holds each token's document index
(1, 2, ... within a row; 0 = padding: hybrid_ds.data.feed.document_ids) instead of 1/0. Positions then
restart at every document, and the mask helpers are given those positions and no padding mask: that is
transformers' own packed-sequence format (``find_packed_sequence_indices``), which makes the block-diagonal
mask for every layer type (causal, sliding-window, chunked), the mask a Hugging Face model itself makes
when it is given restarting ``position_ids`` (DataCollatorWithFlattening's format).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from transformers import masking_utils

from hybrid_ds.config.families import Family


def position_ids(family: Family, attention_mask: torch.Tensor, documents: bool = False) -> torch.Tensor | None:
    """Position ids as the family's model computes them when none are given; per document with ``documents``."""
    if documents:
        return document_positions(attention_mask)
    if family.positions == "cumsum":  # OPT: padding-aware
        return (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
    if family.positions in ("absolute", "none"):  # BERT: the embedding uses its own buffer; Mamba 2: none
        return None
    return torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """Each token's position in its document: 0 where the document index changes (padding counts as one).

    >>> document_positions(torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])).tolist()
    [[0, 1, 2, 0, 1, 0, 0, 1]]
    """
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def padding_mask(attention_mask: torch.Tensor, documents: bool = False) -> torch.Tensor:
    """The 1/0 padding mask of what travels between stages (document indices with ``documents``)."""
    return (attention_mask > 0).to(attention_mask.dtype) if documents else attention_mask


def attention_mask_4d(family: Family, config: Any, layer_index: int, hidden: torch.Tensor,
                      attention_mask: torch.Tensor, positions: torch.Tensor | None, documents: bool = False) -> Any:
    """The mask the Hugging Face model gives block ``layer_index``, from the same helper it uses.

    With ``documents`` (``positions`` restarting per document): no padding mask and those positions, so the
    helper finds the documents and keeps attention inside each (padding is a document of its own).
    """
    if family.task_info.bidirectional:
        return masking_utils.create_bidirectional_mask(config=config, inputs_embeds=hidden,
                                                       attention_mask=attention_mask)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer_index] in family.unmasked_layer_types:
        return None
    name, extra = mask_helper(family, config, layer_index)
    kwargs = {} if family.positions == "cumsum" and not documents else {"position_ids": positions}
    if documents:
        attention_mask = None  # transformers looks for packed documents only when no padding mask is given
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


def document_mask_obstacle(family: Family, config: Any) -> str | None:
    """Why ``data.document_mask`` cannot keep this model's documents apart, or None where it can."""
    if family.task_info.bidirectional:
        return (f"{config.model_type} is a masked LM: a packed block wraps only its first document in [CLS] ... [SEP], "
                "so the documents after it would not look like the model's input")
    layer_types = getattr(config, "layer_types", None) or ()
    recurrent = sorted({t for t in layer_types if LAYER_HELPERS.get(t, ("",))[0] == "create_recurrent_attention_mask"})
    if family.positions == "none" or recurrent:
        kind = ", ".join(recurrent) if recurrent else "state-space"
        return (f"{config.model_type}'s {kind} layers carry a state from token to token, which no attention mask "
                "keeps inside a document")
    return None
