"""Process group, threads and the DeepSpeed engine for a run config, with DeepSpeed's sharp edges wrapped."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from datetime import timedelta
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers.integrations import HfDeepSpeedConfig

from hybrid_ds.seam.autoep import autoep_layers, autoep_output_recorders, autoep_presets
from hybrid_ds.seam.engines import initialize_pipeline, pipeline_engine_class
from hybrid_ds.seam.environment import arch_list_deepspeed_can_parse, disable_shm_comm_op
from hybrid_ds.seam.numerics import reduce_over_one_rank_is_nothing, skip_non_finite_steps, use_global_clip_norm
from hybrid_ds.seam.pipeline_module import tied_prefix
from hybrid_ds.seam.universal import describe_for_universal
from hybrid_ds.seam.zero_bubble import use_program
from hybrid_ds.config.schedule import buffers_needed, instructions
from hybrid_ds.config.deepspeed import effective_deepspeed_config
from hybrid_ds.errors import UserError
from hybrid_ds.models.build import checkpoint_folder
from hybrid_ds.models.head_loss import split_backward
from hybrid_ds.models.masks import document_positions
from hybrid_ds.models.resolve import auto_class
from hybrid_ds.runtime.pipeline import build_pipeline_module
from hybrid_ds.runtime.plan import Plan
from hybrid_ds.runtime.quiet import quiet_deepspeed_logger


def init_distributed(timeout_minutes: float = 30.0) -> int:
    """Start the process group (nccl on GPUs, gloo on CPU, DeepSpeed's choice) and return the world size.

    Works under the ``deepspeed`` launcher, torchrun, or as a plain single process (world size 1).
    """
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)
    if get_accelerator().device_name() == "cpu":
        # The launcher sets no thread count: without this every rank uses every core and they fight.
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
        disable_shm_comm_op()  # else a first CPU run compiles an op training never uses
    else:
        arch_list_deepspeed_can_parse()
    # Tied weights make DeepSpeed broadcast inside autograd; torch warns, the gradients are right (PITFALLS 8).
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    quiet_deepspeed_logger()
    try:
        deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))
    except torch.distributed.DistNetworkError as err:
        if "EADDRINUSE" not in str(err):
            raise
        port = os.environ["MASTER_PORT"]
        raise UserError("MASTER_PORT", f"port {port} on {os.environ['MASTER_ADDR']} is in use (another run, or one "
                                       "that has not exited yet): launch with deepspeed --master_port PORT, a free "
                                       "one (or set MASTER_PORT)") from None
    patient_group()
    return torch.distributed.get_world_size()


def device() -> torch.device:
    name = get_accelerator().device_name()
    return torch.device(name if name == "cpu" else f"{name}:{get_accelerator().current_device()}")


def deepspeed_config(plan: Plan) -> dict[str, Any]:
    """The run's effective DeepSpeed config on this machine (:func:`hybrid_ds.config.deepspeed.effective_deepspeed_config`,
    which the estimator reads too)."""
    return effective_deepspeed_config(plan.config, plan.layout, device().type,
                                      [s.trainable for s in plan.stage_plans])


def parameter_groups(module: torch.nn.Module, no_weight_decay: list[str] | tuple[str, ...]) -> list[Any]:
    """``module``'s trainable parameters as the optimizer's groups: those of the kinds in ``no_weight_decay``
    ("bias", "norm": any other 1-D parameter, "embedding": a table of an ``nn.Embedding``) in a group with
    ``weight_decay`` 0, the rest in a group that takes the optimizer's own; a flat list when nothing is exempt.
    Always two groups otherwise, on every stage (a stage without one kind splits the other: see below).

    Works on a PipelineModule and on the Hugging Face model alike (ZeRO-3's partitioned parameters keep their
    shape in ``ds_shape``). A parameter shared by two modules (a tied embedding) is listed once.
    """
    embedding = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}

    def kind(name: str, param: torch.nn.Parameter) -> str:
        if id(param) in embedding:
            return "embedding"
        if len(getattr(param, "ds_shape", param.shape)) <= 1:
            return "bias" if name.rpartition(".")[2] == "bias" else "norm"
        return "matrix"

    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not no_weight_decay or len(params) < 2:
        return [p for _, p in params]
    exempt = [p for n, p in params if kind(n, p) in no_weight_decay]
    decay = [p for n, p in params if kind(n, p) not in no_weight_decay]
    # Named: DeepSpeed's MoE support (AutoEP) splits each group by its name into expert and shared parameters.
    groups = [{"name": "decay", "params": decay}, {"name": "no_decay", "params": exempt, "weight_decay": 0.0}]
    # Two groups on every stage: DeepSpeed drops an empty group, and its ZeRO optimizers reduce the gradient norm
    # once per group over all stages, so a stage with one group fewer (only norms and a tied embedding) hangs the
    # others. The kind a stage lacks is stood in for by the last parameter of the other kind, in its own group.
    full, empty = (groups[0], groups[1]) if decay else (groups[1], groups[0])
    if not empty["params"]:
        groups[groups.index(empty)] = {**full, "name": f"{full['name']}:last", "params": full["params"][-1:]}
        full["params"] = full["params"][:-1]
    return groups


def build_pipeline_engine(plan: Plan) -> Any:
    """PipelineModule + PipelineEngine for this rank, with a global gradient-clipping norm.

    The engine is ``seam.engines.OneBackwardPipelineEngine`` (one backward pass per micro-batch, whatever a stage
    outputs); ZeRO-2 gets its subclass that partitions gradients over data parallel between micro-batches
    (``seam.engines.PartitionedGradientsPipelineEngine``).
    """
    module = build_pipeline_module(plan, device())
    describe_for_universal(module, [re.escape(tied_prefix())])  # saved by each stage that holds them
    engine_class = pipeline_engine_class(plan.zero_stage)
    engine = initialize_pipeline(
        engine_class, model=module, model_parameters=parameter_groups(module, plan.config.train.no_weight_decay),
        config=deepspeed_config(plan))
    if plan.config.pipeline.schedule == "zb-h1":
        program = instructions("zb-h1", engine.num_stages, engine.micro_batches, engine.stage_id)
        use_program(engine, [(i.kind, i.micro_batch) for i in program], max(2, buffers_needed(program)),
                    around_input_pass=split_backward)
    use_global_clip_norm(engine)
    reduce_over_one_rank_is_nothing(engine)
    if plan.zero_note and torch.distributed.get_rank() == 0:
        print(f"hybrid-ds: {plan.zero_note}", flush=True)
    skip_non_finite_steps(engine)
    return engine


# ---------------------------------------------------------------- ZeRO-2/3: the plain Hugging Face model


class PlainEngine:
    """DeepSpeed's ordinary engine on the Hugging Face model, driven like the PipelineEngine.

    ``train_batch`` runs gradient_accumulation_steps micro-batches (the model's own loss, scaled by
    DeepSpeed) and returns their mean loss averaged over data-parallel ranks; ``eval_batch`` returns
    this rank's mean eval loss. Everything else is the DeepSpeed engine's own. With ``documents``
    (``data.document_mask``) the model gets each document's own positions and no padding mask, transformers'
    packed-sequence format, from which its mask helpers make the block-diagonal mask.
    """

    def __init__(self, engine: Any, grad_accum: int, documents: bool = False):
        self.engine = engine
        self.grad_accum = grad_accum
        self.documents = documents

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def _kwargs(self, micro_batch: tuple) -> dict[str, torch.Tensor]:
        inputs, labels = micro_batch
        names = ("input_ids", "attention_mask", "token_type_ids")
        kwargs = {n: t.to(device()) for n, t in zip(names, inputs)}
        if self.documents:  # the attention mask holds document indices (hybrid_ds.data.feed.document_ids)
            kwargs["position_ids"] = document_positions(kwargs.pop("attention_mask"))
            kwargs["use_cache"] = False  # transformers looks for packed documents only without a cache
        return {**kwargs, "labels": labels.to(device())}

    def train_batch(self, data_iter: Any) -> torch.Tensor:
        total = torch.zeros((), device=device())
        for _ in range(self.grad_accum):
            loss = self.engine(**self._kwargs(next(data_iter))).loss
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        total /= self.grad_accum
        torch.distributed.all_reduce(total)
        return total / torch.distributed.get_world_size()

    def eval_batch(self, data_iter: Any, num_micro_batches: int) -> torch.Tensor:
        self.engine.eval()
        with torch.no_grad():
            losses = [self.engine(**self._kwargs(next(data_iter))).loss.float() for _ in range(num_micro_batches)]
        self.engine.train()
        return torch.stack(losses).mean()


def build_plain_engine(plan: Plan) -> PlainEngine:
    """The whole Hugging Face model under ZeRO-2/3 or DeepSpeed's AutoEP (one stage, data parallel over every
    rank; AutoEP then spreads each MoE layer's experts over ``expert_parallel.autoep_size`` of them)."""
    cfg = plan.config
    ds = deepspeed_config(plan)
    # Kept alive while the model is built: transformers then builds under deepspeed.zero.Init for
    # ZeRO-3 (each rank allocates only its partition) and initializes through gathered parameters.
    hf_ds_config = HfDeepSpeedConfig(ds)  # noqa: F841
    resolved = plan.resolved
    auto = auto_class(resolved.family)
    torch.manual_seed(cfg.train.seed)
    if cfg.model.pretrained:
        folder = checkpoint_folder(resolved.checkpoint, cfg.model.revision)
        model = auto.from_pretrained(folder, config=resolved.hf_config, dtype=torch.float32)
    else:
        model = auto.from_config(resolved.hf_config)
    describe_for_universal(model, [])
    with autoep_output_recorders() if cfg.expert_parallel else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=parameter_groups(model, cfg.train.no_weight_decay), config=ds)
    if cfg.expert_parallel and not autoep_layers(engine.module):
        raise UserError("expert_parallel.enabled", f"AutoEP found no MoE layer it knows in {cfg.model.name} "
                                                   f"({resolved.hf_config.model_type}); its presets: "
                                                   f"{', '.join(autoep_presets())}; or set "
                                                   "expert_parallel.moe_layer_pattern and its companions")
    skip_non_finite_steps(engine)
    return PlainEngine(engine, plan.layout.grad_accum, plan.document_mask)


