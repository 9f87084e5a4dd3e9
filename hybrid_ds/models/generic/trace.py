"""The generic adapter's trace: one forward on the meta device with every module, op and mask recorded."""

from __future__ import annotations

import inspect
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hybrid_ds.errors import UserError
from hybrid_ds.models.generic.structure import refuse
from hybrid_ds.config.families import Family
from hybrid_ds.models.masks import attention_mask_4d
from hybrid_ds.models.generic.structure import TRACE_SHAPE, ModelMap, first_line, refuse


class Mask(str):
    """What a patched mask helper returns: the helper's name and any keywords beyond the usual ones."""

    @classmethod
    def of(cls, name: str, kwargs: dict) -> "Mask":
        extra = ", ".join(f"{k}={v!r}" for k, v in sorted(mask_extras(kwargs).items()))
        return cls(f"{name}({extra})" if extra else name)


# What every mask helper call passes; anything else (allow_is_causal_skip=False) is part of the mask's name
MASK_INPUTS = {"config", "inputs_embeds", "input_embeds", "attention_mask", "cache", "past_key_values",
               "position_ids", "cache_position"}


def mask_extras(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in MASK_INPUTS}


@dataclass
class Call:
    kind: str               # "module", "block", "mask", "op", "loss", "base"
    name: str               # module path, block index, helper or op name
    args: tuple
    kwargs: dict
    out: Any


class Unused:
    """What a traced block returns after its hidden states when the model unpacks a tuple (Bamba's attention
    weights): any use of it (truth value, attribute, item, torch op) raises, so a trace that runs never used it."""

    def _used(self, *args, **kwargs):
        raise TypeError("the model uses what its blocks return after the hidden states")

    __bool__ = __iter__ = __len__ = __getitem__ = __getattr__ = __call__ = _used

    @classmethod
    def __torch_function__(cls, *args, **kwargs):
        raise TypeError("the model uses what its blocks return after the hidden states")


class Trace(TorchFunctionMode):
    """What the model does in one forward on the meta device, in order (``calls``).

    Recorded: calls of the direct children of the base and head models, of the blocks (whose forward is
    replaced: their insides need real data), of the mask helpers and of the loss, and the torch ops run
    outside all of these ("op" calls, at depth 0).
    """

    def __init__(self, inputs: dict[str, torch.Tensor]):
        super().__init__()
        self.inputs, self.calls, self.depth = inputs, [], 0
        self.output: Any = None
        self.glue_masks: list[str] = []  # the helper masks.attention_mask_4d picks for each block
        self.block_tuple = False         # the blocks return (hidden_states, Unused()), not hidden_states

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth == 0:
            self.calls.append(Call("op", getattr(func, "__name__", str(func)), args, kwargs or {}, out))
        return out

    def record(self, kind: str, name: str, args: tuple, kwargs: dict, make_output) -> Any:
        self.depth += 1
        try:
            out = make_output()
        finally:
            self.depth -= 1
        self.calls.append(Call(kind, name, args, kwargs, out))
        return out


def trace_model(model_type: str, skeleton: nn.Module, model_map: ModelMap) -> Trace:
    """Run the model once on the meta device, in training mode (dropout shows), recording what it does.

    Blocks return their hidden states; if the model's forward fails on that, it is run again with blocks
    that return a tuple (hidden states, Unused()), as Bamba's do.
    """
    try:
        return _trace_once(model_type, skeleton, model_map, block_tuple=False)
    except UserError as err:
        try:
            return _trace_once(model_type, skeleton, model_map, block_tuple=True)
        except UserError:
            raise err from None


def _trace_once(model_type: str, skeleton: nn.Module, model_map: ModelMap, block_tuple: bool) -> Trace:
    ids = torch.zeros(*TRACE_SHAPE, dtype=torch.long, device="meta")
    trace = Trace({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros_like(ids)})
    trace.block_tuple = block_tuple
    with ExitStack() as stack:
        for patch in (_patched_mask_helpers(skeleton, trace), _recorded_modules(skeleton, model_map, trace),
                      _recorded_blocks(model_map, trace), _recorded_loss(skeleton, trace)):
            stack.enter_context(patch)
        stack.callback(skeleton.train, skeleton.training)
        skeleton.train()
        try:
            with trace:
                trace.output = skeleton(**trace.inputs, use_cache=False)
        except Exception as err:  # noqa: BLE001 - its forward needs more from a block than the pipeline gives
            raise refuse(model_type, "its forward does not run on blocks that take and return only hidden states "
                                     f"({first_line(err)})") from None
        trace.glue_masks = _glue_masks(skeleton, model_map, trace)
    return trace


