"""The README's getting-started part, run as written: every ```bash block between its getting-started markers, in one
shell, in a copy of the repository (links to its files and .venv), with only ``HYBRID_DS_SET`` (which the README names,
with this value) making each training run one short step. A command the README shows that no longer works, or a
file it says a run leaves that is not there, fails here."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from hybrid_ds.config.load import strip_comments

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- getting-started:begin -->", "<!-- getting-started:end -->"
SHRINK = "train.max_steps=1;train.eval_batches=1;data.seq_len=32"
# What the getting-started commands read from the repository (the copy links them; runs/ and the rest are its own).
LINKED = ("Makefile", "pyproject.toml", "requirements-assets.txt", "requirements-lock.txt", "configs", "launch",
          "hybrid_ds", ".venv")


def getting_started_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    part = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    return re.findall(r"```bash\n(.*?)```", part, re.S)


def test_the_readme_names_the_shrinking_variable_with_the_value_used_here():
    readme = (ROOT / "README.md").read_text()
    assert f'HYBRID_DS_SET="{SHRINK}"' in readme.split(BEGIN, 1)[0]
    assert len(getting_started_blocks()) >= 6


def test_every_getting_started_command_runs_as_written(tmp_path):
    # make train would otherwise reinstall .venv, editable, from the copy (make test has just set it up in CI)
    stale = subprocess.run(["make", "-q", "setup"], cwd=ROOT, capture_output=True).returncode
    assert stale == 0, ".venv is older than pyproject.toml or the requirements: run make setup first"
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in LINKED:
        (repo / name).symlink_to(ROOT / name)
    script = "set -euo pipefail\n" + "\n".join(getting_started_blocks())
    env = {**os.environ, "HYBRID_DS_SET": SHRINK, "HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "")}
    env.pop("HYBRID_DS_VERBOSE", None)
    proc = subprocess.run(["bash", "-c", script], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=1200)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:]
    runs = repo / "runs"
    for run in ("gpt", "mine", "smollm2-lora"):
        summary = json.loads((runs / run / "summary.json").read_text())
        assert summary["steps"] == 1 and (runs / run / "summary.png").is_file(), (run, summary)
    assert f"the run in runs/gpt is complete (step 1" in out  # make train, the second time
    assert (repo / "out" / "gpt-hf" / "config.json").is_file() and (repo / "runs.png").is_file()
    assert (runs / "smollm2-lora" / "adapter" / "adapter_config.json").is_file()
    written = json.loads(strip_comments((repo / "my-configs" / "rank1.json").read_text()))  # it has a // header
    assert written["train"]["resume"] == "auto"
    assert "Traceback" not in out and "[INFO]" not in out, out[-6000:]  # quiet: no DeepSpeed INFO line
