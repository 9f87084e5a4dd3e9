"""``hybrid-ds plan``: every layout that fits a cluster, fastest first, as ready-to-use run configs.

Not to be confused with :mod:`hybrid_ds.runtime.plan`, the resolved plan of one run: this searches over layouts
(stages, ZeRO stage, micro-batch, recompute) with the estimator, and prints each as a config whose run
would then have that plan. Pure Python like ``compare``, whose inputs and cluster flags it shares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hybrid_ds.compare import DEFAULT_OPTIMIZER, PRECISION_KEYS, add_cluster_args, is_config_file
from hybrid_ds.config import ModelConfig, load_config, load_config_dict
from hybrid_ds.config.checks import layout_warnings
from hybrid_ds.config.topology import resolve_layout
from hybrid_ds.errors import UserError, at_least
from hybrid_ds.estimate.run import run_from_config
from hybrid_ds.estimate.step import COMPUTE_EFFICIENCY, Estimate, estimate, longest_sequence
from hybrid_ds.estimate.gpus import GIGA, Cluster, make_cluster, parse_cluster, parse_memory
from hybrid_ds.models.shape import model_arch
from hybrid_ds.estimate.report import estimate_dict, human_bytes, human_time, params_text


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="layouts that fit a cluster, fastest first, as ready-to-use configs (no torch)")
    p.add_argument("model", metavar="MODEL", help="architecture preset or run config file")
    p.add_argument("--seq-len", type=at_least(8), help="tokens per sequence (default: the config's, else 2048 or the context)")
    p.add_argument("--global-batch", type=at_least(1), help="sequences per optimizer step (default: the config's, else 512)")
    p.add_argument("--precision", choices=tuple(PRECISION_KEYS), help="training precision (default: bf16)")
    p.add_argument("--top", type=at_least(0), default=3, help="layouts to print as configs (default 3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--write", metavar="DIR", help="write the --top layouts as runnable configs DIR/rank1.json, ... "
                                                  "(save_dir, scheduler, evaluation, resume filled in)")
    add_cluster_args(p)
    p.set_defaults(func=cmd_plan)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _plan_base(args: argparse.Namespace) -> tuple[dict[str, Any], int, int]:
    """The config to vary (resolved, as JSON data), its sequence length and global batch in sequences."""
    if is_config_file(args.model):
        cfg = load_config(args.model, args.set, profile="gpu")
        described = parse_cluster(cfg.description)
        dp = (described[0] // cfg.pipeline.stages) if described else max(1, (args.gpus or 1) // cfg.pipeline.stages)
        batch = cfg.train_batch or (cfg.micro_batch or 1) * (cfg.grad_accum or 1) * dp
        raw = cfg.to_dict()
    else:
        arch = model_arch(ModelConfig(name=args.model))
        raw = {"model": {"name": args.model}, "data": {"seq_len": min(2048, arch.max_positions)},
               "optimizer": DEFAULT_OPTIMIZER, "gradient_clipping": 1.0}
        raw = load_config_dict(raw, args.set, source=args.model).to_dict()
        batch = 512
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        raw.pop(key, None)
    raw.setdefault("optimizer", DEFAULT_OPTIMIZER)
    seq = args.seq_len or raw["data"]["seq_len"]
    raw["data"]["seq_len"] = seq
    return raw, seq, args.global_batch or batch


def plan_layouts(raw: dict[str, Any], cluster: Cluster, global_batch: int, precision: str,
                 efficiency: float = COMPUTE_EFFICIENCY) -> list[tuple[dict[str, Any], Estimate]]:
    """Every (stages, sequence parallelism, ZeRO stage, micro-batch, checkpointing or ZB-H1) that divides the batch,
    fits and draws no warning of ``validate`` (a pipeline bubble, bf16 sums over many micro-batches:
    hybrid_ds.config.checks), fastest first. Sequence-parallel groups stay inside a node (their all-to-all is in
    every block's attention); a size the model's heads do not divide is refused like any other invalid layout."""
    arch = model_arch(ModelConfig(**raw["model"]))   # once: every candidate varies the layout, not the model
    found = []
    for stages in (p for p in _divisors(cluster.gpus) if p <= arch.layers):
        for sp in (n for n in _divisors(cluster.gpus // stages) if n <= cluster.per_node):
            dp = cluster.gpus // (stages * sp)
            for zero in ((0, 1, 2) if stages > 1 else (0, 1, 2, 3)):   # ZeRO-3 partitions parameters: one stage only
                for micro in (b for b in (1, 2, 4, 8, 16, 32) if global_batch % (b * dp) == 0):
                    for ckpt, schedule in ((0, "1f1b"), (1, "1f1b"), *([(0, "zb-h1")] if stages > 1 else [])):
                        candidate = _layout_config(raw, stages, zero, micro, global_batch // (micro * dp), ckpt,
                                                   precision, sp)
                        candidate["pipeline"]["schedule"] = schedule
                        try:
                            cfg = load_config_dict(candidate, source="plan")
                            est = estimate(run_from_config(cfg, cluster.gpus, arch), cluster, efficiency=efficiency)
                            layout = resolve_layout(cluster.gpus, stages, arch.layers, micro, cfg.grad_accum, sp=sp)
                        except UserError:
                            continue
                        if est.fits and not layout_warnings(cfg, layout):
                            found.append((candidate, est))
    return sorted(found, key=lambda item: (item[1].step_time, item[1].binding.total))


def _layout_config(raw: dict[str, Any], stages: int, zero: int, micro: int, accum: int, ckpt: int,
                   precision: str, sp: int = 1) -> dict[str, Any]:
    config = json.loads(json.dumps(raw))
    config["pipeline"].update(stages=stages, activation_checkpoint_interval=ckpt, sequence_parallel=sp)
    if isinstance(config["pipeline"].get("partition"), list):
        config["pipeline"]["partition"] = "flops"
    config["zero_optimization"] = {**config.get("zero_optimization", {}), "stage": zero}
    config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"] = micro, accum
    for key, on in PRECISION_KEYS[precision].items():
        if on or key in config:
            config[key] = {**config.get(key, {}), "enabled": on}
    return config


def runnable(config: dict[str, Any], rank: int) -> dict[str, Any]:
    """``config`` as a file to train with: a save_dir of its own (resumed automatically), checkpoints and evaluation
    every tenth of the run, and a warmup-cosine schedule over ``train.max_steps`` where the config has none."""
    config = json.loads(json.dumps(config))
    train = config.setdefault("train", {})
    steps = train.get("max_steps") or 100
    base = train.get("save_dir") or f"runs/{Path(config['model']['name']).name}"
    train.update(save_dir=f"{base}-rank{rank}", resume="auto")
    train["save_interval"] = train.get("save_interval") or max(1, steps // 10)
    train["eval_interval"] = train.get("eval_interval") or max(1, steps // 10)
    config.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {"warmup_num_steps": max(1, steps // 20)}})
    return config


def write_configs(found: list[tuple[dict[str, Any], Estimate]], folder: Path, top: int) -> list[Path]:
    """The ``top`` layouts as ``folder/rankN.json``; a file already there is one line, not overwritten."""
    paths = [folder / f"rank{i + 1}.json" for i in range(min(top, len(found)))]
    taken = [str(p) for p in paths if p.exists()]
    if taken:
        raise UserError("--write", f"{', '.join(taken)} exist(s); write into a new folder or remove them")
    folder.mkdir(parents=True, exist_ok=True)
    for i, (path, (config, est)) in enumerate(zip(paths, found)):
        run = est.run
        header = [f"// {config['description']}",
                  f"// Layout {i + 1} of {len(found)} that fit, fastest first (hybrid-ds plan). Check it, then launch it on "
                  f"{run.world_size} GPUs:",
                  f"//   hybrid-ds validate {path} --profile gpu",
                  f"//   deepspeed --hostfile hostfile launch/train.py --config {path}",
                  "// Every key, with its type, default and meaning: docs/config.md. (// comments are allowed here.)"]
        path.write_text("\n".join(header) + "\n" + json.dumps(runnable(config, i + 1), indent=2) + "\n")
    return paths


def _describe_plan(config: dict[str, Any], est: Estimate) -> str:
    run, cluster = est.run, est.cluster
    gpu = f"{cluster.gpus}x {cluster.gpu.name.split('-')[0].upper()}-{cluster.memory / GIGA:g}GB"
    schedule = ", ZB-H1 schedule" if run.schedule == "zb-h1" else ""
    sp = f" x sp {run.sp}" if run.sp > 1 else ""
    return (f"hybrid-ds plan: {run.arch.name} on {gpu} as {run.stages} stages{sp} x {run.dp} dp{schedule}, ZeRO-{run.zero}, "
            f"{run.precision}; estimated peak {human_bytes(est.binding.total)} per GPU, step "
            f"{human_time(est.step_time)}, MFU {est.mfu:.0%}")


def cmd_plan(args: argparse.Namespace) -> int:
    raw, seq, batch = _plan_base(args)
    precision = args.precision or (load_config_dict(raw).precision if is_config_file(args.model) else "bf16")
    if args.gpus is None:
        raise UserError("--gpus", "plan needs the cluster size, e.g. --gpus 16 --gpu-mem 80GB")
    described = parse_cluster(raw.get("description", ""))
    gpu = args.gpu or (described[1] if described else "h100")
    memory = parse_memory(args.gpu_mem) if args.gpu_mem else (described[2] if described and not args.gpu else None)
    cluster = make_cluster(args.gpus, gpu, memory, args.nodes)
    found = plan_layouts(raw, cluster, batch, precision, args.efficiency)
    for config, est in found:
        config["description"] = _describe_plan(config, est)
    if args.json:
        if args.write and found:
            write_configs(found, Path(args.write), args.top)
        print(json.dumps([{"rank": i + 1, "estimate": estimate_dict(est), "config": config}
                          for i, (config, est) in enumerate(found)], indent=2))
        return 0 if found else 1
    arch = found[0][1].run.arch if found else None
    size = f" ({params_text(arch)} parameters)" if arch else ""
    head = (f"{raw['model']['name']}{size} on {cluster.describe()}: global batch {batch} x {seq} tokens, {precision}; "
            f"{len(found)} layouts fit")
    if not found:
        print(head + ". None fits: more GPUs, more memory per GPU, a shorter sequence or a smaller batch.")
        return 1
    print(head + ", fastest first\n")
    print(f"{'rank':>4}  {'stages':>6}  {'schedule':>8}  {'sp':>3}  {'dp':>4}  {'ZeRO':>4}  {'micro':>5}  {'accum':>5}  "
          f"{'ckpt':>4}  {'peak/GPU':>10}  {'step':>8}  {'MFU':>5}  {'bubble':>6}  {'longest seq':>11}")
    for i, (config, est) in enumerate(found[:max(args.top, 10)]):
        run = est.run
        print(f"{i + 1:>4}  {run.stages:>6}  {run.schedule:>8}  {run.sp:>3}  {run.dp:>4}  {run.zero:>4}  {run.micro_batch:>5}  "
              f"{run.grad_accum:>5}  {run.checkpoint_interval:>4}  {human_bytes(est.binding.total):>10}  "
              f"{human_time(est.step_time):>8}  {est.mfu:>5.0%}  {est.bubble:>6.1%}  "
              f"{longest_sequence(run, cluster.memory):>11,}")
    if args.write:
        for path in write_configs(found, Path(args.write), args.top):
            print(f"wrote {path}: deepspeed launch/train.py --config {path}")
        return 0
    for i, (config, _) in enumerate(found[:args.top]):
        print(f"\n# rank {i + 1}: save as a .json file and run it with launch/train.py --config (or use --write DIR)\n"
              + json.dumps(config, indent=2))
    return 0
