"""A checkpoint saved at one layout (engine, stages, dp, ZeRO stage, boundaries) continues at another with the
uninterrupted run's losses, through DeepSpeed's universal checkpoints: weights, optimizer moments, schedule and data
position.

Each transition: run A straight for 8 steps at the first layout, saving after 4; run B is A's save dir
with step 4 as its latest checkpoint, resumed at the second layout. B's steps 5-8 must give A's losses (fp32, dropout off: the layouts compute the same sums in another
order; the global batch is 8 samples at every layout). Optimizer moments lost or reset, a data position counted per rank, or the schedule restarted would
each move the losses far beyond the 1e-5 allowed.

With two processes, pp=2 x dp=1 under a ZeRO-1 config runs as ZeRO-0 (config.deepspeed.zero_stage_to_run) and pp=1 x dp=2 as
ZeRO-1: the transitions between them carry optimizer moments from ZeRO-0's whole states to ZeRO-1's partitions
and back (runtime.checkpoint.zero0: zero0_to_universal, load_universal_zero0), and the partition change ZeRO-0 to ZeRO-0.
Two transitions run pp=2 x dp=2 under ZeRO-2 on four processes (gradients and optimizer states partitioned over
the data-parallel pair of each stage): entered from pp=2 x dp=1 and left for pp=1 x dp=2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import warm_ranks

from test_train_multiproc import summary, tiny_config, train

pytestmark = pytest.mark.multiproc

LORA = {"r": 4, "alpha": 64}  # scaled by 16: a random base learns visibly in 8 steps
NO_DROPOUT = {"gpt2-tiny": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
              "llama-tiny": {}}


def layout_config(tmp_path: Path, name: str, stages: int, zero: int = 1, partition=None, lora=None, nproc: int = 2,
                  sp: int = 1, eval_interval: int = 0, **train) -> Path:
    config = tiny_config(tmp_path, name, stages, zero=zero, save_interval=4, eval_interval=eval_interval, **train)
    raw = json.loads(config.read_text())
    raw["model"]["overrides"] = NO_DROPOUT[name]
    if lora:  # a pretrained base, one folder for the session's runs, which LoRA checkpoints leave out
        raw["model"] = {"name": str(saved_base(tmp_path.parent / f"base-{name}", name)), "pretrained": True,
                        "lora": lora}
    raw["pipeline"]["sequence_parallel"] = sp
    # micro 2 x dp = nproc / (stages x sp): a global batch of 8 at every layout
    raw["gradient_accumulation_steps"] = 4 * stages * sp // nproc
    if partition is not None:
        raw["pipeline"]["partition"] = partition
    config.write_text(json.dumps(raw))
    return config


def saved_base(folder: Path, name: str) -> Path:
    import transformers

    from hybrid_ds.config import ModelConfig
    from hybrid_ds.models.resolve import resolve_model

    if not folder.is_dir():
        config = resolve_model(ModelConfig(name=name, overrides={**NO_DROPOUT[name], "vocab_size": 50304})).hf_config
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


_STRAIGHT: dict[tuple, Path] = {}


def straight_run(tmp_path_factory, name: str, stages: int, zero: int = 1, partition=None, lora=None,
                 nproc: int = 2) -> Path:
    """The config of run A: 8 uninterrupted steps at this layout, saved after 4 and 8, evaluated at both and exported
    (one run per layout, shared by the tests that start from it)."""
    key = (name, stages, zero, str(partition), str(lora), nproc)
    if key not in _STRAIGHT:
        folder = tmp_path_factory.mktemp("straight")
        config = layout_config(folder, name, stages, zero, partition, lora, nproc, eval_interval=4,
                               export_hf=str(folder / "hf"))
        train(config, nproc)
        _STRAIGHT[key] = config
    return _STRAIGHT[key]


def continue_elsewhere(tmp_path: Path, tmp_path_factory, name: str, first: dict, then: dict) -> tuple[list, list]:
    """(A's losses, B's losses after resuming at ``then``: steps 5-8). B is A's save dir with step 4 its latest checkpoint
    (what a run stopped there leaves: the runs are deterministic, dropout off)."""
    straight = straight_run(tmp_path_factory, name, **first)
    saved = Path(json.loads(straight.read_text())["train"]["save_dir"])
    shutil.copytree(saved, tmp_path / "run", ignore=shutil.ignore_patterns("step_8", "summary.json", "universal"))
    (tmp_path / "run" / "latest").write_text("step_4")
    resumed = layout_config(tmp_path, name, **then)
    proc = train(resumed, then.get("nproc", 2), "--resume")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    want, got = summary(straight)["losses"], summary(resumed)["losses"]
    assert got[:4] == want[:4], (want, got)  # steps 1-4 come from the checkpoint's history, as they were
    return want, got[4:]


TRANSITIONS = {
    "pp2xdp1->pp1xdp2": ("gpt2-tiny", dict(stages=2), dict(stages=1)),
    "pp1xdp2->pp2xdp1": ("gpt2-tiny", dict(stages=1), dict(stages=2)),
    "zero1-pipeline->zero2-plain": ("gpt2-tiny", dict(stages=2, zero=1), dict(stages=1, zero=2)),
    "zero2-plain->zero1-pipeline": ("gpt2-tiny", dict(stages=1, zero=2), dict(stages=2, zero=1)),
    # 4 processes: into and out of ZeRO-2 with stages at dp=2 (gradients and optimizer states partitioned)
    "pp2xdp1->zero2-pp2xdp2": ("gpt2-tiny", dict(stages=2), dict(stages=2, zero=2, nproc=4)),
    "zero2-pp2xdp2->pp1xdp2": ("gpt2-tiny", dict(stages=2, zero=2, nproc=4), dict(stages=1)),
    "partition[1,3]->[3,1]": ("llama-tiny", dict(stages=2, partition=[1, 3]), dict(stages=2, partition=[3, 1])),
    # the adapters and their optimizer state move; the frozen base is read from the checkpoint as it was
    "lora pp2xdp1->pp1xdp2": ("llama-tiny", dict(stages=2, partition=[2, 2], lora=LORA), dict(stages=1, lora=LORA)),
}


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_a_run_continues_on_another_layout(tmp_path, tmp_path_factory, transition):
    name, first, then = TRANSITIONS[transition]
    want, got = continue_elsewhere(tmp_path, tmp_path_factory, name, first, then)
    assert len(want) == 8 and len(got) == 4, (want, got)
    assert max(abs(a - b) for a, b in zip(want[4:], got)) < 1e-5, (want[4:], got)
    assert want[-1] < want[0] - 0.1, want  # it learns: equal losses are not a flat line


def test_a_run_continues_with_sequence_parallelism_and_its_export_holds_the_same_weights(tmp_path, tmp_path_factory):
    """pipeline.sequence_parallel: Llama saved at pp=2 x dp=1 continues at pp=2 x sp=2 (4 processes; ZeRO-1 over the
    stage's 2 sp ranks where it ran as ZeRO-0): steps 5-8, the evaluation loss and its token count at step 8 within
    1e-5 of the uninterrupted run's, and the export of its last checkpoint (saved at sp=2) holds the uninterrupted
    run's exported weights within 1e-5."""
    from safetensors.torch import load_file

    first = dict(stages=2, partition=[1, 3])
    want, got = continue_elsewhere(tmp_path, tmp_path_factory, "llama-tiny", first,
                                   dict(first, sp=2, nproc=4, eval_interval=4))
    assert max(abs(a - b) for a, b in zip(want[4:], got)) < 1e-5, (want[4:], got)
    straight, resumed = summary(straight_run(tmp_path_factory, "llama-tiny", **first)), summary(tmp_path / "config.json")
    assert abs(straight["eval_loss"] - resumed["eval_loss"]) < 1e-5 and straight["eval_tokens"] == resumed["eval_tokens"]
    assert json.loads((tmp_path / "run" / "step_8" / "hybrid_ds.json").read_text())["layout"]["sp"] == 2
    proc = warm_ranks.cli("export", tmp_path / "run" / "step_8", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    expected = load_file(Path(json.loads(straight_run(tmp_path_factory, "llama-tiny", **first).read_text())["train"]
                              ["export_hf"]) / "model.safetensors")
    assert exported.keys() == expected.keys()
    assert all(torch.allclose(exported[k], expected[k], atol=1e-5, rtol=0) for k in expected)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybrid_ds.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)


def _universal_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {p.name: torch.load(p / "fp32.pt", weights_only=False)["param"]
            for p in (folder / "zero").iterdir() if (p / "exp_avg.pt").is_file()}


@pytest.mark.parametrize("stages, zero", [(2, 1), (1, 2)])
def test_the_universal_form_keeps_hugging_face_names_and_deepspeeds_tools_agree(tmp_path, tmp_path_factory,
                                                                                stages, zero):
    """``hybrid-ds convert-checkpoint``: every parameter of the (tied) GPT-2 under its Hugging Face name, its fp32
    weights exactly the exported model's, with Adam's moments beside them. On the plain engine DeepSpeed's
    ``zero_to_fp32.py``, copied into the save dir, gives the same weights."""
    import transformers

    run = Path(json.loads(straight_run(tmp_path_factory, "gpt2-tiny", stages, zero).read_text())["train"]["save_dir"])
    proc = _cli("convert-checkpoint", str(run))
    assert proc.returncode == 0 and proc.stdout.strip() == f"wrote {run / 'step_8' / 'universal'}", \
        proc.stdout + proc.stderr
    universal = _universal_weights(run / "step_8" / "universal")
    exported = transformers.AutoModelForCausalLM.from_pretrained(run.parent / "hf")
    want = dict(exported.named_parameters())
    assert sorted(universal) == sorted(want)
    assert all(torch.equal(universal[name], want[name].detach()) for name in want)
    if stages == 1:
        proc = subprocess.run([sys.executable, str(run / "zero_to_fp32.py"), str(run), str(tmp_path / "fp32")],
                              capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        consolidated = torch.load(tmp_path / "fp32" / "pytorch_model.bin", weights_only=False)
        assert all(torch.equal(consolidated[name], want[name].detach()) for name in want)


def test_a_layout_change_from_bf16_zero0_is_one_line(tmp_path):
    """fp32 ZeRO-0 converts (pp=2 x dp=1 above runs as ZeRO-0); bf16 ZeRO-0 keeps DeepSpeed's BF16_Optimizer state,
    which neither DeepSpeed's universal conversion nor hybrid_ds's reads: one line, no traceback."""
    config = layout_config(tmp_path, "gpt2-tiny", 2, zero=0, max_steps=2)
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "bf16": {"enabled": True}}))
    train(config, 2)
    resumed = layout_config(tmp_path, "gpt2-tiny", 1, zero=0, max_steps=4)
    raw = json.loads(resumed.read_text())
    resumed.write_text(json.dumps({**raw, "bf16": {"enabled": True}}))
    proc = train(resumed, 2, "--resume", expect=2)
    lines = {line for line in proc.stderr.splitlines() if line.startswith("hybrid-ds: error:")}
    assert lines == {f"hybrid-ds: error: CHECKPOINT: {tmp_path / 'run' / 'step_2'} cannot be converted to a universal "
                     "checkpoint: mp_rank_00_model_states.pt holds no torch optimizer state named by hybrid_ds (saved "
                     "by an older hybrid_ds, or in bf16/fp16)"}, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
