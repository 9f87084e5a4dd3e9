"""Real DeepSpeed pipelines on CPU (gloo, 2 processes through the deepspeed launcher) against references.

The reference is the original Hugging Face model trained in one process with torch's AdamW on the
same micro-batches (the loss of a step is the mean of its micro-batch losses, as DeepSpeed's).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_ds.parity import sample_batch

pytestmark = pytest.mark.multiproc

WORKER = Path(__file__).parent / "workers" / "pipeline_steps.py"
NO_DROPOUT = {
    "gpt2-tiny": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "bert-tiny": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "llama-tiny": {},
}
ADAMW = {"lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
MICRO, GAS, SEQ = 2, 4, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved random init of each tiny preset (dropout off), the starting point of every run."""
    import transformers

    from hybrid_ds.config import ModelConfig
    from hybrid_ds.models.resolve import resolve_model

    out = {}
    for name, overrides in NO_DROPOUT.items():
        resolved = resolve_model(ModelConfig(name=name, overrides=overrides))
        auto = transformers.AutoModelForMaskedLM if name == "bert-tiny" else transformers.AutoModelForCausalLM
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        auto.from_config(resolved.hf_config).save_pretrained(folder)
        out[name] = folder
    return out


def make_batches(name: str, steps: int) -> list[dict[str, torch.Tensor]]:
    """The same GAS micro-batches every step (random tokens: only repetition makes the loss fall)."""
    task = "masked_lm" if name == "bert-tiny" else "causal_lm"
    batches = []
    for i in range(GAS):
        b = sample_batch(256, SEQ, task, batch=MICRO, seed=100 + i)
        if task == "causal_lm":
            b.pop("token_type_ids")
        batches.append(b)
    return batches * steps


def launch(tmp_path: Path, folder: Path, batches, stages: int, nproc: int, steps: int, **ds) -> dict:
    run = tmp_path / f"run-pp{stages}-n{nproc}-z{ds.get('zero_optimization', {}).get('stage', 0)}"
    run.mkdir()
    config = {"model": {"name": str(folder), "pretrained": True}, "data": {"seq_len": SEQ},
              "pipeline": {"stages": stages}, "train_micro_batch_size_per_gpu": MICRO,
              "gradient_accumulation_steps": GAS, "optimizer": {"type": "AdamW", "params": ADAMW},
              "steps_per_print": 1000, **ds}
    (run / "config.json").write_text(json.dumps(config))
    torch.save(batches, run / "batches.pt")
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(_free_port()), str(WORKER),
           "--config", str(run / "config.json"), "--batches", str(run / "batches.pt"),
           "--steps", str(steps), "--out", str(run)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(run / f"params-rank{r}.pt") for r in range(nproc)]
    return {"losses": json.loads((run / "losses.json").read_text()), "ranks": ranks}


def reference(name: str, folder: Path, batches, steps: int, clip: float = 0.0) -> dict:
    """Plain torch: the HF model, AdamW, loss / grad_accum per micro-batch, optional clip_grad_norm_."""
    import transformers

    auto = transformers.AutoModelForMaskedLM if name == "bert-tiny" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]),
                                  eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])

    def loss_of(b):
        kwargs = {k: v for k, v in b.items() if k != "token_type_ids"}
        return model(**kwargs).loss

    with torch.no_grad():
        losses = [sum(loss_of(b).item() for b in batches[:GAS]) / GAS]
    norms = []
    for step in range(steps):
        step_losses = []
        for b in batches[step * GAS:(step + 1) * GAS]:
            loss = loss_of(b)
            (loss / GAS).backward()
            step_losses.append(loss.item())
        if clip:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(step_losses) / GAS)
    return {"losses": losses, "params": dict(model.named_parameters()), "norms": norms}


def assert_params_match(ranks: list[dict], ref_params: dict, atol: float = 1e-5) -> None:
    seen = set()
    for rank in ranks:
        for key, value in rank["params"].items():
            torch.testing.assert_close(value, ref_params[key].detach(), atol=atol, rtol=1e-5, msg=key)
            seen.add(key)
    assert seen == set(ref_params), set(ref_params) ^ seen  # named_parameters lists a tied weight once


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_pipeline_two_stages_matches_hf_and_one_stage(name, folders, tmp_path):
    steps = 5
    batches = make_batches(name, steps)
    ref = reference(name, folders[name], batches, steps)
    pp2 = launch(tmp_path, folders[name], batches, stages=2, nproc=2, steps=steps)
    pp1 = launch(tmp_path, folders[name], batches, stages=1, nproc=1, steps=steps)

    assert pp2["losses"][0] == pytest.approx(ref["losses"][0], abs=1e-5)  # the fixed batch, before training
    assert pp2["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert pp2["losses"] == pytest.approx(pp1["losses"], abs=1e-5)
    assert pp2["losses"][-1] < pp2["losses"][0]
    assert {r["stage"] for r in pp2["ranks"]} == {0, 1}
    assert_params_match(pp2["ranks"], ref["params"])
    first, last = (r["params"] for r in sorted(pp2["ranks"], key=lambda r: r["stage"]))
    shared = set(first) & set(last)
    if name != "llama-tiny":  # gpt2 and bert tie the output projection to the token embedding
        assert shared, "tied weight should live on both stages"
    for key in shared:
        assert torch.equal(first[key], last[key]), f"tied copies of {key} diverged"


@pytest.mark.parametrize("zero", [0, 1])
def test_gradient_clipping_uses_the_global_norm(zero, folders, tmp_path):
    """pp=2 with gradient_clipping 1.0 equals torch's clip_grad_norm_ over the whole model."""
    steps = 3
    batches = make_batches("gpt2-tiny", steps)
    ref = reference("gpt2-tiny", folders["gpt2-tiny"], batches, steps, clip=1.0)
    assert min(ref["norms"]) > 1.0, f"clipping must be active for this test to mean anything: {ref['norms']}"
    run = launch(tmp_path, folders["gpt2-tiny"], batches, stages=2, nproc=2, steps=steps,
                 gradient_clipping=1.0, zero_optimization={"stage": zero})
    assert run["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert_params_match(run["ranks"], ref["params"])


def test_activation_checkpointing_keeps_parity(folders, tmp_path):
    steps = 3
    batches = make_batches("llama-tiny", steps)
    ref = reference("llama-tiny", folders["llama-tiny"], batches, steps)
    run = launch(tmp_path, folders["llama-tiny"], batches, stages=2, nproc=2, steps=steps,
                 pipeline={"stages": 2, "activation_checkpoint_interval": 1})
    assert run["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert_params_match(run["ranks"], ref["params"])


def test_bf16_pipeline_trains(folders, tmp_path):
    """bf16 (DeepSpeed's BF16_Optimizer, fp32 master weights) at pp=2 follows the fp32 reference loosely."""
    steps = 3
    batches = make_batches("gpt2-tiny", steps)
    ref = reference("gpt2-tiny", folders["gpt2-tiny"], batches, steps)
    run = launch(tmp_path, folders["gpt2-tiny"], batches, stages=2, nproc=2, steps=steps, bf16={"enabled": True})
    assert run["losses"] == pytest.approx(ref["losses"], abs=5e-2)
    assert all(p.dtype == torch.bfloat16 for r in run["ranks"] for p in r["params"].values())
