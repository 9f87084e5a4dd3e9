"""Runs that stop cleanly: SIGTERM to the launcher or a rank, and steps with a non-finite loss (issue 13, item 2)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import warm_ranks

from test_train_multiproc import ROOT, command, summary, through_launcher, tiny_config, train

pytestmark = pytest.mark.multiproc

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------- SIGTERM


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_and_signal(config: Path, target: str, sig: int = signal.SIGTERM) -> tuple[int, float, str, list[int]]:
    """Start a long run, signal ``target`` ("runner": the ``deepspeed`` command; "launch": DeepSpeed's launch.py;
    "rank": rank 1; "group": the deepspeed command's whole process group, as SLURM signals a job step; "wrapper":
    ``python -m hybrid_ds.launcher``, the run's first process) once training is under way, and read the output until
    every process holding it has exited. Returns (the first process's exit code, seconds from the signal to the last
    exit, output, rank pids)."""
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "steps_per_print": 1}))  # a progress line each step: no terminal here
    first = command(ROOT / "launch" / "train.py", config, 2)
    if target == "wrapper":
        first = [sys.executable, "-m", "hybrid_ds.launcher", *first[1:]]
    proc = subprocess.Popen(first, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT,
                            start_new_session=True)
    lines: list[str] = []
    under_way = threading.Event()

    def read() -> None:  # to EOF: the runner, launch.py and both ranks all hold the pipe
        for line in proc.stdout:
            lines.append(line)
            if re.match(r"step ([2-9]|\d\d+)/", line):  # the progress line of step 2 or later
                under_way.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    processes: list[int] = []
    try:
        assert under_way.wait(300), "".join(lines[-30:])
        ranks = [int(p) for p in re.findall(r"process (\d+) spawned", "".join(lines))]
        assert len(ranks) == 2, "".join(lines[-30:])
        processes = [proc.pid, psutil.Process(ranks[0]).ppid(), *ranks]  # runner (or wrapper), launch.py, ranks
        if target == "wrapper":  # and the deepspeed command between them
            processes.insert(1, psutil.Process(processes[1]).ppid())
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            os.kill(processes[{"runner": 0, "wrapper": 0, "launch": 1, "rank": 3}[target]], sig)
        signalled = time.time()
        reader.join(timeout=90)
        seconds = time.time() - signalled
    finally:
        left = [pid for pid in processes[1:] if alive(pid)]
        for pid in [proc.pid, *left]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not left and not reader.is_alive(), (left, "".join(lines[-30:]))
    return proc.wait(timeout=10), seconds, "".join(lines), ranks


@pytest.mark.parametrize("target, runner_rc, reason", [("runner", -signal.SIGTERM, "the deepspeed launcher's exit"),
                                                       ("launch", 1, "SIGTERM"), ("rank", 0, "SIGTERM")],
                         ids=["runner", "launch", "rank"])
def test_sigterm_stops_every_rank_with_a_checkpoint_and_resume_continues_exactly(tmp_path, tmp_path_factory, target,
                                                                                runner_rc, reason):
    """SIGTERM to the deepspeed command, to DeepSpeed's launch.py or to one rank: every rank finishes its step, the
    checkpoint of that step becomes latest, all ranks exit 0 (no orphans) within 60 s; --resume then gives the
    uninterrupted run's losses exactly (dropout on). The deepspeed command's own exit code is DeepSpeed's: 143 when
    it is signalled itself (it has no handler), 1 from launch.py's handler, 0 otherwise."""
    (tmp_path / "a").mkdir()
    config = tiny_config(tmp_path / "a", "gpt2-tiny", 2, max_steps=100000, eval_interval=0)
    rc, seconds, output, ranks = start_and_signal(config, target)
    stopped = re.findall(rf"hybrid-ds: stopped by {re.escape(reason)} after step (\d+); checkpoint (\S+) is latest; "
                         r"resume with --resume", output)
    assert len(stopped) == 1 and rc == runner_rc and seconds < 60, (rc, seconds, output[-3000:])
    step = int(stopped[0][0])
    run = tmp_path / "a" / "run"
    assert stopped[0][1] == str(run / f"step_{step}") and (run / "latest").read_text() == f"step_{step}"
    assert (run / f"step_{step}" / "COMPLETE").is_file() and "Traceback" not in output, output[-3000:]
    if target != "launch":  # launch.py logs each rank's exit code from its poll loop, not from its signal handler
        assert all(f"Process {pid} exits successfully." in output for pid in ranks), output[-3000:]

    resumed = tiny_config(tmp_path / "a", "gpt2-tiny", 2, max_steps=step + 2, eval_interval=0)
    train(resumed, 2, "--resume")
    want, got = uninterrupted_losses(tmp_path_factory, step + 2), summary(resumed)["losses"]
    assert len(got) == step + 2 and got == want[:step + 2], (step, want, got)  # the whole run, across the stop


@pytest.mark.parametrize("target, sig, runner_rc", [("group", signal.SIGTERM, -signal.SIGTERM),
                                                    ("wrapper", signal.SIGTERM, 0), ("wrapper", signal.SIGINT, 0)],
                         ids=["sigterm-to-the-group", "sigterm-to-hybrid-ds-launcher", "ctrl-c-to-hybrid-ds-launcher"])
def test_a_signal_to_the_whole_job_or_to_our_launcher_saves_and_every_rank_exits_0(tmp_path, target, sig, runner_rc):
    """SIGTERM to every process of the run at once (SLURM), or SIGTERM or SIGINT to ``python -m hybrid_ds.launcher``
    (a container runtime signals its first process; a Ctrl-C reaches the terminal's foreground process): the step
    finishes, its checkpoint is complete and latest, every rank exits 0, and our launcher exits 0 after them (the
    deepspeed command, signalled itself, exits 143 at once)."""
    config = tiny_config(tmp_path, "gpt2-tiny", 2, max_steps=100000, eval_interval=0)
    rc, seconds, output, ranks = start_and_signal(config, target, sig)
    reason = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    stopped = re.findall(rf"hybrid-ds: stopped by {reason} after step (\d+); checkpoint (\S+) is latest", output)
    assert len(stopped) == 1 and rc == runner_rc and seconds < 60, (rc, seconds, output[-3000:])
    run = tmp_path / "run"
    assert (run / "latest").read_text() == f"step_{stopped[0][0]}" and (run / f"step_{stopped[0][0]}" / "COMPLETE").is_file()
    if target != "group":  # launch.py, signalled too, logs the ranks' exits from its handler, without their codes
        assert all(f"Process {pid} exits successfully." in output for pid in ranks), output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_a_second_ctrl_c_ends_the_rank_at_once():
    """The first SIGINT is a request (the step finishes, a checkpoint is saved); a second ends the rank there and
    then, as Ctrl-C does in any Python program, instead of being swallowed."""
    from hybrid_ds.runtime.preemption import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.code == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before


_UNINTERRUPTED: list[float] = []


def uninterrupted_losses(tmp_path_factory, steps: int) -> list[float]:
    """The losses of an uninterrupted run of at least ``steps`` steps (one run shared by the three targets; the
    warmup schedule does not depend on max_steps, so its first steps are any shorter run's)."""
    if len(_UNINTERRUPTED) < steps:
        config = tiny_config(tmp_path_factory.mktemp("straight"), "gpt2-tiny", 2, max_steps=max(steps, 12),
                             eval_interval=0)
        train(config)
        _UNINTERRUPTED[:] = summary(config)["losses"]
    return _UNINTERRUPTED


# ---------------------------------------------------------------- non-finite steps


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer state files of one checkpoint, by file and path inside it."""
    found: dict[str, torch.Tensor] = {}

    def walk(value: object, name: str) -> None:
        if isinstance(value, torch.Tensor):
            found[name] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{name}.{index}")

    for file in sorted(folder.glob("*_states.pt")):
        walk(torch.load(file, map_location="cpu", weights_only=False), file.name)
    return found


def nan_steps_run(tmp_path: Path, stages: int, zero: int, flag: str, steps: str, launcher: bool):
    """tests/workers/nan_steps.py on 2 processes, a checkpoint after every step; dropout off, so a step left out
    consumes no random numbers; the learning rate changes at every step, so a scheduler step shows. Through the
    deepspeed launcher (``launcher``: the run whose exit code and per-rank lines are checked) or forked ranks."""
    tmp_path.mkdir()
    config = tiny_config(tmp_path, "gpt2-tiny", stages, zero=zero, max_steps=6, save_interval=1, eval_interval=0,
                         max_bad_steps=2)
    raw = json.loads(config.read_text())
    raw["model"]["overrides"] = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    raw["scheduler"]["params"].update(warmup_min_lr=1e-3, warmup_num_steps=10)
    config.write_text(json.dumps(raw))
    worker = ROOT / "tests" / "workers" / "nan_steps.py"
    if launcher:
        return through_launcher(worker, config, 2, flag, steps)
    return warm_ranks.run(worker, ["--config", config, flag, steps], 2)


ENGINES = {"zero1-pipeline": (2, 1), "zero0-pipeline": (2, 0), "zero2-pipeline": (2, 2), "zero2-plain": (1, 2),
           "zero3-plain": (1, 3)}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_non_finite_steps_are_skipped_exactly_and_enough_in_a_row_stop_the_run(tmp_path, engine):
    """NaN losses at steps 3, 5 and 6 with train.max_bad_steps 2: each step is skipped, counted and printed; steps 5-6
    stop the run (exit 2, one line) with the state after step 4 saved as latest. Every checkpoint equals that of a run
    that left steps 3, 5 and 6 out (no parameter, optimizer-state or learning-rate change from a skipped step)."""
    stages, zero = ENGINES[engine]
    # the launcher's exit code and lines once; the engines differ in what they skip, not in how the run stops
    bad = nan_steps_run(tmp_path / "nan", stages, zero, "--nan-steps", "3,5,6", launcher=engine == "zero1-pipeline")
    reference = nan_steps_run(tmp_path / "dropped", stages, zero, "--drop-steps", "3,5,6", launcher=False)
    assert reference.returncode == 0, reference.stderr[-3000:]
    output = bad.stdout + bad.stderr
    # The same line from every rank that prints one (cli.report_error: another rank prints when it outlives the first
    # one's exit by OTHER_RANKS_WAIT_S, which a loaded machine can make it do).
    errors = {line[line.index("hybrid-ds: error"):] for line in bad.stderr.splitlines() if "hybrid-ds: error" in line}
    assert bad.returncode == 2 and len(errors) == 1 and "Traceback" not in output, output[-3000:]
    run = tmp_path / "nan" / "run"
    assert errors.pop() == (f"hybrid-ds: error: train.max_bad_steps: 2 steps in a row (5-6) had a non-finite loss or "
                         f"gradient norm and were skipped; the state after step 4 is saved as {run / 'step_6'} "
                         "(latest); lower the learning rate or check the data")
    skipped = re.findall(r"step (\d): loss nan, a non-finite loss or gradient norm; step skipped \((\d) in a row",
                         output)
    assert skipped == [("3", "1"), ("5", "1"), ("6", "2")], output[-3000:]
    assert (run / "latest").read_text() == "step_6" and (run / "step_6" / "COMPLETE").is_file()
    for step in range(1, 7):
        got, want = checkpoint_tensors(run / f"step_{step}"), checkpoint_tensors(tmp_path / "dropped" / "run" /
                                                                                 f"step_{step}")
        assert got.keys() == want.keys() and len(got) > 0
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (step, name)
    before, after = checkpoint_tensors(run / "step_2"), checkpoint_tensors(run / "step_4")
    assert any(not torch.equal(before[name], after[name]) for name in before), "step 4 trained"
