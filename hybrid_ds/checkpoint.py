"""Checkpoints through DeepSpeed's own ``save_checkpoint``, made atomic, and export to a Hugging Face folder.

A checkpoint is ``SAVE_DIR/step_N/`` as DeepSpeed writes it, plus ``hybrid_ds.json`` (step, data
position), ``rng-rank{R}.pt`` per rank, and last a ``COMPLETE`` marker. Only after every rank has
finished does rank 0 point ``SAVE_DIR/latest`` at it (write aside, then rename), so a checkpoint
interrupted mid-write never becomes ``latest``. ``SAVE_DIR/run.json`` is the resolved run config and
``SAVE_DIR/tokenizer/`` the tokenizer: an export needs nothing else.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from hybrid_ds.config import load_config_dict
from hybrid_ds.deepspeed_seam import layer_checkpoint_file
from hybrid_ds.errors import UserError
from hybrid_ds.models.build import StageBuilder
from hybrid_ds.models.resolve import auto_class
from hybrid_ds.pipeline import layer_specs
from hybrid_ds.plan import build_plan

LATEST = "latest"
COMPLETE = "COMPLETE"
STATE = "hybrid_ds.json"
RUN_CONFIG = "run.json"


def write_run_files(save_dir: Path, resolved_config: dict, tokenizer: Any) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(save_dir / RUN_CONFIG, json.dumps(resolved_config, indent=2))
    tokenizer.save_pretrained(save_dir / "tokenizer")


def save(engine: Any, save_dir: Path, step: int, data_state: dict) -> Path:
    """All ranks call this. Returns the checkpoint folder."""
    tag = f"step_{step}"
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    folder = save_dir / tag
    rank = torch.distributed.get_rank()
    torch.save(_rng_state(), folder / f"rng-rank{rank}.pt")
    torch.distributed.barrier()
    if rank == 0:
        _atomic_write(folder / STATE, json.dumps({"step": step, "data": data_state}))
        _atomic_write(folder / COMPLETE, "")
        _atomic_write(save_dir / LATEST, tag)
    torch.distributed.barrier()
    return folder


def latest_checkpoint(save_dir: Path) -> Path | None:
    """The latest complete checkpoint folder, None when there is none; a corrupt one is an error."""
    pointer = save_dir / LATEST
    if not pointer.is_file():
        return None
    folder = save_dir / pointer.read_text().strip()
    check_complete(folder)
    return folder


def check_complete(folder: Path, key: str = "train.resume") -> None:
    if not (folder / COMPLETE).is_file() or not (folder / STATE).is_file():
        fix = ("point train.save_dir at a run with a complete checkpoint" if key == "train.resume"
               else "name a train.save_dir or one of its step_N folders")
        raise UserError(key, f"checkpoint {folder} is missing or incomplete (no {COMPLETE} marker); {fix}")


def check_run_folders(cfg: Any, resuming: bool) -> None:
    """Before any engine is built: ``train.save_dir`` and ``train.export_hf`` can be written, and a run
    that resumes trains the model its save_dir's checkpoints hold (else DeepSpeed's state_dict error)."""
    train = cfg.train
    if train.save_dir:
        writable_folder("train.save_dir", Path(train.save_dir))
    if train.export_hf:
        export_folder("train.export_hf", Path(train.export_hf))
    saved = Path(train.save_dir or "") / RUN_CONFIG
    if resuming and train.save_dir and (Path(train.save_dir) / LATEST).is_file() and saved.is_file():
        before = {k: json.loads(saved.read_text())["model"].get(k) for k in ("name", "overrides")}
        now = {k: getattr(cfg.model, k) for k in ("name", "overrides")}
        if before != now:
            raise UserError("train.resume", f"{train.save_dir} holds checkpoints of model {before}, this run's model "
                                            f"is {now}; resume with that model.name and model.overrides, or start "
                                            "in another train.save_dir")


def writable_folder(key: str, path: Path) -> None:
    """``path`` is a folder this process can write (created if missing)."""
    if path.exists() and not path.is_dir():
        raise UserError(key, f"{path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(key, f"cannot create the folder {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(key, f"{path} is not writable")


def export_folder(key: str, path: Path) -> None:
    """``path`` may receive an export: new, empty, or an earlier export (a config.json), never other files."""
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise UserError(key, f"{path} is a folder of other files (no config.json of an earlier export); "
                             "export into a new or empty folder")
    writable_folder(key, path)


def resume(engine: Any, folder: Path) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG; returns the saved step and data position."""
    try:
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    except Exception as err:  # torch.load and DeepSpeed raise many types for a damaged file
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UserError("train.resume", f"checkpoint {folder} cannot be loaded: {reason}") from None
    if load_path is None:
        raise UserError("train.resume", f"checkpoint {folder} cannot be loaded (DeepSpeed found no model states)")
    rng = folder / f"rng-rank{torch.distributed.get_rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((folder / STATE).read_text())


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- export


