"""Every DeepSpeed internal hybrid_ds relies on, in one place, each checked before it is relied on.

Written for DeepSpeed 0.19.8 (``WRITTEN_FOR``). A few things hybrid_ds needs are not DeepSpeed's API: a
private method it overrides or replaces, attributes it reads, a file name it derives. A DeepSpeed
refactor that renamed one would not always fail loudly: if ``PipelineEngine`` stopped calling
``clip_fp32_gradients``, our global-norm replacement would silently never run. So each item first
checks what it relies on (the name exists and, where the item depends on DeepSpeed *calling* it, that
the caller's source still calls it), and otherwise raises :class:`~hybrid_ds.errors.IncompatibleDeepSpeed`:
one line naming the internal and both DeepSpeed versions. ``tests/test_deepspeed_seam.py`` takes each
internal away in turn and expects that line.

This module imports DeepSpeed at the top (``HybridPipelineModule`` subclasses ``PipelineModule``), like
the other runtime modules; the pure layer (config, estimator) never imports it.

Items (entry point: internals; used by):

1. ``use_global_clip_norm``: ``PipelineEngine.clip_fp32_gradients`` (replaced on the instance) and the
   step path that calls it, ``PipelineModule.tied_comms`` / ``tied_modules``, ``engine.grid``; engine.py.
2. ``HybridPipelineModule``: ``PipelineModule._partition_layers`` (overridden), ``_topo``, ``_set_bounds``,
   ``parts``, ``_local_start`` / ``_local_stop``; pipeline.py.
3. ``disable_shm_comm_op``: ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]``; engine.py.
4. ``layer_checkpoint_file``: ``PipelineModule.ckpt_layer_path``; checkpoint.py (export).
5. ``wrap_pipeline_instructions``: ``PipelineEngine._INSTRUCTION_MAP`` as ``_exec_schedule`` reads it;
   bench/train_worker.py, bench/estimator_accuracy.py.
6. ``forget_pipeline_grid``: ``deepspeed.utils.groups.mpu``; bench/estimator_accuracy.py.
7. ``reduce_bucket_tensors``: the ZeRO optimizers' ``ipg_buckets``; bench/estimator_accuracy.py.
8. ``partitioned_gradients_engine_class`` (``PartitionedGradientsPipelineEngine``) and ``initialize_pipeline``:
   ZeRO-2 with pipeline stages. ``PipelineEngine.__init__``'s ZeRO assert, ``deepspeed.PipelineEngine`` as
   ``deepspeed.initialize`` reads it, the ``_exec_*`` instructions of the reductions, and
   ``DeepSpeedZeroOptimizer``'s per-backward epilogue, finalization, compact partition and its offsets;
   engine.py. ``gradient_tensors`` (where a ZeRO optimizer keeps gradients): bench/zero2_pipeline.py,
   tests/workers/pipeline_steps.py.
9. ``to_universal`` and ``load_universal``: resume on another layout. ``ds_to_universal.main`` and its options,
   ``engine._config.load_universal_checkpoint`` (set for one load), the ZeRO optimizer's ``param_names`` as its
   universal loader reads them; checkpoint.py. ``describe_for_universal`` uses public names only; engine.py.
   ``zero0_to_universal`` and ``load_universal`` under torch's optimizer (fp32 ZeRO-0, which DeepSpeed's tools do
   not convert): the universal files' format as ``load_hp_checkpoint_state`` and ``optimizer_state.pt``'s reader
   read it, and the engine state ``_load_checkpoint`` restores (scheduler, step counters); checkpoint.py.
10. ``skip_non_finite_steps``: ``DeepSpeedEngine._take_model_step`` reading ``optimizer.overflow`` after
   ``optimizer.step()``; the ZeRO-1/2, ZeRO-3 and bf16 optimizers' ``step`` marking a non-finite gradient norm as
   an overflow; engine.py.
11. ``pipeline_engine_class`` (``OneBackwardPipelineEngine``, the base of item 8's engine): one backward pass for a
   stage whose output is several tensors needing grad (a MoE model's router sums ride with the hidden states).
   ``PipelineEngine._exec_backward_pass`` reading ``pipe_buffers['outputs']`` and ``grad_layer``, and the
   per-output backward it replaces; engine.py.
12. ``use_autoep_output_recorders``: AutoEP's ``auto_ep_presets.base._install_instance_transformers_output_recorders``
   (replaced in its module) as ``_retarget_transformers_output_recorders_for_modules`` calls it; engine.py
   (``expert_parallel``). ``autoep_layers`` reads the ``AutoEPMoELayer`` class.
13. ``reduce_over_one_rank_is_nothing``: ``PipelineEngine._exec_reduce_grads`` in ``_INSTRUCTION_MAP`` (replaced in the
   engine's map at dp=1 without a ZeRO optimizer) reducing through ``allreduce_gradients`` or ``_bf16_reduce_grads``,
   and ``buffered_allreduce_fallback`` giving a parameter without a gradient zeros; engine.py.

Transformers and torch internals used elsewhere (they stay next to the code that needs them):

- hybrid_ds/models/resolve.py: ``hf_config._attn_implementation = ...``: a config built from scratch has
  None and the layers built from it are silently non-causal (PITFALLS 1).
- hybrid_ds/models/build.py: ``skeleton._init_weights(module)`` initializes a stage's modules as Hugging
  Face does and recomputes non-persistent buffers such as rotary ``inv_freq`` (PITFALLS 5);
  ``transformers.core_model_loading`` (``rename_source_key``, ``WeightRenaming``, ``WeightConverter``) with
  ``conversion_mapping.get_model_conversion_mapping`` maps checkpoint keys to parameter names as
  ``from_pretrained`` does; torch's ``module._non_persistent_buffers_set`` and ``module._modules`` (a
  shallow copy of a module without its children).
- hybrid_ds/models/generic/trace.py: replaces every ``masking_utils.create_*mask*`` helper in the modules
  that reach it, and sets ``skeleton._loss_function``, to record on the meta device what a model calls.
- bench/overhead.py: ``torch.utils._python_dispatch.TorchDispatchMode`` counts the aten ops of a step.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.pipe import PipelineModule

from hybrid_ds.errors import IncompatibleDeepSpeed

WRITTEN_FOR = "0.19.8"


def _require(internal: str, get: Callable[[], Any], why: str) -> Any:
    """``get()``, or the one-line error when it raises (a name or source is gone) or returns False or None."""
    try:
        value = get()
    except (AttributeError, KeyError, OSError, TypeError):
        value = None
    if value is None or value is False:
        raise IncompatibleDeepSpeed(f"hybrid_ds needs DeepSpeed {WRITTEN_FOR}'s {internal} "
                                    f"(found DeepSpeed {deepspeed.__version__} without it): {why}")
    return value


def _source_has(function: Any, *texts: str) -> bool:
    """Whether ``texts`` occur in this order in the source of ``function`` (OSError without a source)."""
    source, at = inspect.getsource(function), 0
    for text in texts:
        at = source.find(text, at)
        if at < 0:
            return False
    return True


# ---------------------------------------------------------------- 1. global gradient clipping


def check_clip_fp32_gradients() -> None:
    """The fp32 ZeRO-0 step of DeepSpeed 0.19.8 clips through ``clip_fp32_gradients``, which we replace.

    ``PipelineEngine._exec_optimizer_step`` -> ``DeepSpeedEngine._take_model_step`` ->
    ``self.clip_fp32_gradients()`` (when clipping is on and neither fp16, bf16 nor ZeRO is), whose norm
    covers this stage's parameters only (PITFALLS 2). The replacement reduces over ``engine.grid``'s
    pipeline group and reads the tie groups DeepSpeed records in ``PipelineModule.__init__``:
    ``tied_comms`` (key -> {"ranks": ...}) and ``tied_modules`` (key -> module).
    """
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    why = "without it the fp32 pipeline clips each stage by its own gradient norm (PITFALLS 2)"
    _require("PipelineEngine.clip_fp32_gradients", lambda: callable(PipelineEngine.clip_fp32_gradients), why)
    _require("PipelineEngine._exec_optimizer_step calling _take_model_step",
             lambda: _source_has(PipelineEngine._exec_optimizer_step, "self._take_model_step("), why)
    _require("PipelineEngine._take_model_step calling clip_fp32_gradients",
             lambda: _source_has(PipelineEngine._take_model_step, "self.clip_fp32_gradients()"), why)
    _require("PipelineModule.tied_modules and tied_comms[key]['ranks']",
             lambda: _source_has(PipelineModule.__init__, "self.tied_modules =", "self.tied_comms =")
             and _source_has(PipelineModule._index_tied_modules, "'ranks'"),
             "the global gradient norm counts a tied weight once")
    _require("PipelineEngine.grid.get_pipe_parallel_group",
             lambda: _source_has(PipelineEngine.__init__, "self.grid =")
             and callable(PipelineParallelGrid.get_pipe_parallel_group),
             "the global gradient norm is reduced over the pipeline group")


def use_global_clip_norm(engine: Any) -> None:
    """Make a PipelineEngine clip by the gradient norm over all stages instead of its own stage's.

    The norm is reduced over the pipeline group (data-parallel replicas hold the same averaged
    gradients), and a tied weight, present on the first and the last stage, counts once.
    """
    check_clip_fp32_gradients()
    engine.clip_fp32_gradients = types.MethodType(_clip_by_global_norm, engine)


def _clip_by_global_norm(engine: Any) -> None:
    from deepspeed.accelerator import get_accelerator

    grads = [p.grad for p in _owned_parameters(engine) if p.grad is not None]
    local = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
    local = local.to(torch.device(get_accelerator().current_device_name()))
    torch.distributed.all_reduce(local, group=engine.grid.get_pipe_parallel_group())
    total = local.sqrt()
    coef = torch.clamp(engine.gradient_clipping() / (total + 1e-6), max=1.0)
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))


def _owned_parameters(engine: Any) -> list[torch.nn.Parameter]:
    """This stage's parameters, leaving out tied copies that an earlier stage of the tie group owns."""
    module = engine.module
    skip = set()
    for key, comm in module.tied_comms.items():
        if engine.global_rank != min(comm["ranks"]):
            skip.update(id(p) for p in module.tied_modules[key].parameters())
    return [p for p in module.parameters() if id(p) not in skip]


