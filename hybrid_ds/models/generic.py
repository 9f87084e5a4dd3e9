"""The generic adapter: a Family for a decoder-only model that no named family describes.

It maps the layout most Hugging Face decoder-only models share (token embedding, a list of blocks,
one rotary module, final norms, an output projection) from the model's own structure, then proves
the mapping by running the model once on the meta device with every part recorded:

- the token embedding's output reaches block 0 unchanged, or through modules called on it alone
  (an embedding dropout), each block's output is the next block's input, and the last block's output
  reaches the output projection only through modules called on it alone (the final norm);
- the logits are the output projection's output, and the loss is ``ForCausalLMLoss`` of them;
- each block gets exactly what the pipeline gives it: the mask from the same ``masking_utils`` helper
  that :func:`hybrid_ds.models.parts.attention_mask_4d` picks for that block, the rotary module's
  ``(cos, sin)``, ``position_ids`` made by ``arange``, and nothing else;
- every submodule or parameter of the model has a place in the pipeline.

Anything else (a multiplier on the embeddings or the logits, per-layer inputs, a mask helper the
pipeline does not use, an extra tower) is refused with a UserError: a structure it cannot map is
never turned into a wrong model. That the numbers match is what ``hybrid-ds parity`` then checks.
"""

from __future__ import annotations

import copy
import inspect
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hybrid_ds.errors import UserError
from hybrid_ds.models import FAMILIES, Family, _apply_in_order

_TRACE_SHAPE = (2, 8)  # batch, sequence of the meta-device trace
# Ops a model may run outside its modules: they only make position ids (arange, + cache length 0).
_POSITION_OPS = {"arange", "unsqueeze", "expand", "view", "reshape"}
_GLUE_KWARGS = {"attention_mask", "position_ids", "position_embeddings"}
_WHERE = {"pre": "between the embedding and block 0", "blocks": "between blocks", "post": "after the last block",
          "head": "before the output projection"}


def refuse(model_type: str, reason: str) -> UserError:
    """The one-line error for a model the generic adapter cannot map."""
    return UserError("model.name",
                     f"model_type {model_type!r} is not supported: it has no named family and the generic "
                     f"decoder-only adapter cannot map it: {reason}; named families: {', '.join(sorted(FAMILIES))}; "
                     "to add one, add a Family entry in hybrid_ds/models/__init__.py and a parity test")


def meta_causal_lm(model_type: str, hf_config: Any) -> nn.Module:
    """The causal-LM model of ``hf_config`` on the meta device (the config is copied, never changed)."""
    import transformers

    if getattr(hf_config, "is_encoder_decoder", False):
        raise refuse(model_type, "it is an encoder-decoder model, not decoder-only")
    try:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - the model's own code rejecting its config, in many types
        raise refuse(model_type, f"it cannot be built as a causal LM ({_first_line(err)})") from None


def generic_family(model_type: str, skeleton: nn.Module) -> Family:
    """The Family of ``skeleton`` (a causal LM on the meta device), or a UserError saying why there is none."""
    config = skeleton.config
    if getattr(config, "is_encoder_decoder", False):
        raise refuse(model_type, "it is an encoder-decoder model, not decoder-only")
    if getattr(config, "output_router_logits", False):
        raise refuse(model_type, "output_router_logits=true adds a loss from inside the blocks, which pipeline stages "
                                 "do not pass on; set model.overrides.output_router_logits=false")
    parts = _find_parts(model_type, skeleton)
    trace = _trace(model_type, skeleton, parts)
    checker = _FlowChecker(model_type, skeleton, parts, trace)
    for call in trace.calls:
        checker.visit(call)
    family = checker.family()
    _check_unplaced(model_type, skeleton, parts, family, trace)
    return family


# ---------------------------------------------------------------------------------------------- structure


@dataclass
class _Parts:
    base: nn.Module
    paths: dict[int, str]            # id(module) -> path in the skeleton
    embedding: nn.Module
    output: nn.Module
    blocks: nn.ModuleList
    rotary: nn.Module | None