def resolve_checkpoint(path: str | Path) -> Path:
    """A save_dir (meaning its latest complete checkpoint) or one step folder inside it."""
    path = Path(path)
    if (path / LATEST).is_file():
        return latest_checkpoint(path)
    if path.is_dir() and (path.parent / RUN_CONFIG).is_file():
        check_complete(path, "CHECKPOINT")
        return path
    raise UserError("CHECKPOINT", f"{path} is neither a train.save_dir with a 'latest' checkpoint "
                                  "nor a checkpoint folder inside one")


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer) from a pipeline checkpoint of any layout."""
    folder = resolve_checkpoint(checkpoint)
    export_folder("OUT_DIR", Path(out_dir))
    cfg = load_config_dict(json.loads((folder.parent / RUN_CONFIG).read_text()))
    plan = build_plan(cfg, world_size=cfg.pipeline.stages)
    if not cfg.pipeline_engine:  # the plain HF model: DeepSpeed's own consolidation of ZeRO partitions
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:  # a PipelineModule: per-layer files, named back through the layer specs on the meta device
        builder = StageBuilder(plan.resolved, pretrained=False, device="meta", skeleton=plan.skeleton)
        specs, _ = layer_specs(builder)
        state = _gather_layers(folder, specs, builder)
    model = auto_class(plan.resolved.family).from_config(plan.resolved.hf_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - \
        {name for name, _ in model.named_parameters()}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError("CHECKPOINT", f"{folder} does not cover the model: missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}")
    out = Path(out_dir)
    model.to(next(iter(state.values())).dtype).save_pretrained(out)
    tokenizer = folder.parent / "tokenizer"
    if tokenizer.is_dir():
        transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


def _gather_layers(folder: Path, specs: list[Any], builder: Any) -> dict[str, torch.Tensor]:
    """Hugging Face name -> tensor, from DeepSpeed's per-layer files ``layer_NN-model_states.pt``."""
    built: dict[str, Any] = {}
    state: dict[str, torch.Tensor] = {}
    for index, spec in enumerate(specs):
        file = layer_checkpoint_file(folder, index)
        key = getattr(spec, "key", None)
        module = built.get(key) if key else None
        module = module or spec.build()
        if key:
            built[key] = module
        if not file.is_file():
            continue
        names = _hf_names(builder)
        tensors = torch.load(file, map_location="cpu", weights_only=True)
        for local, value in module.state_dict(keep_vars=True).items():
            if local in tensors:
                state[names[id(value)]] = tensors[local]
    return state


def _hf_names(builder: Any) -> dict[int, str]:
    names = {id(p): path for path, p in builder.built_parameters().items()}
    for path, module in builder.built_modules().items():
        for local, value in module.state_dict(keep_vars=True).items():
            names[id(value)] = f"{path}.{local}"
    return names
