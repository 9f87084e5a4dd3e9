"""GPU MFU at today's defaults and each speed lever on/off (issue 30): one script, one process, one GPU.

    python bench/gpu_mfu.py [--device cuda|cpu] [--tiny] [--budget-s 280] [--only NAMES] [--out PATH]

Phases, each a fresh engine built, warmed up, timed and freed (peak memory per phase), bf16 on a GPU:

1. **engines** (1.1B llama of TinyLlama's shape and GPT-2 small, seq 2048): the pipeline engine at stages=1
   ("pipeline"), the plain engine ("plain": DeepSpeed's engine on the HF model as hybrid_ds builds it) and DeepSpeed's
   engine on the HF model holding the pipeline's weights ("deepspeed-hf", bench/overhead.py's baseline), all at the
   config's ZeRO stage (1), with torch's fused AdamW on every side: tokens/s, MFU of the GPU's dense bf16 peak and of a
   GEMM measured here, peak memory and the estimator's prediction of it.
2. **profile**: two more steps of the first model's pipeline phase under ``torch.profiler``: the top kernels by GPU
   time, the share of the step the GPU was idle, the optimizer step's share.
3. **levers** on the first model's pipeline run, each against the phase it changes (``LEVERS``): train.compile (with
   and without activation checkpointing), packed documents under sdpa's dense mask and under FlexAttention's block
   mask, train.float8 (eager, and compiled against compile), train.selective_checkpoint mlp / attention, Liger's
   RMSNorm / rotary / SwiGLU kernels where liger-kernel is installed (patched into transformers' Llama classes for that
   phase alone), the foreach AdamW, and the loss on full logits instead of the fused one. Each lever's losses are
   compared step by step with its reference's: the same seed builds the same weights and the same batches come, so a
   lever that keeps the maths differs by rounding alone. Each phase records the optimizer it ran (class, fused,
   foreach).

The first model's engines and the first five levers run before the other models' engines, so that a short budget
drops the least telling phases. Results are written after every phase (a run cut short keeps what it measured), with
the device, the versions, the date and the command. ``--budget-s`` skips a phase that would not end in time (its estimate: the longest phase so far).
``--tiny`` runs every phase on tiny models at seq 128 (the 1-minute smoke check on a GPU; ``--device cpu`` in fp32
checks the script itself; FlexAttention and Liger phases are skipped on CPU, which cannot train them).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (matmul_params, matmul_peak, median, provenance, synchronize,  # noqa: E402
                    training_flops_per_token)

LLAMA_1B = {"name": "llama-tiny", "overrides": {   # TinyLlama-1.1B's shape: 22 blocks of width 2048, 4 KV heads
    "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "intermediate_size": 5632, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}}
# name: (model, micro-batch) at full size and with --tiny; seq 2048 (128 with --tiny), 4 micro-batches a step
MODELS = {"llama-1b": (LLAMA_1B, 4, {"name": "llama-tiny"}), "gpt2": ({"name": "gpt2"}, 8, {"name": "gpt2-tiny"})}
# lever: (its reference phase, the config it changes); "documents" phases feed packed documents
LEVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "compile": ("pipeline", {"train": {"compile": True}}),
    "documents-sdpa": ("pipeline", {"data": {"document_mask": True}}),
    "documents-flex": ("documents-sdpa", {"data": {"document_mask": True},
                                          "model": {"attn_implementation": "flex_attention"}}),
    "float8": ("pipeline", {"train": {"float8": True}}),
    "selective-mlp": ("pipeline", {"train": {"selective_checkpoint": "mlp"}}),
    "liger": ("pipeline", {}),
    "float8+compile": ("compile", {"train": {"float8": True, "compile": True}}),  # torchao's float8 is made to compile
    "adamw-foreach": ("pipeline", {"optimizer": {"params": {"fused": False, "foreach": True}}}),
    "selective-attention": ("pipeline", {"train": {"selective_checkpoint": "attention"}}),
    "checkpoint": ("pipeline", {"pipeline": {"activation_checkpoint_interval": 1}}),
    "compile+checkpoint": ("checkpoint", {"train": {"compile": True},
                                          "pipeline": {"activation_checkpoint_interval": 1}}),
    "full-logits-loss": ("pipeline", {"train": {"fused_loss": False}}),
}
FIRST_LEVERS = 5  # run before the other models' engines
GPU_ONLY = {"documents-flex": "GPU only: torch has no CPU backward for FlexAttention",
            "liger": "GPU only: Liger's kernels are Triton's"}
OTHER_MATHS = {"documents-sdpa"}  # another computation than its reference's: its first loss is not compared


def merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run_config(model: str, args: argparse.Namespace, change: dict[str, Any] | None = None) -> Any:
    """The run config of ``model`` at the bench's settings: configs/gpt.json's optimizer and clipping, ZeRO-1, one
    stage, bf16 on a GPU, torch's fused AdamW (``change`` merged in)."""
    from hybrid_ds.config import load_config_dict

    spec, micro, tiny = MODELS[model]
    raw = {"model": dict(tiny if args.tiny else spec), "data": {"source": "builtin", "seq_len": args.seq_len},
           "pipeline": {"stages": 1}, "train_micro_batch_size_per_gpu": 2 if args.tiny else micro,
           "gradient_accumulation_steps": args.grad_accum,
           "optimizer": {"type": "AdamW", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1, "torch_adam": True, "fused": True}},
           "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
           "bf16": {"enabled": args.device == "cuda"}}
    return load_config_dict(merged(raw, change or {}))


