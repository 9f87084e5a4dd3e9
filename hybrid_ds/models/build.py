"""Build one stage's modules and nothing else.

The whole Hugging Face model exists only as a skeleton on the meta device (no memory). A stage takes
the submodules it runs from the skeleton and materializes just those: ``to_empty`` on the target
device, then the model's own ``_init_weights`` (which also recomputes non-persistent buffers such as
rotary ``inv_freq`` and Gemma's ``embed_scale``), then, when ``pretrained``, this module's tensors
read from the checkpoint's safetensors files. Other stages' tensors are never read.
"""

from __future__ import annotations

import copy
import functools
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_ds.config import LoraConfig
from hybrid_ds.errors import UserError
from hybrid_ds.hub import from_cache_or_hub
from hybrid_ds.models.lora import Targets, add_adapters, find_targets
from hybrid_ds.models.resolve import ResolvedModel, meta_model

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def checkpoint_folder(name: str, revision: str | None = None) -> Path:
    """The local folder holding ``name``'s safetensors: a folder as given, or a hub name's cached snapshot."""
    if Path(name).is_dir():
        folder = Path(name)
    else:
        from huggingface_hub import snapshot_download

        def load(local_files_only: bool) -> Path:
            found = Path(snapshot_download(name, revision=revision, local_files_only=local_files_only,
                                           allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
            if local_files_only and not ((found / _INDEX).is_file() or (found / _SINGLE).is_file()):
                raise FileNotFoundError(found / _SINGLE)  # the config is cached, the weights are not
            return found

        try:
            folder = from_cache_or_hub(load, "model.name", name, "weights")
        except UserError:
            raise
        except Exception as err:  # huggingface_hub raises several unrelated types for "not available"
            raise UserError("model.name", f"{name!r}: weights not found locally or on the hub: "
                                          f"{str(err).splitlines()[0][:200]}") from None
    if not (folder / _INDEX).is_file() and not (folder / _SINGLE).is_file():
        raise UserError("model.name", f"{folder} has no {_SINGLE} or {_INDEX}; "
                                      "save the model with save_pretrained(safe_serialization=True)")
    return folder


class SafetensorsCheckpoint:
    """Reads model tensors, by model key, from a single-file or sharded safetensors checkpoint.

    Checkpoint keys are mapped to the model's keys by Hugging Face's own loading rules, the weight
    conversion mapping ``from_pretrained`` applies: renamings (GPT-NeoX ``embed_out`` -> ``lm_head``,
    the base-model prefix of GPT-2 checkpoints saved without ``transformer.``) and converters that make
    one model tensor from several checkpoint tensors (Mixtral's per-expert ``experts.3.w1.weight`` and
    ``w3`` stacked and concatenated into ``mlp.experts.gate_up_proj``). A model tensor is made from its
    own checkpoint tensors only, by the converter's own operations, in the order ``from_pretrained`` uses.
    """

    def __init__(self, folder: Path, skeleton: nn.Module):
        from safetensors import safe_open

        self.folder = folder
        self.skeleton = skeleton
        if (folder / _INDEX).is_file():
            files: dict[str, str] = json.loads((folder / _INDEX).read_text())["weight_map"]
        else:
            with safe_open(folder / _SINGLE, framework="pt") as f:
                files = {key: _SINGLE for key in f.keys()}
        self.files = files
        self.sources = _sources(list(files), skeleton)  # model key -> the checkpoint tensors it is made of

    def find(self, model_key: str) -> str | None:
        """``model_key`` when the checkpoint holds it (as itself, renamed, or to be converted), else None."""
        return model_key if model_key in self.sources else None

    def tensor(self, model_key: str) -> torch.Tensor:
        """The model tensor ``model_key``: one checkpoint tensor, or the converter's result from several."""
        source = self.sources[model_key]
        if source.converter is None:
            return self.read(source.keys[0])
        converter = copy.deepcopy(source.converter)  # it collects tensors: a fresh one each time, as HF does
        for key, pattern in zip(source.keys, source.patterns):
            converter.add_tensor(source.target, key, pattern, functools.partial(self.read, key))
        try:
            made = converter.convert(source.target, model=self.skeleton, config=self.skeleton.config)
        except Exception as err:  # a broken checkpoint, or an operation that needs more than one stage's tensors
            reason = " ".join(str(err).split())[:200]
            raise self._unconvertible(model_key, source, f"{type(err).__name__}: {reason}") from None
        if model_key not in made:
            raise self._unconvertible(model_key, source, f"it made {sorted(made)[:3]}")
        return made[model_key]

    def _unconvertible(self, model_key: str, source: _Source, reason: str) -> UserError:
        return UserError("model.name", f"{self.folder}: transformers' conversion of {source.keys[0]} (and "
                                       f"{len(source.keys) - 1} more) into {model_key} failed per stage ({reason}); "
                                       "if from_pretrained loads this folder, save the model with save_pretrained("
                                       "save_original_format=False), which needs no conversion, and name that folder")

    def read(self, key: str) -> torch.Tensor:
        """The checkpoint tensor ``key``, memory-mapped from its file: copy it where it belongs and drop it.

        Each read maps the file anew, so the mapping goes when the tensor goes: the pages a copy touches
        count in RSS for as long as the file stays mapped, which would double a stage's memory.
        """
        from safetensors import safe_open

        with safe_open(self.folder / self.files[key], framework="pt", device="cpu") as f:
            return f.get_tensor(key)


@dataclass
class _Source:
    """The checkpoint tensors one model tensor is made of."""

    target: str                    # the model key transformers files the conversion under (its first target)
    converter: Any = None          # transformers' WeightConverter; None: the tensor is read as it is
    keys: list[str] = field(default_factory=list)      # checkpoint keys, in the order from_pretrained feeds them
    patterns: list[str] = field(default_factory=list)  # the converter's source pattern each key matched


def _sources(checkpoint_keys: list[str], skeleton: nn.Module) -> dict[str, _Source]:
    """Model key -> its checkpoint tensors, grouped as ``convert_and_load_state_dict_in_model`` groups them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    meta_state = skeleton.state_dict()
    prefix = getattr(skeleton, "base_model_prefix", None)
    sources: dict[str, _Source] = {}
    for key in sorted(checkpoint_keys, key=dot_natural_key):  # experts 0, 1, .., 10: the order they are stacked in
        model_key, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if model_key not in meta_state and key in meta_state:  # a key already right is not renamed
            model_key, pattern = rename_source_key(key, [], [], prefix, meta_state)
        if pattern is None:
            sources[model_key] = _Source(model_key, keys=[key])
        elif model_key in meta_state:
            converter = by_pattern[pattern]
            source = sources.setdefault(model_key, _Source(model_key, converter))
            source.keys.append(key)
            source.patterns.append(pattern)
            for target in converter.target_patterns[1:]:  # one checkpoint tensor split into several (qkv)
                sources[model_key.replace(converter.target_patterns[0], target)] = source
    return sources


class StageBuilder:
    """Materializes the submodules one stage runs, from one meta skeleton of the whole model."""

    def __init__(self, resolved: ResolvedModel, pretrained: bool, seed: int = 1234,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 revision: str | None = None, skeleton: nn.Module | None = None, documents: bool = False,
                 lora: LoraConfig | None = None, lora_targets: Targets | None = None):
        self.resolved = resolved
        self.documents = documents  # the travelling mask holds document indices (data.document_mask)
        self.config = resolved.hf_config
        self.family = resolved.family
        self.skeleton = skeleton if skeleton is not None else meta_model(resolved)
        self.seed = seed
        self.dtype = dtype
        self.device = torch.device(device)
        self.checkpoint = None
        if pretrained:
            folder = checkpoint_folder(resolved.checkpoint, revision)
            self.checkpoint = SafetensorsCheckpoint(folder, self.skeleton)
        out, inp = self.skeleton.get_output_embeddings(), self.skeleton.get_input_embeddings()
        self.tied = out is not None and out.weight is inp.weight
        self.lora = lora  # model.lora: every built tensor frozen, adapters on the targets (hybrid_ds.models.lora)
        # where peft puts the adapters: the plan's (Plan.lora_targets), else found here
        self.lora_targets = lora_targets or (find_targets(self.skeleton, self.family, lora) if lora else None)
        self._built: dict[str, nn.Module] = {}
        self._params: dict[str, nn.Parameter] = {}
        self.shared: dict[str, Any] = {}   # objects the stage's layers share (layers.Derived)
        self.sequence: Any = None  # this rank's SequenceShard under sequence parallelism (models.sequence_parallel)
        # train.tiled_mlp: (tiles, tiled(fn, module, x, tiles)) running each block's MLP a tile at a time
        self.tiled_mlp: tuple[int, Any] | None = None
        self.selective_checkpoint: str | None = None  # train.selective_checkpoint: "attention" or "mlp" recomputed
        self.float8 = False  # train.float8: the blocks' linear layers trained in float8 (models.layers.to_float8)

    def built_modules(self) -> dict[str, nn.Module]:
        """Path -> module for everything this builder materialized (its stage's share of the model)."""
        return dict(self._built)

    def built_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._params)

    def module(self, path: str, without: tuple[str, ...] = ()) -> nn.Module | None:
        """The real module at ``path`` (None where the family's optional module is absent).

        ``without`` names children left out (set to None): a stage that holds BERT's embeddings
        without the word embedding, which the tied head owns.
        """
        if path in self._built:
            return self._built[path]
        try:
            meta = self.skeleton.get_submodule(path)
        except AttributeError:
            return None
        if meta is None:
            return None
        if without:
            meta = _shallow_without(meta, without)
        module = meta.to_empty(device=self.device)
        self._initialize(module, path)
        if self.checkpoint is not None:
            self._load(module, path)
        if self.lora:
            add_adapters(module, path, self.lora_targets, self.lora, self.seed)
        module.to(self.dtype)
        self._built[path] = module
        return module

    def parameter(self, path: str) -> nn.Parameter:
        """A lone parameter (BERT's output bias), without materializing the module that owns it.

        It starts at zero, as the Hugging Face models initialize output biases, or is read from the checkpoint.
        """
        meta = self.skeleton.get_parameter(path)
        value = torch.zeros(meta.shape, dtype=self.dtype, device=self.device)
        if self.checkpoint is not None:
            key = self.checkpoint.find(path) or self.checkpoint.find(f"{self.family.output}.bias")
            if key is None:
                raise UserError("model.name", f"checkpoint {self.checkpoint.folder} lacks {path}")
            value.copy_(self.checkpoint.tensor(key))
        self._params[path] = nn.Parameter(value, requires_grad=self.lora is None)
        return self._params[path]

    def rotary(self) -> nn.Module | None:
        """A fresh rotary-embedding module built from the config (its buffers are computed, not loaded)."""
        if self.family.rotary is None:
            return None
        meta = self.skeleton.get_submodule(self.family.rotary)
        with torch.device(self.device):
            return type(meta)(config=self.config)

    def _initialize(self, module: nn.Module, path: str) -> None:
        # Each module gets its own seed from its path: the weights don't depend on the stage layout.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(path.encode()))
            for sub in module.modules():
                self.skeleton._init_weights(sub)

    def _load(self, module: nn.Module, path: str) -> None:
        keys, missing = {}, []
        names = dict(module.named_parameters())
        names.update({n: b for n, b in module.named_buffers() if _is_persistent(module, n)})
        for name in names:
            key = self.checkpoint.find(f"{path}.{name}" if path else name)
            if key is None and f"{path}.{name}" == f"{self.family.output}.weight" and self.tied:
                key = self.checkpoint.find(f"{self.family.token_embedding}.weight")  # tied: only one is saved
            if key is None and f"{path}.{name}" == f"{self.family.output}.bias" and self.family.output_bias:
                key = self.checkpoint.find(self.family.output_bias)
            if key is None:
                if name in dict(module.named_parameters()):
                    missing.append(f"{path}.{name}")
                continue
            keys[name] = key
        if missing:
            raise UserError("model.name", f"checkpoint {self.checkpoint.folder} lacks {len(missing)} tensors this "
                                          f"stage needs, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, key in keys.items():  # one tensor mapped at a time (see SafetensorsCheckpoint.read)
                tensor, target = self.checkpoint.tensor(key), names[name]
                if target.shape != tensor.shape:
                    raise UserError("model.name", f"checkpoint tensor for {path}.{name} has shape "
                                                  f"{tuple(tensor.shape)}, the model expects {tuple(target.shape)}")
                target.copy_(tensor)
                del tensor


def _is_persistent(module: nn.Module, name: str) -> bool:
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    return leaf not in owner._non_persistent_buffers_set


def _shallow_without(module: nn.Module, children: tuple[str, ...]) -> nn.Module:
    """A copy of ``module`` sharing its children except ``children``, which are None in the copy."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    for child in children:
        clone._modules[child] = None
    return clone
