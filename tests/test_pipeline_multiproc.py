"""Real DeepSpeed pipelines on CPU (gloo, 2 or 4 ranks forked by tests/warm_ranks.py) against references.

The reference is the original Hugging Face model trained in one process with torch's AdamW on the
same micro-batches (the loss of a step is the mean of its micro-batch losses, as DeepSpeed's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import warm_ranks
import torch

from hybrid_ds.config import TrainConfig
from hybrid_ds.models.masks import document_positions
from hybrid_ds.runtime.engine import parameter_groups
from hybrid_ds.runtime.parity import sample_batch

pytestmark = pytest.mark.multiproc

WORKER = Path(__file__).parent / "workers" / "pipeline_steps.py"
NO_DROPOUT = {
    "gpt2-tiny": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "bert-tiny": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "llama-tiny": {},
}
ADAMW = {"lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
MICRO, GAS, SEQ = 2, 4, 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved random init of each tiny preset (dropout off), the starting point of every run."""
    import transformers

    from hybrid_ds.config import ModelConfig
    from hybrid_ds.models.resolve import resolve_model

    out = {}
    for name, overrides in NO_DROPOUT.items():
        resolved = resolve_model(ModelConfig(name=name, overrides=overrides))
        auto = transformers.AutoModelForMaskedLM if name == "bert-tiny" else transformers.AutoModelForCausalLM
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        auto.from_config(resolved.hf_config).save_pretrained(folder)
        out[name] = folder
    return out


def make_batches(name: str, steps: int) -> list[dict[str, torch.Tensor]]:
    """The same GAS micro-batches every step (random tokens: only repetition makes the loss fall)."""
    task = "masked_lm" if name == "bert-tiny" else "causal_lm"
    batches = []
    for i in range(GAS):
        b = sample_batch(256, SEQ, task, batch=MICRO, seed=100 + i)
        if task == "causal_lm":
            b.pop("token_type_ids")
        batches.append(b)
    return batches * steps


def launch(tmp_path: Path, folder: Path, batches, stages: int, nproc: int, steps: int, *extra: str,
           failing: bool = False, **ds) -> dict:
    """The worker's results, or with ``failing`` its process (which must have failed)."""
    run = tmp_path / f"run-pp{stages}-n{nproc}-z{ds.get('zero_optimization', {}).get('stage', 0)}{''.join(extra)}"
    run.mkdir()
    # Hugging Face's loss on the full logits: parameters after Adam steps are compared with the HF model's to 1e-5,
    # and Adam turns the fused loss's other rounding of gradients that are zero in exact arithmetic (GPT-2's key
    # biases) into steps of the learning rate's size. The fused loss is checked in tests/test_fused_loss_multiproc.py.
    config = {"model": {"name": str(folder), "pretrained": True}, "data": {"seq_len": SEQ},
              "train": {"fused_loss": False},
              "pipeline": {"stages": stages}, "train_micro_batch_size_per_gpu": MICRO,
              "gradient_accumulation_steps": GAS, "optimizer": {"type": "AdamW", "params": ADAMW},
              "steps_per_print": 1000, **ds}
    (run / "config.json").write_text(json.dumps(config))
    torch.save(batches, run / "batches.pt")
    argv = ["--config", run / "config.json", "--batches", run / "batches.pt", "--steps", steps, "--out", run, *extra]
    proc = warm_ranks.run(WORKER, argv, nproc)
    if failing:
        assert proc.returncode != 0
        return proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(run / f"params-rank{r}.pt") for r in range(nproc)]
    return {"losses": json.loads((run / "losses.json").read_text()), "ranks": ranks}