def synthetic(vocab: int, micro: int, seq_len: int, device: Any, documents: bool) -> Iterator[Any]:
    """Endless micro-batches ((input_ids, mask), labels) of random ids on ``device``; with ``documents`` the mask holds
    each token's document index (hybrid_ds.data.feed.document_ids), documents of 64 to seq_len / 2 tokens."""
    import torch

    generator = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (micro, seq_len), generator=generator)
        mask = torch.ones_like(ids)
        if documents:
            lengths = torch.randint(min(64, seq_len // 4), seq_len // 2 + 1, (micro, seq_len), generator=generator)
            starts = torch.zeros_like(ids, dtype=torch.bool)
            for row in range(micro):
                starts[row, lengths[row].cumsum(0)[lengths[row].cumsum(0) < seq_len]] = True
            mask = starts.long().cumsum(1) + 1
        yield (ids.to(device), mask.to(device)), ids.to(device)


def build(kind: str, cfg: Any, keep: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(engine, plan, step function) of ``kind``: "pipeline", "plain" or "deepspeed-hf" (which needs the pipeline
    engine of the same config in ``keep`` to copy its weights from, and frees it)."""
    from overhead import baseline_step, build_baseline, ours_step

    from hybrid_ds.runtime.engine import build_pipeline_engine, build_plain_engine
    from hybrid_ds.runtime.plan import build_plan

    plan = build_plan(cfg, 1)
    if kind == "pipeline":
        return build_pipeline_engine(plan), plan, ours_step
    if kind == "plain":
        return build_plain_engine(plan), plan, lambda engine, batches, _: engine.train_batch(batches).item()
    ours = keep.pop("pipeline")
    engine = build_baseline(plan, ours, zero="config")
    release(ours)
    return engine, plan, baseline_step


def release(engine: Any = None) -> None:
    """Free ``engine`` (DeepSpeed's destroy(): its hooks hold it beyond the garbage collector's reach) and the caching
    allocator's free blocks, so that the next phase's peak memory is its own."""
    import torch

    if engine is not None:
        engine.destroy()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(name: str, kind: str, cfg: Any, args: argparse.Namespace, device: Any, keep: dict[str, Any],
            profile: bool = False, hand_on: bool = False) -> dict[str, Any]:
    """Build, warm up and time one engine; its figures (and with ``profile``, a profile of two more steps). The peak
    memory is the training steps' with this engine alone (reset after the build, which frees the engine deepspeed-hf
    copies from). ``hand_on``: keep the engine in ``keep`` for the next phase (deepspeed-hf) instead of freeing it."""
    import torch

    from hybrid_ds.estimate.run import run_from_config
    from hybrid_ds.estimate.stages import stage_estimates

    release()
    tick = time.perf_counter()
    engine, plan, step = build(kind, cfg, keep)
    build_s = time.perf_counter() - tick
    release()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hf = plan.resolved.hf_config
    batches = synthetic(hf.vocab_size, cfg.micro_batch, cfg.data.seq_len, device, plan.document_mask)
    times, losses = [], []
    for k in range(args.warmup + args.steps):
        torch.manual_seed(k)
        synchronize(device)
        tick = time.perf_counter()
        losses.append(step(engine, batches, cfg.grad_accum))
        synchronize(device)
        if k >= args.warmup:
            times.append(time.perf_counter() - tick)
    tokens = cfg.micro_batch * cfg.grad_accum * cfg.data.seq_len
    flops_per_token = training_flops_per_token(matmul_params(plan.skeleton), plan.n_blocks, hf.hidden_size,
                                               cfg.data.seq_len)
    estimate = stage_estimates(run_from_config(cfg, 1), overhead=0.0)[0]
    out = {"phase": name, "engine": kind, "build_s": build_s, "step_s": times, "median_s": median(times),
           "losses": losses, "tokens_per_step": tokens, "tokens_per_s": tokens / median(times),
           "flops_per_token": flops_per_token, "achieved_flops": tokens / median(times) * flops_per_token,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "estimated_memory_gib": estimate.total / 2**30}
    if profile:
        out["profile"] = profiled(engine, step, batches, cfg.grad_accum, device)
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed's wrapper, where there is one
    out["optimizer"] = {"class": type(optimizer).__name__,
                        **{k: optimizer.param_groups[0].get(k) for k in ("fused", "foreach")}}
    if hand_on:
        keep["pipeline"] = engine  # deepspeed-hf copies its weights
    else:
        release(engine)
    return out


def profiled(engine: Any, step: Any, batches: Iterator[Any], grad_accum: int, device: Any) -> dict[str, Any]:
    """Two steps under torch.profiler: the top 15 kernels (CPU ops on a CPU) by their own time, the share of the wall
    time no kernel ran (launch and Python gaps, host syncs), and the optimizer step's share of the kernels' time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    tick = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(2):
            step(engine, batches, grad_accum)
        synchronize(device)
    wall_us = (time.perf_counter() - tick) * 1e6
    own = "self_device_time_total" if cuda else "self_cpu_time_total"
    # On a GPU the kernels alone (a CPU op's self device time is its kernels' again, as are user annotations');
    # on a CPU the ops.
    averages = [e for e in prof.key_averages() if getattr(e, own, 0) > 0 and not e.is_user_annotation
                and (e.device_type == DeviceType.CUDA) == cuda]
    kernels_us = sum(getattr(e, own) for e in averages)
    optimizer = [e for e in prof.key_averages() if e.key.startswith("Optimizer.step")]
    optimizer_us = max((getattr(e, "device_time_total" if cuda else "cpu_time_total", 0) for e in optimizer),
                       default=0.0)
    top = sorted(averages, key=lambda e: getattr(e, own), reverse=True)[:15]
    return {"wall_us": wall_us, "kernels_us": kernels_us, "idle_share": max(0.0, 1 - kernels_us / wall_us) if cuda
            else None, "optimizer_share": optimizer_us / kernels_us if kernels_us else None,
            "top": [{"name": e.key[:120], "calls": e.count, "self_us": getattr(e, own),
                     "share": getattr(e, own) / kernels_us} for e in top]}


LIGER_PATCHED = ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb")  # what apply_liger_kernel_to_llama replaces


@contextlib.contextmanager
def liger_kernels(model: str) -> Iterator[str | None]:
    """Liger's RMSNorm, rotary and SwiGLU kernels patched into transformers' Llama classes while the phase runs (not
    its losses: the fused loss is hybrid_ds's own); yields why not where liger-kernel is missing or the model is not a
    llama."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as err:
        yield f"not measured: {err}"
        return
    if MODELS[model][0]["name"] != "llama-tiny":
        yield "not measured: a llama lever"
        return
    from transformers.models.llama import modeling_llama

    saved = {name: getattr(modeling_llama, name) for name in LIGER_PATCHED}
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False)
    try:
        yield None
    finally:
        for name, value in saved.items():
            setattr(modeling_llama, name, value)


def phases(args: argparse.Namespace) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(phase, model, engine kind, config change) in the order run."""
    first, *others = args.models.split(",")
    engines = [("pipeline", "pipeline")] + ([("deepspeed-hf", "deepspeed-hf"), ("plain", "plain")] if args.baseline
                                            else [])
    levers = [(lever, first, "pipeline", change) for lever, (_, change) in LEVERS.items()]
    # By what a short budget must not miss: the first model's engines and the levers that may pay most, then the other
    # models' engines, then the rest of the levers.
    out = ([(phase, first, kind, {}) for phase, kind in engines] + levers[:FIRST_LEVERS]
           + [(phase, model, kind, {}) for model in others for phase, kind in engines] + levers[FIRST_LEVERS:])
    return [p for p in out if not args.only or p[0] in args.only.split(",") or p[0] == "pipeline"]


def compared(results: list[dict[str, Any]]) -> None:
    """Each lever's speed-up and first-step loss difference against its reference phase (of the same model)."""
    by = {(r["model"], r["phase"]): r for r in results if "median_s" in r}
    for r in results:
        ref = by.get((r["model"], LEVERS[r["phase"]][0])) if r["phase"] in LEVERS else None
        if ref is not None and "median_s" in r:
            r["reference"] = ref["phase"]
            r["speedup"] = ref["median_s"] / r["median_s"]
            if r["phase"] not in OTHER_MATHS:  # the same maths: the losses of every step differ by rounding alone
                diffs = [abs(a - b) for a, b in zip(r["losses"], ref["losses"])]
                r["first_loss_diff"], r["max_loss_diff"] = diffs[0], max(diffs)
            if r["peak_memory_gib"] is not None:
                r["memory_ratio"] = r["peak_memory_gib"] / ref["peak_memory_gib"]


def run_phase(phase: tuple[str, str, str, dict[str, Any]], args: argparse.Namespace, device: Any,
              keep: dict[str, Any], first: bool, hand_on: bool) -> dict[str, Any]:
    """One phase's figures, or why it was not measured (a phase that fails is recorded and the run goes on)."""
    name, model, kind, change = phase
    out: dict[str, Any] = {"phase": name, "model": model}
    if name in GPU_ONLY and device.type != "cuda":
        return {**out, "skipped": GPU_ONLY[name]}
    try:
        with liger_kernels(model) if name == "liger" else contextlib.nullcontext() as why:
            if why:
                return {**out, "skipped": why}
            cfg = run_config(model, args, change)
            return {**out, **measure(name, kind, cfg, args, device, keep, profile=first, hand_on=hand_on)}
    except Exception as err:  # noqa: BLE001 - recorded, and the next phase runs
        release(keep.pop("pipeline", None))
        return {**out, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:400] if str(err) else ''}"}


def arguments(argv: list[str] | None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda where there is one")
    parser.add_argument("--tiny", action="store_true", help="tiny models at seq 128: the smoke check")
    parser.add_argument("--models", default="llama-1b,gpt2", help="the first also runs the profile and the levers")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (128 with --tiny)")
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="timed steps a phase (default 5, 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=280.0, help="skip phases that would end after this")
    parser.add_argument("--only", default="", help="comma-separated phases (the pipeline phase always runs)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the deepspeed-hf and plain phases")
    parser.add_argument("--out", default=None, help="default bench/measured/gpu-mfu-DEVICE.json")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    args.steps = args.steps or (2 if args.tiny else 5)
    return args


def machine(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Path]:
    """(device, the record's header: device name, GEMM and spec peaks, versions, settings; the output path)."""
    import torch

    from common import single_process_env
    from hybrid_ds.estimate.gpus import get_gpu
    from hybrid_ds.runtime.engine import device as engine_device, init_distributed

    if args.device == "cpu":
        single_process_env()  # DS_ACCELERATOR=cpu and a world of one
    init_distributed()
    device = engine_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gemm = matmul_peak(torch.get_num_threads(), n=8192 if device.type == "cuda" else 512, seconds=1.0,
                       device=device, dtype=dtype)
    spec = get_gpu("h200" if "H200" in name else "h100").flops["bf16"] if device.type == "cuda" else None
    slug = "cpu" if device.type == "cpu" else name.split()[1].lower() if len(name.split()) > 1 else "gpu"
    out = Path(args.out or Path(__file__).resolve().parent / "measured" / f"gpu-mfu-{slug}{'-tiny' * args.tiny}.json")
    return device, {"device": name, "gemm_peak_flops": gemm, "spec_peak_flops": spec, "versions": versions(),
                    "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    args = arguments(argv)
    device, record, out_path = machine(args)
    keep: dict[str, Any] = {}  # the pipeline engine deepspeed-hf copies its weights from, until it has
    longest, todo = 0.0, phases(args)
    for i, phase in enumerate(todo):
        tick = time.perf_counter()
        if keep and phase[0] != "deepspeed-hf":
            release(keep.pop("pipeline"))
        if tick - start + longest > args.budget_s:
            record["results"].append({"phase": phase[0], "model": phase[1], "skipped": "budget"})
            continue
        hand_on = phase[0] == "pipeline" and todo[i + 1:i + 2] == [("deepspeed-hf", phase[1], "deepspeed-hf", {})]
        result = run_phase(phase, args, device, keep, first=i == 0, hand_on=hand_on)
        longest = max(longest, time.perf_counter() - tick)
        if "achieved_flops" in result:
            result["mfu_gemm"] = result["achieved_flops"] / record["gemm_peak_flops"]
            spec = record["spec_peak_flops"]
            result["mfu_spec"] = result["achieved_flops"] / spec if spec else None
        record["results"].append(result)
        compared(record["results"])
        print(summary_line(result), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({**record, "elapsed_s": time.perf_counter() - start,
                                        "provenance": provenance()}, indent=2))
    print(f"{record['device']}: GEMM {record['gemm_peak_flops'] / 1e12:.1f} TFLOP/s; wrote {out_path} in "
          f"{time.perf_counter() - start:.0f} s")
    return record


def versions() -> dict[str, Any]:
    """What provenance() does not name: the kernels' packages, CUDA, and the commit measured."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out: dict[str, Any] = {"cuda": torch.version.cuda}
    for package in ("triton", "liger-kernel", "torchao", "pydantic"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    out["commit"] = git.stdout.strip() if git.returncode == 0 else None
    return out


def summary_line(r: dict[str, Any]) -> str:
    if "median_s" not in r:
        return f"{r['model']:>9} {r['phase']:<20} {r.get('skipped') or r.get('error')}"
    mfu = f"MFU {r['mfu_spec']:.1%} of spec, " if r.get("mfu_spec") else ""
    vs = f"; {r['speedup']:.3f}x {r['reference']}" if "speedup" in r else ""
    vs += (f", loss diff {r['first_loss_diff']:.2e} at step 1, {r['max_loss_diff']:.2e} at most"
           if "first_loss_diff" in r else "")
    if "profile" in r:
        p = r["profile"]
        idle = f"idle {p['idle_share']:.1%}, " if p["idle_share"] is not None else ""
        vs += (f"\n{'':>10}profile: {idle}optimizer {p['optimizer_share']:.1%} of kernel time; top: "
               + "; ".join(f"{t['name'][:40]} {t['share']:.1%}" for t in p["top"][:5]))
    memory = f", peak {r['peak_memory_gib']:.1f} GiB (estimate {r['estimated_memory_gib']:.1f})" \
        if r["peak_memory_gib"] is not None else ""
    return (f"{r['model']:>9} {r['phase']:<20} {r['tokens_per_s']:,.0f} tokens/s, {mfu}{r['mfu_gemm']:.1%} of the "
            f"GEMM{memory}{vs}")


if __name__ == "__main__":
    main()
