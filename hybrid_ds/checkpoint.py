"""Checkpoints through DeepSpeed's own ``save_checkpoint``, made atomic, and export to a Hugging Face folder.

A checkpoint is ``SAVE_DIR/step_N/`` as DeepSpeed writes it, plus ``hybrid_ds.json`` (step, global data
position, the layout it was saved at), ``rng-rank{R}.pt`` per rank, and last a ``COMPLETE`` marker. Only after every rank has
finished does rank 0 point ``SAVE_DIR/latest`` at it (write aside, then rename), so a checkpoint
interrupted mid-write never becomes ``latest``. ``SAVE_DIR/run.json`` is the resolved run config and
``SAVE_DIR/tokenizer/`` the tokenizer: an export needs nothing else.

A run resumed at another layout (stages, data parallel, ZeRO stage 0-2, stage boundaries, or the plain
engine instead of the pipeline) loads the checkpoint through DeepSpeed's universal format: once, the first
rank converts ``step_N/`` with DeepSpeed's ``ds_to_universal`` (ZeRO-1/2; fp32 ZeRO-0 with
``deepspeed_seam.zero0_to_universal``) into ``step_N/universal/``, each parameter
kept under its Hugging Face name (``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``), and every
rank loads its own partition of weights and optimizer moments from there (``hybrid-ds convert-checkpoint``
does the conversion ahead of time).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from hybrid_ds.config import load_config_dict
from hybrid_ds import deepspeed_seam
from hybrid_ds.deepspeed_seam import layer_checkpoint_file
from hybrid_ds.engine import raise_shared
from hybrid_ds.errors import UserError
from hybrid_ds.models.build import StageBuilder, checkpoint_folder
from hybrid_ds.models.lora import PEFT_PREFIX, is_adapter, with_peft
from hybrid_ds.models.resolve import auto_class, meta_model
from hybrid_ds.pipeline import layer_specs
from hybrid_ds.plan import build_plan

LATEST = "latest"
COMPLETE = "COMPLETE"
STATE = "hybrid_ds.json"
RUN_CONFIG = "run.json"
UNIVERSAL = "universal"


def write_run_files(save_dir: Path, resolved_config: dict, tokenizer: Any) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(save_dir / RUN_CONFIG, json.dumps(resolved_config, indent=2))
    tokenizer.save_pretrained(save_dir / "tokenizer")


def check_shared(save_dir: Path, wait_s: float = 5.0) -> None:
    """Refuse a ``train.save_dir`` that is not one folder for every rank (node-local disks of several nodes).

    Every rank writes its part of a checkpoint there (a stage's layer files, a rank's ZeRO partition and RNG)
    and resumes from parts others wrote, and rank 0 writes ``latest`` once all are done: one folder must
    hold them all. Rank 0 leaves a file with a fresh name there and every rank looks for it (for up to
    ``wait_s``, as a network filesystem may show a new file late). All ranks call this.
    """
    rank, host = torch.distributed.get_rank(), socket.gethostname()
    probe: list[Any] = [None, None]  # the probe's name, or why rank 0 could not write it
    if rank == 0:
        probe[0] = f".shared-check-{uuid.uuid4().hex}"
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            (save_dir / probe[0]).write_text(host)
        except OSError as err:
            probe[1] = f"{save_dir} cannot be written on rank 0 ({host}): {err.strerror or err}"
    torch.distributed.broadcast_object_list(probe, src=0)
    if probe[1]:
        raise UserError("train.save_dir", probe[1])
    path, deadline = save_dir / probe[0], time.monotonic() + wait_s
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    seen: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(seen, (path.is_file(), host, str(save_dir)))
    if rank == 0:
        path.unlink()
    blind = [f"rank {r} ({h}, {d})" for r, (ok, h, d) in enumerate(seen) if not ok]
    if blind:
        raise UserError("train.save_dir", f"{seen[0][2]} is not one folder shared by every node: "
                                          f"{', '.join(blind)} does not see the file rank 0 ({seen[0][1]}) wrote "
                                          "there; every rank writes and reads each checkpoint, so put "
                                          "train.save_dir on a filesystem all nodes mount at the same path")


def layout_of(plan: Any) -> dict[str, Any]:
    """What a checkpoint's files depend on: which engine, stages, data parallel, ZeRO stage, stage boundaries.

    The ZeRO stage is the one the engine ran (``Plan.zero_stage``: fp32 ZeRO-1 at dp=1 runs as ZeRO-0); checkpoints
    saved before recorded the config's, and resume through the universal form like any other layout change.
    """
    cfg = plan.config
    return {"engine": "pipeline" if cfg.pipeline_engine else "plain", "stages": plan.layout.stages,
            "dp": plan.layout.dp, "zero": plan.zero_stage, "boundaries": list(plan.boundaries)}


def describe_layout(layout: dict[str, Any]) -> str:
    """The layout in the words of the config keys that set it.

    >>> describe_layout({"engine": "pipeline", "stages": 2, "dp": 1, "zero": 1, "boundaries": [0, 2, 4]})
    'pipeline.stages 2 (layers [0, 2, 4]) x dp 1, ZeRO-1'
    """
    stages = (f"pipeline.stages {layout['stages']} (layers {layout['boundaries']})" if layout["engine"] == "pipeline"
              else "the plain Hugging Face engine")
    return f"{stages} x dp {layout['dp']}, ZeRO-{layout['zero']}"


def base_is_reread(cfg: Any) -> bool:
    """Whether checkpoints leave out the frozen base: a LoRA run of a pretrained model, whose base every resume and
    export reads from ``model.name`` again."""
    return cfg.model.lora is not None and cfg.model.pretrained


def save(engine: Any, save_dir: Path, step: int, data_state: dict, layout: dict | None = None,
         without_frozen: bool = False) -> Path:
    """All ranks call this. Returns the checkpoint folder. ``without_frozen``: leave frozen tensors out
    (:func:`base_is_reread`)."""
    tag = f"step_{step}"
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False, exclude_frozen_parameters=without_frozen,
                           client_state=deepspeed_seam.optimizer_param_names(engine))
    folder = save_dir / tag
    rank = torch.distributed.get_rank()
    torch.save(_rng_state(), folder / f"rng-rank{rank}.pt")
    torch.distributed.barrier()
    if rank == 0:
        _atomic_write(folder / STATE, json.dumps({"step": step, "data": data_state, "layout": layout,
                                                   "without_frozen": without_frozen}))
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
        raise UserError("train.resume", f"checkpoint {folder} cannot be loaded: {_first_line(err)}") from None
    if load_path is None:
        raise UserError("train.resume", f"checkpoint {folder} cannot be loaded (DeepSpeed found no model states)")
    rng = folder / f"rng-rank{torch.distributed.get_rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def _resume_on_new_layout(engine: Any, folder: Path, plan: Any, saved: dict) -> None:
    now = layout_of(plan)
    if saved["zero"] not in (0, 1, 2) or now["zero"] not in (0, 1, 2):
        # DeepSpeed 0.19.8 writes ZeRO-3's universal form differently (flat tensors, no step, no ds_version) from
        # what its ZeRO-1/2 loader reads
        raise UserError("train.resume", f"checkpoint {folder} was saved at {describe_layout(saved)} and this run is "
                                        f"{describe_layout(now)}: a change of layout needs zero_optimization.stage "
                                        f"0, 1 or 2 on both sides (universal checkpoints); resume at "
                                        f"{describe_layout(saved)}")
    error = None
    if torch.distributed.get_rank() == 0 and not (folder / UNIVERSAL / COMPLETE).is_file():
        try:
            write_universal(folder, plan)
        except UserError as err:
            error = err
    raise_shared(error)
    try:
        load_path, _ = deepspeed_seam.load_universal(engine, folder / UNIVERSAL, universal_names(plan))
    except Exception as err:
        raise UserError("train.resume", f"{folder / UNIVERSAL} cannot be loaded at {describe_layout(now)}: "
                                        f"{_first_line(err)}") from None
    if load_path is None:
        raise UserError("train.resume", f"{folder / UNIVERSAL} cannot be loaded (DeepSpeed found no model states)")


# ---------------------------------------------------------------- universal form (another layout)


def write_universal(folder: Path, plan: Any) -> Path:
    """``folder/universal``: DeepSpeed's universal form of a ZeRO-1/2 checkpoint, keyed by Hugging Face names.

    ``plan`` is any plan of the same model, on either engine (a PipelineModule's parameter names depend on
    neither its stages nor its boundaries). Written aside and renamed, so a conversion cut short is never used.
    """
    check_complete(folder)
    out = folder / UNIVERSAL
    tmp = folder / f".{UNIVERSAL}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    layout = json.loads((folder / STATE).read_text()).get("layout") or {}
    try:
        if layout.get("zero") == 0:  # fp32 ZeRO-0: whole per-parameter states, which DeepSpeed does not convert
            deepspeed_seam.zero0_to_universal(folder, tmp / "step", _saved_weights(folder, plan), pipeline_names(plan))
        else:
            deepspeed_seam.to_universal(folder, tmp / "step")
    except Exception as err:  # ds_to_universal asserts and raises many types on a checkpoint it cannot read
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError("CHECKPOINT", f"{folder} cannot be converted to a universal checkpoint: "
                                      f"{_first_line(err)}") from None
    zero = tmp / "step" / "zero"
    if layout.get("engine", "pipeline") == "pipeline" and layout.get("zero") != 0:  # PipelineModule -> HF names
        for source, name in pipeline_names(plan).items():
            if (zero / source).is_dir():
                os.replace(zero / source, zero / name)
    _atomic_write(tmp / "step" / COMPLETE, "")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp / "step", out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_universal_of(checkpoint: str | Path) -> Path:
    """``hybrid-ds convert-checkpoint``: the universal form of a save_dir's latest checkpoint or of one step folder."""
    folder = resolve_checkpoint(checkpoint)
    cfg = load_config_dict(json.loads((folder.parent / RUN_CONFIG).read_text()))
    layout = json.loads((folder / STATE).read_text()).get("layout") or {"zero": cfg.zero_stage}
    if layout["zero"] not in (0, 1, 2):
        raise UserError("CHECKPOINT", f"{folder} was saved with zero_optimization.stage {layout['zero']}; "
                                      "universal checkpoints are made of ZeRO-0/1/2 optimizer states")
    return write_universal(folder, build_plan(cfg, world_size=cfg.pipeline.stages))


