"""GPU-only checks (marked ``gpu``): bf16 parity on CUDA, the GPU benchmark, and the shipped config training.

Skipped without a CUDA device (tests/conftest.py); on a GPU machine run them with ``pytest -m gpu``.
Each takes well under a minute on one GPU. The process-level ones set ``DS_ACCELERATOR=cuda`` for their
subprocess: conftest.py puts DeepSpeed on its CPU accelerator for the rest of the suite.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


def cuda_env(**extra: str) -> dict[str, str]:
    """The environment of a one-GPU subprocess: DeepSpeed on CUDA, a free rendezvous port, no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**os.environ, "DS_ACCELERATOR": "cuda", "HF_HUB_OFFLINE": "1", "MASTER_PORT": str(port),
            **extra}


def bf16_parity(name: str, stages: int, folder: Path, device: str) -> dict[str, float]:
    """The pipeline's stages and the HF model, both bf16 on ``device``, on one padded batch; relative diffs."""
    from hybrid_ds.config import ModelConfig, load_config_dict
    from hybrid_ds.models.head_loss import materialize
    from hybrid_ds.models.resolve import auto_class, resolve_model
    from hybrid_ds.runtime.parity import sample_batch
    from hybrid_ds.runtime.pipeline import SequentialStages
    from hybrid_ds.runtime.plan import build_plan

    resolved = resolve_model(ModelConfig(name=name))
    auto = auto_class(resolved.family)
    torch.manual_seed(0)
    auto.from_config(resolved.hf_config).save_pretrained(folder)
    cfg = load_config_dict({"model": {"name": str(folder), "pretrained": True}, "pipeline": {"stages": stages},
                            "data": {"seq_len": 64, "document_mask": False},  # padded rows, not packed documents
                            "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}})
    batch = {k: v.to(device) for k, v in sample_batch(resolved.hf_config.vocab_size, 64, resolved.family.task,
                                                       pad_last=5).items()}
    inputs = (batch["input_ids"], batch["attention_mask"])
    if resolved.family.task_info.token_types:
        inputs += (batch["token_type_ids"],)
    else:
        batch.pop("token_type_ids")

    fp32 = auto.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        fp32_loss = fp32(**{k: v.cpu() for k, v in batch.items()}).loss.item()
    pipe = SequentialStages(build_plan(cfg, world_size=stages))
    for module in pipe.modules():
        module.to(device).eval()
    outputs = pipe.forward(inputs)  # HeadLogits: the fused loss (train.fused_loss) computes them by blocks
    loss = pipe.loss_fn(outputs, batch["labels"])
    logits = materialize(outputs).detach()
    loss.backward()
    hf = auto.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    labels = batch.pop("labels")
    out = hf(**batch)
    # The same fp32 loss on both sides: HF's causal LMs take it in fp32 too, but BertForMaskedLM takes a
    # bf16 cross-entropy of bf16 logits (0.02 off on bert-tiny), where the pipeline takes transformers' fp32 one.
    out.loss = pipe.loss_fn(out.logits, labels)
    out.loss.backward()

    assert logits.dtype == torch.bfloat16 and logits.device.type == torch.device(device).type
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    grads = pipe.named_gradients()
    assert set(grads) == set(hf_grads), set(grads) ^ set(hf_grads)
    scale = out.logits.float().abs().max().item()
    return {"loss": abs(loss.item() - out.loss.item()), "fp32_loss": abs(loss.item() - fp32_loss),
            "logits": (logits.float() - out.logits.float()).abs().max().item() / scale,
            "grads": max(((grads[n].float() - g.float()).abs().max() / g.float().abs().max().clamp_min(1e-12)).item()
                         for n, g in hf_grads.items())}


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_bf16_pipeline_matches_hf_on_cuda(name, stages, tmp_path):
    """bf16 on CUDA: the stages give the HF model's loss, logits and gradients within bf16 rounding
    (8 bits of mantissa: 2^-8 = 0.4% per value), and both stay near the fp32 loss."""
    diffs = bf16_parity(name, stages, tmp_path, "cuda")
    assert diffs["loss"] <= 2e-2 and diffs["fp32_loss"] <= 5e-2, diffs
    assert diffs["logits"] <= 2e-2 and diffs["grads"] <= 5e-2, diffs


def test_gpu_bench_runs_on_cuda(tmp_path):
    """bench/gpu.py on the GPU (bf16, ZeRO-1): both engines train the same model to the same losses."""
    args = ["--models", "gpt2-tiny", "--seq-len", "128", "--grad-accum", "2", "--pairs", "2", "--warmup", "1",
            "--out", "gpu-smoke"]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), *args], capture_output=True, text=True,
                          env=cuda_env(HYBRID_DS_BENCH_RESULTS=str(tmp_path)), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "gpu-smoke.json").read_text())
    (result,) = out["results"]
    assert out["device"] != "cpu" and result["peak_memory_gib"] > 0, out["device"]
    assert len(result["losses_ours"]) == len(result["losses_baseline"]) == 3
    assert all(math.isfinite(x) for x in result["losses_ours"] + result["losses_baseline"])
    assert result["max_loss_diff"] < 1e-2, (result["losses_ours"], result["losses_baseline"])
    assert result["tokens_per_s_ours"] > 0 and result["tokens_per_s_baseline"] > 0
    assert 0 < result["mfu_spec_ours"] < 1


