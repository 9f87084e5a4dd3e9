"""Numerics DeepSpeed 0.19.8 gets wrong or wasteful on the pipeline engine, each replaced after checking what it replaces.

- :func:`use_global_clip_norm`: ``PipelineEngine.clip_fp32_gradients`` (replaced on the instance) and the step path
  that calls it, ``PipelineModule.tied_comms`` / ``tied_modules``, ``engine.grid``: the fp32 pipeline clipped each
  stage by its own gradient norm (PITFALLS 2).
- :func:`skip_non_finite_steps`: ``DeepSpeedEngine._take_model_step`` reading ``optimizer.overflow`` after
  ``optimizer.step()``; the ZeRO-1/2, ZeRO-3 and bf16 optimizers' ``step`` marking a non-finite gradient norm as an
  overflow; fp32 ZeRO-0 steps torch's optimizer, which wrote NaN into every parameter.
- :func:`reduce_over_one_rank_is_nothing`: ``PipelineEngine._exec_reduce_grads`` in ``_INSTRUCTION_MAP`` (replaced in
  the engine's map at dp=1 without a ZeRO optimizer) and ``buffered_allreduce_fallback`` giving a parameter without a
  gradient zeros.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.topology import PipelineParallelGrid

from hybrid_ds.seam.compat import Requirement, code_has, require, requirement, undecorated
from hybrid_ds.seam.engines import check_instruction_map

_CLIP_WHY = "without it the fp32 pipeline clips each stage by its own gradient norm (PITFALLS 2)"
CLIP = requirement("clip.clip_fp32_gradients", "PipelineEngine.clip_fp32_gradients",
                   lambda: callable(PipelineEngine.clip_fp32_gradients), _CLIP_WHY)
CLIP_STEP = requirement("clip.exec_optimizer_step", "PipelineEngine._exec_optimizer_step calling _take_model_step",
                        lambda: code_has(PipelineEngine._exec_optimizer_step, "self._take_model_step(...)"), _CLIP_WHY)
CLIP_CALL = requirement("clip.take_model_step", "PipelineEngine._take_model_step calling clip_fp32_gradients",
                        lambda: code_has(PipelineEngine._take_model_step, "self.clip_fp32_gradients()"), _CLIP_WHY)
CLIP_TIES = requirement(
    "clip.tied_comms", "PipelineModule.tied_modules and tied_comms[key]['ranks']",
    lambda: code_has(PipelineModule.__init__, "self.tied_modules = ...", "self.tied_comms = ...")
    and code_has(PipelineModule._index_tied_modules, "{'ranks': ..., **...}"),
    "the global gradient norm counts a tied weight once")
CLIP_GRID = requirement(
    "clip.grid", "PipelineEngine.grid.get_pipe_parallel_group",
    lambda: code_has(PipelineEngine.__init__, "self.grid = ...")
    and callable(PipelineParallelGrid.get_pipe_parallel_group),
    "the global gradient norm is reduced over the pipeline group")


def check_clip_fp32_gradients() -> None:
    """The fp32 ZeRO-0 step of DeepSpeed 0.19.8 clips through ``clip_fp32_gradients``, which we replace.

    ``PipelineEngine._exec_optimizer_step`` -> ``DeepSpeedEngine._take_model_step`` ->
    ``self.clip_fp32_gradients()`` (when clipping is on and neither fp16, bf16 nor ZeRO is), whose norm
    covers this stage's parameters only (PITFALLS 2). The replacement reduces over ``engine.grid``'s
    pipeline group and reads the tie groups DeepSpeed records in ``PipelineModule.__init__``:
    ``tied_comms`` (key -> {"ranks": ...}) and ``tied_modules`` (key -> module).
    """
    require(CLIP, CLIP_STEP, CLIP_CALL, CLIP_TIES, CLIP_GRID)


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


# ---------------------------------------------------------------- 10. skipping steps with non-finite gradients


_SKIP_WHY = "a step with inf or NaN gradients must leave parameters, optimizer state and learning rate unchanged"


SKIP_STEP = requirement(
    "skip.take_model_step", "DeepSpeedEngine._take_model_step reading optimizer.overflow after optimizer.step()",
    lambda: code_has(DeepSpeedEngine._take_model_step, "self.optimizer.step()", "self.optimizer.overflow",
                     "self._step_applied = not overflow", "self.skipped_steps += 1")
    and callable(DeepSpeedEngine.was_step_applied), _SKIP_WHY)

# DeepSpeed 0.19.8's optimizers that skip a step whose global gradient norm is not finite, in fp32 too (measured:
# parameters unchanged across a NaN step at ZeRO-1/2 and ZeRO-3): (module, class, the test in its ``step``).
_SKIPPING = (("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "scaled_global_grad_norm"),
             ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "scaled_global_grad_norm"),
             ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "all_groups_norm"))


def _skip_requirement(module: str, name: str, norm: str) -> Requirement:
    return requirement(f"skip.{name}", f"{name}.step setting overflow when is_invalid_grad_norm({norm})",
                       lambda: code_has(undecorated(getattr(importlib.import_module(module), name).step),
                                        f"is_invalid_grad_norm({norm})", "self.overflow = True"), _SKIP_WHY)


_SKIP_REQUIREMENTS = {(module, name): _skip_requirement(module, name, norm) for module, name, norm in _SKIPPING}


def _skipping_optimizers() -> dict[type, Requirement]:
    """The optimizer classes that skip a non-finite step themselves, each with what its ``step`` must do."""
    return {getattr(importlib.import_module(module), name): found
            for (module, name), found in _SKIP_REQUIREMENTS.items()}


def check_overflow_skip(optimizer: Any) -> None:
    """What skipping relies on: ``DeepSpeedEngine._take_model_step`` calls ``self.optimizer.step()``, then reads
    ``self.optimizer.overflow``: a skipped step leaves the LR scheduler alone, counts in ``skipped_steps`` and makes
    ``was_step_applied()`` false. DeepSpeed's own optimizers set ``overflow`` when the norm is not finite (the check of
    ``optimizer``'s class, among :func:`_skipping_optimizers`)."""
    require(SKIP_STEP)
    require(*(found for kind, found in _skipping_optimizers().items() if isinstance(optimizer, kind)))


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


