"""Process layout and batch arithmetic: pure functions, no torch.

world size = pipeline stages x sequence-parallel size x data-parallel size, and
train_batch_size = micro-batch x gradient-accumulation steps x data-parallel size.

The sp ranks of a replica share its micro-batches, each holding 1/sp of every sequence's tokens; DeepSpeed sees them
as data parallel (its data-parallel group is sp x dp ranks: ``Layout.data_ranks``), which is what its gradient
averaging, ZeRO partitioning and stage-to-stage sends need (hybrid_ds.runtime.pipeline.sequence_shard).

>>> layout = resolve_layout(world_size=4, stages=2, n_layers=12, micro_batch=4, grad_accum=8)
>>> layout.dp, layout.train_batch, round(layout.bubble, 3)
(2, 64, 0.111)
>>> layout = resolve_layout(world_size=8, stages=2, n_layers=12, micro_batch=4, grad_accum=8, sp=2)
>>> layout.dp, layout.data_ranks, layout.train_batch
(2, 4, 64)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hybrid_ds.errors import UserError


@dataclass(frozen=True)
class Layout:
    world_size: int
    stages: int
    dp: int
    micro_batch: int
    grad_accum: int
    train_batch: int
    sp: int = 1          # sequence-parallel ranks per replica (pipeline.sequence_parallel)

    @property
    def data_ranks(self) -> int:
        """DeepSpeed's data-parallel size: the sp ranks of every replica (they average and partition like replicas)."""
        return self.dp * self.sp

    @property
    def bubble(self) -> float:
        """Idle fraction of a pipeline step: (p - 1) / (m + p - 1) for p stages and m micro-batches."""
        return bubble_fraction(self.stages, self.grad_accum)

    def warnings(self) -> list[str]:
        if self.stages > 1 and self.grad_accum < 4 * self.stages:
            return [f"gradient_accumulation_steps={self.grad_accum} is below 4 x stages={4 * self.stages}: "
                    f"the pipeline idles {self.bubble:.1%} of each step (bubble (p-1)/(m+p-1)); "
                    "raise gradient_accumulation_steps to shrink it"]
        return []


