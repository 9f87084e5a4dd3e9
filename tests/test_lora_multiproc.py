"""LoRA runs on real DeepSpeed pipelines (gloo ranks forked by tests/warm_ranks.py): training equals peft's model trained
with torch's AdamW, the base stays as loaded, and the exported adapter (and merged model) computes the run's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transformers

from hybrid_ds.config import ModelConfig, load_config
from hybrid_ds.models.lora import PEFT_PREFIX, base_name, is_adapter, with_peft
from hybrid_ds.runtime.pipeline import SequentialStages
from hybrid_ds.models.resolve import resolve_model
from hybrid_ds.runtime.plan import build_plan
from test_pipeline_multiproc import GAS, assert_params_match, folders, launch, make_batches, reference  # noqa: F401
from test_train_multiproc import assert_special_tokens, checkpoint_logits, summary, tiny_config, train

pytestmark = pytest.mark.multiproc

LORA = {"r": 4, "alpha": 8}


def peft_reference(name: str, folder: Path, config: Path, batches, steps: int) -> dict:
    """peft's model of the folder with the run's initial adapters (each stage seeds its own), trained in one process."""
    plan = build_plan(load_config(config), world_size=plan_stages(config))
    initial = {n: p for n, p in SequentialStages(plan).named_parameters().items() if is_adapter(n)}
    model = with_peft(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                      plan.config.model.lora, "causal_lm")
    values = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in initial.items():
            values[PEFT_PREFIX + key].copy_(value)
    result = reference(name, folder, batches, steps, model=model)
    result["params"] = {key.removeprefix(PEFT_PREFIX): p for key, p in result["params"].items()}
    return result


def plan_stages(config: Path) -> int:
    return json.loads(config.read_text())["pipeline"]["stages"]


@pytest.mark.parametrize("name, nproc, zero", [("llama-tiny", 2, 1), ("gpt2-tiny", 4, 2)])
def test_lora_training_matches_peft(name, nproc, zero, folders, tmp_path):
    """pp=2 (ZeRO-1, run as ZeRO-0 at dp=1) and pp=2 x dp=2 with ZeRO-2 (GPT-2's tied embedding frozen on both
    stages): after 3 steps every adapter equals peft's within 1e-5, and every base tensor is exactly as loaded."""
    steps = 3
    batches = make_batches(name, steps)
    dp = nproc // 2  # the reference's GAS micro-batches of a step, spread over dp ranks
    run = launch(tmp_path, folders[name], batches, 2, nproc, steps,
                 model={"name": str(folders[name]), "pretrained": True, "lora": LORA},
                 pipeline={"stages": 2, "partition": [1, 1] if name == "gpt2-tiny" else "uniform"},
                 zero_optimization={"stage": zero}, gradient_accumulation_steps=GAS // dp)
    config = next(tmp_path.glob("run-*")) / "config.json"
    ref = peft_reference(name, folders[name], config, batches, steps)
    assert_params_match(run["ranks"], ref["params"])
    assert run["losses"][-1] < run["losses"][1], run["losses"]
    loaded = dict(transformers.AutoModelForCausalLM.from_pretrained(folders[name]).named_parameters())
    for rank in run["ranks"]:
        for key, value in rank["params"].items():
            if not is_adapter(key):
                assert torch.equal(value, loaded[base_name(key)]), key


def test_lora_run_exports_an_adapter_peft_loads_and_a_merged_model(tmp_path):
    """A LoRA fine-tune of a saved GPT-2 at pp=2 through launch/train.py: train.export_hf writes peft's adapter folder;
    PeftModel.from_pretrained(base, folder) and the `export --merge` folder both compute the trained pipeline's
    logits within 1e-5, away from the base model's."""
    import peft

    base = tmp_path / "base"
    torch.manual_seed(0)
    tiny = resolve_model(ModelConfig(name="gpt2-tiny", overrides={"vocab_size": 50304})).hf_config  # GPT-2 BPE
    transformers.AutoModelForCausalLM.from_config(tiny).save_pretrained(base)
    config = tiny_config(tmp_path, str(base), 2, max_steps=6, export_hf=str(tmp_path / "adapter"))
    raw = json.loads(config.read_text())
    raw["model"] = {"name": str(base), "pretrained": True, "lora": {**LORA, "target_modules": ["c_attn", "c_fc"]}}
    raw["pipeline"]["partition"] = [1, 1]
    raw["optimizer"]["params"]["lr"] = raw["scheduler"]["params"]["warmup_max_lr"] = 2e-2
    config.write_text(json.dumps(raw))
    train(config)
    result = summary(config)
    assert result["last_loss"] < result["first_loss"], result["losses"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.name.startswith("adapter_")) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "adapter").eos_token_id == 50256  # the run's

    batch = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    trained = checkpoint_logits(config, batch, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        base_logits = model(input_ids=batch).logits
        adapted = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()(input_ids=batch).logits
    assert (adapted - trained).abs().max().item() <= 1e-5
    assert (base_logits - trained).abs().max().item() > 1e-2  # the adapters moved the model

    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "hybrid_ds.cli", "export", "--merge", str(tmp_path / "run"),
                           str(merged)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert not (merged / "adapter_config.json").exists()
    assert_special_tokens(merged)
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=batch).logits
    assert (logits - trained).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pretrained", [True, False], ids=["pretrained", "random-base"])
def test_lora_run_resumes_exactly(tmp_path, pretrained):
    """Stopped after step 4 and resumed, a LoRA run (pp=2, adapter dropout on) gives the uninterrupted run's losses
    exactly: adapters, their optimizer state and the frozen base all come back. A pretrained base is left out of the
    checkpoints (read from model.name again), a random one is saved. The first 4 steps train under
    pipeline.schedule zb-h1, the rest and the uninterrupted run under 1F1B."""
    base = tmp_path / "base"
    tiny = resolve_model(ModelConfig(name="gpt2-tiny", overrides={"vocab_size": 50304})).hf_config  # GPT-2 BPE
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny).save_pretrained(base)
    runs = {}
    for name, steps in (("straight", 8), ("stopped", 4), ("resumed", 8)):
        folder = tmp_path / ("straight" if name == "straight" else "b")
        folder.mkdir(exist_ok=True)
        config = tiny_config(folder, "gpt2-tiny", 2, save_interval=4, max_steps=steps)
        raw = json.loads(config.read_text())
        if pretrained:
            raw["model"] = {"name": str(base), "pretrained": True}
        raw["model"]["lora"] = {**LORA, "dropout": 0.1}
        raw["pipeline"]["partition"] = [1, 1]
        if name == "stopped":  # a ZB-H1 segment: the same adapters as 1F1B's, and its checkpoint resumes under 1F1B
            raw["pipeline"]["schedule"] = "zb-h1"
        config.write_text(json.dumps(raw))
        train(config, 2, *(["--resume"] if name == "resumed" else []))
        runs[name] = summary(config)["losses"]
    assert len(runs["resumed"]) == 8 and runs["resumed"] == runs["straight"], runs  # steps 1-4 from the history
    block = torch.load(tmp_path / "b" / "run" / "step_4" / "layer_02-model_states.pt", weights_only=True)
    assert all(is_adapter(key) for key in block) == pretrained, sorted(block)
