"""Packed blocks -> DeepSpeed micro-batches: sharded by data-parallel rank, deterministic, resumable.

The training stream is one endless sequence of samples: epoch e is a permutation of every block seeded by
(seed, e), and epochs follow each other without a gap (a micro-batch may hold the last samples of one
epoch and the first of the next; no tail is dropped). Global micro-batch k takes stream positions
[k * micro * dp, (k + 1) * micro * dp), and data-parallel rank r takes its r-th slice of ``micro``
samples: the ranks' shards are disjoint and together read the stream in order. Every pipeline stage of
one data-parallel group builds the same iterator, so the first stage reads the inputs and the last the
labels of the same micro-batches. The position saved in a checkpoint is global (samples consumed), so a
run resumed with another data-parallel size or micro-batch reads on exactly where the saved run stopped.
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
    """An endless iterator of ``((input_ids, attention_mask[, token_type_ids]), labels)`` micro-batches.

    With ``separator`` (the EOS id that ends each packed document; ``data.document_mask``) the attention mask
    holds document indices (:func:`document_ids`) and no document's first token is predicted from the one before.
    Blocks of chat or prompt/completion rows (``data.format``) carry their own flags: labels are -100 where
    ``labelled`` is 0, and documents end where ``ends`` says (a chat template's EOS also ends each turn).
    """

    def __init__(self, blocks: Any, micro_batch: int, dp_rank: int = 0, dp: int = 1, seed: int = 1234,
                 task: str = "causal_lm", mlm: "MaskingRule | None" = None, shuffle: bool = True,
                 separator: int | None = None):
        self.tokens = np.asarray(blocks.with_format("numpy")["input_ids"], dtype=np.int64)
        self.labelled, self.ends = (np.asarray(blocks.with_format("numpy")[name], dtype=bool)
                                    if name in blocks.column_names else None for name in ("labelled", "ends"))
        self.micro, self.dp_rank, self.dp, self.seed = micro_batch, dp_rank, dp, seed
        self.task, self.mlm, self.shuffle, self.separator = task, mlm, shuffle, separator
        self.per_epoch = len(self.tokens) // (micro_batch * dp)
        if self.per_epoch == 0:
            raise UserError("data", f"{len(self.tokens)} blocks cannot fill one micro-batch of {micro_batch} on "
                                    f"each of {dp} data-parallel ranks; lower the batch size or add data")
        self.start = 0        # the stream position this rank's count of micro-batches starts from
        self.consumed = 0     # micro-batches this rank has read since ``start``
        self._orders: dict[int, np.ndarray] = {}

    @property
    def samples(self) -> int:
        """Samples of the stream read so far by all data-parallel ranks together (the global position)."""
        return self.start + self.consumed * self.micro * self.dp

    def state_dict(self) -> dict[str, int]:
        return {"samples": self.samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise UserError("train.resume", f"the checkpoint's data order (seed {state['seed']}) differs from this "
                                            f"run's (train.seed {self.seed}); resume with train.seed {state['seed']}")
        if "samples" not in state:  # written before the position was global: micro-batches of one rank
            if state["dp"] != self.dp:
                raise UserError("train.resume", f"this checkpoint's data position is counted for dp {state['dp']} "
                                                f"(written by an older hybrid_ds); resume it at dp {state['dp']}")
            state = {"samples": state["consumed"] * self.micro * self.dp}
        self.start, self.consumed = state["samples"], 0

    def order(self, epoch: int) -> np.ndarray:
        """The blocks of one epoch in the order the stream reads them."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.tokens)) if self.shuffle else np.arange(len(self.tokens))
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # a batch may span two
            self._orders[epoch] = order
        return self._orders[epoch]

    def position(self, k: int) -> int:
        """The stream position of this rank's k-th micro-batch since ``start``."""
        return self.start + (k * self.dp + self.dp_rank) * self.micro

    def sample_indices(self, k: int) -> np.ndarray:
        """Block indices of this rank's k-th micro-batch since ``start``."""
        first = self.position(k)
        epochs, within = np.divmod(np.arange(first, first + self.micro), len(self.tokens))
        return np.array([self.order(int(e))[w] for e, w in zip(epochs, within)], dtype=np.int64)

    def __iter__(self) -> "MicroBatches":
        return self

    def __next__(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        first = self.position(self.consumed)
        indices = self.sample_indices(self.consumed)
        self.consumed += 1
        ids = torch.from_numpy(self.tokens[indices])
        mask = torch.ones_like(ids)
        if self.task == "masked_lm":
            assert self.mlm is not None
            inputs, labels = self.mlm.apply(ids, [self.seed, int(indices[0]), first])
            return (inputs, mask, torch.zeros_like(ids)), labels
        labels = ids.clone()
        if self.labelled is not None:
            labels.masked_fill_(torch.from_numpy(~self.labelled[indices]), IGNORE)
        if self.separator is None:
            return (ids, mask), labels
        ends = torch.from_numpy(self.ends[indices]) if self.ends is not None else ids == self.separator
        return (ids, document_ids(ends)), document_labels(labels, ends)


def document_ids(ends: torch.Tensor) -> torch.Tensor:
    """Each token's document in its row, counted from 1, from where documents end (a separator belongs to the
    document it ends).

    The boundaries of text are read from the separator, as Megatron reads them from its EOD token: no
    packed-data cache changes, and the block is all it takes. (A block's first document may be the tail of
    one begun in an earlier block: it starts at position 0 here, as in Megatron.)

    >>> document_ids(torch.tensor([[5, 6, 0, 7, 0, 0, 8]]) == 0).tolist()
    [[1, 1, 1, 2, 2, 3, 4]]
    """
    ends = ends.long()
    return 1 + ends.cumsum(dim=1) - ends


def document_labels(labels: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels with each document's first token ignored: nothing in its own document precedes it.

    >>> ids = torch.tensor([[5, 6, 0, 7, 0, 8]])
    >>> document_labels(ids, ids == 0).tolist()
    [[5, 6, 0, -100, 0, -100]]
    """
    labels = labels.clone()
    labels[:, 1:].masked_fill_(ends[:, :-1], IGNORE)
    return labels


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
                 task: str = "causal_lm", mlm: MaskingRule | None = None, separator: int | None = None) -> MicroBatches:
    """This rank's micro-batches of :func:`eval_sample`, in split order, the same every time (masks too).

    Micro-batch k of rank r is the sample's positions [(k * dp + r) * micro, ...): disjoint across ranks.
    """
    sample = eval_sample(len(blocks), micro_batch, n_batches, dp, seed)
    return MicroBatches(blocks.select(sample), micro_batch, dp_rank, dp, seed=seed, task=task, mlm=mlm,
                        shuffle=False, separator=separator)


def predicted_tokens(batches: MicroBatches) -> int:
    """Tokens a loss over one pass of ``batches`` averages: the labels it predicts (causal LM: all but each
    block's first, which nothing precedes, and those -100 marks: prompts, a document's first token; masked LM:
    the masked ones). Leaves ``batches`` unread."""
    shift = 1 if batches.task == "causal_lm" else 0
    probe = copy.copy(batches)
    return sum(int((labels[:, shift:] != IGNORE).sum()) for _, labels in itertools.islice(probe, batches.per_epoch))
