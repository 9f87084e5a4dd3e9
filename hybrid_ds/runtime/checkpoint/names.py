"""A pipeline checkpoint's weights and parameters under their Hugging Face names: DeepSpeed's per-layer files read
back through the layer specs, built on the meta device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hybrid_ds.models.build import StageBuilder
from hybrid_ds.models.resolve import meta_model
from hybrid_ds.runtime.pipeline import layer_specs
from hybrid_ds.seam.pipeline_module import layer_checkpoint_file, tied_prefix


def universal_names(plan: Any) -> dict[str, str]:
    """The engine's parameter name -> the Hugging Face name its universal form keeps it under.

    The plain engine's parameters already have the Hugging Face model's names. A PipelineModule names a
    layer spec's parameters ``{index}.{local}`` and a tied one's ``tied_modules.{key}.{local}``; they are
    named back through the layer specs, built on the meta device, and a tied weight gets the name the
    Hugging Face model reports it under (``transformer.wte.weight``, not ``lm_head.weight``).
    """
    return pipeline_names(plan) if plan.config.pipeline_engine else {}


def pipeline_names(plan: Any) -> dict[str, str]:
    """A PipelineModule's parameter names -> Hugging Face names, for ``plan``'s model on any engine."""
    skeleton = meta_model(plan.resolved)  # its own: building layers on it would change the run's skeleton
    builder = StageBuilder(plan.resolved, pretrained=False, device="meta", skeleton=skeleton,
                           lora=plan.config.model.lora, lora_targets=plan.lora_targets)
    specs, _ = layer_specs(builder)
    modules: dict[str, Any] = {}
    for index, spec in enumerate(specs):
        key = getattr(spec, "key", None)
        prefix = tied_prefix(key) if key else f"{index}."
        if prefix not in modules:
            modules[prefix] = spec.build()
    by_id = hf_names(builder)
    canonical = {id(p): name for name, p in skeleton.named_parameters()}
    alias = {name: canonical[id(p)] for name, p in skeleton.named_parameters(remove_duplicate=False)}
    return {prefix + local: alias.get(by_id[id(p)], by_id[id(p)]) for prefix, module in modules.items()
            for local, p in module.named_parameters()}


def saved_weights(folder: Path, plan: Any) -> dict[str, torch.Tensor]:
    """Hugging Face name -> weight of a pipeline checkpoint, a tied weight under the name its model reports."""
    skeleton = meta_model(plan.resolved)  # its own: building layers on it would change the run's skeleton
    builder = StageBuilder(plan.resolved, pretrained=False, device="meta", skeleton=skeleton,
                           lora=plan.config.model.lora, lora_targets=plan.lora_targets)
    specs, _ = layer_specs(builder)
    state = gather_layers(folder, specs, builder)
    canonical = {id(p): name for name, p in skeleton.named_parameters()}
    alias = {name: canonical[id(p)] for name, p in skeleton.named_parameters(remove_duplicate=False)}
    return {alias.get(name, name): value for name, value in state.items()}


def gather_layers(folder: Path, specs: list[Any], builder: Any) -> dict[str, torch.Tensor]:
    """Hugging Face name -> tensor, from DeepSpeed's per-layer files ``layer_NN-model_states.pt``."""
    built: dict[str, Any] = {}
    state: dict[str, torch.Tensor] = {}
    for index, spec in enumerate(specs):
        file = layer_checkpoint_file(folder, index)
        key = getattr(spec, "key", None)
        module = built.get(key) if key else None
        module = module or spec.build()
        if key:
            built[key] = module
        if not file.is_file():
            continue
        names = hf_names(builder)
        tensors = torch.load(file, map_location="cpu", weights_only=True)
        for local, value in module.state_dict(keep_vars=True).items():
            if local in tensors:
                state[names[id(value)]] = tensors[local]
    return state


def hf_names(builder: Any) -> dict[int, str]:
    """id of each tensor the builder built (parameters and buffers) -> its Hugging Face name."""
    names = {id(p): path for path, p in builder.built_parameters().items()}
    for path, module in builder.built_modules().items():
        for local, value in module.state_dict(keep_vars=True).items():
            names[id(value)] = f"{path}.{local}"
    return names
