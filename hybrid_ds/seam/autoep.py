"""DeepSpeed's AutoEP (expert parallelism of a Hugging Face MoE model) with transformers 5.x: its output-recorder helper
``auto_ep_presets.base._install_instance_transformers_output_recorders`` replaced in its module, after checking its caller
still calls it; the layers it replaced and the model types it knows.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hybrid_ds.seam.compat import code_has, require, requirement


# ---------------------------------------------------------------- 12. AutoEP with transformers 5.x


_AUTOEP_WHY = ("AutoEP re-targets the model's router-logit recorder to its own layers through transformers' "
               "output-capture registry, which transformers 5.x keys by class name with a one-argument get()")


def _presets_base() -> Any:
    """``deepspeed.module_inject.auto_ep_presets.base``, imported when a check runs."""
    return importlib.import_module("deepspeed.module_inject.auto_ep_presets.base")


RECORDER_HELPER = requirement(
    "autoep.helper", "auto_ep_presets.base._install_instance_transformers_output_recorders",
    lambda: callable(_presets_base()._install_instance_transformers_output_recorders), _AUTOEP_WHY)
RECORDER_CALLER = requirement(
    "autoep.caller", "auto_ep_presets.base._retarget_transformers_output_recorders_for_modules calling it",
    lambda: code_has(_presets_base()._retarget_transformers_output_recorders_for_modules,
                     "_install_instance_transformers_output_recorders(...)"), _AUTOEP_WHY)


def check_autoep_output_recorders() -> Any:
    """The AutoEP module whose registry helper we replace, after checking that its caller still calls it."""
    require(RECORDER_HELPER, RECORDER_CALLER)
    return _presets_base()


@contextmanager
def autoep_output_recorders() -> Iterator[None]:
    """Inside: AutoEP installs its router-logit recorders under transformers 5.x (around ``deepspeed.initialize``,
    which replaces the MoE layers); after, DeepSpeed's helper is back in its module.

    DeepSpeed 0.19.8 saves the registry entries it overrides with ``registry.get(key, default)``; transformers
    5.24's ``_CanRecordRegistry.get(model)`` takes one argument, so ``deepspeed.initialize`` with an
    ``expert_parallel`` section died with "TypeError: _CanRecordRegistry.get() takes 2 positional arguments".
    The replacement does the same with the plain-dict methods, which both registries are."""
    base = check_autoep_output_recorders()
    original = base._install_instance_transformers_output_recorders
    base._install_instance_transformers_output_recorders = _install_output_recorders
    try:
        yield
    finally:
        base._install_instance_transformers_output_recorders = original


def _install_output_recorders(model: torch.nn.Module, registry_entries: dict[str, dict[str, Any]],
                              output_capturing: Any, remove_output_capture_hooks: Callable) -> bool:
    install = getattr(output_capturing, "maybe_install_capturing_hooks", None)
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    if not callable(install) or not isinstance(registry, dict):
        return False
    remove_output_capture_hooks(model)
    for module in model.modules():
        if hasattr(module, "_output_capturing_hooks_installed"):
            module._output_capturing_hooks_installed = False
    model._output_capturing_hooks_installed = False
    missing = object()
    saved = {key: dict.get(registry, key, missing) for key in registry_entries}
    try:
        dict.update(registry, registry_entries)
        install(model)
    finally:  # the hooks are installed; the class-wide entries go back to what they were
        for key, entry in saved.items():
            if entry is missing:
                dict.pop(registry, key, None)
            else:
                dict.__setitem__(registry, key, entry)
    return True


def autoep_layers(module: torch.nn.Module) -> int:
    """How many MoE layers AutoEP replaced in ``module`` (0: it found none it knows)."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return sum(isinstance(m, AutoEPMoELayer) for m in module.modules())


def autoep_presets() -> list[str]:
    """The model types AutoEP detects MoE layers of by itself (its ``preset_model`` names)."""
    from deepspeed.module_inject.auto_ep_presets.registry import PRESET_MODELS

    return sorted(PRESET_MODELS)
