"""hybrid_ds/seam/__init__.py: each DeepSpeed internal we rely on is checked, and its absence is one clear line.

Every item is checked twice: with the installed DeepSpeed the check passes, and with the internal taken
away (monkeypatch: deleted, or its caller no longer calling it) the seam raises ``IncompatibleDeepSpeed``.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.topology import PipelineParallelGrid

from hybrid_ds import seam as seam
from hybrid_ds.errors import IncompatibleDeepSpeed, UserError

ROOT = Path(__file__).resolve().parents[1]


def expect_missing(internal: str, check, *args):
    """``check(*args)`` raises the seam's one-line error naming ``internal`` and both DeepSpeed versions."""
    with pytest.raises(IncompatibleDeepSpeed) as info:
        check(*args)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"hybrid_ds needs DeepSpeed {seam.WRITTEN_FOR}'s {internal}"), message
    assert f"(found DeepSpeed {deepspeed.__version__} without it)" in message
    assert isinstance(info.value, UserError)  # the CLI prints it as one line, exit code 2


def test_written_for_the_pinned_deepspeed():
    pin = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"deepspeed' in line)
    assert f">={seam.WRITTEN_FOR}," in pin


# ---------------------------------------------------------------- 1. global gradient clipping


def _take_model_step_clipping_elsewhere(self, lr_kwargs):
    self.optimizer.step()


def _exec_optimizer_step_without_take_model_step(self, lr_kwargs=None):
    self.optimizer.step()


def _index_tied_modules_without_ranks(self):
    return {}


CLIP_INTERNALS = {  # what a refactor could take away -> the internal the error names
    "clip_fp32_gradients": (lambda mp: mp.delattr(DeepSpeedEngine, "clip_fp32_gradients"),
                            "PipelineEngine.clip_fp32_gradients"),
    "_take_model_step": (lambda mp: mp.setattr(DeepSpeedEngine, "_take_model_step",
                                               _take_model_step_clipping_elsewhere),
                         "PipelineEngine._take_model_step calling clip_fp32_gradients"),
    "_exec_optimizer_step": (lambda mp: mp.setattr(PipelineEngine, "_exec_optimizer_step",
                                                   _exec_optimizer_step_without_take_model_step),
                             "PipelineEngine._exec_optimizer_step calling _take_model_step"),
    "tied_comms": (lambda mp: mp.setattr(PipelineModule, "_index_tied_modules", _index_tied_modules_without_ranks),
                   "PipelineModule.tied_modules and tied_comms"),
    "grid": (lambda mp: mp.delattr(PipelineParallelGrid, "get_pipe_parallel_group"),
             "PipelineEngine.grid.get_pipe_parallel_group"),
}


def test_clip_check_passes_with_this_deepspeed():
    seam.check_clip_fp32_gradients()


@pytest.mark.parametrize("taken", sorted(CLIP_INTERNALS))
def test_clip_replacement_refuses_without_its_internals(taken, monkeypatch):
    take_away, internal = CLIP_INTERNALS[taken]
    take_away(monkeypatch)
    engine = types.SimpleNamespace()
    expect_missing(internal, seam.use_global_clip_norm, engine)
    assert not hasattr(engine, "clip_fp32_gradients"), "checked before anything was replaced"


# ---------------------------------------------------------------- 2. our stage boundaries


def _init_without_partition_layers(self, layers, **kwargs):
    torch.nn.Module.__init__(self)


def _stage_owner_without_parts(self, layer_idx):
    return 0


PARTITION_INTERNALS = {
    "_partition_layers": (lambda mp: mp.delattr(PipelineModule, "_partition_layers"),
                          "PipelineModule._partition_layers"),
    "__init__": (lambda mp: mp.setattr(PipelineModule, "__init__", _init_without_partition_layers),
                 "PipelineModule._partition_layers, called by __init__"),
    "_set_bounds": (lambda mp: mp.delattr(PipelineModule, "_set_bounds"), "PipelineModule._set_bounds"),
    "parts": (lambda mp: mp.setattr(PipelineModule, "stage_owner", _stage_owner_without_parts),
              "PipelineModule.parts, read by stage_owner"),
}


def test_partition_check_passes_with_this_deepspeed():
    seam.check_partition_override()


@pytest.mark.parametrize("taken", sorted(PARTITION_INTERNALS))
def test_partition_override_refuses_without_its_internals(taken, monkeypatch):
    take_away, internal = PARTITION_INTERNALS[taken]
    take_away(monkeypatch)
    expect_missing(internal, seam.HybridPipelineModule, [torch.nn.Identity()], [0, 1])


