"""DeepSpeed's sections of a run config, checked by DeepSpeed's own config models and against the optimizer and
scheduler DeepSpeed will build, as one line naming the key, before any data or model work.

Without it a misspelt key (``zero_optimization.stag``, ``optimizer.params.lrr``) passes ``hybrid-ds validate`` and
ends the run minutes later, after data packing, in a pydantic traceback or an optimizer's ``TypeError``.
:func:`check_deepspeed_sections` builds ``deepspeed.runtime.config.DeepSpeedConfig`` (what the engine builds) on each
section alone, so that an error names its section, and turns DeepSpeed's pydantic errors into one line with "did you
mean" from the model's fields. The optimizer's and scheduler's ``params`` are held to the signature of the class
DeepSpeed builds for them (:func:`optimizer_class`, :func:`scheduler_class`); a torch optimizer is also built on a
dummy parameter, so that its own checks of the values speak now. An enabled monitor (``tensorboard``, ``wandb``,
``comet``) needs its package (:data:`MONITOR_PACKAGES`). Sections DeepSpeed reads as plain dicts
(``flops_profiler``, ``aio``, ``checkpoint``) have no model to check them by, and pass as they are.

Imports torch and DeepSpeed: the pure layer (``hybrid_ds.config``) only checks the top-level names.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import typing
from collections.abc import Iterator
from typing import Any

import pydantic
import torch
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import logger

from hybrid_ds.errors import UserError, first_line, suggest
from hybrid_ds.seam.compat import code_has, require, requirement

_ONE_BATCH = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}  # any world size
_TAKEN_BY_DEEPSPEED = {"torch_adam", "adam_w_mode", "fp32_optimizer_states"}  # popped before Adam is built


def _adam_classes_hold() -> bool:
    get = DeepSpeedEngine.get_optimizer_configuration
    return (code_has(get, "torch_adam = optimizer_parameters.pop(TORCH_ADAM_PARAM, False)",
                     "return (torch.optim.AdamW if adam_w_mode else torch.optim.Adam), {'foreach': foreach}")
            and code_has(get, "return CPUAdam, optimizer_kwargs", "return FusedAdam, {'adam_w_mode': adam_w_mode}"))


ADAM_CLASSES = requirement(
    "config.adam_classes",
    "DeepSpeedEngine.get_optimizer_configuration (torch's Adam/AdamW with torch_adam, else CPUAdam or FusedAdam)",
    _adam_classes_hold, "optimizer.params are checked against the class it builds; another choice would refuse "
                        "valid parameters")


def check_deepspeed_sections(ds: dict[str, Any]) -> None:
    """One line (a :class:`UserError`) for the first key of ``ds`` (the DeepSpeed sections a run hands DeepSpeed:
    hybrid_ds.config.deepspeed.deepspeed_sections) that DeepSpeed would refuse when it builds the engine."""
    _check_optimizer(ds)
    _check_scheduler(ds)
    for section, value in ds.items():
        if section in ("train_batch_size", *_ONE_BATCH):
            continue
        try:
            with _errors_only():  # the engine logs DeepSpeed's warnings about a config when it is built
                DeepSpeedConfig({**_ONE_BATCH, section: value})
        except pydantic.ValidationError as err:
            raise _one_line(section, err) from None
        except Exception as err:  # DeepSpeed's own asserts and conversions of a section's values
            raise UserError(section, f"DeepSpeed refuses it: {first_line(err)}") from None
    _check_monitor_packages(ds)


@contextlib.contextmanager
def _errors_only() -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(section: str, err: pydantic.ValidationError) -> UserError:
    """DeepSpeed's pydantic error as one line: the dotted key, what is wrong and, for an unknown key, the names it
    takes."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    path = loc if loc and loc[0] == section else [section, *loc]  # a model of several sections names its own
    key = ".".join(path)
    if first["type"] == "extra_forbidden":
        fields = _field_names(_model_named(err.title), first["loc"][:-1])
        hint = f"; {suggest(loc[-1], fields)}" if fields else ""
        return UserError(key, f"DeepSpeed's {section} section takes no key {loc[-1]!r}{hint}")
    message = first["msg"].removeprefix("Value error, ").removeprefix(f"{key} ")  # a validator of DeepSpeed's own
    return UserError(key, message if "got" in message else f"{message}, got {first.get('input')!r}")


def _model_named(title: str) -> type[pydantic.BaseModel] | None:
    pending, seen = [DeepSpeedConfigModel], set()
    while pending:
        cls = pending.pop()
        if cls.__name__ == title:
            return cls
        seen.add(cls)
        pending += [sub for sub in cls.__subclasses__() if sub not in seen]
    return None


