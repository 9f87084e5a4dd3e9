"""Shared pieces of the performance benchmarks: configs, ports, statistics, GEMM peak, FLOPs per token.

The arithmetic here is pure (no torch at import); torch is imported inside the functions that time it.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

# Where results go: bench/results/ (git-ignored), or $HYBRID_DS_BENCH_RESULTS (the smoke test's temporary folder).
RESULTS = Path(os.environ.get("HYBRID_DS_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
REPO = Path(__file__).resolve().parent.parent
# A timed step counts as clean when other processes used under a quarter of a core meanwhile: on these
# two cores one busy core elsewhere makes a step several times slower (see wait_for_quiet).
CLEAN_CORES = 0.25

# The models the benchmarks run. "llama-100m" is the llama-tiny preset grown to a 110M-parameter
# shape (85M in 12 blocks of width 768 + a 24.6M embedding tied to the head, as SmolLM ties it).
MODELS: dict[str, dict[str, Any]] = {
    "gpt2": {"name": "gpt2"},
    "llama-100m": {"name": "llama-tiny", "overrides": {
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
        "intermediate_size": 2048, "vocab_size": 32000, "max_position_embeddings": 2048,
        "tie_word_embeddings": True}},
    # The same 12-block depth at width 64: the matmuls are tiny, so a step times the per-layer Python and
    # dispatch work of the two engines, which does not shrink with the width (the overhead floor).
    "gpt2-12x64": {"name": "gpt2-tiny", "overrides": {"n_layer": 12}},
    "llama-12x64": {"name": "llama-tiny", "overrides": {"num_hidden_layers": 12}},
}


def bench_config(model: str, seq_len: int, micro_batch: int, grad_accum: int, stages: int = 1,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run config (raw dict) with configs/gpt.json's optimizer, clipping and ZeRO-1, fp32, no scheduler."""
    raw = {
        "model": dict(MODELS.get(model, {"name": model})),   # any other preset by its own name
        "data": {"source": "builtin", "seq_len": seq_len},
        "pipeline": {"stages": stages},   # the default partition, "flops"
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                   "weight_decay": 0.1}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    raw.update(extra or {})
    return raw


def sampled_around(sample: Any, fn: Any, where: str) -> Any:
    """``fn`` wrapped to call ``sample("before WHERE")`` and ``sample("after WHERE")`` around it (memory probes)."""
    def wrapped(*args, **kwargs):
        sample(f"before {where}")
        out = fn(*args, **kwargs)
        sample(f"after {where}")
        return out
    return wrapped


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env() -> None:
    """What the deepspeed launcher would set for a world of one (a fresh port: another job may hold 29500)."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())),
                       ("DS_ACCELERATOR", "cpu")):
        os.environ.setdefault(key, value)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def steady(result: dict[str, Any], warmup: int) -> tuple[list[float], int]:
    """Step seconds of a train_worker result after the first step and the warm-up (the clean ones unless
    none is), and how many were clean."""
    steps = result["steps"][1 + warmup:]
    clean = [s["s"] for s in steps if s["clean"]]
    return clean or [s["s"] for s in steps], len(clean)


def spread(values: list[float]) -> float:
    """(max - min) / median: how noisy a set of repeated timings is."""
    return (max(values) - min(values)) / median(values) if values else float("nan")


def training_flops_per_token(matmul_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Model FLOPs of one trained token: 6 x the parameters that take part in matmuls (blocks + output
    projection; embedding lookups are free) plus attention's two s x s products, 12 x layers x hidden x seq
    for forward and backward, counted in full (not halved for causality), as PaLM (Chowdhery et al. 2022,
    appendix B) and Megatron-LM count them.

    >>> training_flops_per_token(85_000_000, 12, 768, 128) / 1e6
    524.155776
    """
    return 6 * matmul_params + 12 * layers * hidden * seq_len


