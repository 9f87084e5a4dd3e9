"""Build one stage's modules and nothing else.

The whole Hugging Face model exists only as a skeleton on the meta device (no memory). A stage takes
the submodules it runs from the skeleton and materializes just those: ``to_empty`` on the target
device, then the model's own ``_init_weights`` (which also recomputes non-persistent buffers such as
rotary ``inv_freq`` and Gemma's ``embed_scale``), then, when ``pretrained``, this module's tensors
read from the checkpoint's safetensors files. Other stages' tensors are never read.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_ds.errors import UserError
from hybrid_ds.models.resolve import ResolvedModel, meta_model

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def checkpoint_folder(name: str, revision: str | None = None) -> Path:
    """The local folder holding ``name``'s safetensors: a folder as given, or a hub name's cached snapshot."""
    if Path(name).is_dir():
        folder = Path(name)
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name, revision=revision,
                                            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as err:  # huggingface_hub raises several unrelated types for "not available"
            raise UserError("model.name", f"{name!r}: weights not found locally or on the hub: "
                                          f"{str(err).splitlines()[0][:200]}") from None
    if not (folder / _INDEX).is_file() and not (folder / _SINGLE).is_file():
        raise UserError("model.name", f"{folder} has no {_SINGLE} or {_INDEX}; "
                                      "save the model with save_pretrained(safe_serialization=True)")
    return folder


class SafetensorsCheckpoint:
    """Reads single tensors by model key from a single-file or sharded safetensors checkpoint.

    Checkpoint keys are mapped to the model's keys by Hugging Face's own loading rules
    (``rename_source_key``): legacy renamings (GPT-NeoX ``embed_out`` -> ``lm_head``) and the
    base-model prefix (GPT-2 checkpoints saved without ``transformer.``).
    """

    def __init__(self, folder: Path, skeleton: nn.Module):
        from safetensors import safe_open

        self.folder = folder
        if (folder / _INDEX).is_file():
            files: dict[str, str] = json.loads((folder / _INDEX).read_text())["weight_map"]
        else:
            with safe_open(folder / _SINGLE, framework="pt") as f:
                files = {key: _SINGLE for key in f.keys()}
        self.files = files
        self.keys: dict[str, str] = {}       # model key -> checkpoint key
        self.converted: set[str] = set()     # model keys that need tensors merged or split
        for key, (model_key, converter) in zip(files, _model_keys(list(files), skeleton)):
            self.keys[model_key] = key
            if converter is not None:
                self.converted.add(model_key)

    def find(self, model_key: str) -> str | None:
        if model_key in self.converted:
            raise UserError("model.name", f"{self.folder}: {model_key} must be merged from several checkpoint "
                                          "tensors, which per-stage loading does not do; save the model with "
                                          "save_pretrained first and name that folder")
        return self.keys.get(model_key)

    def read(self, key: str) -> torch.Tensor:
        """The tensor, memory-mapped from its file: copy it where it belongs and drop it.

        Each read maps the file anew, so the mapping goes when the tensor goes: the pages a copy touches
        count in RSS for as long as the file stays mapped, which would double a stage's memory.
        """
        from safetensors import safe_open

        with safe_open(self.folder / self.files[key], framework="pt", device="cpu") as f:
            return f.get_tensor(key)


def _model_keys(checkpoint_keys: list[str], skeleton: nn.Module) -> list[tuple[str, str | None]]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = skeleton.state_dict()
    prefix = getattr(skeleton, "base_model_prefix", None)
    return [rename_source_key(key, renamings, converters, prefix, meta_state) for key in checkpoint_keys]


class StageBuilder:
    """Materializes the submodules one stage runs, from one meta skeleton of the whole model."""

    def __init__(self, resolved: ResolvedModel, pretrained: bool, seed: int = 1234,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 revision: str | None = None, skeleton: nn.Module | None = None):
        self.resolved = resolved
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
        self._built: dict[str, nn.Module] = {}
        self._params: dict[str, nn.Parameter] = {}
        self.shared: dict[str, Any] = {}   # objects the stage's layers share (layers.Derived)

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
            value.copy_(self.checkpoint.read(key))
        self._params[path] = nn.Parameter(value)
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
                tensor, target = self.checkpoint.read(key), names[name]
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
    import copy

    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    for child in children:
        clone._modules[child] = None
    return clone