def process_groups(layout: Layout) -> dict[str, list[list[int]]]:
    """The run's process groups by global rank, as DeepSpeed's pipe x data grid lays them out (stage-major: rank =
    stage x data_ranks + data rank) with a replica's sp ranks consecutive (data rank = replica x sp + shard):
    "pipeline" (a replica's shard through the stages: activations and gradients are sent along it), "data" (DeepSpeed's
    data-parallel group of a stage: gradient averaging, ZeRO partitions) and "sequence" (a replica's shards in a stage:
    attention's all-to-all). hybrid_ds.runtime.pipeline.sequence_groups makes the sequence groups from DeepSpeed's
    own topology (tests hold the two equal).

    >>> groups = process_groups(resolve_layout(8, 2, 4, 1, sp=2))
    >>> groups["pipeline"], groups["data"], groups["sequence"]
    ([[0, 4], [1, 5], [2, 6], [3, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1], [2, 3], [4, 5], [6, 7]])
    """
    d, sp = layout.data_ranks, layout.sp
    stages = range(layout.stages)
    return {"pipeline": [[s * d + r for s in stages] for r in range(d)],
            "data": [[s * d + r for r in range(d)] for s in stages],
            "sequence": [[s * d + first + i for i in range(sp)] for s in stages for first in range(0, d, sp)]}


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B pipeline step.

    >>> bubble_fraction(4, 12)
    0.2
    """
    return (stages - 1) / (micro_batches + stages - 1)


def resolve_layout(world_size: int, stages: int, n_layers: int, micro_batch: int | None = None,
                   grad_accum: int | None = None, train_batch: int | None = None, sp: int = 1) -> Layout:
    """Check the layout and derive the missing batch number the way DeepSpeed does."""
    if world_size < 1:
        raise UserError("world size", f"must be >= 1, got {world_size}")
    if stages > n_layers:
        raise UserError("pipeline.stages", f"{stages} stages need at least {stages} layers; the model has {n_layers}")
    if world_size % stages:
        valid = [n for n in range(1, world_size + 1) if world_size % n == 0 and n <= n_layers]
        few = (f"; {stages} stages need {stages} processes (or a multiple): launch with `deepspeed --num_gpus "
               f"{stages} ...` (on a machine without GPUs DeepSpeed's launcher starts one process unless told)"
               if world_size < stages else "")
        raise UserError("pipeline.stages",
                        f"world size {world_size} is not divisible by {stages} stages; valid stages: {valid}{few}")
    if (world_size // stages) % sp:
        per_stage = world_size // stages
        valid = [n for n in range(1, per_stage + 1) if per_stage % n == 0]
        raise UserError("pipeline.sequence_parallel", f"{sp} does not divide the {per_stage} ranks of each stage (world "
                                                      f"size {world_size} / {stages} stages); valid: {valid}")
    dp = world_size // (stages * sp)
    micro_batch, grad_accum, train_batch = _batch_sizes(dp, micro_batch, grad_accum, train_batch)
    return Layout(world_size, stages, dp, micro_batch, grad_accum, train_batch, sp)


def _batch_sizes(dp: int, micro: int | None, accum: int | None, total: int | None) -> tuple[int, int, int]:
    if micro is None and total is None:
        raise UserError("train_micro_batch_size_per_gpu", "not set; set it (or train_batch_size)")
    if micro is not None and accum is not None and total is not None:
        if micro * accum * dp != total:
            raise UserError("train_batch_size",
                            f"{total} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
                            f"{accum} x data-parallel size {dp} = {micro * accum * dp}; "
                            "fix one of them or drop train_batch_size to derive it")
        return micro, accum, total
    if micro is not None and total is not None:
        if total % (micro * dp):
            raise UserError("train_batch_size",
                            f"{total} is not a multiple of train_micro_batch_size_per_gpu {micro} x "
                            f"data-parallel size {dp} = {micro * dp}")
        return micro, total // (micro * dp), total
    if total is not None:
        accum = accum or 1
        if total % (accum * dp):
            raise UserError("train_batch_size",
                            f"{total} is not a multiple of gradient_accumulation_steps {accum} x "
                            f"data-parallel size {dp} = {accum * dp}")
        return total // (accum * dp), accum, total
    accum = accum or 1
    return micro, accum, micro * accum * dp


# ---------------------------------------------------------------- layer -> stage maps
# A pipeline is a list of layers: [embedding, block 0, ..., block n-1, final norm + head].
# A partition is DeepSpeed's ``parts`` list: stage s holds layers parts[s] .. parts[s+1]-1.


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Equal layer counts, one extra on each of the first stages (DeepSpeed's ``partition_uniform``).

    >>> partition_uniform(14, 4)
    [0, 4, 8, 11, 14]
    """
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, extra = divmod(num_items, num_parts)
    return [p * chunk + min(p, extra) for p in range(num_parts + 1)]


def partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """Contiguous parts with the smallest spread between the heaviest and lightest part.

    The same dynamic programme, objective and tie-breaking as DeepSpeed 0.19's
    ``deepspeed.runtime.utils.partition_balanced`` (tests compare the two), without numpy or torch.

    >>> partition_balanced([10, 1, 1, 1, 1, 10], 2)
    [0, 3, 6]
    """
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = float("inf")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    best_max = [[inf] * (m + 1) for _ in range(n + 1)]
    best_min = [[inf] * (m + 1) for _ in range(n + 1)]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    best_max[0][0] = cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                hi, lo = max(best_max[k][j - 1], part), min(best_min[k][j - 1], part)
                if cost[i][j] >= hi - lo:
                    cost[i][j], best_max[i][j], best_min[i][j], position[i][j] = hi - lo, hi, lo, k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    return parts[::-1]


