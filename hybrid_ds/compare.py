"""``hybrid-ds compare``: presets, configs and layouts side by side (memory per stage, FLOPs, time).

Pure Python like :mod:`hybrid_ds.estimate` (matplotlib only for ``--plot``): nothing here imports torch for
presets and named families; a folder of a model the generic adapter maps is read on the meta device
(:func:`hybrid_ds.models.shape.model_arch`). ``hybrid-ds plan`` (hybrid_ds.plan_search) shares the inputs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid_ds.config import ModelConfig, RunConfig, load_config, load_config_dict
from hybrid_ds.errors import UserError, at_least, fraction
from hybrid_ds.plot import pyplot
from hybrid_ds.estimate.flops import forward_flops_per_token
from hybrid_ds.estimate.run import run_from_config
from hybrid_ds.estimate.step import COMPUTE_EFFICIENCY, Estimate, estimate, longest_sequence
from hybrid_ds.estimate.gpus import Cluster, get_gpu, make_cluster, parse_cluster, parse_memory
from hybrid_ds.models.shape import model_arch
from hybrid_ds.estimate.report import estimate_dict, expert_text, human_bytes, human_count, human_time, params_text

PRECISION_KEYS = {"fp32": {"bf16": False, "fp16": False}, "bf16": {"bf16": True, "fp16": False},
                   "fp16": {"bf16": False, "fp16": True}}
DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}


# ---------------------------------------------------------------- arguments


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=at_least(1), help="GPUs in the cluster (default: the config's description, e.g. "
                                            "'16x A100-80GB', else stages x the data-parallel size its batch implies)")
    p.add_argument("--gpu", help="GPU kind: h100, h200, a100, a100-40gb, v100, l40s, a10g, rtx4090 (default: "
                                 "the config's description, else h100)")
    p.add_argument("--gpu-mem", help="memory per GPU, e.g. 80GB or 40GiB (default: the GPU's)")
    p.add_argument("--nodes", type=at_least(1), help="nodes the GPUs are spread over (default: full nodes of 8)")
    p.add_argument("--efficiency", type=fraction, default=COMPUTE_EFFICIENCY,
                   help=f"achieved / peak matmul FLOP/s for the step time (default {COMPUTE_EFFICIENCY})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=at_least(1), help="pipeline stages")
    p.add_argument("--sp", type=at_least(1), help="pipeline.sequence_parallel: ranks sharing each sequence")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--micro-batch", type=at_least(1), help="train_micro_batch_size_per_gpu")
    p.add_argument("--grad-accum", type=at_least(1), help="gradient_accumulation_steps (micro-batches per step)")
    p.add_argument("--seq-len", type=at_least(8), help="tokens per sequence")
    p.add_argument("--precision", choices=tuple(PRECISION_KEYS), help="training precision")
    p.add_argument("--checkpoint", type=at_least(0), metavar="N", help="recompute activations every N layers (0 = off)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def add_compare_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare presets and layouts: memory per stage, FLOPs, time (no torch)",
                       description="Each INPUT is a run config (configs/*.json) or an architecture preset; layout "
                                   "flags override what the configs say. Presets default to 1 stage, ZeRO-1, bf16, "
                                   "micro-batch 1 x 8, seq 2048 (or the model's context if shorter).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="run config file or architecture preset")
    _add_layout_args(p)
    add_cluster_args(p)
    p.add_argument("--plot", metavar="OUT.png", help="stacked memory bars per stage per input (needs matplotlib)")
    p.set_defaults(func=cmd_compare)


# ---------------------------------------------------------------- inputs


@dataclass
class Entry:
    label: str
    estimate: Estimate | None = None
    error: str | None = None


def _layout_overrides(args: argparse.Namespace) -> list[str]:
    sets = []
    for flag, key in (("stages", "pipeline.stages"), ("sp", "pipeline.sequence_parallel"),
                      ("zero", "zero_optimization.stage"),
                      ("micro_batch", "train_micro_batch_size_per_gpu"), ("grad_accum", "gradient_accumulation_steps"),
                      ("seq_len", "data.seq_len"), ("checkpoint", "pipeline.activation_checkpoint_interval")):
        if getattr(args, flag, None) is not None:
            sets.append(f"{key}={getattr(args, flag)}")
    if getattr(args, "precision", None):
        sets += [f"{key}.enabled={json.dumps(on)}" for key, on in PRECISION_KEYS[args.precision].items()]
    return sets


def is_config_file(item: str) -> bool:
    return item.endswith(".json") or Path(item).is_file()


def load_input(item: str, overrides: list[str]) -> RunConfig:
    """A run config file (its GPU profile: the cluster is GPUs), or a preset with the compare defaults."""
    if is_config_file(item):
        return load_config(item, overrides, profile="gpu")
    arch = model_arch(ModelConfig(name=item))
    raw = {"description": "", "model": {"name": item}, "data": {"seq_len": min(2048, arch.max_positions)},
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 8,
           "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}
    return load_config_dict(raw, overrides, source=item)


def cluster_for(cfg: RunConfig, args: argparse.Namespace) -> Cluster:
    """Flags first, then the "NNx GPU-MEMGB" of the config's description, then the batch arithmetic."""
    described = parse_cluster(cfg.description)
    gpus = args.gpus if args.gpus is not None else (described[0] if described else None)
    if gpus is None:  # the world size the batch numbers imply (hybrid_ds.runtime.plan.default_world_size)
        micro, accum, total = cfg.micro_batch, cfg.grad_accum, cfg.train_batch
        dp = total // (micro * accum) if micro and accum and total and total % (micro * accum) == 0 else 1
        gpus = cfg.pipeline.stages * cfg.pipeline.sequence_parallel * dp
    gpu = get_gpu(args.gpu) if args.gpu else (described[1] if described else get_gpu("h100"))
    memory = parse_memory(args.gpu_mem) if args.gpu_mem else (described[2] if described and not args.gpu else None)
    return make_cluster(gpus, gpu, memory, args.nodes)


