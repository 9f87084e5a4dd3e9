"""A Mixture-of-Experts model's router loss through the pipeline, exactly as Hugging Face adds it.

With ``output_router_logits`` the Hugging Face model adds ``router_aux_loss_coef`` times transformers'
``load_balancing_loss_func`` of every router's logits to its loss. In the pipeline each block adds its
routers' share to running sums that travel to the next stage with the activations; the head turns them
into the loss (hybrid_ds.models.router_loss.add_router_stats). Checked against the Hugging Face model: loss,
logits and every gradient (the routers' included) at one and two stages, bit for bit; and a negative
control that drops the router loss of the second stage's blocks.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_generic_adapter import run_config  # noqa: E402
from test_moe import moe_config, saved_moe  # noqa: E402

from hybrid_ds.runtime.parity import check_parity  # noqa: E402

ROUTER_LOSS = dict(output_router_logits=True, router_aux_loss_coef=0.5)  # test_moe.MOE: 4 layers, 4 experts, top-2
FAMILIES = ["mixtral", "qwen3_moe"]


def moe_folder(folder, model_type, **overrides):
    """A tiny random MoE with its router loss on, saved by save_pretrained (experts one by one, as published)."""
    return saved_moe(folder, model_type, **{**ROUTER_LOSS, **overrides})


@pytest.mark.parametrize("model_type", FAMILIES)
def test_router_loss_is_bit_exact(model_type, tmp_path):
    folder = moe_folder(tmp_path, model_type)
    without = check_parity(run_config(folder).replace(model={"overrides": {"output_router_logits": False}}), 1)
    for stages in (1, 2):
        report = check_parity(run_config(folder), stages)
        assert report.exact, "\n".join(report.lines())
        assert report.hf_loss > without.hf_loss + 0.5 * 1.5  # the router loss (~top_k = 2 at random init) is in it


def test_router_gradients_come_from_both_losses(tmp_path):
    """The routers' gradients differ with and without the router loss (parity compares every one of them)."""
    folder = moe_folder(tmp_path, "mixtral")
    config = run_config(folder)
    with_loss = check_parity(config, 2)
    without = check_parity(config.replace(model={"overrides": {"router_aux_loss_coef": 0.0}}), 2)
    assert with_loss.exact and without.exact
    assert with_loss.hf_loss != without.hf_loss


def test_parity_fails_when_one_stage_drops_its_router_loss(tmp_path, monkeypatch):
    """Negative control: the blocks of the second stage (blocks 2, 3) add nothing to the router sums."""
    from hybrid_ds.models import layers

    folder = moe_folder(tmp_path, "mixtral")
    added = layers.add_router_stats
    block_forward = layers.Block.forward

    def forward(self, inputs):
        if self.index >= 2:
            monkeypatch.setattr(layers, "add_router_stats", lambda stats, *rest: stats)
        try:
            return block_forward(self, inputs)
        finally:
            monkeypatch.setattr(layers, "add_router_stats", added)

    monkeypatch.setattr(layers.Block, "forward", forward)
    report = check_parity(run_config(folder), 2)
    assert not report.ok and abs(report.hf_loss - report.pipeline_loss) > 1e-3, "\n".join(report.lines())


def test_a_router_loss_the_adapter_does_not_know_is_refused(monkeypatch):
    """A model whose load_balancing_loss_func differs from the running sums is refused, not trained wrongly."""
    from transformers.models.mixtral import modeling_mixtral

    from hybrid_ds.errors import UserError
    from hybrid_ds.models.resolve import get_family

    original = modeling_mixtral.load_balancing_loss_func
    monkeypatch.setattr(modeling_mixtral, "load_balancing_loss_func", lambda *a: original(*a) * 2)
    with pytest.raises(UserError, match="adds a router loss other than transformers' load_balancing_loss_func"):
        get_family("mixtral", moe_config("mixtral", **ROUTER_LOSS))
    assert get_family("mixtral", moe_config("mixtral")).router_aux is None


@pytest.mark.multiproc
@pytest.mark.parametrize("zero, dp", [(0, 1), (2, 2)], ids=["pp2xdp1", "zero2-pp2xdp2"])
def test_moe_pipeline_steps_match_hugging_face(tmp_path, zero, dp):
    """pp=2 DeepSpeed steps against the Hugging Face model trained in one process with its router loss: the same
    losses and parameters, so the router loss's gradient reaches the first stage's routers through the stage
    boundary (in one backward pass per micro-batch: seam.engines.OneBackwardPipelineEngine); and at pp=2 x dp=2 under
    ZeRO-2 (gradients partitioned as each backward pass ends, seam.engines.PartitionedGradientsPipelineEngine)."""
    from test_pipeline_multiproc import ZERO2_BUCKET, assert_params_match, launch, make_batches, reference

    folder = tmp_path / "model"
    folder.mkdir()
    moe_folder(folder, "mixtral", router_aux_loss_coef=2.0)
    steps = 4
    batches = make_batches("llama-tiny", dp * steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // (2 * dp)))  # as each rank (engine.init_distributed):
    try:  # rounding that differs with the thread count, which Adam magnifies in rarely routed experts, stays out
        ref = reference("mixtral", folder, batches, steps, dp=dp)
    finally:
        torch.set_num_threads(threads)
    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": ZERO2_BUCKET}} if zero else {}
    run = launch(tmp_path, folder, batches, stages=2, nproc=2 * dp, steps=steps, **ds)
    assert run["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert run["losses"][-1] < run["losses"][0]
    engine = "PartitionedGradientsPipelineEngine" if zero else "OneBackwardPipelineEngine"
    assert {r["engine"] for r in run["ranks"]} == {engine}
    assert_params_match(run["ranks"], ref["params"])
