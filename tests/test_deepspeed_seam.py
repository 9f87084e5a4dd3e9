"""hybrid_ds/seam: each DeepSpeed internal we rely on is checked, and its absence is one clear line.

Every registered requirement (hybrid_ds.seam.compat.REGISTRY) is checked twice: with the installed DeepSpeed it
holds, and with the internal taken away (monkeypatch: deleted, or its caller no longer calling it; ``TAKE_AWAY``)
it raises ``IncompatibleDeepSpeed``, also through the entry point that relies on it, which then changes nothing.
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
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.topology import PipelineParallelGrid
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from hybrid_ds.errors import IncompatibleDeepSpeed, UserError
from hybrid_ds.runtime.checkpoint.zero0 import load_universal_zero0, optimizer_param_names, zero0_to_universal
from hybrid_ds.seam import (autoep, config_check, engines, environment, instruments, numerics, pipeline_module,
                            ulysses, universal, zero_bubble)
from hybrid_ds.seam.compat import REGISTRY, WRITTEN_FOR, code_count, code_has, require

ROOT = Path(__file__).resolve().parents[1]
SEAM_MODULES = (autoep, config_check, engines, environment, instruments, numerics, pipeline_module, universal)  # all registered


def expect_missing(internal: str, check, *args):
    """``check(*args)`` raises the seam's one-line error naming ``internal`` and both DeepSpeed versions."""
    with pytest.raises(IncompatibleDeepSpeed) as info:
        check(*args)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"hybrid_ds needs DeepSpeed {WRITTEN_FOR}'s {internal}"), message
    assert f"(found DeepSpeed {deepspeed.__version__} without it)" in message
    assert isinstance(info.value, UserError)  # the CLI prints it as one line, exit code 2


def test_written_for_the_pinned_deepspeed():
    pin = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"deepspeed' in line)
    assert f">={WRITTEN_FOR}," in pin


# ---------------------------------------------------------------- the syntax-tree check


def _mentions_only():
    """Calls self._take_model_step(lr_kwargs) and sets self.skipped_steps += 1."""
    # self._take_model_step(lr_kwargs)
    note = "self._take_model_step(lr_kwargs)"
    return note


def _does(self, lr_kwargs, comm_dtype, PipelineEngine=None):
    self.skipped_steps += 1
    self.tied_modules = {'ranks': [0], 'group': None}
    cls = DeepSpeedEngine if lr_kwargs else PipelineEngine
    self._take_model_step(lr_kwargs, flag=True)
    return comm_dtype in self.extra_large_param_to_reduce, self.parts[cls]


def test_code_has_is_not_satisfied_by_a_comment_or_a_string():
    assert not code_has(_mentions_only, "self._take_model_step(...)")
    assert not code_has(_mentions_only, "self.skipped_steps += 1")
    assert code_has(_does, "self._take_model_step(...)")


def test_code_has_matches_patterns_with_wildcards():
    assert code_has(_does, "self.skipped_steps += 1", "self.tied_modules = ...", "{'ranks': ..., **...}",
                    "... if ... else PipelineEngine", "self._take_model_step(lr_kwargs, ...)",
                    "comm_dtype in self.extra_large_param_to_reduce", "self.parts[...]")
    assert not code_has(_does, "self.skipped_steps += 2")
    assert not code_has(_does, "self._take_model_step(lr_kwargs)")  # the keyword is not in the pattern
    assert not code_has(_does, "self._take_model_step(other, ...)")
    assert not code_has(_does, "... if ... else DeepSpeedEngine")
    assert not code_has(_does, "{'ranks': ..., 'module': ..., **...}")
    assert not code_has(_does, "self.tied_modules = []")


def test_code_has_keeps_the_order():
    assert code_has(_does, "self.skipped_steps += 1", "self._take_model_step(...)")
    assert not code_has(_does, "self._take_model_step(...)", "self.skipped_steps += 1")


