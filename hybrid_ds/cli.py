"""hybrid-ds: estimate, plan, check and train hybrid pipeline + data parallel runs of Hugging Face models.

Commands: ``compare`` (presets, configs and layouts side by side: memory per stage, FLOPs, time) and
``plan`` (layouts that fit a cluster, as configs) need no torch for presets and named families;
``presets`` (the architecture table, counted on the meta device), ``validate`` (a config's plan),
``parity`` (the pipeline against the Hugging Face model), ``train`` (what launch/train.py runs; ``--dry-run``
prints the plan and the estimate), ``export`` (a checkpoint to a Hugging Face folder) and ``convert-checkpoint``
(a checkpoint's universal form, for resuming on another layout) load torch.
Every user mistake ends as one line on stderr and exit code 2; see :class:`hybrid_ds.errors.UserError`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from hybrid_ds.errors import Parser, UserError, at_least


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="run config JSON (e.g. configs/gpt.json)")
    parser.add_argument("--config", dest="config_flag", metavar="CONFIG", help="same as the positional CONFIG")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, VALUE read as JSON where it parses (repeatable)")


def _config_path(args: argparse.Namespace) -> str:
    path = args.config_flag or args.config
    if not path:
        raise UserError("--config", "no config given; e.g. configs/gpt.json")
    return path


def cmd_presets(args: argparse.Namespace) -> int:
    import importlib.util

    from hybrid_ds import assets
    from hybrid_ds.config import presets
    from hybrid_ds.config import ModelConfig
    from hybrid_ds.models.resolve import count_params, meta_model, resolve_model

    rows = []
    for preset in presets.PRESETS.values():
        row = presets.describe(preset)
        row["params"] = count_params(meta_model(resolve_model(ModelConfig(name=preset.name))))
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<14} {'family':<9} {'layers':>6} {'hidden':>6} {'heads':>5} {'params':>17}  published")
    for row in rows:
        published = f"{row['published']:,}" if row["published"] else "-"
        print(f"{row['name']:<14} {row['family']:<9} {row['layers']:>6} {row['hidden']:>6} {row['heads']:>5} "
              f"{row['params']:>17,}  {published}")
    print("\noffline models (model.name with pretrained: true, or data.tokenizer; no download):")
    for name, (what, package, install) in assets.OFFLINE_MODELS.items():
        installed = "installed" if importlib.util.find_spec(package) else f"not installed: {install}"
        print(f"{name:<14} {what} ({installed})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from hybrid_ds.config import load_config
    from hybrid_ds.runtime.plan import build_plan
    from hybrid_ds.estimate.report import format_plan, plan_dict

    profile = args.profile or machine_profile()
    cfg = load_config(_config_path(args), args.set, profile=profile)
    check_with_deepspeed(cfg, profile)
    plan = build_plan(cfg, args.world_size)
    if args.json:
        print(json.dumps(plan_dict(plan), indent=2))
    else:
        print(format_plan(plan))
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from hybrid_ds.config import presets
    from hybrid_ds.config import load_config, load_config_dict
    from hybrid_ds.runtime.parity import check_parity

    if args.target.endswith(".json"):
        cfg = load_config(args.target, args.set)
    else:  # a model: preset (random init), folder or hub name (its weights)
        model = {"name": args.target, "pretrained": not presets.is_preset(args.target)}
        cfg = load_config_dict({"model": model, "train_micro_batch_size_per_gpu": 1}, args.set)
    sp, launched = cfg.pipeline.sequence_parallel, int(os.environ.get("WORLD_SIZE", "1"))
    sequence = None
    if launched > 1:  # under the launcher: each rank checks its shard of every sequence
        if launched != sp:
            raise UserError("pipeline.sequence_parallel", f"{sp}, but parity runs on {launched} processes, which share "
                                                          f"each sequence; launch {sp} (--num_gpus {sp}), or set "
                                                          f"pipeline.sequence_parallel={launched}")
        from hybrid_ds.runtime.engine import init_distributed
        from hybrid_ds.runtime.pipeline import world_shard

        def sequence():
            init_distributed()
            return world_shard()
    elif sp > 1:
        print(f"pipeline.sequence_parallel {sp}: checked in one process without it; `deepspeed --num_gpus {sp} "
              f"--no_local_rank --module hybrid_ds.cli parity ...` checks each rank's shard", flush=True)
    report = check_parity(cfg, args.stages or cfg.pipeline.stages, args.seq_len, sequence)
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(report.lines()))
    return 0 if report.ok else 1


def check_with_deepspeed(cfg: Any, device_kind: str) -> None:
    """DeepSpeed's sections of ``cfg`` as a run on ``device_kind`` hands them over, checked by DeepSpeed's own config
    models and the optimizer and scheduler it builds (hybrid_ds.seam.config_check)."""
    from hybrid_ds.config.checks import check_device
    from hybrid_ds.config.deepspeed import deepspeed_sections
    from hybrid_ds.seam.config_check import check_deepspeed_sections

    check_device(cfg, device_kind)
    check_deepspeed_sections(deepspeed_sections(cfg, device_kind))


def machine_profile() -> str:
    """"gpu" where DeepSpeed finds an accelerator, else "cpu": selects a config's on_gpu / on_cpu section."""
    from deepspeed.accelerator import get_accelerator

    return "cpu" if get_accelerator().device_name() == "cpu" else "gpu"


