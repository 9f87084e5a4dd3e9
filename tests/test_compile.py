"""``train.compile``: compiled blocks compute what the Hugging Face model computes, share one graph, and do not
recompile for every new sequence length (CPU inductor; tiny 2-layer models keep compile times short)."""

from __future__ import annotations

import pytest
import torch

from hybrid_ds.runtime import compile_blocks
from hybrid_ds.config import load_config_dict
from hybrid_ds.errors import UserError
from hybrid_ds.models.head_loss import materialize
from hybrid_ds.runtime.parity import check_parity
from hybrid_ds.runtime.pipeline import SequentialStages
from hybrid_ds.runtime.plan import build_plan


def config(name: str, stages: int = 2, **raw) -> object:
    return load_config_dict({"model": {"name": name, "overrides": {"num_hidden_layers": 2}},
                             "pipeline": {"stages": stages}, "train_micro_batch_size_per_gpu": 1,
                             "data": {"seq_len": 16}, "train": {"compile": True}, **raw})


@pytest.fixture
def fresh_dynamo(monkeypatch):
    """Dynamo as in a new process, and a compile clock that counts from here."""
    torch._dynamo.reset()
    monkeypatch.setattr(compile_blocks, "_clock", None)
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name, part", [("llama-tiny", None), ("gpt2-tiny", None), ("llama-tiny", "attention")])
def test_compiled_pipeline_keeps_parity(name, part, fresh_dynamo):
    """Two stages of compiled blocks against the HF model: loss, logits and every gradient within 1e-5; the
    two blocks (one per stage, in one process) compiled once, into one graph; also with the attention recomputed
    in backward inside the compiled block (train.selective_checkpoint)."""
    cfg = config(name)
    report = check_parity(cfg.replace(train={"selective_checkpoint": part}) if part else cfg, stages=2)
    assert report.ok, "\n".join(report.lines())
    blocks, graphs, seconds = compile_blocks.clock().take()
    assert (blocks, graphs) == (2, 1) and seconds > 0


def test_a_new_sequence_length_recompiles_once(fresh_dynamo):
    """Lengths 16, 24, 32, 40: one static graph, then one with a dynamic sequence dimension for all the rest."""
    pipe = SequentialStages(build_plan(config("llama-tiny", stages=1), world_size=1))
    compile_blocks.clock().take()
    for seq_len in (16, 24, 32, 40):
        ids = torch.randint(0, 256, (2, seq_len))
        mask = torch.ones_like(ids)
        mask[-1, -3:] = 0
        materialize(pipe.forward((ids, mask))).sum().backward()
    assert compile_blocks.clock().take()[1] == 2


def test_compile_on_the_plain_engine_is_refused():
    with pytest.raises(UserError, match="train.compile") as err:
        config("llama-tiny", stages=1, zero_optimization={"stage": 3})
    assert "plain Hugging Face model" in err.value.message
