"""Peak memory of building pipeline stage 0 of 4 against building the whole model (~1.1B Llama, fp32, CPU).

Four measurements, each in a fresh process so that its peak RSS (``ru_maxrss``) is its own:

* whole, random init: ``AutoModelForCausalLM.from_config(config)``
* whole, loaded:      ``AutoModelForCausalLM.from_pretrained(folder)``
* stage 0, random init / loaded: stage 0's DeepSpeed layer specs (``stage_builder`` -> ``layer_specs`` ->
  ``spec_boundaries``) built one by one, as rank 0 of a 4-stage pipeline builds them, with
  ``model.pretrained`` false / true.

Each process sums every parameter it built before its peak is read: checkpoint tensors are memory-mapped
and count in RSS only once touched. The model is TinyLlama-1.1B's shape (untied), saved once with
``save_pretrained`` to a temporary folder (~4.4 GB, deleted at the end).

Two ratios are reported. ``raw``: peak RSS of the stage process / peak RSS of the whole-model process,
nothing subtracted (each process imports only what its path needs: the stage process also imports
DeepSpeed and hybrid_ds). ``net``: the same after subtracting each process's own RSS right after its
imports, i.e. the memory the build itself added.

Usage: ``python bench/build_memory.py [--layers 22] [--stages 4]``; writes bench/results/build_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T, config.json): 1.10B parameters.
TINYLLAMA = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGET = 0.35
RESULTS = Path(__file__).resolve().parent / "results" / "build_memory.json"
CASES = [("whole", "init"), ("stage", "init"), ("whole", "load"), ("stage", "load")]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def save_model(folder: Path, layers: int) -> None:
    """The checkpoint, written once with save_pretrained (in its own process).

    Filled with uniform noise on an empty model rather than the model's own init: the values do not
    matter to memory, and a 1.1B ``from_config`` init takes about a minute on 2 cores.
    """
    import torch
    import transformers

    config = transformers.CONFIG_MAPPING["llama"](**{**TINYLLAMA, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.05, 0.05, generator=generator)
    model.save_pretrained(folder)


def build_whole(folder: Path, mode: str, stages: int) -> tuple[list, dict]:
    import torch
    import transformers

    if mode == "load":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        config = transformers.AutoConfig.from_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[-1] == TINYLLAMA["vocab_size"]
    return [model], {}


def build_stage(folder: Path, mode: str, stages: int) -> tuple[list, dict]:
    import torch

    from hybrid_ds.config import load_config_dict
    from hybrid_ds.runtime.pipeline import layer_specs, spec_boundaries, stage_builder
    from hybrid_ds.runtime.plan import build_plan

    cfg = load_config_dict({"model": {"name": str(folder), "pretrained": mode == "load"},
                            "pipeline": {"stages": stages}, "data": {"seq_len": 8},
                            "train_micro_batch_size_per_gpu": 1})
    plan = build_plan(cfg, world_size=stages)
    specs, units = layer_specs(stage_builder(plan))
    lo, hi = spec_boundaries(plan.boundaries, units)[:2]
    modules = [spec.build() for spec in specs[lo:hi]]
    for module in modules:
        module.eval()
    x = (torch.arange(8).unsqueeze(0), torch.ones(1, 8, dtype=torch.long))
    with torch.no_grad():
        for module in modules:
            x = module(x)
    assert x[0].shape == (1, 8, TINYLLAMA["hidden_size"])
    return modules, {"planned_params": plan.stage_plans[0].params, "total_params": plan.total_params,
                     "layers": plan.stage_plans[0].layer_names}


def measure(what: str, mode: str, folder: Path, stages: int) -> dict:
    """Runs in a fresh process: imports, build, touch every parameter, report peak RSS."""
    import torch

    if what == "stage":
        import deepspeed.pipe  # noqa: F401  (what a stage needs, imported before the baseline is read)

        import hybrid_ds.runtime.pipeline  # noqa: F401
    else:
        import transformers  # noqa: F401
    after_imports = peak_rss_mib()
    start = time.perf_counter()
    modules, info = (build_stage if what == "stage" else build_whole)(folder, mode, stages)
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        seen.update({id(p): p for p in module.parameters()})
    with torch.no_grad():
        checksum = sum(p.sum().item() for p in seen.values())  # reads every page, allocates nothing big
    params = sum(p.numel() for p in seen.values())
    result = {"what": what, "mode": mode, "params": params, "checksum": checksum,
              "after_imports_mib": after_imports, "peak_mib": peak_rss_mib(),
              "seconds": time.perf_counter() - start, **info}
    return result


def run_child(*args: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=TINYLLAMA["num_hidden_layers"])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--folder", type=Path, help="reuse (or create and keep) the saved model here; "
                                                     "default: a temporary folder, deleted at the end")
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--save", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save:
        return save_model(Path(args.save), args.layers)
    if args.child:
        what, mode, folder = args.child
        return print(json.dumps(measure(what, mode, Path(folder), args.stages)))

    folder = args.folder or Path(tempfile.mkdtemp(prefix="hybrid_ds_build_memory_"))
    try:
        if not (folder / "config.json").is_file():
            start = time.perf_counter()
            run_child("--save", str(folder), "--layers", str(args.layers))
            print(f"saved a {args.layers}-layer TinyLlama-shaped model to {folder} in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        if layers != args.layers:
            raise SystemExit(f"{folder} holds a {layers}-layer model, not {args.layers}")
        results = [run_child("--child", what, mode, str(folder), "--stages", str(args.stages))
                   for what, mode in CASES]
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    report(results, args)


def report(results: list[dict], args: argparse.Namespace) -> None:
    by = {(r["what"], r["mode"]): r for r in results}
    stage = by["stage", "init"]
    summary = {"model": {**TINYLLAMA, "num_hidden_layers": args.layers}, "stages": args.stages,
               "stage0_layers": stage["layers"], "total_params": stage["total_params"],
               "stage0_params": stage["planned_params"],
               "param_fraction": stage["planned_params"] / stage["total_params"], "target": TARGET,
               "measurements": results, "ratios": {}}
    print(f"\n{'build':<15} {'params':>14} {'after imports':>14} {'peak RSS':>10} {'net':>10} {'seconds':>8}")
    for r in results:
        print(f"{r['what'] + ' ' + r['mode']:<15} {r['params']:>14,} {r['after_imports_mib']:>10.0f} MiB "
              f"{r['peak_mib']:>6.0f} MiB {r['peak_mib'] - r['after_imports_mib']:>6.0f} MiB {r['seconds']:>8.1f}")
    names = stage["layers"]
    print(f"\nstage 0 of {args.stages} holds {names[0]}{' .. ' + names[-1] if len(names) > 1 else ''} "
          f"({summary['param_fraction']:.1%} of the parameters)")
    for mode in ("init", "load"):
        whole, part = by["whole", mode], by["stage", mode]
        raw = part["peak_mib"] / whole["peak_mib"]
        net = (part["peak_mib"] - part["after_imports_mib"]) / (whole["peak_mib"] - whole["after_imports_mib"])
        summary["ratios"][mode] = {"raw": raw, "net": net}
        print(f"{mode:<5} stage/whole peak RSS: raw {raw:.3f}, net of imports {net:.3f}  "
              f"(target raw <= {TARGET}: {'met' if raw <= TARGET else 'MISSED'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
