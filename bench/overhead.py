"""Benchmark: hybrid_ds at pipeline.stages=1 against DeepSpeed's own engine on the Hugging Face model.

One process, both engines alive side by side, stepped alternately (A B B A ...), so that drift on a
shared machine hits both alike:

* ours:     ``build_pipeline_engine`` (PipelineModule of layer specs, DeepSpeed's PipelineEngine) and
            ``engine.train_batch``;
* baseline: ``deepspeed.initialize(model=AutoModelForCausalLM.from_config(...))`` with the same DeepSpeed
            dict (``deepspeed_config``: fp32, torch AdamW, clipping 1.0) at the config's ZeRO stage (ZeRO-1,
            which ours runs as ZeRO-0 at dp=1: "what the default gives you"), or with ``--baseline-zero same``
            at the stage ours runs (like for like), the same parameter groups, and the usual loop of
            ``engine(**batch).loss; engine.backward(loss); engine.step()`` per micro-batch.

The baseline starts from our weights (copied module by module) and both consume the same micro-batches
with the same dropout seed per step, so their losses must agree: the run checks that it timed the same
computation. Reported: the median of the steady-state step times (warm-up steps dropped) and their ratio.

    python bench/overhead.py [--models gpt2,llama-100m] [--seq-len 128] [--micro-batch 1]
                             [--grad-accum 4] [--steps 4] [--warmup 1] [--threads 2] [--baseline-zero config|same]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CLEAN_CORES, LoadMeter, bench_config, matmul_params, matmul_peak, median,  # noqa: E402
                    own_cpu_s, single_process_env, spread, training_flops_per_token, wait_for_quiet, write_result)


def folded(batches: Any, vocab: int) -> Iterator[Any]:
    """The built-in data's GPT-2 token ids folded into a smaller vocabulary (the llama shape has 32000)."""
    for (ids, mask), labels in batches:
        yield (ids % vocab, mask), labels % vocab


def build_ours(cfg: Any) -> tuple[Any, Any]:
    from hybrid_ds.runtime.engine import build_pipeline_engine
    from hybrid_ds.runtime.plan import build_plan

    plan = build_plan(cfg, 1)
    return build_pipeline_engine(plan), plan


def build_baseline(plan: Any, ours: Any, zero: str = "config") -> Any:
    """DeepSpeed's engine on the whole Hugging Face model, holding the same weights as ``ours``; its ZeRO section
    the config's (``zero="config"``) or the one ours runs (``"same"``)."""
    import deepspeed
    import torch
    import transformers

    from hybrid_ds.runtime.engine import deepspeed_config, parameter_groups

    model = transformers.AutoModelForCausalLM.from_config(plan.resolved.hf_config)
    copied = set()
    for path, module in ours.module.builder.built_modules().items():
        target = model.get_submodule(path)
        target.load_state_dict(module.state_dict())
        copied.update(id(p) for p in target.parameters())
    missing = [name for name, p in model.named_parameters() if id(p) not in copied]
    if missing:
        raise RuntimeError(f"weights not copied into the baseline: {missing}")
    model.train()
    # The same parameter groups as ours (no weight decay on biases, norms, embeddings): the same maths.
    groups = parameter_groups(model, plan.config.train.no_weight_decay)
    ds = deepspeed_config(plan)
    if zero == "config":
        # DeepSpeed as the config asks (ZeRO-1, its 5e8 bucket): where hybrid_ds runs another stage (ZeRO-0 at
        # dp=1, the same maths) that choice is part of what is measured.
        ds["zero_optimization"] = plan.config.deepspeed.get("zero_optimization", {})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    torch.manual_seed(0)
    return engine


def build_pair(cfg: Any, zero: str = "config") -> tuple[Any, Any, Any, dict[str, float]]:
    """(ours, baseline, plan, build seconds of each): both engines, from the same weights."""
    start = time.perf_counter()
    ours, plan = build_ours(cfg)
    build_ours_s = time.perf_counter() - start
    start = time.perf_counter()
    baseline = build_baseline(plan, ours, zero)
    return ours, baseline, plan, {"build_ours_s": build_ours_s, "build_baseline_s": time.perf_counter() - start}


def ours_step(engine: Any, batches: Iterator[Any], grad_accum: int) -> float:
    return engine.train_batch(data_iter=batches).item()


