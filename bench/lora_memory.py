"""Model-state bytes per rank of a LoRA run (``model.lora``) and a full fine-tune: real engines against the estimate.

SmolLM2-135M (the offline asset, pretrained weights) at pp=2 on 2 gloo processes (fp32 ZeRO-1 at dp=1 runs as
ZeRO-0: torch's AdamW) and at pp=2 x dp=2 on 4 (ZeRO-1: DeepSpeed's ZeRO optimizer partitions the fp32 master
copy and Adam's moments over the two replicas), with and without LoRA (r=16, all-linear). Each rank builds the
engine hybrid_ds trains with, runs two optimizer steps, and around every gradient reduction and the inner
optimizer's step sums the bytes of every distinct storage reachable from its parameters and its optimizer
(``estimator_accuracy.StateProbe``), split into the weights and the rest: gradients and optimizer states (master
copies, Adam's moments, fp32 gradient partitions). The peak is compared with ``hybrid_ds.estimate``'s model states
of the rank's stage (``state.params`` and ``grads + master + optimizer``); ZeRO's reduce bucket (sized to the
stage's trainable parameters) is kept apart.

Usage: ``python bench/lora_memory.py [--dp 1 2]``; prints the table and writes bench/results/lora_memory.json.
``--worker`` is the launcher's entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, free_port, single_process_env  # noqa: E402

LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
SEQ, MICRO, ACCUM, STEPS = 32, 1, 2, 2


def run_config(lora: bool, stages: int = 2, model: str = "smollm2-135m") -> dict:
    """The measured run: SmolLM2-135M pretrained (the offline asset; or ``model``), fp32, ZeRO-1, torch's AdamW."""
    return {"model": {"name": model, "pretrained": True, **({"lora": LORA} if lora else {})},
            "data": {"seq_len": SEQ}, "pipeline": {"stages": stages},
            "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def predict(raw: dict, world: int) -> list[dict]:
    """Estimated bytes per stage (pure: hybrid_ds.estimate)."""
    from hybrid_ds.config import load_config_dict
    from hybrid_ds.estimate.run import run_from_config
    from hybrid_ds.estimate.stages import stage_estimates

    run = run_from_config(load_config_dict(raw), world)
    return [{"stage": s.stage, "trainable": s.trainable, "frozen": s.frozen, "optimizer": s.state.optimizer_path,
             "weights": s.state.params, "states": s.state.grads + s.state.master + s.state.optimizer,
             "bucket": s.state.comm_buffer} for s in stage_estimates(run, runtime="cpu", overhead=0.0)]


def measure(raw: dict, world: int) -> dict:
    """This rank's peak model-state bytes in the engine hybrid_ds builds for ``raw`` (the process group is up)."""
    import torch

    from estimator_accuracy import StateProbe
    from hybrid_ds.config import load_config_dict
    from hybrid_ds.seam.instruments import wrap_pipeline_instructions
    from hybrid_ds.runtime.engine import build_pipeline_engine
    from hybrid_ds.runtime.plan import build_plan

    plan = build_plan(load_config_dict(raw), world)
    engine = build_pipeline_engine(plan)
    probe = StateProbe(engine)
    # the peaks are at the reductions and the step (gradients whole, then Adam's state): sample only there
    wrap_pipeline_instructions(engine, lambda kind, fn: probe._around(fn, fn.__name__)
                               if kind.__name__ in ("ReduceGrads", "ReduceTiedGrads") else fn)
    inner = engine.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    inner.step = probe._around(inner.step, "optimizer step")
    vocab = plan.resolved.hf_config.vocab_size
    ids = torch.randint(0, vocab, (MICRO, SEQ), generator=torch.Generator().manual_seed(0))
    for _ in range(STEPS):
        engine.train_batch(iter([((ids, torch.ones_like(ids)), ids)] * ACCUM))
    weights = probe.breakdown.get("param", 0)
    return {"rank": torch.distributed.get_rank(), "stage": engine.stage_id, "weights": weights,
            "states": probe.peak - weights, "where": probe.where, "bucket": probe.bucket,
            "trainable": sum(p.numel() for p in engine.module.parameters() if p.requires_grad)}


def measure_here(raw: dict) -> dict:
    """:func:`measure` on a process group of one, in this process."""
    from hybrid_ds.runtime.engine import init_distributed

    single_process_env()
    init_distributed()
    return measure(raw, 1)


def compare(raw: dict, measured: list[dict], world: int) -> list[dict]:
    """The ranks' measurements of the run ``raw`` with the estimate of their stage and the relative errors."""
    predicted = {p["stage"]: p for p in predict(raw, world)}
    rows = []
    for m in measured:
        p = predicted[m["stage"]]
        rows.append({"lora": "lora" in raw["model"], "dp": world // raw["pipeline"]["stages"], **m, "predicted": p,
                     "error_states": p["states"] / m["states"] - 1,
                     "error_total": (p["states"] + p["weights"]) / (m["states"] + m["weights"]) - 1})
    return rows


def worker(lora: bool, out: Path) -> None:
    import torch

    from hybrid_ds.runtime.engine import init_distributed

    world = init_distributed()
    result = measure(run_config(lora), world)
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))


def launch(lora: bool, nproc: int) -> list[dict]:
    """The worker on ``nproc`` gloo processes through the deepspeed launcher; every rank's measurement."""
    with tempfile.TemporaryDirectory() as tmp:
        launcher = Path(sys.executable).with_name("deepspeed")
        cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(free_port()), __file__, "--worker",
               "--out", tmp] + (["--lora"] if lora else [])
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
        if proc.returncode:
            raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return [json.loads((Path(tmp) / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def print_rows(rows: list[dict]) -> None:
    mib = 2**20
    print("model states per rank, SmolLM2-135M pretrained, pp=2, fp32, ZeRO-1 (MiB; states = gradients + master "
          "copies + Adam)")
    print(f"{'run':<5} {'dp':>2} {'rank':>4} {'stage':>5} {'trainable':>10}  {'optimizer':<22} {'weights':>8} "
          f"{'states meas.':>12} {'states est.':>11} {'error':>7}  {'total meas.':>11} {'total est.':>10} "
          f"{'error':>7}  {'bucket meas./est.':>17}")
    for r in rows:
        p = r["predicted"]
        print(f"{'lora' if r['lora'] else 'full':<5} {r['dp']:>2} {r['rank']:>4} {r['stage']:>5} "
              f"{r['trainable']:>10,}  {p['optimizer']:<22} {r['weights'] / mib:>8.1f} {r['states'] / mib:>12.2f} "
              f"{p['states'] / mib:>11.2f} {r['error_states']:>+7.1%}  {(r['states'] + r['weights']) / mib:>11.1f} "
              f"{(p['states'] + p['weights']) / mib:>10.1f} {r['error_total']:>+7.1%}  "
              f"{r['bucket'] / mib:>8.1f}/{p['bucket'] / mib:<8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2], choices=(1, 2),
                        help="data-parallel sizes to measure (2 or 4 processes)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.lora, Path(args.out))
        return
    rows = [row for dp in args.dp for lora in (False, True)
            for row in compare(run_config(lora), launch(lora, 2 * dp), 2 * dp)]
    print_rows(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_memory.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
