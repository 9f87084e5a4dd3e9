"""Predicted (hybrid_ds.estimate) against measured memory, on CPU: model states per rank and activations per layer.

Model states: one 2-process gloo run (through the ``deepspeed`` launcher, as users train) builds a real
engine for every valid combination of ZeRO 0/1/2/3 x pipeline stages 1/2 x fp32/bf16 on gpt2-tiny, the
engine hybrid_ds trains it with (``RunConfig.pipeline_engine``): our PipelineEngine for ZeRO 0/1 and for
ZeRO-2 with 2 stages (``PartitionedGradientsPipelineEngine``), DeepSpeed's engine on the plain Hugging Face
model for ZeRO-2/3 at one stage. With 2 processes, 2 stages leave one data-parallel rank, so a second
4-process run measures ZeRO-2 at pp=2 x dp=2 (``DP_CASES``). Each runs two optimizer steps and, at every
module forward and backward, before and after the gradient reduction and after the inner optimizer's step,
sums the bytes of every distinct storage reachable from the module's parameters (``.grad`` and attributes
included) and from the engine's optimizer object graph. The peak of that sum is compared with
``model_state(...).total``; DeepSpeed's reduce buckets (``ipg_buckets``) are kept apart and compared with
``comm_buffer``. The model states' transients (``transient``, ``backward_transient``: a gradient before ZeRO's
hook copies it, the tied-weight sum inside ReduceTiedGrads, the flat copy inside the step) live between these
sampling points and are not measured here.

Activations: each pipeline layer of every tiny preset runs forward under
``torch.autograd.graph.saved_tensors_hooks``; the distinct storages it saves (parameters excluded, each
counted once, by the first layer that saves it) are summed per block, embedding and head, and compared
with ``block_activation_terms(..., runtime="cpu")`` and its embedding / head counterparts.

Usage: ``python bench/estimator_accuracy.py [--skip-states] [--skip-activations]``; prints the tables and
writes bench/results/estimator_accuracy.json. ``--worker`` is the launcher's entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "estimator_accuracy.json"
STATE_MODEL, STATE_SEQ, STATE_MICRO, STATE_ACCUM = "gpt2-tiny", 16, 2, 2
# (ZeRO stage, pipeline stages, precision): every combination hybrid_ds trains, with 2 processes.
STATE_CASES = [(z, p, prec) for prec in ("fp32", "bf16")
               for z, p in ((0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2), (3, 1))]
DP_CASES = [(2, 2, "fp32"), (2, 2, "bf16")]   # measured on 4 processes: pp=2 x dp=2, gradients partitioned
ACT_MODELS = ["gpt2-tiny", "llama-tiny", "bert-tiny", "mistral-tiny", "qwen2-tiny", "gpt-neox-tiny", "opt-tiny",
              "gemma-tiny", "phi-tiny"]
ACT_SEQ, ACT_MICRO = 128, 2
STATE_TOLERANCE, ACTIVATION_TOLERANCE = 0.05, 0.15


# ---------------------------------------------------------------- predictions (pure)


def predict_state(zero: int, stages: int, precision: str, world: int = 2, bucket: int | None = None) -> list[dict]:
    """Predicted model-state bytes per stage for one case of the measured run."""
    from hybrid_ds.config import load_config_dict
    from hybrid_ds.estimate.run import run_from_config
    from hybrid_ds.estimate.stages import stage_estimates

    run = run_from_config(load_config_dict(_state_config(zero, stages, precision, bucket)), world)
    return [{"stage": s.stage, "params": s.params, "bytes": s.state.total, "phase": s.state.phase,
             "comm_buffer": s.state.comm_buffer, "optimizer": s.state.optimizer_path}
            for s in stage_estimates(run, runtime="cpu", overhead=0.0)]


def predict_activations(name: str, precision: str, attn: str, seq: int = ACT_SEQ, micro: int = ACT_MICRO) -> dict:
    from hybrid_ds.estimate.activations import block_activation_terms, embedding_activation_bytes, head_activation_bytes
    from hybrid_ds.estimate.architecture import arch_from_preset

    arch = arch_from_preset(name)
    return {"block": sum(block_activation_terms(arch, seq, micro, precision, attn, runtime="cpu").values()),
            "embedding": embedding_activation_bytes(arch, seq, micro, precision, runtime="cpu"),
            # measure_activations runs the config's defaults: the fused loss (train.fused_loss)
            "head": head_activation_bytes(arch, seq, micro, precision, runtime="cpu", fused_loss=True)}


def _state_config(zero: int, stages: int, precision: str, bucket: int | None = None) -> dict:
    raw = {"model": {"name": STATE_MODEL}, "data": {"seq_len": STATE_SEQ}, "pipeline": {"stages": stages},
           "train_micro_batch_size_per_gpu": STATE_MICRO, "gradient_accumulation_steps": STATE_ACCUM,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": zero, **({"reduce_bucket_size": bucket} if bucket else {})},
           "zero_allow_untested_optimizer": True, "steps_per_print": 1000}
    if precision != "fp32":
        raw[precision] = {"enabled": True}
    return raw


# ---------------------------------------------------------------- measurement: activations (one process)


def measure_activations(name: str, precision: str, attn: str, seq: int = ACT_SEQ, micro: int = ACT_MICRO,
                        lora: dict | None = None) -> dict:
    """Bytes saved for backward by the blocks (mean), the embedding layers and the head (+ loss) of ``name``
    (with ``lora``: model.lora's adapters on the frozen model)."""
    import torch

    from hybrid_ds.config import load_config_dict
    from hybrid_ds.runtime.parity import sample_batch
    from hybrid_ds.runtime.pipeline import SequentialStages
    from hybrid_ds.runtime.plan import build_plan

    raw = {"model": {"name": name, "attn_implementation": attn, **({"lora": lora} if lora else {})},
           "data": {"seq_len": seq},
           "train_micro_batch_size_per_gpu": micro}
    if precision != "fp32":
        raw[precision] = {"enabled": True}
    plan = build_plan(load_config_dict(raw), 1)
    stages = SequentialStages(plan)
    for module in stages.modules():
        module.train()
    params = {p.untyped_storage().data_ptr() for m in stages.modules() for p in m.parameters()}
    task = plan.resolved.family.task
    batch = sample_batch(plan.resolved.hf_config.vocab_size, seq, task, batch=micro, pad_last=0)  # packed data
    x = (batch["input_ids"], batch["attention_mask"]) + ((batch["token_type_ids"],) if task == "masked_lm" else ())
    seen: set[int] = set()
    saved = {"block": 0, "embedding": 0, "head": 0}

    def run(kind: str, fn, arg):
        counted = []

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                counted.append(storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(arg)
        saved[kind] += sum(counted)
        return out

    layers = stages.layers_per_stage[0]
    n_blocks = sum(type(module).__name__ == "Block" for _, module in layers)
    seen_block = False
    for fn, module in layers:
        is_block = type(module).__name__ == "Block"
        seen_block |= is_block
        kind = "block" if is_block else ("head" if seen_block else "embedding")
        x = run(kind, fn, x)
    run("head", lambda logits: stages.loss_fn(logits, batch["labels"]), x)
    saved["block"] /= n_blocks
    return saved


# ---------------------------------------------------------------- measurement: model states (launcher worker)


def _walk(roots: list, ipg: set[int]) -> dict[int, tuple[int, str]]:
    """Distinct storages reachable from ``roots`` -> (bytes, first path)."""
    import torch

    seen_objects, storages = set(), {}
    queue = deque(roots)
    while queue:
        path, obj = queue.popleft()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if obj.device.type != "meta" and storage.nbytes() and storage.data_ptr() not in storages:
                kind = "reduce bucket" if storage.data_ptr() in ipg else path
                storages[storage.data_ptr()] = (storage.nbytes(), kind)
            if obj.grad is not None:
                queue.append((path + ".grad", obj.grad))
            queue.extend((f"{path}.{k}", v) for k, v in getattr(obj, "__dict__", {}).items())
        elif isinstance(obj, dict):
            queue.extend((f"{path}[{k if isinstance(k, (str, int)) else 'key'}]", v) for k, v in obj.items())
            queue.extend((path + "[key]", k) for k in obj if isinstance(k, torch.Tensor))
        elif isinstance(obj, (list, tuple, set, deque)):
            queue.extend((f"{path}[]", v) for v in obj)
        elif isinstance(obj, torch.nn.Module):
            continue  # the module's parameters are roots; its other attributes are activations and buffers
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
            queue.extend((f"{path}.{k}", v) for k, v in vars(obj).items())
    return storages


class StateProbe:
    """Keeps the peak of the model-state bytes an engine holds, sampled at many points of a step."""

    def __init__(self, engine):
        self.engine, self.peak, self.where, self.breakdown, self.bucket = engine, 0, "", {}, 0

    def sample(self, where: str) -> None:
        from hybrid_ds.seam.instruments import reduce_bucket_tensors

        ipg = {t.untyped_storage().data_ptr() for t in reduce_bucket_tensors(self.engine.optimizer)}
        storages = _walk([("param", p) for p in self.engine.module.parameters()]
                         + [("optimizer", self.engine.optimizer)], ipg)
        held = sum(n for n, kind in storages.values() if kind != "reduce bucket")
        self.bucket = max(self.bucket, sum(n for n, kind in storages.values() if kind == "reduce bucket"))
        if held > self.peak:
            self.peak, self.where = held, where
            self.breakdown = {}
            for n, kind in storages.values():
                key = kind.replace("[]", "")
                self.breakdown[key] = self.breakdown.get(key, 0) + n

    def install(self) -> None:
        from hybrid_ds.seam.instruments import wrap_pipeline_instructions

        engine = self.engine
        for name, module in engine.module.named_modules():
            module.register_forward_pre_hook(lambda m, i, n=name: self.sample(f"forward {n}"))
            module.register_full_backward_hook(lambda m, gi, go, n=name: self.sample(f"backward {n}"))
        reductions = ("ReduceGrads", "ReduceTiedGrads")
        wrap_pipeline_instructions(engine, lambda kind, fn: self._around(fn, fn.__name__)
                                   if kind.__name__ in reductions else fn)
        inner = engine.optimizer
        while hasattr(inner, "optimizer"):
            inner = inner.optimizer
        inner.step = self._around(inner.step, "optimizer step")

    def _around(self, fn, where: str):
        from common import sampled_around
        return sampled_around(self.sample, fn, where)


def _measure_case(zero: int, stages: int, precision: str, world: int, bucket: int | None) -> dict:
    import torch

    from hybrid_ds.config import load_config_dict
    from hybrid_ds.runtime.engine import build_pipeline_engine, deepspeed_config
    from hybrid_ds.runtime.plan import build_plan

    cfg = load_config_dict(_state_config(zero, stages, precision, bucket))
    ids = torch.randint(0, 256, (STATE_MICRO, STATE_SEQ), generator=torch.Generator().manual_seed(0))
    if cfg.pipeline_engine:  # as hybrid_ds trains it: ZeRO 0/1 at any stages, ZeRO-2 with stages > 1
        engine = build_pipeline_engine(build_plan(cfg, world))
        probe = StateProbe(engine)
        probe.install()
        for _ in range(2):
            engine.train_batch(iter([((ids, torch.ones_like(ids)), ids)] * STATE_ACCUM))
        stage = engine.stage_id
    else:  # ZeRO-2/3 at one stage: DeepSpeed's engine on the plain Hugging Face model
        import deepspeed
        import transformers

        from hybrid_ds.seam.instruments import forget_pipeline_grid
        from hybrid_ds.models.resolve import resolve_model

        forget_pipeline_grid()  # an earlier PipelineEngine in this process left its grid as DeepSpeed's global mpu
        model = transformers.AutoModelForCausalLM.from_config(resolve_model(cfg.model).hf_config)
        ds = deepspeed_config(build_plan(cfg, world))  # as hybrid_ds.runtime.engine.build_plain_engine gets it
        ds.pop("pipeline")
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        probe = StateProbe(engine)
        probe.install()
        for _ in range(2 * STATE_ACCUM):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        stage = 0
    return {"zero": zero, "stages": stages, "precision": precision, "world": world,
            "rank": torch.distributed.get_rank(),
            "stage": stage, "bytes": probe.peak, "where": probe.where, "reduce_bucket": probe.bucket,
            "breakdown": dict(sorted(probe.breakdown.items(), key=lambda kv: -kv[1])[:8])}


def _uses_pipeline_engine(case: tuple[int, int, str]) -> bool:
    from hybrid_ds.config import load_config_dict

    return load_config_dict(_state_config(*case)).pipeline_engine


def worker(cases: list[tuple[int, int, str]], out: Path, bucket: int | None = None) -> None:
    import torch

    from hybrid_ds.runtime.engine import init_distributed

    world = init_distributed()
    results = []
    for zero, stages, precision in sorted(cases, key=_uses_pipeline_engine):  # plain engines first
        start = time.time()
        results.append(_measure_case(zero, stages, precision, world, bucket))
        results[-1]["seconds"] = time.time() - start
        torch.distributed.barrier()
    (out / f"states-rank{torch.distributed.get_rank()}.json").write_text(json.dumps(results))


def measure_states(cases: list[tuple[int, int, str]] = STATE_CASES, nproc: int = 2,
                   bucket: int | None = None) -> list[dict]:
    """Launch the worker on ``nproc`` gloo processes and return every rank's measurement.

    ``bucket`` sets ``zero_optimization.reduce_bucket_size`` (DeepSpeed's default, 5e8 elements, takes
    seconds to allocate on CPU; the test uses a small one).
    """
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        launcher = Path(sys.executable).with_name("deepspeed")
        spec = ",".join(f"{z}:{p}:{prec}" for z, p, prec in cases)
        cmd = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(port), str(Path(__file__).resolve()),
               "--worker", "--cases", spec, "--out", tmp] + (["--bucket", str(bucket)] if bucket else [])
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode:
            raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results = [r for rank in range(nproc) for r in json.loads((Path(tmp) / f"states-rank{rank}.json").read_text())]
        return [{**r, "bucket_size": bucket} for r in results]


# ---------------------------------------------------------------- report


def compare_states(measured: list[dict]) -> list[dict]:
    rows = []
    for m in measured:
        predicted = next(s for s in predict_state(m["zero"], m["stages"], m["precision"], m["world"], m["bucket_size"])
                         if s["stage"] == m["stage"])
        rows.append({**m, "predicted": predicted["bytes"], "optimizer": predicted["optimizer"],
                     "predicted_phase": predicted["phase"], "predicted_bucket": predicted["comm_buffer"],
                     "error": predicted["bytes"] / m["bytes"] - 1})
    return rows


def compare_activations(models: list[str] = ACT_MODELS, precisions=("fp32", "bf16"), attns=("sdpa", "eager")) -> list[dict]:
    rows = []
    for name in models:
        for precision in precisions:
            for attn in attns:
                measured = measure_activations(name, precision, attn)
                predicted = predict_activations(name, precision, attn)
                rows += [{"model": name, "precision": precision, "attn": attn, "part": part,
                          "measured": measured[part], "predicted": predicted[part],
                          "error": predicted[part] / measured[part] - 1 if measured[part] else 0.0}
                         for part in ("block", "embedding", "head")]
    return rows


def print_states(rows: list[dict]) -> None:
    print(f"model states per rank, {STATE_MODEL}, 2 (and 4) gloo processes, 2 optimizer steps (KiB)")
    print(f"{'ZeRO':>4} {'pp':>3} {'dp':>3} {'prec':>5} {'rank':>4} {'stage':>5}  {'optimizer':<29} {'measured':>9} "
          f"{'predicted':>9} {'error':>7}  {'bucket meas.':>12} {'bucket pred.':>12}")
    for r in rows:
        dp = r["world"] // r["stages"]
        print(f"{r['zero']:>4} {r['stages']:>3} {dp:>3} {r['precision']:>5} {r['rank']:>4} {r['stage']:>5}  "
              f"{r['optimizer']:<29} {r['bytes'] / 1024:>9.1f} {r['predicted'] / 1024:>9.1f} {r['error']:>+7.1%}  "
              + (f"{r['reduce_bucket'] / 2**20:>8.1f} MiB {r['predicted_bucket'] / 2**20:>8.1f} MiB" if r["zero"] else
                 f"{'-':>12} {'(transient)':>12}"))


def print_activations(rows: list[dict]) -> None:
    print(f"\nactivations saved for backward, seq {ACT_SEQ} x micro-batch {ACT_MICRO}, CPU (KiB)")
    print(f"{'model':<14} {'prec':>5} {'attn':>6} {'part':<10} {'measured':>9} {'predicted':>9} {'error':>7}")
    for r in rows:
        flag = "" if abs(r["error"]) <= ACTIVATION_TOLERANCE else "  <-- over 15%"
        print(f"{r['model']:<14} {r['precision']:>5} {r['attn']:>6} {r['part']:<10} {r['measured'] / 1024:>9.1f} "
              f"{r['predicted'] / 1024:>9.1f} {r['error']:>+7.1%}{flag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-states", action="store_true")
    parser.add_argument("--skip-activations", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        cases = [(int(z), int(p), prec) for z, p, prec in (c.split(":") for c in args.cases.split(","))]
        worker(cases, Path(args.out), args.bucket)
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    report: dict = {}
    start = time.time()
    if not args.skip_states:
        report["states"] = compare_states(measure_states() + measure_states(DP_CASES, nproc=4))
        print_states(report["states"])
    if not args.skip_activations:
        report["activations"] = compare_activations()
        print_activations(report["activations"])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"\n{time.time() - start:.0f} s; wrote {RESULTS}")


if __name__ == "__main__":
    main()