def _entry(item: str, args: argparse.Namespace) -> Entry:
    label = Path(item).stem if is_config_file(item) else item
    try:
        cfg = load_input(item, [*args.set, *_layout_overrides(args)])
        cluster = cluster_for(cfg, args)
        run = run_from_config(cfg, cluster.gpus, model_arch(cfg.model))
        return Entry(label, estimate(run, cluster, efficiency=args.efficiency))
    except UserError as err:
        if err.key == "model.name":  # not a model: a mistake, where a layout that cannot run is a result to show
            raise UserError(label, str(err)) from None
        return Entry(label, error=str(err))


# ---------------------------------------------------------------- compare


def _rows(est: Estimate) -> list[tuple[str, str]]:
    run, b = est.run, est.binding
    acts = b.activations + b.logits
    return [
        ("model", f"{run.arch.name} ({params_text(run.arch)})"),
        ("cluster", est.cluster.describe()),
        ("layout", f"pp{run.stages}" + (f" x sp{run.sp}" if run.sp > 1 else "") + f" x dp{run.dp} ZeRO-{run.zero}"),
        ("precision", run.precision + (f", ckpt {run.checkpoint_interval}" if run.checkpoint_interval else "")),
        ("batch", f"{run.micro_batch} x {run.grad_accum} x {run.dp} x {run.seq_len}"),
        ("peak memory", f"{human_bytes(b.total)} (stage {b.stage})"),
        ("of device", f"{b.total / est.cluster.memory:.0%} of {human_bytes(est.cluster.memory)}"),
        ("fits", "yes" if est.fits else "NO"),
        ("longest seq", f"{longest_sequence(run, est.cluster.memory):,}"),
        ("trainable", f"LoRA r={run.lora.r}: {human_count(b.trainable)} of {human_count(b.params)} (stage {b.stage})"
                      if run.lora else "all"),
        ("model states", human_bytes(b.state.total)),
        ("of it experts", expert_text(est, b)),
        ("activations", f"{human_bytes(acts)} ({b.in_flight} mb)"),
        ("buffers+overhead", human_bytes(b.state.comm_buffer + b.pipe_buffers + b.overhead)),
        ("fwd FLOPs/token", human_count(forward_flops_per_token(run.arch, run.seq_len))),
        ("model FLOPs/step", human_count(est.model_flops)),
        ("hw FLOPs/step", human_count(est.hardware_flops)),
        ("bubble", f"{est.bubble:.1%}"),
        ("comm/rank/step", human_bytes(est.comm_per_rank)),
        ("step time", human_time(est.step_time)),
        ("MFU", f"{est.mfu:.1%}"),
        ("tokens/s", f"{run.tokens_per_step / est.step_time:,.0f}"),
    ]