def _field_names(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys the model at ``loc`` inside ``model`` takes (names and aliases), or [] where it cannot be told."""
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        model = next((c for c in candidates if inspect.isclass(c) and issubclass(c, pydantic.BaseModel)), None)
    names = getattr(model, "model_fields", {})
    return [*names, *(f.alias for f in names.values() if f.alias)]


def optimizer_class(ds: dict[str, Any]) -> tuple[type | None, set[str]]:
    """The class DeepSpeed 0.19.8 builds for ``ds``'s optimizer (``DeepSpeedEngine._configure_basic_optimizer``) and
    the parameters DeepSpeed takes out before calling it; None for the ones not checked (mup's, Muon)."""
    name = ds["optimizer"].get("type", "")
    params = ds["optimizer"].get("params") or {}
    offload = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    if name.lower() in ("muadam", "muadamw", "musgd", "muon"):
        return None, set()
    if name.lower() in ("adam", "adamw"):
        require(ADAM_CLASSES)
        if params.get("torch_adam"):
            return (torch.optim.AdamW if name.lower() == "adamw" or params.get("adam_w_mode", True)
                    else torch.optim.Adam), _TAKEN_BY_DEEPSPEED | {"foreach"}
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam  # the classes; nothing is compiled until built

        return (DeepSpeedCPUAdam if offload else FusedAdam), _TAKEN_BY_DEEPSPEED
    if name.lower() == "adagrad":
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

        return (DeepSpeedCPUAdagrad if offload else torch.optim.Adagrad), set()
    if name.lower() == "lamb":
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb, set()
    if name.lower() == "lion":
        from deepspeed.ops.lion import DeepSpeedCPULion, FusedLion

        return (DeepSpeedCPULion if offload else FusedLion), set()
    return getattr(torch.optim, name, None) if name in dir(torch.optim) else None, set()


def scheduler_class(ds: dict[str, Any]) -> type | None:
    """The class DeepSpeed builds for ``ds``'s scheduler: its own (``deepspeed.runtime.lr_schedules``) or torch's."""
    from deepspeed.runtime import lr_schedules

    name = ds["scheduler"].get("type", "")
    if name in lr_schedules.VALID_LR_SCHEDULES:
        return getattr(lr_schedules, name)
    return getattr(torch.optim.lr_scheduler, name, None)


def _check_params(key: str, cls: type, params: dict[str, Any], taken: set[str], skip: int) -> None:
    """Every parameter in ``params`` is one ``cls`` takes (its signature less the first ``skip`` ones), and every
    parameter it requires is there."""
    signature = list(inspect.signature(cls).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in signature):
        return
    names = {p.name for p in signature}
    for name in params:
        if name not in names and name not in taken:
            raise UserError(f"{key}.params.{name}", f"{cls.__name__} takes no parameter {name!r}; "
                                                    f"{suggest(name, names | taken)}")
    missing = [p.name for p in signature if p.default is p.empty and p.kind is not p.VAR_POSITIONAL
               and p.name not in params]
    if missing:
        raise UserError(f"{key}.params", f"{cls.__name__} needs {', '.join(missing)}, which {key}.params does not set")


def _check_optimizer(ds: dict[str, Any]) -> None:
    if "optimizer" not in ds:
        return
    params = dict(ds["optimizer"].get("params") or {})
    if "max_grad_norm" in params:
        raise UserError("optimizer.params.max_grad_norm", "DeepSpeed clips by the top-level gradient_clipping "
                                                          "instead: move the value there")
    cls, taken = optimizer_class(ds)
    if cls is None:
        return
    _check_params("optimizer", cls, params, taken, skip=1)
    if cls.__module__.startswith("torch.optim"):  # torch's own checks of the values (lr, betas, eps, ...)
        try:
            cls([torch.zeros(1, requires_grad=True)], **{k: v for k, v in params.items() if k not in taken})
        except (ValueError, TypeError, RuntimeError) as err:
            raise UserError("optimizer.params", f"{cls.__name__} refuses them: {first_line(err)}") from None


def _check_scheduler(ds: dict[str, Any]) -> None:
    cls = scheduler_class(ds) if "scheduler" in ds else None
    if cls is not None:
        _check_params("scheduler", cls, dict(ds["scheduler"].get("params") or {}), set(), skip=1)


# DeepSpeed's monitors and the package each imports when the engine is built: section -> (module, pip extra).
MONITOR_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                    "comet": ("comet_ml", "comet")}


def _check_monitor_packages(ds: dict[str, Any]) -> None:
    """An enabled monitor whose package is missing: one line naming the extra, not two ranks' import tracebacks."""
    for section, (module, extra) in MONITOR_PACKAGES.items():
        if (ds.get(section) or {}).get("enabled") and importlib.util.find_spec(module) is None:
            raise UserError(f"{section}.enabled", f"DeepSpeed's {section} monitor needs the {module} package, which "
                                                  f"is not installed: pip install 'hybrid_ds[{extra}]' (or "
                                                  f"{module}), or leave the section out")
