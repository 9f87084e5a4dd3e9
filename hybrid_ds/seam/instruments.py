"""Instrumentation for bench/ and the test workers: where an engine keeps gradients and buckets, how many bytes they
hold, and hooks around the pipeline's instructions. Nothing a training run calls.

- :func:`wrap_pipeline_instructions`: ``PipelineEngine._INSTRUCTION_MAP`` as ``_exec_schedule`` reads it.
- :func:`forget_pipeline_grid`: ``deepspeed.utils.groups.mpu``, which a PipelineEngine leaves set.
- :func:`reduce_bucket_tensors` and :func:`gradient_tensors`: the ZeRO optimizers' ``ipg_buckets`` and gradient
  partitions; :func:`storage_bytes` counts each storage once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hybrid_ds.seam.compat import code_has, demand, require, requirement
from hybrid_ds.seam.engines import check_instruction_map


def _mpu_is_set_by_the_engine() -> bool:
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups

    return hasattr(groups, "mpu") and code_has(DeepSpeedEngine._configure_distributed_model, "groups.mpu = ...")


GLOBAL_MPU = requirement(
    "instruments.mpu", "deepspeed.utils.groups.mpu, set by DeepSpeedEngine._configure_distributed_model",
    _mpu_is_set_by_the_engine, "a plain engine after a PipelineEngine in one process needs it cleared")


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
    from deepspeed.utils import groups

    require(GLOBAL_MPU)
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
    # Needs the optimizer (stage 1/2 or 3): checked here, not registered; so is gradient_tensors' check.
    buffers = demand(f"{type(optimizer).__name__}.ipg_buckets[dtype].buffer",
                       lambda: [b.buffer for b in optimizer.ipg_buckets.values()],
                       "the memory benchmark counts reduce buckets apart from model states")
    tensors = [t for buffer in buffers for t in (buffer if isinstance(buffer, list) else [buffer])]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


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
        demand(internal, lambda: all(hasattr(optimizer, name) for name in
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