def format_compare(entries: list[Entry]) -> str:
    names = [name for name, _ in _rows(next(e.estimate for e in entries if e.estimate))] if any(
        e.estimate for e in entries) else []
    columns = []
    for e in entries:
        if e.estimate:
            columns.append([e.label] + [value for _, value in _rows(e.estimate)])
        else:
            columns.append([e.label, "invalid: see below"] + [""] * (len(names) - 1))
    label_width = max([len(n) for n in names] + [6])
    widths = [max(len(cell) for cell in col) for col in columns]
    lines = []
    for i, name in enumerate(["", *names]):
        cells = [col[i] if i < len(col) else "" for col in columns]
        lines.append(f"{name:<{label_width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)).rstrip())
    notes = [f"{e.label}: {e.error}" for e in entries if e.error]
    warnings = [f"{e.label}: {w}" for e in entries if e.estimate for w in e.estimate.warnings]
    lines += ["", *notes] if notes else []
    lines += ["", *[f"warning: {w}" for w in warnings]] if warnings else []
    lines += ["", "Peak memory is the binding (largest) stage: model states at their peak phase, activations of the "
                  "micro-batches in flight (1F1B), logits, p2p and reduce buffers, and a 2 GiB runtime allowance. "
                  f"Step time assumes {COMPUTE_EFFICIENCY:.0%} of peak FLOP/s (--efficiency) and 70% of link bandwidth."]
    return "\n".join(lines)


def plot_compare(entries: list[Entry], out: str) -> None:
    """Stacked memory bars per stage per input, with a line at device memory."""
    plt = pyplot("--plot")
    parts = (("params + grads", "#4c72b0", lambda s: s.state.params + s.state.grads),
             ("master + Adam", "#55a868", lambda s: s.state.master + s.state.optimizer),
             ("activations + logits", "#c44e52", lambda s: s.activations + s.logits),
             ("buffers + overhead", "#8c8c8c", lambda s: s.state.comm_buffer + s.pipe_buffers + s.overhead))
    bars = sum(len(e.estimate.stages) if e.estimate else 2 for e in entries) + 2.5 * len(entries)
    fig, ax = plt.subplots(figsize=(min(16.0, max(8.0, 0.2 * bars)), 5.5))
    x, ticks = 0.0, []
    for e in entries:
        if e.estimate is None:
            ax.text(x + 0.5, 1, "invalid", rotation=90, ha="center", va="bottom", fontsize=8)
            ticks.append((x + 0.5, e.label))
            x += 2.5
            continue
        stages = e.estimate.stages
        xs = [x + i for i in range(len(stages))]
        bottom = [0.0] * len(stages)
        for name, color, value in parts:
            heights = [value(s) / 2**30 for s in stages]
            ax.bar(xs, heights, bottom=bottom, color=color, width=0.8,
                   label=name if not ax.get_legend_handles_labels()[1].count(name) else None)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.hlines(e.estimate.cluster.memory / 2**30, xs[0] - 0.5, xs[-1] + 0.5, colors="black", linestyles="--")
        ticks.append(((xs[0] + xs[-1]) / 2, e.label))
        x = xs[-1] + 2.5
    ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("GiB per GPU (one bar per pipeline stage)")
    ax.set_title("hybrid-ds compare: memory per stage; dashed line = device memory")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def cmd_compare(args: argparse.Namespace) -> int:
    if args.gpu:  # flags that apply to every input fail once, not once per column
        get_gpu(args.gpu)
    if args.gpu_mem:
        parse_memory(args.gpu_mem)
    entries = [_entry(item, args) for item in args.inputs]
    if args.json:
        print(json.dumps([{"input": item, "label": e.label, "valid": e.estimate is not None, "reason": e.error,
                           **({"estimate": estimate_dict(e.estimate)} if e.estimate else {})}
                          for item, e in zip(args.inputs, entries)], indent=2))
    else:
        print(format_compare(entries))
    if args.plot:
        plot_compare(entries, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0