BUILD_A_MODULE = textwrap.dedent("""
    import sys
    import torch
    from deepspeed.pipe import LayerSpec, PipelineModule
    from hybrid_ds.seam import HybridPipelineModule
    from hybrid_ds.runtime.engine import init_distributed
    from hybrid_ds.errors import IncompatibleDeepSpeed

    init_distributed()
    specs = [LayerSpec(torch.nn.Linear, 2, 2) for _ in range(4)]
    module = HybridPipelineModule(specs, parts=[1, 3], num_stages=1)  # DeepSpeed's own split: [0, 4]
    print("built", module._local_start, module._local_stop, len(module.forward_funcs))
    if sys.argv[1] == "ignore_bounds":  # a DeepSpeed that no longer builds the slice _set_bounds gives
        PipelineModule._set_bounds = lambda self, start=None, stop=None: None
        try:
            HybridPipelineModule(specs, parts=[1, 3], num_stages=1)
        except IncompatibleDeepSpeed as err:
            print("refused", err)
""")


@pytest.mark.parametrize("case", ["real", "ignore_bounds"])
def test_pipeline_module_builds_the_stage_it_is_given(case):
    """In a process of its own (DeepSpeed's process group): the stage holds specs 1:3, not DeepSpeed's 0:4."""
    with socket.socket() as sock:  # a free port: other runs may hold DeepSpeed's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WORLD_SIZE": "1", "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, "-c", BUILD_A_MODULE, case], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built 1 3 2" in proc.stdout
    if case == "ignore_bounds":
        refusal = next(line for line in proc.stdout.splitlines() if line.startswith("refused "))
        assert refusal.startswith("refused hybrid_ds needs DeepSpeed 0.19.8's PipelineModule._local_start")


# ---------------------------------------------------------------- 3. no shared-memory comm op on CPU


def test_shm_comm_op_is_disabled(monkeypatch):
    import deepspeed.ops

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    seam.disable_shm_comm_op()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def _build_shm_op_elsewhere():
    return None


@pytest.mark.parametrize("taken", ["key", "reader"])
def test_shm_comm_op_refuses_without_its_internals(taken, monkeypatch):
    import importlib

    import deepspeed.ops

    if taken == "key":
        monkeypatch.delitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm")
    else:  # (the attribute deepspeed.comm.torch is the torch package, not the module)
        monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", _build_shm_op_elsewhere)
    expect_missing("deepspeed.ops.__compatible_ops__['deepspeed_shm_comm']", seam.disable_shm_comm_op)


# ---------------------------------------------------------------- 4. per-layer checkpoint file names


def test_layer_checkpoint_file_is_deepspeeds_name(tmp_path):
    assert seam.layer_checkpoint_file(tmp_path, 3) == tmp_path / "layer_03-model_states.pt"
    assert seam.layer_checkpoint_file(str(tmp_path), 12).name == "layer_12-model_states.pt"


def _ckpt_layer_path_renamed_attributes(self, ckpt_dir, local_layer_idx):
    return f"{ckpt_dir}/layer_{local_layer_idx + self._local_begin:02d}-model_states.pt"


@pytest.mark.parametrize("taken", ["method", "attributes"])
def test_layer_checkpoint_file_refuses_without_ckpt_layer_path(taken, monkeypatch, tmp_path):
    if taken == "method":
        monkeypatch.delattr(PipelineModule, "ckpt_layer_path")
    else:
        monkeypatch.setattr(PipelineModule, "ckpt_layer_path", _ckpt_layer_path_renamed_attributes)
    expect_missing("PipelineModule.ckpt_layer_path", seam.layer_checkpoint_file, tmp_path, 0)


# ---------------------------------------------------------------- 5. pipeline instruction map (bench)


def test_instruction_map_is_wrapped_per_engine():
    engine = PipelineEngine.__new__(PipelineEngine)  # not initialized: only its class matters here
    class_map = dict(PipelineEngine._INSTRUCTION_MAP)
    assert seam.wrap_pipeline_instructions(engine, lambda kind, fn: (kind, fn))
    assert engine._INSTRUCTION_MAP == {kind: (kind, fn) for kind, fn in class_map.items()}
    assert PipelineEngine._INSTRUCTION_MAP == class_map
    assert not seam.wrap_pipeline_instructions(types.SimpleNamespace(), lambda kind, fn: None)