def baseline_step(engine: Any, batches: Iterator[Any], grad_accum: int) -> float:
    """The usual loop; losses summed on the device and read once per step, as train_batch reads its own
    (on a GPU a ``loss.item()`` per micro-batch would stall the queue and favour ours)."""
    total = 0.0
    for _ in range(grad_accum):
        (input_ids, attention_mask), labels = next(batches)
        loss = engine(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        engine.backward(loss)
        engine.step()
        total = total + loss.detach().float()
    return (total / grad_accum).item()


def measure_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from hybrid_ds.config import load_config_dict
    from hybrid_ds.data import load_data

    cfg = load_config_dict(bench_config(model, args.seq_len, args.micro_batch, args.grad_accum))
    data = load_data(cfg.data, "causal_lm")
    ours, baseline, plan, build_s = build_pair(cfg, args.baseline_zero)
    stages = {"ours_zero_stage": ours.zero_optimization_stage(), "baseline_zero_stage": baseline.zero_optimization_stage()}
    vocab = plan.resolved.hf_config.vocab_size
    runners = {"ours": (ours, ours_step), "baseline": (baseline, baseline_step)}
    batches = {name: folded(data.train_batches(args.micro_batch, 0, 1, cfg.train.seed), vocab) for name in runners}
    steps = run_pairs(runners, batches, args)
    tokens = args.micro_batch * args.grad_accum * args.seq_len
    result = {
        "model": model, "params": plan.total_params, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "threads": torch.get_num_threads(), "warmup_steps": args.warmup,
        **build_s, **stages,
        "max_loss_diff": max(abs(s["ours"]["loss"] - s["baseline"]["loss"]) for s in steps),
        "work": work_parity(steps[0]), **summarize(steps[1 + args.warmup:]),
        "steps": [{k: v for k, v in s.items() if k != "counted"} for s in steps[1:]],
    }
    result["tokens_per_s_ours"] = tokens / result["ours_median_s"]
    result["flops_per_token"] = training_flops_per_token(matmul_params(plan.skeleton), plan.n_blocks,
                                                         plan.resolved.hf_config.hidden_size, args.seq_len)
    result["achieved_flops_ours"] = result["tokens_per_s_ours"] * result["flops_per_token"]
    del ours, baseline
    return result


def timed_step(engine: Any, run_step: Any, batches: Iterator[Any], grad_accum: int, seed: int) -> dict[str, float]:
    import torch

    torch.manual_seed(seed)  # the same dropout masks for both engines
    meter, cpu_start, tick = LoadMeter(), own_cpu_s(), time.perf_counter()
    loss = run_step(engine, batches, grad_accum)
    wall, cpu = time.perf_counter() - tick, own_cpu_s() - cpu_start
    return {"s": wall, "cpu_s": cpu, "foreign_cores": meter.foreign_cores(cpu), "loss": loss}


def counted_step(engine: Any, run_step: Any, batches: Iterator[Any], grad_accum: int, seed: int) -> dict[str, Any]:
    """One (untimed) step under torch's FLOP counter and an aten-op counter: the work, free of timing noise."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            self.counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(seed)
    ops = OpCounter()
    with FlopCounterMode(display=False) as flops, ops:
        loss = run_step(engine, batches, grad_accum)
    return {"loss": loss, "flops": flops.get_total_flops(), "ops": dict(ops.counts)}


def work_parity(counted: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """FLOPs and aten-op calls of one step of each engine, and the ops whose counts differ."""
    ours, base = counted["ours"]["ops"], counted["baseline"]["ops"]
    diff = {op: ours.get(op, 0) - base.get(op, 0) for op in sorted(set(ours) | set(base))}
    return {"ours_flops": counted["ours"]["flops"], "baseline_flops": counted["baseline"]["flops"],
            "ours_ops": sum(ours.values()), "baseline_ops": sum(base.values()),
            "op_count_diff": {op: d for op, d in diff.items() if d}}


def run_pairs(runners: dict[str, Any], batches: dict[str, Iterator[Any]], args: argparse.Namespace) -> list[dict]:
    """A counted pair (FLOPs and ops, untimed), warm-up pairs, then pairs (A B, B A, ...) until
    ``args.steps`` clean ones, ``args.max_pairs`` in all, or ``args.budget_s`` seconds.

    A pair during which another process used a quarter of a core or more is kept in the record but marked
    disturbed, and the next pair waits up to ``args.quiet_wait`` s for the machine to go quiet.
    """
    counted = {name: counted_step(*runners[name], batches[name], args.grad_accum, -1) for name in runners}
    pairs: list[dict] = [{name: {**counted[name], "s": float("nan")} for name in runners} | {"counted": True}]
    clean = 0
    first = 1 + args.warmup   # index of the first measured pair
    deadline = time.perf_counter() + args.budget_s
    while len(pairs) < first or (clean < args.steps and len(pairs) < first + args.max_pairs
                                 and time.perf_counter() < deadline):
        # Wait only after a disturbed pair: back-to-back pairs keep the cores warm.
        disturbed = len(pairs) >= first and not pairs[-1].get("clean", True)
        waited = wait_for_quiet(CLEAN_CORES, args.quiet_wait) if disturbed else 0.0
        order = ("ours", "baseline") if len(pairs) % 2 == 0 else ("baseline", "ours")
        pair = {name: timed_step(*runners[name], batches[name], args.grad_accum, len(pairs)) for name in order}
        pair["waited_s"] = waited
        pair["clean"] = all(pair[name]["foreign_cores"] < CLEAN_CORES for name in order)
        clean += pair["clean"] and len(pairs) >= first
        pairs.append(pair)
    return pairs


def summarize(pairs: list[dict]) -> dict[str, Any]:
    """Medians and their ratio over the clean steady-state pairs (over all of them when none was clean)."""
    clean = [p for p in pairs if p["clean"]] or pairs
    ours, base = [p["ours"]["s"] for p in clean], [p["baseline"]["s"] for p in clean]
    everything = [p["ours"]["s"] for p in pairs], [p["baseline"]["s"] for p in pairs]
    return {
        "clean_pairs": sum(p["clean"] for p in pairs), "disturbed_pairs": sum(not p["clean"] for p in pairs),
        "ours_median_s": median(ours), "baseline_median_s": median(base),
        "ratio": median(ours) / median(base),
        "pair_ratios": [a / b for a, b in zip(ours, base)],
        "pair_ratio_median": median([a / b for a, b in zip(ours, base)]),
        "pair_ratio_ci95": median_ci([a / b for a, b in zip(ours, base)]),
        "ours_spread": spread(ours), "baseline_spread": spread(base),
        "ratio_all_pairs": median(everything[0]) / median(everything[1]),
        "cpu_ratio": median([p["ours"]["cpu_s"] for p in clean]) / median([p["baseline"]["cpu_s"] for p in clean]),
    }


def median_ci(values: list[float]) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median (order statistics; min..max when few).

    >>> median_ci([1.0, 0.9, 1.1, 1.05, 0.95, 1.2, 0.85, 1.0, 0.98, 1.02])
    (0.9, 1.1)
    """
    ordered = sorted(values)
    k = max(0, int((len(ordered) - 1.96 * len(ordered) ** 0.5) / 2))
    return ordered[k], ordered[len(ordered) - 1 - k]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama-100m")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per engine, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-pairs", type=int, default=0, help="give up after this many pairs (0: 3 x steps)")
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop adding pairs after this many seconds of measuring (per model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-zero", choices=("config", "same"), default="config",
                        help="DeepSpeed's engine at the config's ZeRO stage (what the default gives you) or at the "
                             "stage hybrid_ds runs (like for like)")
    parser.add_argument("--out", default="overhead")
    args = parser.parse_args(argv)
    args.max_pairs = args.max_pairs or 3 * args.steps

    single_process_env()
    import torch

    from hybrid_ds.runtime.engine import init_distributed

    init_distributed()
    torch.set_num_threads(args.threads)  # init_distributed sets cores / local size; pin it to the brief's
    peak = matmul_peak(args.threads)
    results = [measure_model(model, args) for model in args.models.split(",")]
    for r in results:
        r["gemm_peak_flops"] = peak
        r["efficiency_ours"] = r["achieved_flops_ours"] / peak
    for r in results:
        print(f"{r['model']:>11}: ours {r['ours_median_s']:.3f} s  baseline {r['baseline_median_s']:.3f} s  "
              f"ratio {r['ratio']:.3f} (target <= 0.90; pair ratios: median {r['pair_ratio_median']:.3f}, "
              f"95% CI {r['pair_ratio_ci95'][0]:.3f}-{r['pair_ratio_ci95'][1]:.3f})  "
              f"clean/disturbed pairs {r['clean_pairs']}/"
              f"{r['disturbed_pairs']}  all pairs {r['ratio_all_pairs']:.3f}  pairs "
              f"{', '.join(f'{x:.3f}' for x in r['pair_ratios'])}  max |loss diff| {r['max_loss_diff']:.2e}",
              flush=True)
    out = {"results": results}
    write_result(args.out, out)
    return out


if __name__ == "__main__":
    main()
