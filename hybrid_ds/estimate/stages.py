"""Per-stage memory (model states, activations, buffers), FLOPs and bytes sent, for one :class:`Run`. Pure Python.

>>> round(korthikanti_layer_bytes(seq=2048, batch=1, hidden=12288, heads=96) / 2**30, 2)  # sbh(34 + 5as/h)
2.67
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hybrid_ds.estimate.activations import (DTYPE_BYTES, block_activation_terms, embedding_activation_bytes,
                                            fused_loss_bytes, head_activation_bytes,
                                            korthikanti_layer_bytes)  # noqa: F401 (the doctest)
from hybrid_ds.estimate.architecture import Arch, adapted
from hybrid_ds.estimate.flops import blocks_flops, training_flops
from hybrid_ds.config.deepspeed import DEEPSPEED_REDUCE_BUCKET, reduce_bucket_elements
from hybrid_ds.config.schedule import in_flight as schedule_in_flight
from hybrid_ds.config.schedule import weights_pending
from hybrid_ds.estimate.model_state import ModelState, model_state
from hybrid_ds.estimate.run import Run, partition

RUNTIME_OVERHEAD = 2 * 2**30   # CUDA context, cuBLAS/NCCL workspaces, allocator slack: a stated constant



# ---------------------------------------------------------------- per stage


@dataclass(frozen=True)
class StageEstimate:
    stage: int
    first_layer: int               # pipeline layers [embedding, blocks..., head], inclusive
    last_layer: int
    blocks: int
    params: int
    state: ModelState
    activations: float             # saved tensors of the micro-batches in flight (+ one recompute chunk)
    in_flight: int                 # micro-batches whose activations this stage holds at once
    logits: float                  # last stage: logits held for the loss, and their gradient
    pipe_buffers: float            # activations received and sent between stages, p2p buffers
    overhead: float
    flops_per_micro_batch: float   # hardware FLOPs (forward, backward, recompute)
    comm: dict[str, float]         # bytes this rank sends per step, by kind
    expert_params: int = 0         # of ``params``: the routed experts of Mixture-of-Experts blocks
    frozen: int = 0                # of ``params``: a LoRA run's base weights (no gradient, no optimizer state)

    @property
    def trainable(self) -> int:
        return self.params - self.frozen

    @property
    def expert_states(self) -> float:
        """Bytes of this stage's model states (weights, gradients, master copy, Adam) that are routed experts:
        their share of the stage's parameters, since every model state is a per-parameter buffer (of the weights
        alone in a LoRA run, where the experts are frozen)."""
        per_params = self.state.params if self.frozen else self.state.total
        return per_params * self.expert_params / self.params if self.params else 0.0

    @property
    def total(self) -> float:
        """Peak bytes: inside backward (activations, ZeRO-2's whole gradient in flight) or outside it (the
        model states' transient copies, when no activations are held), whichever is larger."""
        in_backward = self.activations + self.logits + self.state.backward_transient
        return (self.state.total + self.state.comm_buffer + self.pipe_buffers + self.overhead
                + max(in_backward, self.state.transient))


# The terms of block_activation_terms that a recomputed part of a block (train.selective_checkpoint, and the MLP of
# train.tiled_mlp) no longer keeps: what its module saves inside it (its input is another block tensor's too).
RECOMPUTED_TERMS = {
    "attention": ("softmax log-sum-exp", "q, k, v", "attention output", "attention scores", "attention dropout",
                  "output projection input"),
    "mlp": ("mlp", "router", "experts", "shared experts"),
}


def recomputed_parts(run: Run) -> dict[str, int]:
    """The parts of every block that backward recomputes, short of whole blocks, and in how many pieces: the MLP of
    train.tiled_mlp (a tile at a time) and the part of train.selective_checkpoint (whole)."""
    parts = {"mlp": run.tiled_mlp} if run.tiled_mlp else {}
    if run.selective_checkpoint:
        parts[run.selective_checkpoint] = 1
    return parts


def stage_activations(run: Run, stage: int, lo: int, hi: int, runtime: str = "cuda") -> tuple[float, int, float, float]:
    """(activations, micro-batches in flight, logits, pipeline buffers) of the stage holding layers [lo, hi)."""
    arch, p, w = run.arch, run.stages, DTYPE_BYTES[run.precision]
    seq, batch, tokens, sp = run.seq_len, run.micro_batch, run.shard_tokens, run.sp
    held = [layer - 1 for layer in range(lo, hi) if 1 <= layer <= arch.layers]
    blocks, kinds = len(held), {}  # a dense block and an MoE block save different tensors; compute each kind once
    for b in held:
        kind = (arch.experts.routed[b], arch.experts.always[b]) if arch.experts else 0
        if kind not in kinds:
            kinds[kind] = block_activation_terms(arch, seq, batch, run.precision, run.attn, runtime, b, sp,
                                                 run.documents)
    terms = [kinds[(arch.experts.routed[b], arch.experts.always[b]) if arch.experts else 0] for b in held]
    # a materialized attention mask is made once for the stage's blocks (models.layers.additive): saved once
    shared_mask = max((t.get("attention mask", 0.0) for t in terms), default=0.0)
    # Parts recomputed in backward, one block at a time (recomputed_parts), each a piece at a time: each keeps only its
    # input (counted with the linear inputs), and one piece of one block's exists while its backward recomputes it.
    parts = [(RECOMPUTED_TERMS[part], pieces) for part, pieces in recomputed_parts(run).items()]
    recomputed = [sum(t.get(k, 0.0) for names, _ in parts for k in names) for t in terms]
    tile = max((max(sum(t.get(k, 0.0) for k in names) for t in terms) / pieces for names, pieces in parts if terms),
               default=0.0)
    saved = [sum(t.values()) - t.get("attention mask", 0.0) - r + lora_activation_change(run, b, t, runtime)
             for b, t, r in zip(held, terms, recomputed)]
    if saved:
        saved[0] += shared_mask
    frozen = run.lora is not None   # LoRA: the embedding is outside autograd's graph, it saves nothing
    embedding = lo == 0 and not frozen
    # sp: the embedding and head work on the shard's tokens alone (seq / sp of each sequence)
    per_micro_batch = embedding_activation_bytes(arch, seq / sp, batch, run.precision, runtime) if embedding else 0.0
    if hi == arch.layers + 2:
        per_micro_batch += head_activation_bytes(arch, seq / sp, batch, run.precision, runtime, run.fused_loss, frozen)
    interval, working = run.checkpoint_interval, 0.0
    if interval and blocks:  # each chunk of `interval` blocks keeps its input; backward recomputes one chunk at a time
        per_micro_batch += math.ceil(blocks / interval) * w * tokens * arch.hidden + 8 * tokens
        working = sum(sorted(saved)[-interval:])
    else:
        per_micro_batch += sum(saved)
    working = max(working, tile)
    # 1F1B: stage s runs min(p - s, m) forwards before its first backward; ZB-H1 keeps p until their W.
    in_flight = schedule_in_flight(run.schedule, p, run.grad_accum, stage)
    # ZB-H1: those past B also keep the gradients W starts from (none on the first stage: its inputs are token ids,
    # so its B is empty and its W the whole backward)
    pending = weights_pending(run.schedule, p, run.grad_accum, stage) if stage > 0 else 0
    activation = w * tokens * arch.hidden
    buffers = in_flight * activation * ((stage > 0) + (stage < p - 1)) + activation * ((stage > 0) + (stage < p - 1))
    logits = 0.0
    if hi == arch.layers + 2:  # held, then fp32 and 16-bit grads; the fused loss: its gradients and one block.
        # The last stage holds one micro-batch's under 1F1B, in_flight under ZB-H1 (each until its W).
        if run.fused_loss:
            kept = (0 if frozen else 4 * arch.vocab * arch.hidden) + w * tokens * arch.hidden
            logits = fused_loss_bytes(arch, tokens, run.precision, frozen) + (in_flight - 1) * kept
        else:
            logits = (w + 4 + w) * tokens * arch.vocab + (in_flight - 1) * (w + 4) * tokens * arch.vocab
    weight_grads = pending * weight_path_gradients(run, held, hi == arch.layers + 2) if pending else 0.0
    return in_flight * per_micro_batch + working + weight_grads, in_flight, logits, buffers


def weight_path_gradients(run: Run, blocks: list[int], head: bool) -> float:
    """Bytes of the gradients ZB-H1's B keeps for W per micro-batch (``hybrid_ds.seam.zero_bubble``): one at each
    node where a trainable weight's path meets the input's, the output of every linear layer and norm of
    ``blocks`` (LoRA: of each adapter's two matrices) and of the head (its final norm; the logits' unless the
    fused loss, whose weight gradient comes from its forward).

    >>> from hybrid_ds.estimate.architecture import arch_from_preset
    >>> run = Run(arch_from_preset("gpt2"), world_size=2, stages=2, dp=1, micro_batch=2, grad_accum=4, seq_len=256,
    ...           precision="fp32", schedule="zb-h1")
    >>> weight_path_gradients(run, [0], head=False) / 2**20  # 512 tokens x 4 B x (2,304 + 768 + 3,072 + 768 + 2 x 768)
    16.5
    """
    arch, lora = run.arch, run.lora
    norms = 1 if arch.parallel == "one_norm" else 2
    width = 0
    for b in blocks:
        if lora:
            width += sum(layer.n_out + lora.r for layer in adapted(arch.block_linears(b), lora.target_modules))
        else:
            width += sum(layer.n_out for layer in arch.block_linears(b)) + norms * arch.hidden
    if head and not lora:
        width += arch.hidden + sum(layer.n_out for layer in arch.head_linears) + (0 if run.fused_loss else arch.vocab)
    return DTYPE_BYTES[run.precision] * run.shard_tokens * width


def lora_activation_change(run: Run, block: int, terms: dict[str, float], runtime: str = "cuda") -> float:
    """What LoRA changes in the bytes block ``block`` saves for backward per micro-batch (``terms``: the full
    fine-tune's, :func:`block_activation_terms`); 0 without LoRA.

    A frozen weight needs no saved input for its gradient: RMSNorm's normalized tensor goes, and the inputs of the
    linear layers ("linear inputs", "output projection input", the down projection's inside "mlp") stay only where
    an adapter without dropout reads them (the share of the block's linear inputs adapted: all or none but for a
    target list without dropout). Each adapter saves its r-wide intermediate (lora_B's input) and, with dropout,
    the dropped copy of its layer's input (lora_A's) and the dropout mask.

    >>> from hybrid_ds.config import LoraConfig
    >>> from hybrid_ds.estimate.architecture import arch_from_preset
    >>> run = Run(arch_from_preset("gpt2-tiny"), world_size=1, stages=1, dp=1, micro_batch=1, grad_accum=1,
    ...           seq_len=10, precision="fp32", lora=LoraConfig(r=4, dropout=0.1, target_modules=["c_attn"]))
    >>> terms = {"linear inputs": 5120.0, "output projection input": 2560.0, "mlp": 20480.0}
    >>> lora_activation_change(run, 0, terms)  # all inputs gone (-17,920); 10 tokens x (4 B x r + 5 B x 64 inputs)
    -14560.0
    """
    lora, arch = run.lora, run.arch
    if lora is None:
        return 0.0
    w, tokens = DTYPE_BYTES[run.precision], run.shard_tokens
    layers = arch.block_linears(block)
    targets = adapted(layers, lora.target_modules)
    inputs = (terms.get("linear inputs", 0.0) + terms.get("output projection input", 0.0)
              + (w * tokens * arch.ffn if "mlp" in terms else 0.0))
    kept = 0.0 if lora.dropout else sum(t.n_in for t in targets) / max(1, sum(t.n_in for t in layers))
    mask = 1 if runtime == "cuda" else w   # as block_activation_terms: CPU dropout keeps a mask of the dtype
    dropped = (w + mask) * sum(t.n_in for t in targets) if lora.dropout else 0
    return -terms.get("normalized", 0.0) - (1 - kept) * inputs + tokens * (w * lora.r * len(targets) + dropped)


def stage_flops(run: Run, lo: int, hi: int) -> float:
    """Hardware FLOPs of one micro-batch on the stage holding layers [lo, hi): forward and backward
    (:func:`training_flops`), plus recompute."""
    arch, tokens = run.arch, run.shard_tokens  # sp: each rank attends over the whole sequence with 1/sp of the heads
    return tokens * (training_flops(arch, run.seq_len, lo, hi, frozen=run.lora is not None)
                     + recompute_flops(run, lo, hi))


def recompute_flops(run: Run, lo: int = 0, hi: int | None = None) -> float:
    """Forward FLOPs per token that backward runs again in the blocks among layers [lo, hi): whole blocks with
    activation checkpointing, else train.selective_checkpoint's part and train.tiled_mlp's MLP."""
    arch, seq = run.arch, run.seq_len
    if run.checkpoint_interval:
        return blocks_flops(arch, seq, lo, hi)
    return sum(blocks_flops(arch, seq, lo, hi, part) for part in recomputed_parts(run))


def stage_comm(run: Run, stage: int, params: int, persistent: int, blocks: int = 0) -> dict[str, float]:
    """Bytes one rank of ``stage`` sends per step (ring collectives: 2(d-1)/d of the buffer for an all-reduce).

    ZeRO-1/2: DeepSpeed's ZeRO optimizer all-reduces its gradient buckets over data parallel and keeps its
    slice (``use_multi_rank_bucket_allreduce``, on by default), ZeRO-1 once per step, ZeRO-2 after every
    micro-batch's backward (grad_accum times ZeRO-1's volume), then all-gathers the updated parameters once.
    A tied weight's gradient is summed once per step over the stages that share it: its two tie ranks at
    ZeRO 0/1, in the model dtype; every rank of both stages at ZeRO-2, in fp32
    (``PartitionedGradientsPipelineEngine``: the stages partition the weight at different offsets).
    Data parallel here is DeepSpeed's: sp x dp ranks. Sequence parallelism adds, in each of the stage's ``blocks``
    and micro-batches, attention's all-to-alls (:func:`all_to_all_bytes`).

    >>> from hybrid_ds.estimate.architecture import arch_from_preset
    >>> run = Run(arch_from_preset("gpt2-tiny"), world_size=4, stages=2, dp=2, micro_batch=1, grad_accum=4,
    ...           seq_len=16, zero=2, precision="fp32")
    >>> comm = stage_comm(run, 0, params=1000, persistent=0)  # 4 reductions x 2 x 1/2 x 4,000 B
    >>> comm["gradient all-reduce"], comm["parameter all-gather"], comm["tied gradients"]  # tied: 2 x 3/4 x 65,536 B
    (16000.0, 2000.0, 98304.0)
    """
    d, p, m, w = run.data_ranks, run.stages, run.grad_accum, DTYPE_BYTES[run.precision]
    share = (d - 1) / d
    comm: dict[str, float] = {}
    if d > 1:
        if run.zero == 3:  # per micro-batch: gather for forward and for backward, reduce-scatter the gradients
            comm["zero-3 gathers"] = m * share * 2 * (params - persistent) * w + share * persistent * w
            comm["gradient reduce-scatter"] = m * share * params * w
        else:
            comm["gradient all-reduce"] = (m if run.zero == 2 else 1) * 2 * share * params * w
            if run.zero:
                comm["parameter all-gather"] = share * params * w
    activation = w * run.shard_tokens * run.arch.hidden
    sends = (stage < p - 1) + (stage > 0)   # activations forward, their gradients backward
    if sends:
        comm["pipeline p2p"] = m * sends * activation
    if run.sp > 1 and blocks:
        comm["sequence all-to-all"] = m * blocks * all_to_all_bytes(run)
    if p > 1 and run.arch.tied and stage in (0, p - 1) and not run.lora:  # LoRA leaves the tied weight frozen
        ranks = 2 * d if run.zero == 2 else 2
        comm["tied gradients"] = 2 * (ranks - 1) / ranks * run.arch.tied * (4 if run.zero == 2 else w)
    return comm


def all_to_all_bytes(run: Run) -> float:
    """Bytes one rank sends in one block's attention for one micro-batch under sequence parallelism: q, k and v
    exchanged for heads before attention and its output back after, (sp - 1)/sp of each, in forward and again in
    backward (and in the recomputed forward with activation checkpointing).

    >>> from hybrid_ds.estimate.architecture import arch_from_preset
    >>> run = Run(arch_from_preset("llama3-8b"), world_size=4, stages=1, dp=1, micro_batch=1, grad_accum=1,
    ...           seq_len=8192, precision="bf16", sp=4)
    >>> all_to_all_bytes(run) / 2**20  # 2 passes x 3/4 x 2 B x 2,048 tokens x (2 x 4,096 + 2 x 1,024)
    60.0
    """
    arch, sp = run.arch, run.sp
    if sp == 1:
        return 0.0
    widths = 2 * arch.heads * arch.head_dim + 2 * arch.kv_heads * arch.head_dim  # q and output, k and v
    passes = 3 if run.checkpoint_interval else 2
    return passes * (sp - 1) / sp * DTYPE_BYTES[run.precision] * run.shard_tokens * widths


def stage_largest_param(arch: Arch, lo: int, hi: int, lora: Any = None) -> int:
    """Elements of the largest trainable parameter tensor of the stage holding layers [lo, hi): with ``lora``, an
    adapter matrix (r x in_features or out_features x r)."""
    if lora:
        held = [b - 1 for b in range(lo, hi) if 1 <= b <= arch.layers]
        return max((lora.r * max(layer.n_in, layer.n_out) for b in held
                    for layer in adapted(arch.block_linears(b), lora.target_modules)), default=0)
    parts = ([arch.embedding] if lo == 0 else []) + ([arch.head] if hi == arch.layers + 2 else [])
    if any(1 <= layer <= arch.layers for layer in range(lo, hi)):
        parts.append(arch.block)
    return max((n for part in parts for _, n in part), default=0)


def stage_estimates(run: Run, runtime: str = "cuda", overhead: float | None = None) -> list[StageEstimate]:
    arch = run.arch
    parts = partition(run)
    persistent = (sum(n for _, n in arch.tensors() if n <= run.persistence_threshold) if run.zero == 3 else 0)
    largest = arch.largest_module() if run.zero == 3 else 0
    out = []
    experts = arch.stage_expert_params(parts)
    trainable, frozen = stage_trainable_frozen(run, parts)
    # effective_deepspeed_config sizes ZeRO-1/2's buckets to the model; ZeRO-3 keeps DeepSpeed's
    bucket = run.reduce_bucket or (reduce_bucket_elements(trainable) if run.zero in (1, 2)
                                   else DEEPSPEED_REDUCE_BUCKET)
    for s, (lo, hi, n_trainable) in enumerate(zip(parts, parts[1:], trainable)):
        shares_tie = run.stages > 1 and s in (0, run.stages - 1) and not run.lora  # the tied weight's sum
        state = model_state(n_trainable, run.data_ranks, run.zero, run.precision, run.grad_accum_dtype, persistent,
                            largest if largest > run.persistence_threshold else 0, bucket,
                            run.contiguous_gradients, run.prefetch_bucket, stage_largest_param(arch, lo, hi, run.lora),
                            arch.tied if shares_tie else 0, run.overlap_comm, frozen[s])
        activations, in_flight, logits, buffers = stage_activations(run, s, lo, hi, runtime)
        blocks = sum(1 for layer in range(lo, hi) if 1 <= layer <= arch.layers)
        out.append(StageEstimate(s, lo, hi - 1, blocks, n_trainable + frozen[s], state, activations, in_flight, logits,
                                 buffers, RUNTIME_OVERHEAD if overhead is None else overhead, stage_flops(run, lo, hi),
                                 stage_comm(run, s, n_trainable, persistent, blocks), experts[s], frozen[s]))
    return out


def stage_trainable_frozen(run: Run, parts: list[int]) -> tuple[list[int], list[int]]:
    """(trainable, frozen) parameters of each stage: with LoRA, the adapters and the whole base model."""
    held = run.arch.stage_params(parts)
    if run.lora is None:
        return held, [0] * len(held)
    return run.arch.stage_adapter_params(parts, run.lora.r, run.lora.target_modules), held
