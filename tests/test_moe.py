"""Mixture-of-Experts models (mixtral, qwen3_moe) load per stage and compute what Hugging Face computes through the
pipeline, and train at two stages.

Loading: a stage builds its MoE blocks from checkpoints that store each expert separately (as published
checkpoints and ``save_pretrained`` in transformers 5.24 do), merged per stage by transformers' own weight
converters, and reads no other stage's tensors. Parity here runs with ``output_router_logits`` false: the
router's auxiliary loss is not part of the loss.
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hybrid_ds.config import load_config_dict  # noqa: E402

MOE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128,
           num_local_experts=4, num_experts_per_tok=2, output_router_logits=False,
           pad_token_id=0, bos_token_id=1, eos_token_id=2)

# model_type -> (a checkpoint key of expert 3 in the published per-expert layout, its merged model key)
PUBLISHED = {
    "mixtral": ("model.layers.0.block_sparse_moe.experts.3.w1.weight", "model.layers.0.mlp.experts.gate_up_proj"),
    "qwen3_moe": ("model.layers.0.mlp.experts.3.gate_proj.weight", "model.layers.0.mlp.experts.gate_up_proj"),
}


def moe_config(model_type: str, **overrides):
    """A tiny MoE config: 4 layers, 4 experts, top-2, hidden 64 (the MOE sizes its config class knows)."""
    cls = transformers.CONFIG_MAPPING[model_type]
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    return cls(**{k: v for k, v in {**MOE, **overrides}.items() if k in known or k in overrides})


def saved_moe(folder, model_type: str, layout: str = "per_expert", **overrides) -> str:
    """A random tiny MoE saved by ``save_pretrained`` in ``layout``:

    ``per_expert``: the default, which reverts transformers' merged experts to the published layout;
    ``sharded``: the same in 40 kB shards, so one layer's experts lie in several files;
    ``merged``: ``save_original_format=False``, the model's own (merged) state dict names.
    """
    from safetensors import safe_open

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(moe_config(model_type, **overrides))
    model.save_pretrained(folder, save_original_format=layout != "merged",
                          **({"max_shard_size": "40kB"} if layout == "sharded" else {}))
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            keys |= set(f.keys())
    expert, merged = PUBLISHED[model_type]
    assert (expert in keys, merged in keys) == ((False, True) if layout == "merged" else (True, False))
    return str(folder)


def moe_run_config(folder: str, stages: int = 1):
    return load_config_dict({"model": {"name": folder, "pretrained": True}, "pipeline": {"stages": stages},
                             "data": {"seq_len": 16}, "train_micro_batch_size_per_gpu": 1})


@pytest.mark.parametrize("layout", ["per_expert", "sharded", "merged"])
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_moe_checkpoint_loads_per_stage_at_exact_parity(model_type, layout, tmp_path):
    """Loss, logits and every gradient (router and experts included) bit for bit, at 1 and 2 stages."""
    from hybrid_ds.runtime.parity import check_parity

    folder = saved_moe(tmp_path, model_type, layout)
    for stages in (1, 2):
        report = check_parity(moe_run_config(folder), stages)
        assert report.exact, "\n".join(report.lines())



@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "hrm_text", "lara_mini"])
def test_checkpoint_gives_each_tensor_as_from_pretrained_loads_it(model_type, tmp_path):
    """Every model tensor, read alone by its key, equals from_pretrained's: experts merged (mixtral, qwen3_moe),
    and fused checkpoint tensors split into several (hrm_text's gqkv_proj by Chunk, lara_mini's in_proj by Split);
    a tied head is the one tensor not stored."""
    from hybrid_ds.models.build import SafetensorsCheckpoint

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(moe_config(model_type, num_hidden_layers=2)).save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(loaded.config)
    checkpoint = SafetensorsCheckpoint(tmp_path, skeleton)
    tied = ({n for n, _ in loaded.named_parameters(remove_duplicate=False)} - {n for n, _ in loaded.named_parameters()})
    state = loaded.state_dict()
    assert {key for key in state if checkpoint.find(key) is None} == tied
    differ = [key for key in state if key not in tied and not torch.equal(checkpoint.tensor(key), state[key])]
    assert not differ, differ
    if model_type in ("hrm_text", "lara_mini"):  # the split path really ran
        assert any(source.target != key for key, source in checkpoint.sources.items())


def test_moe_parity_fails_when_experts_are_merged_in_the_wrong_order(tmp_path, monkeypatch):
    """Negative control: experts stacked 3, 2, 1, 0 instead of 0..3 (all else right) fail parity."""
    from hybrid_ds.models import build
    from hybrid_ds.runtime.parity import check_parity

    sources = build._sources

    def reversed_experts(*args):
        found = sources(*args)
        for source in {id(s): s for s in found.values()}.values():
            source.keys.reverse()  # each key keeps its pattern (w1 or w3): only the expert order changes
            source.patterns.reverse()
        return found

    monkeypatch.setattr(build, "_sources", reversed_experts)
    report = check_parity(moe_run_config(saved_moe(tmp_path, "mixtral")), stages=2)
    assert not report.ok and report.max_logit_diff > 1e-3, "\n".join(report.lines())


def _layers(keys: set[str]) -> set[int]:
    return {int(m.group(1)) for key in keys if (m := re.match(r"model\.layers\.(\d+)\.", key))}


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_moe_stage_reads_only_its_own_layers_experts(model_type, tmp_path, monkeypatch):
    """At pp=2 each stage's builder reads every expert of its own layers and no tensor of the other stage's."""
    from safetensors import safe_open

    from hybrid_ds.models.build import SafetensorsCheckpoint
    from hybrid_ds.runtime.pipeline import SequentialStages
    from hybrid_ds.runtime.plan import build_plan

    folder = saved_moe(tmp_path, model_type)
    plan = build_plan(moe_run_config(folder, stages=2), world_size=2)
    reads: dict[int, list[str]] = {}
    read = SafetensorsCheckpoint.read

    def recording_read(self, key):
        reads.setdefault(id(self), []).append(key)
        return read(self, key)

    monkeypatch.setattr(SafetensorsCheckpoint, "read", recording_read)
    stages = SequentialStages(plan)
    stage_reads = [reads[id(builder.checkpoint)] for builder in stages.builders]
    own = [{b for b in range(4) if f"block {b}" in s.layer_names} for s in plan.stage_plans]
    assert own[0] and own[1] and own[0].isdisjoint(own[1]) and own[0] | own[1] == set(range(4)), own
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        stored = set(f.keys())
    for stage in (0, 1):
        assert len(stage_reads[stage]) == len(set(stage_reads[stage]))  # each tensor read once
        assert _layers(set(stage_reads[stage])) == own[stage]
        layer_keys = {key for key in stored if _layers({key}) <= own[stage] and _layers({key})}
        assert layer_keys <= set(stage_reads[stage])  # every expert of its layers, one by one
    assert set(stage_reads[0]) | set(stage_reads[1]) == stored



def test_moe_checkpoint_missing_an_expert_is_one_clear_line(tmp_path):
    """A per-expert checkpoint lacking one expert's w3: the stage that needs it says which tensor, in one line."""
    from safetensors.torch import load_file, save_file

    from hybrid_ds.errors import UserError
    from hybrid_ds.runtime.pipeline import SequentialStages
    from hybrid_ds.runtime.plan import build_plan

    folder = saved_moe(tmp_path, "mixtral")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError) as err:
        SequentialStages(build_plan(moe_run_config(folder, stages=2), world_size=2))
    message = str(err.value)
    assert "\n" not in message and "into model.layers.1.mlp.experts.gate_up_proj failed per stage" in message, message


