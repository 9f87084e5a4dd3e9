"""Fixes of the environment DeepSpeed 0.19.8 starts in: no shared-memory comm op compiled on CPU, and a
``TORCH_CUDA_ARCH_LIST`` its JIT builder can parse."""

from __future__ import annotations

import importlib
import os
import re

from hybrid_ds.seam.compat import code_has, require, requirement


# ---------------------------------------------------------------- 3. no shared-memory comm op on CPU


def _shm_op_is_off_by_key() -> bool:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    # (the attribute deepspeed.comm.torch is the torch package, not the module)
    build_shm_op = importlib.import_module("deepspeed.comm.torch").build_shm_op
    return (code_has(build_shm_op, "deepspeed.ops.__compatible_ops__.get(builder.NAME, ...)")
            and get_accelerator().create_op_builder("ShareMemCommBuilder").NAME == "deepspeed_shm_comm"
            and "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__)


SHM_OP = requirement(
    "environment.shm_comm_op",
    "deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'], read by deepspeed.comm.torch.build_shm_op",
    _shm_op_is_off_by_key, "without it every CPU run first compiles the shared-memory comm op")


def disable_shm_comm_op() -> None:
    """Keep DeepSpeed 0.19.8 from JIT-compiling its shared-memory all-reduce op at process-group start on CPU.

    ``deepspeed.comm.torch.build_shm_op`` compiles the accelerator's ``ShareMemCommBuilder`` op (minutes on a
    first run) unless ``deepspeed.ops.__compatible_ops__[builder.NAME]`` is false. Only
    ``inference_all_reduce`` uses it; training's collectives go through gloo.
    """
    import deepspeed.ops

    require(SHM_OP)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def arch_list_deepspeed_can_parse() -> None:
    """Drop the arch-specific suffixes of ``TORCH_CUDA_ARCH_LIST`` ("9.0a" -> "9.0") for this process.

    PyTorch accepts "9.0a" (Hopper's arch-specific features), and CUDA images set it; DeepSpeed 0.19's JIT
    builder reads each entry as numbers and dies with "invalid literal for int(): '0a'" when it compiles
    FusedAdam at the first step. Its fused ops use none of those features.
    """
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    plain = re.sub(r"(\d+\.\d+)[a-zA-Z]+", r"\1", value)
    if plain != value:
        os.environ["TORCH_CUDA_ARCH_LIST"] = plain
