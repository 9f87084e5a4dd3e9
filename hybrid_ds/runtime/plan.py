"""The resolved plan of a run: layout, batch arithmetic and the layer -> stage map, from the meta device.

Nothing here allocates weights: the model is built on the meta device to count parameters per
layer, and the same layer list decides the stage boundaries the pipeline will use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybrid_ds.estimate.activations import DTYPE_BYTES
from hybrid_ds.config import RunConfig
from hybrid_ds.config.checks import run_warnings
from hybrid_ds.errors import UserError
from hybrid_ds.models.lora import find_targets
from hybrid_ds.models.masks import document_mask_obstacle
from hybrid_ds.models.sequence_parallel import check_model as check_sequence_parallel
from hybrid_ds.models.shape import layer_active_params, model_experts
from hybrid_ds.models.resolve import (PipelineLayer, ResolvedModel, count_params, meta_model, pipeline_layers,
                                      resolve_model, stage_params, submodule)
from hybrid_ds.config.topology import Layout, partition_layers, resolve_layout


@dataclass(frozen=True)
class StagePlan:
    stage: int
    first_layer: int
    last_layer: int      # inclusive
    layer_names: list[str]
    params: int
    param_bytes: int     # parameters in the training dtype (no gradients, no optimizer state)
    trainable: int       # of ``params``: those with gradients and optimizer state (all but a LoRA run's base)


@dataclass
class Plan:
    config: RunConfig
    resolved: ResolvedModel
    layout: Layout
    layers: list[PipelineLayer]
    boundaries: list[int]        # stage s holds layers [boundaries[s], boundaries[s + 1]) of ``layers``
    stage_plans: list[StagePlan]
    total_params: int
    skeleton: Any = None          # the whole model on the meta device (what the counts came from)
    document_mask: bool = False   # data.document_mask resolved (its null default decided): see document_mask()
    warnings: list[str] = field(default_factory=list)
    lora_targets: Any = None      # model.lora: where peft puts the adapters (hybrid_ds.models.lora.Targets)

    @property
    def n_blocks(self) -> int:
        return len(self.layers) - 2

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage the engine runs (``RunConfig.zero_stage_at``), which the config's may not be."""
        return self.config.zero_stage_at(self.layout.data_ranks)

    @property
    def zero_note(self) -> str | None:
        """One line saying that the run's ZeRO stage is not the config's, and why; None when they agree."""
        if self.zero_stage == self.config.zero_stage:
            return None
        return (f"ZeRO-{self.config.zero_stage} at dp={self.layout.data_ranks} runs as ZeRO-{self.zero_stage}: "
                "same maths, no gradient copies")


