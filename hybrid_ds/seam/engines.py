"""The PipelineEngine subclasses a run with stages gets: one backward pass per micro-batch whatever a stage outputs, and
ZeRO-2 (gradients partitioned over data parallel) with pipeline stages, which DeepSpeed refuses.

- :class:`OneBackwardPipelineEngine`: ``PipelineEngine._exec_backward_pass`` reading ``pipe_buffers['outputs']`` and
  ``grad_layer``, and the per-output backward it replaces (a MoE model's router sums ride with the hidden states).
- :class:`PartitionedGradientsPipelineEngine` and :func:`initialize_pipeline`: ``PipelineEngine.__init__``'s ZeRO
  assert, ``deepspeed.PipelineEngine`` as ``deepspeed.initialize`` reads it, the ``_exec_*`` instructions of the
  reductions, and ``DeepSpeedZeroOptimizer``'s per-backward epilogue, finalization, compact partition and offsets.
- :func:`check_instruction_map`: ``_exec_schedule`` running each instruction through the class-level
  ``_INSTRUCTION_MAP`` (which the engines above, the dp=1 reduction and the benchmarks' probes replace per engine).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero

from hybrid_ds.seam.compat import code_count, code_has, require, requirement

INSTRUCTION_MAP = requirement(
    "pipeline.instruction_map", "PipelineEngine._INSTRUCTION_MAP, read by _exec_schedule",
    lambda: isinstance(PipelineEngine._INSTRUCTION_MAP, dict)
    and code_has(PipelineEngine._exec_schedule, "self._INSTRUCTION_MAP[...]"),
    "the benchmarks time and sample pipeline instructions through it")


def check_instruction_map() -> None:
    """DeepSpeed 0.19.8's ``PipelineEngine._exec_schedule`` runs each instruction through ``self._INSTRUCTION_MAP``.

    The class-level map holds instruction type -> function(engine, **kwargs). Wrapping an engine's
    ``_exec_*`` methods changes nothing: the map holds the class's functions, not the instance's methods.
    """
    require(INSTRUCTION_MAP)


# ---------------------------------------------------------------- 8. ZeRO-2 with pipeline stages


_ZERO2_WHY = "ZeRO-2 with pipeline.stages > 1 drives DeepSpeed's ZeRO-2 optimizer inside the pipeline schedule"

ZERO_ASSERT = requirement(
    "zero2.assert", "PipelineEngine.__init__'s single zero_optimization_stage() check",
    lambda: code_count(PipelineEngine.__init__, "self.zero_optimization_stage(...)") == 1
    and code_has(PipelineEngine.__init__, "super().__init__(...)", "self.zero_optimization_stage(...)"), _ZERO2_WHY)
INITIALIZE = requirement(
    "zero2.initialize", "deepspeed.initialize building deepspeed.PipelineEngine",
    lambda: code_has(deepspeed.initialize, "... if ... else PipelineEngine")
    and deepspeed.PipelineEngine is PipelineEngine, _ZERO2_WHY)
REDUCTION_INSTRUCTIONS = requirement(
    "zero2.instructions",
    "PipelineEngine._exec_backward_pass, _exec_reduce_tied_grads, _exec_reduce_grads in _INSTRUCTION_MAP",
    lambda: {PipelineEngine._exec_backward_pass, PipelineEngine._exec_reduce_tied_grads,
             PipelineEngine._exec_reduce_grads} <= set(PipelineEngine._INSTRUCTION_MAP.values()), _ZERO2_WHY)
EPILOGUE = requirement(
    "zero2.epilogue", "DeepSpeedZeroOptimizer.overlapping_partition_gradients_reduce_epilogue, "
    "finalize_gradient_accumulation_boundary and ready_for_gradients",
    lambda: callable(Zero.overlapping_partition_gradients_reduce_epilogue)
    and callable(Zero.finalize_gradient_accumulation_boundary)
    and code_has(Zero.setup_buckets, "self.ready_for_gradients = True")
    and code_has(Zero._release_ipg_buffers, "self.ready_for_gradients = False"), _ZERO2_WHY)
COMPACT_PARTITION = requirement(
    "zero2.compact", "DeepSpeedZeroOptimizer._use_compact_grad_partition_buffer, read by the epilogue, "
    "average_tensor and finalize_gradient_accumulation_boundary",
    lambda: callable(Zero._use_compact_grad_partition_buffer)
    and all(code_has(f, "self._use_compact_grad_partition_buffer(...)") for f in (
        Zero.independent_gradient_partition_epilogue, Zero.finalize_gradient_accumulation_boundary,
        Zero._get_compact_grad_partition_slice))
    and code_has(Zero.average_tensor, "self._get_compact_grad_partition_slice(...)"),
    "between micro-batches each rank holds one flat partition of its stage's gradients")
OVERSIZED = requirement(
    "zero2.oversized", "DeepSpeedZeroOptimizer.reduce_independent_p_g_buckets_and_remove_grads holding an oversized "
    "gradient in extra_large_param_to_reduce for reduce_ipg_grads(comm_dtype=...), on reduction_stream under "
    "overlap_comm",
    lambda: code_has(Zero.reduce_ready_partitions_and_remove_grads,
                     "self.reduce_independent_p_g_buckets_and_remove_grads(param, i)")
    and code_has(Zero.reduce_independent_p_g_buckets_and_remove_grads,
                 "self.extra_large_param_to_reduce[comm_dtype] = param")
    and code_has(Zero.reduce_ipg_grads, "comm_dtype in self.extra_large_param_to_reduce")
    and code_has(Zero.reduce_ipg_grads, "stream = self.reduction_stream")
    and callable(Zero.get_param_comm_dtype),
    "a stage's largest gradient is reduced before autograd builds the next one")
OFFSETS = requirement(
    "zero2.offsets", "DeepSpeedZeroOptimizer.grad_start_offset, grad_partition_insertion_offset and partition_size, "
    "read by _build_compact_grad_partition_buffer",
    lambda: code_has(Zero._build_compact_grad_partition_buffer, "self.partition_size[group_idx]",
                     "self.grad_start_offset[group_idx][partition_id][param_id]",
                     "self.grad_partition_insertion_offset[group_idx][partition_id][param_id]"),
    "the stages sharing a tied weight add up their partitions of its gradient")

GRAD_BOUNDARY = requirement(
    "zero2.grad_boundary", "PipelineEngine._force_grad_boundary, returned by is_gradient_accumulation_boundary",
    lambda: code_has(PipelineEngine.is_gradient_accumulation_boundary, "return self._force_grad_boundary"),
    "ReduceGrads finalizes the step's gradient partition as at an accumulation boundary")


def check_partitioned_gradients_pipeline() -> None:
    """What :class:`PartitionedGradientsPipelineEngine` relies on in DeepSpeed 0.19.8.

    - ``PipelineEngine.__init__`` refuses ZeRO >= 2 with one ``self.zero_optimization_stage()`` assert, right
      after ``DeepSpeedEngine.__init__`` built the ZeRO-2 optimizer; nothing else in the pipe engine reads it.
    - ``deepspeed.initialize`` builds ``deepspeed.PipelineEngine``, looked up when it is called.
    - The schedule's instructions run ``_exec_backward_pass``, ``_exec_reduce_tied_grads`` and
      ``_exec_reduce_grads`` (through ``_INSTRUCTION_MAP``, which holds the class's functions: a subclass
      replaces them in its own map).
    - ``DeepSpeedZeroOptimizer.overlapping_partition_gradients_reduce_epilogue`` reduces what the gradient hooks
      bucketed and adds it to this rank's partition; ``ready_for_gradients`` says whether anything was bucketed
      since; ``finalize_gradient_accumulation_boundary`` turns the accumulated partition into what ``step``
      reads (DeepSpeed's own path for ``managed_gradient_accumulation: false``).
    - ``reduce_independent_p_g_buckets_and_remove_grads`` (wrapped on the instance, called through ``self`` by
      the hooks' path) keeps a gradient larger than the bucket in ``extra_large_param_to_reduce`` until
      ``reduce_ipg_grads(comm_dtype)`` reduces it.
    - ``PipelineEngine.is_gradient_accumulation_boundary`` returns ``_force_grad_boundary``, which ReduceGrads sets.
    - The compact partition: ``_use_compact_grad_partition_buffer(group)`` (replaced on the instance), consulted
      by the epilogue, the reduction (``average_tensor``) and the finalization; ``_get_compact_grad_partition_slice``
      and the offsets it reads, ``grad_start_offset`` and ``grad_partition_insertion_offset``
      ([group][partition][param id]), ``partition_size``, ``real_dp_process_group``, ``get_param_id``.
    """
    require(ZERO_ASSERT, INITIALIZE, REDUCTION_INSTRUCTIONS, EPILOGUE, COMPACT_PARTITION, OVERSIZED, OFFSETS,
            GRAD_BOUNDARY)


def pipeline_engine_class(zero_stage: int) -> type:
    """The PipelineEngine subclass a run with pipeline stages uses: ZeRO-2 partitions gradients over data parallel
    (:class:`PartitionedGradientsPipelineEngine`); every one runs one backward pass per micro-batch and stage."""
    if zero_stage == 2:
        check_partitioned_gradients_pipeline()
    check_one_backward()
    return PartitionedGradientsPipelineEngine if zero_stage == 2 else OneBackwardPipelineEngine


def initialize_pipeline(engine_class: type | None, **kwargs: Any) -> Any:
    """``deepspeed.initialize(**kwargs)`` for a PipelineModule, building ``engine_class`` (a PipelineEngine
    subclass) instead of ``PipelineEngine`` when given."""
    if engine_class is None:
        return deepspeed.initialize(**kwargs)[0]
    original = deepspeed.PipelineEngine
    deepspeed.PipelineEngine = engine_class
    try:
        return deepspeed.initialize(**kwargs)[0]
    finally:
        deepspeed.PipelineEngine = original


def _pipeline_engine_base() -> type:
    from deepspeed.runtime.pipe.engine import PipelineEngine
    return PipelineEngine


def _compact_partition(optimizer: Any, group_index: int) -> bool:
    """Accumulate into one flat partition-sized buffer (in the accumulation dtype), which reductions add
    their slice into.

    DeepSpeed 0.19.8 does so only when it accumulates in fp32 for bf16/fp16 parameters. Otherwise its
    other path keeps, between micro-batches, a whole-parameter copy of every gradient that reaches into this
    rank's partition (parameters straddling the boundary are held whole by both ranks, and one that received
    no gradient yet, such as a tied weight before ReduceTiedGrads, as zeros) and a second partition-sized
    buffer inside each micro-batch (measured before this override, bench/zero2_pipeline.py at pp=2 x dp=2:
    1.22x the stage's whole gradient between micro-batches on one rank, 0.76x on the other).
    """
    params = optimizer.params_in_partition[group_index]
    return not (len(params) > 0 and optimizer._is_muon_group(params))


# ---------------------------------------------------------------- 11. one backward pass for several outputs


_ONE_BACKWARD_WHY = "a stage whose output is several tensors needing grad runs one backward pass, not one per tensor"

ONE_BACKWARD = requirement(
    "pipeline.one_backward", "PipelineEngine._exec_backward_pass running one backward per output of "
    "pipe_buffers['outputs'] with the gradients in grad_layer",
    lambda: code_has(PipelineEngine._exec_backward_pass, "outputs = self.pipe_buffers['outputs'][buffer_id]",
                     "grad_tensors = self.grad_layer", "out.backward(gradient=grad, retain_graph=...)",
                     "outputs.backward(gradient=grad_tensors)")
    and PipelineEngine._exec_backward_pass in PipelineEngine._INSTRUCTION_MAP.values(), _ONE_BACKWARD_WHY)


BF16_LAST_STAGE = requirement(
    "pipeline.bf16_last_stage", "PipelineEngine._exec_backward_pass clearing the bf16 gradients (clear_lp_grads) "
    "around a backward only off the last stage, and BF16_Optimizer.backward_epilogue adding them to the fp32 ones",
    lambda: code_has(PipelineEngine._exec_backward_pass, "super().backward(self.loss)",
                     "self.optimizer.clear_lp_grads()", "self.optimizer.update_hp_grads(clear_lp_grads=False)")
    and code_has(BF16_Optimizer.backward_epilogue, "self.update_hp_grads(clear_lp_grads=clear_lp_grads)")
    and callable(BF16_Optimizer.clear_lp_grads),
    "the last stage of a bf16 pipeline adds each micro-batch's gradient to the fp32 sum once")


def check_one_backward() -> None:
    """DeepSpeed 0.19.8's ``_exec_backward_pass`` takes a non-last stage's outputs from ``pipe_buffers['outputs']``
    and their gradients from ``grad_layer``, and runs ``out.backward(gradient=grad, retain_graph=...)`` once per
    floating output: with two outputs that depend on the whole stage (hidden states and a MoE model's router
    sums) autograd walks the stage's graph twice. Given one flat tensor it runs one ``backward``."""
    require(ONE_BACKWARD, BF16_LAST_STAGE)


class OneBackwardPipelineEngine(_pipeline_engine_base()):
    """DeepSpeed's PipelineEngine with one backward pass per micro-batch on a stage with several outputs.

    The floating outputs are flattened into one tensor (``torch.cat``, whose backward hands each its slice
    of the gradient) and so are the gradients received for them: one ``backward`` call instead of one per
    output, each of which walked the whole stage (measured: bench/moe_backward.py). A stage with one
    floating output runs DeepSpeed's own path unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The class-level map holds PipelineEngine's functions; this engine's map holds its own overrides.
        self._INSTRUCTION_MAP = {kind: getattr(type(self), fn.__name__) for kind, fn in self._INSTRUCTION_MAP.items()}

    def _exec_backward_pass(self, buffer_id: int) -> None:
        outputs = self.pipe_buffers["outputs"][buffer_id]
        # The last stage's outputs are never sent, and need not be tensors (the head's HeadLogits).
        last = self.is_last_stage()
        if last and self.using_bf16_optimizer:
            # DeepSpeed clears the bf16 gradients before another stage's backward and adds them to the fp32 sum after;
            # the last stage's backward (DeepSpeedEngine.backward) adds them after without clearing them before, so
            # micro-batch k's fp32 gradient got micro-batches 0..k-1's again (measured: tests/test_pipeline_multiproc.py)
            self.optimizer.clear_lp_grads()
        floating = [t for t in outputs if t.is_floating_point()] if isinstance(outputs, tuple) and not last else []
        if len(floating) < 2 or self.is_pipe_partitioned or self.is_grad_partitioned:
            super()._exec_backward_pass(buffer_id)
            return
        received = self.grad_layer
        self.pipe_buffers["outputs"][buffer_id] = torch.cat([t.reshape(-1) for t in floating])
        self.grad_layer = torch.cat([g.reshape(-1) for g in received])
        try:
            super()._exec_backward_pass(buffer_id)
        finally:
            self.grad_layer = received  # the receive buffers, reused for the next micro-batch


# Elements of a tied weight's gradient summed in one all-reduce at ReduceTiedGrads (64 MB in fp32): the transient
# fp32 tensor each rank of the tied stages holds there; hybrid_ds.estimate.model_state counts the same.
TIED_SUM_CHUNK = 1 << 24


class PartitionedGradientsPipelineEngine(OneBackwardPipelineEngine):
    """DeepSpeed's PipelineEngine driving DeepSpeed's ZeRO-2 optimizer: between micro-batches each data-parallel
    rank holds only its partition of its stage's gradients, tied weights included.

    DeepSpeed refuses the combination in one assert; lifting it alone breaks (measured in
    shared/notes/zero2-with-pipeline-probe.md): the pipe engine never runs ZeRO-2's per-backward epilogue
    (the second micro-batch crashes: "Gradient computed twice"), and the epilogue clears the tied weights'
    gradients before the engine all-reduces them across the first and last stage (a silently wrong step).
    So:

    - after each micro-batch's backward, what the gradient hooks bucketed is reduced over data parallel
      and added to this rank's partition (DeepSpeed's epilogue, with the boundary flag off), tied weights
      like any other parameter;
    - the partition is one flat buffer whatever the dtypes (:func:`_compact_partition`), and a gradient larger
      than the reduce bucket is reduced as soon as autograd produced it;
    - at ReduceTiedGrads the stages sharing a tied weight add up their partitions of it: each rank lays its
      slice of the weight's gradient into a zero tensor of the weight's size, one all-reduce over every rank
      of those stages (all data-parallel ranks: the stages partition the weight at different offsets) sums
      them, and each rank takes its slice back, in chunks of at most ``TIED_SUM_CHUNK`` elements;
    - ReduceGrads finalizes the accumulated partition for the step, as DeepSpeed does for
      ``managed_gradient_accumulation: false`` (and there, with ZeRO-Offload, copies it to the CPU).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        optimizer = self.optimizer
        optimizer._use_compact_grad_partition_buffer = types.MethodType(_compact_partition, optimizer)
        bucket_param = optimizer.reduce_independent_p_g_buckets_and_remove_grads

        def reduce_oversized_at_once(param: torch.nn.Parameter, i: int) -> None:
            """A gradient larger than the bucket is reduced as it arrives and then dropped, its slice added to the
            partition. DeepSpeed reduces it when the next gradient arrives and, where this rank's partition holds
            part of it, keeps the whole gradient until the end of the backward pass.

            Only a gradient DeepSpeed took as its oversized one (``extra_large_param_to_reduce``: contiguous
            gradients) is reduced early; any other is left to DeepSpeed. Where the reduction runs on DeepSpeed's
            reduction stream (``overlap_comm`` on a GPU), the dropped gradient's memory is kept until that stream
            has read it (``record_stream``)."""
            bucket_param(param, i)
            comm_dtype = optimizer.get_param_comm_dtype(param)
            if getattr(optimizer, "extra_large_param_to_reduce", {}).get(comm_dtype) is not param:
                return
            grad = param.grad
            optimizer.reduce_ipg_grads(comm_dtype=comm_dtype)
            if optimizer.overlap_comm and not get_accelerator().resolves_data_dependency():
                grad.record_stream(optimizer.reduction_stream)
            param.grad = None

        optimizer.reduce_independent_p_g_buckets_and_remove_grads = reduce_oversized_at_once
        self._group_index = {id(p): i for i, group in enumerate(optimizer.bit16_groups) for p in group}
        self._tied = self._tied_weights_over_all_replicas()

    def _tied_weights_over_all_replicas(self) -> list[tuple[torch.nn.Parameter, Any]]:
        """(weight, group of every rank of the stages that share it) for this rank's tied weights.

        Every rank creates every group, in DeepSpeed's order of tie keys (``torch.distributed.new_group``
        must be called by all processes).
        """
        from deepspeed.runtime.pipe.module import TiedLayerSpec

        module, grid = self.module, self.grid
        specs = module._layer_specs
        tied = []
        for key in sorted({s.key for s in specs if isinstance(s, TiedLayerSpec)}):
            stages = sorted({module.stage_owner(i) for i, s in enumerate(specs)
                             if isinstance(s, TiedLayerSpec) and s.key == key})
            ranks = [grid.stage_to_global(stage_id=s, data=d) for s in stages for d in range(grid.data_parallel_size)]
            group = torch.distributed.new_group(ranks=ranks)
            if len(stages) > 1 and key in module.tied_comms:
                comm = module.tied_comms[key]
                weights = [module._recursive_getattr(module.tied_modules[key], attr) for attr in comm["weight_attr"]]
                tied += [(weight, group) for weight in weights if weight.requires_grad]  # LoRA freezes the embedding
        return tied

    def zero_optimization_stage(self) -> int:  # noqa: D102
        stage = super().zero_optimization_stage()
        if sys._getframe(1).f_code is _pipeline_engine_base().__init__.__code__:
            return min(stage, 1)  # PipelineEngine.__init__'s refusal, and only it, sees ZeRO-1
        return stage

    def _reduce_bucketed(self) -> None:
        """Reduce what the hooks bucketed since the last call into this rank's partition."""
        optimizer = self.optimizer
        optimizer.set_gradient_accumulation_boundary(False)
        if optimizer.ready_for_gradients:  # else the epilogue indexes a released bucket
            optimizer.overlapping_partition_gradients_reduce_epilogue()

    def _exec_backward_pass(self, buffer_id: int) -> None:
        super()._exec_backward_pass(buffer_id)
        self._reduce_bucketed()

    def _exec_reduce_tied_grads(self) -> None:
        """Sum each tied weight's gradient over the stages that share it, in chunks of at most
        ``TIED_SUM_CHUNK`` elements (or the reduce bucket, if smaller): each rank lays the part of its partition
        that falls in the chunk into a zero fp32 tensor, one all-reduce sums them, and each takes its part back."""
        self._reduce_bucketed()
        chunk = max(1, min(TIED_SUM_CHUNK, int(self.optimizer.reduce_bucket_size)))
        for weight, group in self._tied:
            owned = _partition_slice(self.optimizer, weight, self._group_index[id(weight)])
            start, part = owned if owned is not None else (0, None)
            for lo in range(0, weight.numel(), chunk):
                hi = min(lo + chunk, weight.numel())
                total = torch.zeros(hi - lo, dtype=torch.float32, device=weight.device)
                a, b = (max(lo, start), min(hi, start + part.numel())) if part is not None else (0, 0)
                if a < b:
                    total[a - lo:b - lo] = part[a - start:b - start]
                torch.distributed.all_reduce(total, group=group)
                if a < b:
                    part[a - start:b - start].copy_(total[a - lo:b - lo])

    def _exec_reduce_grads(self) -> None:
        self._force_grad_boundary = True
        self.optimizer.finalize_gradient_accumulation_boundary()
        self._force_grad_boundary = False


def _partition_slice(optimizer: Any, param: torch.nn.Parameter, group_index: int) -> tuple[int, torch.Tensor] | None:
    """(offset in ``param``, view of this rank's accumulated partition) for the part of ``param`` it owns."""
    partition_id = torch.distributed.get_rank(group=optimizer.real_dp_process_group[group_index])
    param_id = optimizer.get_param_id(param)
    starts = optimizer.grad_start_offset[group_index][partition_id]
    if param_id not in starts:
        return None
    start = int(starts[param_id])
    dest = int(optimizer.grad_partition_insertion_offset[group_index][partition_id][param_id])
    count = int(min(param.numel() - start, optimizer.partition_size[group_index] - dest))
    if count <= 0:
        return None
    return start, optimizer._get_compact_grad_partition_slice(group_index, partition_id, param_id, count)
