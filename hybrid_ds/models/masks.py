"""What each stage recomputes instead of receiving: position ids and the 4-D attention mask of a block.

Both are made with the helpers the Hugging Face model itself uses, so a block gets exactly what it would
get inside the whole model. The generic adapter's trace (models/generic/trace.py) checks a model's blocks
against the same choice of mask helper.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import masking_utils

from hybrid_ds.families import Family


def position_ids(family: Family, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Position ids as the family's model computes them when none are given."""
    if family.positions == "cumsum":  # OPT: padding-aware
        return (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
    if family.positions == "absolute":  # BERT: the embedding uses its own buffer
        return None
    return torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)


def attention_mask_4d(family: Family, config: Any, layer_index: int, hidden: torch.Tensor,
                      attention_mask: torch.Tensor, positions: torch.Tensor | None) -> Any:
    """The mask the Hugging Face model gives block ``layer_index``, from the same helper it uses."""
    if family.task_info.bidirectional:
        return masking_utils.create_bidirectional_mask(config=config, inputs_embeds=hidden,
                                                       attention_mask=attention_mask)
    layer_types = getattr(config, "layer_types", None)
    sliding = (layer_types[layer_index] == "sliding_attention" if layer_types
               else getattr(config, "sliding_window", None) is not None)
    make = masking_utils.create_sliding_window_causal_mask if sliding else masking_utils.create_causal_mask
    kwargs = {} if family.positions == "cumsum" else {"position_ids": positions}
    return make(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, **kwargs)
