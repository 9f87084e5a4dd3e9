"""Peak memory and step time of the head stage's loss: fused (``train.fused_loss``) against today's full logits.

The head stage's work on one micro-batch, forward and backward: final norm (Llama's RMSNorm), untied output
projection, causal-LM loss, from hidden states that need grad (as a last stage receives them), fp32 on CPU.

* ``hf``:    ``ForCausalLMLoss(F.linear(norm(h), W), labels)``: what the head did before ``fused_loss``, and
             what ``fused_loss: false`` does: [tokens, vocab] fp32 logits, log-softmax and two gradients.
* ``fused``: ``fused_lm_loss(HeadLogits(norm(h), W), labels)`` (hybrid_ds.models.head_loss): blocks of rows.

Each runs in a fresh process (so ``ru_maxrss`` is its own): parameters built and touched, then one step, whose
peak RSS over the RSS just before it is the step's memory; the logits (or HeadLogits) stay referenced until
backward ends, as DeepSpeed's pipeline keeps a last stage's outputs in ``pipe_buffers``. That delta includes
the weight's gradient, which both paths allocate (vocab x hidden x 4 bytes); the JSON gives it, and the memory
beyond it: the weight's gradient alone is half of what today's path peaks at (logits, their gradient and the
weight's gradient are alive at once in its backward), so no loss that produces that gradient can go below ~0.5x
of the whole delta at this shape; the memory beyond it is what the loss itself costs. A second step, gradients
dropped in between, is timed too; the step time of the two (the best of their two steps) is noisy on a shared
machine, so the load average is recorded with it.

Default shape: Llama 3's vocabulary (128,256) and Llama 3.2 1B's hidden size (2048), 1 x 1024 tokens.
Usage: ``python bench/loss_memory.py [--vocab 128256] [--hidden 2048] [--seq 1024]``; writes
bench/results/loss_memory.json. About 80 s here (2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("HYBRID_DS_BENCH_RESULTS", ROOT / "bench" / "results")) / "loss_memory.json"
TARGET = 0.35
MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(path: str, vocab: int, hidden: int, seq: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    sys.path.insert(0, str(ROOT))
    from hybrid_ds.models.head_loss import HeadLogits, fused_lm_loss

    torch.manual_seed(0)
    norm = LlamaRMSNorm(hidden)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden).mul_(hidden**-0.5))  # in place: no second copy at setup
    states = torch.randn(1, seq, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, seq))

    def step() -> float:
        normed = norm(states)
        if path == "fused":
            outputs = HeadLogits(normed, weight)
            loss = fused_lm_loss(outputs, labels, shift=True)
        else:
            outputs = F.linear(normed, weight)
            loss = ForCausalLMLoss(outputs, labels, vocab)
        loss.backward()
        del outputs
        return loss.item()

    before, peak_before = rss_bytes(), peak_rss_bytes()
    start = time.perf_counter()
    loss = step()
    first = time.perf_counter() - start
    peak = peak_rss_bytes()
    for p in (states, weight, *norm.parameters()):
        p.grad = None
    start = time.perf_counter()
    step()
    second = time.perf_counter() - start
    assert peak > peak_before, "the setup's peak exceeds the step's: the delta would not be the step's"
    return {"path": path, "loss": loss, "rss_before": before, "peak_before": peak_before, "peak": peak,
            "peak_delta": peak - before, "step_s": [first, second]}


def measure(path: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--seq", str(args.seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)   # Llama 3 (meta-llama/Llama-3.2-1B config.json)
    parser.add_argument("--hidden", type=int, default=2048)    # Llama 3.2 1B
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--worker", choices=["hf", "fused"])
    parser.add_argument("--out", default="loss_memory", help="result name: bench/results/OUT.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.vocab, args.hidden, args.seq)))
        return
    load_before = os.getloadavg()[0]
    runs = {path: measure(path, args) for path in ("hf", "fused")}
    grad = args.vocab * args.hidden * 4   # the weight's gradient; the weight itself is in rss_before
    hf, fused = runs["hf"]["peak_delta"], runs["fused"]["peak_delta"]
    result = {
        "shape": {"vocab": args.vocab, "hidden": args.hidden, "tokens": args.seq, "dtype": "fp32"},
        "weight_bytes": grad, "weight_grad_bytes": grad,
        "logits_bytes": args.vocab * args.seq * 4,
        "runs": runs,
        "ratio": fused / hf,
        "ratio_beyond_weight_grad": (fused - grad) / (hf - grad),
        "step_time_ratio": min(runs["fused"]["step_s"]) / min(runs["hf"]["step_s"]),
        "loss_diff": abs(runs["fused"]["loss"] - runs["hf"]["loss"]),
        "target": TARGET,
        "load_average": [load_before, os.getloadavg()[0]],  # other processes' load: step times are noisy beyond ~1
    }
    results = RESULTS.with_name(f"{args.out}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2))
    print(f"head stage, vocab {args.vocab}, hidden {args.hidden}, {args.seq} tokens, fp32, CPU "
          f"(weight {grad / MIB:.0f} MiB, its gradient {grad / MIB:.0f} MiB, one fp32 logits "
          f"{result['logits_bytes'] / MIB:.0f} MiB)")
    for path in ("hf", "fused"):
        run = runs[path]
        print(f"  {path:6} peak over the step's start {run['peak_delta'] / MIB:7.0f} MiB   step "
              f"{min(run['step_s']):.2f} s   loss {run['loss']:.6f}")
    print(f"peak memory fused / hf: {result['ratio']:.3f} (target <= {TARGET}); beyond the weight's gradient: "
          f"{result['ratio_beyond_weight_grad']:.3f}; step time fused / hf: {result['step_time_ratio']:.2f} "
          f"(load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
