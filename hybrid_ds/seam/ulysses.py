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


def _tiled() -> Any:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    return TiledMLP


TILED_MLP = requirement(
    "ulysses.tiled_mlp", "deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP.apply(fn, module, x, shards, "
    "compute_params): fn(module, tile) under no_grad for each of `shards` chunks of x's dimension -2, recomputed a "
    "tile at a time in backward, holding back ZeRO's gradient hooks (ds_grad_is_ready) until the last tile",
    lambda: code_has(_tiled().forward, "torch.chunk(x, chunks=shards, dim=-2)", "fn(self, x_shard)")
    and code_has(_tiled().backward, "param.ds_grad_is_ready = False", "torch.autograd.backward(output, "
                                                                        "incoming_grad_shard)"),
    "train.tiled_mlp runs each block's MLP a tile of the sequence at a time with DeepSpeed's TiledMLP")


def tiled_mlp(fn: Any, module: torch.nn.Module, x: torch.Tensor, tiles: int) -> torch.Tensor:
    """``fn(module, x)`` computed ``tiles`` chunks of the sequence at a time, forward and backward (DeepSpeed's
    TiledMLP); the gradients of ``module``'s trainable parameters reach ZeRO's hooks once, after the last tile."""
    require(TILED_MLP)
    return _tiled().apply(fn, module, x, tiles, [p for p in module.parameters() if p.requires_grad])


def register_group(group: Any) -> None:
    """Make ``group`` usable by :func:`all_to_all` (outside any compiled region, before the first exchange)."""
    require(ALL_TO_ALL)
    _layer().register_all_to_all_group(group)


def all_to_all(group: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Slice i of ``tensor``'s dimension 0 (of size the group's) to rank i; slice i of the result from rank i."""
    return _layer()._dim_zero_all_to_all(group, tensor)
