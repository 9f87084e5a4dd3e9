"""The generic adapter's checks: the recorded flow is the one the pipeline reproduces, or a refusal."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from hybrid_ds.errors import UserError
from hybrid_ds.config.families import Family, ScalarOp, apply_in_order
from hybrid_ds.models.masks import LAYER_HELPERS
from hybrid_ds.models.generic.structure import POSITION_OPS, TRACE_SHAPE, WHERE, ModelMap, refuse
from hybrid_ds.models.generic.trace import MASK_INPUTS, Call, Mask, Trace, Unused, common_mask_extras


class FlowChecker:
    """Follows the hidden states through the recorded calls: embedding -> pre -> blocks -> post -> head."""

    def __init__(self, model_type: str, skeleton: nn.Module, model_map: ModelMap, trace: Trace):
        self.model_type, self.skeleton, self.map, self.trace = model_type, skeleton, model_map, trace
        self.paths = model_map.paths
        self.embedding_path = self.paths[id(model_map.embedding)]
        self.output_path = self.paths[id(model_map.output)]
        self.rotary_path = self.paths[id(model_map.rotary)] if model_map.rotary is not None else None
        self.stage = "embedding"     # embedding -> pre -> blocks -> post -> head -> logits -> done
        self.hidden: Any = None      # the tensor that is "the hidden states" now
        self.pre: list[str] = []     # modules between the embedding and block 0
        self.pre_steps: list[str | ScalarOp] = []  # those modules' names and scalar ops, in order
        self.head_ops: list[ScalarOp] = []   # scalar ops on the final hidden states before the output projection
        self.logit_ops: list[ScalarOp] = []  # scalar ops on the logits after it
        self.post: list[str] = []    # modules between the last block and the output projection
        self.blocks_seen = 0
        self.unmasked: set[str | None] = set()  # layer types whose blocks get attention_mask=None
        self.masked: set[str | None] = set()    # and those whose blocks get a mask
        self.unrotated: set[str] = set()        # layer types whose blocks get position_embeddings=None
        self.rotated: set[str] = set()          # and those whose blocks get the rotary module's
        self.blocks_without_positions: list[int] = []  # a model without positions (Mamba 2) gives none
        self.positions: Any = None
        self.more_positions: list[Any] = []
        self.rotary_out: dict[str | None, Any] = {}  # layer type (None: all layers) -> the rotary module's output
        self.logits: Any = None
        self.loss: Any = None

    def fail(self, reason: str) -> UserError:
        return refuse(self.model_type, reason)

    def touches(self, call: Call) -> bool:
        return any(v is self.hidden for v in (*call.args, *call.kwargs.values())) if self.hidden is not None else False

    def visit(self, call: Call) -> None:
        getattr(self, f"_{call.kind}")(call)

    def _module(self, call: Call) -> None:
        path = call.name
        if path == self.embedding_path:
            if self.stage != "embedding" or not _only(call, self.trace.inputs["input_ids"]):
                raise self.fail(f"its embedding {path} is called other than once on the token ids alone")
            self.hidden, self.stage = call.out, "pre"
        elif path == self.rotary_path:
            self._rotary(call)
        elif path == self.output_path:
            if self.stage != "head" or len(call.args) != 1 or call.kwargs or not self._same_hidden(call.args[0]):
                raise self.fail(f"its output projection {path} is not applied to the final hidden states alone")
            self.logits, self.stage = call.out, "logits"
        elif self.stage in ("pre", "post") and _only(call, self.hidden):
            (self.pre if self.stage == "pre" else self.post).append(path)
            if self.stage == "pre":
                self.pre_steps.append(path.rpartition(".")[2])
            self.hidden = call.out
        else:
            raise self.fail(f"it calls {path} ({type(self.skeleton.get_submodule(path)).__name__}) in a way the "
                            "pipeline does not reproduce (only modules applied to the hidden states alone can be "
                            "placed before the first or after the last block)")

    def _rotary(self, call: Call) -> None:
        """Called once as (hidden_states, position_ids), or once per layer type with ``layer_type`` (Gemma 3)."""
        bound = _bind(self.map.rotary, call)
        names, rest = list(bound), dict(list(bound.items())[2:])
        layer_type = rest.pop("layer_type", None)
        per_type = layer_type is not None
        if (self.stage not in ("pre", "blocks") or len(names) < 2 or names[1] != "position_ids"
                or any(v is not None for v in rest.values()) or layer_type in self.rotary_out
                or (self.rotary_out and (None in self.rotary_out) != (not per_type))):
            raise self.fail(f"its rotary module {self.rotary_path} is not called once as (hidden_states, position_ids)"
                            " or once per layer type")
        self._set_positions(bound["position_ids"])
        self.rotary_out[layer_type] = call.out

    def _set_positions(self, positions: Any) -> None:
        """Blocks, masks and rotary may get different tensors (Qwen 3.5: rows of one expanded arange); each must be
        arange(sequence length), checked at the end."""
        if self.positions is None:
            self.positions = positions
        elif positions is not self.positions and all(positions is not p for p in self.more_positions):
            self.more_positions.append(positions)

    def _block(self, call: Call) -> None:
        index = int(call.name)
        if self.stage not in ("pre", "blocks") or index != self.blocks_seen:
            raise self.fail(f"its blocks are not called once each, in order (block {index} came "
                            f"{'after the head' if self.stage not in ('pre', 'blocks') else 'out of order'})")
        args = dict(call.kwargs)
        hidden = args.pop(next(iter(args)))
        if hidden is not self.hidden:
            raise self.fail(f"block {index} does not receive the {'embeddings' if index == 0 else 'previous output'}"
                            " unchanged")
        self._check_block_kwargs(index, args)
        self.hidden, self.stage, self.blocks_seen = call.out, "blocks", index + 1
        if self.blocks_seen == len(self.map.blocks):
            self.stage = "post"

    def _check_block_kwargs(self, index: int, bound: dict[str, Any]) -> None:
        signature = inspect.signature(self.map.blocks[index].forward).parameters
        args = {}
        for name, value in bound.items():  # what reaches **kwargs counts as given by name
            args.update(value if signature[name].kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        given, mask = "attention_mask" in args, args.pop("attention_mask", None)
        layer_types = getattr(self.skeleton.config, "layer_types", None)
        kind = layer_types[index] if layer_types else None
        (self.unmasked if given and mask is None else self.masked).add(kind)
        if given and mask is None and kind is not None and kind not in LAYER_HELPERS:
            pass  # Nemotron-H's MLP and MoE layers: no mask for a layer type transformers' table does not know
        elif not isinstance(mask, Mask):
            raise self.fail(f"block {index} gets an attention mask that no masking_utils helper made")
        elif mask != self.trace.glue_masks[index]:
            raise self.fail(f"block {index} gets the mask of {mask} where the pipeline would use "
                            f"{self.trace.glue_masks[index]} (see layer_types / sliding_window in the config)")
        if "position_ids" in args:
            self._set_positions(args.pop("position_ids"))
        else:
            self.blocks_without_positions.append(index)
        given, cos_sin = "position_embeddings" in args, args.pop("position_embeddings", None)
        per_type = bool(self.rotary_out) and None not in self.rotary_out
        layer_type = layer_types[index] if per_type and layer_types else None
        unrotated = given and cos_sin is None and kind is not None and self.rotary_out
        if kind is not None:
            (self.unrotated if unrotated else self.rotated).add(kind)
        if unrotated:
            pass  # OLMo-hybrid's linear-attention layers: the model gives them no (cos, sin)
        elif cos_sin is not self.rotary_out.get(layer_type):
            raise self.fail(f"block {index} gets position_embeddings that are not its rotary module's output"
                            + (f" for its layer type {layer_type!r}" if layer_type else ""))
        for name, value in args.items():
            default = signature[name].default if name in signature else None
            if value is not None and value is not False and value is not default:
                raise self.fail(f"block {index} gets {name}={type(value).__name__}, which the pipeline does not pass")

    def _mask(self, call: Call) -> None:
        known = MASK_INPUTS | {"allow_is_causal_skip"}  # the latter: recorded in the Family, checked per block
        kwargs = call.kwargs
        if call.args or set(kwargs) - known:
            raise self.fail(f"it calls {call.name} with {sorted(set(kwargs) - known) or 'positional arguments'}")
        if kwargs.get("config") is not self.skeleton.config or kwargs.get("attention_mask") is not \
                self.trace.inputs["attention_mask"]:
            raise self.fail(f"it calls {call.name} with another config or attention mask than its own")
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise self.fail(f"it calls {call.name} with a cache while training")
        if kwargs.get("position_ids") is not None:
            self._set_positions(kwargs["position_ids"])

    def _op(self, call: Call) -> None:
        name = call.name
        if not isinstance(call.out, torch.Tensor):
            return  # shapes, devices, dtypes
        if (name == "to" and self.stage == "head" and call.args and call.out is call.args[0]
                and self._same_hidden(call.args[0])):
            return  # Mamba 2's hidden_states.to(lm_head.weight.dtype): the projection's own dtype, a no-op
        if self.touches(call):
            if name == "dropout" and _dropout_p(call) == 0:
                self.hidden = call.out  # dropout with p=0 is the identity
                return
            op = _scalar_op(call, self.hidden)
            if op is not None and self.stage in ("pre", "head"):
                (self.pre_steps if self.stage == "pre" else self.head_ops).append(op)
                self.hidden = call.out
                return
            if name == "__getitem__" and self.stage == "head" and call.out.shape == self.hidden.shape:
                return  # hidden_states[:, slice(0, None), :] (logits_to_keep=0); checked at the projection
            raise self.fail(f"it applies {name} to the hidden states {WHERE[self.stage]}, outside its modules, "
                            "which the pipeline does not reproduce")
        if self.logits is not None and any(v is self.logits for v in (*call.args, *call.kwargs.values())):
            op = _scalar_op(call, self.logits)
            if op is not None and self.stage == "logits" and self.loss is None:
                self.logit_ops.append(op)
                self.logits = call.out
                return
            raise self.fail(f"it applies {name} to the logits after the output projection (a logit scale or "
                            "soft-cap the pipeline does not reproduce)")
        if name in POSITION_OPS or (name in ("add", "__add__", "__radd__") and _adds_zero(call)):
            return
        raise self.fail(f"it computes {name} outside its modules (e.g. for position ids), which the pipeline "
                        "does not reproduce")

    def _base(self, call: Call) -> None:
        if self.stage == "blocks":
            raise self.fail(f"only {self.blocks_seen} of its {len(self.map.blocks)} blocks are called")
        if self.stage != "post" or getattr(call.out, "last_hidden_state", None) is not self.hidden:
            raise self.fail("its base model's last_hidden_state is not the last block's output after the final "
                            "modules")
        self.stage = "head"

    def _loss(self, call: Call) -> None:
        from transformers.loss.loss_utils import ForCausalLMLoss

        bound = inspect.signature(ForCausalLMLoss).bind(*call.args, **call.kwargs).arguments
        vocab = self.map.output.weight.shape[0]
        if (call.name != ForCausalLMLoss.__name__ or self.stage != "logits" or bound.get("logits") is not self.logits
                or bound.get("labels") is not self.trace.inputs["labels"] or bound.get("vocab_size") != vocab
                or any(v is not None for k, v in bound.items() if k not in ("logits", "labels", "vocab_size"))
                or self.loss is not None):
            raise self.fail(f"its loss is not ForCausalLMLoss(logits, labels, vocab_size={vocab}) (it is {call.name})")
        self.loss = call.out

    def _check_positions_are_arange(self) -> None:
        """The position ids come from ``arange(seq_len)`` (+ 0 cached tokens), as the pipeline makes them: each
        tensor given is one made from it by views, expansions and indexing of the leading axes."""
        made_by = {id(c.out): c for c in self.trace.calls if c.kind == "op" and isinstance(c.out, torch.Tensor)}
        seq = TRACE_SHAPE[1]
        for positions in (self.positions, *self.more_positions):
            tensor = positions
            while (call := made_by.get(id(tensor))) is not None and call.name != "arange":
                if call.name == "__getitem__" and not _leading_index(call.args[1], call.out, seq):
                    call = None
                    break
                tensor = next((a for a in call.args if isinstance(a, torch.Tensor)), None)
            numbers = [a for a in (call.args if call else ()) if isinstance(a, (int, float))]
            if (call is None or call.kwargs.get("start", 0) != 0 or call.out.shape != (seq,)
                    or (len(numbers) > 1 and numbers[0] != 0) or tuple(positions.shape[-1:]) != (seq,)):
                raise self.fail("its position ids are not arange(sequence length), which the pipeline assumes")

    def _same_hidden(self, tensor: Any) -> bool:
        return tensor is self.hidden or (getattr(tensor, "_base", None) is self.hidden
                                         and tensor.shape == self.hidden.shape)

    def family(self) -> Family:
        out = self.trace.output
        if self.stage != "logits" or getattr(out, "logits", None) is not self.logits:
            raise self.fail("its logits are not the output projection's output unchanged")
        if self.loss is None or getattr(out, "loss", None) is not self.loss:
            raise self.fail("its loss is not ForCausalLMLoss of the logits alone (e.g. an auxiliary loss is added)")
        if self.map.rotary is not None and not self.rotary_out:
            raise self.fail(f"its rotary module {self.rotary_path} is never called")
        if self.trace.block_tuple and any(isinstance(v, Unused) or (isinstance(v, tuple) and any(
                isinstance(x, Unused) for x in v)) for v in out.values()):
            raise self.fail("its output includes what its blocks return after the hidden states")
        if self.unmasked & self.masked:
            raise self.fail(f"blocks of layer type {sorted(map(str, self.unmasked & self.masked))[0]} get a mask "
                            "in some layers and none in others")
        if self.unrotated & self.rotated:
            raise self.fail(f"blocks of layer type {sorted(self.unrotated & self.rotated)[0]} get position_embeddings"
                            " in some layers and none in others")
        positions = self._positions_kind()
        return Family(self.model_type, self.embedding_path, tuple(self.pre), apply_in_order(tuple(self.pre_steps)),
                      self.paths[id(self.map.blocks)], tuple(self.post), self.output_path, rotary=self.rotary_path,
                      block_class=type(self.map.blocks[0]).__name__, head_ops=tuple(self.head_ops),
                      logit_ops=tuple(self.logit_ops), mask_kwargs=common_mask_extras(self.trace),
                      rotary_per_layer_type=bool(self.rotary_out) and None not in self.rotary_out,
                      positions=positions, block_returns_tuple=self.trace.block_tuple,
                      unmasked_layer_types=tuple(sorted(self.unmasked)),
                      unrotated_layer_types=tuple(sorted(self.unrotated)))

    def _positions_kind(self) -> str:
        """"arange", or "none" where no block, mask or rotary module is given position ids at all."""
        if not self.blocks_without_positions:
            self._check_positions_are_arange()
            return "arange"
        if len(self.blocks_without_positions) < len(self.map.blocks) or self.positions is not None:
            raise self.fail(f"block {self.blocks_without_positions[0]} is not given position_ids")
        return "none"


def _only(call: Call, tensor: Any) -> bool:
    """The call's one argument is ``tensor`` (by identity: comparing tensors with == would compare values)."""
    return len(call.args) == 1 and call.args[0] is tensor and not call.kwargs


