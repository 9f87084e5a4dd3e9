"""Ulysses sequence parallelism inside a stage: each rank of a sequence-parallel (sp) group holds 1/sp of every
micro-batch's tokens, a contiguous shard; attention exchanges them for 1/sp of the heads (DeepSpeed's all-to-all,
``hybrid_ds.seam.ulysses``), attends over the whole sequence, and exchanges back.

Unlike DeepSpeed's own Hugging Face integration (``UlyssesSPAttentionHF``), which drops the attention mask and
relies on causal attention over position ids, the mask here is the one the model would make for the whole
sequence: the block computes it from the whole sequence's padding mask or document ids, which travel whole (they
are small), and hands it to attention with its shard of the hidden states; positions and rotary embeddings are the
shard's true ones. So document masks, padding and sliding windows stay exact, at the cost of a dense mask where the
model's own attention needs one (none for plain causal sdpa).

The exchange itself is DeepSpeed's differentiable all-to-all, which the runtime hands in (``SequenceShard.exchange``:
``hybrid_ds.seam.ulysses.all_to_all``, the models layer importing nothing of the seam). It registers one attention
implementation per core one (``hybrid_ds_ulysses_sdpa``, ``..._eager``) with
transformers' ``AttentionInterface``, and the matching mask function with ``AttentionMaskInterface``, so that the
model's own attention module calls it with its projected, rotated query, key and value.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hybrid_ds.errors import UserError

PREFIX = "hybrid_ds_ulysses_"
CORES = ("sdpa", "eager")  # the attention implementations the exchange wraps


@dataclass(frozen=True)
class SequenceShard:
    """This rank's part of every sequence: shard ``rank`` of ``size`` equal, contiguous ones, exchanged in ``group``
    by ``exchange(group, tensor)``: slice i of dimension 0 to rank i, slice i of the result from rank i, with the
    same exchange of the gradient as its backward."""

    group: Any
    rank: int
    size: int
    exchange: Callable[[Any, torch.Tensor], torch.Tensor]

    def of(self, length: int) -> slice:
        """The positions of this rank's shard in a sequence of ``length`` tokens (``length`` divisible by size)."""
        if length % self.size:
            raise ValueError(f"a sequence of {length} tokens does not split into {self.size} equal shards")
        step = length // self.size
        return slice(self.rank * step, (self.rank + 1) * step)


_SHARDS: dict[str, SequenceShard] = {}
_EXCHANGES = [0]  # attention calls that exchanged: a block whose layer made none does not attend through them


def check_model(family: Any, hf_config: Any, sp: int) -> None:
    """One line (``pipeline.sequence_parallel``) when the model cannot be split into ``sp`` shards of every sequence:
    heads that do not divide, positions its shards cannot be given, a router loss over each shard's tokens."""
    key, model_type = "pipeline.sequence_parallel", hf_config.model_type
    heads = getattr(hf_config, "num_attention_heads", None)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads and heads % sp:
        raise UserError(key, f"{sp} does not divide {model_type}'s {heads} attention heads (each rank attends with "
                             f"heads / {sp} of them); use a divisor of {heads}")
    if kv_heads and kv_heads % sp:
        raise UserError(key, f"{sp} does not divide {model_type}'s {kv_heads} key/value heads (num_key_value_heads; "
                             f"each rank attends with kv heads / {sp}); use a divisor of {kv_heads}")
    if family.positions == "absolute":
        raise UserError(key, f"{sp} is not available for {model_type}: its embedding makes the positions of the tokens "
                             "it is given, which for a shard are not their positions in the sequence; use 1")
    if family.positions == "none":
        raise UserError(key, f"{sp} is not available for {model_type}: its blocks take no positions (recurrent or "
                             "state-space layers read the sequence in order), so a shard cannot run on its own; use 1")
    if family.router_aux is not None and getattr(hf_config, "output_router_logits", False):
        raise UserError(key, f"{sp} is not available with {model_type}'s router loss (output_router_logits): each "
                             "rank would balance the experts over its shard's tokens, not the sequence's; use 1 or "
                             "model.overrides.output_router_logits false")
    core = getattr(hf_config, "_attn_implementation", None) or "sdpa"
    if core.removeprefix(PREFIX) not in CORES:
        raise UserError(key, f"{sp} wraps sdpa or eager attention, not {core!r}; set model.attn_implementation")