# ---------------------------------------------------------------- 13. no data-parallel reduction over one rank


_ONE_RANK_WHY = "at data-parallel size 1 the gradient reduction is an average over one rank, skipped"


REDUCE_GRADS = requirement(
    "reduce.exec_reduce_grads", "PipelineEngine._INSTRUCTION_MAP[ReduceGrads] = _exec_reduce_grads, calling "
    "allreduce_gradients or _bf16_reduce_grads",
    lambda: PipelineEngine._INSTRUCTION_MAP.get(schedule.ReduceGrads) is PipelineEngine._exec_reduce_grads
    and code_has(PipelineEngine._exec_reduce_grads, "self._bf16_reduce_grads()", "self.allreduce_gradients(...)")
    and code_has(PipelineEngine._bf16_reduce_grads, "self.buffered_allreduce_fallback(...)"), _ONE_RANK_WHY)
REDUCE_FALLBACK = requirement(
    "reduce.fallback", "DeepSpeedEngine.buffered_allreduce_fallback reading get_grads_for_reduction, else "
    "_get_gradients_for_reduction giving missing gradients zeros",
    lambda: code_has(DeepSpeedEngine.buffered_allreduce_fallback, "self.optimizer.get_grads_for_reduction()",
                     "self._get_gradients_for_reduction()")
    and code_has(DeepSpeedEngine._get_gradients_for_reduction, "param.grad is None", "param.grad = torch.zeros(...)"),
    _ONE_RANK_WHY)


def check_reduce_grads() -> None:
    """DeepSpeed 0.19.8's ``ReduceGrads`` instruction runs ``_exec_reduce_grads``: the data-parallel reduction only
    (``allreduce_gradients``, or ``_bf16_reduce_grads`` for the BF16_Optimizer); tied weights are reduced by
    ``_exec_reduce_tied_grads`` before it. Without a ZeRO optimizer both reach ``buffered_allreduce_fallback``, which
    takes the BF16_Optimizer's own gradients (``get_grads_for_reduction``) or else the module's, giving a parameter
    without a gradient zeros (``_get_gradients_for_reduction``), then averages them over the data-parallel group."""
    require(REDUCE_GRADS, REDUCE_FALLBACK)


def reduce_over_one_rank_is_nothing(engine: Any) -> bool:
    """At data-parallel size 1 without a ZeRO optimizer, replace the engine's data-parallel gradient reduction by
    what is left of it there: zeros for a parameter without a gradient (the optimizer then steps it as DeepSpeed's
    reduction made it do). DeepSpeed flattens every gradient into buckets, all-reduces over a group of one and
    copies back (measured: bench/dp1_zero.py). Returns whether it did; a ZeRO optimizer (ZeRO-1/2 at dp=1 run as
    ZeRO-0 in fp32, config.deepspeed.zero_stage_to_run) and dp > 1 keep DeepSpeed's reduction."""
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
