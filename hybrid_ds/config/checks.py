"""Checks that span sections of a run config (a layout DeepSpeed or hybrid_ds cannot run), and the warnings of one that
runs but wastes (:func:`run_warnings`, which ``validate``, a run's start and ``plan`` share). Pure Python."""

from __future__ import annotations

from typing import Any

from hybrid_ds.config.deepspeed import schedule_warnings
from hybrid_ds.config.schedule import bubble
from hybrid_ds.errors import UserError


def check_cross_section(cfg: Any) -> None:
    """What no single section can check: combinations of ZeRO, stages, precision, expert parallelism, LoRA, compile
    and export that no engine runs, each one line naming the key to change."""
    if cfg.deepspeed.get("fp16", {}).get("enabled") and cfg.deepspeed.get("bf16", {}).get("enabled"):
        raise UserError("bf16.enabled", "fp16 and bf16 are both enabled; enable one of them")
    if cfg.zero_stage >= 3 and cfg.pipeline.stages > 1:
        raise UserError(
            "zero_optimization.stage",
            f"ZeRO stage 3 cannot be combined with pipeline.stages={cfg.pipeline.stages} (parameters partitioned "
            "over data parallel inside a pipeline stage are not supported); use zero_optimization.stage 0, 1 or 2 "
            "with stages > 1, or pipeline.stages=1 for ZeRO-3")
    if cfg.zero_stage == 2 and cfg.pipeline.stages > 1 and cfg.precision == "fp16":
        raise UserError(
            "fp16.enabled", f"fp16 (dynamic loss scaling) is not supported with ZeRO-2 and pipeline.stages="
            f"{cfg.pipeline.stages}: hybrid_ds runs that layout in fp32 or bf16; use bf16.enabled, or "
            "zero_optimization.stage 0 or 1 for fp16")
    optimizer = str(cfg.deepspeed.get("optimizer", {}).get("type", ""))
    if cfg.zero_stage == 2 and cfg.pipeline.stages > 1 and optimizer.lower() == "muon":
        raise UserError(
            "optimizer.type", f"{optimizer!r} is not supported with ZeRO-2 and pipeline.stages={cfg.pipeline.stages}: "
            "Muon updates whole matrices while each rank of that layout holds a flat slice of its stage's gradients; "
            "use zero_optimization.stage 0 or 1 with Muon, or another optimizer")
    if cfg.expert_parallel and cfg.pipeline.stages > 1:
        raise UserError(
            "expert_parallel.enabled", f"true needs pipeline.stages 1, got {cfg.pipeline.stages}: DeepSpeed's AutoEP "
            "swaps the MoE layers of the whole Hugging Face model inside its plain engine, and a pipeline stage "
            "is not that model; use pipeline.stages 1 with expert_parallel, or expert_parallel.enabled false")
    if cfg.expert_parallel and cfg.train.export_hf:
        raise UserError("train.export_hf", "not available with expert_parallel.enabled: each rank saves only its "
                                           "own experts under AutoEP's names, which no Hugging Face folder holds")
    if cfg.train.compile and not cfg.pipeline_engine:
        raise UserError("train.compile", f"true needs the pipeline engine; zero_optimization.stage {cfg.zero_stage}"
                                         f"{' with expert_parallel' if cfg.expert_parallel else ''} at pipeline.stages 1 "
                                         "trains the plain Hugging Face model, which hybrid_ds does not compile; use "
                                         "zero_optimization.stage 0-2 with stages > 1 (0/1 at one stage), or "
                                         "train.compile false")
    if cfg.model.lora and not cfg.pipeline_engine:
        raise UserError("model.lora", f"needs the pipeline engine; zero_optimization.stage {cfg.zero_stage}"
                                      f"{' with expert_parallel' if cfg.expert_parallel else ''} at pipeline.stages 1 "
                                      "trains the plain Hugging Face model; use zero_optimization.stage 0-2 with "
                                      "stages > 1 (0/1 at one stage): adapters leave little optimizer state to partition")
    if cfg.train.export_hf and not cfg.train.save_dir:
        raise UserError("train.export_hf", f"{cfg.train.export_hf!r} needs train.save_dir: the export is written "
                                           "from the run's last checkpoint")
    if cfg.pipeline.schedule == "zb-h1":
        check_zero_bubble(cfg)
    if cfg.pipeline.sequence_parallel > 1:
        check_sequence_parallel(cfg)
    if cfg.train.tiled_mlp:
        check_tiled_mlp(cfg)
    if cfg.train.selective_checkpoint:
        check_selective_checkpoint(cfg)
    if cfg.train.float8:
        check_float8(cfg)
    partition = cfg.pipeline.partition
    if isinstance(partition, list) and len(partition) != cfg.pipeline.stages:
        raise UserError("pipeline.partition",
                        f"{partition} names {len(partition)} stages but pipeline.stages is {cfg.pipeline.stages}")