def check_exchanged(before: int, model_type: str) -> None:
    """After a block's layer ran: raise if its attention made no exchange since ``exchanges()`` was ``before``
    (attention that does not go through transformers' attention interface, or a block without attention)."""
    if _EXCHANGES[0] == before:
        raise UserError("pipeline.sequence_parallel", f"{model_type}'s blocks do not attend through transformers' "
                                                      "attention interface (or have no attention), which sequence "
                                                      "parallelism exchanges in; use 1")


def exchanges() -> int:
    """How many attention calls have exchanged so far in this process."""
    return _EXCHANGES[0]


def use_sequence_parallel(hf_config: Any, shard: SequenceShard) -> str:
    """Make the attention modules built from ``hf_config`` exchange over ``shard.group``: register the implementation
    wrapping the config's own (sdpa or eager) and set it on the config. Returns its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    core = hf_config._attn_implementation.removeprefix(PREFIX)
    if core not in CORES:
        raise ValueError(f"sequence parallelism wraps sdpa or eager attention, not {core!r}")
    name = PREFIX + core
    _SHARDS[name] = shard
    ALL_ATTENTION_FUNCTIONS.register(name, _exchanging(name, core))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS.get(core, eager_mask))
    hf_config._attn_implementation = name
    return name


def _core_attention(core: str, module: torch.nn.Module) -> Callable[..., Any]:
    """The attention the model would run: transformers' sdpa, or the model's own eager function (its file's)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if core == "eager":
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS[core]


def _exchanging(name: str, core: str) -> Callable[..., Any]:
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        shard = _SHARDS[name]
        _EXCHANGES[0] += 1
        # [batch, heads, shard tokens, head dim] -> [batch, heads / sp, all tokens, head dim]
        query, key, value = (_gather_sequence(shard, t) for t in (query, key, value))
        output, _ = _core_attention(core, module)(module, query, key, value, attention_mask, **kwargs)
        # [batch, all tokens, heads / sp, head dim] -> [batch, shard tokens, heads, head dim]
        return _scatter_sequence(shard, output), None

    return attention


def _gather_sequence(shard: SequenceShard, x: torch.Tensor) -> torch.Tensor:
    """[b, h, s/sp, d] on every rank -> [b, h/sp, s, d]: rank r keeps heads [r h/sp, (r+1) h/sp) of every token."""
    b, h, s, d = x.shape
    sp = shard.size
    if h % sp:
        raise ValueError(f"{h} attention heads do not split over a sequence-parallel group of {sp}")
    x = x.reshape(b, sp, h // sp, s, d).permute(1, 0, 2, 3, 4)        # [sp (heads), b, h/sp, s/sp, d]
    x = shard.exchange(shard.group, x)                                 # [sp (tokens), b, h/sp, s/sp, d]
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // sp, sp * s, d)


def _scatter_sequence(shard: SequenceShard, x: torch.Tensor) -> torch.Tensor:
    """[b, s, h/sp, d] -> [b, s/sp, h, d]: the inverse exchange, on attention's output layout."""
    b, s, h, d = x.shape
    sp = shard.size
    x = x.reshape(b, sp, s // sp, h, d).permute(1, 0, 2, 3, 4)        # [sp (tokens), b, s/sp, h/sp, d]
    x = shard.exchange(shard.group, x)                                 # [sp (heads), b, s/sp, h/sp, d]
    return x.permute(1, 2, 0, 3, 4).reshape(b, s // sp, sp * h, d)