# ---------------------------------------------------------------- 2. our stage boundaries


_PARTITION_WHY = "hybrid_ds gives DeepSpeed its stage boundaries (computed on the meta device)"


def check_partition_override() -> None:
    """DeepSpeed 0.19.8 lets a subclass choose the stages' layers by overriding ``_partition_layers``.

    ``PipelineModule.__init__`` sets ``global_rank`` and ``_topo``, then calls ``self._partition_layers()``,
    which sets ``self.parts`` (stage s holds specs ``parts[s]:parts[s + 1]``; ``stage_owner`` reads it to
    place tied weights) and this rank's slice with ``self._set_bounds(start, stop)``, before any layer is built.
    """
    _require("PipelineModule._partition_layers, called by __init__ after global_rank and _topo are set",
             lambda: callable(PipelineModule._partition_layers) and _source_has(
                 PipelineModule.__init__, "self.global_rank =", "self._topo =", "self._partition_layers("),
             _PARTITION_WHY)
    _require("PipelineModule._set_bounds", lambda: callable(PipelineModule._set_bounds), _PARTITION_WHY)
    _require("PipelineModule.parts, read by stage_owner",
             lambda: _source_has(PipelineModule.stage_owner, "self.parts["), _PARTITION_WHY)


class HybridPipelineModule(PipelineModule):
    """A PipelineModule whose stage ``s`` holds the layer specs ``parts[s]:parts[s + 1]``.

    hybrid_ds computes ``parts`` on the meta device; DeepSpeed's own ``partition_method="parameters"``
    would build every layer on every rank to count parameters (PITFALLS 4). The other arguments are
    ``PipelineModule``'s.
    """

    def __init__(self, layers: Any, parts: list[int], **kwargs: Any):
        check_partition_override()
        self.spec_parts = list(parts)  # before super().__init__, which calls _partition_layers
        super().__init__(layers=layers, **kwargs)
        lo, hi = self.spec_parts[self.stage_id:self.stage_id + 2]
        _require("PipelineModule._local_start and _local_stop, set by _set_bounds",
                 lambda: (self._local_start, self._local_stop) == (lo, hi), _PARTITION_WHY)

    def _partition_layers(self, method: str = "uniform") -> None:
        self.parts = self.spec_parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def get_tied_weights_and_groups(self) -> list[tuple[Any, Any]]:
        """DeepSpeed's, with trainable tied weights only: the engine sums each one's gradient over the stages that
        hold it, and a frozen one (LoRA's embedding) has none (bf16's optimizer would look for ``_hp_grad``)."""
        return [(weight, group) for weight, group in super().get_tied_weights_and_groups() if weight.requires_grad]


