"""DeepSpeed's own keys of a run config, and the effective DeepSpeed config of a run. Pure Python.

A run config's top-level keys other than hybrid_ds's sections are DeepSpeed's, handed to it as given once checked
here (a misspelt key DeepSpeed would silently ignore). :func:`effective_deepspeed_config` is the one place that
turns a run config and its layout into the dict ``deepspeed.initialize`` gets: the engine passes it on
(hybrid_ds.runtime.engine) and the estimator reads it (hybrid_ds.estimate.run), DeepSpeed's defaults included
(:func:`zero_settings`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from hybrid_ds.errors import UserError, suggest

# Top-level keys DeepSpeed 0.19 reads (deepspeed/runtime/config.py and the config classes it builds).
# Anything else at the top level is a typo that DeepSpeed would silently ignore, so we reject it.
DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "amp", "torch_autocast", "grad_accum_dtype",
    "gradient_clipping", "prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op",
    "sparse_gradients", "communication_data_type", "seq_parallel_communication_data_type",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "aio",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "disable_allgather",
    "disable_python_gc", "log_level", "flops_profiler", "activation_checkpointing", "sparse_attention",
    "data_efficiency", "curriculum_learning", "progressive_layer_drop", "eigenvalue",
    "quantize_training", "compression_training", "elasticity", "autotuning", "checkpoint",
    "data_types", "dataloader_drop_last", "pipeline", "tensorboard", "wandb", "csv_monitor", "comet",
    "comms_logger", "timers", "nebula", "weight_quantization", "compile", "hybrid_engine",
    "tensor_parallel", "expert_parallel", "managed_gradient_accumulation",
    "use_data_before_expert_parallel_", "vocabulary_size", "zero_optimization_stage",
})

# DeepSpeed's own pipeline keys that we do not interpret; they are handed to DeepSpeed as given.
_DS_PIPELINE_KEYS = ("pipe_partitioned", "grad_partitioned")


# The names DeepSpeed 0.19.8 builds (engine._is_supported_optimizer, engine._scheduler_from_config): its own
# (runtime/config.py DEEPSPEED_OPTIMIZERS, case-insensitive; runtime/lr_schedules.py VALID_LR_SCHEDULES) and
# torch's classes (torch.optim, torch.optim.lr_scheduler). Another name fails only once the engine is built,
# as an AssertionError. tests/test_bad_inputs.py checks these lists against the installed packages.
KNOWN_TYPES = {
    "optimizer": ("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon",
                  "ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon", "NAdam",
                  "RAdam", "RMSprop", "Rprop", "SGD", "SparseAdam"),
    "scheduler": ("LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR",
                  "ChainedScheduler", "ConstantLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR",
                  "ExponentialLR", "LambdaLR", "LinearLR", "MultiStepLR", "MultiplicativeLR", "OneCycleLR",
                  "PolynomialLR", "ReduceLROnPlateau", "SequentialLR", "StepLR"),
}


def _known_type(key: str, name: str) -> bool:
    return name in KNOWN_TYPES[key] or (key == "optimizer" and name.lower() in KNOWN_TYPES[key])


def check_deepspeed_keys(ds: dict[str, Any], other_keys: tuple[str, ...] = ()) -> None:
    """DeepSpeed's top-level keys of a run config: known names, and the values hybrid_ds reads before DeepSpeed does
    (``other_keys``: the config's own top-level keys, offered as suggestions for a misspelt one)."""
    for key in ds:
        if key == "sequence_parallel_size":  # DeepSpeed's plain-engine Ulysses: it divides DeepSpeed's world size
            raise UserError(key, f"{ds[key]!r}: DeepSpeed's own sequence parallelism (its plain engine's, with "
                                 "world-size arithmetic of its own) is not how hybrid_ds runs it; set "
                                 "pipeline.sequence_parallel instead")
        if key not in DEEPSPEED_KEYS:
            valid = [*DEEPSPEED_KEYS, *other_keys]
            raise UserError(key, f"unknown top-level key; {suggest(key, valid)}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise UserError(key, f"must be a positive integer, got {value!r}")
    for key in ("zero_optimization", "fp16", "bf16", "optimizer", "scheduler", "expert_parallel"):
        if not isinstance(ds.get(key, {}), dict):
            raise UserError(key, f"must be an object, got {ds[key]!r}")
    for key in ("optimizer", "scheduler"):  # DeepSpeed reads them only when the engine is built, minutes later
        name = ds.get(key, {}).get("type", "")
        if key in ds and not (isinstance(name, str) and _known_type(key, name)):
            raise UserError(f"{key}.type", f"DeepSpeed builds no {key} named {name!r}; {suggest(name, KNOWN_TYPES[key])}")
        if not isinstance(ds.get(key, {}).get("params", {}), dict):
            raise UserError(f"{key}.params", f"must be an object, got {ds[key]['params']!r}")
    lr = ds.get("optimizer", {}).get("params", {}).get("lr", 0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
        raise UserError("optimizer.params.lr", f"must be a number >= 0, got {lr!r}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}")
    gather = ds.get("zero_optimization", {}).get("allgather_bucket_size", 2)
    if isinstance(gather, bool) or not isinstance(gather, (int, float)) or gather < 2 or gather % 2:
        raise UserError("zero_optimization.allgather_bucket_size", f"must be an even number of elements >= 2 "
                                                                   f"(DeepSpeed asserts it), got {gather!r}")
    for key in ("fp16", "bf16"):
        enabled = ds.get(key, {}).get("enabled", False)
        if enabled not in (True, False, "auto"):
            raise UserError(f"{key}.enabled", f"must be true or false, got {enabled!r}")
    for key, section in (("check_grad_overflow", "bf16"), ("compute_grad_norm", "zero_optimization")):
        if ds.get(section, {}).get(key, True) is not True:
            raise UserError(f"{section}.{key}", f"{ds[section][key]!r} turns off DeepSpeed's check for non-finite "
                                                "gradients, and a step with a NaN gradient would then write NaN into "
                                                "every parameter unseen (train.max_bad_steps relies on it); leave it "
                                                "out (true is the default)")
    _check_expert_parallel(ds.get("expert_parallel", {}))
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise UserError("gradient_clipping", f"must be a number >= 0 (0 = off), got {clip!r}")


def _check_expert_parallel(ep: dict[str, Any]) -> None:
    """The keys of DeepSpeed's ``expert_parallel`` section that decide the layout; DeepSpeed checks the rest."""
    if ep.get("enabled", False) not in (True, False):
        raise UserError("expert_parallel.enabled", f"must be true or false, got {ep['enabled']!r}")
    size = ep.get("autoep_size", 1)
    if type(size) is not int or size < 1:
        raise UserError("expert_parallel.autoep_size", f"must be a positive integer (ranks sharing one copy of "
                                                       f"the experts), got {size!r}")


# ---------------------------------------------------------------- the effective config of a run


# The schedulers whose length is a parameter without a default, and its name: the effective config sets it to
# ``train.max_steps`` where the config leaves it out, so that the schedule follows the run's length.
SCHEDULE_LENGTH = {"WarmupDecayLR": "total_num_steps", "WarmupCosineLR": "total_num_steps",
                   "CosineAnnealingLR": "T_max", "OneCycleLR": "total_steps"}


def schedule_length(ds: dict[str, Any]) -> tuple[str, Any] | None:
    """The scheduler's length parameter and the value the config gives it (None: left to ``train.max_steps``), or
    None for a scheduler without one.

    >>> schedule_length({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 2}}})
    ('total_num_steps', None)
    >>> schedule_length({"scheduler": {"type": "WarmupLR", "params": {}}}), schedule_length({})
    (None, None)
    """
    scheduler = ds.get("scheduler") or {}
    key = SCHEDULE_LENGTH.get(scheduler.get("type", ""))
    return (key, (scheduler.get("params") or {}).get(key)) if key else None


def schedule_warnings(ds: dict[str, Any], max_steps: int) -> list[str]:
    """A warning when the config's scheduler sets a length other than ``train.max_steps``, and when its warmup is
    longer than the whole schedule.

    >>> schedule_warnings({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 2000}}}, 12)[0][:72]
    'scheduler.params.total_num_steps: 2000, while train.max_steps is 12: the'
    >>> schedule_warnings({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 12}}}, 12)
    []
    >>> schedule_warnings({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 2}}}, 1)
    ['scheduler.params.warmup_num_steps: 2, longer than the 1-step schedule: the learning rate never reaches its peak']
    """
    key, length = schedule_length(ds) or (None, None)
    warnings = []
    if length is not None and length != max_steps:
        ends = "ends before the run does" if length < max_steps else "is cut off where the run ends"
        warnings.append(f"scheduler.params.{key}: {length}, while train.max_steps is {max_steps}: the learning-rate "
                        f"schedule {ends}; leave {key} out to have it follow train.max_steps")
    warmup = ((ds.get("scheduler") or {}).get("params") or {}).get("warmup_num_steps")
    total = max_steps if length is None else length
    if key == "total_num_steps" and isinstance(warmup, int) and warmup > total:
        # said once here, instead of DeepSpeed's "total_num_steps 1 is less than warmup_num_steps 2" on every rank
        warnings.append(f"scheduler.params.warmup_num_steps: {warmup}, longer than the {total}-step schedule: the "
                        f"learning rate never reaches its peak")
    return warnings


def zero_stage_to_run(requested: int, dp: int, precision: str, eligible: bool) -> int:
    """The ZeRO stage a run's engine gets: fp32 ZeRO-1/2 on the pipeline engine at one data-parallel rank runs
    as ZeRO-0.

    With one data-parallel rank there is nothing to partition: fp32 ZeRO-1/2 hold the whole optimizer state as
    ZeRO-0 does, average the gradients over one rank and step torch's optimizer on an fp32 copy equal to the
    parameters: the same update, less a copy of every gradient through the reduce buckets (1.0-1.6 s of a 10 s
    CPU step of GPT-2 small) and a 5e8-element bucket. Checkpoints resume across it (hybrid_ds.runtime.checkpoint).
    bf16 and fp16 keep their stage: with fp32 accumulation bf16 ZeRO-1 already is DeepSpeed's BF16_Optimizer,
    which DeepSpeed refuses at ZeRO-0; bf16 accumulation and fp16's loss scaling differ between ZeRO-0's
    optimizers and ZeRO-1's. The plain engine (ZeRO-2/3 at one stage) and ZeRO-Offload (``eligible`` false for
    them) keep their stage too.

    >>> [zero_stage_to_run(1, dp, precision, True) for dp, precision in ((1, "fp32"), (2, "fp32"), (1, "bf16"))]
    [0, 1, 1]
    """
    return 0 if requested in (1, 2) and dp == 1 and precision == "fp32" and eligible else requested


DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed 0.19.8's zero_optimization.reduce_bucket_size


def reduce_bucket_elements(per_stage: list[int]) -> int:
    """A ZeRO-1/2 reduce (and all-gather) bucket sized to the model: DeepSpeed's 5e8 elements, or the largest
    stage's parameter count when smaller.

    A bucket holds gradients of one stage's parameters and DeepSpeed allocates it whole (5e8 fp32 elements are
    2 GB, for a model of 124M parameters too); one the size of the largest stage still takes every gradient of a
    stage in one reduction, as the default did, so the reductions and the sums are the same. Rounded up to even:
    DeepSpeed asserts the all-gather bucket is a multiple of its ``nccl_start_alignment_factor``, 2
    (``stage_1_and_2.py``), and a stage may hold an odd number of parameters.

    >>> reduce_bucket_elements([124_000_000]), reduce_bucket_elements([4_000_000_000, 3_000_000_000])
    (124000000, 500000000)
    >>> reduce_bucket_elements([40_001, 39_999])
    40002
    """
    largest = max(per_stage)
    return min(DEEPSPEED_REDUCE_BUCKET, largest + largest % 2)


def deepspeed_sections(cfg: Any, device_kind: str) -> dict[str, Any]:
    """The DeepSpeed sections of run config ``cfg`` as a run on a ``device_kind`` ("cpu" or "gpu") machine hands them
    to DeepSpeed, before the layout adds its batch numbers, pipeline keys and ZeRO stage: the optimizer, scheduler,
    clipping and data types of :func:`effective_deepspeed_config` (which see), checked against DeepSpeed before any
    data or model work (hybrid_ds.seam.config_check)."""
    ds = copy.deepcopy(cfg.deepspeed)
    if cfg.grad_accum_dtype is not None:
        ds.setdefault("data_types", {})["grad_accum_dtype"] = cfg.grad_accum_dtype
    optimizer = ds.get("optimizer", {})
    if device_kind == "cpu" and optimizer.get("type", "").lower() in ("adam", "adamw"):
        params = optimizer.setdefault("params", {})
        if params.setdefault("torch_adam", True):
            params.setdefault("fused", True)
    ds.setdefault("gradient_clipping", 0.0)
    length = schedule_length(ds)
    if length and length[1] is None:
        params = {**(ds["scheduler"].get("params") or {}), length[0]: cfg.train.max_steps}
        ds["scheduler"] = {**ds["scheduler"], "params": params}
    return ds


def effective_deepspeed_config(cfg: Any, layout: Any, device_kind: str, stage_trainable: list[int] | None = None
                               ) -> dict[str, Any]:
    """The dict ``deepspeed.initialize`` gets for run config ``cfg`` (hybrid_ds.config.RunConfig) at ``layout``
    (hybrid_ds.config.topology.Layout), on a ``device_kind`` ("cpu" or "gpu") machine.

    - The batch numbers of the layout, DeepSpeed's pipeline keys, and ``data_types.grad_accum_dtype`` where
      hybrid_ds changes DeepSpeed's default (``RunConfig.grad_accum_dtype``).
    - ``gradient_clipping`` 0 unless set: DeepSpeed's default is 1.0; hybrid_ds clips only when the config says so.
    - The scheduler's length (:data:`SCHEDULE_LENGTH`) ``train.max_steps`` unless the config sets it.
    - On CPU, "Adam"/"AdamW" is torch's fused AdamW: DeepSpeed's FusedAdam JIT-compiles an extension there
      (minutes); torch's is the same update, and its fused CPU kernel makes one pass over the states where the
      default makes eight (0.18 s instead of 0.91 s for GPT-2 small's 124M parameters on one thread).
    - The ZeRO stage the layout runs (``RunConfig.zero_stage_at``: fp32 ZeRO-1/2 at dp=1 runs as ZeRO-0) and,
      where ZeRO-1/2 stays and ``stage_trainable`` (trainable parameters per stage) is given, reduce and
      all-gather buckets sized to the model (:func:`reduce_bucket_elements`) unless the config sets them.

    >>> from hybrid_ds.config import load_config_dict
    >>> from hybrid_ds.config.topology import resolve_layout
    >>> cfg = load_config_dict({"model": {"name": "gpt2-tiny"}, "zero_optimization": {"stage": 1},
    ...                         "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    >>> ds = effective_deepspeed_config(cfg, resolve_layout(2, 1, 2, 2, 1, None), "cpu", [1000])
    >>> ds["train_batch_size"], ds["zero_optimization"], ds["optimizer"]["params"]
    (4, {'stage': 1, 'reduce_bucket_size': 1000, 'allgather_bucket_size': 1000}, {'lr': 0.001, 'torch_adam': True, 'fused': True})
    """
    ds = deepspeed_sections(cfg, device_kind)
    # DeepSpeed counts a sequence's sp ranks as data parallel: its train_batch_size is per its data-parallel group
    ds.update(train_batch_size=layout.train_batch * layout.sp, train_micro_batch_size_per_gpu=layout.micro_batch,
              gradient_accumulation_steps=layout.grad_accum)
    ds["pipeline"] = {**{k: getattr(cfg.pipeline, k) for k in _DS_PIPELINE_KEYS},
                      "activation_checkpoint_interval": cfg.pipeline.activation_checkpoint_interval}
    if "zero_optimization" in ds:
        zero = ds["zero_optimization"] = dict(ds["zero_optimization"])
        zero["stage"] = cfg.zero_stage_at(layout.data_ranks)
        if zero["stage"] in (1, 2) and stage_trainable:
            zero.setdefault("reduce_bucket_size", reduce_bucket_elements(stage_trainable))
            zero.setdefault("allgather_bucket_size", reduce_bucket_elements(stage_trainable))
    return ds


@dataclass(frozen=True)
class ZeroSettings:
    """The ``zero_optimization`` settings the estimator needs, as DeepSpeed 0.19.8 reads them (its defaults where a
    config sets none: ``deepspeed.runtime.zero.config.DeepSpeedZeroConfig``; tests/test_config.py holds them to it).
    ``reduce_bucket`` is 0 where the run sizes the bucket to the model (:func:`effective_deepspeed_config`)."""

    stage: int = 0
    reduce_bucket: int = 0
    contiguous_gradients: bool = True
    overlap_comm: bool = False            # DeepSpeed: on by default at ZeRO-3 only
    persistence_threshold: int = 100_000  # stage3_param_persistence_threshold
    prefetch_bucket: int = 50_000_000     # stage3_prefetch_bucket_size


def zero_settings(ds: dict[str, Any]) -> ZeroSettings:
    """:class:`ZeroSettings` of an effective DeepSpeed config (:func:`effective_deepspeed_config`)."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    default = ZeroSettings()
    return ZeroSettings(stage, int(zero.get("reduce_bucket_size", 0)),
                        bool(zero.get("contiguous_gradients", default.contiguous_gradients)),
                        bool(zero.get("overlap_comm", stage == 3)),
                        int(zero.get("stage3_param_persistence_threshold", default.persistence_threshold)),
                        int(zero.get("stage3_prefetch_bucket_size", default.prefetch_bucket)))
