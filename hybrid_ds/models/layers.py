"""The pipeline's layers: small modules around the Hugging Face modules, passing only tensors.

Between layers (and so between stages) travels a tuple of tensors:
``(input_ids, attention_mask[, token_type_ids])`` into the first layer, then
``(hidden_states, attention_mask[, router_stats])``, and logits out of the last (``(logits, router_aux_loss)``
for a Mixture-of-Experts model whose loss includes its routers': hybrid_ds.models.router_loss), as
:class:`~hybrid_ds.models.head_loss.HeadLogits` not yet computed, so that the loss can compute them a block of
rows at a time (``train.fused_loss``); they never cross a stage boundary. The
attention mask is an int64 padding mask (1 = real token), or with ``data.document_mask`` each token's document
index (0 = padding; hybrid_ds.models.masks): no bools (DeepSpeed cannot send them) and nothing that needs grad.
Position ids, rotary cos/sin and the 4-D attention mask are recomputed on each stage with the same
helpers Hugging Face uses, so nothing derived has to cross a stage boundary; within a stage they are made
once per micro-batch and shared by its blocks (``Derived``), as the Hugging Face model makes them once.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from hybrid_ds.config.families import Family, apply_ops
from hybrid_ds.errors import UserError
from hybrid_ds.models.build import StageBuilder
from hybrid_ds.models.head_loss import IGNORE_INDEX, HeadLogits, fused_lm_loss, materialize, shifted_labels
from hybrid_ds.models.masks import attention_mask_4d, padding_mask, position_ids
from hybrid_ds.models.router_loss import add_router_stats, router_aux_loss
from hybrid_ds.models.sequence_parallel import SequenceShard, check_exchanged, exchanges, use_sequence_parallel


class TokenEmbedding(nn.Module):
    """Token ids -> embeddings. Tied models build it on the first and the last stage (TiedLayerSpec).

    Under sequence parallelism (``builder.sequence``) it embeds this rank's shard of the tokens; the mask stays
    whole (hybrid_ds.models.sequence_parallel)."""

    def __init__(self, builder: StageBuilder):
        super().__init__()
        self.embed = builder.module(builder.family.token_embedding)
        self.sequence = builder.sequence

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, *rest = inputs
        if self.sequence is not None:
            input_ids = input_ids[:, self.sequence.of(input_ids.shape[1])]
        return (self.embed(input_ids), *rest)


def project_with_embedding(module: TokenEmbedding, hidden: Any) -> Any:
    """A tied output projection: the embedding's own weight, unscaled (Gemma scales only the lookup)."""
    return on_logits(lambda x: HeadLogits(x, module.embed.weight), hidden)


def on_logits(fn: Any, outputs: Any) -> Any:
    """``fn`` of the hidden states or logits in a head layer's input, which may carry the router loss: (x, aux)."""
    return (fn(outputs[0]), *outputs[1:]) if isinstance(outputs, tuple) else fn(outputs)


class EmbeddingRest(nn.Module):
    """The rest of the embedding part: positions, token types, dropout, as the family combines them."""

    def __init__(self, builder: StageBuilder):
        super().__init__()
        family = builder.family
        token_child = family.token_embedding.rpartition(".")[2]
        mods = {}
        for path in family.embedding:
            inside = family.token_embedding.startswith(path + ".")  # BERT: embeddings holds word_embeddings
            mods[path.rpartition(".")[2]] = builder.module(path, without=(token_child,) if inside else ())
        self.mods = nn.ModuleDict({k: v for k, v in mods.items() if v is not None})
        self.family, self.documents, self.sequence = family, builder.documents, builder.sequence

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, attention_mask, *rest = inputs
        token_types = rest[0] if rest else None
        mask, positions = padding_mask(attention_mask, self.documents), position_ids(self.family, attention_mask,
                                                                                      self.documents)
        if self.sequence is not None:  # the shard's own positions, taken from the whole sequence's
            part = self.sequence.of(attention_mask.shape[1])
            mask, positions = mask[:, part], _shard_of(positions, part)
            token_types = token_types[:, part] if token_types is not None else None
        hidden = self.family.embed(dict(self.mods), embeds, mask, token_types, positions)
        return hidden, attention_mask