# ---------------------------------------------------------------- 3. no shared-memory comm op on CPU


def disable_shm_comm_op() -> None:
    """Keep DeepSpeed 0.19.8 from JIT-compiling its shared-memory all-reduce op at process-group start on CPU.

    ``deepspeed.comm.torch.build_shm_op`` compiles the accelerator's ``ShareMemCommBuilder`` op (minutes on a
    first run) unless ``deepspeed.ops.__compatible_ops__[builder.NAME]`` is false. Only
    ``inference_all_reduce`` uses it; training's collectives go through gloo.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    internal = "deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'], read by deepspeed.comm.torch.build_shm_op"
    why = "without it every CPU run first compiles the shared-memory comm op"
    _require(internal, lambda: _source_has(build_shm_op, "__compatible_ops__")
             and get_accelerator().create_op_builder("ShareMemCommBuilder").NAME == "deepspeed_shm_comm"
             and "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__, why)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ---------------------------------------------------------------- 4. per-layer checkpoint file names


def layer_checkpoint_file(folder: str | Path, index: int) -> Path:
    """The file in which DeepSpeed's ``save_checkpoint`` keeps layer spec ``index`` of a PipelineModule.

    DeepSpeed 0.19.8 names it in ``PipelineModule.ckpt_layer_path`` (``layer_NN-model_states.pt``, with a
    model-parallel rank hybrid_ds never has), a method of a built module; an export has no process group
    to build one, so the method runs on a stand-in holding the attributes it reads.
    """
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    stand_in = types.SimpleNamespace(_local_start=0, global_rank=0,
                                     _grid=types.SimpleNamespace(_topo=PipeDataParallelTopology(num_pp=1, num_dp=1)))
    return Path(_require("PipelineModule.ckpt_layer_path(ckpt_dir, local_layer_idx)",
                         lambda: PipelineModule.ckpt_layer_path(stand_in, str(folder), index),
                         "an export finds each layer's weights under DeepSpeed's file name"))


# ---------------------------------------------------------------- 5-7. used by bench/


def check_instruction_map() -> None:
    """DeepSpeed 0.19.8's ``PipelineEngine._exec_schedule`` runs each instruction through ``self._INSTRUCTION_MAP``.

    The class-level map holds instruction type -> function(engine, **kwargs). Wrapping an engine's
    ``_exec_*`` methods changes nothing: the map holds the class's functions, not the instance's methods.
    """
    from deepspeed.runtime.pipe.engine import PipelineEngine

    _require("PipelineEngine._INSTRUCTION_MAP, read by _exec_schedule",
             lambda: isinstance(PipelineEngine._INSTRUCTION_MAP, dict)
             and _source_has(PipelineEngine._exec_schedule, "self._INSTRUCTION_MAP["),
             "the benchmarks time and sample pipeline instructions through it")


def wrap_pipeline_instructions(engine: Any, wrap: Callable[[type, Callable], Callable]) -> bool:
    """Replace this PipelineEngine's handler ``fn`` of each instruction type ``kind`` by ``wrap(kind, fn)``.

    Returns False, changing nothing, for any other engine (the plain ZeRO-2/3 engine has no instructions).
    """
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if not isinstance(engine, PipelineEngine):
        return False
    check_instruction_map()
    engine._INSTRUCTION_MAP = {kind: wrap(kind, fn) for kind, fn in engine._INSTRUCTION_MAP.items()}
    return True


def forget_pipeline_grid() -> None:
    """Let a plain engine follow a PipelineEngine in one process.

    DeepSpeed 0.19.8's ``DeepSpeedEngine._configure_distributed_model`` keeps an engine's model-parallel unit
    (a PipelineEngine's grid) in the process-global ``deepspeed.utils.groups.mpu`` and never clears it; a
    later engine without one then crashes.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups

    _require("deepspeed.utils.groups.mpu, set by DeepSpeedEngine._configure_distributed_model",
             lambda: hasattr(groups, "mpu")
             and _source_has(DeepSpeedEngine._configure_distributed_model, "groups.mpu ="),
             "a plain engine after a PipelineEngine in one process needs it cleared")
    groups.mpu = None


def reduce_bucket_tensors(optimizer: Any) -> list[torch.Tensor]:
    """The tensors of a ZeRO optimizer's gradient reduce buckets; none for any other optimizer.

    DeepSpeed 0.19.8's ZeRO optimizers keep them in ``ipg_buckets`` (dtype -> bucket); a stage-1/2
    bucket's ``buffer`` is a list of tensors, a stage-3 bucket's a tensor or None.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
        return []
    buffers = _require(f"{type(optimizer).__name__}.ipg_buckets[dtype].buffer",
                       lambda: [b.buffer for b in optimizer.ipg_buckets.values()],
                       "the memory benchmark counts reduce buckets apart from model states")
    tensors = [t for buffer in buffers for t in (buffer if isinstance(buffer, list) else [buffer])]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------- 8. ZeRO-2 with pipeline stages


_ZERO2_WHY = "ZeRO-2 with pipeline.stages > 1 drives DeepSpeed's ZeRO-2 optimizer inside the pipeline schedule"


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
    - The compact partition: ``_use_compact_grad_partition_buffer(group)`` (replaced on the instance), consulted
      by the epilogue, the reduction (``average_tensor``) and the finalization; ``_get_compact_grad_partition_slice``
      and the offsets it reads, ``grad_start_offset`` and ``grad_partition_insertion_offset``
      ([group][partition][param id]), ``partition_size``, ``real_dp_process_group``, ``get_param_id``.
    """
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero

    _require("PipelineEngine.__init__'s single zero_optimization_stage() check",
             lambda: inspect.getsource(PipelineEngine.__init__).count("zero_optimization_stage(") == 1
             and _source_has(PipelineEngine.__init__, "super().__init__(", "zero_optimization_stage("), _ZERO2_WHY)
    _require("deepspeed.initialize building deepspeed.PipelineEngine",
             lambda: _source_has(deepspeed.initialize, "else PipelineEngine") and deepspeed.PipelineEngine is PipelineEngine,
             _ZERO2_WHY)
    _require("PipelineEngine._exec_backward_pass, _exec_reduce_tied_grads, _exec_reduce_grads in _INSTRUCTION_MAP",
             lambda: {PipelineEngine._exec_backward_pass, PipelineEngine._exec_reduce_tied_grads,
                      PipelineEngine._exec_reduce_grads} <= set(PipelineEngine._INSTRUCTION_MAP.values()), _ZERO2_WHY)
    _require("DeepSpeedZeroOptimizer.overlapping_partition_gradients_reduce_epilogue, "
             "finalize_gradient_accumulation_boundary and ready_for_gradients",
             lambda: callable(Zero.overlapping_partition_gradients_reduce_epilogue)
             and callable(Zero.finalize_gradient_accumulation_boundary)
             and _source_has(Zero.setup_buckets, "self.ready_for_gradients = True")
             and _source_has(Zero._release_ipg_buffers, "self.ready_for_gradients = False"), _ZERO2_WHY)
    _require("DeepSpeedZeroOptimizer._use_compact_grad_partition_buffer, read by the epilogue, average_tensor and "
             "finalize_gradient_accumulation_boundary",
             lambda: callable(Zero._use_compact_grad_partition_buffer)
             and all(_source_has(f, "self._use_compact_grad_partition_buffer(") for f in (
                 Zero.independent_gradient_partition_epilogue, Zero.finalize_gradient_accumulation_boundary,
                 Zero._get_compact_grad_partition_slice)) and _source_has(Zero.average_tensor,
                                                                         "self._get_compact_grad_partition_slice("),
             "between micro-batches each rank holds one flat partition of its stage's gradients")
    _require("DeepSpeedZeroOptimizer.reduce_independent_p_g_buckets_and_remove_grads holding an oversized gradient "
             "in extra_large_param_to_reduce for reduce_ipg_grads(comm_dtype=...)",
             lambda: _source_has(Zero.reduce_ready_partitions_and_remove_grads,
                                 "self.reduce_independent_p_g_buckets_and_remove_grads(param, i)")
             and _source_has(Zero.reduce_independent_p_g_buckets_and_remove_grads,
                             "self.extra_large_param_to_reduce[comm_dtype] = param")
             and _source_has(Zero.reduce_ipg_grads, "if comm_dtype in self.extra_large_param_to_reduce:")
             and callable(Zero.get_param_comm_dtype),
             "a stage's largest gradient is reduced before autograd builds the next one")
    _require("DeepSpeedZeroOptimizer.grad_start_offset, grad_partition_insertion_offset and partition_size, "
             "read by _build_compact_grad_partition_buffer",
             lambda: _source_has(Zero._build_compact_grad_partition_buffer, "self.partition_size[group_idx]",
                                 "self.grad_start_offset[group_idx][partition_id][param_id]",
                                 "self.grad_partition_insertion_offset[group_idx][partition_id][param_id]"),
             "the stages sharing a tied weight add up their partitions of its gradient")


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


def check_one_backward() -> None:
    """DeepSpeed 0.19.8's ``_exec_backward_pass`` takes a non-last stage's outputs from ``pipe_buffers['outputs']``
    and their gradients from ``grad_layer``, and runs ``out.backward(gradient=grad, retain_graph=...)`` once per
    floating output: with two outputs that depend on the whole stage (hidden states and a MoE model's router
    sums) autograd walks the stage's graph twice. Given one flat tensor it runs one ``backward``."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    _require("PipelineEngine._exec_backward_pass running one backward per output of pipe_buffers['outputs'] with "
             "the gradients in grad_layer",
             lambda: _source_has(PipelineEngine._exec_backward_pass, "outputs = self.pipe_buffers['outputs'][buffer_id]",
                                 "grad_tensors = self.grad_layer", "out.backward(gradient=grad, retain_graph=",
                                 "outputs.backward(gradient=grad_tensors)")
             and PipelineEngine._exec_backward_pass in PipelineEngine._INSTRUCTION_MAP.values(), _ONE_BACKWARD_WHY)


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
      them, and each rank takes its slice back: a transient full-size tensor once per step;
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
            part of it, keeps the whole gradient until the end of the backward pass."""
            bucket_param(param, i)
            if param.numel() > optimizer.reduce_bucket_size:
                optimizer.reduce_ipg_grads(comm_dtype=optimizer.get_param_comm_dtype(param))
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
        self._reduce_bucketed()
        for weight, group in self._tied:
            owned = _partition_slice(self.optimizer, weight, self._group_index[id(weight)])
            total = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
            if owned is not None:
                start, part = owned
                total[start:start + part.numel()] = part
            torch.distributed.all_reduce(total, group=group)
            if owned is not None:
                part.copy_(total[start:start + part.numel()])

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


def gradient_tensors(engine: Any) -> dict[str, list[torch.Tensor]]:
    """Every tensor that holds gradients on this rank, by where it lives, for the memory benchmarks.

    ``param.grad`` of the module's parameters; ``partition``: a ZeRO optimizer's accumulated and
    step-ready partitions (DeepSpeed 0.19.8: ``all_grad_tensors``, ``averaged_gradients``,
    ``grads_in_partition``, the fp32 partitions' ``.grad``); ``buckets``: its reduce buckets (``ipg_buckets``);
    ``offloaded``: ZeRO-Offload's ``accumulated_grads_in_cpu``. Tensors may share storage; :func:`storage_bytes` counts each storage once.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    found: dict[str, list[torch.Tensor]] = {"param.grad": [p.grad for p in engine.module.parameters()
                                                          if p.grad is not None]}
    optimizer = engine.optimizer
    found["buckets"] = reduce_bucket_tensors(optimizer)
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        def tensors(value: Any) -> list[torch.Tensor]:
            if isinstance(value, torch.Tensor):
                return [value]
            if isinstance(value, (list, tuple)):
                return [t for v in value for t in tensors(v)] + tensors(getattr(value, "flat_partition", None))
            if isinstance(value, dict):
                return [t for v in value.values() for t in tensors(v)]
            return []

        internal = "DeepSpeedZeroOptimizer.all_grad_tensors, averaged_gradients, single_partition_of_fp32_groups"
        _require(internal, lambda: all(hasattr(optimizer, name) for name in
                                       ("all_grad_tensors", "averaged_gradients", "single_partition_of_fp32_groups")),
                 "the memory benchmark counts ZeRO's gradient partitions")
        found["partition"] = (tensors(optimizer.all_grad_tensors) + tensors(optimizer.averaged_gradients)
                              + tensors(getattr(optimizer, "grads_in_partition", None))  # contiguous_gradients only
                              + tensors([p.grad for p in optimizer.single_partition_of_fp32_groups]))
        found["offloaded"] = tensors(getattr(optimizer, "accumulated_grads_in_cpu", {}))
    return found


def storage_bytes(tensors: list[torch.Tensor], exclude: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages under ``tensors`` (views of one buffer count once), less those of ``exclude``."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


# ---------------------------------------------------------------- 9. universal checkpoints (resume on another layout)

_UNIVERSAL_OPTIONS = ("--input_folder", "--output_folder", "--num_extract_workers", "--num_merge_workers",
                      "--keep_temp_folder", "--no_strict", "--inject_missing_state")


def check_universal_checkpoints() -> None:
    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.engine import DeepSpeedEngine

    _require("ds_to_universal.main(args) with the options of its parse_arguments()",
             lambda: callable(ds_to_universal.main) and _source_has(ds_to_universal.parse_arguments,
                                                                     *_UNIVERSAL_OPTIONS),
             "a checkpoint is converted to DeepSpeed's universal format in-process")
    _require("DeepSpeedEngine.load_universal_checkpoint() reading self._config.load_universal_checkpoint",
             lambda: _source_has(DeepSpeedEngine.load_universal_checkpoint, "self._config.load_universal_checkpoint"),
             "a universal checkpoint is loaded into an engine built without checkpoint.load_universal")
    _require("ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir finding zero/<self.param_names[lp]>",
             lambda: _source_has(ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir,
                                 "self.param_names[lp]"),
             "a universal checkpoint keyed by Hugging Face names loads into a PipelineModule's parameters")


def describe_for_universal(module: torch.nn.Module, replicated: list[str]) -> None:
    """What DeepSpeed's ``ds_to_universal`` needs to know of a module, saved with each checkpoint (public names):
    the format version, and the parameters every pipeline stage that holds them saves (``replicated``:
    regexes; tied weights), which it then reads from the first stage only."""
    from deepspeed.checkpoint.constants import (PIPELINE_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_INFO,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    setattr(module, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
                                                PIPELINE_REPLICATED_PARAMETER_PATTERNS: replicated})


def to_universal(folder: Path, out: Path) -> str:
    """DeepSpeed's ``ds_to_universal`` of one checkpoint folder into ``out`` (in this process, one worker);
    returns what it printed. Checkpoints saved before ``describe_for_universal`` get DeepSpeed's default info."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    check_universal_checkpoints()
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        ds_to_universal.main(args)
    return printed.getvalue()


def load_universal(engine: Any, folder: Path, names: dict[str, str]) -> Any:
    """Load the universal checkpoint ``folder`` into ``engine`` (ZeRO 1/2, or fp32 ZeRO-0 where the optimizer is
    torch's own: :func:`_load_universal_zero0`): weights, optimizer moments, scheduler.
    ``names`` maps the engine's parameter names to the names the folder keeps them under
    (``zero/<name>/``); DeepSpeed's loader looks them up through ``optimizer.param_names``, swapped for the call.
    Returns what ``load_checkpoint`` returns."""
    check_universal_checkpoints()
    engine = getattr(engine, "engine", engine)  # hybrid_ds.engine.PlainEngine wraps DeepSpeed's engine
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        return _load_universal_zero0(engine, folder, names)
    optimizer = engine.optimizer
    own, settings = optimizer.param_names, group_settings(optimizer.param_groups)
    config, flag = engine._config, engine._config.load_universal_checkpoint
    try:
        optimizer.param_names = {param: names.get(name, name) for param, name in own.items()}
        config.load_universal_checkpoint = True
        loaded = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    finally:
        optimizer.param_names = own
        config.load_universal_checkpoint = flag
    restore_group_settings(optimizer, torch.load(folder / "zero" / "optimizer_state.pt", weights_only=False), settings)
    return loaded


def group_settings(groups: list[dict]) -> list[dict]:
    """An optimizer's groups without their parameters: the hyperparameters (lr, betas, weight_decay, name ...)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in groups]


def restore_group_settings(optimizer: Any, saved: dict, own: list[dict]) -> None:
    """Give each of ``optimizer``'s groups the settings of the saved group of the same name (a universal
    folder's ``zero/optimizer_state.pt``), where DeepSpeed's loader copies them by position: a stage holding no
    parameter of a group (no matrix on a stage of only norm and tied embedding) has one group fewer, since
    DeepSpeed drops empty groups, and would take the no-decay group's settings from the decay group. A group
    the folder lacks keeps its own settings (``own``, from before the load) at the saved learning rate."""
    by_name = {group.get("name"): group for group in saved["param_groups"]}
    lr = saved["param_groups"][0].get("lr") if saved["param_groups"] else None
    for group, mine in zip(optimizer.param_groups, own):
        source = by_name.get(mine.get("name"))
        if source is None:
            source = {**mine, "lr": lr} if lr is not None else mine
        group.update({k: v for k, v in source.items() if k != "params"})
# ZeRO-0 (fp32: torch's optimizer) keeps whole per-parameter states, which DeepSpeed 0.19.8's ds_to_universal and
# universal loader do not read (they read ZeRO-1/2 partitions); hybrid_ds writes and loads the same files for it.

OPTIMIZER_NAMES = "hybrid_ds_optimizer_param_names"  # a ZeRO-0 checkpoint's client state: names in optimizer order


def optimizer_param_names(engine: Any) -> dict[str, list[list[str]]]:
    """``client_state`` for ``save_checkpoint``: under torch's own optimizer (fp32 ZeRO-0), the engine's parameter
    names in the order of each group's ``params`` (a torch optimizer's state is keyed by that position), so the
    checkpoint can be converted to the universal form; nothing under DeepSpeed's optimizers."""
    engine = getattr(engine, "engine", engine)
    if not isinstance(engine.optimizer, torch.optim.Optimizer):
        return {}
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return {OPTIMIZER_NAMES: [[names[id(p)] for p in group["params"]] for group in engine.optimizer.param_groups]}


