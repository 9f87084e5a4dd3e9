"""From ``model.name`` to a Hugging Face config, and the model's skeleton on the meta device.

``model.name`` is tried as, in order: an architecture preset (``hybrid-ds presets``), a local folder
holding ``config.json``, and a hub name (``ORG/NAME``), which resolves through the local Hugging Face
cache exactly as ``from_pretrained`` does, so a model downloaded before works with the network off.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybrid_ds.config import presets
from hybrid_ds.config import ModelConfig
from hybrid_ds.errors import UserError, suggest
from hybrid_ds.hub import from_cache_or_hub
from hybrid_ds.config.families import FAMILIES, Family
from hybrid_ds.models.generic import generic_family, meta_causal_lm


@dataclass(frozen=True)
class ResolvedModel:
    hf_config: Any          # transformers.PretrainedConfig, overrides applied
    family: Family
    checkpoint: str | None  # folder or hub name to read weights from; None for presets
    overrides: dict[str, Any] = field(default_factory=dict)  # model.overrides, named when transformers rejects them


@dataclass(frozen=True)
class PipelineLayer:
    name: str          # "embedding", "block 3", "head"
    class_name: str    # what `pipeline.partition: "type:REGEX"` matches
    params: int        # parameters the layer holds (a tied weight counts in each layer holding it)


def resolve_model(model: ModelConfig) -> ResolvedModel:
    """The HF config named by ``model.name`` with ``model.overrides`` applied, and its family.

    An architecture preset is used when ``pretrained`` is false; with ``pretrained: true`` the name is
    a folder or a hub model, since only those have weights.
    """
    import transformers

    if presets.is_preset(model.name) and not model.pretrained:
        preset = presets.get_preset(model.name)
        hf_config = transformers.CONFIG_MAPPING[preset.model_type](**copy.deepcopy(preset.config))
        source, checkpoint = preset.config, None
    else:  # a folder or hub name; `pretrained: true` with a preset's name (gpt2) means that hub model
        hf_config = _load_hf_config(model)
        checkpoint = model.name
        source = (hf_config.get_config_dict(model.name, revision=model.revision, local_files_only=True)[0]
                  if model.overrides else {})  # cached by _load_hf_config
    hf_config = _with_overrides(hf_config, source, model.overrides)
    use_attention(hf_config, model.attn_implementation or default_attention(hf_config))
    family = get_family(hf_config.model_type, hf_config)  # the generic adapter must see the final config
    return ResolvedModel(hf_config, family, checkpoint, dict(model.overrides))


def default_attention(hf_config: Any) -> str:
    """What Hugging Face picks when no kernel is asked for: ``sdpa`` unless a model class of this config (causal or
    masked LM, or the base model) says it has no SDPA path (``_supports_sdpa = False``: Gemma 2, state-space models),
    then ``eager``."""
    return "eager" if any(not getattr(cls, "_supports_sdpa", True) for cls in model_classes(hf_config)) else "sdpa"


def model_classes(hf_config: Any) -> list[Any]:
    """The causal LM, masked LM and base model classes transformers maps ``hf_config`` to (those it has)."""
    import transformers

    autos = (transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM, transformers.AutoModel)
    return [cls for cls in (auto._model_mapping.get(type(hf_config), None) for auto in autos) if cls is not None]


# Where configs keep the dropout of the attention probabilities (Llama's, BERT's, GPT-2's names).
ATTENTION_DROPOUT = ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")


def check_flex(hf_config: Any) -> None:
    """``model.attn_implementation: flex_attention`` where transformers would refuse it in the middle of training: a
    model class without FlexAttention, or dropout on the attention probabilities (flex takes none)."""
    classes = model_classes(hf_config)
    if classes and not getattr(classes[0], "_supports_flex_attn", False):
        raise UserError("model.attn_implementation", f"'flex_attention': {classes[0].__name__} does not support "
                                                     "FlexAttention in transformers; use 'sdpa' or 'eager'")
    for name in ATTENTION_DROPOUT:
        if getattr(hf_config, name, 0) or 0:
            raise UserError("model.attn_implementation", f"'flex_attention' takes no attention dropout, and "
                                                         f"{hf_config.model_type}'s {name} is {getattr(hf_config, name)}; "
                                                         f'set model.overrides {{"{name}": 0}} or use \'sdpa\'')


def use_attention(hf_config: Any, kernel: str) -> None:
    """Set the attention kernel the layers built from ``hf_config`` use, through transformers' private
    ``_attn_implementation`` (a config built from scratch has None there, and its layers would then attend both ways:
    PITFALLS 1); a transformers that no longer takes it is one line, not a model that silently sees the future."""
    import transformers

    if kernel == "flex_attention":
        check_flex(hf_config)
    hf_config._attn_implementation = kernel
    if getattr(hf_config, "_attn_implementation", None) != kernel:
        raise UserError("model.attn_implementation", f"{kernel!r} did not take effect: transformers "
                                                     f"{transformers.__version__} no longer reads a config's "
                                                     "_attn_implementation, which hybrid_ds was written for "
                                                     "(transformers 5.24)")


def tokenizer_source(model: ModelConfig) -> tuple[str, str | None]:
    """(task, local folder) of ``model``: what its tokenizer needs, known before the model is resolved.

    Only the config's ``model_type`` is read: a type the family table does not name goes to the generic
    adapter, which maps decoder-only causal LMs alone.
    """
    if presets.is_preset(model.name) and not model.pretrained:
        return presets.get_preset(model.name).task, None
    family = FAMILIES.get(_load_hf_config(model).model_type)
    return (family.task if family else "causal_lm"), (model.name if Path(model.name).is_dir() else None)


def get_family(model_type: str, hf_config: Any = None) -> Family:
    """The named family of ``model_type``, else the generic decoder-only adapter's mapping of ``hf_config``.

    The generic adapter (hybrid_ds/models/generic/) builds the model on the meta device from
    ``hf_config`` (overrides applied) and maps it, or raises a UserError saying what it cannot map.
    """
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if hf_config is None:
        raise UserError("model.name",
                        f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))} "
                        f"({suggest(model_type, FAMILIES)}); to add one, add a Family entry in "
                        "hybrid_ds/config/families.py and a parity test")
    return generic_family(model_type, meta_causal_lm(model_type, hf_config))


def _load_hf_config(model: ModelConfig) -> Any:
    import transformers

    is_folder = Path(model.name).is_dir()
    if not is_folder and (model.name.startswith((".", "/")) or model.name.count("/") > 1):
        raise UserError("model.name", f"{model.name!r}: no such folder")
    def load(**kwargs: Any) -> Any:
        return transformers.AutoConfig.from_pretrained(model.name, revision=model.revision,
                                                       trust_remote_code=model.trust_remote_code, **kwargs)

    hint = "" if is_folder else f"; presets: {suggest(model.name, presets.PRESETS)}"
    if presets.is_preset(model.name):  # pretrained: true with a preset's name means a hub model of that name
        hint = (f"; {model.name!r} is also an architecture preset, which has no weights: set model.pretrained "
                "false to train it from its random init")
    try:
        return load() if is_folder else from_cache_or_hub(load, "model.name", model.name, "model config")
    except UserError as err:  # neither local nor reachable: one line, at once
        raise UserError(err.key, err.message + hint) from None
    except (OSError, ValueError) as err:
        where = "folder" if is_folder else "preset, local folder or hub model"
        reason = str(err).strip().splitlines()[0][:300]
        raise UserError("model.name", f"{model.name!r} is not a usable {where}: {reason}{hint}") from None


def _with_overrides(hf_config: Any, source: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The config built again from ``source`` (what it was made from) with ``overrides`` in it.

    Setting a field on a built config would leave the fields derived from it stale: llama's ``head_dim``
    is ``hidden_size // num_attention_heads`` at construction, so overriding ``hidden_size`` alone kept the
    old head width (a "1.1B" llama-tiny override came out at 944M).
    """
    aliases = getattr(hf_config, "attribute_map", {})
    known = set(hf_config.to_dict()) | set(aliases)
    for key in overrides:
        if key not in known:
            raise UserError(f"model.overrides.{key}",
                            f"not a field of {type(hf_config).__name__}; {suggest(key, known)}")
    if not overrides:
        return hf_config
    merged = {**copy.deepcopy(source), **{aliases.get(k, k): v for k, v in overrides.items()}}
    try:
        rebuilt = type(hf_config).from_dict(merged)
    except Exception as err:  # transformers 5 configs check field types: huggingface_hub's StrictDataclass errors
        raise _rejected("model.overrides", overrides, hf_config.model_type, err) from None
    for key, value in overrides.items():
        if getattr(rebuilt, key) != value:   # a field the constructor recomputes: the override wins
            setattr(rebuilt, key, value)
    return rebuilt