def cmd_train(args: argparse.Namespace) -> int:
    from hybrid_ds.config import load_config
    from hybrid_ds.runtime.plan import build_plan
    from hybrid_ds.estimate.report import format_estimate, format_plan

    if args.verbose:
        os.environ["HYBRID_DS_VERBOSE"] = "1"  # hybrid_ds.runtime.quiet
    profile = machine_profile()
    cfg = load_config(_config_path(args), args.set, profile=profile)
    if args.dry_run:
        from hybrid_ds.estimate.step import estimate_for_config
        from hybrid_ds.models.shape import model_arch

        check_with_deepspeed(cfg, profile)
        launched = os.environ.get("WORLD_SIZE")  # unset: a plain `python` dry run, sized like `validate`
        plan = build_plan(cfg, int(launched) if launched else None)
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_plan(plan))
            runtime = "cpu" if profile == "cpu" else "cuda"
            arch = model_arch(cfg.model, plan.resolved.family, plan.skeleton)  # the plan's model, not resolved again
            print(format_estimate(estimate_for_config(cfg, plan.layout.world_size, runtime=runtime, arch=arch)))
        return 0
    from hybrid_ds.runtime.train import run

    run(cfg, resume=True if args.resume else None)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hybrid_ds.runtime.checkpoint import export

    print(f"wrote {export(args.checkpoint, args.out_dir, args.merge)}")
    return 0


def cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from hybrid_ds.runtime.checkpoint import write_universal_of

    print(f"wrote {write_universal_of(args.checkpoint)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hybrid-ds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from hybrid_ds.compare import add_compare_parser  # pure Python, no torch for presets
    from hybrid_ds.plan_search import add_plan_parser
    from hybrid_ds.plot import add_parser as add_plot_parser

    add_compare_parser(sub)
    add_plan_parser(sub)
    add_plot_parser(sub)

    p = sub.add_parser("presets", help="list architecture presets")
    p.add_argument("--json", action="store_true", help="print a JSON list of {name, family, layers, ...}")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("validate", help="check a run config and print its plan (no weights loaded)")
    _add_config_args(p)
    p.add_argument("--world-size", type=at_least(1), help="processes in the run (default: stages x dp the batch implies)")
    p.add_argument("--profile", choices=["cpu", "gpu"], help="which of the config's on_cpu/on_gpu sections to apply "
                                                            "(default: this machine's, as train applies it)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("parity", help="compare the pipelined model with the Hugging Face model on one batch")
    p.add_argument("target", metavar="CONFIG|MODEL", help="a run config, preset, local folder or hub name")
    p.add_argument("--stages", type=at_least(1), help="stages to split into (default: the config's pipeline.stages)")
    p.add_argument("--seq-len", type=at_least(8), default=32, help="tokens per sequence of the test batch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # sp: launched
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("train", help="train (what launch/train.py runs)")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--resume", action="store_true", help="continue from train.save_dir's latest checkpoint")
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's own prints and chatter (off by default)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a Hugging Face folder from a training checkpoint")
    p.add_argument("checkpoint", help="a train.save_dir (its latest checkpoint) or one step folder in it")
    p.add_argument("out_dir", help="folder to write (config, safetensors, tokenizer; a LoRA run's: peft's adapter "
                                   "folder, which PeftModel.from_pretrained(base, OUT_DIR) loads)")
    p.add_argument("--merge", action="store_true", help="LoRA run: the model with its adapters merged, a plain "
                                                        "Hugging Face folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert-checkpoint",
                       help="write a checkpoint's universal form, which any layout resumes from (done at resume "
                            "otherwise)")
    p.add_argument("checkpoint", help="a train.save_dir (its latest checkpoint) or one step folder in it")
    p.set_defaults(func=cmd_convert_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hybrid_ds.runtime.quiet import quiet_deepspeed_logger  # before anything imports DeepSpeed

    quiet_deepspeed_logger()
    try:
        args = _parser().parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UserError as err:
        report_error(err)
        _leave_process_group(2)
        return 2
    except BrokenPipeError:  # `hybrid-ds plan --json | head`: the reader stopped reading; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor complain when stdout is flushed at exit
        return 0


def _leave_process_group(code: int) -> None:
    """A rank of a multi-process run exits at once, without tearing its process group down: gloo's threads,
    destroyed at interpreter exit while a peer that met the same mistake has already gone, can abort the
    process ("terminate called without an active exception", exit -6 instead of 2)."""
    torch = sys.modules.get("torch")
    distributed = getattr(torch, "distributed", None)
    if distributed and distributed.is_available() and distributed.is_initialized() \
            and distributed.get_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# The deepspeed launcher polls its ranks every second and ends them all once one exits with an error.
OTHER_RANKS_WAIT_S = 3.0


def report_error(err: UserError) -> None:
    """One line on stderr per node for a mistake every rank meets; a line too for one that only some meet.

    The node's first rank prints at once. Another rank prints only if it is still alive a moment later:
    when the first rank met the same mistake, the launcher has ended this rank by then (one line); when
    only this rank met it, the line is not lost. Exiting at once instead could get the first rank killed
    before it printed: exit code 2 and no line.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        time.sleep(OTHER_RANKS_WAIT_S)
    print(f"hybrid-ds: error: {err}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
