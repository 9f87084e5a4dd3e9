"""What a run tells as it goes and leaves at its end, without a run: the progress output (a bar in a terminal, plain
lines in a log, rank 0 only), the history a resume carries on, summary.json and the plot of one or several runs."""

from __future__ import annotations

import io
import json
import math

import pytest

from hybrid_ds.cli import main
from hybrid_ds.plot import plot_runs, read_run
from hybrid_ds.runtime.history import History, Summary
from hybrid_ds.runtime.progress import Progress


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def steps(progress: Progress, first: int, last: int) -> None:
    for step in range(first, last + 1):
        progress.step(step, 10.0 / step, 1e-3, 1000.0, 0.5)
        if step == 4:
            progress.write("step 4: eval loss 2.0000 over 10 tokens, perplexity 7.39")
    progress.close()


def test_a_log_gets_one_plain_line_every_steps_per_print_and_at_the_first_and_last_step(capsys):
    stream = Stream(tty=False)
    steps(Progress(12, 0, True, 5, stream), 1, 12)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["step 1/12", "step 4", "step 5/12", "step 10/12", "step 12/12"], out
    assert out[0] == "step 1/12: loss 10.0000, lr 1.00e-03, 1,000 tokens/s, 0.50 s/step" and not stream.getvalue()
    steps(Progress(12, 6, True, 50, Stream(tty=False)), 7, 12)  # resumed at step 6, DeepSpeed's steps_per_print 50
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["step 7/12", "step 12/12"]


def test_a_terminal_gets_a_bar_and_each_line_once(capsys):
    stream = Stream(tty=True)
    steps(Progress(12, 0, True, 5, stream), 1, 12)
    out = capsys.readouterr().out
    assert out == "step 4: eval loss 2.0000 over 10 tokens, perplexity 7.39\n", out  # no plain step lines
    assert "12/12" in stream.getvalue() and "loss=0.833" in stream.getvalue()


def test_only_rank_0_says_anything(capsys):
    stream = Stream(tty=True)
    steps(Progress(12, 0, False, 5, stream), 1, 12)
    assert capsys.readouterr().out == "" and stream.getvalue() == ""


def a_run(stop_at: int, history: History | None = None) -> History:
    history = history or History()
    first = history.steps[-1] if history.steps else 0
    history.begin(first, "pipeline.stages 2 x dp 1, ZeRO-1", 256, "runs/x/step_4" if first else "")
    for step in range(first + 1, stop_at + 1):
        history.step(step, 10.0 - step, 1e-3 * step, 2.0 * (step - first))
        if step % 4 == 0:
            history.evals.append({"step": step, "loss": 9.0 - step, "tokens": 100})
            history.checkpoints.append({"step": step, "path": f"runs/x/step_{step}"})
    return history


def test_a_resumed_run_summary_covers_the_whole_run():
    saved = json.loads(json.dumps(a_run(4).to_dict()))  # what the step-4 checkpoint's state holds
    summary = Summary.of(a_run(8, History.from_dict(saved)), 8)
    assert summary.losses == [10.0 - s for s in range(1, 9)] and summary.history["steps"] == list(range(1, 9))
    assert (summary.first_loss, summary.last_loss, summary.eval_loss, summary.eval_tokens) == (9.0, 2.0, 1.0, 100)
    assert [s["first_step"] for s in summary.history["segments"]] == [0, 4] and summary.seconds == 16.0
    assert summary.tokens_per_s == 8 * 256 / 16.0
    assert summary.line().startswith("done: 8 steps (2 segments: resumed 1x) in 16 s, loss 9.000 -> 2.000")
    assert History.from_dict(None) == History() and History.from_dict({"steps": [3], "later_key": 1}).steps == [3]
    assert math.isnan(Summary.of(History(), 4).first_loss)  # a finished run resumed again trains nothing


def test_runs_are_drawn_alone_and_side_by_side(tmp_path, capsys):
    for name, stop in (("a", 8), ("b", 6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(Summary.of(a_run(stop), stop).to_json())
    assert read_run(tmp_path / "b")["steps"] == list(range(1, 7))
    one = plot_runs([tmp_path / "a"], tmp_path / "a.png")
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b" / "summary.json"), "-o", str(tmp_path / "ab.png")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'ab.png'}\n" and (tmp_path / "ab.png").stat().st_size > 10000


def test_a_summary_of_before_histories_is_drawn_from_its_losses(tmp_path):
    """summary.json of a run before histories were kept: steps, losses and no history."""
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 8, "losses": [4.0, 3.0, 2.0, 1.0]}))
    assert read_run(tmp_path)["steps"] == [5, 6, 7, 8]
    assert plot_runs([tmp_path], tmp_path / "old.png").is_file()
