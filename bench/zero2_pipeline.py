"""ZeRO-2 against ZeRO-1 with pipeline stages, on CPU: gradient bytes per rank, communication, step time.

One launch per data-parallel size (``deepspeed --num_gpus 2*dp``, pp=2, gloo) builds both engines in every
process from the same seed, a ZeRO-1 PipelineEngine and hybrid_ds's ZeRO-2 one, and trains them in turn on
the same micro-batches (the order alternates each step), so that the machine's drift hits both alike. The
model is GPT-2 shaped at width 256 (4 blocks, vocabulary 8,192, the token embedding tied to the head), so the
tied embedding is about a third of the parameters, as in GPT-2 small. fp32, AdamW, clipping 1.0, dropout off,
gradient accumulation 4, ``reduce_bucket_size`` 500,000 elements on both.

Gradient bytes: the distinct storages that hold gradients on a rank (``seam.instruments.gradient_tensors``:
``param.grad``, ZeRO's partitions and reduce buckets), sampled after every pipeline
instruction ("between micro-batches": after each BackwardPass), before and after each gradient ZeRO takes from
autograd, each reduction and each collective; the largest sample is the peak. Communicated bytes: what every
collective and point-to-point call hands to torch.distributed, per step, by operation.

Usage: ``python bench/zero2_pipeline.py [--dp 2 4] [--seq 64 256] [--steps 8] [--zero2-extra JSON]``; prints the tables and writes
bench/results/zero2_pipeline.json. ``--worker`` is the launcher's entry point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_config, launch, sampled_around, write_result  # noqa: E402

MODEL = {"name": "gpt2-tiny", "overrides": {"n_embd": 256, "n_layer": 4, "n_head": 4, "vocab_size": 8192,
                                            "n_positions": 1024, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                            "attn_pdrop": 0.0}}
MICRO, GAS, BUCKET = 2, 4, 500_000
MEMORY_STEPS = 2   # sampled for memory and traffic (the first step allocates lazily); the others are timed
COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather", "broadcast",
               "send", "recv", "isend", "irecv")


def run_config(zero: int, seq: int, zero_extra: dict | None = None) -> dict:
    zero_section = {"stage": zero, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET, **(zero_extra or {})}
    raw = bench_config("gpt2-tiny", seq, MICRO, GAS, stages=2, extra={"zero_optimization": zero_section})
    raw["model"] = MODEL
    return raw


class GradientProbe:
    """The gradient bytes one engine holds, sampled at many points of its steps, and what it communicates."""

    active: GradientProbe | None = None

    def __init__(self, engine):
        self.engine = engine
        self.between: list[int] = []   # after each BackwardPass
        self.between_parts: dict = {}
        self.peak, self.peak_where, self.peak_parts = 0, "", {}
        self.comm: Counter = Counter()
        self.seconds: Counter = Counter()   # per instruction kind, in the timed steps
        self.sampling = True                # memory is sampled in the first steps, time taken in the others
        self.step_comm: list[dict] = []

    def sample(self, where: str) -> int:
        from hybrid_ds.seam.instruments import gradient_tensors, storage_bytes

        if not self.sampling:
            return 0
        found = gradient_tensors(self.engine)
        parts, counted = {}, []
        for kind in ("partition", "buckets", "param.grad"):   # a view counts where its buffer is
            parts[kind] = storage_bytes(found.get(kind, []), exclude=counted)
            counted += found.get(kind, [])
        total = sum(parts.values())
        self.last_parts = parts
        if total > self.peak:
            self.peak, self.peak_where, self.peak_parts = total, where, parts
        return total


    def install(self) -> None:
        from hybrid_ds.seam.instruments import wrap_pipeline_instructions

        def wrap(kind, fn):
            def wrapped(engine, *args, **kwargs):
                self.sample(f"before {kind.__name__}")
                start = time.perf_counter()
                out = fn(engine, *args, **kwargs)
                if not self.sampling:
                    self.seconds[kind.__name__] += time.perf_counter() - start
                total = self.sample(f"after {kind.__name__}")
                if kind.__name__ == "BackwardPass" and self.sampling:
                    if total > max(self.between, default=-1):
                        self.between_parts = self.last_parts
                    self.between.append(total)
                return out
            return wrapped

        wrap_pipeline_instructions(self.engine, wrap)
        optimizer = self.engine.optimizer
        for name in ("process_gradients", "average_tensor", "get_all_grad_tensors",
                     "overlapping_partition_gradients_reduce_epilogue", "finalize_gradient_accumulation_boundary"):
            if hasattr(optimizer, name):
                setattr(optimizer, name, sampled_around(self.sample, getattr(optimizer, name), name))

    @staticmethod
    def patch_collectives() -> None:
        """Count the bytes handed to torch.distributed by the active probe's engine (DeepSpeed's comm calls it)."""
        import torch.distributed as dist

        def counted(name, fn):
            def call(*args, **kwargs):
                probe = GradientProbe.active
                if probe is not None and probe.sampling:
                    values = [*args, *kwargs.values()]
                    tensor = next((a for a in values if hasattr(a, "numel")), None)
                    if tensor is None:
                        tensor = next((a[0] for a in values if isinstance(a, list) and a), None)
                    if tensor is not None:
                        probe.comm[name] += tensor.numel() * tensor.element_size()
                    probe.sample(f"{name}")
                return fn(*args, **kwargs)
            return call

        for name in COLLECTIVES:
            setattr(dist, name, counted(name, getattr(dist, name)))


def worker(out: Path, steps: int, seq: int, zero2_extra: dict) -> None:
    import torch

    from hybrid_ds.config import load_config_dict
    from hybrid_ds.runtime.engine import build_pipeline_engine, init_distributed
    from hybrid_ds.runtime.plan import build_plan

    GradientProbe.patch_collectives()   # before DeepSpeed's comm backend takes torch.distributed's functions
    world = init_distributed()
    engines, probes = {}, {}
    for zero in (1, 2):
        plan = build_plan(load_config_dict(run_config(zero, seq, zero2_extra if zero == 2 else None)), world)
        engines[zero] = build_pipeline_engine(plan)
        probes[zero] = GradientProbe(engines[zero])
        probes[zero].install()
    engine = engines[1]
    dp, dp_rank = engine.grid.get_data_parallel_world_size(), engine.grid.get_data_parallel_rank()
    vocab = MODEL["overrides"]["vocab_size"]
    gen = torch.Generator().manual_seed(1234)
    batches = [torch.randint(0, vocab, (MICRO, seq), generator=gen) for _ in range(GAS * dp)]
    micro = [((ids, torch.ones_like(ids)), ids) for ids in batches[dp_rank * GAS:(dp_rank + 1) * GAS]]
    times = {1: [], 2: []}
    losses = {1: [], 2: []}
    for step in range(MEMORY_STEPS + steps):
        if step == MEMORY_STEPS:
            for probe in probes.values():
                probe.sampling = False
        for zero in ((1, 2) if step % 2 == 0 else (2, 1)):
            torch.distributed.barrier()
            GradientProbe.active = probes[zero]
            before = Counter(probes[zero].comm)
            start = time.perf_counter()
            losses[zero].append(engines[zero].train_batch(iter(micro)).item())
            if step >= MEMORY_STEPS:
                times[zero].append(time.perf_counter() - start)
            GradientProbe.active = None
            if step < MEMORY_STEPS:
                probes[zero].step_comm.append(dict(probes[zero].comm - before))
    result = {}
    for zero, probe in probes.items():
        stage_params = [p for p in engines[zero].module.parameters()]
        result[zero] = {
            "stage": engines[zero].stage_id, "dp_rank": dp_rank, "dp": dp,
            "stage_params": sum(p.numel() for p in stage_params),
            "tied_params": sum(w.numel() for w, _ in engines[zero].module.get_tied_weights_and_groups()),
            "between": max(probe.between[GAS:]) if len(probe.between) > GAS else max(probe.between),
            "between_parts": probe.between_parts, "peak": probe.peak, "peak_where": probe.peak_where, "peak_parts": probe.peak_parts,
            "comm_per_step": probe.step_comm[-1], "instruction_s": dict(probe.seconds), "times": times[zero], "losses": losses[zero]}
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def measure(dp: int, steps: int, seq: int, zero2_extra: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.txt"
        launch(2 * dp, "bench/zero2_pipeline.py", ["--worker", "--out", tmp, "--steps", str(steps), "--seq", str(seq),
                                                   "--zero2-extra", json.dumps(zero2_extra)], log,
               env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout_s=1800)
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2 * dp)]


def predict(zero: int, dp: int, seq: int) -> dict[int, dict[str, float]]:
    """hybrid_ds.estimate's figures per stage: gradient bytes between micro-batches (the accumulate phase's
    gradients) and the in-backward peak of gradient storage (those, the reduce bucket and, for ZeRO-2, the whole
    gradient of the parameter in flight)."""
    from hybrid_ds.config import load_config_dict
    from hybrid_ds.estimate.run import run_from_config
    from hybrid_ds.estimate.stages import stage_estimates

    out = {}
    for s in stage_estimates(run_from_config(load_config_dict(run_config(zero, seq)), 2 * dp), runtime="cpu", overhead=0.0):
        out[s.stage] = {"between": s.state.grads,
                        "peak": s.state.grads + s.state.comm_buffer + s.state.backward_transient,
                        "comm": s.comm}
    return out


def summarize(dp: int, seq: int, ranks: list[dict]) -> dict:
    rows = []
    for zero in ("1", "2"):
        predicted = predict(int(zero), dp, seq)
        for r in ranks:
            m = r[zero]
            rows.append({"zero": int(zero), "stage": m["stage"], "dp_rank": m["dp_rank"],
                         "predicted_between": predicted[m["stage"]]["between"],
                         "predicted_peak": predicted[m["stage"]]["peak"],
                         "predicted_comm": predicted[m["stage"]]["comm"],
                         "full_grad_bytes": 4 * m["stage_params"], "between": m["between"], "peak": m["peak"],
                         "peak_where": m["peak_where"], "peak_parts": m["peak_parts"],
                         "between_parts": m["between_parts"], "instruction_s": m["instruction_s"],
                         "comm_per_step": m["comm_per_step"]})
    t1 = statistics.median(ranks[0]["1"]["times"])
    t2 = statistics.median(ranks[0]["2"]["times"])
    l1, l2 = ranks[0]["1"]["losses"], ranks[0]["2"]["losses"]
    return {"dp": dp, "seq_len": seq, "rows": rows, "step_s": {"zero1": t1, "zero2": t2}, "ratio": t2 / t1,
            "max_loss_diff": max(abs(a - b) for a, b in zip(l1, l2))}


def print_summary(s: dict) -> None:
    print(f"\npp=2 x dp={s['dp']}, seq_len {s['seq_len']}: step ZeRO-1 {s['step_s']['zero1']:.3f} s, ZeRO-2 {s['step_s']['zero2']:.3f} s "
          f"(ratio {s['ratio']:.3f}); losses differ by at most {s['max_loss_diff']:.2e}")
    print("gradient bytes per rank: measured (estimator's prediction); ratio = measured / the stage's full fp32 "
          "gradient; traffic = bytes handed to all_reduce per step")
    print(f"{'ZeRO':>4} {'stage':>5} {'dp':>3} {'full grads':>11} {'between micro-batches':>26} {'ratio':>6} "
          f"{'peak':>26} {'ratio':>6} {'all_reduce':>11}")
    for r in s["rows"]:
        full = r["full_grad_bytes"]
        print(f"{r['zero']:>4} {r['stage']:>5} {r['dp_rank']:>3} {full:>11,} "
              f"{r['between']:>11,} ({r['predicted_between']:>11,.0f}) {r['between'] / full:>6.3f} "
              f"{r['peak']:>11,} ({r['predicted_peak']:>11,.0f}) {r['peak'] / full:>6.3f} "
              f"{r['comm_per_step'].get('all_reduce', 0):>11,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 2 sampled for memory)")
    parser.add_argument("--seq", type=int, nargs="+", default=[64], help="sequence lengths (a step's compute)")
    parser.add_argument("--zero2-extra", default="{}", help="JSON keys added to the ZeRO-2 run's zero_optimization")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    extra = json.loads(args.zero2_extra)
    if args.worker:
        worker(Path(args.out), args.steps, args.seq[0], extra)
        return
    summaries = []
    for dp in args.dp:
        for seq in args.seq:
            summaries.append(summarize(dp, seq, measure(dp, args.steps, seq, extra)))
            print_summary(summaries[-1])
    print(f"\nwrote {write_result('zero2_pipeline', {'runs': summaries})}")


if __name__ == "__main__":
    main()