@contextmanager
def _patched_mask_helpers(skeleton: nn.Module, trace: Trace):
    """Every ``masking_utils.create_*mask*`` helper, where the model's code can reach it, records its calls.

    Each call returns a new ``Mask`` naming the helper: blocks are matched to it by identity.
    """
    from transformers import masking_utils

    helpers = {name: fn for name, fn in vars(masking_utils).items()
               if name.startswith("create_") and "mask" in name and callable(fn)}
    modules = {sys.modules[type(m).__module__] for m in skeleton.modules()} | {masking_utils}
    saved = [(module, name, fn) for module in modules for name, fn in helpers.items()
             if getattr(module, name, None) is fn]
    for module, name, _ in saved:
        setattr(module, name, lambda *a, _name=name, **k: trace.record("mask", _name, a, k,
                                                                      lambda: Mask.of(_name, k)))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


@contextmanager
def _recorded_modules(skeleton: nn.Module, model_map: ModelMap, trace: Trace):
    """Hooks on the direct children of the base model and of the head model (the blocks aside)."""
    watched = [m for m in model_map.base.children() if m is not model_map.blocks]
    watched += [m for m in skeleton.children() if m is not model_map.base]

    def enter(module, args, kwargs):
        trace.depth += 1

    def leave(module, args, kwargs, out):
        trace.depth -= 1
        trace.calls.append(Call("module", model_map.paths[id(module)], args, kwargs, out))

    handles = [h for m in watched for h in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                            m.register_forward_hook(leave, with_kwargs=True))]
    handles.append(model_map.base.register_forward_hook(
        lambda module, args, kwargs, out: trace.calls.append(Call("base", "", args, kwargs, out)), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _recorded_blocks(model_map: ModelMap, trace: Trace):
    """Each block's forward is replaced by a recorder returning a fresh tensor of the input's shape."""
    def stub(index: int, signature: inspect.Signature):
        def forward(*args, **kwargs):
            bound = dict(signature.bind(*args, **kwargs).arguments)  # by name, however the model passes them
            hidden = next(iter(bound.values()))
            out = trace.record("block", str(index), (), bound, lambda: torch.empty_like(hidden))
            return (out, Unused()) if trace.block_tuple else out
        return forward

    for i, block in enumerate(model_map.blocks):
        block.forward = stub(i, inspect.signature(block.forward))
    try:
        yield
    finally:
        for block in model_map.blocks:
            del block.forward


@contextmanager
def _recorded_loss(skeleton: nn.Module, trace: Trace):
    had_own, original = "_loss_function" in vars(skeleton), skeleton.loss_function
    name = getattr(original, "__name__", str(original))
    skeleton._loss_function = lambda *a, **k: trace.record("loss", name, a, k, lambda: torch.zeros((), device="meta"))
    try:
        if skeleton.loss_function is not skeleton._loss_function:  # transformers' private name, read by the property
            raise refuse(skeleton.config.model_type, "its loss_function no longer reads _loss_function, which the "
                                                     "trace replaces (written for transformers 5.24)")
        yield
    finally:
        if had_own:
            skeleton._loss_function = original
        else:
            del skeleton._loss_function


def _glue_masks(skeleton: nn.Module, model_map: ModelMap, trace: Trace) -> list[str]:
    """Which mask helper the pipeline's glue calls for each block (the helpers are still patched)."""
    probe = Family("probe", "", (), None, "", (), "", mask_kwargs=common_mask_extras(trace))
    hidden = torch.empty(*TRACE_SHAPE, 1, device="meta")
    positions = torch.arange(TRACE_SHAPE[1], device="meta").unsqueeze(0)
    start = len(trace.calls)
    helpers = [str(attention_mask_4d(probe, skeleton.config, i, hidden, trace.inputs["attention_mask"], positions))
               for i in range(len(model_map.blocks))]
    del trace.calls[start:]
    return helpers


def common_mask_extras(trace: Trace) -> dict:
    """The extra keywords every mask helper call of the model passes (none if they differ)."""
    extras = [mask_extras(c.kwargs) for c in trace.calls if c.kind == "mask"]
    return extras[0] if extras and all(e == extras[0] for e in extras) else {}
