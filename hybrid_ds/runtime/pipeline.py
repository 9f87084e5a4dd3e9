"""A Hugging Face model as a DeepSpeed ``PipelineModule`` of layer specs, each stage building only its own.

Layer specs, in order: token embedding (a ``TiedLayerSpec`` where the model ties it to the output
projection), the rest of the embedding, one ``Block`` per transformer block, the final norm, and the
output projection (the tied embedding again, or the untied head). Stage boundaries come from
:func:`hybrid_ds.config.topology.partition_layers` over ``[embedding, blocks..., head]``, computed on the meta
device, and are handed to DeepSpeed as they are: DeepSpeed's own ``partition_method="parameters"``
would build every layer on every rank just to count parameters.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

from hybrid_ds.runtime.compile_blocks import compile_blocks
from hybrid_ds.seam.pipeline_module import HybridPipelineModule
from hybrid_ds.seam.ulysses import all_to_all, register_group, tiled_mlp
from hybrid_ds.models.build import StageBuilder
from hybrid_ds.models.layers import (Block, EmbeddingRest, FinalNorm, LogitsBias, LogitsOps, OutputProjection,
                                    TokenEmbedding, loss_function, project_with_embedding)
from hybrid_ds.models.resolve import meta_model
from hybrid_ds.models.sequence_parallel import SequenceShard
from hybrid_ds.runtime.plan import Plan
from hybrid_ds.runtime.quiet import deepspeed_prints_off

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIE_KEY = "token_embedding"


def layer_specs(builder: StageBuilder) -> tuple[list[Any], list[int]]:
    """DeepSpeed layer specs for the whole model, and for each spec its unit (0 embedding, i+1 block i, n+1 head)."""
    family = builder.family
    n_blocks = len(builder.skeleton.get_submodule(family.blocks))
    tie = dict(tied_weight_attr=["embed.weight"])
    embed = TiedLayerSpec(TIE_KEY, TokenEmbedding, builder, **tie) if builder.tied else LayerSpec(TokenEmbedding, builder)
    specs = [embed, LayerSpec(EmbeddingRest, builder)]
    specs += [LayerSpec(Block, builder, i) for i in range(n_blocks)]
    head = [LayerSpec(FinalNorm, builder)]
    if builder.tied:
        head.append(TiedLayerSpec(TIE_KEY, TokenEmbedding, builder, forward_fn=project_with_embedding, **tie))
        bias = tied_output_bias(builder)
        if bias:
            head.append(LayerSpec(LogitsBias, builder, bias))
    else:
        head.append(LayerSpec(OutputProjection, builder))
    if family.logit_ops:
        head.append(LayerSpec(LogitsOps, builder))
    units = [0, 0] + [i + 1 for i in range(n_blocks)] + [n_blocks + 1] * len(head)
    return specs + head, units


def tied_output_bias(builder: StageBuilder) -> str | None:
    """The parameter path of a tied head's own bias, added after the tied projection: the family's
    ``output_bias`` (BERT's cls.predictions.bias), or the output module's bias where it has one (phi's
    ``lm_head`` keeps its bias when ``tie_word_embeddings`` ties its weight)."""
    family = builder.family
    if family.output_bias:
        return family.output_bias
    output = builder.skeleton.get_submodule(family.output)
    return f"{family.output}.bias" if getattr(output, "bias", None) is not None else None


def spec_boundaries(unit_boundaries: list[int], units: list[int]) -> list[int]:
    """Stage boundaries over units -> boundaries over specs.

    >>> spec_boundaries([0, 2, 4], [0, 0, 1, 2, 3, 3])
    [0, 3, 6]
    """
    return [next((i for i, u in enumerate(units) if u >= boundary), len(units)) for boundary in unit_boundaries]


def stage_builder(plan: Plan, device: str | torch.device = "cpu") -> StageBuilder:
    cfg = plan.config
    builder = StageBuilder(plan.resolved, cfg.model.pretrained, cfg.train.seed, DTYPES[cfg.precision], device,
                           cfg.model.revision, skeleton=plan.skeleton, documents=plan.document_mask,
                           lora=cfg.model.lora, lora_targets=plan.lora_targets)
    if cfg.train.tiled_mlp:
        builder.tiled_mlp = (cfg.train.tiled_mlp, tiled_mlp)
    builder.selective_checkpoint = cfg.train.selective_checkpoint
    builder.float8 = cfg.train.float8
    return builder


def build_pipeline_module(plan: Plan, device: str | torch.device = "cpu") -> Any:
    """The DeepSpeed PipelineModule of this rank (needs an initialized process group).

    The number of stages and their boundaries are the plan's. ``module.builder.built_modules()`` maps
    Hugging Face module paths to what this rank built.
    """
    cfg, layout = plan.config, plan.layout
    builder = stage_builder(plan, device)
    topology = PipeDataParallelTopology(num_pp=layout.stages, num_dp=layout.data_ranks)
    builder.sequence = sequence_shard(topology, layout.sp) if layout.sp > 1 else None
    specs, units = layer_specs(builder)
    with deepspeed_prints_off():  # SEED_LAYERS=... and the topology
        module = HybridPipelineModule(
            layers=specs, parts=spec_boundaries(plan.boundaries, units), topology=topology,
            loss_fn=data_parallel_loss(loss_function(builder.family, _vocab(builder), cfg.train.fused_loss,
                                                     builder.sequence), layout.sp),
            partition_method="uniform", activation_checkpoint_interval=cfg.pipeline.activation_checkpoint_interval,
            # Non-reentrant: the reentrant default crashes on the embedding stage, whose inputs need no grad.
            activation_checkpoint_func=non_reentrant_checkpoint, checkpointable_layers=["Block"])
    module.builder = builder
    if cfg.train.compile:
        compile_blocks([module])
    return module


def sequence_groups(topology: Any, sp: int) -> list[list[int]]:
    """The ranks of each sequence-parallel group: ``sp`` consecutive data-parallel ranks of one stage (replica r's are
    DeepSpeed's data ranks r*sp .. r*sp+sp-1), so that a stage sends each shard to the same sp rank of the next.

    >>> sequence_groups(PipeDataParallelTopology(num_pp=2, num_dp=4), 2)
    [[0, 1], [2, 3], [4, 5], [6, 7]]
    """
    data = topology.get_dim("data")
    return [[topology.get_rank(pipe=stage, data=first + i) for i in range(sp)]
            for stage in range(topology.get_dim("pipe")) for first in range(0, data, sp)]


def sequence_shard(topology: Any, sp: int) -> SequenceShard:
    """This rank's shard of every sequence, exchanged in its sequence-parallel group (:func:`sequence_groups`, made by
    every rank in the same order) with DeepSpeed's all-to-all (hybrid_ds.seam.ulysses)."""
    rank = torch.distributed.get_rank()
    mine = None
    for ranks in sequence_groups(topology, sp):
        group = torch.distributed.new_group(ranks=ranks)
        if rank in ranks:
            mine, index = group, ranks.index(rank)
    register_group(mine)
    return SequenceShard(mine, index, sp, all_to_all)


def world_shard() -> SequenceShard:
    """This rank's shard when every rank of the process group shares each sequence (``hybrid-ds parity`` under sequence
    parallelism, its tests and benchmarks): the one sequence group of a single stage whose data ranks are the world."""
    world = torch.distributed.get_world_size()
    return sequence_shard(PipeDataParallelTopology(num_pp=1, num_dp=world), world)


def data_parallel_loss(loss_fn: Any, sp: int) -> Any:
    """The loss DeepSpeed is given: under sequence parallelism ``sp`` times the shard's share of the micro-batch's
    loss, because DeepSpeed averages gradients and the reported loss over its data-parallel group, which holds the
    ``sp`` shards of each replica: the mean over them of ``sp`` x share is the replica's whole loss."""
    if sp == 1:
        return loss_fn

    def loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(outputs, labels) * sp

    return loss


def _vocab(builder: StageBuilder) -> int:
    return builder.skeleton.get_output_embeddings().weight.shape[0]


class SequentialStages:
    """All stages in one process, each built exactly as its rank builds it (own builder, own reads).

    For parity checks: the forward runs the stages one after another on the same batch.
    """

    def __init__(self, plan: Plan, sequence: SequenceShard | None = None):
        self.plan = plan
        self.layers_per_stage: list[list[tuple[Any, Any]]] = []   # per stage: (callable, module) per layer
        self.builders: list[StageBuilder] = []
        for stage in range(plan.config.pipeline.stages):
            builder = stage_builder(_fresh(plan))
            builder.sequence = sequence  # this rank's shard of every sequence (models.sequence_parallel)
            specs, units = layer_specs(builder)
            lo, hi = spec_boundaries(plan.boundaries, units)[stage:stage + 2]
            built = {}
            layers = []
            for spec in specs[lo:hi]:
                key = getattr(spec, "key", None)
                module = built.get(key) if key else None
                if module is None:
                    module = spec.build()
                    if key:
                        built[key] = module
                fn = getattr(spec, "forward_fn", None)
                layers.append(((lambda x, f=fn, m=module: f(m, x)) if fn else module, module))
            self.layers_per_stage.append(layers)
            self.builders.append(builder)
        if plan.config.train.compile:
            compile_blocks(self.modules())
        family, vocab = plan.resolved.family, _vocab(self.builders[0])
        self.loss_fn = loss_function(family, vocab, plan.config.train.fused_loss, sequence)  # as the run computes it
        # Hugging Face's, on the full logits (with a shard: the shard's share of it, on its logits)
        self.hf_loss_fn = loss_function(family, vocab, fused=False, sequence=sequence)

    def modules(self) -> list[torch.nn.Module]:
        return [m for layers in self.layers_per_stage for _, m in layers]

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x: Any = inputs
        for layers in self.layers_per_stage:
            for fn, _ in layers:
                x = fn(x)
        return x

    def named_gradients(self) -> dict[str, torch.Tensor]:
        """Gradients by Hugging Face parameter name; a tied weight's two copies summed, as DeepSpeed reduces them."""
        grads: dict[str, torch.Tensor] = {}
        for key, param in self._named():
            if param.grad is not None:
                grads[key] = grads[key] + param.grad if key in grads else param.grad.clone()
        return grads

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Parameters by Hugging Face name (with a LoRA stage's peft names); of a tied weight, the first stage's."""
        params: dict[str, torch.nn.Parameter] = {}
        for key, param in self._named():
            params.setdefault(key, param)
        return params

    def _named(self) -> Any:
        for builder in self.builders:
            for path, module in builder.built_modules().items():
                for name, param in module.named_parameters():
                    yield f"{path}.{name}", param
            yield from builder.built_parameters().items()


def _fresh(plan: Plan) -> Plan:
    """The plan with a skeleton of its own: each simulated rank starts from an untouched meta model."""
    return replace(plan, skeleton=meta_model(plan.resolved))
