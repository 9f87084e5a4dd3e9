"""Training data: documents (``sources``) -> packed blocks (``packing``) -> micro-batches (``feed``).

>>> padded_vocab_size(50257)
50304
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybrid_ds.config import DataConfig
from hybrid_ds.data.feed import MaskingRule, MicroBatches, eval_batches, predicted_tokens
from hybrid_ds.data.packing import load_tokenizer, packed_splits, separator_id
from hybrid_ds.errors import UserError

__all__ = ["Data", "MaskingRule", "MicroBatches", "check_vocab", "load_data", "load_tokenizer", "padded_vocab_size",
           "predicted_tokens"]


def padded_vocab_size(n_tokens: int, multiple: int = 64) -> int:
    """The tokenizer's size rounded up to a multiple of 64, which matrix kernels prefer."""
    return -(-n_tokens // multiple) * multiple


def check_vocab(tokenizer: Any, model_vocab: int) -> None:
    if len(tokenizer) > model_vocab:
        raise UserError("data.tokenizer",
                        f"{tokenizer.name_or_path or 'the tokenizer'} has {len(tokenizer)} tokens but the model's "
                        f"vocabulary has {model_vocab}; use a smaller tokenizer, or set "
                        f"model.vocab_from_tokenizer true (vocab_size {padded_vocab_size(len(tokenizer))})")


@dataclass
class Data:
    tokenizer: Any
    train: Any          # datasets.Dataset of input_ids blocks
    eval: Any
    task: str
    mlm_probability: float = 0.15
    separator: int | None = None  # the EOS that ends each document, where documents are kept apart (document_mask)

    def masking(self) -> MaskingRule | None:
        return MaskingRule(self.tokenizer, self.mlm_probability) if self.task == "masked_lm" else None

    def train_batches(self, micro_batch: int, dp_rank: int, dp: int, seed: int) -> MicroBatches:
        return MicroBatches(self.train, micro_batch, dp_rank, dp, seed, self.task, self.masking(),
                            separator=self.separator)

    def eval_batches(self, micro_batch: int, n_batches: int, dp_rank: int, dp: int, seed: int) -> MicroBatches:
        return eval_batches(self.eval, micro_batch, n_batches, dp_rank, dp, seed, self.task, self.masking(),
                            self.separator)


def load_data(data: DataConfig, task: str, model_folder: str | None = None, tokenizer: Any = None,
              document_mask: bool = False) -> Data:
    """Tokenizer and packed train/eval blocks for a run (packed once, then read from the cache).

    ``tokenizer`` is the run's when it has one already; else it is loaded as ``load_tokenizer`` says.
    ``document_mask`` is the plan's (``data.document_mask`` with its default decided).
    """
    tokenizer = tokenizer or load_tokenizer(data.tokenizer, task, model_folder)
    train, evals = packed_splits(data, tokenizer, task)
    separator = separator_id(tokenizer, task) if document_mask else None
    return Data(tokenizer, train, evals, task, data.mlm_probability, separator)
