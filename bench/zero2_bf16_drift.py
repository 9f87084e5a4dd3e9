"""bf16 ZeRO-2 with pipeline stages against bf16 ZeRO-1: how far the losses drift over a run.

ZeRO-2 with stages reduces each micro-batch's gradients over data parallel as soon as the backward pass produced them,
in DeepSpeed's communication dtype (bf16 for bf16 parameters unless ``communication_data_type`` says otherwise), and
adds them to an fp32 partition; ZeRO-1 accumulates the micro-batches first (in ``data_types.grad_accum_dtype``) and
reduces once per step. Over many steps at a high gradient accumulation the difference could add up. This runs
``launch/train.py`` four times on the same data from the same seed, each pp=2 x dp=2 (4 gloo processes), gradient
accumulation 8: bf16 ZeRO-1, bf16 ZeRO-2 as configured by default, bf16 ZeRO-2 with ``communication_data_type: fp32``,
and, for scale, fp32 ZeRO-1; and reports each run's largest relative loss difference from bf16 ZeRO-1 and from fp32 ZeRO-1, over the first 10 steps
and over all.

Usage: ``python bench/zero2_bf16_drift.py [--steps 50]``; writes bench/results/zero2_bf16_drift.json (kept in git).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import launch, write_result  # noqa: E402

THRESHOLD = 1e-3  # the bound: above it, ZeRO-2 with stages would default to fp32 communication
RUNS = {"zero1": {"stage": 1}, "zero2": {"stage": 2}, "zero2-fp32-comm": {"stage": 2},
        "zero1-fp32": {"stage": 1}}  # the last: bf16's own distance from fp32, for scale


def byte_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer (256 bytes and <|endoftext|>): the run's vocabulary stays small, as a bf16 head over
    GPT-2's 50,257 tokens makes a CPU step minutes long."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={**{ch: i for i, ch in enumerate(alphabet)}, "<|endoftext|>": 256}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def config(save_dir: Path, name: str, steps: int, tokenizer: Path) -> dict:
    raw = {
        "model": {"name": "llama-tiny", "overrides": {"vocab_size": 264}},
        "data": {"source": "builtin", "seq_len": 64, "tokenizer": str(tokenizer),
                 "cache_dir": str(save_dir.parent.parent / "data-cache")},
        "pipeline": {"stages": 2},
        "train": {"max_steps": steps, "seed": 1234, "save_dir": str(save_dir), "save_interval": 0,
                  "eval_interval": 0},
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 8,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 3e-3}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": name != "zero1-fp32"},
        "zero_optimization": RUNS[name],
        "steps_per_print": 10**9,
    }
    if name == "zero2-fp32-comm":
        raw["communication_data_type"] = "fp32"
    return raw


def max_relative_difference(reference: list[float], other: list[float], upto: int) -> float:
    """The largest |other - reference| / |reference| over the first ``upto`` steps.

    >>> max_relative_difference([2.0, 4.0, 8.0], [2.0, 4.4, 8.0], 3), max_relative_difference([2.0, 4.0], [2.0, 4.4], 1)
    (0.1, 0.0)
    """
    return round(max(abs(a - b) / abs(a) for a, b in list(zip(reference, other))[:upto]), 12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    losses, seconds, training_s = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="zero2-drift-") as tmp:
        tokenizer = byte_tokenizer(Path(tmp) / "tokenizer")
        for name in RUNS:
            folder = Path(tmp) / name
            folder.mkdir()
            path = folder / "config.json"
            path.write_text(json.dumps(config(folder / "run", name, args.steps, tokenizer)))
            seconds[name] = launch(4, "launch/train.py", ["--config", str(path)], folder / "log.txt",
                                   timeout_s=3600)
            summary = json.loads((folder / "run" / "summary.json").read_text())
            losses[name], training_s[name] = summary["losses"], summary["seconds"]
            print(f"{name}: {len(losses[name])} steps in {seconds[name]:.0f} s ({training_s[name]:.0f} s training), "
                  f"loss {losses[name][0]:.4f} -> "
                  f"{losses[name][-1]:.4f}", flush=True)
    drift = {reference: {f"{name}, {upto} steps": max_relative_difference(losses[reference], losses[name], upto)
                         for name in RUNS if name != reference for upto in (10, args.steps)}
             for reference in ("zero1", "zero1-fp32")}
    for reference, rows in drift.items():
        for name, value in rows.items():
            print(f"{name} against {reference}: largest relative loss difference {value:.2e} "
                  f"({'over' if value > THRESHOLD else 'within'} {THRESHOLD:g})")
    result = {"setup": "llama-tiny (a byte-level vocabulary of 264), seq_len 64, pp=2 x dp=2 (4 gloo processes), "
                       "micro-batch 2, gradient accumulation 8, AdamW lr 3e-3, clipping 1.0, built-in corpus",
              "steps": args.steps, "threshold": THRESHOLD,
              "max_relative_loss_difference": {"against bf16 zero1": drift["zero1"],
                                               "against fp32 zero1": drift["zero1-fp32"]},
              "losses": losses, "seconds": seconds, "training_seconds": training_s}
    print(f"wrote {write_result('zero2_bf16_drift', result)}")


if __name__ == "__main__":
    main()