def _find_parts(model_type: str, skeleton: nn.Module) -> _Parts:
    base = skeleton.base_model
    if base is skeleton:
        raise refuse(model_type, f"{type(skeleton).__name__} has no base model under a head")
    paths = {id(m): name for name, m in skeleton.named_modules(remove_duplicate=False)}
    children = {id(m): name for name, m in base.named_children()}
    base_path = paths[id(base)]
    try:
        embedding, output = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        embedding = output = None
    if embedding is None or id(embedding) not in children:
        raise refuse(model_type, f"its input embedding is not a direct child of {base_path}")
    if output is None or paths.get(id(output), "").count(".") != 0 or getattr(output, "weight", None) is None:
        raise refuse(model_type, "its output projection is not a direct child of the model with a weight")
    plain_projection = type(output).forward is nn.Linear.forward and getattr(output, "bias", None) is None
    if output.weight is getattr(embedding, "weight", None) and not plain_projection:
        raise refuse(model_type, f"its tied output projection is a {type(output).__name__} with a bias or its own "
                                 "forward, not a plain projection by the embedding weight")
    n_layers = getattr(skeleton.config, "num_hidden_layers", None)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if n_layers is None or len(lists) != 1 or id(lists[0]) not in children:
        found = "none" if not lists else ", ".join(paths[id(m)] for m in lists)
        raise refuse(model_type, f"it has no single list of num_hidden_layers={n_layers} blocks directly under "
                                 f"{base_path} (found: {found})")
    blocks = lists[0]
    for i, block in enumerate(blocks):
        _check_block_signature(model_type, block, f"{paths[id(blocks)]}.{i}")
    rotaries = [m for m in base.children() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotaries) > 1:
        raise refuse(model_type, f"it has {len(rotaries)} rotary modules ({', '.join(paths[id(m)] for m in rotaries)})"
                                 "; the pipeline rebuilds exactly one")
    rotary = rotaries[0] if rotaries else None
    if rotary is not None:
        _check_rotary_rebuilds(model_type, rotary, skeleton.config, paths[id(rotary)])
    return _Parts(base, paths, embedding, output, blocks, rotary)


