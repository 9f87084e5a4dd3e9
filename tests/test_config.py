"""Config files load, extend, take --set and validate strictly, and every mistake is one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_ds.cli import main
from hybrid_ds.config import DEEPSPEED_KEYS, load_config, load_config_dict
from hybrid_ds.config.deepspeed import effective_deepspeed_config
from hybrid_ds.config.topology import resolve_layout

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((ROOT / "configs").glob("*.json"))

TINY = {
    "model": {"name": "gpt2-tiny"},
    "data": {"seq_len": 64},
    "pipeline": {"stages": 2},
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 8,
}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def write(tmp_path: Path, data: dict | str, name: str = "run.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def effective(cfg, world: int | None = None) -> dict:
    """The effective DeepSpeed config of ``cfg`` on ``world`` GPUs (default: one per stage), for a model of 2 layers."""
    world = world or cfg.pipeline.stages
    micro = cfg.micro_batch or (None if cfg.train_batch else 1)
    layout = resolve_layout(world, cfg.pipeline.stages, 2, micro, cfg.grad_accum, cfg.train_batch)
    return effective_deepspeed_config(cfg, layout, "gpu")


def with_(base: dict, **sections) -> dict:
    """``base`` with some top-level keys replaced; a value of None deletes the key."""
    out = json.loads(json.dumps(base))
    for key, value in sections.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------ shipped configs


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path, capsys):
    from hybrid_ds.cli import machine_profile

    cfg = load_config(path, profile=machine_profile())  # the profile validate applies on this machine
    assert cfg.description, f"{path.name} needs a description naming the cluster it fits"
    rc, out, err = run_cli(capsys, "validate", str(path))
    assert rc == 0, err
    assert f"stages={cfg.pipeline.stages}" in out


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_accepts_our_deepspeed_section(path, monkeypatch):
    """DeepSpeed's own config parser takes what we pass through, batch numbers resolved."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    from hybrid_ds.runtime.plan import build_plan

    cfg = load_config(path)
    plan = build_plan(cfg)
    # Without a process group DeepSpeedConfig assumes a world of 1: give it one data-parallel rank's share.
    batch = {"train_batch_size": plan.layout.micro_batch * plan.layout.grad_accum,
             "train_micro_batch_size_per_gpu": plan.layout.micro_batch,
             "gradient_accumulation_steps": plan.layout.grad_accum}
    ds_cfg = DeepSpeedConfig({**effective_deepspeed_config(cfg, plan.layout, "gpu"), **batch})
    assert ds_cfg.zero_optimization_stage == plan.zero_stage  # what the engine runs at this layout
    assert ds_cfg.gradient_clipping == cfg.deepspeed.get("gradient_clipping", 0.0)
    assert ds_cfg.bfloat16_config.enabled == (cfg.precision == "bf16")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_deepspeeds_models_and_optimizers_accept_every_shipped_config(path):
    """What a run hands DeepSpeed from each shipped config, on either kind of machine (torch's fused AdamW on CPU,
    FusedAdam on a GPU), passes the check that refuses a misspelt DeepSpeed key (tests/test_bad_inputs.py)."""
    from hybrid_ds.config.deepspeed import deepspeed_sections
    from hybrid_ds.seam.config_check import check_deepspeed_sections, optimizer_class

    for profile, kind in (("cpu", "cpu"), ("gpu", "cuda")):
        ds = deepspeed_sections(load_config(path, profile=profile), kind)
        check_deepspeed_sections(ds)
        assert optimizer_class(ds)[0].__name__ == ("AdamW" if kind == "cpu" else "FusedAdam")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_can_be_run_twice(path, tmp_path):
    """Running a shipped config's command again continues its save_dir (train.resume "auto": resumes, or says the run
    is complete) instead of being refused for the checkpoints the first run left, and its export folder, an earlier
    export of the same run (a model's config.json or a LoRA adapter's adapter_config.json), may be written again."""
    from hybrid_ds.runtime.checkpoint.files import export_folder

    cfg = load_config(path)
    assert cfg.train.save_dir is None or cfg.train.resume == "auto", path.name
    earlier = tmp_path / "export"
    earlier.mkdir()
    (earlier / ("adapter_config.json" if cfg.model.lora else "config.json")).write_text("{}")
    (earlier / "tokenizer.json").write_text("{}")
    export_folder("train.export_hf", earlier)


