"""Per-family parameter counts: the shapes of a model and the tensors Hugging Face builds for it. Pure Python.

An :class:`Arch` is read from a preset or a local ``config.json`` by the shape builder the family table
(:mod:`hybrid_ds.config.families`) names for its ``model_type``. Its parameters are grouped as the pipeline
groups them, [embedding, block 0 .. n-1, head]; a tied weight counts on every stage holding it. No torch,
no deepspeed, no transformers: tests/test_families.py holds these counts against models built on the meta
device. A model type without a shape builder (one the generic adapter maps) is read from its structure
on the meta device by :func:`hybrid_ds.models.shape.model_arch`, which needs torch.

>>> arch = arch_from_preset("gpt3-175b")
>>> round(arch.params / 1e9, 1)          # Narayanan et al. 2021, Table 1: 174.6B
174.6
>>> tiny = arch_from_preset("gpt2-tiny")   # tied wte: counted in the embedding and again in the head
>>> tiny.layer_params(), stage_boundaries(tiny, "parameters", 2, seq_len=64)
([24576, 49984, 49984, 16512], [0, 2, 4])

A Mixture-of-Experts model (:class:`Experts`) holds every expert, and each token passes only ``top_k`` of them:
memory follows :meth:`Arch.layer_params`, compute :meth:`Arch.layer_active_params`. Partition "flops" balances
the active parameters, "parameters" all of them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid_ds.config import presets
from hybrid_ds.errors import UserError
from hybrid_ds.config.families import FAMILIES
from hybrid_ds.config.shapes import Linear, Tensor
from hybrid_ds.config.topology import partition_layers


@dataclass(frozen=True)
class Experts:
    """The routed experts of a Mixture-of-Experts model, per block, as transformers 5.x builds them (fused).

    >>> e = Experts(count=8, top_k=2, routed=(800, 0), always=(40, 0))   # block 1: a dense MLP
    >>> e.active(0), e.active(1)       # the router and shared experts pass every token
    (240, 0)
    """

    count: int                  # routed experts in one MoE layer (num_local_experts, num_experts, n_routed_experts)
    top_k: int                  # routed experts each token passes (num_experts_per_tok)
    routed: tuple[int, ...]     # per block: elements of all its routed experts (0: a block with a dense MLP)
    always: tuple[int, ...]     # per block: the rest of its MoE layer, which every token passes (router, shared experts)

    def active(self, block: int) -> int:
        """Elements of block ``block``'s MoE layer one token passes through."""
        return self.routed[block] * self.top_k // self.count + self.always[block]