def check_zero0_universal() -> None:
    from deepspeed.checkpoint import universal_checkpoint
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    why = "a ZeRO-0 checkpoint and a ZeRO-1/2 one resume into each other through the same universal files"
    _require("universal_checkpoint.load_hp_checkpoint_state reading zero/<name>/<state>.pt as {PARAM: tensor} "
             "and step.pt as the step",
             lambda: _source_has(universal_checkpoint.load_hp_checkpoint_state, 'if key == "step":',
                                 "ckpt_dict[PARAM]") and universal_checkpoint.PARAM == "param", why)
    _require("ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir reading zero/optimizer_state.pt's "
             "param_groups, and DeepSpeedZeroOptimizer._load_global_state its ds_version",
             lambda: _source_has(ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir, '"optimizer_state.pt"',
                                 "optim_sd['param_groups']")
             and _source_has(DeepSpeedZeroOptimizer._load_global_state, "sd.get(DS_VERSION"), why)
    _require("DeepSpeedEngine._load_checkpoint restoring lr_scheduler, global_steps, global_samples, skipped_steps",
             lambda: _source_has(DeepSpeedEngine._load_checkpoint,
                                 "self.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])",
                                 "self.global_steps = checkpoint['global_steps']", "self.global_samples = ",
                                 "self.skipped_steps = checkpoint['skipped_steps']"), why)