# Elementwise ops with a constant that the pipeline replays (ScalarOp): torch function name -> tensor method
SCALAR_OPS = {"mul": "mul", "__mul__": "mul", "__rmul__": "mul", "div": "div", "__truediv__": "div", "tanh": "tanh",
              "float": "float"}  # Mamba 2's logits.float(): a cast, replayed as is in any precision


def _scalar_op(call: Call, tensor: Any) -> ScalarOp | None:
    """``call`` as a ScalarOp of ``tensor`` (the hidden states or logits), or None if it is not one.

    The constant is a Python number or a 0-dim tensor with a value: on the meta device every tensor
    made from the model's inputs or weights is on meta, so a real one is a constant of the model's code.
    """
    name = SCALAR_OPS.get(call.name)
    if name is None or call.kwargs or not call.args or not any(a is tensor for a in call.args):
        return None
    others = [a for a in call.args if a is not tensor]
    if name in ("tanh", "float"):
        return ScalarOp(name) if len(call.args) == 1 else None
    if len(call.args) != 2 or len(others) != 1 or (name == "div" and call.args[0] is not tensor):
        return None
    value = others[0]
    if type(value) in (int, float):
        return ScalarOp(name, float(value))
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()
            and value.device.type != "meta"):
        return ScalarOp(name, value.item())
    return None