def test_shipped_gpt_config_trains_on_one_gpu(tmp_path):
    """configs/gpt.json as README's one-GPU run (on_gpu: bf16; pipeline.stages=1 on the PipelineEngine,
    ZeRO-1), 2 steps of GPT-2 small at seq_len 1024 with an eval and a checkpoint."""
    sets = ["pipeline.stages=1", "train.max_steps=2", "train.eval_interval=2", "train.eval_batches=2",
            "train.save_interval=2", f"train.save_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'data'}"]
    command = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "gpt.json")]
    command += [arg for key in sets for arg in ("--set", key)]
    proc = subprocess.run(command, capture_output=True, text=True, env=cuda_env(), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["losses"]) == 2, summary
    assert 9.5 < summary["first_loss"] < 11.5 and math.isfinite(summary["eval_loss"]), summary  # ~ln(50257) = 10.8
    assert json.loads((tmp_path / "run" / "run.json").read_text())["bf16"]["enabled"] is True
    # The PipelineEngine writes one file per layer (the plain engine of ZeRO-2/3 writes none).
    assert (tmp_path / "run" / "step_2" / "layer_00-model_states.pt").is_file()


def _train_on_gpu(config: dict, save_dir: Path, *extra: str) -> list[float]:
    """launch/train.py on one GPU with ``config`` saving to ``save_dir``; the losses of the whole run (a resumed one's
    include the steps before its checkpoint)."""
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    path = save_dir.parent / f"{save_dir.name}.json"
    path.write_text(json.dumps({**config, "train": {**config["train"], "save_dir": str(save_dir)}}))
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(path), *extra],
                          capture_output=True, text=True, env=cuda_env(), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((save_dir / "summary.json").read_text())["losses"]