def layer_flops(layer_params: list[int], seq_len: int, hidden: int) -> list[int]:
    """Forward FLOPs per token of each layer [embedding, blocks..., head]: partition "flops"'s weights.

    2 x parameters for a block's matmuls plus attention's two s x s products (4 x seq x hidden); the
    head's output projection is 2 x its parameters (a tied weight counts there, where it multiplies);
    the embedding is a lookup, free. GPT-2 small's head at seq 128 weighs as much as 5.3 blocks.

    >>> layer_flops([100, 10, 10, 100], seq_len=4, hidden=2)
    [0, 52, 52, 200]
    """
    return [0, *(2 * p + 4 * seq_len * hidden for p in layer_params[1:-1]), 2 * layer_params[-1]]


def layer_span(first: int, last: int, n_blocks: int) -> str:
    """What pipeline layers ``first``..``last`` (inclusive, over [embedding, blocks..., head]) hold.

    >>> layer_span(0, 3, 12), layer_span(4, 13, 12), layer_span(13, 13, 12)
    ('embedding + blocks 0-2', 'blocks 3-11 + head', 'head')
    """
    blocks = range(max(first, 1) - 1, min(last, n_blocks))
    held = ["embedding"] if first == 0 else []
    if len(blocks) > 1:
        held.append(f"blocks {blocks[0]}-{blocks[-1]}")
    elif len(blocks) == 1:
        held.append(f"block {blocks[0]}")
    return " + ".join(held + (["head"] if last == n_blocks + 1 else []))


def partition_layers(method: str | list[int], layer_params: list[int], layer_classes: list[str],
                     stages: int, seq_len: int = 0, hidden: int = 0, active_params: list[int] | None = None) -> list[int]:
    """Stage boundaries for a pipeline of ``len(layer_params)`` layers (embedding, blocks, head).

    ``method`` is "flops" (balance forward FLOPs, which needs ``seq_len`` and ``hidden``), "parameters",
    "uniform", "type:REGEX" or blocks per stage. "flops" counts the ``active_params`` of each layer where given
    (a Mixture-of-Experts block computes with the top-k experts of each token, not all it holds), "parameters"
    every parameter (memory).

    >>> params = [0, 80, 20, 20, 20, 20, 0]   # block 0 holds 8 experts of 10, top-2: 20 active
    >>> partition_layers("flops", params, list("EBBBBBH"), 2), partition_layers("parameters", params, list("EBBBBBH"), 2)
    ([0, 2, 7], [0, 2, 7])
    >>> partition_layers("flops", params, list("EBBBBBH"), 2, active_params=[0, 20, 20, 20, 20, 20, 0])
    [0, 4, 7]

    >>> partition_layers([1, 2], [5, 3, 3, 3, 5], ["E", "B", "B", "B", "H"], 2)
    [0, 2, 5]
    """
    n_blocks = len(layer_params) - 2
    if isinstance(method, list):
        if sum(method) != n_blocks:
            raise UserError("pipeline.partition", f"{method} places {sum(method)} blocks; the model has {n_blocks}")
        if any(n == 0 for n in method[1:-1]):
            raise UserError("pipeline.partition", f"{method}: a middle stage with 0 blocks would be empty")
        parts, blocks_before = [0], 0
        for count in method[:-1]:  # the embedding (layer 0) joins stage 0, the head the last stage
            blocks_before += count
            parts.append(1 + blocks_before)
        return parts + [len(layer_params)]
    if method == "uniform":
        return partition_uniform(len(layer_params), stages)
    if method == "flops":
        weights = layer_flops(active_params or layer_params, seq_len, hidden)
    elif method == "parameters":
        weights = layer_params
    else:
        pattern = re.compile(method[5:], re.IGNORECASE)
        weights = [1 if pattern.search(name) else 0 for name in layer_classes]
        if not any(weights):
            raise UserError("pipeline.partition",
                            f"{method!r} matches none of the layer classes {sorted(set(layer_classes))}")
    parts = partition_balanced(weights, stages)
    if any(a == b for a, b in zip(parts, parts[1:])):
        raise UserError("pipeline.partition", f"{method!r} leaves a stage without layers: boundaries {parts}")
    return parts
