"""pipeline.schedule zb-h1 on real DeepSpeed pipelines (gloo): the same losses and parameters as 1F1B, bit for bit.

Each case trains the same micro-batches twice, under DeepSpeed's 1F1B and under ZB-H1 (fp32 unless named, dropout
off), and compares every loss and every parameter of every rank with ``==``. Resuming across schedules is tested where
runs resume (tests/test_train_multiproc.py: a 1F1B checkpoint under ZB-H1; tests/test_lora_multiproc.py: a ZB-H1 one
under 1F1B).
"""

from __future__ import annotations

import pytest
import torch
from test_pipeline_multiproc import folders, launch, make_batches  # noqa: F401  (folders: a fixture)

pytestmark = pytest.mark.multiproc

CASES = {  # id -> (model, stages, processes, config sections)
    # tied embedding across 2 stages x 2 data-parallel ranks, ZeRO-1, Hugging Face's loss, global-norm clipping
    "gpt2-tied-pp2xdp2-zero1-clip": ("gpt2-tiny", 2, 4, {"zero_optimization": {"stage": 1}, "gradient_clipping": 0.05}),
    # 4 stages (two middle ones), ZeRO-1 (at dp=1: ZeRO-0), the fused head loss
    "llama-pp4-fused": ("llama-tiny", 4, 4, {"zero_optimization": {"stage": 1}, "train": {"fused_loss": True}}),
    # bf16 with ZeRO-1: DeepSpeed's BF16_Optimizer, whose fp32 gradients W adds to
    "gpt2-pp2-zero1-bf16": ("gpt2-tiny", 2, 2, {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}),
    # ZeRO-2 with stages (gradients reduced as W makes them), bf16, the fused loss
    "gpt2-pp2xdp2-zero2-bf16-fused": ("gpt2-tiny", 2, 4, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                                          "train": {"fused_loss": True}}),
    # a Mixture-of-Experts model with its router loss riding with the hidden states
    "mixtral-router-loss": ("mixtral-tiny", 2, 2, {"model": {"name": "mixtral-tiny", "overrides": {
        "router_aux_loss_coef": 0.1, "output_router_logits": True}}}),
}


def run(tmp_path, folders, case: str, schedule: str, *extra: str, failing: bool = False) -> dict:  # noqa: F811
    name, stages, nproc, sections = CASES[case]
    folder = folders["gpt2-tiny" if name == "mixtral-tiny" else name]  # mixtral: a random init from its preset
    out = tmp_path / f"{case}-{schedule}"
    out.mkdir()
    batches = make_batches("gpt2-tiny" if name == "mixtral-tiny" else name, 2 * (nproc // stages))
    return launch(out, folder, batches, stages, nproc, 2, *extra, failing=failing,
                  pipeline={"stages": stages, "schedule": schedule}, **sections)


def assert_identical(a: dict, b: dict) -> None:
    assert a["losses"] == b["losses"], (a["losses"], b["losses"])
    for rank_a, rank_b in zip(a["ranks"], b["ranks"], strict=True):
        assert rank_a["params"].keys() == rank_b["params"].keys()
        for key, value in rank_a["params"].items():
            assert torch.equal(value, rank_b["params"][key]), (key, (value - rank_b["params"][key]).abs().max())


@pytest.fixture(scope="module")
def tied_1f1b(folders, tmp_path_factory):  # noqa: F811
    return run(tmp_path_factory.mktemp("zb"), folders, "gpt2-tied-pp2xdp2-zero1-clip", "1f1b")


def test_zb_h1_trains_exactly_as_1f1b_tied_zero1_with_clipping(tied_1f1b, folders, tmp_path):  # noqa: F811
    zb = run(tmp_path, folders, "gpt2-tied-pp2xdp2-zero1-clip", "zb-h1")
    assert_identical(tied_1f1b, zb)
    assert tied_1f1b["losses"][-1] < tied_1f1b["losses"][0]  # it trained
    assert [r["norms"] for r in zb["ranks"]] == [r["norms"] for r in tied_1f1b["ranks"]]


@pytest.mark.parametrize("case", ["llama-pp4-fused", "gpt2-pp2-zero1-bf16", "gpt2-pp2xdp2-zero2-bf16-fused",
                                  "mixtral-router-loss"])
def test_zb_h1_trains_exactly_as_1f1b(case, folders, tmp_path):  # noqa: F811
    assert_identical(run(tmp_path, folders, case, "1f1b"), run(tmp_path, folders, case, "zb-h1"))


@pytest.mark.parametrize("broken, says", [("skip-w", "W of micro-batches [1] never ran"),
                                          ("repeat-w", "W of micro-batch 1 without its B")])
def test_a_schedule_broken_on_purpose_fails(broken, says, folders, tmp_path):  # noqa: F811
    proc = run(tmp_path, folders, "gpt2-tied-pp2xdp2-zero1-clip", "zb-h1", "--break-schedule", broken, failing=True)
    assert says in proc.stderr, proc.stderr[-3000:]
