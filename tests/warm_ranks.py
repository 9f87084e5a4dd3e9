"""Multi-rank runs for tests without a launcher's start-up: one process imports torch, DeepSpeed and transformers
once per session, then forks the ranks of every run from that warm state.

``run(script, argv, nproc)`` does what ``deepspeed --num_gpus N script argv`` does for a test whose subject is
not the launcher: N processes with DeepSpeed's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR,
MASTER_PORT, ``--local_rank=R``), each running ``script`` as ``__main__`` on gloo, their output interleaved in
one text, the first failing rank's exit code returned and the other ranks stopped as the launcher stops them.
Each run's ranks are fresh processes (forks of one that only imported modules and ran no torch op), so no
state of DeepSpeed's (process groups, ``groups.mpu``) or of torch's threads crosses from one run to the next.

Tests whose subject is the launcher itself, signals or per-rank exit codes keep ``deepspeed`` (test_train_multiproc
``train(..., launcher=True)``, tests/test_stop_multiproc.py, tests/test_multinode.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What every rank imports before its first line runs: the cost that the warm process pays once.
WARM_IMPORTS = ("torch", "deepspeed", "deepspeed.pipe", "transformers", "transformers.models.gpt2.modeling_gpt2",
                "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert",
                "datasets", "peft", "hybrid_ds.cli", "hybrid_ds.train", "hybrid_ds.engine")


@dataclass
class Ranks:
    """The outcome of one multi-rank run: the exit code (the first non-zero rank's, else 0) and what the ranks
    wrote to stdout and to stderr, rank by rank (the launcher interleaves them line by line)."""

    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVER = r'''
import importlib, json, os, runpy, signal, sys, time
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
requests, replies = sys.stdin, os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # nothing the warm process prints may mix with its replies


def start_rank(request, rank):
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setpgid(0, 0)
        replies.close()
        os.close(0)
        for fd, stream in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{request['log']}.{rank}.{stream}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        nproc = request["nproc"]
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_SIZE=str(nproc),
                          CROSS_RANK="0", CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(request["port"]))
        os.chdir(request["cwd"])
        sys.argv = [request["script"], *request["argv"], f"--local_rank={rank}"]
        sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
        code = 0
        try:
            runpy.run_path(request["script"], run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(locals().get("code", 1))


for line in requests:
    request = json.loads(line)
    pids = {start_rank(request, rank): rank for rank in range(request["nproc"])}
    codes, deadline, timeout = {}, None, time.time() + request["timeout"]
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.02)
            if time.time() > min(deadline or timeout, timeout):  # a rank failed (or time is up): stop the others
                for other in set(pids) - set(codes):
                    try:
                        os.killpg(other, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] != 0 and deadline is None:
            deadline = time.time() + request["grace"]
    failed = [codes[pid] for pid in sorted(pids, key=pids.get) if codes[pid] != 0]
    replies.write(json.dumps({"returncode": failed[0] if failed else 0}) + "\n")
    replies.flush()
'''


class WarmProcess:
    """The process that imports once and forks the ranks of each run (one per pytest session, started lazily)."""

    def __init__(self) -> None:
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, json.dumps(WARM_IMPORTS)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.lock = threading.Lock()

    def run(self, script: Path, argv: list[str], nproc: int, log: Path, env: dict, timeout: float) -> int:
        request = {"script": str(script), "argv": [str(a) for a in argv], "nproc": nproc, "log": str(log),
                   "env": env, "cwd": str(ROOT), "port": free_port(), "grace": 30,
                   "timeout": timeout}
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        assert reply, f"the warm process died (exit {self.proc.poll()})"
        return json.loads(reply)["returncode"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_warm: WarmProcess | None = None


def run(script: Path, argv: list, nproc: int = 2, env: dict | None = None, timeout: float = 600,
        log: Path | None = None) -> Ranks:
    """Run ``script argv`` on ``nproc`` gloo ranks forked from the session's warm process; see the module's text."""
    global _warm
    if _warm is None or _warm.proc.poll() is not None:
        _warm = WarmProcess()
    if log is None:
        import tempfile

        log = Path(tempfile.mkdtemp(prefix="ranks-")) / "rank"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", **(env or {})}
    code = _warm.run(Path(script), list(argv), nproc, Path(log), {k: str(v) for k, v in env.items()}, timeout)

    def read(stream: str) -> str:
        return "".join(Path(f"{log}.{r}.{stream}").read_text(errors="replace") for r in range(nproc))
    return Ranks(code, read("out"), read("err"))


def close() -> None:
    if _warm is not None and _warm.proc.poll() is None:
        _warm.close()