def _check_block_signature(model_type: str, block: nn.Module, path: str) -> None:
    params = list(inspect.signature(block.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise refuse(model_type, f"{path} ({type(block).__name__}) takes no hidden states argument")
    required = [p.name for p in params[1:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name not in _GLUE_KWARGS]
    if required:
        raise refuse(model_type, f"{path} ({type(block).__name__}) requires {', '.join(required)} besides "
                                 f"{positional[0].name}")


def _check_rotary_rebuilds(model_type: str, rotary: nn.Module, config: Any, path: str) -> None:
    """Each stage builds its rotary module as ``type(rotary)(config=config)``: it must equal the model's."""
    try:
        with torch.device("meta"):
            rebuilt = type(rotary)(config=config)
    except TypeError as err:
        raise refuse(model_type, f"its rotary module {path} cannot be rebuilt from the config alone ({err})") from None
    same_buffers = {n: b.shape for n, b in rotary.named_buffers()} == {n: b.shape for n, b in rebuilt.named_buffers()}
    own_config = getattr(rotary, "config", config)
    same_config = own_config is config or own_config.to_dict() == config.to_dict()
    if not same_buffers or not same_config or _plain_attributes(rotary) != _plain_attributes(rebuilt):
        raise refuse(model_type, f"its rotary module {path} differs from one rebuilt from the config")


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "config" and isinstance(v, (int, float, str, bool, type(None)))}


# ---------------------------------------------------------------------------------------------- trace


class _Mask(str):
    """What a patched mask helper returns: the helper's name."""


@dataclass
class _Call:
    kind: str               # "module", "block", "mask", "op", "loss", "base"
    name: str               # module path, block index, helper or op name
    args: tuple
    kwargs: dict
    out: Any


class _Trace(TorchFunctionMode):
    """What the model does in one forward on the meta device, in order (``calls``).

    Recorded: calls of the direct children of the base and head models, of the blocks (whose forward is
    replaced: their insides need real data), of the mask helpers and of the loss, and the torch ops run
    outside all of these ("op" calls, at depth 0).
    """

    def __init__(self, inputs: dict[str, torch.Tensor]):
        super().__init__()
        self.inputs, self.calls, self.depth = inputs, [], 0
        self.output: Any = None
        self.glue_masks: list[str] = []  # the helper parts.attention_mask_4d picks for each block

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth == 0:
            self.calls.append(_Call("op", getattr(func, "__name__", str(func)), args, kwargs or {}, out))
        return out

    def record(self, kind: str, name: str, args: tuple, kwargs: dict, make_output) -> Any:
        self.depth += 1
        try:
            out = make_output()
        finally:
            self.depth -= 1
        self.calls.append(_Call(kind, name, args, kwargs, out))
        return out


def _trace(model_type: str, skeleton: nn.Module, parts: _Parts) -> _Trace:
    """Run the model once on the meta device, in training mode (dropout shows), recording what it does."""
    ids = torch.zeros(*_TRACE_SHAPE, dtype=torch.long, device="meta")
    trace = _Trace({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros_like(ids)})
    with ExitStack() as stack:
        for patch in (_patched_mask_helpers(skeleton, trace), _recorded_modules(skeleton, parts, trace),
                      _recorded_blocks(parts, trace), _recorded_loss(skeleton, trace)):
            stack.enter_context(patch)
        stack.callback(skeleton.train, skeleton.training)
        skeleton.train()
        try:
            with trace:
                trace.output = skeleton(**trace.inputs, use_cache=False)
        except Exception as err:  # noqa: BLE001 - its forward needs more from a block than the pipeline gives
            raise refuse(model_type, "its forward does not run on blocks that take and return only hidden states "
                                     f"({_first_line(err)})") from None
        trace.glue_masks = _glue_masks(skeleton, parts, trace)
    return trace


@contextmanager
def _patched_mask_helpers(skeleton: nn.Module, trace: _Trace):
    """Every ``masking_utils.create_*mask*`` helper, where the model's code can reach it, records its calls.

    Each call returns a new ``_Mask`` naming the helper: blocks are matched to it by identity.
    """
    from transformers import masking_utils

    helpers = {name: fn for name, fn in vars(masking_utils).items()
               if name.startswith("create_") and "mask" in name and callable(fn)}
    modules = {sys.modules[type(m).__module__] for m in skeleton.modules()} | {masking_utils}
    saved = [(module, name, fn) for module in modules for name, fn in helpers.items()
             if getattr(module, name, None) is fn]
    for module, name, _ in saved:
        setattr(module, name, lambda *a, _name=name, **k: trace.record("mask", _name, a, k, lambda: _Mask(_name)))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


@contextmanager
def _recorded_modules(skeleton: nn.Module, parts: _Parts, trace: _Trace):
    """Hooks on the direct children of the base model and of the head model (the blocks aside)."""
    watched = [m for m in parts.base.children() if m is not parts.blocks]
    watched += [m for m in skeleton.children() if m is not parts.base]

    def enter(module, args, kwargs):
        trace.depth += 1

    def leave(module, args, kwargs, out):
        trace.depth -= 1
        trace.calls.append(_Call("module", parts.paths[id(module)], args, kwargs, out))

    handles = [h for m in watched for h in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                            m.register_forward_hook(leave, with_kwargs=True))]
    handles.append(parts.base.register_forward_hook(
        lambda module, args, kwargs, out: trace.calls.append(_Call("base", "", args, kwargs, out)), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _recorded_blocks(parts: _Parts, trace: _Trace):
    """Each block's forward is replaced by a recorder returning a fresh tensor of the input's shape."""
    def stub(index: int, signature: inspect.Signature):
        def forward(*args, **kwargs):
            bound = dict(signature.bind(*args, **kwargs).arguments)  # by name, however the model passes them
            hidden = next(iter(bound.values()))
            return trace.record("block", str(index), (), bound, lambda: torch.empty_like(hidden))
        return forward

    for i, block in enumerate(parts.blocks):
        block.forward = stub(i, inspect.signature(block.forward))
    try:
        yield
    finally:
        for block in parts.blocks:
            del block.forward


@contextmanager
def _recorded_loss(skeleton: nn.Module, trace: _Trace):
    had_own, original = "_loss_function" in vars(skeleton), skeleton.loss_function
    name = getattr(original, "__name__", str(original))
    skeleton._loss_function = lambda *a, **k: trace.record("loss", name, a, k, lambda: torch.zeros((), device="meta"))
    try:
        yield
    finally:
        if had_own:
            skeleton._loss_function = original
        else:
            del skeleton._loss_function


def _glue_masks(skeleton: nn.Module, parts: _Parts, trace: _Trace) -> list[str]:
    """Which mask helper the pipeline's glue calls for each block (the helpers are still patched)."""
    from hybrid_ds.models.parts import attention_mask_4d

    probe = Family("probe", "", (), None, "", (), "")
    hidden = torch.empty(*_TRACE_SHAPE, 1, device="meta")
    positions = torch.arange(_TRACE_SHAPE[1], device="meta").unsqueeze(0)
    start = len(trace.calls)
    helpers = [str(attention_mask_4d(probe, skeleton.config, i, hidden, trace.inputs["attention_mask"], positions))
               for i in range(len(parts.blocks))]
    del trace.calls[start:]
    return helpers


# ---------------------------------------------------------------------------------------------- checks


class _FlowChecker:
    """Follows the hidden states through the recorded calls: embedding -> pre -> blocks -> post -> head."""

    def __init__(self, model_type: str, skeleton: nn.Module, parts: _Parts, trace: _Trace):
        self.model_type, self.skeleton, self.parts, self.trace = model_type, skeleton, parts, trace
        self.paths = parts.paths
        self.embedding_path = self.paths[id(parts.embedding)]
        self.output_path = self.paths[id(parts.output)]
        self.rotary_path = self.paths[id(parts.rotary)] if parts.rotary is not None else None
        self.stage = "embedding"     # embedding -> pre -> blocks -> post -> head -> logits -> done
        self.hidden: Any = None      # the tensor that is "the hidden states" now
        self.pre: list[str] = []     # modules between the embedding and block 0
        self.post: list[str] = []    # modules between the last block and the output projection
        self.blocks_seen = 0
        self.positions: Any = None
        self.rotary_out: Any = None
        self.logits: Any = None
        self.loss: Any = None

    def fail(self, reason: str) -> UserError:
        return refuse(self.model_type, reason)

    def touches(self, call: _Call) -> bool:
        return any(v is self.hidden for v in (*call.args, *call.kwargs.values())) if self.hidden is not None else False

    def visit(self, call: _Call) -> None:
        getattr(self, f"_{call.kind}")(call)

    def _module(self, call: _Call) -> None:
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
            self.hidden = call.out
        else:
            raise self.fail(f"it calls {path} ({type(self.skeleton.get_submodule(path)).__name__}) in a way the "
                            "pipeline does not reproduce (only modules applied to the hidden states alone can be "
                            "placed before the first or after the last block)")

    def _rotary(self, call: _Call) -> None:
        bound = _bind(self.parts.rotary, call)
        names = list(bound)
        if (self.rotary_out is not None or self.stage not in ("pre", "blocks") or len(names) < 2
                or names[1] != "position_ids" or any(v is not None for v in list(bound.values())[2:])):
            raise self.fail(f"its rotary module {self.rotary_path} is not called once as (hidden_states, position_ids)")
        self._set_positions(bound["position_ids"])
        self.rotary_out = call.out

    def _set_positions(self, positions: Any) -> None:
        if self.positions is None:
            self.positions = positions
        elif positions is not self.positions:
            raise self.fail("its blocks, masks and rotary module do not share one position_ids tensor")

    def _block(self, call: _Call) -> None:
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
        if self.blocks_seen == len(self.parts.blocks):
            self.stage = "post"

    def _check_block_kwargs(self, index: int, args: dict[str, Any]) -> None:
        mask = args.pop("attention_mask", None)
        if not isinstance(mask, _Mask):
            raise self.fail(f"block {index} gets an attention mask that no masking_utils helper made")
        if mask != self.trace.glue_masks[index]:
            raise self.fail(f"block {index} gets the mask of {mask} where the pipeline would use "
                            f"{self.trace.glue_masks[index]} (see layer_types / sliding_window in the config)")
        if "position_ids" not in args:
            raise self.fail(f"block {index} is not given position_ids")
        self._set_positions(args.pop("position_ids"))
        cos_sin = args.pop("position_embeddings", None)
        if cos_sin is not self.rotary_out:
            raise self.fail(f"block {index} gets position_embeddings that are not its rotary module's output")
        signature = inspect.signature(self.parts.blocks[index].forward).parameters
        extras = {}
        for name, value in args.items():
            extras.update(value if signature[name].kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        for name, value in extras.items():
            default = signature[name].default if name in signature else None
            if value is not None and value is not False and value is not default:
                raise self.fail(f"block {index} gets {name}={type(value).__name__}, which the pipeline does not pass")

    def _mask(self, call: _Call) -> None:
        known = {"config", "inputs_embeds", "input_embeds", "attention_mask", "cache", "past_key_values",
                 "position_ids", "cache_position"}
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

    def _op(self, call: _Call) -> None:
        name = call.name
        if not isinstance(call.out, torch.Tensor):
            return  # shapes, devices, dtypes
        if self.touches(call):
            if name == "dropout" and _dropout_p(call) == 0:
                self.hidden = call.out  # dropout with p=0 is the identity
                return
            if name == "__getitem__" and self.stage == "head" and call.out.shape == self.hidden.shape:
                return  # hidden_states[:, slice(0, None), :] (logits_to_keep=0); checked at the projection
            raise self.fail(f"it applies {name} to the hidden states {_WHERE[self.stage]}, outside its modules, "
                            "which the pipeline does not reproduce")
        if self.logits is not None and any(v is self.logits for v in (*call.args, *call.kwargs.values())):
            raise self.fail(f"it applies {name} to the logits after the output projection (a logit scale or "
                            "soft-cap the pipeline does not reproduce)")
        if name in _POSITION_OPS or (name in ("add", "__add__", "__radd__") and _adds_zero(call)):
            return
        raise self.fail(f"it computes {name} outside its modules (e.g. for position ids), which the pipeline "
                        "does not reproduce")

    def _base(self, call: _Call) -> None:
        if self.stage == "blocks":
            raise self.fail(f"only {self.blocks_seen} of its {len(self.parts.blocks)} blocks are called")
        if self.stage != "post" or getattr(call.out, "last_hidden_state", None) is not self.hidden:
            raise self.fail("its base model's last_hidden_state is not the last block's output after the final "
                            "modules")
        self.stage = "head"

    def _loss(self, call: _Call) -> None:
        from transformers.loss.loss_utils import ForCausalLMLoss

        bound = inspect.signature(ForCausalLMLoss).bind(*call.args, **call.kwargs).arguments
        vocab = self.parts.output.weight.shape[0]
        if (call.name != ForCausalLMLoss.__name__ or self.stage != "logits" or bound.get("logits") is not self.logits
                or bound.get("labels") is not self.trace.inputs["labels"] or bound.get("vocab_size") != vocab
                or any(v is not None for k, v in bound.items() if k not in ("logits", "labels", "vocab_size"))
                or self.loss is not None):
            raise self.fail(f"its loss is not ForCausalLMLoss(logits, labels, vocab_size={vocab}) (it is {call.name})")
        self.loss = call.out

    def _check_positions_are_arange(self) -> None:
        """The position ids come from ``arange(seq_len)`` (+ 0 cached tokens), as the pipeline makes them."""
        made_by = {id(c.out): c for c in self.trace.calls if c.kind == "op" and isinstance(c.out, torch.Tensor)}
        tensor, seq = self.positions, _TRACE_SHAPE[1]
        while (call := made_by.get(id(tensor))) is not None and call.name != "arange":
            tensor = next((a for a in call.args if isinstance(a, torch.Tensor)), None)
        numbers = [a for a in (call.args if call else ()) if isinstance(a, (int, float))]
        if (call is None or call.kwargs.get("start", 0) != 0 or call.out.shape != (seq,)
                or (len(numbers) > 1 and numbers[0] != 0) or tuple(self.positions.shape[-1:]) != (seq,)):
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
        if self.parts.rotary is not None and self.rotary_out is None:
            raise self.fail(f"its rotary module {self.rotary_path} is never called")
        self._check_positions_are_arange()
        names = [p.rpartition(".")[2] for p in self.pre]
        return Family(self.model_type, self.embedding_path, tuple(self.pre), _apply_in_order(tuple(names)),
                      self.paths[id(self.parts.blocks)], tuple(self.post), self.output_path, rotary=self.rotary_path)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"


def _only(call: _Call, tensor: Any) -> bool:
    """The call's one argument is ``tensor`` (by identity: comparing tensors with == would compare values)."""
    return len(call.args) == 1 and call.args[0] is tensor and not call.kwargs


def _adds_zero(call: _Call) -> bool:
    return any(type(v) is int and v == 0 for v in (*call.args, *call.kwargs.values()))


def _bind(module: nn.Module, call: _Call) -> dict[str, Any]:
    return dict(inspect.signature(module.forward).bind(*call.args, **call.kwargs).arguments)


def _dropout_p(call: _Call) -> float:
    """The probability of F.dropout(input, p, training); 1 for a call it cannot read, so that it counts."""
    args = {**dict(zip(("input", "p", "training"), call.args)), **call.kwargs}
    p, training = args.get("p", 0.5), args.get("training", True)
    return p if training and isinstance(p, (int, float)) else (0 if not training else 1)


def _check_unplaced(model_type: str, skeleton: nn.Module, parts: _Parts, family: Family, trace: _Trace) -> None:
    """Every parameter and buffer of the model belongs to a part the pipeline builds."""
    placed = {family.token_embedding, *family.embedding, family.blocks, *family.final, family.output}
    placed |= {family.rotary} if family.rotary else set()
    called = {c.name for c in trace.calls if c.kind == "module"}
    for owner in (skeleton, parts.base):
        own = [n for n, _ in owner.named_parameters(recurse=False)] + [n for n, _ in owner.named_buffers(recurse=False)]
        if own:
            raise refuse(model_type, f"{type(owner).__name__} holds {', '.join(own)} outside any submodule")
        for name, child in owner.named_children():
            path = parts.paths[id(child)]
            if child is parts.base or path in placed:
                continue
            has_state = any(True for _ in child.parameters()) or any(True for _ in child.buffers())
            if has_state or path in called:
                raise refuse(model_type, f"it has a submodule {path} ({type(child).__name__}) that is neither "
                                         "embedding, block, rotary, final norm nor output projection")
