"""ZB-H1 against 1F1B on CPU (one core per stage), side by side: step time, each rank's idle fraction from a timeline
of its instructions, the F, B and W durations, and the schedule simulator (hybrid_ds.config.schedule) fed with them.

One launch (``deepspeed --num_gpus 2``, pp=2, gloo, 1 thread a rank) builds four engines in every process from the
same seed: 1F1B and ZB-H1 at m = 4 and at m = 8 micro-batches, and trains them in turn on the same micro-batches (the
order rotates each step) so that the machine's drift hits all alike. The model has GPT-2 small's widths (hidden 768,
12 heads, MLP 3072) in 5 blocks, vocabulary 8,192 tied to the head (about 0.9 of a block's FLOPs), so that the flops
partition gives the stages nearly equal work (embedding + 3 blocks, 2 blocks + head): with 4 blocks the second
stage's forward and backward of a micro-batch took 1.34x the first's, and the first stage's waiting was mostly that
imbalance, which no schedule fills. fp32, AdamW,
clipping 1.0, dropout off.

Per rank and engine: each instruction's wall time (``seam.instruments.wrap_pipeline_instructions``). Compute is
ForwardPass, BackwardPass (1F1B's whole backward), BackwardInputPass (B) and WeightPass (W); idle is the time in
transfers (SendActivation, RecvActivation, SendGrad, RecvGrad: a receive waits until the neighbour's send, and
1F1B's sends, DeepSpeed's, until the neighbour's receive; ZB-H1 sends without waiting and waits for its sends in
WeightPassesDone), in WeightPassesDone and in the step's reductions (ReduceTiedGrads, ReduceGrads: collectives,
which wait for the rank that finishes its backward last) over the step; loading and the optimizer step are
neither. The simulator gets each stage's median F, B, W (1F1B: its whole backward) and the
median time a transfer takes when both sides are ready (the smallest transfer times), and predicts both schedules' step
(without the optimizer step, which is added as measured).

Usage: ``python bench/zero_bubble.py [--steps 6] [--seq 256]``; prints a table and writes bench/results/zero_bubble.json.
``--worker`` is the launcher's entry point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_config, launch, write_result  # noqa: E402

MODEL = {"name": "gpt2-tiny", "overrides": {"n_embd": 768, "n_head": 12, "n_layer": 5, "vocab_size": 8192,
                                            "n_positions": 1024, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                            "attn_pdrop": 0.0}}
MICRO = 2
WARMUP = 2
ENGINES = [(schedule, m) for m in (4, 8) for schedule in ("1f1b", "zb-h1")]
COMPUTE = {"ForwardPass": "F", "BackwardPass": "BW", "BackwardInputPass": "B", "WeightPass": "W"}
TRANSFER = ("SendActivation", "RecvActivation", "SendGrad", "RecvGrad")
WAITING = TRANSFER + ("WeightPassesDone", "ReduceTiedGrads", "ReduceGrads")


def run_config(schedule: str, micro_batches: int, seq: int) -> dict:
    raw = bench_config("gpt2-tiny", seq, MICRO, micro_batches, stages=2)
    raw["model"] = MODEL
    raw["pipeline"]["schedule"] = schedule
    return raw


def build_engine(key: tuple[str, int], seq: int, world: int):
    """The engine of ``key`` (schedule, micro-batches), from the same seed in every process and for every key."""
    import torch

    from hybrid_ds.config import load_config_dict
    from hybrid_ds.runtime.engine import build_pipeline_engine
    from hybrid_ds.runtime.plan import build_plan

    torch.manual_seed(0)
    return build_pipeline_engine(build_plan(load_config_dict(run_config(*key, seq)), world))


def micro_batches(seq: int) -> dict[int, list]:
    """The same micro-batches for every engine: m -> the first m of 8 (token ids, mask), labels."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    batches = [torch.randint(0, MODEL["overrides"]["vocab_size"], (MICRO, seq), generator=gen) for _ in range(8)]
    return {m: [((ids, torch.ones_like(ids)), ids) for ids in batches[:m]] for _, m in ENGINES}