def zero0_to_universal(folder: Path, out: Path, weights: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    """Write into ``out`` the universal form of the fp32 ZeRO-0 pipeline checkpoint ``folder``: the files
    DeepSpeed's ``ds_to_universal`` writes for ZeRO-1/2. ``weights``: Hugging Face name -> the saved weight;
    ``names``: the engine's parameter names -> Hugging Face names. A tied weight, held by two stages with the same
    weight and moments, is written once."""
    check_zero0_universal()
    zero = out / "zero"
    zero.mkdir(parents=True)
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    groups: dict[Any, dict] = {}
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=False)
        optimizer = state.get("optimizer")
        if not isinstance(optimizer, dict) or OPTIMIZER_NAMES not in state:
            raise ValueError(f"{file.name} holds no torch optimizer state named by hybrid_ds (saved by an older "
                             "hybrid_ds, or in bf16/fp16)")
        for group, group_names in zip(optimizer["param_groups"], state[OPTIMIZER_NAMES]):
            for index, name in zip(group["params"], group_names):
                param_dir = zero / names.get(name, name)
                if param_dir.is_dir():
                    continue
                param_dir.mkdir()
                moments = dict(optimizer["state"].get(index, {}))
                if "step" in moments:
                    torch.save(moments.pop("step"), param_dir / "step.pt")
                for key, value in {"fp32": weights[names.get(name, name)], **moments}.items():
                    torch.save({"param": value.float(), "cat_dim": 0}, param_dir / f"{key}.pt")
        for group in group_settings(optimizer["param_groups"]):  # every stage's groups, by name (stages differ)
            groups.setdefault(group.get("name"), group)
        version = state["ds_version"]
        state["optimizer"] = None  # the moments are under zero/ now
        torch.save(state, out / file.name)
    torch.save({"param_groups": list(groups.values()), "ds_version": version}, zero / "optimizer_state.pt")