def build_engine(plan: Plan) -> Any:
    """PipelineEngine for ZeRO 0-2 with stages and ZeRO 0/1 at one stage; the plain engine for ZeRO-2/3 at one."""
    engine = build_pipeline_engine(plan) if plan.config.pipeline_engine else build_plain_engine(plan)
    monitor_by_step(engine, plan.layout.train_batch)
    return engine


def monitor_by_step(engine: Any, train_batch: int) -> None:
    """DeepSpeed's monitors (``tensorboard``, ``wandb``, ``csv_monitor``, ``comet``) against the optimizer step.

    DeepSpeed writes ``Train/Samples/NAME`` at the samples read so far; these become ``Train/NAME`` at the step
    (samples // train_batch_size). DeepSpeed's own ``Train/Samples/eval_loss`` (the pipeline engine's, at the samples
    of the last step) is left out: the trainer writes ``Eval/loss`` and ``Eval/perplexity`` at the step, so that an
    evaluation is in one place. Through ``engine.monitor.write_events``, DeepSpeed's monitor interface.
    """
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled:
        return
    write = monitor.write_events

    def by_step(events: list[tuple[str, Any, int]]) -> None:
        kept = []
        for name, value, x in events:
            if name == "Train/Samples/eval_loss":
                continue
            if name.startswith("Train/Samples/"):
                name, x = "Train/" + name.removeprefix("Train/Samples/"), x // train_batch
            kept.append((name, value, x))
        if kept:
            write(kept)

    monitor.write_events = by_step


