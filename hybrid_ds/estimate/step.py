"""The whole step of a run: every stage's estimate, the step time on a cluster, MFU and training days. Pure Python."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from hybrid_ds.config.schedule import bubble as schedule_bubble
from hybrid_ds.errors import UserError
from hybrid_ds.estimate.activations import DTYPE_BYTES
from hybrid_ds.estimate.architecture import Arch
from hybrid_ds.estimate.flops import training_flops
from hybrid_ds.estimate.run import Run, run_from_config
from hybrid_ds.estimate.stages import RUNTIME_OVERHEAD, StageEstimate, recompute_flops, stage_estimates

COMPUTE_EFFICIENCY = 0.45      # achieved / peak matmul FLOP/s: Narayanan et al. 2021 reach 140-163 of 312
LINK_EFFICIENCY = 0.7          # achieved / peak bus bandwidth of NCCL collectives and p2p


# ---------------------------------------------------------------- the whole step


@dataclass
class Estimate:
    run: Run
    stages: list[StageEstimate]
    cluster: Any = None            # hybrid_ds.estimate.gpus.Cluster, or None (memory only)
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
    recompute = tokens * recompute_flops(run)
    est = Estimate(run, stages, cluster, runtime, model_flops, model_flops + recompute,
                   schedule_bubble(run.schedule, run.stages, run.grad_accum))
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
    dp_bw = gpu.intra_node * LINK_EFFICIENCY if run.data_ranks <= node else inter
    p2p_bw = gpu.intra_node * LINK_EFFICIENCY if run.data_ranks * run.stages <= node else inter
    sp_bw = gpu.intra_node * LINK_EFFICIENCY if run.sp <= node else inter  # a replica's sp ranks are consecutive
    activation = DTYPE_BYTES[run.precision] * run.shard_tokens * run.arch.hidden
    per_micro_batch, after_flush = [], []
    for s in est.stages:
        compute = s.flops_per_micro_batch / (peak * efficiency)
        # ZeRO-3 gathers and reduce-scatters, ZeRO-2 all-reduces inside every micro-batch's backward: on the
        # pipeline's critical path, under compute only with overlap_comm (DeepSpeed's default at ZeRO-3 only)
        in_micro_batch = (s.comm.get("zero-3 gathers", 0) + s.comm.get("gradient reduce-scatter", 0)
                          + (s.comm.get("gradient all-reduce", 0) if run.zero == 2 else 0)) / run.grad_accum / dp_bw
        compute = max(compute, in_micro_batch) if run.overlap_comm else compute + in_micro_batch
        # sequence parallelism: attention waits for its all-to-alls (on the critical path, not overlapped)
        compute += s.comm.get("sequence all-to-all", 0) / run.grad_accum / sp_bw
        sends = (s.stage < run.stages - 1) + (s.stage > 0)
        per_micro_batch.append(compute + sends * activation / p2p_bw)
        once = s.comm.get("parameter all-gather", 0) + (s.comm.get("gradient all-reduce", 0) if run.zero < 2 else 0)
        after_flush.append(once / dp_bw + s.comm.get("tied gradients", 0) / p2p_bw)
    slowest = max(per_micro_batch)
    pipeline = run.grad_accum * slowest / (1 - est.bubble)  # 1F1B: (m + p - 1) x slowest
    est.time_parts = {"compute": run.grad_accum * slowest, "bubble": pipeline - run.grad_accum * slowest,
                      "gradient sync": max(after_flush)}
    est.step_time = pipeline + max(after_flush)
    est.mfu = est.model_flops / (cluster.gpus * peak * est.step_time)


def longest_sequence(run: Run, memory: float, runtime: str = "cuda", granularity: int = 1024,
                     limit: int = 1 << 24) -> int:
    """The longest ``seq_len`` (a multiple of ``granularity`` and of the sequence-parallel size, at most ``limit``)
    whose every stage fits ``memory`` bytes at ``run``'s layout; 0 where not even the shortest fits. The model's
    ``max_position_embeddings`` is not a bound here (a long-context fine-tune raises it).

    >>> from hybrid_ds.estimate.architecture import arch_from_preset
    >>> run = Run(arch_from_preset("llama3-8b"), world_size=8, stages=2, dp=1, micro_batch=1, grad_accum=8,
    ...           seq_len=8192, zero=1, precision="bf16", checkpoint_interval=1, sp=4)
    >>> longest_sequence(run, 80e9), longest_sequence(replace(run, dp=4, sp=1), 80e9)  # pp=2 x sp=4 | x dp=4
    (101376, 25600)
    """
    step = granularity * run.sp // math.gcd(granularity, run.sp)
    overhead = RUNTIME_OVERHEAD if runtime == "cuda" else 0.0

    def fits(units: int) -> bool:
        stages = stage_estimates(replace(run, seq_len=units * step), runtime, overhead)
        return max(s.total for s in stages) <= memory

    if not fits(1):
        return 0
    lo, hi = 1, 2  # fits(lo); find hi that does not, then bisect
    while hi * step <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit // step + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


def training_days(est: Estimate, tokens: float) -> float:
    """Days to train on ``tokens`` tokens at the estimated step time."""
    return tokens / est.run.tokens_per_step * est.step_time / 86400


def estimate_for_config(cfg: Any, world_size: int, cluster: Any = None, runtime: str = "cuda",
                        arch: Arch | None = None) -> Estimate:
    """The estimate of a run config at ``world_size`` ranks (what ``train --dry-run`` prints).

    With no ``cluster``, a GPU named in the config's description ("8x A100-40GB") is used for the
    memory verdict and step time when ``runtime`` is "cuda"; on "cpu" only memory and FLOPs are given.
    """
    from hybrid_ds.estimate.gpus import make_cluster, parse_cluster

    run = run_from_config(cfg, world_size, arch)
    if cluster is None and runtime == "cuda":
        described = parse_cluster(cfg.description)
        if described:
            cluster = make_cluster(world_size, described[1], described[2])
    return estimate(run, cluster, runtime)
