"""The resolved plan of a run: layout, batch arithmetic and the layer -> stage map, from the meta device.

Nothing here allocates weights: the model is built on the meta device to count parameters per
layer, and the same layer list decides the stage boundaries the pipeline will use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybrid_ds.config import RunConfig
from hybrid_ds.errors import UserError
from hybrid_ds.models.resolve import (PipelineLayer, ResolvedModel, count_params, meta_model, pipeline_layers,
                                      resolve_model, stage_params)
from hybrid_ds.topology import Layout, partition_layers, resolve_layout

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class StagePlan:
    stage: int
    first_layer: int
    last_layer: int      # inclusive
    layer_names: list[str]
    params: int
    param_bytes: int     # parameters in the training dtype (no gradients, no optimizer state)


@dataclass
class Plan:
    config: RunConfig
    resolved: ResolvedModel
    layout: Layout
    layers: list[PipelineLayer]
    parts: list[int]
    stages: list[StagePlan]
    total_params: int
    skeleton: Any = None          # the whole model on the meta device (what the counts came from)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        return len(self.layers) - 2


def default_world_size(cfg: RunConfig) -> int:
    """The world size a config implies: from its batch numbers, else the cluster its description names
    ("64x A100-80GB"), else one data-parallel replica (stages)."""
    from hybrid_ds.gpus import parse_cluster

    micro, accum, total = cfg.micro_batch, cfg.grad_accum, cfg.train_batch
    if micro and accum and total and total % (micro * accum) == 0:
        return cfg.pipeline.stages * (total // (micro * accum))
    cluster = parse_cluster(cfg.description)
    if cluster and cluster[0] % cfg.pipeline.stages == 0:
        return cluster[0]
    return cfg.pipeline.stages


def build_plan(cfg: RunConfig, world_size: int | None = None) -> Plan:
    resolved = resolve_model(cfg.model)
    model = meta_model(resolved)
    layers = pipeline_layers(model, resolved.family)
    n_blocks = len(layers) - 2
    layout = resolve_layout(world_size or default_world_size(cfg), cfg.pipeline.stages, n_blocks,
                            cfg.micro_batch, cfg.grad_accum, cfg.train_batch)
    _check_seq_len(cfg, resolved)
    parts = partition_layers(cfg.pipeline.partition, [layer.params for layer in layers],
                             [layer.class_name for layer in layers], cfg.pipeline.stages, cfg.data.seq_len,
                             resolved.hf_config.hidden_size)
    bytes_per_param = _DTYPE_BYTES[cfg.precision]
    stages = [StagePlan(s, lo, hi - 1, [layer.name for layer in layers[lo:hi]], n, n * bytes_per_param)
              for s, (lo, hi, n) in enumerate(zip(parts, parts[1:], stage_params(model, resolved.family, parts)))]
    return Plan(cfg, resolved, layout, layers, parts, stages, count_params(model), model, layout.warnings())


def _check_seq_len(cfg: RunConfig, resolved: ResolvedModel) -> None:
    max_positions = getattr(resolved.hf_config, "max_position_embeddings", None)
    if max_positions and cfg.data.seq_len > max_positions:
        raise UserError("data.seq_len",
                        f"{cfg.data.seq_len} exceeds the model's {max_positions} positions "
                        f"(max_position_embeddings); use at most {max_positions}")


def _human(n: float) -> str:
    """A count in K/M/B/T.

    >>> _human(124_439_808)
    '124.4M'
    """
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def _layer_span(names: list[str]) -> str:
    blocks = [int(n.split()[1]) for n in names if n.startswith("block ")]
    parts = ["embedding"] if names and names[0] == "embedding" else []
    if blocks:
        parts.append(f"blocks {blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}")
    if names and names[-1] == "head":
        parts.append("head")
    return " + ".join(parts)


def format_plan(plan: Plan) -> str:
    cfg, layout = plan.config, plan.layout
    hf = plan.resolved.hf_config
    lines = [
        f"config     {cfg.source}" + (f"  ({cfg.description})" if cfg.description else ""),
        f"model      {cfg.model.name}: {hf.model_type} {plan.resolved.family.task}, {plan.n_blocks} layers, "
        f"hidden {hf.hidden_size}, {_human(plan.total_params)} parameters"
        + (" (pretrained)" if cfg.model.pretrained else " (random init)"),
        f"layout     world size {layout.world_size} = stages={layout.stages} x dp={layout.dp}; "
        f"ZeRO-{cfg.zero_stage}; {cfg.precision}; engine "
        + ("PipelineEngine" if layout.stages > 1 or cfg.zero_stage <= 1 else "DeepSpeedEngine (plain HF model)"),
        f"batch      train_batch_size {layout.train_batch} = micro {layout.micro_batch} x grad_accum "
        f"{layout.grad_accum} x dp {layout.dp}; {layout.train_batch * cfg.data.seq_len:,} tokens per step "
        f"at seq_len {cfg.data.seq_len}",
        f"bubble     (p-1)/(m+p-1) = {layout.bubble:.1%}",
        f"partition  {cfg.pipeline.partition} -> boundaries {plan.parts}",
        "",
        f"{'stage':>5}  {'layers':<8}  {'holds':<32}  {'params':>9}  {'param bytes':>11}",
    ]
    for s in plan.stages:
        span = f"{s.first_layer}-{s.last_layer}"
        lines.append(f"{s.stage:>5}  {span:<8}  {_layer_span(s.layer_names):<32}  {_human(s.params):>9}  "
                     f"{_human(s.param_bytes) + 'B':>11}")
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def plan_dict(plan: Plan) -> dict:
    """The plan as JSON data (``hybrid-ds validate --json``)."""
    layout = plan.layout
    return {
        "config": plan.config.source, "model": plan.config.model.name,
        "model_type": plan.resolved.hf_config.model_type, "task": plan.resolved.family.task,
        "layers": plan.n_blocks, "params": plan.total_params,
        "world_size": layout.world_size, "stages": layout.stages, "dp": layout.dp,
        "micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum, "train_batch": layout.train_batch,
        "zero_stage": plan.config.zero_stage, "precision": plan.config.precision, "bubble": layout.bubble,
        "parts": plan.parts,
        "stage_plan": [{"stage": s.stage, "layers": s.layer_names, "params": s.params,
                        "param_bytes": s.param_bytes} for s in plan.stages],
        "warnings": plan.warnings,
    }
