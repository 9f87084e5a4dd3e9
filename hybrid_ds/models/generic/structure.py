"""The generic adapter's map of a model: where its embedding, blocks, rotary module and output are."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hybrid_ds.errors import UserError
from hybrid_ds.config.families import FAMILIES

TRACE_SHAPE = (2, 8)  # batch, sequence of the meta-device trace
# Ops a model may run outside its modules: they only make position ids (arange, + cache length 0; Qwen 3.5's
# text and rotary rows of arange expanded to (4, batch, seq)).
POSITION_OPS = {"arange", "unsqueeze", "expand", "view", "reshape", "__getitem__"}  # getitem: leading axes only
GLUE_KWARGS = {"attention_mask", "position_ids", "position_embeddings"}
WHERE = {"pre": "between the embedding and block 0", "blocks": "between blocks", "post": "after the last block",
         "head": "before the output projection"}


def refuse(model_type: str, reason: str) -> UserError:
    """The one-line error for a model the generic adapter cannot map."""
    return UserError("model.name",
                     f"model_type {model_type!r} is not supported: it has no named family and the generic "
                     f"decoder-only adapter cannot map it: {reason}; named families: {', '.join(sorted(FAMILIES))}; "
                     "to add one, add a Family entry in hybrid_ds/config/families.py and a parity test")


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"


@dataclass
class ModelMap:
    base: nn.Module
    paths: dict[int, str]            # id(module) -> path in the skeleton
    embedding: nn.Module
    output: nn.Module
    blocks: nn.ModuleList
    rotary: nn.Module | None


def find_model_map(model_type: str, skeleton: nn.Module) -> ModelMap:
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
    return ModelMap(base, paths, embedding, output, blocks, rotary)


def _check_block_signature(model_type: str, block: nn.Module, path: str) -> None:
    params = list(inspect.signature(block.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise refuse(model_type, f"{path} ({type(block).__name__}) takes no hidden states argument")
    required = [p.name for p in params[1:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name not in GLUE_KWARGS]
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
