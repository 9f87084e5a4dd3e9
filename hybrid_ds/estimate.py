"""Per-stage memory, FLOPs, communication and step time of a run, before renting the GPUs. Pure Python.

Everything here is arithmetic on the architecture numbers of a preset (or a local ``config.json``):
no torch, no deepspeed, no transformers. The numbers follow what the code that will run actually
allocates, and the tests and ``bench/estimator_accuracy.py`` hold them against a real DeepSpeed engine:

* parameters (:mod:`hybrid_ds.architecture`): per family, the tensors Hugging Face builds, grouped as
  the pipeline groups them ([embedding, block 0 .. n-1, head]); a tied weight counts on every stage
  holding it;
* model states (:mod:`hybrid_ds.model_state`): the buffers of the optimizer DeepSpeed 0.19 picks for
  the precision and ZeRO stage (torch AdamW, BF16_Optimizer, FP16_Optimizer, DeepSpeedZeroOptimizer,
  ZeRO-3), partitioned over the data-parallel group, as the peak over the accumulate and step phases;
* activations (:mod:`hybrid_ds.activations`): the tensors autograd saves in each Hugging Face block
  (Korthikanti et al. 2022's catalogue, with the kernels these models really call), times the
  micro-batches DeepSpeed's 1F1B TrainSchedule keeps in flight on each stage, plus the logits on the
  last stage;
* FLOPs, bubble, bytes sent per rank, step time and MFU from :mod:`hybrid_ds.gpus`;
* LoRA (``model.lora``): the base frozen (its weights only, no gradient, no optimizer state) and the adapters
  trained like any parameter (r x (in + out) per adapted linear layer, as peft makes them), what both save for
  backward; ``bench/lora_memory.py`` holds the model states against the real engine.

>>> arch = arch_from_preset("gpt3-175b")
>>> round(arch.params / 1e9, 1)          # Narayanan et al. 2021, Table 1: 174.6B
174.6
>>> round(korthikanti_layer_bytes(seq=2048, batch=1, hidden=12288, heads=96) / 2**30, 2)  # sbh(34 + 5as/h)
2.67
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hybrid_ds.activations import (DTYPE_BYTES, block_activation_terms, embedding_activation_bytes,
                                   fused_loss_bytes, head_activation_bytes, korthikanti_layer_bytes)
from hybrid_ds.architecture import (Arch, adapted, arch_from_config_dict, arch_from_model, arch_from_preset,
                                    stage_boundaries)
from hybrid_ds.errors import UserError
from hybrid_ds.model_state import DEEPSPEED_REDUCE_BUCKET, ModelState, model_state, reduce_bucket_elements
from hybrid_ds.topology import bubble_fraction, resolve_layout

RUNTIME_OVERHEAD = 2 * 2**30   # CUDA context, cuBLAS/NCCL workspaces, allocator slack: a stated constant
COMPUTE_EFFICIENCY = 0.45      # achieved / peak matmul FLOP/s: Narayanan et al. 2021 reach 140-163 of 312
LINK_EFFICIENCY = 0.7          # achieved / peak bus bandwidth of NCCL collectives and p2p


# ---------------------------------------------------------------- FLOPs


def block_flops(arch: Arch, seq: int, block: int = 0) -> float:
    """Forward matmul FLOPs per token of block ``block``. Causal attention is counted as the full s x s product,
    as Narayanan et al. 2021 (eq. 3) and Megatron-LM count it, not halved as FlashAttention papers do.
    A Mixture-of-Experts layer costs 2 FLOPs per element a token passes: its router, its shared experts and
    the top-k routed experts it is sent to (:meth:`hybrid_ds.architecture.Experts.active`).

    >>> a = arch_from_preset("gpt3-175b")
    >>> math.isclose(block_flops(a, 2048), 24 * a.hidden**2 * (1 + 2048 / (6 * a.hidden)))
    True
    """
    h, q, kv = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    attention = 2 * h * (q + 2 * kv) + 2 * q * h + 4 * seq * q
    if arch.experts and arch.experts.routed[block]:
        return attention + 2 * arch.experts.active(block)
    return attention + 2 * h * arch.ffn * (3 if arch.gated else 2)


def blocks_flops(arch: Arch, seq: int, lo: int = 0, hi: int | None = None) -> float:
    """Forward FLOPs per token of the blocks among pipeline layers [lo, hi) (default: every block)."""
    hi = arch.layers + 2 if hi is None else hi
    return sum(block_flops(arch, seq, layer - 1) for layer in range(max(lo, 1), min(hi, arch.layers + 1)))


def forward_flops_per_token(arch: Arch, seq: int) -> float:
    """Forward FLOPs of one token through the whole model: every block (top-k experts) and the head."""
    return blocks_flops(arch, seq) + head_flops(arch)


def training_flops(arch: Arch, seq: int, lo: int = 0, hi: int | None = None, frozen: bool = False) -> float:
    """Forward and backward FLOPs per token of pipeline layers [lo, hi): 3 passes, as each matmul's backward computes
    the gradients of both its operands. With ``frozen`` weights (a LoRA run's base) a layer's backward computes only
    its input's gradient, 2 passes, except attention's two products of activations, whose both operands need theirs;
    the adapters' own r-wide matmuls are left out (under 1% at r 16 of a 576-wide model).

    >>> a = arch_from_preset("gpt2")
    >>> training_flops(a, 1024) == 3 * forward_flops_per_token(a, 1024)
    True
    >>> attention = 4 * 1024 * a.heads * a.head_dim * a.layers
    >>> math.isclose(training_flops(a, 1024, frozen=True), 2 * forward_flops_per_token(a, 1024) + attention)
    True
    """
    hi = arch.layers + 2 if hi is None else hi
    blocks = blocks_flops(arch, seq, lo, hi)
    forward = blocks + (head_flops(arch) if hi == arch.layers + 2 else 0.0)
    if not frozen:
        return 3 * forward
    n_blocks = max(0, min(hi, arch.layers + 1) - max(lo, 1))
    return 2 * forward + n_blocks * 4 * seq * arch.heads * arch.head_dim


def head_flops(arch: Arch) -> float:
    """Forward FLOPs per token of the output projection (and BERT's transform)."""
    return 2 * arch.hidden * arch.vocab + (2 * arch.hidden**2 if arch.head_transform else 0)


def narayanan_training_days(tokens: float, params: float, gpus: int, flops_per_gpu: float) -> float:
    """Narayanan et al. 2021, eq. 4: end-to-end time ~ 8 T P / (n X) (forward, backward and recompute).

    >>> round(narayanan_training_days(300e9, 174.6e9, 1024, 140e12), 1)   # the paper: ~34 days
    33.8
    """
    return 8 * tokens * params / (gpus * flops_per_gpu) / 86400


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class Run:
    """What the estimate needs from a run config: model, layout, batch, precision, ZeRO settings."""

    arch: Arch
    world_size: int
    stages: int
    dp: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    zero: int = 0
    precision: str = "bf16"
    grad_accum_dtype: str | None = None
    checkpoint_interval: int = 0
    partition: str | list[int] = "flops"
    attn: str = "sdpa"
    fused_loss: bool = False               # train.fused_loss on the pipeline engine (the plain engine: HF's loss)
    reduce_bucket: int = 0                 # zero_optimization.reduce_bucket_size; 0 = sized to the model, as run
    contiguous_gradients: bool = True
    overlap_comm: bool = False             # zero_optimization.overlap_comm (DeepSpeed: on at ZeRO-3 only)
    persistence_threshold: int = 100_000   # zero_optimization.stage3_param_persistence_threshold
    prefetch_bucket: int = 50_000_000      # zero_optimization.stage3_prefetch_bucket_size
    lora: Any = None                       # model.lora (hybrid_ds.config.LoraConfig): base frozen, adapters trained
    source: str = ""
    description: str = ""

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp * self.seq_len


_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                "float16": "fp16"}


def run_from_config(cfg: Any, world_size: int, arch: Arch | None = None) -> Run:
    """A :class:`Run` from a validated RunConfig (hybrid_ds.config), checking the layout as build_plan does.

    ``arch`` is the model's shape when the caller has it (:func:`hybrid_ds.models.shape.model_arch` reads
    any model the adapter accepts); without it the config's model must be a named family.
    """
    arch = arch or arch_from_model(cfg.model.name, cfg.model.pretrained, cfg.model.overrides)
    layout = resolve_layout(world_size, cfg.pipeline.stages, arch.layers, cfg.micro_batch, cfg.grad_accum,
                            cfg.train_batch)
    if cfg.data.seq_len > arch.max_positions:
        raise UserError("data.seq_len", f"{cfg.data.seq_len} exceeds the model's {arch.max_positions} positions "
                                        f"(max_position_embeddings); use at most {arch.max_positions}")
    zero = cfg.deepspeed.get("zero_optimization", {})
    accum = cfg.grad_accum_dtype
    if accum is not None and accum not in _DTYPE_NAMES:
        raise UserError("data_types.grad_accum_dtype", f"must be fp32, bf16 or fp16, got {accum!r}")
    return Run(arch, world_size, layout.stages, layout.dp, layout.micro_batch, layout.grad_accum, cfg.data.seq_len,
               cfg.zero_stage_at(layout.dp), cfg.precision, _DTYPE_NAMES[accum] if accum else None,
               cfg.pipeline.activation_checkpoint_interval, cfg.pipeline.partition, cfg.model.attn_implementation,
               cfg.train.fused_loss and cfg.pipeline_engine, int(zero.get("reduce_bucket_size", 0)), bool(zero.get("contiguous_gradients", True)),
               bool(zero.get("overlap_comm", cfg.zero_stage == 3)),
               int(zero.get("stage3_param_persistence_threshold", 1e5)),
               int(zero.get("stage3_prefetch_bucket_size", 5e7)), cfg.model.lora, cfg.source, cfg.description)


def partition(run: Run) -> list[int]:
    """Stage boundaries over [embedding, blocks..., head], as hybrid_ds.plan computes them."""
    return stage_boundaries(run.arch, run.partition, run.stages, run.seq_len)


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


def stage_activations(run: Run, stage: int, lo: int, hi: int, runtime: str = "cuda") -> tuple[float, int, float, float]:
    """(activations, micro-batches in flight, logits, pipeline buffers) of the stage holding layers [lo, hi)."""
    arch, p, w = run.arch, run.stages, DTYPE_BYTES[run.precision]
    seq, batch, tokens = run.seq_len, run.micro_batch, run.seq_len * run.micro_batch
    held = [layer - 1 for layer in range(lo, hi) if 1 <= layer <= arch.layers]
    blocks, kinds = len(held), {}  # a dense block and an MoE block save different tensors; compute each kind once
    for b in held:
        kind = (arch.experts.routed[b], arch.experts.always[b]) if arch.experts else 0
        if kind not in kinds:
            kinds[kind] = block_activation_terms(arch, seq, batch, run.precision, run.attn, runtime, b)
    terms = [kinds[(arch.experts.routed[b], arch.experts.always[b]) if arch.experts else 0] for b in held]
    saved = [sum(t.values()) + lora_activation_change(run, b, t, runtime) for b, t in zip(held, terms)]
    frozen = run.lora is not None   # LoRA: the embedding is outside autograd's graph, it saves nothing
    embedding = lo == 0 and not frozen
    per_micro_batch = embedding_activation_bytes(arch, seq, batch, run.precision, runtime) if embedding else 0.0
    if hi == arch.layers + 2:
        per_micro_batch += head_activation_bytes(arch, seq, batch, run.precision, runtime, run.fused_loss, frozen)
    interval, working = run.checkpoint_interval, 0.0
    if interval and blocks:  # each chunk of `interval` blocks keeps its input; backward recomputes one chunk at a time
        per_micro_batch += math.ceil(blocks / interval) * w * tokens * arch.hidden + 8 * tokens
        working = sum(sorted(saved)[-interval:])
    else:
        per_micro_batch += sum(saved)
    # TrainSchedule (1F1B): stage s runs min(p - s, m) forwards before its first backward.
    in_flight = min(p - stage, run.grad_accum)
    activation = w * tokens * arch.hidden
    buffers = in_flight * activation * ((stage > 0) + (stage < p - 1)) + activation * ((stage > 0) + (stage < p - 1))
    logits = 0.0
    if hi == arch.layers + 2:  # held, then fp32 and 16-bit grads; the fused loss: its gradients and one block
        logits = (fused_loss_bytes(arch, tokens, run.precision, frozen) if run.fused_loss
                  else (w + 4 + w) * tokens * arch.vocab)
    return in_flight * per_micro_batch + working, in_flight, logits, buffers


def lora_activation_change(run: Run, block: int, terms: dict[str, float], runtime: str = "cuda") -> float:
    """What LoRA changes in the bytes block ``block`` saves for backward per micro-batch (``terms``: the full
    fine-tune's, :func:`block_activation_terms`); 0 without LoRA.

    A frozen weight needs no saved input for its gradient: RMSNorm's normalized tensor goes, and the inputs of the
    linear layers ("linear inputs", "output projection input", the down projection's inside "mlp") stay only where
    an adapter without dropout reads them (the share of the block's linear inputs adapted: all or none but for a
    target list without dropout). Each adapter saves its r-wide intermediate (lora_B's input) and, with dropout,
    the dropped copy of its layer's input (lora_A's) and the dropout mask.

    >>> from hybrid_ds.config import LoraConfig
    >>> run = Run(arch_from_preset("gpt2-tiny"), world_size=1, stages=1, dp=1, micro_batch=1, grad_accum=1,
    ...           seq_len=10, precision="fp32", lora=LoraConfig(r=4, dropout=0.1, target_modules=["c_attn"]))
    >>> terms = {"linear inputs": 5120.0, "output projection input": 2560.0, "mlp": 20480.0}
    >>> lora_activation_change(run, 0, terms)  # all inputs gone (-17,920); 10 tokens x (4 B x r + 5 B x 64 inputs)
    -14560.0
    """
    lora, arch = run.lora, run.arch
    if lora is None:
        return 0.0
    w, tokens = DTYPE_BYTES[run.precision], run.seq_len * run.micro_batch
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
    arch, tokens = run.arch, run.seq_len * run.micro_batch
    recompute = blocks_flops(arch, run.seq_len, lo, hi) if run.checkpoint_interval else 0.0
    return tokens * (training_flops(arch, run.seq_len, lo, hi, frozen=run.lora is not None) + recompute)


def stage_comm(run: Run, stage: int, params: int, persistent: int) -> dict[str, float]:
    """Bytes one rank of ``stage`` sends per step (ring collectives: 2(d-1)/d of the buffer for an all-reduce).

    ZeRO-1/2: DeepSpeed's ZeRO optimizer all-reduces its gradient buckets over data parallel and keeps its
    slice (``use_multi_rank_bucket_allreduce``, on by default), ZeRO-1 once per step, ZeRO-2 after every
    micro-batch's backward (grad_accum times ZeRO-1's volume), then all-gathers the updated parameters once.
    A tied weight's gradient is summed once per step over the stages that share it: its two tie ranks at
    ZeRO 0/1, in the model dtype; every rank of both stages at ZeRO-2, in fp32
    (``PartitionedGradientsPipelineEngine``: the stages partition the weight at different offsets).

    >>> run = Run(arch_from_preset("gpt2-tiny"), world_size=4, stages=2, dp=2, micro_batch=1, grad_accum=4,
    ...           seq_len=16, zero=2, precision="fp32")
    >>> comm = stage_comm(run, 0, params=1000, persistent=0)  # 4 reductions x 2 x 1/2 x 4,000 B
    >>> comm["gradient all-reduce"], comm["parameter all-gather"], comm["tied gradients"]  # tied: 2 x 3/4 x 65,536 B
    (16000.0, 2000.0, 98304.0)
    """
    d, p, m, w = run.dp, run.stages, run.grad_accum, DTYPE_BYTES[run.precision]
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
    activation = w * run.seq_len * run.micro_batch * run.arch.hidden
    sends = (stage < p - 1) + (stage > 0)   # activations forward, their gradients backward
    if sends:
        comm["pipeline p2p"] = m * sends * activation
    if p > 1 and run.arch.tied and stage in (0, p - 1) and not run.lora:  # LoRA leaves the tied weight frozen
        ranks = 2 * d if run.zero == 2 else 2
        comm["tied gradients"] = 2 * (ranks - 1) / ranks * run.arch.tied * (4 if run.zero == 2 else w)
    return comm


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
    # engine.zero_for_layout sizes ZeRO-1/2's buckets to the model; ZeRO-3 keeps DeepSpeed's
    bucket = run.reduce_bucket or (reduce_bucket_elements(trainable) if run.zero in (1, 2)
                                   else DEEPSPEED_REDUCE_BUCKET)
    for s, (lo, hi, n_trainable) in enumerate(zip(parts, parts[1:], trainable)):
        shares_tie = run.stages > 1 and s in (0, run.stages - 1) and not run.lora  # the tied weight's sum
        state = model_state(n_trainable, run.dp, run.zero, run.precision, run.grad_accum_dtype, persistent,
                            largest if largest > run.persistence_threshold else 0, bucket,
                            run.contiguous_gradients, run.prefetch_bucket, stage_largest_param(arch, lo, hi, run.lora),
                            arch.tied if shares_tie else 0, run.overlap_comm, frozen[s])
        activations, in_flight, logits, buffers = stage_activations(run, s, lo, hi, runtime)
        blocks = sum(1 for layer in range(lo, hi) if 1 <= layer <= arch.layers)
        out.append(StageEstimate(s, lo, hi - 1, blocks, n_trainable + frozen[s], state, activations, in_flight, logits,
                                 buffers, RUNTIME_OVERHEAD if overhead is None else overhead, stage_flops(run, lo, hi),
                                 stage_comm(run, s, n_trainable, persistent), experts[s], frozen[s]))
    return out


def stage_trainable_frozen(run: Run, parts: list[int]) -> tuple[list[int], list[int]]:
    """(trainable, frozen) parameters of each stage: with LoRA, the adapters and the whole base model."""
    held = run.arch.stage_params(parts)
    if run.lora is None:
        return held, [0] * len(held)
    return run.arch.stage_adapter_params(parts, run.lora.r, run.lora.target_modules), held


# ---------------------------------------------------------------- the whole step


@dataclass
class Estimate:
    run: Run
    stages: list[StageEstimate]
    cluster: Any = None            # hybrid_ds.gpus.Cluster, or None (memory only)
    runtime: str = "cuda"
    model_flops: float = 0.0       # per step, whole run: forward + backward (2 passes and attention's 3rd for LoRA)
    hardware_flops: float = 0.0    # plus the recomputed forward of checkpointed blocks
    bubble: float = 0.0
    step_time: float | None = None
    mfu: float | None = None
    time_parts: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def binding(self) -> StageEstimate:
        """The stage with the largest memory need: the one that decides whether the layout fits."""
        return max(self.stages, key=lambda s: s.total)

    @property
    def device_memory(self) -> int | None:
        return self.cluster.memory if self.cluster else None

    @property
    def fits(self) -> bool | None:
        return None if self.cluster is None else self.binding.total <= self.cluster.memory

    @property
    def comm_per_rank(self) -> float:
        return max(sum(s.comm.values()) for s in self.stages)


def estimate(run: Run, cluster: Any = None, runtime: str = "cuda", efficiency: float = COMPUTE_EFFICIENCY) -> Estimate:
    """The per-stage memory and per-step cost of ``run`` on ``cluster`` (None: memory and FLOPs only)."""
    if cluster is not None and cluster.gpus != run.world_size:
        raise UserError("--gpus", f"{cluster.gpus} GPUs but the run's world size is {run.world_size}")
    stages = stage_estimates(run, runtime, overhead=RUNTIME_OVERHEAD if runtime == "cuda" else 0.0)
    arch, tokens = run.arch, run.tokens_per_step
    model_flops = tokens * training_flops(arch, run.seq_len, frozen=run.lora is not None)
    recompute = tokens * blocks_flops(arch, run.seq_len) if run.checkpoint_interval else 0.0
    est = Estimate(run, stages, cluster, runtime, model_flops, model_flops + recompute,
                   bubble_fraction(run.stages, run.grad_accum))
    if run.stages > 1 and run.grad_accum < 4 * run.stages:
        est.warnings.append(f"gradient_accumulation_steps={run.grad_accum} < 4 x stages: the bubble is {est.bubble:.0%}")
    if cluster is not None:
        _step_time(est, cluster, efficiency)
    return est


def _step_time(est: Estimate, cluster: Any, efficiency: float) -> None:
    run, gpu = est.run, cluster.gpu
    peak = gpu.flops[run.precision]
    if run.precision == "bf16" and gpu.name == "v100":
        est.warnings.append("V100 has no bf16 units: bf16 runs at about the fp32 rate; use fp16 or fp32")
    node = cluster.per_node
    inter = gpu.inter_node * LINK_EFFICIENCY if cluster.nodes > 1 else gpu.intra_node * LINK_EFFICIENCY
    dp_bw = gpu.intra_node * LINK_EFFICIENCY if run.dp <= node else inter
    p2p_bw = gpu.intra_node * LINK_EFFICIENCY if run.dp * run.stages <= node else inter
    activation = DTYPE_BYTES[run.precision] * run.seq_len * run.micro_batch * run.arch.hidden
    per_micro_batch, after_flush = [], []
    for s in est.stages:
        compute = s.flops_per_micro_batch / (peak * efficiency)
        # ZeRO-3 gathers and reduce-scatters, ZeRO-2 all-reduces inside every micro-batch's backward: on the
        # pipeline's critical path, under compute only with overlap_comm (DeepSpeed's default at ZeRO-3 only)
        in_micro_batch = (s.comm.get("zero-3 gathers", 0) + s.comm.get("gradient reduce-scatter", 0)
                          + (s.comm.get("gradient all-reduce", 0) if run.zero == 2 else 0)) / run.grad_accum / dp_bw
        compute = max(compute, in_micro_batch) if run.overlap_comm else compute + in_micro_batch
        sends = (s.stage < run.stages - 1) + (s.stage > 0)
        per_micro_batch.append(compute + sends * activation / p2p_bw)
        once = s.comm.get("parameter all-gather", 0) + (s.comm.get("gradient all-reduce", 0) if run.zero < 2 else 0)
        after_flush.append(once / dp_bw + s.comm.get("tied gradients", 0) / p2p_bw)
    slowest = max(per_micro_batch)
    pipeline = (run.grad_accum + run.stages - 1) * slowest
    est.time_parts = {"compute": run.grad_accum * slowest, "bubble": (run.stages - 1) * slowest,
                      "gradient sync": max(after_flush)}
    est.step_time = pipeline + max(after_flush)
    est.mfu = est.model_flops / (cluster.gpus * peak * est.step_time)


def training_days(est: Estimate, tokens: float) -> float:
    """Days to train on ``tokens`` tokens at the estimated step time."""
    return tokens / est.run.tokens_per_step * est.step_time / 86400


def estimate_for_config(cfg: Any, world_size: int, cluster: Any = None, runtime: str = "cuda",
                        arch: Arch | None = None) -> Estimate:
    """The estimate of a run config at ``world_size`` ranks (what ``train --dry-run`` prints).

    With no ``cluster``, a GPU named in the config's description ("8x A100-40GB") is used for the
    memory verdict and step time when ``runtime`` is "cuda"; on "cpu" only memory and FLOPs are given.
    """
    from hybrid_ds.gpus import make_cluster, parse_cluster

    run = run_from_config(cfg, world_size, arch)
    if cluster is None and runtime == "cuda":
        described = parse_cluster(cfg.description)
        if described:
            cluster = make_cluster(world_size, described[1], described[2])
    return estimate(run, cluster, runtime)


# Arch, the arch_from_* readers and the activation terms are re-exported from hybrid_ds.architecture and
# hybrid_ds.activations, where they are defined; the formatters from hybrid_ds.report.
__all__ = ["Arch", "Estimate", "ModelState", "Run", "StageEstimate", "arch_from_config_dict",
           "arch_from_model", "arch_from_preset", "block_activation_terms", "block_flops", "blocks_flops",
           "embedding_activation_bytes", "estimate", "estimate_for_config", "forward_flops_per_token", "head_activation_bytes",
           "korthikanti_layer_bytes", "model_state", "narayanan_training_days", "run_from_config"]