def universal_names(plan: Any) -> dict[str, str]:
    """The engine's parameter name -> the Hugging Face name its universal form keeps it under.

    The plain engine's parameters already have the Hugging Face model's names. A PipelineModule names a
    layer spec's parameters ``{index}.{local}`` and a tied one's ``tied_modules.{key}.{local}``; they are
    named back through the layer specs, built on the meta device, and a tied weight gets the name the
    Hugging Face model reports it under (``transformer.wte.weight``, not ``lm_head.weight``).
    """
    return pipeline_names(plan) if plan.config.pipeline_engine else {}


def pipeline_names(plan: Any) -> dict[str, str]:
    """A PipelineModule's parameter names -> Hugging Face names, for ``plan``'s model on any engine."""
    skeleton = meta_model(plan.resolved)  # its own: building layers on it would change the run's skeleton
    builder = StageBuilder(plan.resolved, pretrained=False, device="meta", skeleton=skeleton,
                           lora=plan.config.model.lora, lora_targets=plan.lora_targets)
    specs, _ = layer_specs(builder)
    modules: dict[str, Any] = {}
    for index, spec in enumerate(specs):
        key = getattr(spec, "key", None)
        prefix = f"tied_modules.{key}." if key else f"{index}."
        if prefix not in modules:
            modules[prefix] = spec.build()
    hf_names = _hf_names(builder)
    canonical = {id(p): name for name, p in skeleton.named_parameters()}
    alias = {name: canonical[id(p)] for name, p in skeleton.named_parameters(remove_duplicate=False)}
    return {prefix + local: alias.get(hf_names[id(p)], hf_names[id(p)]) for prefix, module in modules.items()
            for local, p in module.named_parameters()}


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