def _load_universal_zero0(engine: Any, folder: Path, names: dict[str, str]) -> tuple[str, dict]:
    """Load a universal folder into an engine stepping torch's optimizer (fp32 ZeRO-0): each parameter's weight
    and optimizer state from ``zero/<name>/``, the groups' hyperparameters, and the scheduler and step counters
    from a stage's model-states file (every stage saves the same), as DeepSpeed's ``_load_checkpoint`` restores."""
    check_zero0_universal()
    optimizer, zero = engine.optimizer, folder / "zero"
    settings = group_settings(optimizer.param_groups)
    own = {id(p): name for name, p in engine.module.named_parameters()}
    with torch.no_grad():
        for group in optimizer.param_groups:
            on_device = group.get("fused") or group.get("capturable")  # where torch's AdamW keeps its step
            for p in group["params"]:
                param_dir = zero / names.get(own[id(p)], own[id(p)])
                state = {f.stem: torch.load(f, weights_only=False)["param"].reshape(p.shape).to(p)
                         for f in param_dir.glob("*.pt") if f.stem != "step"}
                p.copy_(state.pop("fp32"))
                if (param_dir / "step.pt").is_file():
                    step = torch.load(param_dir / "step.pt", weights_only=False)
                    state["step"] = torch.as_tensor(step, dtype=torch.float32,
                                                    device=p.device if on_device else "cpu").clone()
                optimizer.state[p] = state
    restore_group_settings(optimizer, torch.load(zero / "optimizer_state.pt", weights_only=False), settings)
    model_states = sorted(folder.glob("mp_rank_*_model_states.pt"))[0]
    checkpoint = torch.load(model_states, map_location="cpu", weights_only=False)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    engine.global_steps = checkpoint["global_steps"]
    engine.global_samples = checkpoint.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = checkpoint["skipped_steps"]
    return str(model_states), {}