def test_code_count_counts_calls():
    assert code_count(_does, "self._take_model_step(...)") == 1
    assert code_count(_does, "self.skipped_steps") == 1 and code_count(_does, "self") == 5
    assert code_count(PipelineEngine.__init__, "self.zero_optimization_stage(...)") == 1


def test_an_unparsable_pattern_or_source_does_not_hold():
    with pytest.raises(SyntaxError):
        code_has(_does, "self.(")
    expect_missing("X", require, types.SimpleNamespace(internal="X", why="y", holds=lambda: code_has(_does, "a b")))


# ---------------------------------------------------------------- every requirement, and each taken away


def _take_model_step_clipping_elsewhere(self, lr_kwargs):
    self.optimizer.step()


def _exec_optimizer_step_without_take_model_step(self, lr_kwargs=None):
    self.optimizer.step()


def _index_tied_modules_without_ranks(self):
    return {}


def _init_without_partition_layers(self, layers, **kwargs):
    torch.nn.Module.__init__(self)


def _stage_owner_without_parts(self, layer_idx):
    return 0


def _exec_schedule_without_map(self, pipe_schedule):
    for step_cmds in pipe_schedule:
        for cmd in step_cmds:
            getattr(self, f"_exec_{type(cmd).__name__.lower()}")(**cmd.kwargs)


def _backward_per_output(self, buffer_id):
    for out, grad in zip(self.pipe_buffers["outputs"][buffer_id], self.grad_layer):
        out.backward(grad)


def _epilogue_without_update(self, **kwargs):
    self.epilogue_ran = True


def _train_batch_own_schedule(self, data_iter=None):
    self._exec_schedule(self.schedule_of_the_batch())


def _send_through_comm(tensor, dest_stage, async_op=False):
    import deepspeed.comm as dist

    return dist.isend(tensor, dest_stage)


def _all_to_all_by_hand(group, input):
    output = torch.empty_like(input)
    torch.distributed.all_to_all_single(output, input, group=group)
    return output


@staticmethod
def _tiled_backward_without_holding_hooks(ctx, *grads):  # each tile's weight gradients reach ZeRO's hooks at once
    (x,) = ctx.saved_tensors
    x = x.detach().requires_grad_(x.requires_grad)
    with torch.enable_grad():
        output = ctx.fn(ctx.self, x)
    torch.autograd.backward(output, grads[0])
    return None, None, x.grad, None, None


def _exec_reduce_grads_elsewhere(self):
    self.optimizer.reduce_everything()


def _gradients_without_zeros(self):
    return [p.grad for p in self.module.parameters() if p.grad is not None], {}


def _take_model_step_ignoring_overflow(self, lr_kwargs):
    self.optimizer.step()
    self._step_applied = True


def _step_whatever_the_norm(self, closure=None):
    self.optimizer.step()


def _parse_arguments_renamed():
    """--input_folder renamed --input"""


def _load_universal_flag_elsewhere(self):
    return self._config.universal


def _load_hp_by_parameter_order(self, lp_groups_name, checkpoint_dir):
    """zero/<index>/ instead of zero/<self.param_names...>/"""


def _hp_state_without_step(self, folder, tp_rank, tp_world_size):
    return None


def _global_state_without_version(self, sd, load_optimizer_states=True):
    self.loss_scaler = sd["loss_scaler"]


def _load_checkpoint_elsewhere(self, *args, **kwargs):
    return None


def _setup_buckets_without_flag(self):
    return None


def _reduce_ipg_grads_without_oversized(self, comm_dtype=None):
    self.average_tensor(self.ipg_buckets[comm_dtype].buffer)


def _boundary_elsewhere(self):
    return self._at_boundary


def _build_naming_tied_elsewhere(self):
    self.shared_modules[self.key] = self.build()


def _set(owner, name, value):
    return lambda mp: mp.setattr(owner() if callable(owner) and not isinstance(owner, type) else owner, name, value)


def _delete(owner, name):
    return lambda mp: mp.delattr(owner() if callable(owner) and not isinstance(owner, type) else owner, name)


def _module(name):
    return lambda: importlib.import_module(name)


