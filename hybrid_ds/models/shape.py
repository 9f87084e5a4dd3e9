"""The estimator's view of any model the adapter accepts: an :class:`~hybrid_ds.estimate.architecture.Arch`.

A named family with a shape builder is counted from its config dict alone (pure Python, no torch:
what ``compare`` and ``plan`` do for presets). Any other model the adapter accepts (the generic adapter's
qwen3, olmo2, starcoder2, ...) is read from its structure on the meta device: the parameters of the
modules the pipeline places in each layer, the class of each block, and the sizes its config names.
That needs torch and transformers, and gives the same parameter counts as the pipeline's own plan
(tests/test_families.py). The activation terms of such a model follow the generic decoder layout
(attention, MLP, norms) and are an approximation: its quirks are not in the shape.

Mixture-of-Experts blocks are read the same way for every model type: transformers 5.x keeps a layer's routed
experts in one module (``MixtralExperts``, ``Qwen3MoeExperts``, ``DeepseekV3Experts`` ...) whose parameters
are stacked along a first dimension of one row per expert; the rest of the module around it (the router,
shared experts and their gate) is passed by every token.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hybrid_ds.config import presets
from hybrid_ds.estimate.architecture import Arch, Experts, arch_from_model, has_shape, local_model_type
from hybrid_ds.config import ModelConfig
from hybrid_ds.errors import UserError
from hybrid_ds.config.families import Family
from hybrid_ds.config.shapes import Linear, Tensor


def model_arch(model: ModelConfig, family: Family | None = None, skeleton: Any = None) -> Arch:
    """The Arch of ``model``: from the family table's shape builder where it has one, else from the structure
    (``family`` and ``skeleton`` where the caller resolved them already, as a run's plan has)."""
    preset = presets.is_preset(model.name) and not model.pretrained
    if has_shape(presets.get_preset(model.name).model_type if preset else local_model_type(model.name) or ""):
        return arch_from_model(model.name, model.pretrained, model.overrides)
    if skeleton is None:
        from hybrid_ds.models.resolve import meta_model, resolve_model

        resolved = resolve_model(model)
        family, skeleton = resolved.family, meta_model(resolved)
    arch = arch_from_skeleton(model.name, family, skeleton)
    if model.lora:
        return replace(arch, counted_adapters=tuple(layer_adapter_params(skeleton, family, model.lora)))
    return arch


def arch_from_skeleton(name: str, family: Family, skeleton: Any) -> Arch:
    """The Arch of a model on the meta device, its layers grouped as ``family`` places them in the pipeline."""
    c = skeleton.config
    blocks = list(skeleton.get_submodule(family.blocks))
    per_block = tuple((type(b).__name__, sum(p.numel() for p in b.parameters())) for b in blocks)
    experts = model_experts(skeleton, blocks)
    first = next((i for i, n in enumerate(experts.routed) if n), 0) if experts else 0  # a block with experts
    block = _tensors(skeleton, (f"{family.blocks}.{first}",), strip=f"{family.blocks}.{first}.")
    uniform = len(set(per_block)) == 1 and per_block[0][1] == sum(n for _, n in block)
    out, inp = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    tied = inp.weight.numel() if out is not None and out.weight is inp.weight else 0
    if getattr(c, "num_attention_heads", None) is None:  # Mamba 2: the activation model is of attention blocks
        raise UserError("model.name", f"{name!r}: the estimator models attention blocks and {c.model_type} has no "
                                      "num_attention_heads; training needs no estimate (hybrid-ds train without "
                                      "--dry-run)")
    h, heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    block_modules = [type(m).__name__ for m in blocks[first].modules()]
    rotary = getattr(c, "rotary_dim", None) or (int(head_dim * getattr(c, "partial_rotary_factor", 1.0))
                                                if family.rotary else 0)
    layer_types = getattr(c, "layer_types", None) or []
    sliding = getattr(c, "sliding_window", None) or 0
    linears = tuple(block_linears(b) for b in blocks)
    return Arch(
        name=name, family=c.model_type, task=family.task, layers=len(blocks), hidden=h, heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
        ffn=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h, vocab=c.vocab_size,
        max_positions=getattr(c, "max_position_embeddings", None) or 2048,
        embedding=_tensors(skeleton, family.embedding_modules), block=block,
        head=_tensors(skeleton, family.head_modules), tied=tied,
        act=getattr(c, "hidden_act", None) or getattr(c, "activation_function", None) or "silu",
        gated=any(".gate" in path or path.startswith("gate") for path, _ in block),
        norm="rmsnorm" if any("RMSNorm" in m for m in block_modules) else "layernorm", rotary_dim=rotary,
        attn_dropout=getattr(c, "attention_dropout", 0.0) or 0.0,
        sliding_window=sliding if ("sliding_attention" in layer_types or not layer_types) else 0,
        block_class=per_block[0][0], per_block=() if uniform else per_block, experts=experts,
        linears=linears[first], per_block_linears=() if len(set(linears)) == 1 else linears)


def layer_adapter_params(skeleton: Any, family: Family, lora: Any) -> list[int]:
    """Elements of the LoRA adapters (``lora``: a LoraConfig) of each pipeline layer [embedding, blocks..., head],
    as ``get_peft_model`` makes them on a copy of the meta skeleton (:func:`hybrid_ds.models.lora.find_targets`):
    peft's own rules, which for some Mixture-of-Experts types (mixtral, qwen3_moe) adapt the fused experts and the
    router as parameters."""
    from hybrid_ds.models.lora import find_targets

    return find_targets(skeleton, family, lora).per_layer(family, len(skeleton.get_submodule(family.blocks)))


def block_linears(block: Any) -> tuple[Linear, ...]:
    """The linear layers of one block (``nn.Linear`` and GPT-2's ``Conv1D``: peft's "all-linear" classes)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    found = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            found.append(Linear(name, module.in_features, module.out_features, module.bias is not None))
        elif isinstance(module, Conv1D):  # its weight is (in, out)
            found.append(Linear(name, *module.weight.shape, module.bias is not None))
    return tuple(found)


def model_experts(skeleton: Any, blocks: list[Any]) -> Experts | None:
    """The routed experts of ``blocks`` (the model's blocks, on the meta device); None for a dense model."""
    found = [block_experts(block) for block in blocks]
    count = max((n for n, _, _ in found), default=0)
    if not count:
        return None
    # a model that does not say how many experts a token passes is counted as passing all of them
    top_k = getattr(skeleton.config, "num_experts_per_tok", None) or count
    return Experts(count, top_k, tuple(routed for _, routed, _ in found), tuple(always for _, _, always in found))


def block_experts(block: Any) -> tuple[int, int, int]:
    """(experts, elements of the routed experts, elements of the rest of their MoE layer) of one block.

    The experts module is the one whose class name ends in "Experts" and whose parameters all share a first
    dimension (one row per expert); its parent is the MoE layer. (0, 0, 0) for a block with a dense MLP.
    """
    count = routed = always = 0
    for name, module in block.named_modules():
        rows = {p.shape[0] for p in module.parameters(recurse=False)}
        if not type(module).__name__.endswith("Experts") or len(rows) != 1:
            continue
        count = max(count, rows.pop())
        held = sum(p.numel() for p in module.parameters())
        layer = block.get_submodule(name.rpartition(".")[0])
        routed, always = routed + held, always + sum(p.numel() for p in layer.parameters()) - held
    return count, routed, always


def layer_active_params(skeleton: Any, family: Family, layer_params: list[int]) -> list[int]:
    """Parameters one token uses in each pipeline layer [embedding, blocks..., head] (partition "flops")."""
    experts = model_experts(skeleton, list(skeleton.get_submodule(family.blocks)))
    if experts is None:
        return layer_params
    inactive = [0, *(n - n * experts.top_k // experts.count for n in experts.routed), 0]
    return [n - off for n, off in zip(layer_params, inactive)]


def _tensors(skeleton: Any, paths: tuple[str, ...], strip: str = "") -> tuple[Tensor, ...]:
    """(module path, elements) of every parameter under ``paths`` once; absent optional modules skipped."""
    seen: dict[int, Tensor] = {}
    for path in paths:
        try:
            module = skeleton.get_submodule(path)
        except AttributeError:
            continue
        if module is None:
            continue
        for name, param in module.named_parameters():
            owner = f"{path}.{name}".rpartition(".")[0].removeprefix(strip)
            seen.setdefault(id(param), (owner, param.numel()))
    return tuple(seen.values())
