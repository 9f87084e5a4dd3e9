"""``train.float8``: what it cannot run with is one line, and tests/float8_checks.py (what it computes, in torchao) runs
with the Makefile's torchao. torchao is kept out of .venv in .float8 because transformers imports it in every process
wherever it is installed (1.8 s and four warning lines each); the checks that need it run in one pytest process of
their own with .float8 on PYTHONPATH. Its loss over 50 bf16 steps against bf16 is bench/float8_loss.py's."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_ds.config import load_config_dict
from hybrid_ds.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FLOAT8 = ROOT / ".float8"


def config(name: str, float8: bool = True, **top):
    """``name`` at 2 stages with train.float8 (also tests/float8_checks.py's)."""
    return load_config_dict({"model": {"name": name}, "pipeline": {"stages": 2}, "data": {"seq_len": 64},
                             "train": {"float8": float8}, "train_micro_batch_size_per_gpu": 2, **top})


@pytest.mark.parametrize("make, key, says", [
    (lambda: config("llama-tiny", model={"name": "llama-tiny", "lora": {"r": 4}}), "train.float8", "peft"),
    (lambda: config("llama-tiny", pipeline={"stages": 2, "schedule": "zb-h1"}), "pipeline.schedule", "float8"),
    (lambda: config("llama-tiny", pipeline={"stages": 1}, zero_optimization={"stage": 2}), "train.float8",
     "needs the pipeline engine"),
])
def test_what_cannot_run_in_float8_is_one_line(make, key, says):
    with pytest.raises(UserError) as err:
        make()
    assert err.value.key == key and says in err.value.message and "\n" not in str(err.value), err.value


def test_float8_without_torchao_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'hybrid_ds\[float8\]'") as err:
        config("llama-tiny")
    assert err.value.key == "train.float8"


def test_torchao_stays_out_of_the_environment():
    """The suite's .venv has no torchao (each process would import it through transformers)."""
    assert importlib.util.find_spec("torchao") is None


@pytest.mark.skipif(not (FLOAT8 / "torchao").is_dir(), reason=".float8 has no torchao: `make setup` puts it there")
def test_float8_checks_pass_with_torchao():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(FLOAT8), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/float8_checks.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
