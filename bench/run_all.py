"""Run the performance benchmarks (issues 7 and 15) and print one table (also bench/results/performance.{json,md}).

    python bench/run_all.py --quick     # under 10 minutes on a 2-core CPU machine
    python bench/run_all.py             # more steps and rounds, and the real training command's start-up

Each benchmark runs in its own process (bench/overhead.py, bench/scaling.py, bench/default_config.py,
each usable alone) and writes its own JSON to bench/results/; this script reads them back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, write_result  # noqa: E402

# Step time of ours at its defaults over DeepSpeed's engine on the Hugging Face model at the same config (issue 15).
OVERHEAD_TARGET = 0.90
# result name -> (script, arguments); each script writes bench/results/<result name>.json
FLOOR = ["--models", "gpt2-12x64,llama-12x64", "--grad-accum", "4", "--threads", "1", "--warmup", "3",
         "--quiet-wait", "5"]
QUICK = {
    "overhead": ("overhead", ["--models", "gpt2,llama-100m", "--grad-accum", "2", "--steps", "3", "--warmup", "1",
                              "--budget-s", "80", "--quiet-wait", "10"]),
    "overhead_same_stage": ("overhead", ["--models", "gpt2", "--grad-accum", "2", "--steps", "3", "--warmup", "1",
                                         "--budget-s", "60", "--quiet-wait", "10", "--baseline-zero", "same"]),
    "overhead_floor": ("overhead", [*FLOOR, "--steps", "20", "--budget-s", "30"]),
    "scaling": ("scaling", ["--rounds", "2", "--warmup", "1"]),
    "default_config": ("default_config", ["--steps", "2", "--warmup", "0", "--budget-s", "40"]),
    "compile_speed": ("compile_speed", ["--steps", "2", "--budget-s", "45", "--quiet-wait", "5"]),
    "loss_memory": ("loss_memory", []),
}
FULL = {
    "overhead": ("overhead", ["--models", "gpt2,llama-100m", "--grad-accum", "4", "--steps", "6", "--warmup", "1"]),
    "overhead_same_stage": ("overhead", ["--models", "gpt2,llama-100m", "--grad-accum", "4", "--steps", "6",
                                         "--warmup", "1", "--baseline-zero", "same"]),
    "overhead_floor": ("overhead", [*FLOOR, "--steps", "40"]),
    "scaling": ("scaling", ["--rounds", "4", "--warmup", "1"]),
    "default_config": ("default_config", ["--steps", "3", "--warmup", "1", "--cli"]),
    "compile_speed": ("compile_speed", ["--steps", "4"]),
    "loss_memory": ("loss_memory", []),
}


def run_bench(name: str, script: str, args: list[str]) -> tuple[dict[str, Any] | None, float, str | None]:
    """Run bench/SCRIPT.py writing result NAME; return the result, its wall seconds and the error, if any."""
    start = time.perf_counter()
    args = [*args, "--out", name]
    print(f"== {name}: python bench/{script}.py {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), *args], cwd=REPO,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("[") and "Using topology" not in line
             and "SEED_LAYERS" not in line]
    print("\n".join(lines[-12:]), flush=True)
    if proc.returncode:
        return None, seconds, f"exit {proc.returncode}: " + " | ".join(lines[-3:])
    return json.loads((RESULTS / f"{name}.json").read_text()), seconds, None


def table(results: dict[str, Any]) -> list[str]:
    """Markdown rows: what was measured, ours, the reference, the ratio, the target, and whether it is met."""
    rows = ["| measurement | hybrid_ds | reference | ratio | target | met |", "|---|---|---|---|---|---|"]
    for name, what in (("overhead", "at the config's ZeRO stage (what the default gives you)"),
                       ("overhead_same_stage", "at the ZeRO stage ours runs (like for like)")):
        for r in (results.get(name) or {}).get("results", []):
            rows.append(_overhead_row(r, what))
    for r in (results.get("overhead_floor") or {}).get("results", []):
        per_micro_ms = 1000 * (r["pair_ratio_median"] - 1) * r["baseline_median_s"] / r["grad_accum"]
        low, high = r["pair_ratio_ci95"]
        rows.append(f"| overhead floor: {r['model']} (12 blocks of width 64: per-layer Python and dispatch work; "
                    f"{r['clean_pairs']} clean pairs, pair-ratio 95% CI {low:.2f}-{high:.2f}; "
                    f"{per_micro_ms:+.1f} ms per micro-batch) | {r['ours_median_s'] * 1000:.0f} ms "
                    f"| {r['baseline_median_s'] * 1000:.0f} ms | {r['pair_ratio_median']:.3f} | - | - |")
    scaling = results.get("scaling")
    if scaling:
        m = scaling["settings"]["micro_batches"]
        pp1 = scaling["pp1"]["tokens_per_s"]
        for name, r in scaling.items():
            if not (isinstance(r, dict) and "speedup" in r):
                continue
            what = "dp=2 vs dp=1" if name == "dp2" else (
                f"pp=2 vs pp=1, partition `{name[4:] or 'flops'}`{' (the default)' if name == 'pp2' else ''} "
                f"{' + '.join(map(str, r['partition']))} blocks")
            target, met = (f">= {r['target']}x", _met(r["speedup"] >= r["target"])) if r["target"] else ("-", "-")
            rows.append(f"| {what}, m={m}, 1 thread/process; ideal {r['ideal']:.2f}x "
                        f"({r['clean_steps']}/{r['steady_steps']} clean steps) | {r['tokens_per_s']:.1f} tokens/s "
                        f"| {pp1:.1f} tokens/s | {r['speedup']:.2f}x | {target} | {met} |")
    default = results.get("default_config")
    if default:
        rows.append(f"| hardware efficiency, configs/gpt.json on CPU ({default['layout']}) "
                    f"| {default['achieved_flops'] / 1e9:.1f} GFLOP/s | {default['peak_flops'] / 1e9:.1f} GFLOP/s "
                    f"GEMM peak | {default['efficiency']:.1%} | - | - |")
        phases = ", ".join(f"{p['phase']} {p['s']:.1f}" for p in default["phases"])
        rows.append(f"| start-up, launch to end of first step, configs/gpt.json ({phases} s) "
                    f"| {default['launch_to_first_step_s']:.1f} s | - | - | - | - |")
    for r in (results.get("compile_speed") or {}).get("results", []):
        rows.append(f"| step time, `train.compile: true` vs eager: {r['model']} (1 thread, micro {r['micro_batch']} x "
                    f"{r['grad_accum']}, seq {r['seq_len']}; {r['clean_pairs']} clean pairs; compile {r['compile_s']:.0f} s "
                    f"for {r['blocks']} blocks in {r['graphs']} graph(s), paid in the first step) "
                    f"| {r['compiled_median_s']:.2f} s | {r['eager_median_s']:.2f} s | {r['ratio']:.3f} | - | - |")
    memory = results.get("loss_memory")
    if memory:
        shape, runs, mib = memory["shape"], memory["runs"], 2 ** 20
        rows.append(f"| head stage peak memory, fused loss vs Hugging Face's loss on full logits (vocab {shape['vocab']:,}, "
                    f"hidden {shape['hidden']}, {shape['tokens']} tokens, fp32; both allocate the weight's "
                    f"{memory['weight_grad_bytes'] / mib:.0f} MiB gradient; beyond it: "
                    f"{memory['ratio_beyond_weight_grad']:.3f}x; step time {memory['step_time_ratio']:.2f}x) "
                    f"| {runs['fused']['peak_delta'] / mib:.0f} MiB | {runs['hf']['peak_delta'] / mib:.0f} MiB "
                    f"| {memory['ratio']:.3f} | <= {memory['target']} | {_met(memory['ratio'] <= memory['target'])} |")
    for name, error in results.get("errors", {}).items():
        rows.append(f"| {name} | failed: {error} | | | | |")
    return rows


def _overhead_row(r: dict[str, Any], what: str) -> str:
    """One step-time row of bench/overhead.py: ours at stages=1 against DeepSpeed's engine on the HF model."""
    low, high = r["pair_ratio_ci95"]
    disturbed = f", {r['disturbed_pairs']} disturbed" if r["disturbed_pairs"] else ""
    stages = f"ZeRO-{r['ours_zero_stage']} vs ZeRO-{r['baseline_zero_stage']}; " if "ours_zero_stage" in r else ""
    note = (f"{stages}{r['clean_pairs']} clean pairs{disturbed}"
            + f"; pair ratios: median {r['pair_ratio_median']:.3f}, 95% CI {low:.2f}-{high:.2f}")
    return (f"| step time, stages=1 vs DeepSpeed's engine on the HF model {what}: {r['model']} ({r['threads']} "
            f"threads, micro {r['micro_batch']} x {r['grad_accum']}, seq {r['seq_len']}; {note}) "
            f"| {r['ours_median_s']:.2f} s | {r['baseline_median_s']:.2f} s | {r['ratio']:.3f} | <= {OVERHEAD_TARGET} "
            f"| {_met_within(r['ratio'], OVERHEAD_TARGET, low, high)} |")


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _met_within(ratio: float, target: float, low: float, high: float) -> str:
    """yes / no, or "noise" when the pair ratios' 95% interval holds the target on its far side."""
    if ratio <= target:
        return "yes"
    return "**no**" if low > target else f"noise (CI {low:.2f}-{high:.2f} holds {target})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (under 10 minutes)")
    parser.add_argument("--only", help="comma-separated subset of: " + ",".join(QUICK))
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else FULL
    names = args.only.split(",") if args.only else list(plan)
    start = time.perf_counter()
    ensure_data_cached()
    results: dict[str, Any] = {"errors": {}, "seconds": {}}
    for name in names:
        result, seconds, error = run_bench(name, *plan[name])
        results["seconds"][name] = seconds
        if error:
            results["errors"][name] = error
        else:
            results[name] = result
    rows = table(results)
    command = f"python bench/run_all.py{' --quick' if args.quick else ''}"
    footer = (f"`{command}`: {time.perf_counter() - start:.0f} s on {os.cpu_count()} cores "
              f"({platform.processor() or platform.machine()}), {time.strftime('%Y-%m-%d %H:%M')}")
    print("\n" + "\n".join(rows) + "\n\n" + footer)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "performance.md").write_text("\n".join(rows) + "\n\n" + footer + "\n")
    write_result("performance", {"command": command, "summary": rows, **results})
    return 1 if results["errors"] else 0


def ensure_data_cached() -> None:
    """Pack the built-in corpus once (at 128 tokens) so that no benchmark times the first packing."""
    from hybrid_ds.config import DataConfig
    from hybrid_ds.data import load_data

    load_data(DataConfig(seq_len=128), "causal_lm")


if __name__ == "__main__":
    sys.exit(main())