def _exec_schedule_without_map(self, pipe_schedule):
    for step_cmds in pipe_schedule:
        for cmd in step_cmds:
            getattr(self, f"_exec_{type(cmd).__name__.lower()}")(**cmd.kwargs)


@pytest.mark.parametrize("taken", ["map", "reader"])
def test_instruction_map_refuses_without_its_internals(taken, monkeypatch):
    if taken == "map":
        monkeypatch.delattr(PipelineEngine, "_INSTRUCTION_MAP")
    else:
        monkeypatch.setattr(PipelineEngine, "_exec_schedule", _exec_schedule_without_map)
    engine = PipelineEngine.__new__(PipelineEngine)
    expect_missing("PipelineEngine._INSTRUCTION_MAP", seam.wrap_pipeline_instructions, engine, lambda k, f: f)


# ---------------------------------------------------------------- 6. DeepSpeed's global mpu (bench)


def test_pipeline_grid_is_forgotten(monkeypatch):
    from deepspeed.utils import groups

    monkeypatch.setattr(groups, "mpu", object())
    seam.forget_pipeline_grid()
    assert groups.mpu is None


def test_forget_pipeline_grid_refuses_without_groups_mpu(monkeypatch):
    from deepspeed.utils import groups

    monkeypatch.delattr(groups, "mpu")
    expect_missing("deepspeed.utils.groups.mpu", seam.forget_pipeline_grid)


# ---------------------------------------------------------------- 7. ZeRO reduce buckets (bench)


def test_reduce_bucket_tensors():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer, IPGBucket

    zero = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)  # not initialized: only its buckets matter
    tensor = torch.zeros(4)
    zero.ipg_buckets = {torch.float32: IPGBucket(buffer=[tensor])}
    assert seam.reduce_bucket_tensors(zero) == [tensor]
    assert seam.reduce_bucket_tensors(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)) == []


@pytest.mark.parametrize("taken", ["ipg_buckets", "buffer"])
def test_reduce_bucket_tensors_refuses_without_ipg_buckets(taken):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)
    if taken == "buffer":
        zero.ipg_buckets = {torch.float32: types.SimpleNamespace(buffers=[])}
    expect_missing("DeepSpeedZeroOptimizer.ipg_buckets", seam.reduce_bucket_tensors, zero)


# ---------------------------------------------------------------- 8. ZeRO-2 with pipeline stages


def _zero_optimizer():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    return DeepSpeedZeroOptimizer


ZERO2_INTERNALS = {
    "assert": (lambda mp: mp.setattr(PipelineEngine, "__init__", _init_without_partition_layers),
               "PipelineEngine.__init__'s single zero_optimization_stage() check"),
    "initialize": (lambda mp: mp.setattr(deepspeed, "PipelineEngine", DeepSpeedEngine),
                   "deepspeed.initialize building deepspeed.PipelineEngine"),
    "instruction": (lambda mp: mp.setattr(PipelineEngine, "_INSTRUCTION_MAP", {}),
                    "PipelineEngine._exec_backward_pass, _exec_reduce_tied_grads, _exec_reduce_grads"),
    "finalize": (lambda mp: mp.delattr(_zero_optimizer(), "finalize_gradient_accumulation_boundary"),
                 "DeepSpeedZeroOptimizer.overlapping_partition_gradients_reduce_epilogue"),
    "ready_for_gradients": (lambda mp: mp.setattr(_zero_optimizer(), "setup_buckets", lambda self: None),
                            "DeepSpeedZeroOptimizer.overlapping_partition_gradients_reduce_epilogue"),
    "compact": (lambda mp: mp.delattr(_zero_optimizer(), "_use_compact_grad_partition_buffer"),
                "DeepSpeedZeroOptimizer._use_compact_grad_partition_buffer"),
    "offsets": (lambda mp: mp.setattr(_zero_optimizer(), "_build_compact_grad_partition_buffer", lambda self, i: None),
                "DeepSpeedZeroOptimizer.grad_start_offset"),
}


def test_pipeline_engine_check_passes_with_this_deepspeed():
    assert seam.pipeline_engine_class(2) is seam.PartitionedGradientsPipelineEngine
    assert seam.pipeline_engine_class(1) is seam.pipeline_engine_class(0) is seam.OneBackwardPipelineEngine
    assert issubclass(seam.PartitionedGradientsPipelineEngine, seam.OneBackwardPipelineEngine)