def test_a_resume_on_the_gpu_continues_exactly_with_dropout(tmp_path):
    """fp32 gpt2-tiny with dropout on, one GPU: stopped after step 2 and resumed, steps 3-4 give the uninterrupted
    run's losses (1e-5), because the checkpoint holds the CUDA generator's state (rng-rank0.pt "device"). Control:
    the same resume with that state removed from the checkpoint draws other dropout masks and misses by more."""
    import shutil

    config = {"model": {"name": "gpt2-tiny", "vocab_from_tokenizer": True},
              "data": {"seq_len": 32, "cache_dir": str(tmp_path / "data")}, "pipeline": {"stages": 1},
              "train": {"max_steps": 4, "save_interval": 2, "eval_interval": 0},
              "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 2e-3}}}
    straight = _train_on_gpu(config, tmp_path / "straight")
    rng = torch.load(tmp_path / "straight" / "step_2" / "rng-rank0.pt", weights_only=False)
    assert rng["device"].numel() == torch.cuda.get_rng_state().numel()  # the CUDA generator, not the CPU one
    results = {}
    for name in ("resumed", "without-device-state"):
        shutil.copytree(tmp_path / "straight", tmp_path / name,
                        ignore=shutil.ignore_patterns("step_4", "summary.json", "universal"))
        (tmp_path / name / "latest").write_text("step_2")
        if name == "without-device-state":
            del rng["device"]
            torch.save(rng, tmp_path / name / "step_2" / "rng-rank0.pt")
        results[name] = _train_on_gpu(config, tmp_path / name, "--resume")
    assert len(results["resumed"]) == 4 and results["resumed"][:2] == straight[:2]  # the summary: the whole run
    assert max(abs(a - b) for a, b in zip(straight[2:], results["resumed"][2:])) < 1e-5, (straight, results)
    assert max(abs(a - b) for a, b in zip(straight[2:], results["without-device-state"][2:])) > 1e-4, (straight, results)


def _stages_on_cuda(name: str, inputs: tuple, labels: torch.Tensor, train: dict | None = None,
                    **model: str) -> tuple[float, dict, list[str]]:
    """Loss, gradients and the classes of the modules built, of ``name`` (random init of train.seed: the same weights
    every call) in 2 bf16 stages on CUDA, packed documents on (data.document_mask), dropout off."""
    from hybrid_ds.config import load_config_dict
    from hybrid_ds.runtime.pipeline import SequentialStages
    from hybrid_ds.runtime.plan import build_plan

    overrides = {"qwen2-tiny": {"use_sliding_window": True, "sliding_window": 8,
                                "layer_types": ["sliding_attention", "full_attention"]}}.get(name, {})
    cfg = load_config_dict({"model": {"name": name, "overrides": overrides, **model}, "pipeline": {"stages": 2},
                            "data": {"seq_len": inputs[0].shape[1], "document_mask": True},
                            "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "train": train or {}})
    pipe = SequentialStages(build_plan(cfg, world_size=2))
    assert pipe.plan.resolved.hf_config._attn_implementation == model.get("attn_implementation", "sdpa")
    for module in pipe.modules():
        module.to("cuda").eval()
    loss = pipe.loss_fn(pipe.forward(tuple(t.cuda() for t in inputs)), labels.cuda())
    loss.backward()
    built = [f"{type(m).__module__}.{type(m).__name__}" for module in pipe.modules() for m in module.modules()]
    return loss.item(), pipe.named_gradients(), built


def _close_in_bf16(a: tuple, b: tuple) -> None:
    """Loss within 1e-2 and every gradient within 5e-2 of its largest element: bf16 rounding (8 significant bits),
    the tolerance of test_bf16_pipeline_matches_hf_on_cuda."""
    assert abs(a[0] - b[0]) <= 1e-2, (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for key, g in a[1].items():
        scale = g.float().abs().max().clamp_min(1e-12)
        assert ((b[1][key].float() - g.float()).abs().max() / scale).item() <= 5e-2, key


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
def test_flex_attention_trains_packed_documents_as_sdpa_does(name):
    """model.attn_implementation flex_attention (FlexAttention's block mask of the documents, qwen2's sliding-window
    layers too) against sdpa's dense mask: the same loss and gradients within bf16 rounding."""
    from test_document_mask import documents, packed_batch

    inputs, labels = packed_batch(documents(), document_mask=True)
    _close_in_bf16(_stages_on_cuda(name, inputs, labels, attn_implementation="sdpa"),
                   _stages_on_cuda(name, inputs, labels, attn_implementation="flex_attention"))


def test_liger_kernels_train_llama_as_its_own_layers_do(monkeypatch):
    """bench/gpu_mfu.py's "liger" lever: Liger's RMSNorm, rotary and SwiGLU kernels patched into transformers' Llama
    classes (undone after the test) give the HF layers' loss and gradients within bf16 rounding."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    from test_document_mask import documents, packed_batch

    inputs, labels = packed_batch(documents(), document_mask=True)
    plain = _stages_on_cuda("llama-tiny", inputs, labels)
    for name in ("LlamaRMSNorm", "LlamaMLP", "apply_rotary_pos_emb"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))  # restored at teardown
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False)
    assert modeling_llama.LlamaRMSNorm.__module__.startswith("liger_kernel")
    patched = _stages_on_cuda("llama-tiny", inputs, labels)
    assert not any(name.startswith("liger_kernel") for name in plain[2])
    assert sum(name.startswith("liger_kernel") for name in patched[2]) >= 4 * 3  # per block: 2 norms and the MLP
    _close_in_bf16(plain, patched)


def test_float8_trains_llama_within_float8_rounding_on_cuda():
    """train.float8 on CUDA (torchao's float8 matmuls, Hopper): every linear layer of the blocks converted (7 in each
    of 4), the loss within 1e-2 of bf16's but not equal to it, and every gradient at cosine >= 0.98 (the CPU check,
    tests/float8_checks.py, holds fp32 to 1e-3 relative and the same cosine)."""
    pytest.importorskip("torchao")
    from test_document_mask import documents, packed_batch

    inputs, labels = packed_batch(documents(), document_mask=True)
    loss, grads, _ = _stages_on_cuda("llama-tiny", inputs, labels)
    loss8, grads8, built = _stages_on_cuda("llama-tiny", inputs, labels, train={"float8": True})
    assert sum(name.endswith(".Float8Linear") for name in built) == 4 * 7, built
    assert abs(loss8 - loss) <= 1e-2 and loss8 != loss and grads.keys() == grads8.keys()
    for key, g in grads.items():
        cosine = torch.nn.functional.cosine_similarity(g.float().flatten(), grads8[key].float().flatten(), dim=0)
        assert cosine >= 0.98, key