def _skipping(name):
    return next(kind for kind in numerics._skipping_optimizers() if kind.__name__ == name)


def _optimizer_configuration_always_fused(self, optimizer_parameters, adam_w_mode, allow_legacy_fallback=False):
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam, {"adam_w_mode": adam_w_mode}


_AUTOEP_BASE = _module("deepspeed.module_inject.auto_ep_presets.base")
TAKE_AWAY = {  # requirement key -> what takes it away, as a DeepSpeed refactor could
    "autoep.caller": _set(_AUTOEP_BASE, "_retarget_transformers_output_recorders_for_modules", _parse_arguments_renamed),
    "autoep.helper": _delete(_AUTOEP_BASE, "_install_instance_transformers_output_recorders"),
    "config.adam_classes": _set(DeepSpeedEngine, "get_optimizer_configuration", _optimizer_configuration_always_fused),
    "clip.clip_fp32_gradients": _delete(DeepSpeedEngine, "clip_fp32_gradients"),
    "clip.exec_optimizer_step": _set(PipelineEngine, "_exec_optimizer_step",
                                     _exec_optimizer_step_without_take_model_step),
    "clip.grid": _delete(PipelineParallelGrid, "get_pipe_parallel_group"),
    "clip.take_model_step": _set(DeepSpeedEngine, "_take_model_step", _take_model_step_clipping_elsewhere),
    "clip.tied_comms": _set(PipelineModule, "_index_tied_modules", _index_tied_modules_without_ranks),
    "environment.shm_comm_op": lambda mp: mp.delitem(importlib.import_module("deepspeed.ops").__compatible_ops__,
                                                     "deepspeed_shm_comm"),
    "instruments.mpu": _delete(_module("deepspeed.utils.groups"), "mpu"),
    "partition.override": _set(PipelineModule, "__init__", _init_without_partition_layers),
    "partition.parts": _set(PipelineModule, "stage_owner", _stage_owner_without_parts),
    "partition.set_bounds": _delete(PipelineModule, "_set_bounds"),
    "pipeline.instruction_map": _set(PipelineEngine, "_exec_schedule", _exec_schedule_without_map),
    "pipeline.tied_modules": _set(PipelineModule, "_build", _build_naming_tied_elsewhere),
    "pipeline.one_backward": _set(PipelineEngine, "_exec_backward_pass", _backward_per_output),
    "pipeline.bf16_last_stage": _set(BF16_Optimizer, "backward_epilogue", _epilogue_without_update),
    "reduce.exec_reduce_grads": _set(PipelineEngine, "_exec_reduce_grads", _exec_reduce_grads_elsewhere),
    "reduce.fallback": _set(DeepSpeedEngine, "_get_gradients_for_reduction", _gradients_without_zeros),
    **{f"skip.{name}": _set(lambda name=name: _skipping(name), "step", _step_whatever_the_norm)
       for name in ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "BF16_Optimizer")},
    "skip.take_model_step": _set(DeepSpeedEngine, "_take_model_step", _take_model_step_ignoring_overflow),
    "universal.ds_to_universal": _set(_module("deepspeed.checkpoint.ds_to_universal"), "parse_arguments",
                                      _parse_arguments_renamed),
    "universal.load_flag": _set(DeepSpeedEngine, "load_universal_checkpoint", _load_universal_flag_elsewhere),
    "universal.param_names": _set(ZeROOptimizer, "load_hp_checkpoint_state_from_checkpoint_dir",
                                  _load_hp_by_parameter_order),
    "zero0.engine_state": _set(DeepSpeedEngine, "_load_checkpoint", _load_checkpoint_elsewhere),
    "zero0.optimizer_state": _set(DeepSpeedZeroOptimizer, "_load_global_state", _global_state_without_version),
    "zero0.state_files": _set(_module("deepspeed.checkpoint.universal_checkpoint"), "load_hp_checkpoint_state",
                              _hp_state_without_step),
    "zero2.assert": _set(PipelineEngine, "__init__", _init_without_partition_layers),
    "zero2.compact": _delete(DeepSpeedZeroOptimizer, "_use_compact_grad_partition_buffer"),
    "zero2.epilogue": _set(DeepSpeedZeroOptimizer, "setup_buckets", _setup_buckets_without_flag),
    "zero2.grad_boundary": _set(PipelineEngine, "is_gradient_accumulation_boundary", _boundary_elsewhere),
    "zero2.initialize": _set(deepspeed, "PipelineEngine", DeepSpeedEngine),
    "zero2.instructions": _set(PipelineEngine, "_INSTRUCTION_MAP", {}),
    "zero2.offsets": _set(DeepSpeedZeroOptimizer, "_build_compact_grad_partition_buffer", _setup_buckets_without_flag),
    "zero2.oversized": _set(DeepSpeedZeroOptimizer, "reduce_ipg_grads", _reduce_ipg_grads_without_oversized),
    "ulysses.all_to_all": _set(_module("deepspeed.sequence.layer"), "_dim_zero_all_to_all", _all_to_all_by_hand),
    "ulysses.tiled_mlp": _set(lambda: _module("deepspeed.runtime.sequence_parallel.ulysses_sp")().TiledMLP, "backward",
                              _tiled_backward_without_holding_hooks),
    "zero_bubble.backward_calls": _set(PipelineEngine, "train_batch", _train_batch_own_schedule),
    "zero_bubble.sends": _set(_module("deepspeed.runtime.pipe.p2p"), "send", _send_through_comm),
}
OTHER_WAYS = [  # more refactors, each refused by the requirement of that key
    ("environment.shm_comm_op", _set(_module("deepspeed.comm.torch"), "build_shm_op", _setup_buckets_without_flag)),
    ("pipeline.instruction_map", _delete(PipelineEngine, "_INSTRUCTION_MAP")),
    ("universal.ds_to_universal", _delete(_module("deepspeed.checkpoint.ds_to_universal"), "main")),
    ("zero2.epilogue", _delete(DeepSpeedZeroOptimizer, "finalize_gradient_accumulation_boundary")),
    ("ulysses.all_to_all", _delete(_module("deepspeed.sequence.layer"), "register_all_to_all_group")),
    ("zero_bubble.sends", _delete(_module("deepspeed.runtime.pipe.p2p"), "can_send_recv")),
]


