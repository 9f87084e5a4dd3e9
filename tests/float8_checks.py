"""``train.float8``'s checks that need torchao, run by tests/test_float8.py with .float8 (the Makefile's torchao, kept
out of .venv) on PYTHONPATH: the blocks' linear layers in float8 (torchao's CPU path here; the speed is a Hopper GPU's,
bench/gpu_mfu.py) compute within float8's rounding of the full-precision blocks, the parameters and so the checkpoints
keep their names, parity checks the mapping in fp32, and a model without a fitting layer is one line."""

from __future__ import annotations

import pytest
import torch

from hybrid_ds.errors import UserError
from hybrid_ds.runtime.plan import build_plan
from test_float8 import config


def stages_of(cfg):
    from hybrid_ds.runtime.pipeline import SequentialStages

    return SequentialStages(build_plan(cfg, world_size=cfg.pipeline.stages))


def run(float8: bool):
    from hybrid_ds.runtime.parity import sample_batch

    pipe = stages_of(config("llama-tiny", float8))
    for module in pipe.modules():
        module.eval()
    batch = sample_batch(pipe.plan.resolved.hf_config.vocab_size, 64, "causal_lm")
    loss = pipe.loss_fn(pipe.forward((batch["input_ids"], batch["attention_mask"])), batch["labels"])
    loss.backward()
    return loss.item(), pipe.named_gradients(), pipe


def test_float8_blocks_compute_within_float8_rounding():
    """llama-tiny at 2 stages, fp32 weights: every linear layer of the 4 blocks (7 each) is a Float8Linear, the output
    projection is not; the loss within 1e-3 of the full-precision one (relative) and every gradient pointing the same
    way (cosine >= 0.98: e4m3 keeps 3 bits of mantissa); the same parameter names, so checkpoints do not change."""
    from torchao.float8.float8_linear import Float8Linear

    loss, grads, pipe = run(False)
    loss8, grads8, pipe8 = run(True)
    linears = [type(m) for module in pipe8.modules() for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears.count(Float8Linear) == 4 * 7 and linears.count(torch.nn.Linear) == 1, linears
    assert abs(loss8 - loss) <= 1e-3 * loss and loss8 != loss
    assert grads.keys() == grads8.keys()
    for key, g in grads.items():
        assert torch.nn.functional.cosine_similarity(g.flatten(), grads8[key].flatten(), dim=0) >= 0.98, key
    names = [sorted(m.state_dict()) for m in pipe.modules()]
    assert names == [sorted(m.state_dict()) for m in pipe8.modules()]


def test_a_model_without_a_float8_layer_is_one_line():
    with pytest.raises(UserError) as err:
        stages_of(config("gpt2-tiny"))  # GPT-2's layers are Conv1D
    assert err.value.key == "train.float8" and "no nn.Linear layer" in err.value.message, err.value


def test_parity_of_a_float8_config_checks_its_mapping_in_fp32():
    """hybrid-ds parity on a float8 config checks what it always checks, the stages against the Hugging Face model
    in fp32 (float8 is a precision, as bf16 is), and passes."""
    from hybrid_ds.runtime.parity import check_parity

    report = check_parity(config("llama-tiny"), stages=2)
    assert report.ok, "\n".join(report.lines())