def _shard_of(positions: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if positions is None else positions[:, part]


class Derived:
    """Position ids, rotary cos/sin and 4-D masks of the micro-batch flowing through one stage, made once.

    Made again in every block they would cost a GPU->CPU sync per block (the mask helper reads the
    padding mask to choose SDPA's causal fast path) and ~0.3 ms of Python per block on CPU. Values are
    kept for one padding-mask tensor (the same object, unmodified, with activations of the same shape and
    dtype); anything else, such as the next micro-batch or the detached inputs that activation
    checkpointing recomputes from, starts afresh. None of them needs grad.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.key: tuple = ()
        self.values: dict[str, Any] = {}

    def get(self, name: str, attention_mask: torch.Tensor, hidden: torch.Tensor, make: Any) -> Any:
        key = (attention_mask._version, hidden.shape, hidden.dtype, hidden.device)
        if attention_mask is not self.mask or key != self.key:
            self.mask, self.key, self.values = attention_mask, key, {}
        if name not in self.values:
            self.values[name] = make()
        return self.values[name]


class Block(nn.Module):
    """One Hugging Face transformer block, given the mask and rotary embedding its model would give it."""

    def __init__(self, builder: StageBuilder, index: int):
        super().__init__()
        self.layer = builder.module(f"{builder.family.blocks}.{index}")
        self.rotary = builder.rotary()
        self.family, self.config, self.index = builder.family, builder.config, index
        self.documents = builder.documents
        layer_types = getattr(self.config, "layer_types", None)
        self.mask_kind = layer_types[index] if layer_types else "all"
        self.rotary_kwargs = {"layer_type": self.mask_kind} if self.family.rotary_per_layer_type else {}
        self.derived: Derived = builder.shared.setdefault("derived", Derived())
        self.sequence = builder.sequence
        if self.sequence is not None:  # its attention exchanges over the group (a config of the stage's own)
            attention_config = builder.shared.get("sequence_config")
            if attention_config is None:
                attention_config = builder.shared["sequence_config"] = copy.deepcopy(self.config)
                use_sequence_parallel(attention_config, self.sequence)
            for module in self.layer.modules():
                if getattr(module, "config", None) is self.config:
                    module.config = attention_config
        if builder.tiled_mlp:
            tile_mlp(self.layer, self.config, *builder.tiled_mlp)
        if builder.selective_checkpoint:
            checkpoint_part(self.layer, self.config, builder.selective_checkpoint)
        if builder.float8:
            to_float8(self.layer, self.config, builder.device)
        self.router_logits: list[torch.Tensor] = []
        aux = self.family.router_aux if getattr(self.config, "output_router_logits", False) else None
        self.aux = aux
        for module in self.layer.modules() if aux else ():
            if type(module).__name__ == aux.router_class:
                module.register_forward_hook(lambda m, args, out: self.router_logits.append(out[aux.index]))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, attention_mask, *stats = inputs
        whole = self.derived.get("positions", attention_mask, hidden,
                                 lambda: position_ids(self.family, attention_mask, self.documents))
        # sequence parallel: the shard's positions; the mask of the whole sequence, which attention sees whole
        length = attention_mask.shape[1]
        positions = whole if self.sequence is None else _shard_of(whole, self.sequence.of(length))
        shape = hidden if self.sequence is None else hidden.new_empty((hidden.shape[0], length, 0))
        kwargs: dict[str, Any] = {"attention_mask": self.derived.get(
            f"mask:{self.mask_kind}", attention_mask, hidden,
            lambda: additive(attention_mask_4d(self.family, self.config, self.index, shape, attention_mask, whole,
                                               self.documents), hidden.dtype))}
        if positions is not None:
            kwargs["position_ids"] = positions
        if self.rotary is not None and self.mask_kind in self.family.unrotated_layer_types:
            kwargs["position_embeddings"] = None  # as the model gives them
        elif self.rotary is not None:
            kwargs["position_embeddings"] = self.derived.get(
                f"rotary:{self.rotary_kwargs.get('layer_type')}", attention_mask, hidden,
                lambda: self.rotary(hidden, position_ids=positions, **self.rotary_kwargs))
        self.router_logits.clear()  # a recompute (activation checkpointing) may have left some
        before = exchanges()
        hidden = self.layer(hidden, **kwargs)
        if self.sequence is not None:
            check_exchanged(before, self.config.model_type)
        if self.family.block_returns_tuple:  # Bamba: (hidden_states, attention weights the model drops)
            hidden = hidden[0]
        for router_logits in self.router_logits:
            stats = [add_router_stats(stats[0] if stats else None, router_logits,
                                      padding_mask(attention_mask, self.documents), self.aux)]
        self.router_logits.clear()
        return (hidden, attention_mask, *stats)


def tile_mlp(layer: nn.Module, config: Any, tiles: int, tiled: Any) -> None:
    """``train.tiled_mlp``: the block's ``mlp`` runs ``tiles`` tiles of the sequence at a time through ``tiled`` (the
    runtime's: DeepSpeed's TiledMLP), its forward recomputed tile by tile in backward. Refused with one line for a
    block without an ``mlp`` module and with a Mixture-of-Experts router loss (the router logits it adds up would come
    from the forward without gradients)."""
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise UserError("train.tiled_mlp", f"{tiles} is not available for {config.model_type}: its blocks have no "
                                           "`mlp` module to tile; set tiled_mlp 0")
    if getattr(config, "output_router_logits", False):
        raise UserError("train.tiled_mlp", f"{tiles} is not available with {config.model_type}'s router loss "
                                           "(output_router_logits); set tiled_mlp 0 or output_router_logits false")
    forward = mlp.forward

    def on_tile(module: nn.Module, tile: torch.Tensor) -> torch.Tensor:
        # TiledMLP hands a [batch, seq / tiles, hidden] chunk in forward (not contiguous at batch > 1) and [rows, hidden]
        # in backward: one contiguous sequence of its rows for every MLP (an MoE layer reads [batch, seq, hidden])
        return forward(tile.reshape(1, -1, tile.shape[-1])).reshape(tile.shape)

    mlp.forward = lambda x: tiled(on_tile, mlp, x, tiles)


# The module of a block that each part of train.selective_checkpoint recomputes, by its name in the block.
PARTS = {"attention": ("self_attn", "attn", "attention", "self_attention"), "mlp": ("mlp",)}


def checkpoint_part(layer: nn.Module, config: Any, part: str) -> None:
    """``train.selective_checkpoint``: the block's attention or MLP module keeps no activations for backward and runs
    its forward again there (torch.utils.checkpoint, non-reentrant: keyword arguments pass, dropout's random state is
    restored, and a tensor it makes beside its output, a router's logits, still gets its gradient). Refused with one
    line for a block without that module (BERT's and OPT's MLPs are loose layers)."""
    module = next((m for name in PARTS[part] if isinstance(m := getattr(layer, name, None), nn.Module)), None)
    if module is None:
        other = next(p for p in PARTS if p != part)
        raise UserError("train.selective_checkpoint", f"{part!r} is not available for {config.model_type}: its blocks "
                                                      f"have no {' or '.join(PARTS[part])} module; use {other!r} or "
                                                      "null")
    # The class's forward (train.tiled_mlp, the one other wrapper of a part, is refused with "mlp") through one
    # function for every block: compiled blocks (train.compile) then share one graph instead of one each.
    module.forward = types.MethodType(_recomputed_forward, module)


def to_float8(layer: nn.Module, config: Any, device: torch.device) -> None:
    """``train.float8``: the block's ``nn.Linear`` layers become torchao's ``Float8Linear`` (the same weight and bias
    parameters, so checkpoints and exports are unchanged), those whose widths float8 matmuls take (multiples of 16).
    Refused with one line for a block with none (GPT-2's layers are ``Conv1D``) and on a GPU without float8 matmuls
    (compute capability below 8.9: an A100's)."""
    def fits(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    if not any(fits(module, name) for name, module in layer.named_modules()):
        raise UserError("train.float8", f"true is not available for {config.model_type}: its blocks have no "
                                        "nn.Linear layer whose widths are multiples of 16; set train.float8 false")
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is not None and capability < (8, 9):
        raise UserError("train.float8", f"true needs float8 matmuls (compute capability 8.9 or higher: H100, H200, "
                                        f"L40S), and {torch.cuda.get_device_name(device)} has "
                                        f"{'.'.join(map(str, capability))}; set train.float8 false")
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(layer, module_filter_fn=fits)


def _recomputed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(type(module).forward, module, *args, use_reentrant=False, **kwargs)


def additive(mask: Any, dtype: torch.dtype) -> Any:
    """A boolean 4-D mask (sdpa's) as the additive one (0 where attended, -inf elsewhere) that
    ``scaled_dot_product_attention`` would make of it at every call, made once for the stage's blocks: each call's
    own copy is kept for backward, one per block (a document mask of 8k tokens: 256 MiB a block in fp32)."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask


class FinalNorm(nn.Module):
    """What runs after the last block and before the output projection (final norm, projections)."""

    def __init__(self, builder: StageBuilder):
        super().__init__()
        self.mods = nn.ModuleList(m for m in (builder.module(p) for p in builder.family.final) if m is not None)
        self.ops = builder.family.head_ops
        self.aux = builder.family.router_aux

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        hidden, _, *stats = inputs
        for module in self.mods:
            hidden = module(hidden)
        hidden = apply_ops(hidden, self.ops)
        return (hidden, router_aux_loss(stats[0], self.aux)) if stats else hidden


class OutputProjection(nn.Module):
    """An untied output projection (the Hugging Face module itself, with its bias where it has one)."""

    def __init__(self, builder: StageBuilder):
        super().__init__()
        self.proj = builder.module(builder.family.output)

    def forward(self, hidden: Any) -> Any:
        if type(self.proj) is nn.Linear:
            return on_logits(lambda x: HeadLogits(x, self.proj.weight, self.proj.bias), hidden)
        return on_logits(self.proj, hidden)  # a projection of its own kind: real logits


class LogitsBias(nn.Module):
    """The output bias of a tied head (BERT's cls.predictions.bias, phi's lm_head.bias), added after the tied
    projection."""

    def __init__(self, builder: StageBuilder, path: str):
        super().__init__()
        self.bias = builder.parameter(path)

    def forward(self, logits: Any) -> Any:
        return on_logits(lambda x: x.add_bias(self.bias) if isinstance(x, HeadLogits) else x + self.bias, logits)


class LogitsOps(nn.Module):
    """Scalar ops the model applies to its logits (Cohere's logit scale, Gemma 2's final soft-cap)."""

    def __init__(self, builder: StageBuilder):
        super().__init__()
        self.ops = builder.family.logit_ops

    def forward(self, logits: Any) -> Any:
        return on_logits(lambda x: x.then(self.ops) if isinstance(x, HeadLogits) else apply_ops(x, self.ops), logits)


def loss_function(family: Family, vocab_size: int, fused: bool = True, sequence: SequenceShard | None = None):
    """The Hugging Face model's own loss: shifted causal-LM or plain masked-LM cross-entropy, in fp32.

    ``fused``: computed from the head's hidden states a block of rows at a time (hybrid_ds.models.head_loss),
    never holding the [tokens, vocab] logits; otherwise Hugging Face's loss of the materialized logits.
    """
    from transformers.loss import loss_utils

    hf_loss = getattr(loss_utils, family.task_info.loss)
    shift = family.task_info.loss == "ForCausalLMLoss"

    def lm_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """The LM loss of the logits, plus ``router_aux_loss_coef`` times the router loss where it came along."""
        logits, *aux = outputs if isinstance(outputs, tuple) else (outputs,)
        if sequence is not None:
            loss = shard_loss(logits, labels)
        elif fused and isinstance(logits, HeadLogits):
            loss = fused_lm_loss(logits, labels, shift)
        else:
            loss = hf_loss(materialize(logits), labels, vocab_size)
        return loss + family.router_aux.coef * aux[0] if aux else loss

    def shard_loss(logits: Any, labels: torch.Tensor) -> torch.Tensor:
        """This shard's share of the whole sequence's loss: its tokens' sum over all predicted tokens' count (the
        labels come whole; the shards' losses add up to the loss, their gradients to its gradient)."""
        if shift:
            labels = shifted_labels(labels)
        count = (labels != IGNORE_INDEX).sum()
        labels = labels[:, sequence.of(labels.shape[1])].contiguous()
        if fused and isinstance(logits, HeadLogits):
            return fused_lm_loss(logits, labels, shift=False, count=count)
        kwargs = {"shift_labels": labels} if shift else {}
        return hf_loss(materialize(logits), None if shift else labels, vocab_size, num_items_in_batch=count, **kwargs)

    return lm_loss
