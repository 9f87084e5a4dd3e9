"""``data.document_mask``: a packed block's documents do not see each other, through the Hugging Face model
(the plain engine's inputs) and through pipeline stages. The reference is each document run alone."""

from __future__ import annotations

import tempfile

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybrid_ds.config import load_config_dict
from hybrid_ds.data.feed import IGNORE, MicroBatches, document_ids, document_labels
from hybrid_ds.runtime.engine import PlainEngine
from hybrid_ds.errors import UserError
from hybrid_ds.models.head_loss import materialize
from hybrid_ds.models.masks import document_positions
from hybrid_ds.models.resolve import auto_class, resolve_model
from hybrid_ds.runtime.pipeline import SequentialStages
from hybrid_ds.runtime.plan import build_plan
from hybrid_ds.estimate.report import format_plan

SEP = 255  # the tiny presets' EOS
LENGTHS = (20, 1, 25, 18)  # a one-token document (its EOS alone) too; each longer than the sliding windows below
MODELS = {
    "llama-tiny": {},                                      # rotary: position_ids
    "gpt2-tiny": {},                                       # learned absolute positions (wpe)
    "opt-tiny": {},                                        # positions from the mask (cumsum), offset by 2
    "mistral-tiny": {"sliding_window": 8},                 # a sliding window on every layer
    "qwen2-tiny": {"use_sliding_window": True, "sliding_window": 8,  # sliding and full layers (config.layer_types)
                   "layer_types": ["sliding_attention", "full_attention"]},
}


def config(name: str, stages: int = 2, **data):
    return load_config_dict({"model": {"name": name, "overrides": MODELS.get(name, {})},
                             "train_micro_batch_size_per_gpu": 1, "pipeline": {"stages": stages},
                             "data": {"seq_len": 64, **data}})


def documents(seed: int = 0) -> list[torch.Tensor]:
    """Random documents, each ending with the separator, as packing writes them."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(0, SEP, (n - 1,), generator=generator), torch.tensor([SEP])]) for n in LENGTHS]


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss of each position (what it predicts: the next label), NaN where that label is ignored."""
    logits = materialize(logits)  # the pipeline's head hands the fused loss HeadLogits
    losses = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE, reduction="none")
    return losses.masked_fill(labels[0, 1:] == IGNORE, float("nan"))


def alone(model, docs: list[torch.Tensor]) -> torch.Tensor:
    """Each document run alone through the Hugging Face model, losses laid out as in the packed block."""
    rows = []
    for doc in docs:
        logits = model(input_ids=doc[None], use_cache=False).logits
        rows += [torch.tensor([float("nan")]), per_token_losses(logits, doc[None])]  # first token: nothing precedes
    return torch.cat(rows)[1:]  # the block's first token is not predicted at all


def packed_batch(docs: list[torch.Tensor], document_mask: bool):
    """The block's micro-batch from the data feed."""
    block = torch.cat(docs)
    blocks = datasets.Dataset.from_dict({"input_ids": block[None].numpy().astype(np.int32)})
    return next(MicroBatches(blocks, 1, shuffle=False, separator=SEP if document_mask else None))


def saved(name: str):
    """A random init of preset ``name`` (with MODELS' overrides) saved to a folder: (model, its config)."""
    cfg = config(name)
    tmp = tempfile.mkdtemp()
    resolved = resolve_model(cfg.model)
    torch.manual_seed(0)
    hf = auto_class(resolved.family).from_config(resolved.hf_config)
    hf.save_pretrained(tmp)
    return hf, cfg.replace(model={"name": tmp, "pretrained": True})


