"""What the plan and the estimator print: tables, JSON data, and one formatter per kind of number. Pure Python.

``validate`` and ``train --dry-run`` print :func:`format_plan` (hybrid_ds.runtime.plan) and :func:`format_estimate`
(hybrid_ds.estimate); ``compare`` and ``plan`` use the same number formatters.
"""

from __future__ import annotations

from typing import Any

from hybrid_ds.estimate.architecture import Arch
from hybrid_ds.estimate.flops import forward_flops_per_token
from hybrid_ds.estimate.run import Run
from hybrid_ds.estimate.step import COMPUTE_EFFICIENCY, Estimate
from hybrid_ds.config.schedule import bubble as schedule_bubble
from hybrid_ds.config.topology import layer_span, process_groups


def human_bytes(n: float) -> str:
    """Bytes in GiB / MiB / KiB.

    >>> human_bytes(3 * 2**30), human_bytes(1536)
    ('3.00 GiB', '1.5 KiB')
    """
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float, unit: str = "") -> str:
    """A count with an SI prefix; a bare count (parameters) writes 10^9 as "B", as model names do.

    >>> human_count(124_439_808), human_count(6.74e9), human_count(3.1e18, "FLOPs")
    ('124.4M', '6.7B', '3.1EFLOPs')
    """
    for suffix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{'B' if suffix == 'G' and not unit else suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_time(seconds: float) -> str:
    """Seconds as ms below one second.

    >>> human_time(0.25), human_time(3.5)
    ('250 ms', '3.50 s')
    """
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def params_text(arch: Arch) -> str:
    """Parameters, and for a Mixture-of-Experts model those one token uses.

    >>> from hybrid_ds.estimate.architecture import arch_from_preset
    >>> params_text(arch_from_preset("llama2-7b"))
    '6.7B'
    """
    return human_count(arch.params) + (f", {human_count(arch.active_params)} active" if arch.experts else "")


def expert_text(est: Estimate, stage: Any) -> str:
    """The routed experts a stage holds, and the bytes of their model states ("-" for a dense model)."""
    if not est.run.arch.experts:
        return "-"
    return f"{human_count(stage.expert_params)} = {human_bytes(stage.expert_states)}"


def layout_text(run: Run) -> str:
    ckpt = f", recompute every {run.checkpoint_interval}" if run.checkpoint_interval else ""
    sp = f" x sp {run.sp}" if run.sp > 1 else ""
    return (f"{run.stages} stages{sp} x {run.dp} dp, ZeRO-{run.zero}, {run.precision}, micro-batch {run.micro_batch} "
            f"x {run.grad_accum} accumulation, seq {run.seq_len}{ckpt}")


def format_estimate(est: Estimate) -> str:
    """The estimate as the table ``train --dry-run`` prints."""
    run, arch = est.run, est.run.arch
    where = est.cluster.describe() if est.cluster else f"{run.world_size} ranks ({est.runtime}, no device memory given)"
    lines = [f"estimate   {arch.name}: {params_text(arch)} parameters on {where}",
             f"layout     {layout_text(run)}; optimizer {est.stages[0].state.optimizer_path}",
             *([lora_text(run.lora, sum(s.trainable for s in est.stages), arch.params)]
               if run.lora else []),
             "",
             f"{'stage':>5}  {'holds':<26} {'params':>8}  " + (f"{'trainable':>9}  " if run.lora else "")
             + f"{'model states':>12}  {'activations (in flight)':>23}  "
             f"{'buffers':>10}  {'total':>10}" + (f"  {'routed experts (states)':>24}" if arch.experts else "")]
    for s in est.stages:
        acts = f"{human_bytes(s.activations + s.logits)} ({s.in_flight} mb)"
        buffers = s.state.comm_buffer + s.pipe_buffers + s.overhead
        lines.append(f"{s.stage:>5}  {layer_span(s.first_layer, s.last_layer, arch.layers):<26} {human_count(s.params):>8}  "
                     + (f"{human_count(s.trainable):>9}  " if run.lora else "")
                     + f"{human_bytes(s.state.total):>12}  {acts:>23}  {human_bytes(buffers):>10}  "
                     f"{human_bytes(s.total):>10}" + (f"  {expert_text(est, s):>24}" if arch.experts else ""))
    b = est.binding
    busiest = max((s.comm for s in est.stages), key=lambda comm: sum(comm.values()))
    lines += ["",
              f"model states on stage {b.stage} ({b.state.phase} phase): params {human_bytes(b.state.params)}, "
              f"grads {human_bytes(b.state.grads)}, fp32 master {human_bytes(b.state.master)}, "
              f"Adam {human_bytes(b.state.optimizer)}; reduce bucket {human_bytes(b.state.comm_buffer)}"
              + _transients(b),
              f"FLOPs/step  model {human_count(est.model_flops, 'FLOPs')} (3 passes), hardware "
              f"{human_count(est.hardware_flops, 'FLOPs')}"
              f" (with recompute); causal attention counted as full s x s; forward "
              f"{human_count(forward_flops_per_token(arch, run.seq_len), 'FLOPs')}/token"
              + (f" with the top-{arch.experts.top_k} of {arch.experts.count} experts" if arch.experts else ""),
              f"bubble     {bubble_text(run.schedule, run.stages, run.grad_accum)}",
              f"comm/rank  {human_bytes(est.comm_per_rank)} per step"
              + (f" ({', '.join(f'{k} {human_bytes(v)}' for k, v in busiest.items())})" if busiest else "")]
    if est.step_time is not None:
        lines.append(f"step time  {human_time(est.step_time)} at {COMPUTE_EFFICIENCY:.0%} of peak FLOP/s; "
                     f"MFU {est.mfu:.1%}; {run.tokens_per_step / est.step_time:,.0f} tokens/s")
    if est.fits is not None:
        verdict = "fits" if est.fits else "DOES NOT FIT"
        lines.append(f"verdict    {verdict}: stage {b.stage} needs {human_bytes(b.total)} of "
                     f"{human_bytes(est.cluster.memory)} ({b.total / est.cluster.memory:.0%})")
    lines += [f"warning: {w}" for w in est.warnings]
    return "\n".join(lines)


def lora_text(lora: Any, trainable: int, frozen: int) -> str:
    """The LoRA line of ``validate`` / ``--dry-run``: the adapters and what is trained (``frozen``: the model's
    parameters, each once).

    >>> from hybrid_ds.config import LoraConfig
    >>> lora_text(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), 40_000, 8_000_000)
    'lora       r=8 on q_proj, v_proj: 40.0K trainable adapter parameters (0.50%), 8.0M frozen'
    """
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    return (f"lora       r={lora.r} on {targets}: {human_count(trainable)} trainable adapter parameters "
            f"({trainable / (trainable + frozen):.2%}), {human_count(frozen)} frozen")


def _transients(s: Any) -> str:
    """The model states' transients of a stage, as format_estimate appends them (hybrid_ds.estimate.model_state)."""
    parts = [f"in backward {human_bytes(s.state.backward_transient)} (ZeRO-2: a whole gradient before its reduction)"
             if s.state.backward_transient else "",
             f"outside backward {human_bytes(s.state.transient)}" if s.state.transient else ""]
    return "; transient " + ", ".join(p for p in parts if p) if any(parts) else ""


def estimate_dict(est: Estimate) -> dict[str, Any]:
    """The estimate as JSON data."""
    run = est.run
    stages = [{"stage": s.stage, "holds": layer_span(s.first_layer, s.last_layer, run.arch.layers), "params": s.params,
               "trainable_params": s.trainable, "frozen_params": s.frozen,
               "optimizer": s.state.optimizer_path, "peak_phase": s.state.phase,
               "bytes": {"params": s.state.params, "grads": s.state.grads, "master": s.state.master,
                         "optimizer_states": s.state.optimizer, "reduce_bucket": s.state.comm_buffer,
                         "transient_in_backward": s.state.backward_transient,
                         "transient_outside_backward": s.state.transient,
                         "activations": s.activations, "logits": s.logits, "pipe_buffers": s.pipe_buffers,
                         "overhead": s.overhead, "total": s.total},
               "expert_params": s.expert_params, "expert_state_bytes": s.expert_states,
               "micro_batches_in_flight": s.in_flight, "hardware_flops_per_micro_batch": s.flops_per_micro_batch,
               "comm_bytes_per_step": s.comm} for s in est.stages]
    return {"model": run.arch.name, "params": run.arch.params, "active_params": run.arch.active_params,
            "experts": ({"count": run.arch.experts.count, "top_k": run.arch.experts.top_k}
                        if run.arch.experts else None), "source": run.source,
            "forward_flops_per_token": forward_flops_per_token(run.arch, run.seq_len),
            "cluster": est.cluster.describe() if est.cluster else None,
            "device_memory": est.device_memory, "world_size": run.world_size, "stages": run.stages, "dp": run.dp,
            "sequence_parallel": run.sp, "zero": run.zero, "precision": run.precision, "micro_batch": run.micro_batch,
            "grad_accum": run.grad_accum, "seq_len": run.seq_len, "checkpoint_interval": run.checkpoint_interval,
            "model_flops_per_step": est.model_flops, "hardware_flops_per_step": est.hardware_flops,
            "bubble": est.bubble, "comm_bytes_per_rank": est.comm_per_rank, "step_time_s": est.step_time,
            "mfu": est.mfu, "fits": est.fits, "binding_stage": est.binding.stage,
            "peak_bytes": est.binding.total, "stage_estimates": stages, "warnings": est.warnings}


def format_plan(plan: Any) -> str:
    """A run's plan (hybrid_ds.runtime.plan.Plan) as ``validate`` and ``train --dry-run`` print it."""
    cfg, layout = plan.config, plan.layout
    hf, lora = plan.resolved.hf_config, plan.config.model.lora
    trainable = sum(s.trainable for s in plan.stage_plans)
    lines = [
        f"config     {cfg.source}" + (f"  ({cfg.description})" if cfg.description else ""),
        f"model      {cfg.model.name}: {hf.model_type} {plan.resolved.family.task}, {plan.n_blocks} layers, "
        f"hidden {hf.hidden_size}, {human_count(plan.total_params)} parameters"
        + (" (pretrained)" if cfg.model.pretrained else " (random init)"),
        f"layout     world size {layout.world_size} = stages={layout.stages}"
        + (f" x sp={layout.sp}" if layout.sp > 1 else "") + f" x dp={layout.dp}; "
        f"ZeRO-{cfg.zero_stage}; {cfg.precision}; engine "
        + ("PipelineEngine" if cfg.pipeline_engine else "DeepSpeedEngine (plain HF model)"),
        *([f"           {plan.zero_note}"] if plan.zero_note else []),
        *groups_text(layout),
        f"batch      train_batch_size {layout.train_batch} = micro {layout.micro_batch} x grad_accum "
        f"{layout.grad_accum} x dp {layout.dp}; {layout.train_batch * cfg.data.seq_len:,} tokens per step "
        f"at seq_len {cfg.data.seq_len}",
        f"documents  {documents_text(plan)}",
        f"bubble     {bubble_text(cfg.pipeline.schedule, layout.stages, layout.grad_accum)}",
        f"partition  {cfg.pipeline.partition} -> boundaries {plan.boundaries}",
        *([lora_text(lora, trainable, plan.total_params)] if lora else []),
        "",
        f"{'stage':>5}  {'layers':<8}  {'holds':<32}  {'params':>9}  {'param bytes':>11}"
        + (f"  {'trainable':>9}  {'frozen':>9}" if lora else ""),
    ]
    for s in plan.stage_plans:
        span = f"{s.first_layer}-{s.last_layer}"
        lines.append(f"{s.stage:>5}  {span:<8}  {layer_span(s.first_layer, s.last_layer, plan.n_blocks):<32}  "
                     f"{human_count(s.params):>9}  {human_bytes(s.param_bytes):>11}"
                     + (f"  {human_count(s.trainable):>9}  {human_count(s.params - s.trainable):>9}" if lora else ""))
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def groups_text(layout: Any, shown: int = 4) -> list[str]:
    """The process groups by rank (hybrid_ds.config.topology.process_groups), the first ``shown`` of each kind."""
    if layout.world_size == 1:
        return []
    groups = process_groups(layout)
    kinds = [("pipeline", "stage to stage"), ("data", "gradients averaged, ZeRO partitions")]
    if layout.sp > 1:
        kinds.append(("sequence", f"a replica's {layout.sp} shards of each sequence, attention's all-to-all"))
    lines = []
    for kind, does in kinds:
        listed = " ".join(str(g) for g in groups[kind][:shown])
        more = f" ... ({len(groups[kind])} groups)" if len(groups[kind]) > shown else ""
        lines.append(f"{'groups' if not lines else '':<10} {kind} ({does}): {listed}{more}")
    return lines


def documents_text(plan: Any) -> str:
    """What packing does at document boundaries (``data.document_mask``), and why where the default chose."""
    text = ("kept apart: positions restart, attention stays inside each" if plan.document_mask
            else "see each other inside a packed block")
    if plan.config.data.document_mask is None:
        text += " (data.document_mask null: on when fine-tuning a pretrained causal LM that allows it)"
    answers = {"chat": "chat rows, loss on the assistant turns only", "prompt_completion":
               "prompt/completion rows, loss on the completions only"}.get(plan.config.data.format)
    return f"{answers}; {text}" if answers else text


def plan_dict(plan: Any) -> dict:
    """The plan as JSON data (``hybrid-ds validate --json``)."""
    layout = plan.layout
    return {
        "config": plan.config.source, "model": plan.config.model.name,
        "model_type": plan.resolved.hf_config.model_type, "task": plan.resolved.family.task,
        "layers": plan.n_blocks, "params": plan.total_params,
        "world_size": layout.world_size, "stages": layout.stages, "sequence_parallel": layout.sp, "dp": layout.dp,
        "process_groups": process_groups(layout),
        "micro_batch": layout.micro_batch, "grad_accum": layout.grad_accum, "train_batch": layout.train_batch,
        "zero_stage": plan.config.zero_stage, "precision": plan.config.precision, "bubble": layout.bubble,
        "boundaries": plan.boundaries, "document_mask": plan.document_mask,
        "stage_plan": [{"stage": s.stage, "layers": s.layer_names, "params": s.params,
                        "param_bytes": s.param_bytes, "trainable_params": s.trainable} for s in plan.stage_plans],
        "warnings": plan.warnings,
    }


def bubble_text(schedule: str, stages: int, micro_batches: int) -> str:
    """The idle fraction of this schedule's step, with the other schedule's beside it (F = B = W).

    >>> bubble_text("1f1b", 4, 8)
    '1F1B (p-1)/(m+p-1) = 27.3% (pipeline.schedule zb-h1: 11.1%)'
    >>> bubble_text("zb-h1", 4, 8)
    'ZB-H1 (p-1)/(3m+p-1) = 11.1% (pipeline.schedule 1f1b: 27.3%)'
    """
    formula = {"1f1b": "1F1B (p-1)/(m+p-1)", "zb-h1": "ZB-H1 (p-1)/(3m+p-1)" if micro_batches >= stages else "ZB-H1"}
    other = "zb-h1" if schedule == "1f1b" else "1f1b"
    text = f"{formula[schedule]} = {schedule_bubble(schedule, stages, micro_batches):.1%}"
    if stages > 1:
        text += f" (pipeline.schedule {other}: {schedule_bubble(other, stages, micro_batches):.1%})"
    return text
