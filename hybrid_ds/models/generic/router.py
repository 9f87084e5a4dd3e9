"""The generic adapter's reading of a Mixture-of-Experts model's router loss (``output_router_logits``).

With ``output_router_logits`` set, a Hugging Face MoE causal LM records each router's logits while the
blocks run (the model's ``_can_record_outputs["router_logits"]``) and adds ``router_aux_loss_coef`` times
``load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok, attention_mask)`` to its loss.
The pipeline computes that loss from running sums each block adds to (hybrid_ds.models.router_loss); this
module finds what those sums need and checks, on random router logits, that they give exactly what the
model's own ``load_balancing_loss_func`` gives. A model whose router loss is anything else is refused.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from hybrid_ds.config.families import RouterAux
from hybrid_ds.models.generic.structure import refuse
from hybrid_ds.models.router_loss import add_router_stats, router_aux_loss


def router_aux(model_type: str, skeleton: nn.Module, blocks: nn.ModuleList) -> RouterAux | None:
    """The router loss ``skeleton`` adds to its LM loss, or None where it adds none."""
    if not getattr(skeleton.config, "output_router_logits", False):
        return None
    from transformers.utils.output_capturing import OutputRecorder

    entry = (getattr(skeleton, "_can_record_outputs", None) or {}).get("router_logits")
    if isinstance(entry, OutputRecorder) and entry.layer_name is None and entry.class_name is None:
        router_class, index = entry.target_class, entry.index
    elif isinstance(entry, type):
        router_class, index = entry, 0
    else:
        raise refuse(model_type, "output_router_logits=true, but its router logits are not recorded from one router "
                                 "class; set model.overrides.output_router_logits=false")
    numbers = [getattr(skeleton, name, None) for name in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")]
    routers = sum(isinstance(m, router_class) for m in blocks.modules())
    if None in numbers or not routers:
        raise refuse(model_type, "output_router_logits=true, but it has no num_experts, num_experts_per_tok and "
                                 f"router_aux_loss_coef, or no {router_class.__name__} in its blocks")
    aux = RouterAux(router_class.__name__, index, int(numbers[0]), int(numbers[1]), float(numbers[2]))
    _check_loss_function(model_type, skeleton, aux)
    return aux


def _check_loss_function(model_type: str, skeleton: nn.Module, aux: RouterAux) -> None:
    """The pipeline's running sums give what the model's ``load_balancing_loss_func`` gives, bit for bit."""
    hf_loss: Any = getattr(sys.modules[type(skeleton).__module__], "load_balancing_loss_func", None)
    generator = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(12, aux.experts, generator=generator) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padding, which the loss leaves out
    stats = None
    for router_logits in logits:
        stats = add_router_stats(stats, router_logits, mask, aux)
    if hf_loss is None or not torch.equal(hf_loss(logits, aux.experts, aux.top_k, mask), router_aux_loss(stats, aux)):
        raise refuse(model_type, "output_router_logits=true adds a router loss other than transformers' "
                                 "load_balancing_loss_func; set model.overrides.output_router_logits=false")