def worker(out: Path, steps: int, seq: int) -> None:
    import torch

    from hybrid_ds.runtime.engine import init_distributed
    from hybrid_ds.seam.instruments import wrap_pipeline_instructions

    world = init_distributed()
    engines, timeline = {}, {}
    for key in ENGINES:
        engines[key] = build_engine(key, seq, world)
        timeline[key] = []

        def wrap(kind, fn, log=timeline[key]):
            def timed(engine, *args, **kwargs):
                start = time.perf_counter()
                result = fn(engine, *args, **kwargs)
                log.append((kind.__name__, start, time.perf_counter()))
                return result
            return timed

        wrap_pipeline_instructions(engines[key], wrap)
    micro = micro_batches(seq)
    steps_out = {key: [] for key in ENGINES}
    losses = {key: [] for key in ENGINES}
    for step in range(WARMUP + steps):
        order = ENGINES[step % len(ENGINES):] + ENGINES[:step % len(ENGINES)]
        for key in order:
            torch.distributed.barrier()
            timeline[key].clear()
            start = time.perf_counter()
            losses[key].append(engines[key].train_batch(iter(micro[key[1]])).item())
            end = time.perf_counter()
            if step >= WARMUP:
                steps_out[key].append({"start": start, "end": end, "instructions": list(timeline[key])})
    rank = torch.distributed.get_rank()
    result = {f"{s}-m{m}": {"stage": engines[(s, m)].stage_id, "losses": losses[(s, m)], "steps": steps_out[(s, m)]}
              for s, m in ENGINES}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def memory_worker(out: Path, seq: int) -> None:
    """Per engine: one step to allocate the optimizer's state, then one under torch's profiler (CPU allocations):
    the bytes held at the step's start (every storage reachable from the parameters, the optimizer and the pipe
    buffers) plus the most the allocations of the passes add, up to the step's reductions."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from estimator_accuracy import _walk
    from hybrid_ds.runtime.engine import init_distributed
    from hybrid_ds.seam.instruments import wrap_pipeline_instructions

    def annotated(kind, fn):
        def run(engine, *args, **kwargs):
            with torch.profiler.record_function(kind.__name__):
                return fn(engine, *args, **kwargs)
        return run

    world = init_distributed()
    batches = micro_batches(seq)
    result = {}
    for key in ENGINES:
        engine = build_engine(key, seq, world)
        wrap_pipeline_instructions(engine, annotated)
        micro = batches[key[1]]
        engine.train_batch(iter(micro))
        torch.distributed.barrier()
        held = _walk([("param", p) for p in engine.module.parameters()] + [("optimizer", engine.optimizer),
                                                                          ("buffers", engine.pipe_buffers)], set())
        start = sum(n for n, _ in held.values())
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            engine.train_batch(iter(micro))
        events = prof.profiler.kineto_results.events()
        reductions = min(e.start_ns() for e in events if e.name() == "ReduceTiedGrads")
        live = peak = 0
        for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
            if event.start_ns() >= reductions:
                break
            live += event.nbytes()
            peak = max(peak, live)
        result[f"{key[0]}-m{key[1]}"] = {"stage": engine.stage_id, "start_bytes": start, "added_bytes": peak,
                                         "peak_bytes": start + peak}
        del engine, prof
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))


def predict_memory(seq: int, world: int = 2) -> dict:
    """The estimator's bytes per stage up to the step's reductions: model states, pipe buffers, activations of the
    micro-batches in flight (with ZB-H1's W-pending gradients), logits, the backward's transient."""
    from hybrid_ds.config import load_config_dict
    from hybrid_ds.estimate.run import run_from_config
    from hybrid_ds.estimate.stages import stage_estimates

    out = {}
    for schedule, m in ENGINES:
        run = run_from_config(load_config_dict(run_config(schedule, m, seq)), world)
        out[f"{schedule}-m{m}"] = [
            {"bytes": s.state.total + s.pipe_buffers + s.activations + s.logits + s.state.backward_transient,
             "activations": s.activations, "in_flight": s.in_flight}
            for s in stage_estimates(run, runtime="cpu", overhead=0.0)]
    return out


def memory(seq: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        launch(2, "bench/zero_bubble.py", ["--worker", "--memory", "--out", tmp, "--seq", str(seq)],
               Path(tmp) / "log.txt", env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout_s=1800)
        raw = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
    predicted = predict_memory(seq)
    rows = {}
    print(f"peak bytes per stage up to the step's reductions, MiB (measured / estimator), seq {seq}, micro-batch {MICRO}")
    for key in predicted:
        rows[key] = []
        for measured, guess in zip(raw, predicted[key]):
            rows[key].append({**measured[key], "predicted_bytes": guess["bytes"],
                              "predicted_activations": guess["activations"], "in_flight": guess["in_flight"],
                              "error": guess["bytes"] / measured[key]["peak_bytes"] - 1})
        print(f"{key:>9}: " + "; ".join(f"stage {s}: {r['peak_bytes'] / 2**20:.1f} / {r['predicted_bytes'] / 2**20:.1f} "
                                         f"({r['error']:+.1%})" for s, r in enumerate(rows[key])))
    for m in (4, 8):
        one, zb = rows[f"1f1b-m{m}"], rows[f"zb-h1-m{m}"]
        print(f"m={m}: ZB-H1 - 1F1B, measured / predicted MiB: " + "; ".join(
            f"stage {s}: {(z['peak_bytes'] - o['peak_bytes']) / 2**20:+.1f} / "
            f"{(z['predicted_bytes'] - o['predicted_bytes']) / 2**20:+.1f}" for s, (o, z) in enumerate(zip(one, zb))))
    print(f"wrote {write_result('zero_bubble_memory', {'model': MODEL, 'micro_batch': MICRO, 'seq_len': seq, 'engines': rows})}")


def summarize(rank: dict) -> dict:
    """Step seconds, compute seconds by pass, transfer seconds, idle fraction: medians over the timed steps."""
    per_step = []
    for step in rank["steps"]:
        total = step["end"] - step["start"]
        passes: dict[str, list[float]] = {}
        transfers, optimizer = [], 0.0
        for kind, start, end in step["instructions"]:
            if kind in COMPUTE:
                passes.setdefault(COMPUTE[kind], []).append(end - start)
            elif kind in WAITING:
                transfers.append(end - start)
            elif kind == "OptimizerStep":
                optimizer += end - start
        compute = sum(sum(v) for v in passes.values())
        per_step.append({"step": total, "compute": compute / total, "idle": sum(transfers) / total,
                         "optimizer": optimizer,
                         "passes": {k: statistics.median(v) for k, v in passes.items()},
                         "fastest_transfer": min(end - start for kind, start, end in step["instructions"]
                                                 if kind in TRANSFER)})
    median = statistics.median
    return {"step_s": median([s["step"] for s in per_step]), "idle": median([s["idle"] for s in per_step]),
            "compute": median([s["compute"] for s in per_step]),
            "optimizer_s": median([s["optimizer"] for s in per_step]),
            "passes_s": {k: median([s["passes"][k] for s in per_step]) for k in per_step[0]["passes"]},
            "fastest_transfer_s": median([s["fastest_transfer"] for s in per_step]),
            "steps_s": [s["step"] for s in per_step]}


def predict(ranks: list[dict], micro_batches: int) -> dict:
    """Both schedules' step time from the ZB-H1 engine's measured F, B, W (and 1F1B's whole backward), per stage."""
    from hybrid_ds.config.schedule import simulate

    zb = [r[f"zb-h1-m{micro_batches}"] for r in ranks]
    one = [r[f"1f1b-m{micro_batches}"] for r in ranks]
    costs_zb = [{k: s["passes_s"][k] for k in ("F", "B", "W")} for s in zb]
    # 1F1B's whole backward as measured, given to the simulator as B (W 0)
    costs_one = [{"F": s["passes_s"]["F"], "B": s["passes_s"]["BW"], "W": 0.0} for s in one]
    transfer = statistics.median([s["fastest_transfer_s"] for s in zb + one])
    optimizer = max(s["optimizer_s"] for s in zb + one)
    return {"1f1b": simulate("1f1b", 2, micro_batches, costs_one, transfer).step + optimizer,
            "zb-h1": simulate("zb-h1", 2, micro_batches, costs_zb, transfer).step + optimizer,
            "transfer_s": transfer, "optimizer_s": optimizer}


def wider(ranks: list[dict], stages: int, micro_batches: int) -> dict:
    """p stages each costing what the measured second stage does (F, B, W from ZB-H1 at m = 8; the first stage's B is
    empty, its inputs being token ids, so its W is its whole backward and no model of a middle stage): the
    predicted gain of ZB-H1 where this machine has too few cores to run it."""
    from hybrid_ds.config.schedule import simulate

    last = ranks[-1]
    costs = {k: last["zb-h1-m8"]["passes_s"][k] for k in ("F", "B", "W")}
    whole = last["1f1b-m8"]["passes_s"]["BW"]
    transfer = statistics.median([r["zb-h1-m8"]["fastest_transfer_s"] for r in ranks])
    one = simulate("1f1b", stages, micro_batches, {"F": costs["F"], "B": whole, "W": 0.0}, transfer).step
    zbh1 = simulate("zb-h1", stages, micro_batches, costs, transfer).step
    return {"stages": stages, "micro_batches": micro_batches, "1f1b_s": one, "zb-h1_s": zbh1, "speedup": one / zbh1 - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--memory", action="store_true", help="peak memory per stage instead of step time")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        if args.memory:
            memory_worker(Path(args.out), args.seq)
        else:
            worker(Path(args.out), args.steps, args.seq)
        return
    if args.memory:
        memory(args.seq)
        return
    with tempfile.TemporaryDirectory() as tmp:
        launch(2, "bench/zero_bubble.py", ["--worker", "--out", tmp, "--steps", str(args.steps), "--seq", str(args.seq)],
               Path(tmp) / "log.txt", env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout_s=3600)
        raw = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
    ranks = [{key: summarize(value) for key, value in rank.items()} for rank in raw]
    same_losses = all(raw[0][f"1f1b-m{m}"]["losses"] == raw[0][f"zb-h1-m{m}"]["losses"] for m in (4, 8))
    result = {"model": MODEL, "micro_batch": MICRO, "seq_len": args.seq, "steps": args.steps,
              "same_losses": same_losses, "ranks": ranks, "by_micro_batches": {}}
    print(f"ZB-H1 vs 1F1B, pp=2 on CPU (1 thread a rank), GPT-2 small widths x 5 blocks, seq {args.seq}, "
          f"micro-batch {MICRO}; losses identical: {same_losses}")
    print(f"{'m':>3} {'schedule':>8} {'step s':>7} {'idle r0':>8} {'idle r1':>8} {'predicted':>9} {'error':>6}")
    for m in (4, 8):
        predicted = predict(ranks, m)
        row = {}
        for schedule in ("1f1b", "zb-h1"):
            step = max(r[f"{schedule}-m{m}"]["step_s"] for r in ranks)
            idle = [r[f"{schedule}-m{m}"]["idle"] for r in ranks]
            error = predicted[schedule] / step - 1
            row[schedule] = {"step_s": step, "idle": idle, "predicted_s": predicted[schedule], "error": error}
            print(f"{m:>3} {schedule:>8} {step:>7.3f} {idle[0]:>8.1%} {idle[1]:>8.1%} {predicted[schedule]:>9.3f} "
                  f"{error:>+6.1%}")
        passes = [r[f"zb-h1-m{m}"]["passes_s"] for r in ranks]
        whole = [r[f"1f1b-m{m}"]["passes_s"]["BW"] for r in ranks]
        row["speedup"] = row["1f1b"]["step_s"] / row["zb-h1"]["step_s"] - 1
        row["idle_ratio"] = max(row["zb-h1"]["idle"]) / max(row["1f1b"]["idle"])
        row["b_plus_w_over_backward"] = [(p["B"] + p["W"]) / w for p, w in zip(passes, whole)]
        row["predicted"] = predicted
        result["by_micro_batches"][m] = row
        print(f"    m={m}: ZB-H1 {row['speedup']:+.1%} step time; idle {row['idle_ratio']:.2f}x 1F1B's; "
              f"B+W / whole backward {', '.join(f'{x:.3f}' for x in row['b_plus_w_over_backward'])} (stage 0, 1)")
    result["predicted_wider"] = [wider(ranks, p, m) for p, m in ((4, 8), (8, 16), (8, 32))]
    for w in result["predicted_wider"]:
        print(f"predicted p={w['stages']} m={w['micro_batches']}: 1F1B {w['1f1b_s']:.3f} s, ZB-H1 {w['zb-h1_s']:.3f} s "
              f"({w['speedup']:+.1%})")
    print(f"wrote {write_result('zero_bubble', result)}")


if __name__ == "__main__":
    main()
