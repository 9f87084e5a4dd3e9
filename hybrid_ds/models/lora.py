"""LoRA adapters (``model.lora``) made by peft, on each stage's own modules, chosen as peft chooses them on the model.

The targets are found once by running ``get_peft_model`` on a copy of the meta skeleton of the whole model, so
peft's own rules choose them (a module whose path is a listed name or ends in ``.`` + name; ``"all-linear"``: every
``nn.Linear`` and ``Conv1D`` but the output projection; its conversions for Mixture-of-Experts models). Each stage
then asks peft (``inject_adapter_in_model``) to wrap exactly the targets inside the modules it builds, so a
module's names are the ones ``get_peft_model`` gives it (``q_proj.base_layer.weight``,
``q_proj.lora_A.default.weight``) and the whole model's adapters are the union of the stages'. The base model is frozen: only adapters have gradients and optimizer state.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hybrid_ds.config import LoraConfig
from hybrid_ds.errors import UserError

ADAPTER = "default"      # peft's name of the one adapter
BASE = ".base_layer"     # peft's wrapper keeps the original layer under this name
PEFT_PREFIX = "base_model.model."  # a PeftModel's names: this, then the Hugging Face model's


@dataclass(frozen=True)
class Targets:
    """Where ``get_peft_model`` puts adapters on the whole model: modules it wraps (``q_proj``) and parameters it
    wraps (a Mixture-of-Experts layer's stacked ``experts.gate_up_proj``), with the ranks and alphas it chose."""

    modules: tuple[str, ...]
    parameters: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    sizes: dict[str, int]  # each adapter parameter's name in the whole model -> its elements

    def per_layer(self, family: Any, n_blocks: int) -> list[int]:
        """Adapter elements of each pipeline layer [embedding, blocks..., head]."""
        from hybrid_ds.models.resolve import pipeline_layer

        counts = [0] * (n_blocks + 2)
        for name, size in self.sizes.items():
            counts[pipeline_layer(name, family, n_blocks)] += size
        return counts

    def paths(self) -> list[str]:
        """Every adapted module's path (a wrapped parameter's module)."""
        return sorted({*self.modules, *(p.rpartition(".")[0] for p in self.parameters)})

    def inside(self, path: str, lora: LoraConfig) -> Any:
        """peft's config for the targets inside the module at ``path``, named relative to it; None if none are."""
        prefix = f"{path}." if path else ""
        modules = [t[len(prefix):] for t in self.modules if t.startswith(prefix)]
        parameters = [t[len(prefix):] for t in self.parameters if t.startswith(prefix)]
        if not modules and not parameters:
            return None
        config = peft_config(lora, "|".join(re.escape(t) for t in modules) if modules else [])  # matched whole
        config.target_parameters = parameters
        config.rank_pattern, config.alpha_pattern = dict(self.rank_pattern), dict(self.alpha_pattern)
        return config


def find_targets(skeleton: nn.Module, family: Any, lora: LoraConfig) -> Targets:
    """The adapters ``get_peft_model`` gives the whole model for ``model.lora``, found by running it on a copy of the
    meta skeleton: its rules are peft's own (``"all-linear"``; names matched as a path's end; Mixture-of-Experts
    layers that transformers 5 fused, whose ``gate_up_proj`` peft wraps as a parameter with twice the rank).

    The output projection and embeddings cannot take adapters here: the pipeline's head multiplies by their weights
    directly.
    """
    import peft

    config = peft_config(lora, lora.target_modules, family.task)
    try:
        with _quiet():
            tuned = peft.get_peft_model(copy.deepcopy(skeleton), config, low_cpu_mem_usage=True).base_model
    except ValueError as err:
        raise UserError("model.lora.target_modules", f"{lora.target_modules}: peft: {_first_line(err)}") from None
    final = tuned.peft_config[ADAPTER]
    sizes = {name: p.numel() for name, p in tuned.model.named_parameters() if p.requires_grad}
    targets = Targets(tuple(tuned.targeted_module_names), tuple(tuned.targeted_parameter_names),
                      dict(final.rank_pattern or {}), dict(final.alpha_pattern or {}), sizes)
    _check_plain_layers(skeleton, targets.modules, lora)
    outside = [p for p in targets.paths() if not p.startswith(family.blocks + ".")
               and not any(p.startswith(h + ".") for h in family.head_modules if h != family.output)]
    if outside:
        raise UserError("model.lora.target_modules", f"{lora.target_modules} adapts {outside[0]!r}, outside the "
                                                     "transformer blocks and the head's inner layers; the pipeline "
                                                     "multiplies embeddings and the output projection by their "
                                                     "weights directly: adapt the blocks' layers")
    return targets


def _check_plain_layers(skeleton: nn.Module, paths: tuple[str, ...], lora: LoraConfig) -> None:
    """peft's adapter replaces a linear layer's forward by ``base_layer(x) + B(A(x))``: a subclass whose own forward
    returns something else (Phi-MoE's router, an ``nn.Linear`` returning ``(logits, weights, experts)``) breaks it, in
    ``get_peft_model``'s model too. Refused here, before any process trains with it."""
    from transformers.pytorch_utils import Conv1D

    for path in paths:
        module = skeleton.get_submodule(path)
        if type(module).forward not in (nn.Linear.forward, Conv1D.forward):
            raise UserError("model.lora.target_modules", f"{lora.target_modules} adapts {path!r}, a "
                                                         f"{type(module).__name__}: a linear layer with a forward of "
                                                         "its own, which peft's adapter cannot wrap; name the "
                                                         "targets without it")


@contextlib.contextmanager
def _quiet() -> Any:
    """Without peft's notes on what it does by design: GPT-2's Conv1D gets ``fan_in_fan_out``, and the rank pattern
    of its Mixture-of-Experts conversion names parameters, which its module check then reports as unmatched."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(fan_in_fan_out|did not match any targeted).*")
        yield


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def peft_config(lora: LoraConfig, targets: list[str] | str, task: str = "causal_lm", base: str | None = None) -> Any:
    """peft's ``LoraConfig`` of ``model.lora`` with these ``target_modules``."""
    import peft

    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=targets if isinstance(targets, str) else list(targets),
                           use_rslora=lora.use_rslora, base_model_name_or_path=base,
                           task_type=None if task == "masked_lm" else "CAUSAL_LM")


def with_peft(model: nn.Module, lora: LoraConfig, task: str, base: str | None = None) -> Any:
    """``get_peft_model`` of a whole Hugging Face model for ``model.lora`` (``base``: the adapter's base model)."""
    import peft

    with _quiet():
        return peft.get_peft_model(model, peft_config(lora, lora.target_modules, task, base))


def add_adapters(module: nn.Module, path: str, targets: Targets, lora: LoraConfig, seed: int) -> nn.Module:
    """Freeze ``module`` (built at ``path``) and wrap the targets inside it with adapters, initialized from a seed
    of their own path, as peft initializes them (A: Kaiming-uniform, B: zero): the same whatever the layout."""
    import peft

    module.requires_grad_(False)
    config = targets.inside(path, lora)
    if config is None:
        return module
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(f"lora:{path}".encode()))
        peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    return module


def is_adapter(name: str) -> bool:
    """Whether the parameter ``name`` belongs to an adapter (``...lora_A.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The Hugging Face name of a wrapped base tensor: ``q_proj.base_layer.weight`` -> ``q_proj.weight``."""
    return name.replace(BASE + ".", ".")
