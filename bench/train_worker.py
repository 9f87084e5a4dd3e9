"""One rank of a timed hybrid_ds run, started by the ``deepspeed`` launcher (bench/scaling.py, bench/default_config.py).

It takes the path of ``hybrid_ds.runtime.train.run`` (``init_distributed`` -> ``prepare`` -> ``build_engine`` ->
``engine.train_batch``), without checkpoints or evaluation, and records:

* start-up phases, in seconds since the launcher was started (``BENCH_LAUNCH_TIME``, set by the driver):
  interpreter up, imports, process group, data, plan, stage modules, ``deepspeed.initialize``, first step;
* every step's wall time, and how many cores other processes used meanwhile (all ranks' CPU time is summed
  and taken from the machine's), so that a step disturbed by another job can be told apart and redone;
* optionally each rank's 1-thread fp32 GEMM rate, measured on all ranks at once (``--gemm``).

Rank 0 writes everything to ``--out`` as JSON.
"""

import time

STARTED = time.time()   # before the heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLEAN_CORES, LoadMeter, bench_config, matmul_params, matmul_peak, own_cpu_s  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a run config (its on_cpu section applies); default: --model's bench config")
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides, as hybrid-ds takes them")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank; 0: init_distributed's choice")
    parser.add_argument("--steps", type=int, default=3, help="clean steady-state steps wanted")
    parser.add_argument("--warmup", type=int, default=1, help="steps after the first that are not counted")
    parser.add_argument("--max-steps", type=int, default=0, help="give up after this many steps (0: 3 x steps)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop measuring after this long")
    parser.add_argument("--turns", help="comma-separated launch names, one per step: take steps in turn")
    parser.add_argument("--name", help="this launch's name in --turns")
    parser.add_argument("--turn-dir", help="folder shared by the launches taking turns")
    parser.add_argument("--gemm", action="store_true", help="measure each rank's 1-thread GEMM rate at the end")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the launcher appends it
    return parser.parse_args()


class Phases:
    """Seconds since launch at which each start-up phase ended, and how long the wrapped calls took."""

    def __init__(self, launched: float):
        self.launched = launched
        self.at: dict[str, float] = {"interpreter": STARTED - launched}
        self.took: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.at[name] = time.time() - self.launched

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Time every call of ``owner.attribute`` under ``name`` (summed)."""
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            tick = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.took[name] = self.took.get(name, 0.0) + time.perf_counter() - tick

        setattr(owner, attribute, timed)


def load_run_config(args: argparse.Namespace) -> Any:
    from hybrid_ds.config import load_config, load_config_dict

    if args.config:
        return load_config(args.config, args.set, profile="cpu")
    raw = bench_config(args.model, args.seq_len, args.micro_batch, args.grad_accum, args.stages)
    return load_config_dict(raw, args.set)


class InstructionTimes:
    """Seconds each kind of PipelineEngine instruction took on this rank during the current step.

    DeepSpeed's own ``wall_clock_breakdown`` crashes at pp > 1 in 0.19.8 ("bwd_microstep timer has already
    been started"), so the pipeline's instruction map is wrapped instead: forward, backward, send/recv
    of activations and gradients (which includes waiting for the other stage), reductions, optimizer step.
    """

    def __init__(self, engine: Any):
        from hybrid_ds.seam.instruments import wrap_pipeline_instructions

        self.seconds: dict[str, float] = {}
        # The plain ZeRO-2/3 engine has no instructions: nothing is timed there.
        wrap_pipeline_instructions(engine, lambda kind, fn: self._timed(kind.__name__, fn))

    def _timed(self, name: str, fn: Any) -> Any:
        def run(engine: Any, **kwargs: Any) -> Any:
            tick = time.perf_counter()
            try:
                return fn(engine, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tick
        return run

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds


def timed_step(engine: Any, batches: Any, instructions: InstructionTimes) -> dict[str, Any]:
    """One ``train_batch`` on every rank (started together), its wall time, CPU time and the machine's load."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    meter, cpu_start, tick = LoadMeter(), own_cpu_s(), time.perf_counter()
    loss = engine.train_batch(batches)
    wall = time.perf_counter() - tick
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    cpu = torch.tensor([own_cpu_s() - cpu_start])
    dist.all_reduce(cpu)   # every rank's CPU seconds: the rest of the machine's were someone else's
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {k: round(v, 4) for k, v in instructions.take().items()})
    foreign = meter.foreign_cores(cpu.item())
    return {"s": wall, "loss": loss.item(), "cpu_s": cpu.item(), "foreign_cores": foreign,
            "page_faults_rank0": faults, "instructions_s_per_rank": per_rank, "clean": foreign < CLEAN_CORES}


