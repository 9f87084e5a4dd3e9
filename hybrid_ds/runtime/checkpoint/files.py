"""A checkpoint's folder: DeepSpeed's files plus hybrid_ds's state, RNG and markers, written so that only a complete
save ever becomes ``latest``; the run's folders checked before any engine is built.

``SAVE_DIR/step_N/`` as DeepSpeed writes it, plus ``hybrid_ds.json`` (step, global data position, the layout it was
saved at, an id), ``rng-rank{R}.pt`` per rank, and last a ``COMPLETE`` marker. It is written as
``SAVE_DIR/.step_N.partial/`` and renamed into place once every rank's files are on disk; only then does rank 0 point
``SAVE_DIR/latest`` at it (write aside, then rename). ``SAVE_DIR/run.json`` is the resolved run config and
``SAVE_DIR/tokenizer/`` the tokenizer: an export needs nothing else.
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
from deepspeed.accelerator import get_accelerator

from hybrid_ds.errors import UserError
from hybrid_ds.runtime.checkpoint.zero0 import optimizer_param_names

LATEST = "latest"
COMPLETE = "COMPLETE"
STATE = "hybrid_ds.json"
RUN_CONFIG = "run.json"
UNIVERSAL = "universal"


def write_run_files(save_dir: Path, resolved_config: dict, tokenizer: Any) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(save_dir / RUN_CONFIG, json.dumps(resolved_config, indent=2))
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
    """What a checkpoint's files depend on: which engine, stages, data parallel, ZeRO stage, stage boundaries, and
    sequence parallelism where it is on ("sp": DeepSpeed partitions ZeRO states over its sp x dp ranks).

    The ZeRO stage is the one the engine ran (``Plan.zero_stage``: fp32 ZeRO-1 at dp=1 runs as ZeRO-0); checkpoints
    saved before recorded the config's, and resume through the universal form like any other layout change.
    """
    cfg = plan.config
    layout = {"engine": "pipeline" if cfg.pipeline_engine else "plain", "stages": plan.layout.stages,
              "dp": plan.layout.dp, "zero": plan.zero_stage, "boundaries": list(plan.boundaries)}
    return {**layout, "sp": plan.layout.sp} if plan.layout.sp > 1 else layout


def describe_layout(layout: dict[str, Any]) -> str:
    """The layout in the words of the config keys that set it.

    >>> describe_layout({"engine": "pipeline", "stages": 2, "dp": 1, "zero": 1, "boundaries": [0, 2, 4]})
    'pipeline.stages 2 (layers [0, 2, 4]) x dp 1, ZeRO-1'
    >>> describe_layout({"engine": "pipeline", "stages": 1, "dp": 2, "zero": 1, "boundaries": [0, 4], "sp": 2})
    'pipeline.stages 1 (layers [0, 4]) x sequence_parallel 2 x dp 2, ZeRO-1'
    """
    stages = (f"pipeline.stages {layout['stages']} (layers {layout['boundaries']})" if layout["engine"] == "pipeline"
              else "the plain Hugging Face engine")
    sp = f" x sequence_parallel {layout['sp']}" if layout.get("sp", 1) > 1 else ""
    return f"{stages}{sp} x dp {layout['dp']}, ZeRO-{layout['zero']}"


def base_is_reread(cfg: Any) -> bool:
    """Whether checkpoints leave out the frozen base: a LoRA run of a pretrained model, whose base every resume and
    export reads from ``model.name`` again."""
    return cfg.model.lora is not None and cfg.model.pretrained


def save(engine: Any, save_dir: Path, step: int, data_state: dict, layout: dict | None = None,
         without_frozen: bool = False, history: dict | None = None) -> Path:
    """All ranks call this. Returns the checkpoint folder. ``without_frozen``: leave frozen tensors out
    (:func:`base_is_reread`); ``history``: the run's so far (hybrid_ds.runtime.history), kept in the state.

    Every rank writes into ``.step_N.partial/`` and syncs its files to disk; once all have, rank 0 writes the state
    and the ``COMPLETE`` marker there, renames the folder to ``step_N/`` (an older ``step_N/``, its ``universal/``
    and other ranks' files included, is removed, never merged) and only then moves ``latest``. A save cut short
    leaves at most a ``.partial`` folder, which the next save removes.
    """
    tag, rank = f"step_{step}", torch.distributed.get_rank()
    partial = save_dir / f".{tag}.partial"
    if rank == 0:
        for stale in save_dir.glob(".step_*.partial"):
            shutil.rmtree(stale)
    torch.distributed.barrier()
    engine.save_checkpoint(str(save_dir), tag=partial.name, save_latest=False,
                           exclude_frozen_parameters=without_frozen, client_state=optimizer_param_names(engine))
    torch.save(rng_state(), partial / f"rng-rank{rank}.pt")
    sync_tree(partial)  # this rank's files (and any other this node wrote) are on disk before rank 0 publishes
    torch.distributed.barrier()
    if rank == 0:
        atomic_write(partial / STATE, json.dumps({"step": step, "data": data_state, "layout": layout,
                                                  "without_frozen": without_frozen, "id": uuid.uuid4().hex,
                                                  "history": history}))
        atomic_write(partial / COMPLETE, "")
        sync_folder(partial)
        publish(partial, save_dir / tag)
        atomic_write(save_dir / LATEST, tag)
    torch.distributed.barrier()
    return save_dir / tag


def publish(partial: Path, folder: Path) -> None:
    """Rename the finished ``partial`` to ``folder``, replacing (never merging with) what ``folder`` held."""
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(partial, folder)
    sync_folder(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and the folders themselves."""
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders that hold them
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            sync_folder(path)
    sync_folder(folder)


def sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Before any engine is built: ``train.save_dir`` and ``train.export_hf`` can be written, a run that does not
    resume does not write over a save_dir's checkpoints, and a run that resumes trains the model its save_dir's
    checkpoints hold (else DeepSpeed's state_dict error)."""
    train = cfg.train
    if train.save_dir:
        writable_folder("train.save_dir", Path(train.save_dir))
    if train.export_hf:
        export_folder("train.export_hf", Path(train.export_hf))
    latest = Path(train.save_dir or "") / LATEST
    if train.save_dir and not resuming and latest.is_file():
        raise UserError("train.resume", f"false, but {train.save_dir} already holds checkpoints (latest "
                                        f"{latest.read_text().strip()}) that this run would overwrite; continue them "
                                        "with --resume (or train.resume \"auto\"), or start over in a new "
                                        "train.save_dir (or after removing that one)")
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
    """``path`` may receive an export: new, empty, or an earlier export (a model's config.json, or a LoRA run's
    adapter_config.json), never other files."""
    earlier = any((path / name).is_file() for name in ("config.json", "adapter_config.json"))
    if path.is_dir() and any(path.iterdir()) and not earlier:
        raise UserError(key, f"{path} is a folder of other files (no config.json or adapter_config.json of an "
                             "earlier export); export into a new or empty folder")
    writable_folder(key, path)


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


def rng_state() -> dict:
    """This rank's random generators: Python's, NumPy's, torch's CPU one and its device's (CUDA's dropout draws from
    the device's generator; on DeepSpeed's CPU accelerator that is torch's CPU one again)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "device": get_accelerator().get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s generators (checkpoints saved before the device's was recorded have none)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "device" in state:
        get_accelerator().set_rng_state(state["device"])


def atomic_write(path: Path, text: str) -> None:
    """Write aside, sync, rename, sync the folder: a reader sees the old text or the whole new one, after a crash
    too."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_folder(path.parent)
