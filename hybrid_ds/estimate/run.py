"""What the estimate needs from a run config (:class:`Run`), read from its effective DeepSpeed config. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybrid_ds.config.deepspeed import effective_deepspeed_config, zero_settings
from hybrid_ds.config.topology import resolve_layout
from hybrid_ds.errors import UserError
from hybrid_ds.estimate.architecture import Arch, arch_from_model, stage_boundaries



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
    schedule: str = "1f1b"                 # pipeline.schedule (hybrid_ds.config.schedule)
    sp: int = 1                            # pipeline.sequence_parallel: ranks sharing each sequence
    documents: bool = False                # data.document_mask: a block-diagonal mask, materialized
    tiled_mlp: int = 0                     # train.tiled_mlp: tiles each block's MLP runs in (0: whole)
    selective_checkpoint: str | None = None  # train.selective_checkpoint: "attention" or "mlp" recomputed

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp * self.seq_len

    @property
    def data_ranks(self) -> int:
        """Ranks a stage's gradients are averaged and its ZeRO states partitioned over: sp x dp."""
        return self.dp * self.sp

    @property
    def shard_tokens(self) -> float:
        """Tokens of one micro-batch that one rank holds: 1/sp of each sequence."""
        return self.seq_len * self.micro_batch / self.sp


_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                "float16": "fp16"}


def run_from_config(cfg: Any, world_size: int, arch: Arch | None = None) -> Run:
    """A :class:`Run` from a validated RunConfig (hybrid_ds.config), checking the layout as build_plan does; its ZeRO
    settings are those of the run's effective DeepSpeed config (what the engine gets, DeepSpeed's defaults filled in).

    ``arch`` is the model's shape when the caller has it (:func:`hybrid_ds.models.shape.model_arch` reads
    any model the adapter accepts); without it the config's model must be a named family.
    """
    arch = arch or arch_from_model(cfg.model.name, cfg.model.pretrained, cfg.model.overrides)
    layout = resolve_layout(world_size, cfg.pipeline.stages, arch.layers, cfg.micro_batch, cfg.grad_accum,
                            cfg.train_batch, cfg.pipeline.sequence_parallel)
    sp = cfg.pipeline.sequence_parallel
    if sp > 1 and (arch.heads % sp or arch.kv_heads % sp):  # as hybrid_ds.models.sequence_parallel.check_model
        raise UserError("pipeline.sequence_parallel", f"{sp} does not divide {arch.name}'s {arch.heads} attention and "
                                                      f"{arch.kv_heads} key/value heads")
    if sp > 1 and arch.task == "masked_lm":  # BERT: its embedding makes the positions of the tokens it is given
        raise UserError("pipeline.sequence_parallel", f"{sp} is not available for {arch.name}: its embedding makes "
                                                      "the positions of the tokens it is given; use 1")
    if cfg.data.seq_len > arch.max_positions:
        raise UserError("data.seq_len", f"{cfg.data.seq_len} exceeds the model's {arch.max_positions} positions "
                                        f"(max_position_embeddings); use at most {arch.max_positions}")
    accum = cfg.grad_accum_dtype
    if accum is not None and accum not in _DTYPE_NAMES:
        raise UserError("data_types.grad_accum_dtype", f"must be fp32, bf16 or fp16, got {accum!r}")
    zero = zero_settings(effective_deepspeed_config(cfg, layout, "gpu"))
    return Run(arch, world_size, layout.stages, layout.dp, layout.micro_batch, layout.grad_accum, cfg.data.seq_len,
               zero.stage, cfg.precision, _DTYPE_NAMES[accum] if accum else None,
               cfg.pipeline.activation_checkpoint_interval, cfg.pipeline.partition, cfg.model.attn_implementation or "sdpa",
               cfg.train.fused_loss and cfg.pipeline_engine, zero.reduce_bucket, zero.contiguous_gradients,
               zero.overlap_comm, zero.persistence_threshold, zero.prefetch_bucket, cfg.model.lora, cfg.source,
               cfg.description, cfg.pipeline.schedule, layout.sp, document_mask_on(cfg), cfg.train.tiled_mlp,
               cfg.train.selective_checkpoint)


def document_mask_on(cfg: Any) -> bool:
    """``data.document_mask`` as a run applies it: as set, or (null) on when fine-tuning (hybrid_ds.runtime.plan's
    document_mask, but for the models that cannot keep documents apart, which only the model itself tells)."""
    return cfg.model.pretrained if cfg.data.document_mask is None else cfg.data.document_mask


def partition(run: Run) -> list[int]:
    """Stage boundaries over [embedding, blocks..., head], as hybrid_ds.runtime.plan computes them."""
    return stage_boundaries(run.arch, run.partition, run.stages, run.seq_len)