@pytest.mark.multiproc
@pytest.mark.parametrize("model_type", ["mixtral"])
def test_moe_pipeline_trains_at_two_stages_and_exports(model_type, tmp_path):
    """A per-expert checkpoint trained at pp=2 through the launcher with its router loss (the sums cross the stage
    boundary forward and backward; the loss falls), exported by the run: the folder is in the published
    per-expert layout, and from_pretrained computes the trained pipeline's logits."""
    import json

    from test_train_multiproc import checkpoint_logits, summary, tiny_config, train

    vocab = 50257  # the built-in corpus is tokenized with GPT-2's tokenizer
    folder = saved_moe(tmp_path / "moe", model_type, vocab_size=vocab, output_router_logits=True)
    config = tiny_config(tmp_path, folder, 2, eval_interval=0, export_hf=str(tmp_path / "hf"))
    raw = json.loads(config.read_text())
    raw["model"] = {"name": folder, "pretrained": True}
    config.write_text(json.dumps(raw))
    train(config)
    result = summary(config)
    assert result["last_loss"] < result["first_loss"] - 0.1, result["losses"]

    batch = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    pipeline_logits = checkpoint_logits(config, batch, tmp_path)
    expert_key, _ = PUBLISHED[model_type]
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        assert expert_key in f.keys()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    initial = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        to_trained = (exported(input_ids=batch).logits - pipeline_logits).abs().max().item()
        to_initial = (initial(input_ids=batch).logits - pipeline_logits).abs().max().item()
    assert to_trained <= 1e-5 and to_initial > 1e-2, (to_trained, to_initial)
