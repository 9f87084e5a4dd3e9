"""DeepSpeed's universal checkpoints: ``ds_to_universal`` run in-process, ``load_universal_checkpoint`` into an engine
built without it, the module info ``ds_to_universal`` reads, and the file format (``zero/<name>/<state>.pt``,
``optimizer_state.pt``, the engine state ``_load_checkpoint`` restores) that hybrid_ds's own ZeRO-0 writer follows
(hybrid_ds.runtime.checkpoint.zero0).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint import universal_checkpoint
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from hybrid_ds.seam.compat import code_has, require, requirement


_UNIVERSAL_OPTIONS = ("--input_folder", "--output_folder", "--num_extract_workers", "--num_merge_workers",
                      "--keep_temp_folder", "--no_strict", "--inject_missing_state")


def _ds_to_universal() -> Any:
    """The module (``deepspeed.checkpoint.ds_to_universal``), looked up when a check runs."""
    return importlib.import_module("deepspeed.checkpoint.ds_to_universal")


CONVERTER = requirement(
    "universal.ds_to_universal", "ds_to_universal.main(args) with the options of its parse_arguments()",
    lambda: callable(_ds_to_universal().main)
    and code_has(_ds_to_universal().parse_arguments, *(f"parser.add_argument({option!r}, ...)"
                                                       for option in _UNIVERSAL_OPTIONS)),
    "a checkpoint is converted to DeepSpeed's universal format in-process")
LOAD_FLAG = requirement(
    "universal.load_flag", "DeepSpeedEngine.load_universal_checkpoint() reading self._config.load_universal_checkpoint",
    lambda: code_has(DeepSpeedEngine.load_universal_checkpoint, "return self._config.load_universal_checkpoint"),
    "a universal checkpoint is loaded into an engine built without checkpoint.load_universal")
PARAM_NAMES = requirement(
    "universal.param_names", "ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir finding "
    "zero/<self.param_names[lp]>",
    lambda: code_has(ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir,
                     "os.path.join(checkpoint_dir, self.param_names[lp])"),
    "a universal checkpoint keyed by Hugging Face names loads into a PipelineModule's parameters")


def check_universal_checkpoints() -> None:
    """DeepSpeed's converter, its loader's flag, and the parameter names its loader reads."""
    require(CONVERTER, LOAD_FLAG, PARAM_NAMES)


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
    """Load the universal checkpoint ``folder`` into a DeepSpeed engine with a ZeRO-1/2 optimizer through DeepSpeed's own
    loader: weights, optimizer moments, scheduler. ``names`` maps the engine's parameter names to the names the folder
    keeps them under (``zero/<name>/``); DeepSpeed's loader looks them up through ``optimizer.param_names``, swapped for
    the call. Returns what ``load_checkpoint`` returns. (fp32 ZeRO-0 and each group's settings:
    hybrid_ds.runtime.checkpoint.universal.)"""
    check_universal_checkpoints()
    optimizer = engine.optimizer
    own = optimizer.param_names
    config, flag = engine._config, engine._config.load_universal_checkpoint
    try:
        optimizer.param_names = {param: names.get(name, name) for param, name in own.items()}
        config.load_universal_checkpoint = True
        return engine.load_checkpoint(str(folder.parent), tag=folder.name)
    finally:
        optimizer.param_names = own
        config.load_universal_checkpoint = flag


_ZERO0_WHY = "a ZeRO-0 checkpoint and a ZeRO-1/2 one resume into each other through the same universal files"
STATE_FILES = requirement(
    "zero0.state_files", "universal_checkpoint.load_hp_checkpoint_state reading zero/<name>/<state>.pt as "
    "{PARAM: tensor} and step.pt as the step",
    lambda: code_has(universal_checkpoint.load_hp_checkpoint_state, 'key == "step"', "ckpt_dict[PARAM]")
    and universal_checkpoint.PARAM == "param", _ZERO0_WHY)
OPTIMIZER_STATE = requirement(
    "zero0.optimizer_state", "ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir reading "
    "zero/optimizer_state.pt's param_groups, and DeepSpeedZeroOptimizer._load_global_state its ds_version",
    lambda: code_has(ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir,
                     'os.path.join(checkpoint_dir, "optimizer_state.pt")', "optim_sd['param_groups']")
    and code_has(DeepSpeedZeroOptimizer._load_global_state, "sd.get(DS_VERSION, ...)"), _ZERO0_WHY)
ENGINE_STATE = requirement(
    "zero0.engine_state", "DeepSpeedEngine._load_checkpoint restoring lr_scheduler, global_steps, global_samples, "
    "skipped_steps",
    lambda: code_has(DeepSpeedEngine._load_checkpoint,
                     "self.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])", "self.global_steps = checkpoint['global_steps']", "self.global_samples = ...",
                     "self.skipped_steps = checkpoint['skipped_steps']"), _ZERO0_WHY)


def check_zero0_universal() -> None:
    """The universal files hybrid_ds's ZeRO-0 writer follows, and the engine state DeepSpeed's loader restores."""
    require(STATE_FILES, OPTIMIZER_STATE, ENGINE_STATE)