def default_world_size(cfg: RunConfig) -> int:
    """The world size a config implies: from its batch numbers, else the cluster its description names
    ("64x A100-80GB"), else one data-parallel replica (stages x sequence_parallel)."""
    from hybrid_ds.estimate.gpus import parse_cluster

    replica = cfg.pipeline.stages * cfg.pipeline.sequence_parallel
    micro, accum, total = cfg.micro_batch, cfg.grad_accum, cfg.train_batch
    if micro and accum and total and total % (micro * accum) == 0:
        return replica * (total // (micro * accum))
    cluster = parse_cluster(cfg.description)
    if cluster and cluster[0] % replica == 0:
        return cluster[0]
    return replica


def weights_plan(cfg: RunConfig) -> Plan:
    """The plan of a run's weights alone, for what reads or writes them in one process (an export, a checkpoint's
    conversion, a parity check): its stages at one rank each, without sequence parallelism (whose ranks share every
    weight)."""
    return build_plan(cfg.replace(pipeline={"sequence_parallel": 1}), world_size=cfg.pipeline.stages)


def build_plan(cfg: RunConfig, world_size: int | None = None) -> Plan:
    resolved = resolve_model(cfg.model)
    model = meta_model(resolved)
    layers = pipeline_layers(model, resolved.family)
    n_blocks = len(layers) - 2
    layout = resolve_layout(world_size or default_world_size(cfg), cfg.pipeline.stages, n_blocks,
                            cfg.micro_batch, cfg.grad_accum, cfg.train_batch, cfg.pipeline.sequence_parallel)
    _check_seq_len(cfg, resolved)
    if cfg.pipeline.sequence_parallel > 1:
        check_sequence_parallel(resolved.family, resolved.hf_config, cfg.pipeline.sequence_parallel)
    _check_format(cfg, resolved)
    if cfg.expert_parallel:
        _check_expert_parallel(cfg, layout.world_size, model_experts(model, list(submodule(model, resolved.family.blocks))))
    per_layer = [layer.params for layer in layers]
    boundaries = partition_layers(cfg.pipeline.partition, per_layer, [layer.class_name for layer in layers],
                                  cfg.pipeline.stages, cfg.data.seq_len, resolved.hf_config.hidden_size,
                                  layer_active_params(model, resolved.family, per_layer))
    bytes_per_param = DTYPE_BYTES[cfg.precision]
    per_stage = stage_params(model, resolved.family, boundaries)
    targets = find_targets(model, resolved.family, cfg.model.lora) if cfg.model.lora else None
    trainable = per_stage
    if targets is not None:  # the base model frozen; the adapters come on top of it
        adapters = targets.per_layer(resolved.family, n_blocks)
        trainable = [sum(adapters[lo:hi]) for lo, hi in zip(boundaries, boundaries[1:])]
        per_stage = [n + t for n, t in zip(per_stage, trainable)]
        _check_adapters_per_stage(trainable, layers, boundaries)
    stage_plans = [StagePlan(s, lo, hi - 1, [layer.name for layer in layers[lo:hi]], n, n * bytes_per_param, t)
                   for s, (lo, hi, n, t) in enumerate(zip(boundaries, boundaries[1:], per_stage, trainable))]
    return Plan(cfg, resolved, layout, layers, boundaries, stage_plans, count_params(model), model,
                document_mask(cfg, resolved), run_warnings(cfg, layout), targets)


def _check_adapters_per_stage(adapters: list[int], layers: list[PipelineLayer], boundaries: list[int]) -> None:
    """Every stage must train something: DeepSpeed's optimizer refuses a stage without a trainable parameter."""
    for stage, (lo, hi, n) in enumerate(zip(boundaries, boundaries[1:], adapters)):
        if not n:
            names = ", ".join(layer.name for layer in layers[lo:hi]) or "no layer"
            raise UserError("pipeline.partition", f"stage {stage} holds {names} and no LoRA adapter "
                                                  "(model.lora.target_modules); a stage needs something to train: "
                                                  "give each stage a block with a target, e.g. a list of blocks "
                                                  "per stage, or use fewer stages")


def document_mask(cfg: RunConfig, resolved: ResolvedModel) -> bool:
    """``data.document_mask`` as the run applies it: as given, or (null) on when fine-tuning a model that allows it.

    The plain-engine path (ZeRO-2/3 at one stage) hands the Hugging Face model restarting ``position_ids`` and
    no padding mask; OPT's model makes positions from the padding mask and gives its mask helper none, so it
    cannot separate documents there.
    """
    obstacle = document_mask_obstacle(resolved.family, resolved.hf_config)
    if obstacle is None and not cfg.pipeline_engine and resolved.family.positions == "cumsum":
        obstacle = (f"the plain engine (ZeRO-{cfg.zero_stage} at one stage) runs {resolved.hf_config.model_type}'s "
                    "own model, which makes positions from the padding mask and cannot be told where documents "
                    "start (the pipeline engine can: zero_optimization.stage 0 or 1, or pipeline.stages > 1)")
    if cfg.data.document_mask and obstacle:
        raise UserError("data.document_mask", f"true is not available: {obstacle}; set it false")
    if cfg.data.document_mask is None:
        return cfg.model.pretrained and obstacle is None
    return cfg.data.document_mask


def _check_format(cfg: RunConfig, resolved: ResolvedModel) -> None:
    if cfg.data.format != "text" and resolved.family.task == "masked_lm":
        raise UserError("data.format", f"{cfg.data.format!r} labels answers for a causal LM; "
                                       f"{resolved.hf_config.model_type} is a masked LM: use \"text\"")


def _check_seq_len(cfg: RunConfig, resolved: ResolvedModel) -> None:
    max_positions = getattr(resolved.hf_config, "max_position_embeddings", None)
    if max_positions and cfg.data.seq_len > max_positions:
        raise UserError("data.seq_len",
                        f"{cfg.data.seq_len} exceeds the model's {max_positions} positions "
                        f"(max_position_embeddings); use at most {max_positions}")


def _check_expert_parallel(cfg: RunConfig, world_size: int, experts: Any) -> None:
    """AutoEP's layout, checked before any process group: DeepSpeed checks it inside the engine, as a traceback."""
    size = cfg.deepspeed["expert_parallel"].get("autoep_size", 1)
    if experts is None:
        raise UserError("expert_parallel.enabled", f"{cfg.model.name} has no Mixture-of-Experts layers to spread")
    if world_size % size or experts.count % size:
        valid = [n for n in range(1, world_size + 1) if world_size % n == 0 and experts.count % n == 0]
        raise UserError("expert_parallel.autoep_size", f"{size} must divide the world size {world_size} and the "
                                                       f"{experts.count} experts of each layer; valid: {valid}")