def run_until_clean(engine: Any, batches: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The first step, warm-up steps, then steps until ``args.steps`` clean ones (or the limits)."""
    import torch
    import torch.distributed as dist

    steps: list[dict[str, Any]] = []
    first = 1 + args.warmup
    clean = 0
    max_steps = first + (args.max_steps or 3 * args.steps)
    deadline = time.perf_counter() + args.budget_s
    go = torch.ones(1)
    instructions = InstructionTimes(engine)
    while go.item():
        steps.append(timed_step(engine, batches, instructions))
        clean += len(steps) > first and steps[-1]["clean"]
        if dist.get_rank() == 0:
            done = (len(steps) >= first and clean >= args.steps) or len(steps) >= max_steps \
                or (len(steps) >= first + 1 and time.perf_counter() > deadline)
            go.fill_(0 if done else 1)
        dist.broadcast(go, 0)   # rank 0's view of the machine decides for all
    return steps


class Turns:
    """Steps taken in turn with other launches alive at the same time, so that drift of the machine's speed
    (minutes long on this shared VM) hits every layout alike.

    ``schedule`` lists launch names, one per step; the shared counter file in ``folder`` says whose turn
    it is. Rank 0 of each launch waits for its turn (sleeping), the other ranks wait at a barrier.
    """

    def __init__(self, folder: str, schedule: list[str], name: str, timeout_s: float = 1800.0):
        self.folder, self.schedule, self.name, self.timeout_s = Path(folder), schedule, name, timeout_s
        self.counter = self.folder / "turn"

    def mine(self) -> list[int]:
        return [k for k, name in enumerate(self.schedule) if name == self.name]

    def ready(self) -> None:
        """Say that this launch is built; wait until every launch of the schedule is (start-up is noisy)."""
        (self.folder / f"ready-{self.name}").touch()
        self._wait_for(lambda: all((self.folder / f"ready-{n}").exists() for n in set(self.schedule)))

    def wait(self, k: int) -> None:
        self._wait_for(lambda: self.counter.exists() and int(self.counter.read_text() or -1) == k)

    def done(self, k: int) -> None:
        tmp = self.folder / f"turn.{self.name}"
        tmp.write_text(str(k + 1))
        os.replace(tmp, self.counter)

    def _wait_for(self, condition: Any) -> None:
        deadline = time.perf_counter() + self.timeout_s
        while not condition():
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.name}: waited {self.timeout_s} s for the other launches")
            time.sleep(0.05)


def run_turns(engine: Any, batches: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch.distributed as dist

    turns = Turns(args.turn_dir, args.turns.split(","), args.name)
    rank0 = dist.get_rank() == 0
    if rank0:
        turns.ready()
    instructions = InstructionTimes(engine)
    steps = []
    for k in turns.mine():
        if rank0:
            turns.wait(k)
        steps.append({**timed_step(engine, batches, instructions), "turn": k})
        if rank0:
            turns.done(k)
    if rank0:   # exiting now would disturb the launches still stepping: leave together
        turns.wait(len(turns.schedule))
    dist.barrier()
    return steps


def main() -> None:
    args = parse_args()
    phases = Phases(float(os.environ.get("BENCH_LAUNCH_TIME", STARTED)))
    import deepspeed  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import hybrid_ds.runtime.engine
    import hybrid_ds.runtime.train

    phases.mark("imports")
    world = hybrid_ds.runtime.engine.init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    phases.mark("process_group")
    cfg = load_run_config(args)
    torch.manual_seed(cfg.train.seed)
    phases.wrap(hybrid_ds.runtime.train, "build_plan", "plan")
    plan, data = hybrid_ds.runtime.train.prepare(cfg, world)
    cfg = plan.config
    phases.mark("data")
    phases.wrap(hybrid_ds.runtime.engine, "build_pipeline_module", "stage_modules")
    phases.wrap(deepspeed, "initialize", "deepspeed_initialize")
    engine = hybrid_ds.runtime.engine.build_engine(plan)
    phases.mark("engine")
    dp_rank = hybrid_ds.runtime.engine.data_parallel(engine)[0]
    batches = data.train_batches(plan.layout.micro_batch, dp_rank, plan.layout.dp, cfg.train.seed)
    steps = run_turns(engine, batches, args) if args.turns else run_until_clean(engine, batches, args)
    phases.at["first_step"] = phases.at["engine"] + steps[0]["s"]
    gemm = gather_gemm(world) if args.gemm else None
    if torch.distributed.get_rank() == 0:
        layout = plan.layout
        result = {
            "config": args.config or f"bench config of {args.model}", "world_size": world,
            "stages": layout.stages, "dp": layout.dp, "micro_batch": layout.micro_batch,
            "grad_accum": layout.grad_accum, "seq_len": cfg.data.seq_len, "threads": torch.get_num_threads(),
            "tokens_per_step": layout.train_batch * cfg.data.seq_len, "params": plan.total_params,
            "matmul_params": matmul_params(plan.skeleton), "layers": plan.n_blocks,
            "hidden": plan.resolved.hf_config.hidden_size, "warmup_steps": args.warmup,
            "blocks_per_stage": [sum(name.startswith("block") for name in st.layer_names) for st in plan.stage_plans],
            "phases_at_s": phases.at, "calls_s": phases.took, "steps": steps, "gemm_flops_per_rank": gemm,
        }
        Path(args.out).write_text(json.dumps(result, indent=2))


def gather_gemm(world: int) -> list[float]:
    """Each rank's 1-thread GEMM FLOP/s, all ranks measuring at the same time (as they train)."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    rate = torch.tensor([matmul_peak(1)])
    rates = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(rates, rate)
    return [r.item() for r in rates]


if __name__ == "__main__":
    main()