def test_every_requirement_holds_with_this_deepspeed():
    assert len(REGISTRY) >= 30
    require(*REGISTRY.values())


def test_every_requirement_has_a_negative_control():
    assert set(TAKE_AWAY) == set(REGISTRY)


@pytest.mark.parametrize("key", sorted(REGISTRY))
def test_each_requirement_refuses_when_taken_away(key, monkeypatch):
    TAKE_AWAY[key](monkeypatch)
    expect_missing(REGISTRY[key].internal, require, REGISTRY[key])


@pytest.mark.parametrize("key, take_away", OTHER_WAYS, ids=[key for key, _ in OTHER_WAYS])
def test_other_refactors_are_refused(key, take_away, monkeypatch):
    take_away(monkeypatch)
    expect_missing(REGISTRY[key].internal, require, REGISTRY[key])


# ---------------------------------------------------------------- the entry points check before changing anything


def _stand_in_engine(dp: int, optimizer=None):
    from deepspeed.runtime.pipe import schedule

    module = torch.nn.Linear(2, 2)
    grid = types.SimpleNamespace(get_data_parallel_world_size=lambda: dp)
    return types.SimpleNamespace(module=module, grid=grid,
                                 optimizer=optimizer or torch.optim.AdamW(module.parameters()),
                                 _INSTRUCTION_MAP=dict(PipelineEngine._INSTRUCTION_MAP), reduce=schedule.ReduceGrads)


def _clip_entry(tmp_path, name=None):
    engine = types.SimpleNamespace()
    return lambda: numerics.use_global_clip_norm(engine), lambda: not hasattr(engine, "clip_fp32_gradients")


