"""Benchmark: the backward pass of a MoE pipeline stage whose output carries the router sums.

With ``output_router_logits`` a stage outputs the hidden states and the router sums, both needing grad.
DeepSpeed 0.19.8's ``PipelineEngine._exec_backward_pass`` runs ``out.backward(grad, retain_graph=...)`` once
per output; the router sums depend on every router of the stage and so on nearly the whole stage, so
autograd walks the stage twice. ``seam.engines.OneBackwardPipelineEngine`` flattens the outputs and their
gradients into one tensor each and runs one ``backward``. This times both on stage 0 of a two-stage split
(built as its rank builds it), side by side and alternately, and checks they give the same gradients.

    python bench/moe_backward.py [--layers 8] [--hidden 512] [--experts 8] [--seq-len 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_result  # noqa: E402


def stage_zero(args: argparse.Namespace):
    """Stage 0 of a random mixtral split in two, and an input batch."""
    import torch

    from hybrid_ds.config import load_config_dict
    from hybrid_ds.runtime.pipeline import SequentialStages
    from hybrid_ds.runtime.plan import build_plan

    overrides = {"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "num_hidden_layers": args.layers,
                 "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": args.hidden // 8,
                 "num_local_experts": args.experts, "num_experts_per_tok": 2, "vocab_size": 4096,
                 "max_position_embeddings": max(args.seq_len, 1024),
                 "output_router_logits": True}
    cfg = load_config_dict({"model": {"name": "mixtral-tiny", "overrides": overrides}, "pipeline": {"stages": 2},
                            "train_micro_batch_size_per_gpu": 1})
    stages = SequentialStages(build_plan(cfg, world_size=2))
    ids = torch.randint(0, 4096, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    return stages.layers_per_stage[0], (ids, torch.ones_like(ids)), stages.modules()


def forward(layers, inputs):
    x = inputs
    for fn, _ in layers:
        x = fn(x)
    return [t for t in x if t.is_floating_point()]


def timed(layers, inputs, grads, one: bool) -> float:
    import torch

    outputs = forward(layers, inputs)
    start = time.perf_counter()
    if one:  # OneBackwardPipelineEngine
        torch.cat([t.reshape(-1) for t in outputs]).backward(torch.cat([g.reshape(-1) for g in grads]))
    else:  # DeepSpeed's loop
        for i, (out, grad) in enumerate(zip(outputs, grads)):
            out.backward(gradient=grad, retain_graph=i < len(outputs) - 1)
    return time.perf_counter() - start


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    for name, default in (("layers", 8), ("hidden", 512), ("experts", 8), ("seq-len", 256), ("repeats", 5),
                          ("threads", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers, inputs, modules = stage_zero(args)
    grads = [torch.randn_like(t) for t in forward(layers, inputs)]
    params = [p for m in modules for p in m.parameters()]
    found = {}
    times: dict[str, list[float]] = {"per_output": [], "one": []}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for one in ((False, True) if repeat % 2 else (True, False)):
            for p in params:
                p.grad = None
            seconds = timed(layers, inputs, grads, one)
            found[one] = [p.grad.clone() if p.grad is not None else None for p in params]
            if repeat:
                times["one" if one else "per_output"].append(seconds)
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                for a, b in zip(found[True], found[False]) if b is not None)
    result = {"args": vars(args), "per_output_s": median(times["per_output"]), "one_s": median(times["one"]),
              "max_relative_grad_diff": worst, "torch": torch.__version__}
    result["speedup"] = result["per_output_s"] / result["one_s"]
    print(f"stage-0 backward: per output {result['per_output_s']:.3f} s, one pass {result['one_s']:.3f} s, "
          f"{result['speedup']:.2f}x; max relative gradient difference {worst:.2g}")
    assert worst < 1e-5, "the two backward passes must compute the same gradients"
    write_result("moe_backward", result)


if __name__ == "__main__":
    main()