def check_zero_bubble(cfg: Any) -> None:
    """What ``pipeline.schedule: zb-h1`` cannot run with: one stage (nothing to fill), and the features whose backward
    is one opaque step that cannot be split into input and weight gradients."""
    if cfg.pipeline.stages < 2:
        raise UserError("pipeline.schedule", f"'zb-h1' needs pipeline.stages >= 2 (it fills the idle time between "
                                             f"stages), got {cfg.pipeline.stages}; use '1f1b'")
    if cfg.pipeline.activation_checkpoint_interval:
        raise UserError("pipeline.schedule", "'zb-h1' is not available with pipeline.activation_checkpoint_interval "
                                             f"{cfg.pipeline.activation_checkpoint_interval}: a recomputed layer's "
                                             "backward runs as one step, which cannot be split into input and weight "
                                             "gradients; set activation_checkpoint_interval 0 or use '1f1b'")
    if cfg.train.compile:
        raise UserError("pipeline.schedule", "'zb-h1' is not available with train.compile: a compiled block's backward "
                                             "runs as one step, which cannot be split into input and weight "
                                             "gradients; set train.compile false or use '1f1b'")


def pipeline_engine_only(cfg: Any, key: str, value: Any, off: str) -> None:
    """One line for a feature of the pipeline's layers (``key`` set to ``value``) where the run trains the plain
    Hugging Face model; ``off`` says how to turn the feature off."""
    if not cfg.pipeline_engine:
        raise UserError(key, f"{value} needs the pipeline engine; zero_optimization.stage {cfg.zero_stage} at "
                             "pipeline.stages 1 trains the plain Hugging Face model; use zero_optimization.stage 0 or "
                             f"1 at one stage (0-2 with stages > 1), or {off}")


def check_tiled_mlp(cfg: Any) -> None:
    """What ``train.tiled_mlp`` cannot run with: the plain engine (it wraps the pipeline's blocks), ZB-H1 (a tiled
    MLP's backward computes its weight gradients with its input gradient, one opaque step) and train.compile."""
    tiles = cfg.train.tiled_mlp
    pipeline_engine_only(cfg, "train.tiled_mlp", tiles, "tiled_mlp 0")
    if cfg.pipeline.schedule == "zb-h1":
        raise UserError("pipeline.schedule", f"'zb-h1' is not available with train.tiled_mlp {tiles}: a tiled MLP's "
                                             "backward computes its weight gradients with its input gradient, in one "
                                             "step that cannot be split; set tiled_mlp 0 or use '1f1b'")
    if cfg.train.compile:
        raise UserError("train.compile", f"true is not available with train.tiled_mlp {tiles}; set one of them off")


def check_selective_checkpoint(cfg: Any) -> None:
    """What ``train.selective_checkpoint`` cannot run with: the plain engine (it wraps the pipeline's blocks), whole
    layers recomputed already, ZB-H1 (a recomputed part's backward is one step that cannot be split), a tiled MLP
    (recomputed tile by tile already) and, for the attention, sequence parallelism (its all-to-alls would run again)."""
    part = cfg.train.selective_checkpoint
    key = "train.selective_checkpoint"
    pipeline_engine_only(cfg, key, repr(part), "selective_checkpoint null")
    interval = cfg.pipeline.activation_checkpoint_interval
    if interval:
        raise UserError(key, f"{part!r} is not available with pipeline.activation_checkpoint_interval {interval}, "
                             "which recomputes whole layers already; set one of them off (null, 0)")
    if cfg.pipeline.schedule == "zb-h1":
        raise UserError("pipeline.schedule", f"'zb-h1' is not available with train.selective_checkpoint {part!r}: a "
                                             "recomputed part's backward runs as one step, which cannot be split into "
                                             "input and weight gradients; set selective_checkpoint null or use '1f1b'")
    if part == "mlp" and cfg.train.tiled_mlp:
        raise UserError(key, f"'mlp' is not available with train.tiled_mlp {cfg.train.tiled_mlp}, which recomputes the "
                             "MLP tile by tile already; use 'attention' or null")
    if part == "attention" and cfg.pipeline.sequence_parallel > 1:
        raise UserError(key, f"'attention' is not available with pipeline.sequence_parallel "
                             f"{cfg.pipeline.sequence_parallel}: its recompute would repeat the attention's two "
                             "all-to-all exchanges; use 'mlp' or null")


def check_float8(cfg: Any) -> None:
    """What ``train.float8`` cannot run with: the plain engine (it converts the pipeline's blocks), LoRA (peft wraps the
    linear layers it would convert), ZB-H1 (a float8 linear's backward computes both its gradients in one step), and a
    Python without torchao."""
    import importlib.util

    pipeline_engine_only(cfg, "train.float8", "true", "float8 false")
    if cfg.model.lora:
        raise UserError("train.float8", "true is not available with model.lora: peft wraps the linear layers float8 "
                                        "would convert; set train.float8 false")
    if cfg.pipeline.schedule == "zb-h1":
        raise UserError("pipeline.schedule", "'zb-h1' is not available with train.float8: a float8 linear's backward "
                                             "computes its input and weight gradients in one step, which cannot be "
                                             "split; set train.float8 false or use '1f1b'")
    if importlib.util.find_spec("torchao") is None:
        raise UserError("train.float8", "true needs torchao, which is not installed: pip install 'hybrid_ds[float8]' "
                                        "(torchao), or set train.float8 false")