def _leading_index(index: Any, out: Any, seq: int) -> bool:
    """``x[index]`` picks along leading axes only (ints, slices, ``...``, no lists or tensors), keeping all ``seq``
    positions of the last axis in order."""
    parts = index if isinstance(index, tuple) else (index,)
    # a slice of the last axis that keeps seq of its seq entries is all of them, in order (steps are positive)
    return all(p is Ellipsis or p is None or type(p) in (int, slice) for p in parts) and out.shape[-1:] == (seq,)


def _adds_zero(call: Call) -> bool:
    return any(type(v) is int and v == 0 for v in (*call.args, *call.kwargs.values()))


def _bind(module: nn.Module, call: Call) -> dict[str, Any]:
    return dict(inspect.signature(module.forward).bind(*call.args, **call.kwargs).arguments)


def _dropout_p(call: Call) -> float:
    """The probability of F.dropout(input, p, training); 1 for a call it cannot read, so that it counts."""
    args = {**dict(zip(("input", "p", "training"), call.args)), **call.kwargs}
    p, training = args.get("p", 0.5), args.get("training", True)
    return p if training and isinstance(p, (int, float)) else (0 if not training else 1)


def check_unplaced(model_type: str, skeleton: nn.Module, model_map: ModelMap, family: Family, trace: Trace) -> None:
    """Every parameter and buffer of the model belongs to a part the pipeline builds."""
    placed = {family.token_embedding, *family.embedding, family.blocks, *family.final, family.output}
    placed |= {family.rotary} if family.rotary else set()
    called = {c.name for c in trace.calls if c.kind == "module"}
    for owner in (skeleton, model_map.base):
        own = [n for n, _ in owner.named_parameters(recurse=False)] + [n for n, _ in owner.named_buffers(recurse=False)]
        if own:
            raise refuse(model_type, f"{type(owner).__name__} holds {', '.join(own)} outside any submodule")
        for name, child in owner.named_children():
            path = model_map.paths[id(child)]
            if child is model_map.base or path in placed:
                continue
            has_state = any(True for _ in child.parameters()) or any(True for _ in child.buffers())
            if has_state or path in called:
                raise refuse(model_type, f"it has a submodule {path} ({type(child).__name__}) that is neither "
                                         "embedding, block, rotary, final norm nor output projection")
