"""Checkpoints through DeepSpeed's own ``save_checkpoint``, made atomic, and export to a Hugging Face folder.

A checkpoint is ``SAVE_DIR/step_N/`` as DeepSpeed writes it, plus ``hybrid_ds.json`` (step, global data
position, the layout it was saved at, an id), ``rng-rank{R}.pt`` per rank, and last a ``COMPLETE`` marker. It is
written into ``.step_N.partial/`` and renamed into place (replacing, never merging with, an older ``step_N/``) only
once every rank's files are synced to disk; then rank 0 points ``SAVE_DIR/latest`` at it (write aside, then
rename), so a checkpoint interrupted mid-write is never read. A run that does not resume refuses a save_dir that
already holds checkpoints. ``SAVE_DIR/run.json`` is the resolved run config and
``SAVE_DIR/tokenizer/`` the tokenizer: an export needs nothing else.

A run resumed at another layout (stages, data parallel, ZeRO stage 0-2, stage boundaries, or the plain
engine instead of the pipeline) loads the checkpoint through DeepSpeed's universal format: once, the first
rank converts ``step_N/`` with DeepSpeed's ``ds_to_universal`` (ZeRO-1/2; fp32 ZeRO-0 with
``runtime.checkpoint.zero0``) into ``step_N/universal/`` (its ``COMPLETE`` holds the id of the checkpoint it was made from), each parameter
kept under its Hugging Face name (``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``), and every
rank loads its own partition of weights and optimizer moments from there (``hybrid-ds convert-checkpoint``
does the conversion ahead of time).

Modules: ``files`` (the folder, save, markers, the run's folders), ``resume``, ``universal`` (another layout),
``zero0`` (hybrid_ds's own format for fp32 ZeRO-0), ``names`` (layer files and Hugging Face names), ``export``.
"""

from hybrid_ds.runtime.checkpoint.export import export
from hybrid_ds.runtime.checkpoint.files import (COMPLETE, LATEST, RUN_CONFIG, STATE, UNIVERSAL, base_is_reread,
                                                check_complete, check_run_folders, check_shared, describe_layout,
                                                latest_checkpoint, layout_of, resolve_checkpoint, save,
                                                write_run_files)
from hybrid_ds.runtime.checkpoint.names import pipeline_names, universal_names
from hybrid_ds.runtime.checkpoint.resume import resume
from hybrid_ds.runtime.checkpoint.universal import write_universal, write_universal_of

__all__ = ["COMPLETE", "LATEST", "RUN_CONFIG", "STATE", "UNIVERSAL", "base_is_reread", "check_complete",
           "check_run_folders", "check_shared", "describe_layout", "export", "latest_checkpoint", "layout_of",
           "pipeline_names", "resolve_checkpoint", "resume", "save", "universal_names", "write_run_files",
           "write_universal", "write_universal_of"]
