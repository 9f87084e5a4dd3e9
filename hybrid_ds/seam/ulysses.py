"""Ulysses sequence parallelism: DeepSpeed's differentiable all-to-all over a sequence-parallel group.

DeepSpeed 0.19.8 ships the exchange its own Ulysses attention uses (``deepspeed.sequence.layer``): an operator
``deepspeed::dim_zero_all_to_all`` with a declared backward (the same all-to-all of the gradient), which sends slice
i of dimension 0 to rank i of the group and stacks what it receives from rank i at i. It addresses the group by name
(``register_all_to_all_group``), so that ``torch.compile`` sees an operator rather than a body to inline. Both names
are private (``_dim_zero_all_to_all``) or undocumented, so they are reached here, checked first.
"""

from __future__ import annotations

from typing import Any

import torch

from hybrid_ds.seam.compat import code_has, require, requirement

_WHY = "model.sequence_parallel exchanges tokens for heads around attention with DeepSpeed's all-to-all"


def _layer() -> Any:
    import deepspeed.sequence.layer as layer

    return layer


ALL_TO_ALL = requirement(
    "ulysses.all_to_all", "deepspeed.sequence.layer._dim_zero_all_to_all(group, input) and "
    "register_all_to_all_group(group), the differentiable all-to-all of dimension 0 its Ulysses attention uses",
    lambda: code_has(_layer()._dim_zero_all_to_all, "_dim_zero_all_to_all_op(input.contiguous(), group.group_name)")
    and callable(_layer().register_all_to_all_group), _WHY)


def register_group(group: Any) -> None:
    """Make ``group`` usable by :func:`all_to_all` (outside any compiled region, before the first exchange)."""
    require(ALL_TO_ALL)
    _layer().register_all_to_all_group(group)


def all_to_all(group: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Slice i of ``tensor``'s dimension 0 (of size the group's) to rank i; slice i of the result from rank i."""
    return _layer()._dim_zero_all_to_all(group, tensor)