@pytest.mark.parametrize("name, world", [("gpt.json", 2), ("gpt-zero2.json", 2), ("bert.json", 2),
                                         ("smollm2-lora.json", 2), ("smollm2-long.json", 3)])
def test_the_configs_make_train_runs_here_trigger_no_warning_of_their_own(name, world, capsys):
    """`make train` (CONFIG= these; smollm2-long.json with LAUNCH_FLAGS='--num_gpus 3', as its description says) on a
    CPU machine: their on_cpu profile gives no warning (a bubble of 20% was one)."""
    rc, out, _ = run_cli(capsys, "validate", str(ROOT / "configs" / name), "--profile", "cpu", "--world-size", str(world))
    assert rc == 0 and "warning" not in out, out


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_config_on_its_gpus_triggers_no_warning_of_its_own(path, capsys):
    """Each config at the world size its batch implies, on a GPU machine (on_gpu): no bubble, bf16-sum or schedule
    warning (gpt3-175b and llama2-70b at 1024 and 512 GPUs had a bubble of 39% and 32%)."""
    rc, out, _ = run_cli(capsys, "validate", str(path), "--profile", "gpu")
    assert rc == 0 and "warning" not in out, out


def test_validate_gpt_world_size_4(capsys):
    rc, out, _ = run_cli(capsys, "validate", str(ROOT / "configs/gpt.json"), "--world-size", "4", "--json",
                         "--profile", "gpu")
    assert rc == 0
    plan = json.loads(out)
    assert (plan["stages"], plan["dp"], plan["world_size"]) == (2, 2, 4)
    assert plan["train_batch"] == 4 * 8 * 2
    blocks = [sum(name.startswith("block") for name in s["layers"]) for s in plan["stage_plan"]]
    # partition "flops": the head's 2 x 50257 x 768 FLOPs per token weigh ~4 blocks at seq_len 1024
    assert blocks == [8, 4], blocks
    rc, out, _ = run_cli(capsys, "validate", str(ROOT / "configs/gpt.json"), "--world-size", "4")
    assert "stages=2 x dp=2" in out


def test_validate_applies_the_profile_train_would_on_this_machine(capsys, monkeypatch):
    """validate merges the on_cpu or on_gpu section as train does on this machine (here: no GPU), and --profile
    picks the other."""
    import hybrid_ds.cli

    gpt = str(ROOT / "configs/gpt.json")
    for machine, precision, seq_len in (("cpu", "fp32", 128), ("gpu", "bf16", 1024)):
        monkeypatch.setattr(hybrid_ds.cli, "machine_profile", lambda machine=machine: machine)
        rc, out, _ = run_cli(capsys, "validate", gpt)
        assert rc == 0 and f"configs/gpt.json with on_{machine}" in out and f"; {precision}; " in out
        assert f"at seq_len {seq_len}" in out
    other = run_cli(capsys, "validate", gpt, "--profile", "cpu")[1]
    assert "with on_cpu" in other and "at seq_len 128" in other