def reference(name: str, folder: Path, batches, steps: int, clip: float = 0.0, model=None, dp: int = 1,
              documents: bool = False) -> dict:
    """Plain torch: the HF model (or ``model``: a peft model of it), AdamW (hybrid_ds's default parameter groups),
    loss / (GAS x dp) per micro-batch (a step of ``dp`` ranks' GAS micro-batches each), optional clip_grad_norm_.
    ``documents``: the attention masks hold document ids (data.document_mask), given to the model as transformers'
    packed sequences: positions restarting at each document, no padding mask."""
    import transformers

    auto = transformers.AutoModelForMaskedLM if name == "bert-tiny" else transformers.AutoModelForCausalLM
    model = model or auto.from_pretrained(folder, dtype=torch.float32)
    groups = parameter_groups(model, TrainConfig.model_fields["no_weight_decay"].default)  # no decay on 1-D, tables
    optimizer = torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]),
                                  eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])

    def loss_of(b):
        kwargs = {k: v for k, v in b.items() if k != "token_type_ids"}
        if documents:
            kwargs["position_ids"] = document_positions(kwargs.pop("attention_mask"))
        return model(**kwargs, **({"use_cache": False} if documents else {})).loss

    accum = GAS * dp
    with torch.no_grad():
        losses = [sum(loss_of(b).item() for b in batches[:accum]) / accum]
    norms = []
    for step in range(steps):
        step_losses = []
        for b in batches[step * accum:(step + 1) * accum]:
            loss = loss_of(b)
            (loss / accum).backward()
            step_losses.append(loss.item())
        if clip:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(sum(step_losses) / accum)
    return {"losses": losses, "params": dict(model.named_parameters()), "norms": norms}


