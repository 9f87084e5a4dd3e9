"""Checkpoints that cannot mix: a save is published whole or not at all and replaces (never merges with) what a
folder of the same step held; a universal form is read only for the checkpoint it was converted from; every random
generator a rank draws from, the device's included, is saved and restored; a fresh run never writes over a
save_dir's checkpoints (tests/test_bad_inputs.py, row fresh-run-into-checkpoints)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import warm_ranks

from hybrid_ds.runtime.checkpoint import files
from hybrid_ds.runtime.checkpoint.universal import universal_is_current

WORKER = Path(__file__).resolve().parent / "workers" / "checkpoint_saves.py"


def save(save_dir: Path, step: int, *flags: str) -> int:
    done = warm_ranks.run(WORKER, [save_dir, step, *flags], nproc=2)
    assert done.returncode in (0, 3), done.stderr[-3000:]
    return done.returncode


@pytest.mark.multiproc
def test_a_save_is_published_whole_and_replaces_an_older_folder(tmp_path):
    """2 ranks: a save cut short after every rank wrote its part leaves ``latest`` and the earlier checkpoint as they
    were and no ``step_N``; a later save of that step publishes it; saving a step again replaces its folder, a stale
    ``universal/`` and files of other ranks included."""
    run = tmp_path / "run"
    assert save(run, 2) == 0
    step_2 = run / "step_2"
    whole = {"COMPLETE", "hybrid_ds.json", "part-rank0.pt", "part-rank1.pt", "rng-rank0.pt", "rng-rank1.pt"}
    assert {p.name for p in step_2.iterdir()} == whole and (run / "latest").read_text() == "step_2"
    assert json.loads((step_2 / "hybrid_ds.json").read_text())["data"] == {"samples": 2}

    assert save(run, 4, "--die") == 3  # every part written, then the job dies
    assert (run / "latest").read_text() == "step_2" and not (run / "step_4").exists()
    assert {p.name for p in step_2.iterdir()} == whole
    assert (run / ".step_4.partial" / "part-rank1.pt").is_file()  # what the dead save left, never read
    assert files.latest_checkpoint(run) == step_2

    assert save(run, 4) == 0
    assert (run / "latest").read_text() == "step_4" and {p.name for p in (run / "step_4").iterdir()} == whole
    assert not list(run.glob(".step_*"))  # the dead save's leftovers are gone

    (step_2 / "universal").mkdir()
    (step_2 / "universal" / "COMPLETE").write_text("")
    (step_2 / "part-rank7.pt").write_text("a rank of another layout")
    first_id = json.loads((step_2 / "hybrid_ds.json").read_text())["id"]
    assert save(run, 2) == 0
    assert {p.name for p in step_2.iterdir()} == whole
    assert json.loads((step_2 / "hybrid_ds.json").read_text())["id"] != first_id


def test_a_universal_form_is_read_only_for_the_checkpoint_it_was_made_from(tmp_path):
    folder = tmp_path / "step_2"
    (folder / "universal").mkdir(parents=True)
    (folder / "hybrid_ds.json").write_text(json.dumps({"step": 2, "id": "a1"}))
    assert not universal_is_current(folder)  # not converted (no marker)
    (folder / "universal" / "COMPLETE").write_text("b2")  # converted from another checkpoint saved as step_2
    assert not universal_is_current(folder)
    (folder / "universal" / "COMPLETE").write_text("a1")
    assert universal_is_current(folder)
    (folder / "hybrid_ds.json").write_text(json.dumps({"step": 2}))  # saved before checkpoints had ids
    (folder / "universal" / "COMPLETE").write_text("")
    assert universal_is_current(folder)


class OwnGenerator:
    """An accelerator whose device generator is not torch's CPU one, as CUDA's is not."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(7)

    def get_rng_state(self):
        return self.generator.get_state()

    def set_rng_state(self, state):
        self.generator.set_state(state)


def test_every_generator_is_saved_and_restored(monkeypatch):
    """Python's, NumPy's, torch's CPU and the device's generators (dropout on a GPU draws from the device's): after a
    restore each gives the numbers it gave after the save."""
    device = OwnGenerator()
    monkeypatch.setattr(files, "get_accelerator", lambda: device)
    state = files.rng_state()

    def draws():
        return (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=device.generator).item())

    first = draws()
    files.set_rng_state(state)
    assert draws() == first
    old = {k: v for k, v in state.items() if k != "device"}  # a checkpoint written before devices were saved
    files.set_rng_state(old)
    assert draws()[:3] == first[:3]


SLOW = Path(__file__).resolve().parent / "workers" / "slow_conversion.py"


@pytest.mark.multiproc
def test_a_conversion_may_outlast_the_process_groups_timeout(tmp_path):
    """The first rank converts for 6 s while the other waits, under a process group that times out after 3 s: the
    wait is on a group of its own (24 h), and a conversion's mistake reaches every rank as one line each."""
    done = warm_ranks.run(SLOW, [tmp_path, 6], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saw yes") == 2
    failed = warm_ranks.run(SLOW, [tmp_path / "other", 6, "--fail"], nproc=2)
    lines = [line for line in failed.stderr.splitlines() if line.startswith("hybrid-ds: error: CHECKPOINT")]
    assert failed.returncode == 2 and len(lines) == 2, failed.stderr[-3000:]