# ---------------------------------------------------------------- 10. skipping steps with non-finite gradients


_SKIP_WHY = "a step with inf or NaN gradients must leave parameters, optimizer state and learning rate unchanged"


def _skipping_optimizers() -> dict[type, str]:
    """DeepSpeed 0.19.8's optimizers that skip a step whose global gradient norm is not finite, in fp32 too (measured:
    parameters unchanged across a NaN step at ZeRO-1/2 and ZeRO-3), each with the test in its ``step`` that does it."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return {DeepSpeedZeroOptimizer: "is_invalid_grad_norm(scaled_global_grad_norm)",
            DeepSpeedZeroOptimizer_Stage3: "is_invalid_grad_norm(scaled_global_grad_norm)",
            BF16_Optimizer: "is_invalid_grad_norm(all_groups_norm)"}


def check_overflow_skip(optimizer: Any) -> None:
    """What skipping relies on: ``DeepSpeedEngine._take_model_step`` calls ``self.optimizer.step()``, then reads
    ``self.optimizer.overflow``: a skipped step leaves the LR scheduler alone, counts in ``skipped_steps`` and makes
    ``was_step_applied()`` false. DeepSpeed's own optimizers set ``overflow`` when the norm is not finite."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    _require("DeepSpeedEngine._take_model_step reading optimizer.overflow after optimizer.step()",
             lambda: _source_has(DeepSpeedEngine._take_model_step, "self.optimizer.step()", "self.optimizer.overflow",
                                 "self._step_applied = not overflow", "self.skipped_steps += 1")
             and callable(DeepSpeedEngine.was_step_applied), _SKIP_WHY)
    for kind, test in _skipping_optimizers().items():
        if isinstance(optimizer, kind):
            _require(f"{kind.__name__}.step setting overflow when {test}",
                     lambda kind=kind, test=test: _source_has(_undecorated(kind.step), test, "self.overflow = True"),
                     _SKIP_WHY)


def _undecorated(function: Callable) -> Callable:
    """``function`` without DeepSpeed's ``instrument_w_nvtx`` (ZeRO-3's ``step``), which keeps it in its closure and
    sets no ``__wrapped__``."""
    inner = [c.cell_contents for c in function.__closure__ or () if inspect.isfunction(c.cell_contents)]
    return inner[0] if inner else function


def skip_non_finite_steps(engine: Any) -> None:
    """Make every optimizer step whose gradients hold inf or NaN a skipped step, as DeepSpeed's loss scaler does.

    DeepSpeed's ZeRO-1/2, ZeRO-3 and bf16 optimizers do so already (:func:`_skipping_optimizers`); fp16's loss
    scaler too. fp32 at ZeRO-0 steps torch's optimizer directly and wrote NaN into every parameter (measured): its
    ``step`` first agrees over all ranks whether any gradient is non-finite and reports a skip through the same
    ``overflow`` attribute DeepSpeed's optimizers use.
    """
    optimizer = engine.optimizer
    check_overflow_skip(optimizer)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.overflow = False
        optimizer.step = _step_if_finite(optimizer, optimizer.step)


def _step_if_finite(optimizer: torch.optim.Optimizer, step: Callable) -> Callable:
    from deepspeed.accelerator import get_accelerator

    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step_if_finite(*args: Any, **kwargs: Any) -> Any:
        sums = [p.grad.detach().float().sum() for p in params if p.grad is not None]  # inf and NaN survive a sum
        local = torch.stack(sums).sum() if sums else torch.zeros(())
        bad = (~torch.isfinite(local)).to(torch.int32).reshape(1).to(get_accelerator().current_device_name())
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # stages hold different gradients
        optimizer.overflow = bool(bad.item())
        return None if optimizer.overflow else step(*args, **kwargs)

    return step_if_finite


# ---------------------------------------------------------------- 12. AutoEP with transformers 5.x


_AUTOEP_WHY = ("AutoEP re-targets the model's router-logit recorder to its own layers through transformers' "
               "output-capture registry, which transformers 5.x keys by class name with a one-argument get()")


