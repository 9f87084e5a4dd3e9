"""One config file: a DeepSpeed config plus the sections ``model``, ``data``, ``pipeline`` and ``train``.

A run config is a JSON object. DeepSpeed's own top-level keys (``train_micro_batch_size_per_gpu``,
``optimizer``, ``zero_optimization``, ``bf16`` ...) are passed to DeepSpeed unchanged; our sections are
validated strictly here. ``extends`` inherits from another file (paths relative to the file that names
it, merged key by key); ``--set a.b=VALUE`` overrides any key, VALUE read as JSON where it parses.

This package is pure Python: it must never import torch, deepspeed or transformers.

Modules: ``schema`` (the sections and :class:`RunConfig`), ``load`` (files, ``extends``, profiles, ``--set``),
``deepspeed`` (DeepSpeed's own keys and the effective DeepSpeed config of a run), ``checks`` (across sections),
``families`` (the family table), ``presets`` (named architectures), ``shapes`` (a family's tensors, for the
estimator) and ``topology`` (stage boundaries and batch arithmetic).

>>> cfg = load_config_dict({"train_micro_batch_size_per_gpu": 2, "model": {"name": "gpt2-tiny"}})
>>> cfg.pipeline.stages, cfg.micro_batch, cfg.zero_stage
(1, 2, 0)
"""

from hybrid_ds.config.deepspeed import DEEPSPEED_KEYS, KNOWN_TYPES
from hybrid_ds.config.load import apply_override, load_config, load_config_dict
from hybrid_ds.config.schema import (PROFILES, DataConfig, LoraConfig, ModelConfig, PipelineConfig, RunConfig,
                                     TrainConfig, deep_merge)

__all__ = ["DEEPSPEED_KEYS", "KNOWN_TYPES", "PROFILES", "DataConfig", "LoraConfig", "ModelConfig", "PipelineConfig",
           "RunConfig", "TrainConfig", "apply_override", "deep_merge", "load_config", "load_config_dict"]