def hf_and_stages(name: str, document_mask: bool = True):
    """The Hugging Face model and the pipeline stages (2) with the same random weights, and the plan."""
    hf, cfg = saved(name)
    plan = build_plan(cfg.replace(data={"document_mask": document_mask}), world_size=2)
    stages = SequentialStages(plan)
    for module in (hf, *stages.modules()):
        module.eval()
    return hf, stages, plan


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_documents_compute_what_each_document_alone_computes(name):
    hf, stages, plan = hf_and_stages(name)
    assert plan.document_mask
    docs = documents()
    (ids, mask), labels = packed_batch(docs, document_mask=True)
    with torch.no_grad():
        expected = alone(hf, docs)
        plain = per_token_losses(hf(**PlainEngine(None, 1, documents=True)._kwargs(((ids, mask), labels))).logits,
                                 labels)
        outputs = stages.forward((ids, mask))
        piped = per_token_losses(outputs, labels)
        loss = stages.loss_fn(outputs, labels)
    assert int(torch.isnan(expected).sum()) == len(LENGTHS) - 1  # each later document's first token
    if plan.resolved.family.positions != "cumsum":  # the plain engine refuses OPT (test_refused_...)
        torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(piped, expected, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(loss, expected.nanmean(), atol=1e-5, rtol=0)


def test_without_the_document_mask_later_documents_see_earlier_ones():
    """The negative control: the same block with data.document_mask false is not the documents run alone."""
    hf, stages, plan = hf_and_stages("llama-tiny", document_mask=False)
    assert not plan.document_mask
    docs = documents()
    (ids, mask), labels = packed_batch(docs, document_mask=False)
    with torch.no_grad():
        piped = per_token_losses(stages.forward((ids, mask)), labels)
        expected = alone(hf, docs)
    first = LENGTHS[0] - 1
    torch.testing.assert_close(piped[:first], expected[:first], atol=1e-5, rtol=0)
    assert not torch.allclose(piped[first + 1:], expected[first + 1:].nan_to_num(), atol=1e-3)


def test_documents_positions_and_labels():
    ids = torch.tensor([[7, 8, 0, 9, 0, 0, 5, 6],
                        [0, 1, 2, 3, 4, 5, 6, 7]])
    docs = document_ids(ids == 0)
    assert docs.tolist() == [[1, 1, 1, 2, 2, 3, 4, 4], [1, 2, 2, 2, 2, 2, 2, 2]]
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]
    # the token after each separator starts a document: nothing of its own precedes it
    assert document_labels(ids, ids == 0).tolist() == [[7, 8, 0, -100, 0, -100, -100, 6],
                                                         [0, -100, 2, 3, 4, 5, 6, 7]]
    assert document_positions(torch.tensor([[1, 1, 2, 2, 0, 0]])).tolist() == [[0, 1, 0, 1, 0, 1]]  # padding: its own


def test_default_is_on_for_fine_tuning_and_off_from_scratch():
    scratch = build_plan(config("llama-tiny"), world_size=2)
    tuning = build_plan(saved("llama-tiny")[1], world_size=2)
    assert (scratch.document_mask, tuning.document_mask) == (False, True)
    assert "see each other" in format_plan(scratch) and "(data.document_mask null:" in format_plan(scratch)
    assert "kept apart" in format_plan(tuning)
    assert build_plan(config("llama-tiny", document_mask=True), world_size=2).document_mask
    assert not build_plan(saved("bert-tiny")[1], world_size=2).document_mask  # null: off where the model cannot have it


@pytest.mark.parametrize("name, stages, zero, says", [
    ("bert-tiny", 2, 0, "masked LM"),
    ("opt-tiny", 1, 2, r"plain engine \(ZeRO-2 at one stage\)"),
])
def test_refused_where_documents_cannot_be_kept_apart(name, stages, zero, says):
    cfg = config(name, stages, document_mask=True).replace(zero_optimization={"stage": zero})
    with pytest.raises(UserError, match=says) as err:
        build_plan(cfg, world_size=stages)
    assert err.value.key == "data.document_mask"


def test_a_stage_keeps_one_mask_for_all_its_blocks():
    """sdpa would turn the boolean document mask into an additive one at every block and keep each copy for
    backward; the stage makes it additive once, so its blocks save one s x s mask between them."""
    plan = build_plan(config("llama-tiny", stages=1, document_mask=True), world_size=1)
    pipe = SequentialStages(plan)
    ids = torch.randint(0, plan.resolved.hf_config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    documents = torch.arange(64).div(20, rounding_mode="floor").add(1).expand(2, -1)
    masks = set()

    def pack(t):
        if t.dim() == 4 and t.shape[-2:] == (64, 64):
            masks.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pipe.loss_fn(pipe.forward((ids, documents)), ids)
    assert plan.resolved.hf_config.num_hidden_layers > 1 and len(masks) == 1


def test_flex_attention_computes_the_documents_alone_in_forward():
    """model.attn_implementation "flex_attention": transformers' FlexAttention block mask of the packed documents
    (sliding-window and full layers of qwen2) gives sdpa's dense-mask losses, each document as if alone. Forward only:
    torch has no CPU backward for FlexAttention (the run refuses it on CPU; tests/test_gpu.py checks gradients)."""
    hf, cfg = saved("qwen2-tiny")
    docs = documents()
    (ids, mask), labels = packed_batch(docs, document_mask=True)
    losses = {}
    for kernel in ("sdpa", "flex_attention"):
        stages = SequentialStages(build_plan(cfg.replace(data={"document_mask": True},
                                                         model={"attn_implementation": kernel}), world_size=2))
        assert stages.plan.resolved.hf_config._attn_implementation == kernel
        with torch.no_grad():
            losses[kernel] = per_token_losses(stages.forward((ids, mask)), labels)
    with torch.no_grad():
        expected = alone(hf, docs)
    torch.testing.assert_close(losses["flex_attention"], expected, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(losses["flex_attention"], losses["sdpa"], atol=1e-6, rtol=0, equal_nan=True)