def check_autoep_output_recorders() -> Any:
    """The AutoEP module whose registry helper we replace, after checking that its caller still calls it."""
    from deepspeed.module_inject.auto_ep_presets import base

    _require("auto_ep_presets.base._install_instance_transformers_output_recorders",
             lambda: callable(base._install_instance_transformers_output_recorders), _AUTOEP_WHY)
    _require("auto_ep_presets.base._retarget_transformers_output_recorders_for_modules calling it",
             lambda: _source_has(base._retarget_transformers_output_recorders_for_modules,
                                 "_install_instance_transformers_output_recorders("), _AUTOEP_WHY)
    return base


def use_autoep_output_recorders() -> None:
    """Let AutoEP install its router-logit recorders under transformers 5.x.

    DeepSpeed 0.19.8 saves the registry entries it overrides with ``registry.get(key, default)``; transformers
    5.24's ``_CanRecordRegistry.get(model)`` takes one argument, so ``deepspeed.initialize`` with an
    ``expert_parallel`` section died with "TypeError: _CanRecordRegistry.get() takes 2 positional arguments".
    The replacement does the same with the plain-dict methods, which both registries are."""
    base = check_autoep_output_recorders()
    base._install_instance_transformers_output_recorders = _install_output_recorders


def _install_output_recorders(model: torch.nn.Module, registry_entries: dict[str, dict[str, Any]],
                              output_capturing: Any, remove_output_capture_hooks: Callable) -> bool:
    install = getattr(output_capturing, "maybe_install_capturing_hooks", None)
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    if not callable(install) or not isinstance(registry, dict):
        return False
    remove_output_capture_hooks(model)
    for module in model.modules():
        if hasattr(module, "_output_capturing_hooks_installed"):
            module._output_capturing_hooks_installed = False
    model._output_capturing_hooks_installed = False
    missing = object()
    saved = {key: dict.get(registry, key, missing) for key in registry_entries}
    try:
        dict.update(registry, registry_entries)
        install(model)
    finally:  # the hooks are installed; the class-wide entries go back to what they were
        for key, entry in saved.items():
            if entry is missing:
                dict.pop(registry, key, None)
            else:
                dict.__setitem__(registry, key, entry)
    return True


def autoep_layers(module: torch.nn.Module) -> int:
    """How many MoE layers AutoEP replaced in ``module`` (0: it found none it knows)."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return sum(isinstance(m, AutoEPMoELayer) for m in module.modules())


def autoep_presets() -> list[str]:
    """The model types AutoEP detects MoE layers of by itself (its ``preset_model`` names)."""
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

    return sorted(PRESET_MODELS)


# ---------------------------------------------------------------- 13. no data-parallel reduction over one rank


_ONE_RANK_WHY = "at data-parallel size 1 the gradient reduction is an average over one rank, skipped"


def check_reduce_grads() -> None:
    """DeepSpeed 0.19.8's ``ReduceGrads`` instruction runs ``_exec_reduce_grads``: the data-parallel reduction only
    (``allreduce_gradients``, or ``_bf16_reduce_grads`` for the BF16_Optimizer); tied weights are reduced by
    ``_exec_reduce_tied_grads`` before it. Without a ZeRO optimizer both reach ``buffered_allreduce_fallback``, which
    takes the BF16_Optimizer's own gradients (``get_grads_for_reduction``) or else the module's, giving a parameter
    without a gradient zeros (``_get_gradients_for_reduction``), then averages them over the data-parallel group."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    _require("PipelineEngine._INSTRUCTION_MAP[ReduceGrads] = _exec_reduce_grads, calling allreduce_gradients or "
             "_bf16_reduce_grads",
             lambda: PipelineEngine._INSTRUCTION_MAP.get(schedule.ReduceGrads) is PipelineEngine._exec_reduce_grads
             and _source_has(PipelineEngine._exec_reduce_grads, "self._bf16_reduce_grads()",
                             "self.allreduce_gradients(")
             and _source_has(PipelineEngine._bf16_reduce_grads, "self.buffered_allreduce_fallback("), _ONE_RANK_WHY)
    _require("DeepSpeedEngine.buffered_allreduce_fallback reading get_grads_for_reduction, else "
             "_get_gradients_for_reduction giving missing gradients zeros",
             lambda: _source_has(DeepSpeedEngine.buffered_allreduce_fallback, "get_grads_for_reduction",
                                 "self._get_gradients_for_reduction()")
             and _source_has(DeepSpeedEngine._get_gradients_for_reduction, "if param.grad is None:",
                             "param.grad = torch.zeros("), _ONE_RANK_WHY)


def reduce_over_one_rank_is_nothing(engine: Any) -> bool:
    """At data-parallel size 1 without a ZeRO optimizer, replace the engine's data-parallel gradient reduction by
    what is left of it there: zeros for a parameter without a gradient (the optimizer then steps it as DeepSpeed's
    reduction made it do). DeepSpeed flattens every gradient into buckets, all-reduces over a group of one and
    copies back (measured: bench/dp1_zero.py). Returns whether it did; a ZeRO optimizer (ZeRO-1/2 at dp=1 run as
    ZeRO-0 in fp32, model_state.zero_stage_to_run) and dp > 1 keep DeepSpeed's reduction."""
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    check_reduce_grads()
    check_instruction_map()
    if engine.grid.get_data_parallel_world_size() != 1 or isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
        return False
    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, schedule.ReduceGrads: _zeros_for_missing_gradients}
    return True


def _zeros_for_missing_gradients(engine: Any) -> None:
    if hasattr(engine.optimizer, "get_grads_for_reduction"):  # the BF16_Optimizer holds its own fp32 gradients
        return
    for param in engine.module.parameters():
        if param.requires_grad and param.numel() and param.grad is None:
            param.grad = torch.zeros_like(param)