def export(checkpoint: str | Path, out_dir: str | Path, merge: bool = False) -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer) from a pipeline checkpoint of any layout.

    A LoRA run (``model.lora``) writes peft's adapter folder (``adapter_config.json``, ``adapter_model.safetensors``),
    which ``PeftModel.from_pretrained(base, folder)`` loads; with ``merge`` the model with its adapters merged, a plain
    Hugging Face folder. Both are written by peft itself, from ``get_peft_model`` of the model with the run's weights.
    """
    folder = resolve_checkpoint(checkpoint)
    export_folder("OUT_DIR", Path(out_dir))
    cfg = load_config_dict(json.loads((folder.parent / RUN_CONFIG).read_text()))
    if merge and not cfg.model.lora:
        raise UserError("--merge", f"{folder} is not of a LoRA run (model.lora): its export is the whole model already")
    plan = build_plan(cfg, world_size=cfg.pipeline.stages)
    if not cfg.pipeline_engine:  # the plain HF model: DeepSpeed's own consolidation of ZeRO partitions
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:  # a PipelineModule: per-layer files, named back through the layer specs on the meta device
        builder = StageBuilder(plan.resolved, pretrained=False, device="meta", skeleton=plan.skeleton,
                               lora=cfg.model.lora, lora_targets=plan.lora_targets)
        specs, _ = layer_specs(builder)
        state = _gather_layers(folder, specs, builder)
    reread = json.loads((folder / STATE).read_text()).get("without_frozen", False)
    if reread:  # the base as the run read it
        model = auto_class(plan.resolved.family).from_pretrained(
            checkpoint_folder(cfg.model.name, cfg.model.revision), config=plan.resolved.hf_config, dtype=torch.float32)
    else:
        model = auto_class(plan.resolved.family).from_config(plan.resolved.hf_config)
    if cfg.model.lora:
        model = with_peft(model, cfg.model.lora, plan.resolved.family.task, cfg.model.name)
        state = {PEFT_PREFIX + name: value for name, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - \
        {name for name, _ in model.named_parameters()}
    missing = [k for k in missing if k not in tied and (not reread or is_adapter(k))]
    if missing or unexpected:
        raise UserError("CHECKPOINT", f"{folder} does not cover the model: missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}")
    out = Path(out_dir)
    if merge:
        model = model.merge_and_unload()
    model.to(next(iter(state.values())).dtype).save_pretrained(out)
    tokenizer = folder.parent / "tokenizer"
    if tokenizer.is_dir():
        transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


def _saved_weights(folder: Path, plan: Any) -> dict[str, torch.Tensor]:
    """Hugging Face name -> weight of a pipeline checkpoint, a tied weight under the name its model reports."""
    skeleton = meta_model(plan.resolved)  # its own: building layers on it would change the run's skeleton
    builder = StageBuilder(plan.resolved, pretrained=False, device="meta", skeleton=skeleton,
                           lora=plan.config.model.lora, lora_targets=plan.lora_targets)
    specs, _ = layer_specs(builder)
    state = _gather_layers(folder, specs, builder)
    canonical = {id(p): name for name, p in skeleton.named_parameters()}
    alias = {name: canonical[id(p)] for name, p in skeleton.named_parameters(remove_duplicate=False)}
    return {alias.get(name, name): value for name, value in state.items()}


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