def matmul_params(skeleton: Any) -> int:
    """Parameters that multiply activations: every Linear / Conv1D weight and bias (a tied head counts once
    as the output projection; embedding lookups and position tables do no matmul)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    seen: set[int] = set()
    total = 0
    for module in skeleton.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            for param in module.parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    total += param.numel()
    return total


def matmul_peak(threads: int, n: int = 2048, seconds: float = 2.0, device: Any = "cpu", dtype: Any = None) -> float:
    """Best GEMM FLOP/s of torch (n x n x n, ``threads`` CPU threads, fp32 unless ``dtype``) over about ``seconds``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        synchronize(device)
        tick = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - tick)
    torch.set_num_threads(before)
    return 2 * n**3 / best


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that wall-clock timings cover it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has run since boot (/proc/stat, all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]   # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process, all its threads."""
    times = os.times()
    return times.user + times.system


class LoadMeter:
    """How many cores' worth of CPU *other* processes used while a step ran: the noise of a shared machine.

    ``foreign_cores = (machine CPU seconds - ours) / wall seconds``; ``ours`` is this process by default, or
    what ``own`` returns (the sum over the ranks of a multi-process run).
    """

    def __init__(self) -> None:
        self.machine, self.wall = machine_busy_s(), time.perf_counter()

    def foreign_cores(self, own_s: float) -> float:
        wall = time.perf_counter() - self.wall
        return max(0.0, (machine_busy_s() - self.machine - own_s) / wall)


def wait_for_quiet(threshold: float, max_wait_s: float, window_s: float = 1.0) -> float:
    """Sleep until other processes use under ``threshold`` cores over ``window_s`` (or ``max_wait_s`` passed).

    Returns the seconds waited. On two cores, one busy core from another job makes a 2-thread torch step
    up to 25x slower (OpenMP threads wait on each other), so timings are taken when the machine is quiet.
    """
    start = time.perf_counter()
    while True:
        meter = LoadMeter()
        time.sleep(window_s)
        if meter.foreign_cores(0.0) < threshold or time.perf_counter() - start > max_wait_s:
            break
    waited = time.perf_counter() - start
    spin(0.5)  # an idle core comes back slowly (frequency, caches): the next timed step would pay for it
    return waited


def spin(seconds: float) -> None:
    import torch

    a = torch.randn(256, 256)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a


def launcher_command(nprocs: int, script: str, script_args: list[str],
                     env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``deepspeed --num_gpus nprocs script ...`` on the CPU accelerator, and its environment.

    ``BENCH_LAUNCH_TIME`` (set to now) tells the ranks when the launcher was started.
    """
    import sys

    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", str(nprocs), "--master_port", str(free_port()), str(REPO / script),
           *script_args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)   # a single-process benchmark earlier in this interpreter may have set them
    full_env["BENCH_LAUNCH_TIME"] = repr(time.time())
    return cmd, full_env


def launch(nprocs: int, script: str, script_args: list[str], log: Path, env: dict[str, str] | None = None,
           timeout_s: float = 600) -> float:
    """Run a launcher command to its end (output to ``log``); return its wall seconds, raise on failure."""
    import subprocess

    cmd, full_env = launcher_command(nprocs, script, script_args, env)
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; {log_tail(log)}")
    return time.time() - start


def log_tail(log: Path, lines: int = 25) -> str:
    tail = "\n".join(line for line in log.read_text().splitlines() if "[INFO]" not in line)
    return f"last lines of {log}:\n" + "\n".join(tail.splitlines()[-lines:])


def provenance() -> dict[str, Any]:
    """What a result was measured with: the command, the date, the versions and the machine."""
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return {"command": " ".join(["python", str(shown), *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "versions": {"python": platform.python_version(),
                         **{p: installed(p) for p in ("torch", "deepspeed", "transformers", "peft", "hybrid_ds")}},
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "system": platform.platform()}}


def write_result(name: str, result: dict[str, Any]) -> Path:
    """``RESULTS/name.json``: ``result`` and, under ``"provenance"``, what it was measured with."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**result, "provenance": provenance()}, indent=2))
    return path
