"""``hybrid-ds export``: a checkpoint of any layout (and a LoRA run's adapters) as a folder transformers and peft load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from hybrid_ds.config import load_config_dict
from hybrid_ds.errors import UserError
from hybrid_ds.models.build import StageBuilder, checkpoint_folder
from hybrid_ds.models.lora import PEFT_PREFIX, is_adapter, with_peft
from hybrid_ds.models.resolve import auto_class
from hybrid_ds.runtime.checkpoint.files import RUN_CONFIG, STATE, export_folder, resolve_checkpoint
from hybrid_ds.runtime.checkpoint.names import gather_layers
from hybrid_ds.runtime.pipeline import layer_specs
from hybrid_ds.runtime.plan import weights_plan


def export(checkpoint: str | Path, out_dir: str | Path, merge: bool = False) -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer) from a pipeline checkpoint of any layout.

    A LoRA run (``model.lora``) writes peft's adapter folder (``adapter_config.json``, ``adapter_model.safetensors``),
    which ``PeftModel.from_pretrained(base, folder)`` loads; with ``merge`` the model with its adapters merged, a plain
    Hugging Face folder. Both are written by peft itself, from ``get_peft_model`` of the model with the run's weights.
    """
    folder = resolve_checkpoint(checkpoint)
    export_folder("OUT_DIR", Path(out_dir))
    cfg = load_config_dict(json.loads((folder.parent / RUN_CONFIG).read_text()))
    if merge and not cfg.model.lora:
        raise UserError("--merge", f"{folder} is not of a LoRA run (model.lora): its export is the whole model already")
    plan = weights_plan(cfg)
    if not cfg.pipeline_engine:  # the plain HF model: DeepSpeed's own consolidation of ZeRO partitions
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:  # a PipelineModule: per-layer files, named back through the layer specs on the meta device
        builder = StageBuilder(plan.resolved, pretrained=False, device="meta", skeleton=plan.skeleton,
                               lora=cfg.model.lora, lora_targets=plan.lora_targets)
        specs, _ = layer_specs(builder)
        state = gather_layers(folder, specs, builder)
    reread = json.loads((folder / STATE).read_text()).get("without_frozen", False)
    if reread:  # the base as the run read it
        model = auto_class(plan.resolved.family).from_pretrained(
            checkpoint_folder(cfg.model.name, cfg.model.revision), config=plan.resolved.hf_config, dtype=torch.float32)
    else:
        model = auto_class(plan.resolved.family).from_config(plan.resolved.hf_config)
    if cfg.model.lora:
        model = with_peft(model, cfg.model.lora, plan.resolved.family.task, cfg.model.name)
        state = {PEFT_PREFIX + name: value for name, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - \
        {name for name, _ in model.named_parameters()}
    missing = [k for k in missing if k not in tied and (not reread or is_adapter(k))]
    if missing or unexpected:
        raise UserError("CHECKPOINT", f"{folder} does not cover the model: missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}")
    out = Path(out_dir)
    tokenizer = folder.parent / "tokenizer"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer) if tokenizer.is_dir() else None
    if tokenizer is not None:
        with_special_tokens(model, tokenizer)
    if merge:
        model = model.merge_and_unload()
    model.to(next(iter(state.values())).dtype).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def with_special_tokens(model: torch.nn.Module, tokenizer: Any) -> None:
    """The run's tokenizer's bos/eos/pad ids in the model's config and generation config (a model sized by
    ``model.vocab_from_tokenizer`` keeps its preset's ids otherwise, and ``generate()`` never meets its eos).
    An id the tokenizer does not have is left as the config has it."""
    for config in (model.config, getattr(model, "generation_config", None)):
        for key in SPECIAL_TOKENS:
            if config is not None and getattr(tokenizer, key) is not None:
                setattr(config, key, getattr(tokenizer, key))


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
