"""Benchmark: CPU scaling of the pipeline (pp=2) and of data parallelism (dp=2) against one process (pp=1).

Every rank runs one thread (``OMP_NUM_THREADS=1`` and ``--threads 1``), so 2 processes use 2 cores and
1 process 1 core. Each layout is a launch (``deepspeed --num_gpus N bench/train_worker.py``) training
GPT-2 small with m micro-batches per step per data-parallel rank, ZeRO-1, fp32, dropout off (so that pp=2
and pp=1, which see the same micro-batches from the same initial weights, must report the same losses).

* pp2 vs pp1: the same tokens per step; the ideal speed-up is 2 x m / (m + p - 1) (the bubble), 1.78 at
  m = 8. Target >= 1.6. ``pp2`` uses the default partition, ``flops`` (compute-balanced: 9 + 3 blocks at
  seq_len 128); ``pp2-parameters`` the split that balances parameters (6 + 6, ``--also-partition``), to show
  what the balance is worth.
* dp2 vs pp1: twice the tokens per step; ideal 2, less the gradient all-reduce. Target >= 1.8.

All launches are alive at once and take their steps in turn (pp1 pp2 ... then reversed, ...): the speed of
this shared VM drifts by up to 2x over minutes, invisibly to the guest, so launches run one after another
would compare different machines. A step during which anything else used a quarter of a core or more
is marked disturbed; medians are over the clean steady-state steps.

    python bench/scaling.py [--model gpt2] [--micro-batches 8] [--seq-len 128] [--rounds 2] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, launcher_command, log_tail, median, steady, write_result  # noqa: E402

TARGETS = {"pp2": 1.6, "dp2": 1.8}
GPT2_NO_DROPOUT = ["model.overrides.resid_pdrop=0", "model.overrides.embd_pdrop=0", "model.overrides.attn_pdrop=0"]


def layouts(also_partition: str | None) -> dict[str, tuple[int, int, list[str]]]:
    """name -> (processes, pipeline stages, extra --set overrides)."""
    out = {"pp1": (1, 1, []), "pp2": (2, 2, []), "dp2": (2, 1, [])}
    if also_partition:
        out[f"pp2-{also_partition}"] = (2, 2, [f"pipeline.partition={also_partition}"])
    return out


def ideal_speedup(processes: int, stages: int, micro_batches: int) -> float:
    """The speed-up a perfect run reaches over one process: the pipeline bubble is its only loss.

    >>> round(ideal_speedup(2, 2, 8), 3), ideal_speedup(2, 1, 8)
    (1.778, 2.0)
    """
    return processes * micro_batches / (micro_batches + stages - 1)


def schedule(names: list[str], warmup: int, rounds: int) -> list[str]:
    """Whose step comes when: each launch's first step and warm-up steps, then rounds in alternating order.

    >>> schedule(["a", "b"], 1, 2)
    ['a', 'b', 'a', 'b', 'a', 'b', 'b', 'a']
    """
    order = names * (1 + warmup)
    for index in range(rounds):
        order += names if index % 2 == 0 else names[::-1]
    return order


def run_all_layouts(args: argparse.Namespace, folder: Path) -> dict[str, dict[str, Any]]:
    table = layouts(args.also_partition)
    turns = schedule(list(table), args.warmup, args.rounds)
    (folder / "turn").write_text("0")
    procs = {}
    for name, (processes, stages, extra) in table.items():
        overrides = (GPT2_NO_DROPOUT if args.model.startswith("gpt2") else []) + extra + args.set
        worker_args = ["--model", args.model, "--stages", str(stages), "--seq-len", str(args.seq_len),
                       "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.micro_batches),
                       "--threads", "1", "--turns", ",".join(turns), "--name", name, "--turn-dir", str(folder),
                       "--out", str(folder / f"{name}.json"), *sum((["--set", s] for s in overrides), [])]
        cmd, env = launcher_command(processes, "bench/train_worker.py", worker_args, {"OMP_NUM_THREADS": "1"})
        log = open(folder / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log)
    wait_all(procs, folder, args.timeout_s)
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in table}


def wait_all(procs: dict[str, Any], folder: Path, timeout_s: float) -> None:
    """Wait for every launch; if one fails (or time runs out), stop the others and raise with its log."""
    deadline = time.perf_counter() + timeout_s
    failed = None
    while failed is None and any(p.poll() is None for p, _ in procs.values()):
        failed = next((n for n, (p, _) in procs.items() if p.poll() not in (None, 0)), None)
        if time.perf_counter() > deadline:
            failed = "timeout"
        time.sleep(0.5)
    failed = failed or next((n for n, (p, _) in procs.items() if p.returncode), None)
    for proc, log in procs.values():
        if proc.poll() is None:
            proc.terminate()   # the launcher stops its own ranks
            proc.wait(timeout=30)
        log.close()
    if failed:
        name = failed if failed in procs else next(iter(procs))
        raise RuntimeError(f"scaling launch {failed} failed; {log_tail(folder / f'{name}.log')}")


def compare(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    table = layouts(args.also_partition)
    out: dict[str, Any] = {}
    for name, result in runs.items():
        times, clean = steady(result, args.warmup)
        ranks = breakdown(result, args.warmup)
        compute = sum(r.get("ForwardPass", 0.0) + r.get("BackwardPass", 0.0) for r in ranks)
        out[name] = {"tokens_per_s": result["tokens_per_step"] / median(times), "step_s": median(times),
                     "clean_steps": clean, "steady_steps": len(result["steps"]) - 1 - args.warmup,
                     # forward + backward seconds of all ranks per 1000 tokens: the same layers and FLOPs
                     # in every layout, so a difference is the machine's, not the schedule's
                     "compute_s_per_1k_tokens": 1000 * compute / result["tokens_per_step"],
                     "breakdown_s": ranks}
    for name, (processes, stages, _) in table.items():
        if name == "pp1":
            continue
        speedup = out[name]["tokens_per_s"] / out["pp1"]["tokens_per_s"]
        ideal = ideal_speedup(processes, stages, args.micro_batches)
        out[name].update(speedup=speedup, ideal=ideal, of_ideal=speedup / ideal, target=TARGETS.get(name),
                         partition=(result_partition(runs[name]) if stages > 1 else None))
    pp1 = [s["loss"] for s in runs["pp1"]["steps"]]
    for name in runs:
        if name.startswith("pp2"):
            out[name]["max_loss_diff_vs_pp1"] = max(abs(a - s["loss"]) for a, s in zip(pp1, runs[name]["steps"]))
    return out


def result_partition(result: dict[str, Any]) -> list[int]:
    """Blocks per stage of a pipelined run, from its stage plan."""
    return result["blocks_per_stage"]


def breakdown(result: dict[str, Any], warmup: int) -> list[dict[str, float]]:
    """Per rank, the median seconds per step of each pipeline instruction over the steady steps."""
    steps = result["steps"][1 + warmup:]
    ranks = len(steps[0]["instructions_s_per_rank"]) if steps else 0
    out = []
    for rank in range(ranks):
        names = sorted({k for s in steps for k in s["instructions_s_per_rank"][rank]})
        out.append({k: median([s["instructions_s_per_rank"][rank].get(k, 0.0) for s in steps]) for k in names})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--micro-batches", type=int, default=8, help="m: micro-batches per step per dp rank")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1, help="steps after the first that are not counted")
    parser.add_argument("--rounds", type=int, default=2, help="measured steps per layout")
    parser.add_argument("--also-partition", default="parameters",
                        help="a second pp2 layout with this pipeline.partition ('' to skip it)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every launch's config")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--out", default="scaling")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        runs = run_all_layouts(args, Path(tmp))
    result = {"settings": vars(args), **compare(runs, args), "runs": runs}
    for name, r in result.items():
        if isinstance(r, dict) and "speedup" in r:
            loss = f", max |loss diff| vs pp1 {r['max_loss_diff_vs_pp1']:.1e}" if "max_loss_diff_vs_pp1" in r else ""
            target = f"target >= {r['target']}; " if r["target"] else ""
            print(f"{name:>14} vs pp1: {r['speedup']:.2f}x (ideal {r['ideal']:.2f}x, {r['of_ideal']:.0%} of it; "
                  f"{target}{r['clean_steps']}/{r['steady_steps']} clean steps{loss})", flush=True)
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