@pytest.mark.parametrize("taken", sorted(ZERO2_INTERNALS))
def test_zero2_pipeline_refuses_without_its_internals(taken, monkeypatch):
    take_away, internal = ZERO2_INTERNALS[taken]
    take_away(monkeypatch)
    expect_missing(internal, lambda: seam.pipeline_engine_class(2))


def test_one_backward_refuses_without_its_internals(monkeypatch):
    """DeepSpeed backing up a stage's outputs some other way: the flattening would be wrong, so it refuses."""
    def backward(self, buffer_id):
        for out, grad in zip(self.pipe_buffers["outputs"][buffer_id], self.grad_layer):
            out.backward(grad)

    monkeypatch.setattr(PipelineEngine, "_exec_backward_pass", backward)
    expect_missing("PipelineEngine._exec_backward_pass running one backward per output",
                   lambda: seam.pipeline_engine_class(1))


def test_initialize_pipeline_restores_deepspeeds_engine_class(monkeypatch):
    seen = []
    monkeypatch.setattr(deepspeed, "initialize", lambda **kwargs: (seen.append(deepspeed.PipelineEngine),) * 4)
    seam.initialize_pipeline(seam.PartitionedGradientsPipelineEngine, model=None)
    seam.initialize_pipeline(None, model=None)
    assert seen == [seam.PartitionedGradientsPipelineEngine, PipelineEngine]
    assert deepspeed.PipelineEngine is PipelineEngine


# ---------------------------------------------------------------- 9. universal checkpoints


def _parse_arguments_renamed():
    """--input_folder renamed --input"""


def _load_universal_flag_elsewhere(self):
    return self._config.universal


def _load_hp_by_parameter_order(self, lp_groups_name, checkpoint_dir):
    """zero/<index>/ instead of zero/<self.param_names...>/"""


UNIVERSAL_INTERNALS = {
    "options": (lambda mp: mp.setattr(importlib.import_module("deepspeed.checkpoint.ds_to_universal"),
                                      "parse_arguments", _parse_arguments_renamed),
                "ds_to_universal.main(args) with the options of its parse_arguments()"),
    "main": (lambda mp: mp.delattr(importlib.import_module("deepspeed.checkpoint.ds_to_universal"), "main"),
             "ds_to_universal.main(args) with the options of its parse_arguments()"),
    "flag": (lambda mp: mp.setattr(DeepSpeedEngine, "load_universal_checkpoint", _load_universal_flag_elsewhere),
             "DeepSpeedEngine.load_universal_checkpoint() reading self._config.load_universal_checkpoint"),
    "names": (lambda mp: mp.setattr(importlib.import_module("deepspeed.runtime.base_optimizer").ZeROOptimizer,
                                    "load_hp_checkpoint_state_from_checkpoint_dir", _load_hp_by_parameter_order),
              "ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir finding zero/<self.param_names[lp]>"),
}


def test_universal_checkpoint_check_passes_with_this_deepspeed():
    seam.check_universal_checkpoints()


@pytest.mark.parametrize("taken", sorted(UNIVERSAL_INTERNALS))
def test_universal_checkpoints_refuse_without_their_internals(taken, monkeypatch):
    take_away, internal = UNIVERSAL_INTERNALS[taken]
    take_away(monkeypatch)
    expect_missing(internal, seam.check_universal_checkpoints)
# ---------------------------------------------------------------- 10. skipping steps with non-finite gradients


def _take_model_step_ignoring_overflow(self, lr_kwargs):
    self.optimizer.step()
    self._step_applied = True


def _step_whatever_the_norm(self, closure=None):
    self.optimizer.step()


def _skipping_optimizer(name):
    return next(kind for kind in seam._skipping_optimizers() if kind.__name__ == name)


SKIP_INTERNALS = {  # taken away -> (the internal named, the optimizer class in use)
    "_take_model_step": (lambda mp: mp.setattr(DeepSpeedEngine, "_take_model_step", _take_model_step_ignoring_overflow),
                         "DeepSpeedEngine._take_model_step reading optimizer.overflow", "DeepSpeedZeroOptimizer"),
    **{name: (lambda mp, name=name: mp.setattr(_skipping_optimizer(name), "step", _step_whatever_the_norm),
              f"{name}.step setting overflow when is_invalid_grad_norm(", name)
       for name in ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "BF16_Optimizer")},
}


