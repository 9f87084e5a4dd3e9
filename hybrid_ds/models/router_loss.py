"""A Mixture-of-Experts model's router loss as running sums that cross stage boundaries with the activations.

transformers' ``load_balancing_loss_func`` (5.24) accumulates, router by router, the assignments and routing
probability per expert and the rows counted, then divides at the end. :func:`add_router_stats` is one
router's step of it, :func:`router_aux_loss` the end; the generic adapter checks both against the model's own
function (hybrid_ds/models/generic/router.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hybrid_ds.config.families import RouterAux


def add_router_stats(stats: torch.Tensor | None, router_logits: torch.Tensor, attention_mask: torch.Tensor,
                     aux: RouterAux) -> torch.Tensor:
    """One router's step of transformers' ``load_balancing_loss_func``, as running sums in one tensor.

    ``stats`` is ``[assignments per expert (E), routing probability per expert (E), rows (1)]``, summed over
    the routers run so far, masked by the padding mask, in float32; None before the first router. The
    steps are the Hugging Face function's, in its order, so the loss comes out the same; as one tensor
    with the probability sums in it, it needs grad and crosses stage boundaries as activations do.
    """
    experts = aux.experts
    flat_mask = attention_mask.reshape(-1).to(device=router_logits.device, dtype=torch.float32)
    if stats is None:
        tokens = probs = torch.zeros(experts, dtype=torch.float32, device=router_logits.device)
        rows: Any = 0.0
    else:
        tokens, probs, rows = stats[:experts], stats[experts:2 * experts], stats[2 * experts]
    weights = F.softmax(router_logits, dim=-1)
    _, selected = torch.topk(weights, aux.top_k, dim=-1)
    tokens = tokens + torch.zeros(experts, dtype=torch.float32, device=router_logits.device).scatter_add_(
        0, selected.reshape(-1), flat_mask.repeat_interleave(aux.top_k))
    probs = probs + (weights.float() * flat_mask.unsqueeze(-1)).sum(dim=0)
    rows = rows + flat_mask.sum()
    return torch.cat([tokens, probs, rows.reshape(1)])


def router_aux_loss(stats: torch.Tensor, aux: RouterAux) -> torch.Tensor:
    """The load-balancing loss of the sums :func:`add_router_stats` carried through all blocks."""
    experts = aux.experts
    rows = stats[2 * experts]
    tokens_per_expert = stats[:experts] / rows
    router_prob_per_expert = stats[experts:2 * experts] / rows
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * experts