def test_validate_loads_no_weights(tmp_path):
    """Validate the 70B preset in a subprocess: it must stay far below the 138 GB of its fp16 weights."""
    code = ("import resource, sys; from hybrid_ds.cli import main; "
            "rc = main(['validate', sys.argv[1]]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs/llama2-70b.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip().splitlines()[-1]) < 2000  # MiB of peak RSS


# ------------------------------------------------------------------ extends and --set


def test_extends_merges_and_set_overrides(tmp_path):
    write(tmp_path, {"model": {"name": "gpt2-tiny", "overrides": {"n_layer": 4}},
                     "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1, "overlap_comm": True}},
          "base.json")
    child = write(tmp_path, {"extends": "base.json", "pipeline": {"stages": 2},
                             "zero_optimization": {"stage": 0}})
    cfg = load_config(child, ["pipeline.partition=[1, 3]", "train.max_steps=7", "model.name=llama-tiny"])
    assert cfg.model.name == "llama-tiny" and cfg.model.overrides == {"n_layer": 4}
    assert cfg.deepspeed["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    assert cfg.pipeline.partition == [1, 3] and cfg.train.max_steps == 7
    again = load_config_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_set_keeps_strings_that_are_not_json():
    cfg = load_config_dict(TINY, ["model.name=llama-tiny", "data.tokenizer=gpt2", "train.save_dir=out/run",
                                  "train.export_hf=out/hf"])
    assert (cfg.model.name, cfg.data.tokenizer, cfg.train.export_hf) == ("llama-tiny", "gpt2", "out/hf")


def test_deepspeed_section_passes_through_unchanged():
    raw = with_(TINY, optimizer={"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}},
                wall_clock_breakdown=True, csv_monitor={"enabled": True, "output_path": "logs"})
    ds = effective(load_config_dict(raw))
    for key in ("optimizer", "wall_clock_breakdown", "csv_monitor", "train_micro_batch_size_per_gpu"):
        assert ds[key] == raw[key]
    assert not {"model", "data", "train"} & set(ds)
    assert set(ds["pipeline"]) == {"pipe_partitioned", "grad_partitioned", "activation_checkpoint_interval"}
    assert set(ds) <= DEEPSPEED_KEYS


def test_config_module_imports_no_torch():
    code = ("import sys, hybrid_ds.config, hybrid_ds.config.topology, hybrid_ds.config.presets; "
            "heavy = {'torch', 'deepspeed', 'transformers'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ mistakes: one line, exit 2

# Every mistake and its exact line: tests/test_bad_inputs.py.


def test_warns_about_a_large_bubble(tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "validate", write(tmp_path, with_(TINY, gradient_accumulation_steps=2)))
    assert rc == 0 and "warning: gradient_accumulation_steps=2 is below 4 x stages=8" in out
    assert "33.3%" in out  # (p-1)/(m+p-1) = 1/3


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_the_learning_rate_schedule_follows_train_max_steps(profile):
    """The shipped configs leave the scheduler's length to train.max_steps: `--set train.max_steps=4` gives a schedule
    that DeepSpeed builds 4 steps long (warm-up, then down to its end at step 4), on either profile."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    cfg = load_config(ROOT / "configs" / "gpt.json", ["train.max_steps=4"], profile=profile)
    scheduler = effective(cfg)["scheduler"]
    assert scheduler["params"]["total_num_steps"] == 4
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    params = {**scheduler["params"], "warmup_num_steps": 2}  # the GPU profile's 100-step warm-up, shortened
    lrs = []
    schedule = WarmupCosineLR(optimizer, **params)
    for _ in range(5):
        lrs.append(schedule.get_lr()[0])
        schedule.step()
    # the peak after warm-up, the floor (cos_min_ratio, 1e-4 of the peak) at step 4
    assert lrs[2] == max(lrs) == 1.0 and lrs[4] == pytest.approx(1e-4), lrs


@pytest.mark.parametrize("scheduler", [{"type": "WarmupDecayLR", "params": {"warmup_num_steps": 1}},
                                       {"type": "CosineAnnealingLR", "params": {}},
                                       {"type": "OneCycleLR", "params": {"max_lr": 0.1}}])
def test_a_scheduler_without_its_length_gets_train_max_steps(scheduler):
    cfg = load_config_dict(with_(TINY, train={"max_steps": 7}, scheduler=scheduler))
    key = {"WarmupDecayLR": "total_num_steps", "CosineAnnealingLR": "T_max", "OneCycleLR": "total_steps"}
    assert effective(cfg)["scheduler"]["params"] == {**scheduler["params"], key[scheduler["type"]]: 7}
    assert cfg.deepspeed["scheduler"] == scheduler  # the config as written is left alone


def test_a_schedule_length_other_than_train_max_steps_is_kept_and_warned_about(tmp_path, capsys):
    scheduler = {"type": "WarmupCosineLR", "params": {"total_num_steps": 2000, "warmup_num_steps": 2}}
    path = write(tmp_path, with_(TINY, train={"max_steps": 12}, scheduler=scheduler))
    rc, out, _ = run_cli(capsys, "validate", path)
    assert rc == 0 and ("warning: scheduler.params.total_num_steps: 2000, while train.max_steps is 12: the "
                        "learning-rate schedule is cut off where the run ends; leave total_num_steps out to have it "
                        "follow train.max_steps") in out
    assert effective(load_config(path))["scheduler"] == scheduler
    rc, out, _ = run_cli(capsys, "validate", path, "--set", "train.max_steps=2000")
    assert rc == 0 and "scheduler.params" not in out


def test_console_script_error_has_no_traceback(tmp_path):
    path = write(tmp_path, with_(TINY, pipeline={"stages": "two"}))
    proc = subprocess.run([sys.executable, "-m", "hybrid_ds.cli", "validate", path],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_overrides_rebuild_the_fields_derived_from_them(tmp_path):
    """Overriding hidden_size re-derives llama's head_dim (hidden / heads) unless head_dim is given, for a
    preset and for a folder whose config.json does not state head_dim."""
    from hybrid_ds.config import ModelConfig
    from hybrid_ds.models.resolve import resolve_model

    config = resolve_model(ModelConfig(name="llama-tiny", overrides={"hidden_size": 256})).hf_config
    assert (config.hidden_size, config.head_dim) == (256, 64)
    config = resolve_model(ModelConfig(name="llama-tiny", overrides={"hidden_size": 256, "head_dim": 32})).hf_config
    assert config.head_dim == 32
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                                    "num_hidden_layers": 2, "intermediate_size": 128,
                                                    "vocab_size": 100}))
    config = resolve_model(ModelConfig(name=str(folder), overrides={"hidden_size": 128})).hf_config
    assert (config.hidden_size, config.head_dim, config.num_hidden_layers) == (128, 32, 2)


def test_cpu_runs_use_torch_fused_adamw_unless_told_otherwise():
    """On CPU, Adam/AdamW become torch's fused AdamW (no JIT-compiled DeepSpeed op, one pass per step)."""
    import torch

    from hybrid_ds.runtime.engine import deepspeed_config
    from hybrid_ds.runtime.plan import build_plan

    cfg = load_config_dict({**TINY, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    params = deepspeed_config(build_plan(cfg, 2))["optimizer"]["params"]
    assert params == {"lr": 1e-3, "torch_adam": True, "fused": True}
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, fused=True)   # CPU has the kernel
    cfg = load_config_dict({**TINY, "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "fused": False}}})
    assert deepspeed_config(build_plan(cfg, 2))["optimizer"]["params"]["fused"] is False


def test_zero1_at_dp1_runs_as_zero0_and_zero1_buckets_are_sized_to_the_model():
    """fp32 ZeRO-1/2 at dp=1 on the pipeline engine runs as ZeRO-0 (said in one line); at dp=2 ZeRO-1 keeps its
    stage, its buckets the largest stage's parameter count instead of 5e8 unless the config sets them; bf16 and
    the plain engine keep their stage at dp=1."""
    from hybrid_ds.runtime.engine import deepspeed_config
    from hybrid_ds.runtime.plan import build_plan

    def zero_of(world: int, **changes):
        plan = build_plan(load_config_dict({**TINY, "zero_optimization": {"stage": 1}, **changes}), world)
        return deepspeed_config(plan)["zero_optimization"], plan

    zero, plan = zero_of(2)
    assert zero == {"stage": 0} and plan.zero_stage == 0
    assert plan.zero_note == "ZeRO-1 at dp=1 runs as ZeRO-0: same maths, no gradient copies"
    zero, plan = zero_of(4)
    largest = max(s.params for s in plan.stage_plans)
    assert zero == {"stage": 1, "reduce_bucket_size": largest, "allgather_bucket_size": largest} and largest < 5e8
    assert plan.zero_note is None
    zero, _ = zero_of(4, zero_optimization={"stage": 1, "reduce_bucket_size": 1000})
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (1000, largest)  # the user's value wins
    assert zero_of(2, bf16={"enabled": True})[0]["stage"] == 1
    assert zero_of(1, pipeline={"stages": 1}, zero_optimization={"stage": 2})[0]["stage"] == 2  # the plain engine
    assert zero_of(2, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})[0]["stage"] == 2


def test_cuda_arch_list_is_made_parsable_for_deepspeed(monkeypatch):
    """CUDA images set TORCH_CUDA_ARCH_LIST="9.0a"; DeepSpeed 0.19's JIT builder (FusedAdam at the first
    GPU step) crashes on it, so the GPU path rewrites it for the process (seen on an H200 image)."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    from hybrid_ds.seam.environment import arch_list_deepspeed_can_parse

    builder = FusedAdamBuilder()
    builder.jit_mode = True
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0a;10.0a+PTX")
    with pytest.raises(ValueError, match="invalid literal"):
        builder.compute_capability_args()
    arch_list_deepspeed_can_parse()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0 9.0;10.0+PTX"
    builder.compute_capability_args()   # DeepSpeed parses it now
    assert "9.0" in os.environ["TORCH_CUDA_ARCH_LIST"]


def test_a_mistake_met_by_one_rank_only_is_still_reported(tmp_path):
    """A rank other than the node's first prints too, after a pause in which the launcher would have
    ended it had the first rank met the same mistake (that case prints one line: test_train_multiproc)."""
    env = {**os.environ, "LOCAL_RANK": "1"}
    proc = subprocess.run([sys.executable, "-m", "hybrid_ds.cli", "validate", str(tmp_path / "missing.json")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("hybrid-ds: error:")] == [
        f"hybrid-ds: error: {tmp_path / 'missing.json'}: config file not found"], proc.stderr


def test_the_estimators_zero_defaults_are_deepspeeds():
    """ZeroSettings' defaults (what the estimator assumes where a config sets nothing) are DeepSpeed's own."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from hybrid_ds.config.deepspeed import DEEPSPEED_REDUCE_BUCKET, ZeroSettings, zero_settings

    ours, theirs = ZeroSettings(), DeepSpeedZeroConfig()
    assert theirs.reduce_bucket_size == DEEPSPEED_REDUCE_BUCKET
    assert ours.contiguous_gradients == theirs.contiguous_gradients
    assert ours.persistence_threshold == theirs.param_persistence_threshold
    assert ours.prefetch_bucket == theirs.prefetch_bucket_size
    for stage in (1, 2, 3):
        assert zero_settings({"zero_optimization": {"stage": stage}}).overlap_comm == \
            DeepSpeedZeroConfig(stage=stage).overlap_comm


def test_the_estimator_counts_the_chunk_the_engine_sums_a_tied_weight_in():
    from hybrid_ds.estimate import model_state
    from hybrid_ds.seam import engines

    assert model_state.TIED_SUM_CHUNK == engines.TIED_SUM_CHUNK
    gemma_embedding = 256_000 * 2304  # 2.4 GB in fp32 summed at once; one chunk's 64 MB instead
    state = model_state.model_state(2_000_000_000, dp=64, zero=2, precision="bf16", tied=gemma_embedding)
    assert state.transient == 4 * engines.TIED_SUM_CHUNK


def test_the_engine_and_the_estimator_read_one_effective_config():
    """What the engine hands DeepSpeed and what the estimator assumes come from effective_deepspeed_config: the ZeRO
    stage a layout runs (ZeRO-1 at dp=1 as ZeRO-0), a bucket the config sets, overlap_comm."""
    from hybrid_ds.estimate.run import run_from_config
    from hybrid_ds.runtime.engine import deepspeed_config
    from hybrid_ds.runtime.plan import build_plan

    for world, zero, expect in ((1, {"stage": 1}, 0), (2, {"stage": 1, "reduce_bucket_size": 1000}, 1),
                                (2, {"stage": 3, "overlap_comm": False}, 3)):
        cfg = load_config_dict({**TINY, "pipeline": {"stages": 1}, "zero_optimization": zero})
        engine = deepspeed_config(build_plan(cfg, world))["zero_optimization"]
        run = run_from_config(cfg, world)
        assert engine["stage"] == run.zero == expect
        assert run.reduce_bucket == zero.get("reduce_bucket_size", 0)
        assert run.overlap_comm == engine.get("overlap_comm", expect == 3)


def test_the_readme_example_config_copied_into_a_file_validates_comments_and_all(tmp_path, capsys):
    """README's "One config file" example (a JSON file with // comments) beside a copy of configs/base/, as a user
    would save it next to the shipped configs: it loads and validates at the world size its 2 stages need."""
    import shutil

    readme = (ROOT / "README.md").read_text()
    example = readme.split("## One config file", 1)[1].split("```jsonc\n", 1)[1].split("```", 1)[0]
    assert "//" in example
    shutil.copytree(ROOT / "configs" / "base", tmp_path / "base")
    (tmp_path / "mine.json").write_text(example)
    rc, out, err = run_cli(capsys, "validate", str(tmp_path / "mine.json"), "--world-size", "2", "--profile", "gpu")
    assert rc == 0, err
    assert "model      gpt2: gpt2 causal_lm, 6 layers" in out and "stages=2" in out, out


def test_docs_config_md_is_the_reference_the_schema_makes():
    """docs/config.md is generated (python -m hybrid_ds.config.reference > docs/config.md): a key added to the schema,
    or a changed default or description, without regenerating it fails here. Every field of every section is in it,
    and every DeepSpeed key it describes is one DeepSpeed reads."""
    from hybrid_ds.config.deepspeed import DEEPSPEED_KEYS
    from hybrid_ds.config.reference import DEEPSPEED_HANDLED, reference_markdown
    from hybrid_ds.config.schema import _SECTIONS, LoraConfig

    text = (ROOT / "docs" / "config.md").read_text()
    assert text == reference_markdown(), "docs/config.md is stale: python -m hybrid_ds.config.reference > docs/config.md"
    sections = [(name, model) for name, model in _SECTIONS.items()] + [("model.lora", LoraConfig)]
    for prefix, model in sections:
        for field in model.model_fields:
            assert f"| `{prefix}.{field}` |" in text, (prefix, field)
    assert set(DEEPSPEED_HANDLED) <= DEEPSPEED_KEYS, set(DEEPSPEED_HANDLED) - DEEPSPEED_KEYS
    assert "| `data.seq_len` | int | `1024` | tokens per training sequence |" in text


def test_validate_on_a_cpu_machine_prints_no_deepspeed_chatter():
    """Without DS_ACCELERATOR, DeepSpeed's import warns "Setting accelerator to CPU ..." on a machine without a GPU;
    the CLI drops that line (hybrid_ds.runtime.quiet) unless HYBRID_DS_VERBOSE is set."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "HYBRID_DS_VERBOSE")}
    proc = subprocess.run([sys.executable, "-m", "hybrid_ds.cli", "validate", str(ROOT / "configs/gpt.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("config     "), proc.stderr[-2000:]
    assert "Setting accelerator" not in proc.stderr and "[WARNING]" not in proc.stderr, proc.stderr[-2000:]