def _skip_entry(tmp_path, name):
    """skip.<optimizer class>: that optimizer's check; skip.take_model_step: torch's optimizer, wrapped."""
    kind = torch.optim.AdamW if name == "take_model_step" else _skipping(name)
    optimizer = kind([torch.nn.Parameter(torch.ones(1))]) if kind is torch.optim.AdamW else kind.__new__(kind)
    step = optimizer.step
    return (lambda: numerics.skip_non_finite_steps(types.SimpleNamespace(optimizer=optimizer)),
            lambda: optimizer.step == step and not hasattr(optimizer, "overflow"))


def _reduce_entry(tmp_path, name=None):
    engine = _stand_in_engine(1)
    before = dict(engine._INSTRUCTION_MAP)
    return lambda: numerics.reduce_over_one_rank_is_nothing(engine), lambda: engine._INSTRUCTION_MAP == before


def _instruction_map_entry(tmp_path, name=None):
    engine = PipelineEngine.__new__(PipelineEngine)
    return (lambda: instruments.wrap_pipeline_instructions(engine, lambda kind, fn: fn),
            lambda: "_INSTRUCTION_MAP" not in vars(engine))


def _autoep_entry(tmp_path, name=None):
    base = _AUTOEP_BASE()
    helper = vars(base).get("_install_instance_transformers_output_recorders")
    return (lambda: autoep.autoep_output_recorders().__enter__(),
            lambda: vars(base).get("_install_instance_transformers_output_recorders") is helper)


def _shm_entry(tmp_path, name=None):
    ops = importlib.import_module("deepspeed.ops").__compatible_ops__
    before = dict(ops)
    return environment.disable_shm_comm_op, lambda: ops == before


def _universal_entry(tmp_path, name=None):
    return lambda: universal.to_universal(tmp_path, tmp_path / "out"), lambda: not (tmp_path / "out").exists()


def _zero0_entry(tmp_path, name=None):
    return lambda: zero0_to_universal(tmp_path, tmp_path / "out", {}, {}), lambda: not (tmp_path / "out").exists()


def _no_state(call):
    return lambda tmp_path, name: (call, lambda: True)


ENTRIES = {  # requirement key's prefix -> (tmp_path, the rest of the key) -> (the entry point relying on it,
    # whether it left things unchanged)
    "autoep": _autoep_entry, "clip": _clip_entry, "environment": _shm_entry,
    "config": _no_state(lambda: config_check.check_deepspeed_sections({"optimizer": {"type": "AdamW", "params": {}}})),
    "instruments": _no_state(instruments.forget_pipeline_grid),
    "partition": _no_state(lambda: pipeline_module.HybridPipelineModule([torch.nn.Identity()], [0, 1])),
    "pipeline": lambda tmp_path, name: (_instruction_map_entry(tmp_path) if name == "instruction_map" else
                                        (lambda: pipeline_module.tied_prefix("wte"), lambda: True)
                                        if name == "tied_modules" else
                                        (lambda: engines.pipeline_engine_class(1), lambda: True)),
    "reduce": _reduce_entry, "skip": _skip_entry, "universal": _universal_entry, "zero0": _zero0_entry,
    "zero2": _no_state(lambda: engines.pipeline_engine_class(2)),
    "ulysses": lambda tmp_path, name: _ulysses_entry() if name == "all_to_all" else _tiled_mlp_entry(),
    "zero_bubble": lambda tmp_path, name: _zero_bubble_entry(),
}


def _ulysses_entry():
    from deepspeed.sequence import layer

    group = types.SimpleNamespace(group_name="a group")
    return lambda: ulysses.register_group(group), lambda: "a group" not in layer._all_to_all_groups


def _tiled_mlp_entry():
    mlp = torch.nn.Linear(4, 4)
    return lambda: ulysses.tiled_mlp(lambda module, x: module(x), mlp, torch.ones(1, 4, 4), 2), lambda: True


def _zero_bubble_entry():
    engine = types.SimpleNamespace()
    return (lambda: zero_bubble.use_program(engine, [], 2), lambda: not vars(engine))


