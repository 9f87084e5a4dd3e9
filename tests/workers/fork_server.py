"""The warm process of tests/warm_ranks.py: imports the heavy modules once, then forks the processes of each run.

Reads one JSON request a line on stdin and answers each with one JSON line ``{"returncode": N}`` on the stdout it
was started with (everything it prints itself goes to stderr). A request names a script (``script``) or a module
(``module``, as ``python -m``), its ``argv``, how many processes (``nproc``), whether they get the deepspeed
launcher's environment and ``--local_rank`` (``distributed``), the environment, the working directory, the files
their stdout and stderr go to (``log``.RANK.out / .err), a master port and a timeout. When one process fails, the
others get ``grace`` seconds before they are killed, as the launcher kills them; at the timeout all are killed.
"""

import atexit
import importlib
import json
import os
import runpy
import signal
import sys
import time
import traceback
import warnings


def exit_code(stop: SystemExit) -> int:
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1
    return 1


def child(request: dict, rank: int, replies) -> int:
    """What one forked process runs: the request's script or module as ``__main__``; its exit code."""
    os.setpgid(0, 0)
    replies.close()
    os.close(0)
    for fd, stream in ((1, "out"), (2, "err")):
        os.dup2(os.open(f"{request['log']}.{rank}.{stream}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    target = request.get("script") or request["module"]
    sys.argv = [target, *request["argv"]]
    if request["distributed"]:
        nproc = request["nproc"]
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_SIZE=str(nproc),
                          CROSS_RANK="0", CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(request["port"]))
        sys.argv.append(f"--local_rank={rank}")
    try:
        if request.get("script"):
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")
        else:
            sys.path[0] = request["cwd"]
            # The module was imported once already, in the warm process: that is the point, not a hazard.
            warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                                    category=RuntimeWarning)
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = exit_code(stop)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what the interpreter's own exit runs, then no second run of the parent's state
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def start(request: dict, rank: int, replies) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(request, rank, replies)
        finally:
            os._exit(code)
    return pid


def wait(pids: list[int], grace: float, timeout: float) -> list[int]:
    """Every process's exit code (in ``pids``' order); after a failure the rest get ``grace`` seconds."""
    codes: dict[int, int] = {}
    deadline, limit = None, time.time() + timeout
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid in pids:
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0 and deadline is None:
                deadline = time.time() + grace
            continue
        time.sleep(0.02)
        if time.time() > min(deadline or limit, limit):
            for other in set(pids) - set(codes):
                try:
                    os.killpg(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return [codes[pid] for pid in pids]


def main() -> None:
    for name in json.loads(sys.argv[1]):
        importlib.import_module(name)
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing this process prints may mix with its replies
    for line in sys.stdin:
        request = json.loads(line)
        pids = [start(request, rank, replies) for rank in range(request["nproc"])]
        failed = [code for code in wait(pids, request["grace"], request["timeout"]) if code != 0]
        replies.write(json.dumps({"returncode": failed[0] if failed else 0}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