def assert_params_match(ranks: list[dict], ref_params: dict, atol: float = 1e-5) -> None:
    """Every parameter within ``atol``, but for GPT-2's key biases (the middle third of ``c_attn.bias``): softmax
    does not change when a query's scores all move by the same amount, so their gradient is zero in exact arithmetic
    and what both sides compute is rounding, which Adam turns into steps of up to the learning rate either way (seen
    1.2e-5 apart after 5 steps on one CPU, 1e-9 for the query and value thirds); those are held to 5 of them."""
    seen = set()
    for rank in ranks:
        for key, value in rank["params"].items():
            ref = ref_params[key].detach()
            if key.endswith("attn.c_attn.bias"):
                (q, k, v), (ref_q, ref_k, ref_v) = value.chunk(3, -1), ref.chunk(3, -1)
                torch.testing.assert_close(torch.cat([q, v]), torch.cat([ref_q, ref_v]), atol=atol, rtol=1e-5, msg=key)
                assert (k - ref_k).abs().max() <= 5 * ADAMW["lr"], key
            else:
                torch.testing.assert_close(value, ref, atol=atol, rtol=1e-5, msg=key)
            seen.add(key)
    assert seen == set(ref_params), set(ref_params) ^ seen  # named_parameters lists a tied weight once


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_pipeline_two_stages_matches_hf_and_one_stage(name, folders, tmp_path):
    steps = 5
    batches = make_batches(name, steps)
    ref = reference(name, folders[name], batches, steps)
    pp2 = launch(tmp_path, folders[name], batches, stages=2, nproc=2, steps=steps)
    pp1 = launch(tmp_path, folders[name], batches, stages=1, nproc=1, steps=steps)

    assert pp2["losses"][0] == pytest.approx(ref["losses"][0], abs=1e-5)  # the fixed batch, before training
    assert pp2["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert pp2["losses"] == pytest.approx(pp1["losses"], abs=1e-5)
    assert pp2["losses"][-1] < pp2["losses"][0]
    assert {r["stage"] for r in pp2["ranks"]} == {0, 1}
    assert_params_match(pp2["ranks"], ref["params"])
    first, last = (r["params"] for r in sorted(pp2["ranks"], key=lambda r: r["stage"]))
    shared = set(first) & set(last)
    if name != "llama-tiny":  # gpt2 and bert tie the output projection to the token embedding
        assert shared, "tied weight should live on both stages"
    for key in shared:
        assert torch.equal(first[key], last[key]), f"tied copies of {key} diverged"


@pytest.mark.parametrize("zero", [0, 1])
def test_gradient_clipping_uses_the_global_norm(zero, folders, tmp_path):
    """pp=2 with gradient_clipping 1.0 equals torch's clip_grad_norm_ over the whole model."""
    steps = 3
    batches = make_batches("gpt2-tiny", steps)
    ref = reference("gpt2-tiny", folders["gpt2-tiny"], batches, steps, clip=1.0)
    assert min(ref["norms"]) > 1.0, f"clipping must be active for this test to mean anything: {ref['norms']}"
    run = launch(tmp_path, folders["gpt2-tiny"], batches, stages=2, nproc=2, steps=steps,
                 gradient_clipping=1.0, zero_optimization={"stage": zero})
    assert run["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert_params_match(run["ranks"], ref["params"])


def test_zero1_at_dp1_runs_as_zero0_with_the_same_maths(folders, tmp_path):
    """pp=2 x dp=1, fp32, config ZeRO-1, clipping active: the engine steps torch's AdamW (ZeRO-0) and does no
    data-parallel reduction, and its losses and parameters are DeepSpeed's ZeRO-1 run's within 1e-6."""
    steps = 4
    batches = make_batches("gpt2-tiny", steps)
    ds = {"gradient_clipping": 1.0, "zero_optimization": {"stage": 1}}
    fast = launch(tmp_path, folders["gpt2-tiny"], batches, 2, 2, steps, **ds)
    zero1 = launch(tmp_path, folders["gpt2-tiny"], batches, 2, 2, steps, "--zero-as-configured", **ds)
    assert {(r["optimizer"], r["reduce_grads"]) for r in fast["ranks"]} == {("AdamW", "_zeros_for_missing_gradients")}
    assert {(r["optimizer"], r["reduce_grads"]) for r in zero1["ranks"]} == {("DeepSpeedZeroOptimizer",
                                                                              "_exec_reduce_grads")}
    assert min(zero1["ranks"][0]["norms"]) > 1.0, "clipping must be active for this test to mean anything"
    assert fast["losses"][-1] < fast["losses"][0] - 0.1
    # Parameters to 1e-5, as the other engine comparisons: GPT-2's key biases get gradients that are zero in exact
    # arithmetic (softmax ignores a constant), and Adam turns the two optimizers' rounding noise there into steps.
    assert_runs_match(zero1, fast, loss_atol=1e-6, param_atol=1e-5)


def test_activation_checkpointing_keeps_parity(folders, tmp_path):
    steps = 3
    batches = make_batches("llama-tiny", steps)
    ref = reference("llama-tiny", folders["llama-tiny"], batches, steps)
    run = launch(tmp_path, folders["llama-tiny"], batches, stages=2, nproc=2, steps=steps,
                 pipeline={"stages": 2, "activation_checkpoint_interval": 1})
    assert run["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert_params_match(run["ranks"], ref["params"])


def test_bf16_pipeline_trains(folders, tmp_path):
    """bf16 (DeepSpeed's BF16_Optimizer, fp32 master weights) at pp=2 follows the fp32 reference loosely, and its
    first step's gradient norm is the reference's within bf16's rounding: DeepSpeed's last stage added micro-batches
    0..k-1 again at micro-batch k (norm 2.3x), which Adam's scale invariance hid from the losses."""
    steps = 3
    batches = make_batches("gpt2-tiny", steps)
    ref = reference("gpt2-tiny", folders["gpt2-tiny"], batches, steps, clip=1e9)  # clip only measures the norm
    run = launch(tmp_path, folders["gpt2-tiny"], batches, stages=2, nproc=2, steps=steps, bf16={"enabled": True})
    assert run["losses"] == pytest.approx(ref["losses"], abs=5e-2)
    assert run["ranks"][0]["norms"][0] == pytest.approx(ref["norms"][0], rel=0.02), (run["ranks"][0]["norms"], ref)
    assert all(p.dtype == torch.bfloat16 for r in run["ranks"] for p in r["params"].values())


ZERO2_BUCKET = 10_000  # elements: several reductions per micro-batch, the 16,384-element tied embedding above it


def stage_gradient_bytes(rank: dict) -> int:
    """fp32 bytes of one rank's whole-stage gradient (every parameter it holds)."""
    return 4 * sum(p.numel() for p in rank["params"].values())


ZERO2_STEPS = 8
ZERO2_RUNS = {  # name -> DeepSpeed keys of a pp=2 x dp=2 run (4 processes) with clipping 1.0
    "zero1": {"zero_optimization": {"stage": 1, "reduce_bucket_size": ZERO2_BUCKET}},
    "zero2": {"zero_optimization": {"stage": 2, "reduce_bucket_size": ZERO2_BUCKET}},
    "zero2-offload": {"zero_optimization": {"stage": 2, "reduce_bucket_size": ZERO2_BUCKET,
                                            "offload_optimizer": {"device": "cpu"}}},
    "zero2-bf16": {"zero_optimization": {"stage": 2, "reduce_bucket_size": ZERO2_BUCKET}, "bf16": {"enabled": True},
                   "data_types": {"grad_accum_dtype": "fp32"}},
    "zero2-overlap": {"zero_optimization": {"stage": 2, "reduce_bucket_size": ZERO2_BUCKET, "overlap_comm": True}},
    "zero2-scattered": {"zero_optimization": {"stage": 2, "reduce_bucket_size": ZERO2_BUCKET,
                                              "contiguous_gradients": False}},
}


@pytest.fixture(scope="module")
def zero2_runs(folders, tmp_path_factory):
    batches = make_batches("gpt2-tiny", 2 * ZERO2_STEPS)
    return {name: launch(tmp_path_factory.mktemp(name), folders["gpt2-tiny"], batches, stages=2, nproc=4,
                         steps=ZERO2_STEPS, gradient_clipping=1.0, **ds)
            for name, ds in ZERO2_RUNS.items()}


def assert_runs_match(a: dict, b: dict, loss_atol: float = 1e-6, param_atol: float = 1e-5) -> None:
    assert b["losses"] == pytest.approx(a["losses"], abs=loss_atol)
    for x, y in zip(a["ranks"], b["ranks"]):
        assert (x["stage"], x["dp_rank"]) == (y["stage"], y["dp_rank"])
        for key in x["params"]:
            torch.testing.assert_close(y["params"][key], x["params"][key], atol=param_atol, rtol=0, msg=key)


def assert_tied_copies_identical(run: dict) -> None:
    """The tied embedding on the first and the last stage, and on every data-parallel replica: the same bits."""
    final = max(r["stage"] for r in run["ranks"])
    first = [r["params"] for r in run["ranks"] if r["stage"] == 0]
    last = [r["params"] for r in run["ranks"] if r["stage"] == final]
    assert not any("transformer.wte.weight" in r["params"] for r in run["ranks"] if 0 < r["stage"] < final)
    assert set(first[0]) & set(last[0]) == {"transformer.wte.weight"}
    assert all(torch.equal(first[0]["transformer.wte.weight"], copy["transformer.wte.weight"])
               for copy in first[1:] + last)


def test_zero2_with_stages_matches_zero1(zero2_runs):
    """ZeRO-2 at pp=2 x dp=2, fp32, 4 micro-batches a step, clipping active: every loss within 1e-6 of ZeRO-1's
    over 8 steps, the same global gradient norms, every parameter within 1e-5, tied copies bit-identical."""
    zero1, zero2 = zero2_runs["zero1"], zero2_runs["zero2"]
    assert min(zero1["ranks"][0]["norms"]) > 1.0, "clipping must be active for this test to mean anything"
    assert zero2["ranks"][0]["norms"] == pytest.approx(zero1["ranks"][0]["norms"], rel=1e-5)
    assert zero2["losses"][-1] < zero2["losses"][0] - 0.5
    assert_runs_match(zero1, zero2)
    assert_tied_copies_identical(zero1)
    assert_tied_copies_identical(zero2)


def test_zero2_with_stages_holds_a_partition_of_the_gradients(zero2_runs):
    """Between micro-batches (after each backward pass) a ZeRO-2 rank holds about 1/dp of its stage's gradient
    bytes, measured on the real engine; a ZeRO-1 rank holds all of them."""
    for a, b in zip(zero2_runs["zero1"]["ranks"], zero2_runs["zero2"]["ranks"]):
        full = stage_gradient_bytes(a)
        assert a["grad_bytes"] >= full, (a["grad_bytes"], full)
        assert b["grad_bytes"] <= 0.51 * full, (b["grad_bytes"], full)  # 1/dp, plus alignment padding


def test_zero2_offload_with_stages_matches_zero2(zero2_runs):
    """ZeRO-Offload (optimizer on the CPU) at pp=2 x dp=2 gives the non-offloaded run's losses and parameters."""
    assert all(r["offload"] for r in zero2_runs["zero2-offload"]["ranks"])
    assert not any(r["offload"] for r in zero2_runs["zero2"]["ranks"])
    assert_runs_match(zero2_runs["zero2"], zero2_runs["zero2-offload"])


@pytest.mark.parametrize("name", ["zero2-overlap", "zero2-scattered"])
def test_zero2_with_stages_matches_zero1_with_overlap_or_without_contiguous_gradients(zero2_runs, name):
    """``overlap_comm: true``, and ``contiguous_gradients: false`` (DeepSpeed then keeps the oversized tied embedding's
    gradient in its bucket list, not as its oversized one): ZeRO-1's losses and parameters as in the default case."""
    assert_runs_match(zero2_runs["zero1"], zero2_runs[name])
    assert_tied_copies_identical(zero2_runs[name])


def test_zero2_bf16_with_stages_follows_fp32(zero2_runs):
    """bf16 parameters, fp32 gradient accumulation: the loss follows the fp32 run's within bf16 noise."""
    bf16 = zero2_runs["zero2-bf16"]
    assert all(p.dtype == torch.bfloat16 for r in bf16["ranks"] for p in r["params"].values())
    assert bf16["losses"] == pytest.approx(zero2_runs["zero2"]["losses"], abs=1e-2)
    assert_tied_copies_identical(bf16)


def test_zero2_at_four_stages_matches_hugging_face_with_the_tie_between_stages_0_and_3(tmp_path):
    """ZeRO-2 at pp=4 x dp=2 (8 processes), GPT-2 of 4 blocks, clipping active: the embedding on stage 0 is tied to
    the head on stage 3 with two stages between them. Every loss and parameter as the Hugging Face model's under
    torch's AdamW (1e-5), the same global gradient norms, the tied copies bit-identical on all four ranks."""
    import transformers

    from hybrid_ds.config import ModelConfig
    from hybrid_ds.models.resolve import resolve_model

    folder = tmp_path / "gpt2-4-blocks"
    config = resolve_model(ModelConfig(name="gpt2-tiny", overrides={**NO_DROPOUT["gpt2-tiny"], "n_layer": 4})).hf_config
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    steps, dp = 4, 2
    batches = make_batches("gpt2-tiny", dp * steps)
    ref = reference("gpt2-tiny", folder, batches, steps, clip=1.0, dp=dp)
    run = launch(tmp_path, folder, batches, stages=4, nproc=4 * dp, steps=steps, gradient_clipping=1.0,
                 zero_optimization={"stage": 2, "reduce_bucket_size": ZERO2_BUCKET})
    assert {(r["stage"], r["dp_rank"]) for r in run["ranks"]} == {(s, d) for s in range(4) for d in range(dp)}
    assert {r["engine"] for r in run["ranks"]} == {"PartitionedGradientsPipelineEngine"}
    assert min(ref["norms"]) > 1.0, "clipping must be active for this test to mean anything"
    assert run["ranks"][0]["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    assert run["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert_params_match(run["ranks"], ref["params"])
    assert_tied_copies_identical(run)
