"""Resuming a run from a checkpoint: at the layout it was saved at through DeepSpeed's ``load_checkpoint`` (and each
rank's RNG), at another through the universal form."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hybrid_ds.errors import UserError, first_line
from hybrid_ds.runtime.checkpoint.files import STATE, UNIVERSAL, describe_layout, layout_of, set_rng_state
from hybrid_ds.runtime.checkpoint.names import universal_names
from hybrid_ds.runtime.checkpoint.universal import load_universal, universal_is_current, write_universal
from hybrid_ds.runtime.engine import raise_shared


def resume(engine: Any, folder: Path, plan: Any = None) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG; returns the saved step and data position.

    A checkpoint saved at another layout than ``plan``'s is loaded through its universal form (no RNG:
    the ranks' roles differ).
    """
    state = json.loads((folder / STATE).read_text())
    saved = state.get("layout")
    if plan is not None and saved is not None and saved != layout_of(plan):
        _resume_on_new_layout(engine, folder, plan, saved)
        return state
    try:
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                              load_module_strict=not state.get("without_frozen", False))
    except Exception as err:  # torch.load and DeepSpeed raise many types for a damaged file
        raise UserError("train.resume", f"checkpoint {folder} cannot be loaded: {first_line(err)}") from None
    if load_path is None:
        raise UserError("train.resume", f"checkpoint {folder} cannot be loaded (DeepSpeed found no model states)")
    rng = folder / f"rng-rank{torch.distributed.get_rank()}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return state


def _resume_on_new_layout(engine: Any, folder: Path, plan: Any, saved: dict) -> None:
    now = layout_of(plan)
    if saved["zero"] not in (0, 1, 2) or now["zero"] not in (0, 1, 2):
        # DeepSpeed 0.19.8 writes ZeRO-3's universal form differently (flat tensors, no step, no ds_version) from
        # what its ZeRO-1/2 loader reads
        raise UserError("train.resume", f"checkpoint {folder} was saved at {describe_layout(saved)} and this run is "
                                        f"{describe_layout(now)}: a change of layout needs zero_optimization.stage "
                                        f"0, 1 or 2 on both sides (universal checkpoints); resume at "
                                        f"{describe_layout(saved)}")
    converted_on_rank_0(folder, lambda: write_universal(folder, plan))
    try:
        load_path, _ = load_universal(engine, folder / UNIVERSAL, universal_names(plan))
    except Exception as err:
        raise UserError("train.resume", f"{folder / UNIVERSAL} cannot be loaded at {describe_layout(now)}: "
                                        f"{first_line(err)}") from None
    if load_path is None:
        raise UserError("train.resume", f"{folder / UNIVERSAL} cannot be loaded (DeepSpeed found no model states)")


def converted_on_rank_0(folder: Path, convert: Callable[[], Any]) -> None:
    """The first rank runs ``convert`` unless ``folder`` has a current universal form; the others wait for it however
    long it takes (a large checkpoint's conversion outlasts the process group's timeout), then meet its mistake as
    their own. All ranks call this."""
    error = None
    if torch.distributed.get_rank() == 0 and not universal_is_current(folder):
        try:
            convert()
        except UserError as err:
            error = err
    raise_shared(error, patient=True)