@dataclass(frozen=True)
class Arch:
    """Shapes of one model and what its forward pass saves for backward."""

    name: str
    family: str
    task: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_positions: int
    embedding: tuple[Tensor, ...]   # the pipeline's embedding layer
    block: tuple[Tensor, ...]       # one transformer block
    head: tuple[Tensor, ...]        # final norm + output projection (the tied weight again, where tied)
    tied: int = 0                   # elements of the weight shared by embedding and head (0 = untied)
    act: str = "gelu"               # MLP activation (Hugging Face ACT2FN name)
    gated: bool = False             # SwiGLU / GeGLU: act(gate(x)) * up(x)
    norm: str = "layernorm"         # "layernorm", "rmsnorm" (llama), "rmsnorm_fp32" (gemma)
    parallel: str = ""              # "" sequential; "two_norms" (gpt_neox); "one_norm" (phi)
    rotary_dim: int = 0             # rotary dims per head (0: learned or absolute positions)
    learned_positions: bool = False
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0      # p of the two residual dropouts of each block
    embd_dropout: float = 0.0
    softmax_fp32: bool = True       # eager attention computes softmax in fp32 (llama and most newer models)
    fused_qkv: bool = False         # one q/k/v projection; with rotary, v keeps its whole output alive
    attn_out_copy: bool = False     # sdpa's output is copied (not viewed) into the output projection
    sliding_window: int = 0         # local attention window (Mistral): sdpa then gets a materialized mask
    position_ids_per_token: bool = False  # OPT: position ids from the padding mask, one per token
    token_types: bool = False       # BERT: segment embeddings and a LayerNorm inside the embedding
    head_transform: bool = False    # BERT: a dense layer and a LayerNorm before the output projection
    block_class: str = "Block"      # the Hugging Face class of the blocks (what "type:REGEX" partitions match)
    # blocks that differ from one another (a structure read by hybrid_ds.models.shape): (class, parameters)
    # of each; empty when every block is ``block``
    per_block: tuple[tuple[str, int], ...] = ()
    experts: Experts | None = None  # the routed experts of a Mixture-of-Experts model; None: dense
    linears: tuple[Linear, ...] = ()  # the linear layers of ``block`` (what LoRA adapters wrap)
    per_block_linears: tuple[tuple[Linear, ...], ...] = ()  # those of each block, where blocks differ
    head_linears: tuple[Linear, ...] = ()  # the head's, but the output projection (BERT's transform.dense)
    # LoRA adapter elements of each pipeline layer as peft gives them for the run's model.lora, counted on the meta
    # skeleton (a model without a shape builder: peft adapts the fused experts of some MoE types); () = from linears
    counted_adapters: tuple[int, ...] = ()

    def block_linears(self, block: int) -> tuple[Linear, ...]:
        return self.per_block_linears[block] if self.per_block_linears else self.linears

    def layer_adapter_params(self, r: int, targets: list[str] | str) -> list[int]:
        """Elements of the LoRA adapters of rank ``r`` on the ``targets`` of [embedding, block 0 .. n-1, head]
        (none on the embedding and the output projection, which the pipeline multiplies by directly).

        >>> arch_from_preset("gpt2-tiny").layer_adapter_params(4, ["c_attn"])   # 4 x (64 + 192) per block
        [0, 1024, 1024, 0]
        """
        if self.counted_adapters:
            return list(self.counted_adapters)
        return [0, *(adapter_params(self.block_linears(b), r, targets) for b in range(self.layers)),
                adapter_params(self.head_linears, r, targets)]

    def stage_adapter_params(self, parts: list[int], r: int, targets: list[str] | str) -> list[int]:
        per_layer = self.layer_adapter_params(r, targets)
        return [sum(per_layer[lo:hi]) for lo, hi in zip(parts, parts[1:])]

    def layer_params(self) -> list[int]:
        """Elements of [embedding, block 0 .. n-1, head], a tied weight in both embedding and head."""
        blocks = [n for _, n in self.per_block] or [sum(n for _, n in self.block)] * self.layers
        return [sum(n for _, n in self.embedding), *blocks, sum(n for _, n in self.head)]

    def layer_expert_params(self) -> list[int]:
        """Elements of the routed experts in [embedding, block 0 .. n-1, head] (all zero for a dense model)."""
        return [0, *(self.experts.routed if self.experts else [0] * self.layers), 0]

    def layer_active_params(self) -> list[int]:
        """Elements one token uses in [embedding, block 0 .. n-1, head]: a block's routed experts count top_k / count.

        >>> tiny = arch_from_preset("gpt2-tiny")   # dense: every parameter is active
        >>> tiny.layer_active_params() == tiny.layer_params()
        True
        """
        e = self.experts
        if e is None:
            return self.layer_params()
        return [n - routed + routed * e.top_k // e.count for n, routed in zip(self.layer_params(), self.layer_expert_params())]

    @property
    def active_params(self) -> int:
        """Unique parameters one token uses: all but the routed experts it is not sent to."""
        return sum(self.layer_active_params()) - self.tied

    def stage_expert_params(self, parts: list[int]) -> list[int]:
        """Elements of the routed experts each stage holds."""
        per_layer = self.layer_expert_params()
        return [sum(per_layer[lo:hi]) for lo, hi in zip(parts, parts[1:])]

    def layer_classes(self) -> list[str]:
        """Class names of [embedding, block 0 .. n-1, head], as hybrid_ds.runtime.plan names the pipeline's layers."""
        blocks = [name for name, _ in self.per_block] or [self.block_class] * self.layers
        return ["Embedding", *blocks, "Head"]

    @property
    def params(self) -> int:
        """Unique parameters of the whole model."""
        return sum(self.layer_params()) - self.tied

    def stage_params(self, parts: list[int]) -> list[int]:
        """Parameters each stage holds; the tied weight once per stage that holds it."""
        per_layer, last = self.layer_params(), len(self.layer_params()) - 1
        return [sum(per_layer[lo:hi]) - (self.tied if lo == 0 and hi == last + 1 else 0)
                for lo, hi in zip(parts, parts[1:])]

    def tensors(self) -> list[Tensor]:
        """Every parameter tensor of the model once (for ZeRO-3's persistence threshold)."""
        head = list(self.head)
        if self.tied:  # the shared weight is the head's only tensor of that size; it lives in the embedding
            head.remove(next(t for t in head if t[1] == self.tied))
        return [*self.embedding, *[t for _ in range(self.layers) for t in self.block], *head]

    def largest_module(self) -> int:
        """Elements of the module with the most direct parameters (DeepSpeed's largest_layer_params)."""
        largest = 0
        for part in (self.embedding, self.block, self.head):
            sizes: dict[str, int] = {}
            for module, n in part:
                sizes[module] = sizes.get(module, 0) + n
            largest = max(largest, *sizes.values())
        return largest


def adapted(linears: tuple[Linear, ...], targets: list[str] | str) -> list[Linear]:
    """The linear layers (of a block, or a head's but the output projection) that LoRA adapts: all of them for
    "all-linear" (peft's rule: every Linear and Conv1D but the output projection), else those whose path is a
    target or ends in "." + a target (peft's ``check_target_module_exists`` for a list of names).

    >>> layers = (Linear("self_attn.q_proj", 8, 8), Linear("self_attn.o_proj", 8, 8), Linear("mlp.up_proj", 8, 32))
    >>> [layer.module for layer in adapted(layers, ["q_proj", "mlp.up_proj", "proj"])]
    ['self_attn.q_proj', 'mlp.up_proj']
    """
    if targets == "all-linear":
        return list(linears)
    return [layer for layer in linears if any(layer.module == t or layer.module.endswith("." + t) for t in targets)]


def adapter_params(linears: tuple[Linear, ...], r: int, targets: list[str] | str) -> int:
    """Elements of the LoRA adapters on a block's ``linears``: r x (in + out) for each adapted layer (lora_A is
    r x in, lora_B out x r; no biases)."""
    return sum(r * (layer.n_in + layer.n_out) for layer in adapted(linears, targets))


def has_shape(model_type: str) -> bool:
    """Whether the family table has a shape builder for ``model_type`` (else the structure must be read)."""
    return model_type in FAMILIES and FAMILIES[model_type].shape is not None


def arch_from_config_dict(name: str, model_type: str, config: dict[str, Any]) -> Arch:
    """The Arch of a named family from its config dict (keys in the family's own or the generic names)."""
    if not has_shape(model_type):
        raise UserError("model.name", f"{name}: the family table has no shape builder for model_type "
                                      f"{model_type!r} (named: {', '.join(sorted(FAMILIES))}); the estimator "
                                      "reads such a model's structure from a local folder (hybrid_ds.models.shape)")
    family = FAMILIES[model_type]
    config = {family.aliases.get(key, key): value for key, value in config.items()}
    return Arch(name=name, family=model_type, task=family.task, block_class=family.block_class,
                **family.shape(config))


def arch_from_preset(name: str, overrides: dict[str, Any] | None = None) -> Arch:
    preset = presets.get_preset(name)
    return arch_from_config_dict(name, preset.model_type, {**preset.config, **(overrides or {})})


def arch_from_model(name: str, pretrained: bool = False, overrides: dict[str, Any] | None = None) -> Arch:
    """A preset, or the ``config.json`` of a local folder or of a hub model in the local Hugging Face cache."""
    if presets.is_preset(name) and not pretrained:
        return arch_from_preset(name, overrides)
    path = _local_config_json(name)
    if path is None:
        raise UserError("model.name", f"{name!r}: not a preset and no config.json found locally; "
                                      "the estimator reads architecture numbers without downloading")
    config = json.loads(path.read_text())
    return arch_from_config_dict(name, config.get("model_type", "?"), {**config, **(overrides or {})})


def local_model_type(name: str) -> str | None:
    """The ``model_type`` in the ``config.json`` of a local folder or cached hub model, None where there is none."""
    path = _local_config_json(name)
    return json.loads(path.read_text()).get("model_type") if path else None


def _local_config_json(name: str) -> Path | None:
    if (Path(name) / "config.json").is_file():
        return Path(name) / "config.json"
    import os

    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{name.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1] if found else None


# ---------------------------------------------------------------- stages


def stage_boundaries(arch: Arch, method: str | list[int], stages: int, seq_len: int) -> list[int]:
    """Stage boundaries over [embedding, blocks..., head], as hybrid_ds.runtime.plan computes them."""
    key = tuple(method) if isinstance(method, list) else method
    return list(_partition(key, tuple(arch.layer_params()), tuple(arch.layer_classes()), stages, seq_len, arch.hidden,
                           tuple(arch.layer_active_params())))


@functools.lru_cache(maxsize=256)
def _partition(method: str | tuple[int, ...], per_layer: tuple[int, ...], classes: tuple[str, ...], stages: int,
               seq_len: int, hidden: int, active: tuple[int, ...]) -> tuple[int, ...]:
    # `plan` asks for the same split of one model many times; the balanced split is O(layers^2 x stages).
    method = list(method) if isinstance(method, tuple) else method
    return tuple(partition_layers(method, list(per_layer), list(classes), stages, seq_len, hidden, list(active)))


__all__ = ["Arch", "Experts", "Linear", "Tensor", "adapted", "adapter_params", "arch_from_config_dict", "arch_from_model",
           "arch_from_preset", "has_shape", "local_model_type",
           "stage_boundaries"]