@pytest.mark.parametrize("key", sorted(REGISTRY))
def test_entry_points_refuse_before_changing_anything(key, monkeypatch, tmp_path):
    TAKE_AWAY[key](monkeypatch)
    prefix, name = key.split(".", 1)
    call, unchanged = ENTRIES[prefix](tmp_path, name)
    expect_missing(REGISTRY[key].internal, call)
    assert unchanged(), "checked before anything was changed"


def test_overflow_skip_checks_the_optimizer_in_use(monkeypatch):
    TAKE_AWAY["skip.BF16_Optimizer"](monkeypatch)
    numerics.check_overflow_skip(DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer))
    expect_missing(REGISTRY["skip.BF16_Optimizer"].internal, numerics.check_overflow_skip,
                   _skipping("BF16_Optimizer").__new__(_skipping("BF16_Optimizer")))


# ---------------------------------------------------------------- what each item does, and its instance checks


BUILD_A_MODULE = textwrap.dedent("""
    import sys
    import torch
    from deepspeed.pipe import LayerSpec, PipelineModule
    from hybrid_ds.seam.pipeline_module import HybridPipelineModule
    from hybrid_ds.runtime.engine import init_distributed
    from hybrid_ds.errors import IncompatibleDeepSpeed

    init_distributed()
    specs = [LayerSpec(torch.nn.Linear, 2, 2) for _ in range(4)]
    module = HybridPipelineModule(specs, parts=[1, 3], num_stages=1)  # DeepSpeed's own split: [0, 4]
    print("built", module._local_start, module._local_stop, len(module.forward_funcs))
    if sys.argv[1] == "real":  # hybrid_ds.runtime.quiet: DeepSpeed's prints and chatter off unless verbose
        import os
        from deepspeed.utils import logger
        from hybrid_ds.runtime.quiet import deepspeed_prints_off
        for verbose in ("", "1"):
            os.environ["HYBRID_DS_VERBOSE"] = verbose
            print(f"=={verbose or 'quiet'}==", flush=True)
            with deepspeed_prints_off():
                HybridPipelineModule(specs, parts=[1, 3], num_stages=1)
            logger.warning("Attempting to get learning rate from scheduler before it has started")
            logger.warning("a warning that stays")
        print("==end==", flush=True)
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
    if case == "real":
        quiet, verbose = proc.stdout.split("==quiet==")[1].split("==1==")
        verbose = verbose.split("==end==")[0]
        assert "SEED_LAYERS" not in quiet and "SEED_LAYERS" in verbose, proc.stdout
        assert "Attempting to get learning rate" not in quiet and "Attempting to get learning rate" in verbose
        assert "a warning that stays" in quiet and "a warning that stays" in verbose
    if case == "ignore_bounds":
        refusal = next(line for line in proc.stdout.splitlines() if line.startswith("refused "))
        assert refusal.startswith("refused hybrid_ds needs DeepSpeed 0.19.8's PipelineModule._local_start")


def test_shm_comm_op_is_disabled(monkeypatch):
    ops = importlib.import_module("deepspeed.ops").__compatible_ops__
    monkeypatch.setitem(ops, "deepspeed_shm_comm", True)
    environment.disable_shm_comm_op()
    assert ops["deepspeed_shm_comm"] is False


def test_layer_checkpoint_file_is_deepspeeds_name(tmp_path):
    assert pipeline_module.layer_checkpoint_file(tmp_path, 3) == tmp_path / "layer_03-model_states.pt"
    assert pipeline_module.layer_checkpoint_file(str(tmp_path), 12).name == "layer_12-model_states.pt"


def _ckpt_layer_path_renamed_attributes(self, ckpt_dir, local_layer_idx):
    return f"{ckpt_dir}/layer_{local_layer_idx + self._local_begin:02d}-model_states.pt"


@pytest.mark.parametrize("taken", ["method", "attributes"])
def test_layer_checkpoint_file_refuses_without_ckpt_layer_path(taken, monkeypatch, tmp_path):
    if taken == "method":
        monkeypatch.delattr(PipelineModule, "ckpt_layer_path")
    else:
        monkeypatch.setattr(PipelineModule, "ckpt_layer_path", _ckpt_layer_path_renamed_attributes)
    expect_missing("PipelineModule.ckpt_layer_path", pipeline_module.layer_checkpoint_file, tmp_path, 0)


def test_instruction_map_is_wrapped_per_engine():
    engine = PipelineEngine.__new__(PipelineEngine)  # not initialized: only its class matters here
    class_map = dict(PipelineEngine._INSTRUCTION_MAP)
    assert instruments.wrap_pipeline_instructions(engine, lambda kind, fn: (kind, fn))
    assert engine._INSTRUCTION_MAP == {kind: (kind, fn) for kind, fn in class_map.items()}
    assert PipelineEngine._INSTRUCTION_MAP == class_map
    assert not instruments.wrap_pipeline_instructions(types.SimpleNamespace(), lambda kind, fn: None)


def test_pipeline_grid_is_forgotten(monkeypatch):
    groups = importlib.import_module("deepspeed.utils.groups")
    monkeypatch.setattr(groups, "mpu", object())
    instruments.forget_pipeline_grid()
    assert groups.mpu is None


def test_reduce_bucket_tensors():
    from deepspeed.runtime.zero.stage_1_and_2 import IPGBucket

    zero = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)  # not initialized: only its buckets matter
    tensor = torch.zeros(4)
    zero.ipg_buckets = {torch.float32: IPGBucket(buffer=[tensor])}
    assert instruments.reduce_bucket_tensors(zero) == [tensor]
    assert instruments.reduce_bucket_tensors(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)) == []


@pytest.mark.parametrize("taken", ["ipg_buckets", "buffer"])
def test_reduce_bucket_tensors_refuses_without_ipg_buckets(taken):
    zero = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)
    if taken == "buffer":
        zero.ipg_buckets = {torch.float32: types.SimpleNamespace(buffers=[])}
    expect_missing("DeepSpeedZeroOptimizer.ipg_buckets", instruments.reduce_bucket_tensors, zero)


def test_gradient_tensors_refuses_without_zero_partitions():
    zero = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)
    zero.ipg_buckets = {}
    engine = types.SimpleNamespace(module=torch.nn.Linear(1, 1), optimizer=zero)
    expect_missing("DeepSpeedZeroOptimizer.all_grad_tensors", instruments.gradient_tensors, engine)


def test_pipeline_engine_classes():
    assert engines.pipeline_engine_class(2) is engines.PartitionedGradientsPipelineEngine
    assert engines.pipeline_engine_class(1) is engines.pipeline_engine_class(0) is engines.OneBackwardPipelineEngine
    assert issubclass(engines.PartitionedGradientsPipelineEngine, engines.OneBackwardPipelineEngine)


def test_initialize_pipeline_restores_deepspeeds_engine_class(monkeypatch):
    seen = []
    monkeypatch.setattr(deepspeed, "initialize", lambda **kwargs: (seen.append(deepspeed.PipelineEngine),) * 4)
    engines.initialize_pipeline(engines.PartitionedGradientsPipelineEngine, model=None)
    engines.initialize_pipeline(None, model=None)
    assert seen == [engines.PartitionedGradientsPipelineEngine, PipelineEngine]
    assert deepspeed.PipelineEngine is PipelineEngine


def test_torch_optimizer_steps_only_on_finite_gradients(monkeypatch):
    """fp32 ZeRO-0 steps torch's optimizer directly: a step with a NaN gradient on any rank is reported as DeepSpeed's
    optimizers report it (``overflow``) and changes nothing. (One process: the all-reduce is stood in for.)"""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op=None: None)
    numerics.skip_non_finite_steps(types.SimpleNamespace(optimizer=optimizer))
    weight.grad = torch.tensor([1.0, float("nan"), 1.0])
    optimizer.step()
    assert optimizer.overflow and torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state
    weight.grad = torch.ones(3)
    optimizer.step()
    assert not optimizer.overflow and not torch.equal(weight.detach(), torch.ones(3))


def test_autoep_recorders_install_through_transformers_registry_and_restore_it():
    """DeepSpeed's own helper dies on transformers 5.24's registry (its get() takes one argument); the replacement
    installs the hooks with the retargeted entry in place, then puts the class's entry back."""
    import transformers
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
        _AUTOEP_BASE()._install_instance_transformers_output_recorders(model.model, {key: entry}, output_capturing,
                                                                       lambda m: 0)
    fake = types.SimpleNamespace(_CAN_RECORD_REGISTRY=registry,
                                 maybe_install_capturing_hooks=lambda m: seen.append(dict.get(registry, key)))
    assert autoep._install_output_recorders(model.model, {key: entry}, fake, lambda m: 0)
    assert seen == [entry] and dict.get(registry, key) is before


def test_the_autoep_helper_is_deepspeeds_again_after_initialize():
    """The replacement lives only around deepspeed.initialize: later code in the process meets DeepSpeed's own."""
    base = _AUTOEP_BASE()
    original = base._install_instance_transformers_output_recorders
    with autoep.autoep_output_recorders():
        assert base._install_instance_transformers_output_recorders is autoep._install_output_recorders
    assert base._install_instance_transformers_output_recorders is original


def test_reduce_over_one_rank_leaves_zeros_for_missing_gradients():
    """At dp=1 under torch's optimizer ReduceGrads runs what DeepSpeed's reduction does there, nothing but giving a
    parameter without a gradient zeros; at dp=2, or under a ZeRO optimizer, DeepSpeed's reduction stays."""
    engine = _stand_in_engine(1)
    assert numerics.reduce_over_one_rank_is_nothing(engine)
    engine.module.weight.grad = torch.ones(2, 2)
    engine._INSTRUCTION_MAP[engine.reduce](engine)
    assert torch.equal(engine.module.weight.grad, torch.ones(2, 2))
    assert torch.equal(engine.module.bias.grad, torch.zeros(2))
    assert PipelineEngine._INSTRUCTION_MAP[engine.reduce] is PipelineEngine._exec_reduce_grads  # the class's map
    for kept in (_stand_in_engine(2), _stand_in_engine(1, DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer))):
        assert not numerics.reduce_over_one_rank_is_nothing(kept)
        assert kept._INSTRUCTION_MAP[kept.reduce] is PipelineEngine._exec_reduce_grads


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
    counters of a ZeRO-0 checkpoint come back exactly in another engine, through DeepSpeed's universal files
    (the format the seam's zero0.* requirements check)."""
    saved = _trained_zero0(0)
    folder = tmp_path / "step_2"
    folder.mkdir()
    torch.save({"optimizer": saved.optimizer.state_dict(), **optimizer_param_names(saved),
                "lr_scheduler": saved.lr_scheduler.state_dict(), "global_steps": 2, "global_samples": 16,
                "skipped_steps": 0, "ds_version": deepspeed.__version__}, folder / "mp_rank_00_model_states.pt")
    hf = {name: f"model.{name}" for name, _ in saved.module.named_parameters()}
    weights = {hf[name]: p.detach().clone() for name, p in saved.module.named_parameters()}
    zero0_to_universal(folder, tmp_path / "universal", weights, hf)
    assert (tmp_path / "universal" / "zero" / "model.0.weight" / "exp_avg_sq.pt").is_file()

    fresh = _trained_zero0(1)
    load_universal_zero0(fresh, tmp_path / "universal", hf)
    for (name, a), b in zip(saved.module.named_parameters(), fresh.module.parameters()):
        assert torch.equal(a, b), name
        for key, value in saved.optimizer.state[a].items():
            assert torch.equal(fresh.optimizer.state[b][key], value), (name, key)
    assert fresh.optimizer.param_groups[0]["lr"] == saved.optimizer.param_groups[0]["lr"] == 0.025
    assert fresh.lr_scheduler.state_dict() == saved.lr_scheduler.state_dict()
    assert (fresh.global_steps, fresh.global_samples) == (2, 16)
