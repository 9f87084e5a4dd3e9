"""Another layout resumes through DeepSpeed's universal form of a checkpoint, each parameter kept under its Hugging Face
name: written once beside the checkpoint (``step_N/universal/``, aside and renamed), loaded by every rank.

ZeRO-1/2 checkpoints convert with DeepSpeed's ``ds_to_universal``; fp32 ZeRO-0 ones with hybrid_ds's own writer
(:mod:`hybrid_ds.runtime.checkpoint.zero0`), into the same files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from hybrid_ds.config import load_config_dict
from hybrid_ds.errors import UserError, first_line
from hybrid_ds.runtime.checkpoint.files import (COMPLETE, RUN_CONFIG, STATE, UNIVERSAL, atomic_write, check_complete,
                                                resolve_checkpoint)
from hybrid_ds.runtime.checkpoint.names import pipeline_names, saved_weights
from hybrid_ds.runtime.checkpoint.zero0 import (group_settings, load_universal_zero0, restore_group_settings,
                                                zero0_to_universal)
from hybrid_ds.runtime.plan import weights_plan
from hybrid_ds.seam import universal as deepspeed_universal


def write_universal(folder: Path, plan: Any) -> Path:
    """``folder/universal``: DeepSpeed's universal form of a ZeRO-1/2 checkpoint, keyed by Hugging Face names.

    ``plan`` is any plan of the same model, on either engine (a PipelineModule's parameter names depend on
    neither its stages nor its boundaries). Written aside and renamed, so a conversion cut short is never used.
    """
    check_complete(folder)
    out = folder / UNIVERSAL
    tmp = folder / f".{UNIVERSAL}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    state = json.loads((folder / STATE).read_text())
    layout = state.get("layout") or {}
    try:
        if layout.get("zero") == 0:  # fp32 ZeRO-0: whole per-parameter states, which DeepSpeed does not convert
            zero0_to_universal(folder, tmp / "step", saved_weights(folder, plan), pipeline_names(plan))
        else:
            deepspeed_universal.to_universal(folder, tmp / "step")
    except Exception as err:  # ds_to_universal asserts and raises many types on a checkpoint it cannot read
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError("CHECKPOINT", f"{folder} cannot be converted to a universal checkpoint: "
                                      f"{first_line(err)}") from None
    zero = tmp / "step" / "zero"
    if layout.get("engine", "pipeline") == "pipeline" and layout.get("zero") != 0:  # PipelineModule -> HF names
        for source, name in pipeline_names(plan).items():
            if (zero / source).is_dir():
                os.replace(zero / source, zero / name)
    atomic_write(tmp / "step" / COMPLETE, state.get("id", ""))  # which checkpoint this was made from
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp / "step", out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def universal_is_current(folder: Path) -> bool:
    """Whether ``folder/universal`` is complete and was converted from this very checkpoint (the id its state holds;
    checkpoints saved before ids were recorded match an empty one)."""
    marker = folder / UNIVERSAL / COMPLETE
    return marker.is_file() and marker.read_text() == json.loads((folder / STATE).read_text()).get("id", "")


def write_universal_of(checkpoint: str | Path) -> Path:
    """``hybrid-ds convert-checkpoint``: the universal form of a save_dir's latest checkpoint or of one step folder."""
    folder = resolve_checkpoint(checkpoint)
    cfg = load_config_dict(json.loads((folder.parent / RUN_CONFIG).read_text()))
    layout = json.loads((folder / STATE).read_text()).get("layout") or {"zero": cfg.zero_stage}
    if layout["zero"] not in (0, 1, 2):
        raise UserError("CHECKPOINT", f"{folder} was saved with zero_optimization.stage {layout['zero']}; "
                                      "universal checkpoints are made of ZeRO-0/1/2 optimizer states")
    return write_universal(folder, weights_plan(cfg))


def load_universal(engine: Any, folder: Path, names: dict[str, str]) -> Any:
    """Load the universal checkpoint ``folder`` into ``engine`` (ZeRO 1/2 through DeepSpeed's loader, or fp32 ZeRO-0
    where the optimizer is torch's own: :func:`~hybrid_ds.runtime.checkpoint.zero0.load_universal_zero0`): weights,
    optimizer moments, scheduler, and each group's settings by name (:func:`restore_group_settings`: DeepSpeed's
    loader copies them by position). ``names`` maps the engine's parameter names to the folder's. Returns what
    ``load_checkpoint`` returns."""
    engine = getattr(engine, "engine", engine)  # hybrid_ds.runtime.engine.PlainEngine wraps DeepSpeed's engine
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        return load_universal_zero0(engine, folder, names)
    settings = group_settings(engine.optimizer.param_groups)
    loaded = deepspeed_universal.load_universal(engine, folder, names)
    restore_group_settings(engine.optimizer, torch.load(folder / "zero" / "optimizer_state.pt", weights_only=False),
                           settings)
    return loaded