def check_device(cfg: Any, kind: str) -> None:
    """What a run on a ``kind`` ("cpu" or "gpu") machine cannot train: FlexAttention has no CPU backward in torch."""
    if kind == "cpu" and cfg.model.attn_implementation == "flex_attention":
        raise UserError("model.attn_implementation", "'flex_attention' trains on GPUs only (torch has no CPU backward "
                                                     "for FlexAttention); on CPU use 'sdpa' or 'eager'")


def check_sequence_parallel(cfg: Any) -> None:
    """What ``pipeline.sequence_parallel`` > 1 cannot run with, as far as the config alone tells (the model's heads and
    positions are checked with the model: hybrid_ds.models.sequence_parallel.check_model)."""
    sp = cfg.pipeline.sequence_parallel
    pipeline_engine_only(cfg, "pipeline.sequence_parallel", sp, "sequence_parallel 1")
    if cfg.data.seq_len % sp:
        raise UserError("pipeline.sequence_parallel", f"{sp} does not divide data.seq_len {cfg.data.seq_len} into equal "
                                                      f"shards; use a seq_len that is a multiple of {sp}")
    if cfg.train.compile:
        raise UserError("train.compile", f"true is not available with pipeline.sequence_parallel {sp} (the attention "
                                         "exchange is not compiled); set train.compile false")


# Up to 4 micro-batches summed in bf16 lose at most a few of its 8 significant bits; beyond, small gradients vanish.
BF16_SAFE_ACCUMULATION = 4


def accumulation_warnings(cfg: Any, grad_accum: int) -> list[str]:
    """A warning when bf16 gradients are summed in bf16 over more than a few micro-batches.

    >>> from hybrid_ds.config import load_config_dict
    >>> cfg = load_config_dict({"model": {"name": "gpt2-tiny"}, "bf16": {"enabled": True},
    ...                         "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "bf16"}})
    >>> accumulation_warnings(cfg, 8)[0][:69]
    'data_types.grad_accum_dtype: bf16 sums the gradients of 8 micro-batch'
    >>> accumulation_warnings(cfg, 4), accumulation_warnings(cfg.replace(data_types={"grad_accum_dtype": "fp32"}), 8)
    ([], [])
    """
    accum = cfg.grad_accum_dtype or cfg.precision
    if cfg.precision != "bf16" or accum not in ("bf16", "bfloat16") or cfg.zero_stage == 3 \
            or grad_accum <= BF16_SAFE_ACCUMULATION:
        return []
    fix = ('set it to "fp32"' if cfg.zero_stage else
           'DeepSpeed sums in fp32 only with ZeRO: set zero_optimization.stage 1 (fp32 sums are its default here)')
    return [f"data_types.grad_accum_dtype: bf16 sums the gradients of {grad_accum} micro-batches in bf16 (8 "
            f"significant bits: small gradients are lost); {fix}"]


def layout_warnings(cfg: Any, layout: Any) -> list[str]:
    """The warnings that depend on the layout (hybrid_ds.config.topology): a pipeline bubble, bf16 sums over many
    micro-batches. ``plan`` recommends no layout with any."""
    return bubble_warnings(cfg.pipeline.schedule, layout) + accumulation_warnings(cfg, layout.grad_accum)


def bubble_warnings(schedule: str, layout: Any) -> list[str]:
    """1F1B's warning below 4 micro-batches a stage (hybrid_ds.config.topology); ZB-H1's where it idles more than
    1F1B does at 4 micro-batches a stage.

    >>> from hybrid_ds.config.topology import resolve_layout
    >>> layout = resolve_layout(8, 4, 12, 1, 8)
    >>> len(bubble_warnings("1f1b", layout)), bubble_warnings("zb-h1", layout)
    (1, [])
    >>> bubble_warnings("zb-h1", resolve_layout(8, 4, 12, 1, 2))[0][:60]
    'gradient_accumulation_steps=2 with pipeline.schedule zb-h1: '
    """
    if schedule == "1f1b":
        return layout.warnings()
    p, m = layout.stages, layout.grad_accum
    idle = bubble(schedule, p, m)
    if p > 1 and idle > bubble("1f1b", p, 4 * p):
        return [f"gradient_accumulation_steps={m} with pipeline.schedule {schedule}: the pipeline idles {idle:.1%} of "
                f"each step; raise gradient_accumulation_steps to shrink it"]
    return []


def run_warnings(cfg: Any, layout: Any) -> list[str]:
    """What ``validate``, ``train`` and ``--dry-run`` warn of for ``cfg`` at ``layout``: :func:`layout_warnings` and a
    schedule whose length differs from train.max_steps."""
    return layout_warnings(cfg, layout) + schedule_warnings(cfg.deepspeed, cfg.train.max_steps)
