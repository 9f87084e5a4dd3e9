"""Packed blocks -> DeepSpeed micro-batches: sharded by data-parallel rank, deterministic, resumable.

The order of an epoch is a permutation seeded by (seed, epoch). Global micro-batch k of an epoch
takes positions [k * micro * dp, (k + 1) * micro * dp) of that order, and data-parallel rank r takes
its r-th slice of ``micro`` samples: the ranks' shards are disjoint and together cover the epoch
(less a tail shorter than micro * dp). Every pipeline stage of one data-parallel group builds the same
iterator, so the first stage reads the inputs and the last the labels of the same micro-batches.
The position is a count of micro-batches consumed: ``state_dict()`` / ``load_state_dict()`` resume
exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np
import torch

from hybrid_ds.errors import UserError

IGNORE = -100


class MicroBatches:
    """An endless iterator of ``((input_ids, attention_mask[, token_type_ids]), labels)`` micro-batches."""

    def __init__(self, blocks: Any, micro_batch: int, dp_rank: int = 0, dp: int = 1, seed: int = 1234,
                 task: str = "causal_lm", mlm: "MaskingRule | None" = None, shuffle: bool = True):
        self.tokens = np.asarray(blocks.with_format("numpy")["input_ids"], dtype=np.int64)
        self.micro, self.dp_rank, self.dp, self.seed = micro_batch, dp_rank, dp, seed
        self.task, self.mlm, self.shuffle = task, mlm, shuffle
        self.per_epoch = len(self.tokens) // (micro_batch * dp)
        if self.per_epoch == 0:
            raise UserError("data", f"{len(self.tokens)} blocks cannot fill one micro-batch of {micro_batch} on "
                                    f"each of {dp} data-parallel ranks; lower the batch size or add data")
        self.consumed = 0
        self._order_epoch, self._order = -1, np.arange(0)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seed": self.seed, "dp_rank": self.dp_rank, "dp": self.dp}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["seed"], state["dp"]) != (self.seed, self.dp):
            raise UserError("train.resume", f"the checkpoint's data order (seed {state['seed']}, dp {state['dp']}) "
                                            f"differs from this run's (seed {self.seed}, dp {self.dp})")
        self.consumed = state["consumed"]

    def sample_indices(self, k: int) -> np.ndarray:
        """Block indices of this rank's k-th micro-batch."""
        epoch, within = divmod(k, self.per_epoch)
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(len(self.tokens)) if self.shuffle else np.arange(len(self.tokens))
            self._order_epoch = epoch
        start = (within * self.dp + self.dp_rank) * self.micro
        return self._order[start:start + self.micro]

    def __iter__(self) -> "MicroBatches":
        return self

    def __next__(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        indices = self.sample_indices(self.consumed)
        self.consumed += 1
        ids = torch.from_numpy(self.tokens[indices])
        mask = torch.ones_like(ids)
        if self.task == "masked_lm":
            assert self.mlm is not None
            inputs, labels = self.mlm.apply(ids, [self.seed, int(indices[0]), self.consumed])
            return (inputs, mask, torch.zeros_like(ids)), labels
        return (ids, mask), ids.clone()


class MaskingRule:
    """BERT's masking: ``probability`` of the ordinary tokens are predicted; of those 80% become [MASK],
    10% a random token, 10% stay. Labels are -100 everywhere else. Deterministic for a seed."""

    def __init__(self, tokenizer: Any, probability: float = 0.15):
        self.probability = probability
        self.mask_id = tokenizer.mask_token_id
        if self.mask_id is None:
            raise UserError("data.tokenizer", f"{tokenizer.name_or_path!r} has no [MASK] token for masked LM")
        self.vocab_size = len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def apply(self, ids: torch.Tensor, seed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        chosen = torch.rand(ids.shape, generator=generator) < self.probability
        chosen &= ~torch.isin(ids, self.special)
        labels = ids.masked_fill(~chosen, IGNORE)
        roll = torch.rand(ids.shape, generator=generator)
        inputs = ids.masked_fill(chosen & (roll < 0.8), self.mask_id)
        randomize = chosen & (roll >= 0.8) & (roll < 0.9)
        random_ids = torch.randint(0, self.vocab_size, ids.shape, generator=generator)
        inputs = torch.where(randomize, random_ids, inputs)
        return inputs, labels


def eval_sample(n_blocks: int, micro_batch: int, n_batches: int, dp: int, seed: int) -> np.ndarray:
    """Sorted indices of the held-out blocks one evaluation reads: ``n_batches`` micro-batches on each of
    ``dp`` ranks, drawn from the whole split by a permutation seeded by ``seed`` alone, so every evaluation
    and every layout that reads as many blocks reads the same ones (a smaller sample is part of a larger).
    A split smaller than the request is read whole, less a tail shorter than ``micro_batch * dp``.

    >>> eval_sample(10, micro_batch=2, n_batches=2, dp=1, seed=0).tolist()
    [2, 4, 6, 7]
    >>> len(eval_sample(10, micro_batch=2, n_batches=8, dp=2, seed=0))
    8
    """
    per_batch = micro_batch * dp
    n = min(n_batches, n_blocks // per_batch) * per_batch
    return np.sort(np.random.default_rng(seed).permutation(n_blocks)[:n])


def eval_batches(blocks: Any, micro_batch: int, n_batches: int, dp_rank: int = 0, dp: int = 1, seed: int = 0,
                 task: str = "causal_lm", mlm: MaskingRule | None = None) -> MicroBatches:
    """This rank's micro-batches of :func:`eval_sample`, in split order, the same every time (masks too).

    Micro-batch k of rank r is the sample's positions [(k * dp + r) * micro, ...): disjoint across ranks.
    """
    sample = eval_sample(len(blocks), micro_batch, n_batches, dp, seed)
    return MicroBatches(blocks.select(sample), micro_batch, dp_rank, dp, seed=seed, task=task, mlm=mlm,
                        shuffle=False)


def predicted_tokens(batches: MicroBatches) -> int:
    """Tokens a loss over one pass of ``batches`` averages: the labels it predicts (causal LM: all but each
    block's first, which nothing precedes; masked LM: the masked ones). Leaves ``batches`` unread."""
    shift = 1 if batches.task == "causal_lm" else 0
    probe = copy.copy(batches)
    return sum(int((labels[:, shift:] != IGNORE).sum()) for _, labels in itertools.islice(probe, batches.per_epoch))
