"""The family table describes every named family, and the estimator counts every model the adapter accepts as
the meta model does.

The structure read for every model the generic adapter accepts in tests/test_generic_adapter.py gives
exactly the parameters the pipeline's plan counts on the meta device: per layer, per stage, in total, with
the real block class names that ``type:REGEX`` partitions match (the named families' shape builders are
held to the same in tests/test_estimate.py). ``compare``, ``plan`` and ``train --dry-run`` then work on such a model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import warm_ranks

from hybrid_ds.config import presets
from hybrid_ds.config import ModelConfig, load_config_dict
from hybrid_ds.errors import UserError  # noqa: E402
from hybrid_ds.config.families import FAMILIES, TASKS

ROOT = Path(__file__).resolve().parents[1]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hybrid_ds.models.resolve import count_params, meta_model, pipeline_layers, resolve_model, stage_params  # noqa: E402
from hybrid_ds.models.shape import model_arch  # noqa: E402
from test_generic_adapter import ACCEPTED, ATTENTION, saved, tiny_config  # noqa: E402


def assert_counts_match(model: ModelConfig) -> None:
    resolved = resolve_model(model)
    skeleton = meta_model(resolved)
    arch = model_arch(model)
    layers = pipeline_layers(skeleton, resolved.family)
    assert arch.layer_params() == [layer.params for layer in layers]
    assert arch.layer_classes() == [layer.class_name for layer in layers]
    assert arch.params == count_params(skeleton)
    n = arch.layers + 2
    for bounds in ([0, n], [0, 2, n], [0, 1, n - 1, n]):
        assert arch.stage_params(bounds) == stage_params(skeleton, resolved.family, bounds), bounds


@pytest.mark.parametrize("model_type", sorted(ACCEPTED))
def test_generic_model_counts_match_the_meta_model(model_type, tmp_path):
    folder = saved(tmp_path, tiny_config(model_type, **ACCEPTED[model_type]))
    model = ModelConfig(name=folder, pretrained=True, attn_implementation=ATTENTION.get(model_type, "sdpa"))
    if model_type in NO_ESTIMATE:
        with pytest.raises(UserError, match=NO_ESTIMATE[model_type]):
            assert_counts_match(model)
        return
    assert_counts_match(model)


# The generic adapter trains these, the estimator does not model their blocks: one line says so.
NO_ESTIMATE = {"mamba2": "the estimator models attention blocks and mamba2 has no num_attention_heads"}


def test_table_entries_are_what_transformers_builds():
    """Task, auto class, block class and config keys of each entry, against the classes transformers has."""
    for model_type, family in FAMILIES.items():
        config = transformers.CONFIG_MAPPING[model_type]()
        auto = getattr(transformers, TASKS[family.task].auto_class)
        assert type(config) in auto._model_mapping, model_type
        model_class = auto._model_mapping[type(config)]
        module = sys.modules[model_class.__module__]
        assert isinstance(getattr(module, family.block_class, None), type), (model_type, family.block_class)
        for key in family.keys:
            assert hasattr(config, key), (model_type, key)


def hybrid_ds(*argv: str, **env: str) -> warm_ranks.Done:
    """``python -m hybrid_ds.cli ARGV`` in a process of its own (forked warm: tests/warm_ranks.py)."""
    return warm_ranks.cli(*argv, env=env)


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("qwen3")
    return saved(folder, tiny_config("qwen3", **ACCEPTED["qwen3"]))


def test_compare_plan_and_dry_run_work_on_a_generic_model(qwen3_folder, tmp_path):
    """Before the family table these exited 2 ("no parameter formulas for model_type 'qwen3'")."""
    exact = count_params(meta_model(resolve_model(ModelConfig(name=qwen3_folder, pretrained=True))))
    proc = hybrid_ds("compare", qwen3_folder, "--gpus", "2", "--stages", "2", "--seq-len", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    assert f'"params": {exact},' in proc.stdout and '"valid": true' in proc.stdout
    proc = hybrid_ds("plan", qwen3_folder, "--gpus", "2", "--seq-len", "64", "--global-batch", "8")
    assert proc.returncode == 0 and "layouts fit" in proc.stdout, proc.stderr
    config = tmp_path / "qwen3.json"
    config.write_text('{"model": {"name": "%s", "pretrained": true}, "pipeline": {"stages": 2, "partition": '
                      '"type:DecoderLayer"}, "data": {"seq_len": 64}, "train_micro_batch_size_per_gpu": 1}' % qwen3_folder)
    proc = hybrid_ds("train", "--config", str(config), "--dry-run", WORLD_SIZE="2")
    assert proc.returncode == 0, proc.stderr
    assert "boundaries [0, 3, 6]" in proc.stdout and "estimate" in proc.stdout


def test_type_partitions_use_the_real_class_names(qwen3_folder):
    """``type:REGEX`` partitions the estimator computes are the plan's (qwen3: 4 Qwen3DecoderLayer blocks)."""
    from hybrid_ds.estimate.run import partition, run_from_config
    from hybrid_ds.runtime.plan import build_plan

    for method in ("type:DecoderLayer", "type:Qwen3", "flops", "parameters"):
        cfg = load_config_dict({"model": {"name": qwen3_folder, "pretrained": True}, "data": {"seq_len": 64},
                                "pipeline": {"stages": 2, "partition": method}, "train_micro_batch_size_per_gpu": 1})
        plan = build_plan(cfg, 2)
        assert partition(run_from_config(cfg, 2, model_arch(cfg.model))) == plan.boundaries, method
    cfg = load_config_dict({"model": {"name": "gpt2-tiny"}, "pipeline": {"stages": 2, "partition": "type:GPT2Block"},
                            "train_micro_batch_size_per_gpu": 1, "data": {"seq_len": 64}})
    assert partition(run_from_config(cfg, 2)) == build_plan(cfg, 2).boundaries == [0, 2, 4]


def test_every_named_family_has_a_tiny_preset_and_a_parity_test():
    from test_parity import FAMILIES as PARITY_TESTED

    tiny = {presets.PRESETS[name].model_type for name in PARITY_TESTED}
    assert tiny == set(FAMILIES) and all(presets.PRESETS[name].published_params is None for name in PARITY_TESTED)


@pytest.mark.parametrize("model_type", sorted(ACCEPTED))
def test_compare_and_dry_run_count_every_generic_model_exactly(model_type, tmp_path, capsys, monkeypatch):
    """In process, for each model the generic adapter accepts: compare's JSON and --dry-run's plan and
    estimate carry the meta-device parameter count."""
    import json

    from hybrid_ds.cli import main

    if model_type in NO_ESTIMATE:
        pytest.skip(f"{model_type}: {NO_ESTIMATE[model_type]} (test_generic_model_counts_match_the_meta_model)")
    folder = saved(tmp_path / "model", tiny_config(model_type, **ACCEPTED[model_type]))
    exact = count_params(meta_model(resolve_model(ModelConfig(name=folder, pretrained=True))))
    assert main(["compare", folder, "--gpus", "2", "--stages", "2", "--seq-len", "32", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["valid"] and entry["estimate"]["params"] == exact, entry.get("reason")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": {"name": folder, "pretrained": True}, "pipeline": {"stages": 2},
                                  "data": {"seq_len": 32}, "train_micro_batch_size_per_gpu": 1}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{exact / 1e3:.1f}K parameters" in out or f"{exact / 1e6:.1f}M parameters" in out, out