@pytest.mark.parametrize("name", ["DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "BF16_Optimizer"])
def test_overflow_skip_check_passes_with_this_deepspeed(name):
    kind = _skipping_optimizer(name)
    seam.check_overflow_skip(kind.__new__(kind))  # not initialized: only its class matters


@pytest.mark.parametrize("taken", sorted(SKIP_INTERNALS))
def test_overflow_skip_refuses_without_its_internals(taken, monkeypatch):
    take_away, internal, name = SKIP_INTERNALS[taken]
    kind = _skipping_optimizer(name)
    take_away(monkeypatch)
    expect_missing(internal, seam.check_overflow_skip, kind.__new__(kind))


def test_torch_optimizer_steps_only_on_finite_gradients(monkeypatch):
    """fp32 ZeRO-0 steps torch's optimizer directly: a step with a NaN gradient on any rank is reported as DeepSpeed's
    optimizers report it (``overflow``) and changes nothing. (One process: the all-reduce is stood in for.)"""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op=None: None)
    seam.skip_non_finite_steps(types.SimpleNamespace(optimizer=optimizer))
    weight.grad = torch.tensor([1.0, float("nan"), 1.0])
    optimizer.step()
    assert optimizer.overflow and torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state
    weight.grad = torch.ones(3)
    optimizer.step()
    assert not optimizer.overflow and not torch.equal(weight.detach(), torch.ones(3))


# ---------------------------------------------------------------- 12. AutoEP with transformers 5.x


def test_autoep_recorder_check_passes_and_refuses_without_its_caller(monkeypatch):
    from deepspeed.module_inject.auto_ep_presets import base

    seam.check_autoep_output_recorders()
    monkeypatch.setattr(base, "_retarget_transformers_output_recorders_for_modules", lambda **kwargs: 0)
    expect_missing("auto_ep_presets.base._retarget_transformers_output_recorders_for_modules calling it",
                   seam.check_autoep_output_recorders)
    monkeypatch.delattr(base, "_install_instance_transformers_output_recorders")
    expect_missing("auto_ep_presets.base._install_instance_transformers_output_recorders",
                   seam.check_autoep_output_recorders)


def test_autoep_recorders_install_through_transformers_registry_and_restore_it():
    """DeepSpeed's own helper dies on transformers 5.24's registry (its get() takes one argument); the replacement
    installs the hooks with the retargeted entry in place, then puts the class's entry back."""
    import transformers
    from deepspeed.module_inject.auto_ep_presets import base
    from transformers.utils import output_capturing

    config = transformers.MixtralConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32,
                                        num_local_experts=2, num_experts_per_tok=1)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    registry, key = output_capturing._CAN_RECORD_REGISTRY, str(type(model.model))
    before, seen = dict.get(registry, key), []
    entry = {**before, "router_logits": "retargeted"}
    with pytest.raises(TypeError, match="positional argument"):
        base._install_instance_transformers_output_recorders(model.model, {key: entry}, output_capturing, lambda m: 0)
    fake = types.SimpleNamespace(_CAN_RECORD_REGISTRY=registry,
                                 maybe_install_capturing_hooks=lambda m: seen.append(dict.get(registry, key)))
    assert seam._install_output_recorders(model.model, {key: entry}, fake, lambda m: 0)
    assert seen == [entry] and dict.get(registry, key) is before


# ---------------------------------------------------------------- 13. no data-parallel reduction over one rank


def _exec_reduce_grads_elsewhere(self):
    self.optimizer.reduce_everything()


def _gradients_without_zeros(self):
    return [p.grad for p in self.module.parameters() if p.grad is not None], {}


REDUCE_INTERNALS = {
    "_exec_reduce_grads": (lambda mp: mp.setattr(PipelineEngine, "_exec_reduce_grads", _exec_reduce_grads_elsewhere),
                           "PipelineEngine._INSTRUCTION_MAP[ReduceGrads] = _exec_reduce_grads"),
    "zeros": (lambda mp: mp.setattr(DeepSpeedEngine, "_get_gradients_for_reduction", _gradients_without_zeros),
              "DeepSpeedEngine.buffered_allreduce_fallback reading get_grads_for_reduction"),
}


def test_reduce_check_passes_with_this_deepspeed():
    seam.check_reduce_grads()


@pytest.mark.parametrize("taken", sorted(REDUCE_INTERNALS))
def test_reduce_over_one_rank_refuses_without_its_internals(taken, monkeypatch):
    take_away, internal = REDUCE_INTERNALS[taken]
    take_away(monkeypatch)
    expect_missing(internal, seam.check_reduce_grads)


