"""Multi-process runs for tests without paying a launcher's and an interpreter's start-up each time: one process
imports torch, DeepSpeed, transformers and hybrid_ds once per session, then forks the processes of every run.

- ``run(script, argv, nproc)`` does what ``deepspeed --num_gpus N script argv`` does, for a test whose subject is
  not the launcher: N processes with the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE,
  MASTER_ADDR, MASTER_PORT) and ``--local_rank=R``, each running ``script`` as ``__main__`` on gloo; the first failing
  rank's exit code, the other ranks stopped 30 s later as the launcher stops them.
- ``cli(*argv)`` does what ``python -m hybrid_ds.cli ARGV`` does, and ``script(path, *argv)`` what ``python PATH
  ARGV`` does: one plain process, its exit code and output.

Each run's processes are fresh forks of one that only imported modules and ran no torch op, so no state of
DeepSpeed's (process groups, ``groups.mpu``) or of torch's threads crosses from one run to the next. What a module
reads from the environment at import (huggingface_hub's HF_HOME) is the session's: a test that changes such a
variable starts its own interpreter. Tests whose subject is the launcher itself, signals, exit codes or per-rank
error lines keep ``deepspeed`` (test_train_multiproc.train(..., launcher=True), the default for a run expected to
fail; tests/test_stop_multiproc.py; tests/test_multinode.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = Path(__file__).resolve().parent / "workers" / "fork_server.py"
# What a run's processes import before their first line: the cost the warm process pays once.
WARM_IMPORTS = ("torch", "deepspeed", "deepspeed.pipe", "transformers", "transformers.models.gpt2.modeling_gpt2",
                "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert",
                "datasets", "peft", "hybrid_ds.cli", "hybrid_ds.runtime.train", "hybrid_ds.runtime.engine",
                "matplotlib.pyplot")  # each run with a save_dir draws its summary.png
ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Done:
    """One run's outcome: the exit code (the first failing process's, else 0) and what its processes wrote to
    stdout and to stderr, process by process (the launcher interleaves them line by line)."""

    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _WarmProcess:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(SERVER), json.dumps(WARM_IMPORTS)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV}, cwd=ROOT)
        self.lock = threading.Lock()

    def ask(self, request: dict) -> int:
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        assert reply, f"tests/workers/fork_server.py died (exit {self.proc.poll()})"
        return json.loads(reply)["returncode"]


_warm: _WarmProcess | None = None


def _start(nproc: int, distributed: bool, env: dict | None, timeout: float, **target) -> Done:
    global _warm
    if _warm is None or _warm.proc.poll() is not None:
        _warm = _WarmProcess()
    log = Path(tempfile.mkdtemp(prefix="warm-ranks-")) / "rank"
    environment = {k: str(v) for k, v in {**os.environ, **ENV, **(env or {})}.items()}
    code = _warm.ask({**target, "nproc": nproc, "distributed": distributed, "env": environment, "cwd": str(ROOT),
                      "log": str(log), "port": free_port(), "grace": 30, "timeout": timeout})

    def read(stream: str) -> str:
        return "".join(Path(f"{log}.{rank}.{stream}").read_text(errors="replace") for rank in range(nproc))
    done = Done(code, read("out"), read("err"))
    shutil.rmtree(log.parent)
    return done


def run(script: Path, argv: list, nproc: int = 2, env: dict | None = None, timeout: float = 600) -> Done:
    """``script argv`` on ``nproc`` gloo ranks, as the deepspeed launcher starts them (see above)."""
    return _start(nproc, True, env, timeout, script=str(script), argv=[str(a) for a in argv])


def script(path: Path, *argv, env: dict | None = None, timeout: float = 600) -> Done:
    """``python PATH ARGV`` in one process (see above)."""
    return _start(1, False, env, timeout, script=str(path), argv=[str(a) for a in argv])


def cli(*argv, env: dict | None = None, timeout: float = 600) -> Done:
    """``python -m hybrid_ds.cli ARGV`` in one process (see above)."""
    return _start(1, False, env, timeout, module="hybrid_ds.cli", argv=[str(a) for a in argv])
