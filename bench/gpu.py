"""GPU benchmark: tokens/s and MFU of hybrid_ds at stages=1 against DeepSpeed's engine on the plain HF model.

One process, one GPU, bf16, ZeRO-1, both engines alive side by side and stepped alternately (A B, B A, ...),
from the same weights on the same synthetic micro-batches (random token ids: throughput does not depend
on the text). Models: GPT-2 small (124M) and a ~1.1B llama (TinyLlama-1.1B's shape).

    python bench/gpu.py [--models gpt2,llama-1b] [--seq-len 1024] [--grad-accum 4] [--pairs 8]

MFU counts 6 x matmul parameters + 12 x layers x hidden x seq_len FLOPs per token (the PaLM count), over
the H100's dense bf16 peak (989 TFLOP/s, ``hybrid_ds.estimate.gpus``' H100 entry) and over a large bf16 GEMM measured in the run.
Runs on the CPU too (``--device cpu``, fp32, for checking the script itself).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (MODELS, bench_config, matmul_params, matmul_peak, median, synchronize,  # noqa: E402
                    training_flops_per_token, write_result)
from overhead import baseline_step, build_pair, median_ci, ours_step  # noqa: E402

# TinyLlama-1.1B's shape: 22 blocks of width 2048, grouped-query attention (4 KV heads), untied head.
GPU_MODELS = {
    **MODELS,
    "llama-1b": {"name": "llama-tiny", "overrides": {
        "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "intermediate_size": 5632, "vocab_size": 32000, "max_position_embeddings": 2048,
        "tie_word_embeddings": False}},
}
MICRO_BATCH = {"gpt2": 8, "llama-1b": 4}


def synthetic(vocab: int, micro_batch: int, seq_len: int, device: Any, seed: int) -> Iterator[Any]:
    """Endless micro-batches ((input_ids, attention_mask), labels) of random ids, already on ``device``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=generator).to(device)
        yield (ids, torch.ones_like(ids)), ids.clone()


def measure(model: str, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    from hybrid_ds.config import load_config_dict

    micro = args.micro_batch or MICRO_BATCH.get(model, 1)
    extra: dict[str, Any] = {"optimizer": {"type": "AdamW", "params": {
        "lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True}}}
    if device.type == "cuda":
        extra["bf16"] = {"enabled": True}
    raw = bench_config(model, args.seq_len, micro, args.grad_accum, extra=extra)
    raw["model"] = dict(GPU_MODELS.get(model, {"name": model}))
    raw["data"] = {"source": "builtin", "seq_len": args.seq_len}
    cfg = load_config_dict(raw)
    ours, baseline, plan, build_s = build_pair(cfg)
    vocab = plan.resolved.hf_config.vocab_size
    runners = {"ours": (ours, ours_step), "baseline": (baseline, baseline_step)}
    batches = {name: synthetic(vocab, micro, args.seq_len, device, 0) for name in runners}
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    losses: dict[str, list[float]] = {"ours": [], "baseline": []}
    for k in range(args.warmup + args.pairs):
        for name in (("ours", "baseline") if k % 2 == 0 else ("baseline", "ours")):
            engine, step = runners[name]
            torch.manual_seed(k)   # the same dropout masks for both
            synchronize(device)
            tick = time.perf_counter()
            losses[name].append(step(engine, batches[name], args.grad_accum))
            synchronize(device)
            if k >= args.warmup:
                times[name].append(time.perf_counter() - tick)
    tokens = micro * args.grad_accum * args.seq_len
    flops_per_token = training_flops_per_token(matmul_params(plan.skeleton), plan.n_blocks,
                                               plan.resolved.hf_config.hidden_size, args.seq_len)
    pair_ratios = [a / b for a, b in zip(times["ours"], times["baseline"])]
    result = {
        "model": model, "params": plan.total_params, "matmul_params": matmul_params(plan.skeleton),
        "seq_len": args.seq_len, "micro_batch": micro, "grad_accum": args.grad_accum,
        "tokens_per_step": tokens, "flops_per_token": flops_per_token,
        **build_s,
        "ours_median_s": median(times["ours"]), "baseline_median_s": median(times["baseline"]),
        "ours_s": times["ours"], "baseline_s": times["baseline"],
        "pair_ratio_median": median(pair_ratios), "pair_ratio_ci95": median_ci(pair_ratios),
        "losses_ours": losses["ours"], "losses_baseline": losses["baseline"],
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses["ours"], losses["baseline"])),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    result["ratio"] = result["ours_median_s"] / result["baseline_median_s"]
    for side in ("ours", "baseline"):
        result[f"tokens_per_s_{side}"] = tokens / result[f"{side}_median_s"]
        result[f"flops_{side}"] = result[f"tokens_per_s_{side}"] * flops_per_token
    del ours, baseline
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama-1b")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=0, help="0: 8 for gpt2, 4 for llama-1b")
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="gpu")
    args = parser.parse_args(argv)

    import torch

    from common import single_process_env
    from hybrid_ds.runtime.engine import device as engine_device, init_distributed

    from hybrid_ds.estimate.gpus import get_gpu

    if not torch.cuda.is_available():
        single_process_env()   # sets DS_ACCELERATOR=cpu (init_distributed fills in a world of one on GPUs)
    init_distributed()
    device = engine_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(torch.get_num_threads(), n=8192 if device.type == "cuda" else 1024, device=device, dtype=dtype)
    spec = get_gpu("h100").flops["bf16"] if device.type == "cuda" else None
    results = [measure(model, args, device) for model in args.models.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; measured {dtype} GEMM peak {peak / 1e12:.1f} TFLOP/s")
    for r in results:
        r["gemm_peak_flops"], r["spec_peak_flops"] = peak, spec
        for side in ("ours", "baseline"):
            r[f"mfu_measured_{side}"] = r[f"flops_{side}"] / peak
            r[f"mfu_spec_{side}"] = r[f"flops_{side}"] / spec if spec else None
        mfu = (f"MFU {r['mfu_spec_ours']:.1%} vs {r['mfu_spec_baseline']:.1%} of the {spec / 1e12:.0f} TFLOP/s spec, "
               if spec else "")
        print(f"{r['model']:>9} ({r['params'] / 1e6:.0f}M, micro {r['micro_batch']} x {r['grad_accum']}, "
              f"seq {r['seq_len']}): ours {r['tokens_per_s_ours']:,.0f} tokens/s, baseline "
              f"{r['tokens_per_s_baseline']:,.0f} tokens/s, step-time ratio {r['ratio']:.3f} (pairs: median "
              f"{r['pair_ratio_median']:.3f}, 95% CI {r['pair_ratio_ci95'][0]:.3f}-{r['pair_ratio_ci95'][1]:.3f}); "
              f"{mfu}{r['mfu_measured_ours']:.1%} vs {r['mfu_measured_baseline']:.1%} of the measured GEMM; "
              f"max |loss diff| {r['max_loss_diff']:.2e}; peak memory "
              f"{r['peak_memory_gib'] if r['peak_memory_gib'] is None else round(r['peak_memory_gib'], 1)} GiB",
              flush=True)
    out = {"device": name, "torch": torch.__version__, "results": results}
    write_result(args.out, out)
    return out


if __name__ == "__main__":
    main()
