"""``data.document_mask`` end to end: 2 pipeline stages on 2 gloo processes, against documents run alone in-process."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_train_multiproc import summary, tiny_config, train

pytestmark = pytest.mark.multiproc


def short_documents(path: Path, n: int = 3000) -> Path:
    """One short document per line (3-14 words), so a 32-token block holds several and their boundaries."""
    rng = random.Random(0)
    words = "light water earth seed tree day night fish bird land sea sky star man fruit kind good".split()
    path.write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(3, 14))) for _ in range(n)) + "\n")
    return path


def first_step_alone(config: Path) -> float:
    """The run's first-step loss computed in this process at the same initial weights, on the same micro-batches,
    with every document of each block run alone through one stage without any document mask."""
    from hybrid_ds.config import load_config
    from hybrid_ds.data import load_data, load_tokenizer
    from hybrid_ds.models.head_loss import materialize
    from hybrid_ds.models.resolve import tokenizer_source
    from hybrid_ds.runtime.pipeline import SequentialStages
    from hybrid_ds.runtime.plan import build_plan
    from hybrid_ds.runtime.train import with_vocab

    cfg = load_config(config).replace(pipeline={"stages": 1}, data={"document_mask": False})
    task, folder = tokenizer_source(cfg.model)
    tokenizer = load_tokenizer(cfg.data.tokenizer, task, folder)
    plan = build_plan(with_vocab(cfg, tokenizer), world_size=1)
    model = SequentialStages(plan)  # weights seeded by module path: the same as on the run's two stages
    batches = load_data(plan.config.data, task, tokenizer=tokenizer, document_mask=True).train_batches(
        plan.layout.micro_batch, 0, 1, cfg.train.seed)
    means = []
    with torch.no_grad():
        for _ in range(plan.layout.grad_accum):
            (ids, documents), _ = next(batches)
            losses = []
            for row, docs in zip(ids, documents):
                for doc in docs.unique():
                    alone = row[docs == doc][None]
                    logits = materialize(model.forward((alone, torch.ones_like(alone))))
                    losses.append(F.cross_entropy(logits[0, :-1].float(), alone[0, 1:], reduction="none"))
            means.append(torch.cat(losses).mean())
    return torch.stack(means).mean().item()


def test_two_stages_train_packed_documents_as_if_each_were_alone(tmp_path):
    config = tiny_config(tmp_path, "llama-tiny", 2)
    raw = json.loads(config.read_text())
    raw["data"].update(source=str(short_documents(tmp_path / "docs.txt")), document_mask=True)
    config.write_text(json.dumps(raw))
    train(config)
    result = summary(config)
    assert result["last_loss"] < result["first_loss"] - 0.1, result["losses"]
    assert result["first_loss"] == pytest.approx(first_step_alone(config), abs=1e-5)
    blocks = 2 * 2  # eval_batches x micro-batch (dp 1): each document's first token in a block is not predicted
    assert 0 < result["eval_tokens"] < blocks * 31 - 4, result