PATIENT_TIMEOUT = timedelta(hours=24)
_patient: list[Any] = []  # the group of patient_group(), made once per process group


def patient_group() -> Any:
    """A gloo group over the world whose collectives wait up to ``PATIENT_TIMEOUT``, not the process group's timeout
    (30 min): for ranks that wait while one rank does work of unbounded length (packing a corpus, converting a large
    checkpoint). Made by every rank at :func:`init_distributed`, so in the same order everywhere."""
    if not _patient or _patient[0][0] is not torch.distributed.group.WORLD:
        _patient[:] = [(torch.distributed.group.WORLD,
                        torch.distributed.new_group(backend="gloo", timeout=PATIENT_TIMEOUT))]
    return _patient[0][1]


def raise_shared(error: UserError | None, patient: bool = False) -> None:
    """Every rank raises the mistake that any rank met (the first rank's first) as its own, instead of the
    others meeting it as a dead peer. All ranks call this; ``patient``: after work of unbounded length on one rank,
    the others wait for it however long it takes (:func:`patient_group`)."""
    errors: list[tuple[str, str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, None if error is None else (error.key, error.message),
                                        group=patient_group() if patient else None)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise UserError(*first)


def data_parallel(engine: Any, sp: int = 1) -> tuple[int, int, Any]:
    """(data-parallel rank, size, group) of this rank under either engine: the rank and number of replicas, which read
    different micro-batches, and DeepSpeed's data-parallel group, which holds the ``sp`` sequence-parallel ranks of
    each replica (consecutive: hybrid_ds.runtime.pipeline.sequence_groups)."""
    grid = getattr(engine, "grid", None)
    if grid is not None:
        return (grid.get_data_parallel_rank() // sp, grid.get_data_parallel_world_size() // sp,
                grid.get_data_parallel_group())
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), None