def auto_class(family: Family) -> Any:
    """The transformers auto class of the family's task (AutoModelForCausalLM, AutoModelForMaskedLM)."""
    import transformers

    return getattr(transformers, family.task_info.auto_class)


def meta_model(resolved: ResolvedModel) -> Any:
    """The whole Hugging Face model on the meta device: shapes and structure, no memory, no weights."""
    import torch

    try:
        with torch.device("meta"):
            return auto_class(resolved.family).from_config(resolved.hf_config, trust_remote_code=False)
    except Exception as err:  # a config transformers cannot build: heads that do not divide the width, n_head 0
        key = "model.overrides" if resolved.overrides else "model.name"
        raise _rejected(key, resolved.overrides or resolved.checkpoint, resolved.hf_config.model_type, err) from None


def _rejected(key: str, given: Any, model: str, err: Exception) -> UserError:
    reason = " ".join(str(err).split()) or type(err).__name__
    return UserError(key, f"{given!r}: transformers cannot build a {model} model with it: "
                          f"{type(err).__name__}: {reason[:300]}")


def count_params(model: Any) -> int:
    """Parameters of ``model``, a tied weight counted once."""
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def submodule(model: Any, path: str) -> Any:
    """``model.get_submodule(path)``, or None where the family's optional module is absent."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _unique_params(modules: list[Any]) -> int:
    seen: dict[int, int] = {}
    for module in modules:
        if module is not None:
            for p in module.parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


def pipeline_layer(path: str, family: Family, n_blocks: int) -> int:
    """The index in [embedding, blocks..., head] of the layer holding the module or parameter at ``path``.

    >>> llama = FAMILIES["llama"]
    >>> pipeline_layer("model.layers.1.mlp.up_proj", llama, 4), pipeline_layer("lm_head", llama, 4)
    (2, 5)
    """
    blocks = family.blocks + "."
    if path.startswith(blocks):
        return 1 + int(path[len(blocks):].partition(".")[0])
    return 0 if any(path.startswith(p + ".") for p in family.embedding_modules) else n_blocks + 1


def pipeline_layers(model: Any, family: Family) -> list[PipelineLayer]:
    """[embedding, block 0 .. block n-1, head] with the parameters each holds."""
    embedding = [submodule(model, p) for p in family.embedding_modules]
    head = [submodule(model, p) for p in family.head_modules]
    blocks = model.get_submodule(family.blocks)
    layers = [PipelineLayer("embedding", "Embedding", _unique_params(embedding))]
    for i, block in enumerate(blocks):
        layers.append(PipelineLayer(f"block {i}", type(block).__name__, _unique_params([block])))
    layers.append(PipelineLayer("head", "Head", _unique_params(head)))
    return layers


def stage_params(model: Any, family: Family, parts: list[int]) -> list[int]:
    """Parameters each stage holds: unique within the stage, a tied weight counted on each stage holding it."""
    blocks = list(model.get_submodule(family.blocks))
    modules = ([[submodule(model, p) for p in family.embedding_modules]] + [[b] for b in blocks]
               + [[submodule(model, p) for p in family.head_modules]])
    return [_unique_params([m for layer in modules[lo:hi] for m in layer]) for lo, hi in zip(parts, parts[1:])]
