"""The performance benchmarks (bench/) still run and still time the same computation on both sides."""

import doctest
import json
from pathlib import Path

import pytest
import warm_ranks

from conftest import installed_version, locked_versions

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("module", ["common", "overhead", "scaling", "default_config", "adapter_sweep", "zero2_bf16_drift"])
def test_bench_arithmetic(module, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    result = doctest.testmod(__import__(module))
    assert result.attempted > 0 and result.failed == 0


def test_overhead_bench_compares_the_same_computation(tmp_path):
    """A tiny run of bench/overhead.py: our engine and DeepSpeed's engine on the HF model (at the ZeRO stage ours
    runs), from the same weights on the same micro-batches, report the same losses and the same FLOPs per step."""
    env = {"HYBRID_DS_BENCH_RESULTS": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    args = ["--models", "gpt2-tiny", "--grad-accum", "2", "--steps", "1", "--warmup", "0", "--threads", "1",
            "--quiet-wait", "0", "--max-pairs", "1", "--baseline-zero", "same", "--out", "smoke"]
    proc = warm_ranks.script(BENCH / "overhead.py", *args, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (result,) = json.loads((tmp_path / "smoke.json").read_text())["results"]
    assert result["ours_zero_stage"] == result["baseline_zero_stage"] == 0  # like for like: ZeRO-0 at dp=1
    assert result["max_loss_diff"] < 1e-5
    assert result["work"]["ours_flops"] == result["work"]["baseline_flops"] > 0
    assert result["ours_median_s"] > 0 and result["baseline_median_s"] > 0


def test_gpu_bench_runs_on_cpu(tmp_path):
    """bench/gpu.py (run on a lent GPU) checked here on the CPU: both engines, the same losses."""
    env = {"HYBRID_DS_BENCH_RESULTS": str(tmp_path)}
    args = ["--models", "gpt2-tiny", "--seq-len", "32", "--grad-accum", "2", "--pairs", "1", "--warmup", "0",
            "--out", "gpu-smoke"]
    proc = warm_ranks.script(BENCH / "gpu.py", *args, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = json.loads((tmp_path / "gpu-smoke.json").read_text())
    (result,) = written["results"]
    assert result["max_loss_diff"] < 1e-5 and result["tokens_per_s_ours"] > 0
    stamp = written["provenance"]  # every result file says what it was measured with
    assert stamp["command"].startswith("python bench/gpu.py --models gpt2-tiny") and stamp["date"]
    assert stamp["versions"]["torch"] == installed_version("torch") and stamp["machine"]["cores"] >= 1


def test_gpu_mfu_bench_runs_on_cpu(tmp_path):
    """bench/gpu_mfu.py (issue 30's GPU run) end to end on the CPU at its tiny settings: the three engines, the
    profile, levers against their reference over two steps (selective MLP recompute: the same losses bit for bit in
    fp32; the foreach AdamW: within 1e-5 of the fused one), the estimator's memory beside each phase, and the GPU-only
    lever skipped with its reason."""
    out = tmp_path / "mfu.json"
    only = "deepspeed-hf,plain,selective-mlp,adamw-foreach,documents-flex"
    args = ["--device", "cpu", "--tiny", "--models", "llama-1b", "--only", only, "--steps", "1", "--warmup", "1",
            "--out", out]
    proc = warm_ranks.script(BENCH / "gpu_mfu.py", *args, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = json.loads(out.read_text())
    results = {r["phase"]: r for r in written["results"]}
    assert list(results) == ["pipeline", "deepspeed-hf", "plain", "documents-flex", "selective-mlp", "adamw-foreach"]
    for phase in ("pipeline", "deepspeed-hf", "plain", "selective-mlp", "adamw-foreach"):
        assert results[phase]["tokens_per_s"] > 0 and results[phase]["estimated_memory_gib"] > 0, results[phase]
    profile = results["pipeline"]["profile"]
    assert profile["top"] and 0 < profile["optimizer_share"] < 1, profile
    lever = results["selective-mlp"]  # bit-equal gradients, so the second step's loss too
    assert lever["reference"] == "pipeline" and lever["max_loss_diff"] == 0 and lever["speedup"] > 0
    assert len(lever["losses"]) == 2
    foreach = results["adamw-foreach"]  # torch's foreach AdamW takes the step the fused one takes, within rounding
    assert foreach["first_loss_diff"] == 0 and 0 <= foreach["max_loss_diff"] < 1e-5, foreach["losses"]
    assert foreach["optimizer"] == {"class": "AdamW", "fused": False, "foreach": True}
    for phase in ("pipeline", "deepspeed-hf", "plain"):  # every engine on torch's fused AdamW
        assert results[phase]["optimizer"]["class"] == "AdamW" and results[phase]["optimizer"]["fused"], phase
    assert results["documents-flex"]["skipped"].startswith("GPU only")
    assert written["provenance"]["command"].startswith("python bench/gpu_mfu.py --device cpu")


def test_adapter_sweep_classifies_accepted_and_refused_types(tmp_path):
    """bench/adapter_sweep.py on two types with the locked transformers (5.24.0, requirements-lock.txt): qwen3
    through the generic adapter bit for bit, falcon refused with its cause (ALiBi, as 5.24.0's FalconDecoderLayer
    takes it) and none of the boilerplate every refusal carries."""
    env = {"HYBRID_DS_BENCH_RESULTS": str(tmp_path)}
    args = ["--types", "qwen3,falcon", "--out", "smoke"]
    proc = warm_ranks.script(BENCH / "adapter_sweep.py", *args, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["transformers"] == locked_versions()["transformers"], "the sweep ran another transformers"
    rows = {r["type"]: r for r in result["results"]}
    assert rows["qwen3"]["outcome"] == "exact", rows["qwen3"]
    assert rows["falcon"]["outcome"] == "refused"
    assert rows["falcon"]["reason"].startswith("transformer.h.0 (FalconDecoderLayer) requires alibi")
    table = (tmp_path / "smoke.md").read_text()
    assert "| qwen3 | exact |  |" in table
    assert "| falcon | refused | transformer.h.0 (FalconDecoderLayer) requires alibi besides hidden_states" in table
    assert "exact: 1 | ok: 0 | WRONG: 0 | refused: 1 | no tiny model: 0" in table


def test_dp1_zero_bench_compares_the_same_computation(tmp_path):
    """A tiny run of bench/dp1_zero.py: fp32 ZeRO-1 at dp=1 as hybrid_ds runs it (torch's AdamW, ZeRO-0) and as
    DeepSpeed's ZeRO-1, on the same weights and micro-batches, report the same losses."""
    env = {"HYBRID_DS_BENCH_RESULTS": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    proc = warm_ranks.script(BENCH / "dp1_zero.py", "--model", "gpt2-tiny", "--steps", "2", env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "dp1_zero.json").read_text())
    assert result["optimizers"] == {"zero0": "AdamW", "zero1": "DeepSpeedZeroOptimizer"}
    assert result["max_loss_diff"] < 1e-5, result["steps"]


def test_the_readmes_bf16_drift_figures_are_the_committed_results():
    """docs/zero2-with-stages.md's "bf16 over a long run" quotes bench/results/zero2_bf16_drift.json (kept in git): each figure is the
    file's, so a rerun that moves them fails here until the README follows."""
    result = json.loads((BENCH / "results" / "zero2_bf16_drift.json").read_text())
    readme = " ".join((BENCH.parent / "docs" / "zero2-with-stages.md").read_text().split())
    drift = result["max_relative_loss_difference"]
    against_bf16, against_fp32 = drift["against bf16 zero1"], drift["against fp32 zero1"]
    steps = result["steps"]
    assert (f"Over {steps} steps at gradient accumulation 8" in readme
            and f"bf16 ZeRO-2 is at most {against_bf16[f'zero2, {steps} steps']:.2e} (relative loss)" in readme
            and f"the figure is {against_bf16[f'zero2-fp32-comm, {steps} steps']:.2e}" in readme
            and f"fp32 ZeRO-1 is {against_bf16[f'zero1-fp32, {steps} steps']:.2e} from bf16 ZeRO-1" in readme
            and f"stays within {against_fp32['zero2, 10 steps']:.2e} of fp32" in readme
            and f"bf16 ZeRO-1 is {against_fp32['zero1, 10 steps']:.2e} from it" in readme), drift
    assert result["provenance"]["versions"]["deepspeed"] == "0.19.8"


def test_the_estimator_predicts_the_measured_memory_of_both_schedules(monkeypatch):
    """bench/results/zero_bubble_memory.json (kept in git): each stage's peak up to the step's reductions, measured for
    1F1B and ZB-H1 at 4 and 8 micro-batches; the estimator as it is now predicts every one within 5% (ZB-H1's
    second stage holds its W-pending gradients besides a second micro-batch: without them it is 16% short)."""
    monkeypatch.syspath_prepend(str(BENCH))
    from zero_bubble import predict_memory

    measured = json.loads((BENCH / "results" / "zero_bubble_memory.json").read_text())
    predicted = predict_memory(measured["seq_len"])
    assert set(predicted) == set(measured["engines"]) == {"1f1b-m4", "zb-h1-m4", "1f1b-m8", "zb-h1-m8"}
    for key, stages in measured["engines"].items():
        for stage, (row, guess) in enumerate(zip(stages, predicted[key], strict=True)):
            assert abs(guess["bytes"] / row["peak_bytes"] - 1) <= 0.05, (key, stage, row, guess)
    assert measured["provenance"]["versions"]["deepspeed"] == "0.19.8"


def test_the_zero_bubble_figures_are_the_committed_results():
    """docs/zero-bubble.md's "Measured" quotes bench/results/zero_bubble.json and zero_bubble_memory.json: each figure
    is the files', so a rerun that moves them fails here until the page follows."""
    speed = json.loads((BENCH / "results" / "zero_bubble.json").read_text())
    memory = json.loads((BENCH / "results" / "zero_bubble_memory.json").read_text())
    page = " ".join((BENCH.parent / "docs" / "zero-bubble.md").read_text().split())
    rows = [speed["by_micro_batches"][m] for m in ("4", "8")]
    expected = [
        f"medians over {speed['steps']} steps",
        "| ZB-H1's step time against 1F1B's | " + " | ".join(f"{r['speedup']:+.1%}" for r in rows) + " | >= +7% |",
        "| idle, ZB-H1 over 1F1B (the more idle rank) | " + " | ".join(f"{r['idle_ratio']:.2f}x" for r in rows)
        + " | <= 0.5x |",
        "| B + W over the whole backward (stage 0, 1) | " + " | ".join(
            ", ".join(f"{x:.2f}" for x in r["b_plus_w_over_backward"]) for r in rows) + " | <= 1.05 |",
        "| simulator against the measured step (1F1B, ZB-H1) | " + " | ".join(
            f"{r['1f1b']['error']:+.1%}, {r['zb-h1']['error']:+.1%}" for r in rows) + " | within 5% |",
        "| simulator's ZB-H1 gain from the measured passes | " + " | ".join(
            f"{r['predicted']['1f1b'] / r['predicted']['zb-h1'] - 1:+.1%}" for r in rows) + " | |",
        *(f"p={w['stages']}, m={w['micro_batches']}: {w['speedup']:+.1%}" for w in speed["predicted_wider"]),
    ]
    spread = [max(e["steps_s"]) / min(e["steps_s"]) for e in speed["ranks"][0].values()]
    expected.append(f"slowest of the {speed['steps']} steps took {min(spread):.2f}x to {max(spread):.2f}x its fastest")
    for key in ("1f1b-m4", "zb-h1-m4", "1f1b-m8", "zb-h1-m8"):
        stages = memory["engines"][key]
        expected.append(f"| {key} | " + " | ".join(f"{s['peak_bytes'] / 2**20:.1f} MiB ({s['error']:+.1%})"
                                                    for s in stages) + " |")
    missing = [line for line in expected if line not in page]
    assert not missing, missing


def test_the_readmes_performance_tables_are_rendered_from_the_committed_results(monkeypatch):
    """docs/performance.md's tables are generated blocks (bench/readme_tables.py) of bench/results/performance.json
    and the GPU run under bench/measured/: the text equals what the files give, and a figure typed over fails."""
    monkeypatch.syspath_prepend(str(BENCH))
    import readme_tables

    text = readme_tables.README.read_text()
    sources = [match.group(2) for match in readme_tables.BLOCK.finditer(text)]
    assert sources == ["bench/results/performance.json", "bench/measured/gpu-h100.json"]
    assert readme_tables.render(text) == text, "run python bench/readme_tables.py"
    typed_over = text.replace("| 130,975 |", "| 131,975 |")
    assert typed_over != text and readme_tables.render(typed_over) == text
    performance = json.loads((BENCH / "results" / "performance.json").read_text())
    assert performance["provenance"]["versions"]["deepspeed"] == "0.19.8" and not performance["errors"]


def test_the_readmes_model_type_lists_are_the_committed_sweeps(monkeypatch):
    """docs/models.md's generated list of supported model types is what bench/results/adapter_sweep.json gives, and its LoRA
    sweep counts (docs/fine-tuning.md) are bench/results/adapter_sweep_lora.json's."""
    monkeypatch.syspath_prepend(str(BENCH))
    import adapter_sweep

    from hybrid_ds.config.families import FAMILIES

    readme = (BENCH.parent / "docs" / "models.md").read_text()
    lora_page = (BENCH.parent / "docs" / "fine-tuning.md").read_text()
    plain = json.loads((BENCH / "results" / "adapter_sweep.json").read_text())
    named = {name: family.task for name, family in FAMILIES.items()}
    assert adapter_sweep.replace_between_markers(readme, adapter_sweep.readme_section(plain["results"], named)) == readme
    lora = [r["outcome"] for r in json.loads((BENCH / "results" / "adapter_sweep_lora.json").read_text())["results"]]
    assert (f"of {len(lora)}, {lora.count('exact')} bit for bit and {lora.count('ok')} within 1e-5; "
            f"{lora.count('refused')} refused") in " ".join(lora_page.split())


def test_the_estimator_predicts_the_measured_sequence_parallel_activations(monkeypatch):
    """bench/results/sequence_parallel_memory.json (kept in git): saved-for-backward bytes per rank at sp=1 and sp=2,
    2k to 32k tokens, causal and document masks; the estimator as it is now predicts every one within 5%, and
    sp=2 halves the causal runs' bytes (within 10% of half) where the document mask, whole on every rank, keeps
    the documents' runs above it."""
    monkeypatch.syspath_prepend(str(BENCH))
    from sequence_parallel_memory import estimated_bytes

    measured = json.loads((BENCH / "results" / "sequence_parallel_memory.json").read_text())
    assert {(r["seq_len"], r["documents"]) for r in measured["rows"]} == {
        (2048, False), (2048, True), (8192, False), (8192, True), (32768, False)}
    for row in measured["rows"]:
        for sp, bytes_ in ((1, row["sp1_bytes"]), (2, max(row["sp2_bytes"]))):
            guess = estimated_bytes(row["seq_len"], row["documents"], sp)
            assert abs(guess / bytes_ - 1) <= 0.05, (row, sp, guess)
        assert (max(row["sp2_bytes"]) <= 0.55 * row["sp1_bytes"]) == (not row["documents"]), row
    assert measured["provenance"]["versions"]["deepspeed"] == "0.19.8"


def test_the_sequence_parallel_page_quotes_the_committed_results():
    """docs/sequence-parallel.md's two tables are bench/results/sequence_parallel_memory.json's and
    tiled_mlp_memory.json's rows: a rerun that moves them fails here until the page follows."""
    page = (BENCH.parent / "docs" / "sequence-parallel.md").read_text()
    sp = json.loads((BENCH / "results" / "sequence_parallel_memory.json").read_text())
    tiled = json.loads((BENCH / "results" / "tiled_mlp_memory.json").read_text())
    expected = [f"| {r['seq_len']:,} | {'documents' if r['documents'] else 'causal'} | {r['sp1_bytes'] / 2**20:.1f} MiB | "
                f"{max(r['sp2_bytes']) / 2**20:.1f} MiB | {r['ratio']:.3f} | "
                + ", ".join(f"{x:+.1%}" for x in r["estimate_error"]) + " |" for r in sp["rows"]]
    for r in tiled["rows"]:
        cells = ["untiled", f"{r['peak_bytes'] / 2**20:.1f} MiB", "", ""] if r["tiles"] == 0 else [
            str(r["tiles"]), f"{r['peak_bytes'] / 2**20:.1f} MiB", f"{r['peak_ratio']:.2f}x", f"{r['time_ratio']:.2f}x"]
        expected.append(f"| {r['seq_len']:,} | " + " | ".join(cells) + " |")
    missing = [line for line in expected if line not in page]
    assert not missing, missing
    assert len(tiled["rows"]) == 6 and tiled["provenance"]["versions"]["deepspeed"] == "0.19.8"


def test_the_performance_page_quotes_the_selective_checkpoint_results():
    """docs/performance.md's selective-checkpointing table is bench/results/selective_checkpoint_memory.json's rows;
    the MLP saves at least a third of the peak, the attention less, and the estimator's saving errs as the page says."""
    page = (BENCH.parent / "docs" / "performance.md").read_text()
    measured = json.loads((BENCH / "results" / "selective_checkpoint_memory.json").read_text())
    expected = []
    for r in measured["rows"]:
        cells = ["none", f"{r['peak_bytes'] / 2**20:.1f} MiB", "", "", "", ""] if r["part"] is None else [
            r["part"], f"{r['peak_bytes'] / 2**20:.1f} MiB", f"{r['peak_ratio']:.2f}x", f"{r['time_ratio']:.2f}x",
            f"{r['measured_saving'] / 2**20:.1f} MiB", f"{r['estimated_saving'] / 2**20:.1f} MiB ({r['saving_error']:+.1%})"]
        expected.append(f"| {r['seq_len']:,} | " + " | ".join(cells) + " |")
    missing = [line for line in expected if line not in page]
    assert not missing, missing
    parts = {(r["seq_len"], r["part"]): r for r in measured["rows"]}
    for length in (2048, 8192):
        assert parts[length, "mlp"]["peak_ratio"] < 0.67 and 0.67 < parts[length, "attention"]["peak_ratio"] < 1
        assert parts[length, "mlp"]["goal_met"] and not parts[length, "attention"]["goal_met"]
    assert measured["provenance"]["versions"]["deepspeed"] == "0.19.8"


def test_the_performance_page_quotes_the_float8_loss_results():
    """docs/performance.md's Float8 row is bench/results/float8_loss.json's: 50 bf16 steps at 2 stages, every step's
    loss within 1% of bf16's, and float8 really on (the two runs' losses differ)."""
    page = (BENCH.parent / "docs" / "performance.md").read_text()
    measured = json.loads((BENCH / "results" / "float8_loss.json").read_text())
    assert (f"over {measured['steps']} bf16 training steps at 2 stages the loss within "
            f"{measured['max_relative_diff']:.2%} of bf16's at every step, {measured['last10_mean_relative_diff']:.2%} "
            "over the last 10") in page
    assert measured["steps"] == 50 and measured["goal_met"] and 0 < measured["max_relative_diff"] <= 0.01
    assert measured["losses_float8"][-1] < measured["losses_float8"][0] - 3  # it trained
    assert measured["provenance"]["versions"]["deepspeed"] == "0.19.8"