def _stand_in_engine(dp: int, optimizer=None):
    from deepspeed.runtime.pipe import schedule

    module = torch.nn.Linear(2, 2)
    grid = types.SimpleNamespace(get_data_parallel_world_size=lambda: dp)
    return types.SimpleNamespace(module=module, grid=grid,
                                 optimizer=optimizer or torch.optim.AdamW(module.parameters()),
                                 _INSTRUCTION_MAP=dict(PipelineEngine._INSTRUCTION_MAP), reduce=schedule.ReduceGrads)


def test_reduce_over_one_rank_leaves_zeros_for_missing_gradients():
    """At dp=1 under torch's optimizer ReduceGrads runs what DeepSpeed's reduction does there, nothing but giving a
    parameter without a gradient zeros; at dp=2, or under a ZeRO optimizer, DeepSpeed's reduction stays."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    engine = _stand_in_engine(1)
    assert seam.reduce_over_one_rank_is_nothing(engine)
    engine.module.weight.grad = torch.ones(2, 2)
    engine._INSTRUCTION_MAP[engine.reduce](engine)
    assert torch.equal(engine.module.weight.grad, torch.ones(2, 2))
    assert torch.equal(engine.module.bias.grad, torch.zeros(2))
    assert PipelineEngine._INSTRUCTION_MAP[engine.reduce] is PipelineEngine._exec_reduce_grads  # the class's map
    for kept in (_stand_in_engine(2), _stand_in_engine(1, DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer))):
        assert not seam.reduce_over_one_rank_is_nothing(kept)
        assert kept._INSTRUCTION_MAP[kept.reduce] is PipelineEngine._exec_reduce_grads


# ---------------------------------------------------------------- 9. the universal form of a ZeRO-0 checkpoint


def _trained_zero0(seed: int):
    """A stand-in engine stepping torch's fused AdamW twice, with a scheduler and DeepSpeed's step counters."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    for _ in range(2):
        module(torch.randn(5, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return types.SimpleNamespace(module=module, optimizer=optimizer, lr_scheduler=scheduler, global_steps=2,
                                 global_samples=16, skipped_steps=0, train_batch_size=lambda: 8)


def test_a_zero0_checkpoint_round_trips_through_the_universal_form(tmp_path):
    """Weights, every Adam state (moments and step), the groups' learning rate, the scheduler and the step
    counters of a ZeRO-0 checkpoint come back exactly in another engine, through DeepSpeed's universal files."""
    saved = _trained_zero0(0)
    folder = tmp_path / "step_2"
    folder.mkdir()
    torch.save({"optimizer": saved.optimizer.state_dict(), **seam.optimizer_param_names(saved),
                "lr_scheduler": saved.lr_scheduler.state_dict(), "global_steps": 2, "global_samples": 16,
                "skipped_steps": 0, "ds_version": deepspeed.__version__}, folder / "mp_rank_00_model_states.pt")
    hf = {name: f"model.{name}" for name, _ in saved.module.named_parameters()}
    weights = {hf[name]: p.detach().clone() for name, p in saved.module.named_parameters()}
    seam.zero0_to_universal(folder, tmp_path / "universal", weights, hf)
    assert (tmp_path / "universal" / "zero" / "model.0.weight" / "exp_avg_sq.pt").is_file()

    fresh = _trained_zero0(1)
    seam.load_universal(fresh, tmp_path / "universal", hf)
    for (name, a), b in zip(saved.module.named_parameters(), fresh.module.parameters()):
        assert torch.equal(a, b), name
        for key, value in saved.optimizer.state[a].items():
            assert torch.equal(fresh.optimizer.state[b][key], value), (name, key)
    assert fresh.optimizer.param_groups[0]["lr"] == saved.optimizer.param_groups[0]["lr"] == 0.025
    assert fresh.lr_scheduler.state_dict() == saved.lr_scheduler.state_dict()
    assert (fresh.global_steps, fresh.global_samples) == (2, 16)


def test_zero0_universal_check_refuses_without_its_internals(monkeypatch):
    from deepspeed.runtime.engine import DeepSpeedEngine as Engine

    seam.check_zero0_universal()
    monkeypatch.setattr(Engine, "_load_checkpoint", lambda self, *args, **kwargs: None)
    expect_missing("DeepSpeedEngine._load_checkpoint restoring lr_scheduler", seam.check_zero0_universal)
