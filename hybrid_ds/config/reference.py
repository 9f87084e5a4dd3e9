"""``docs/config.md``: every key of a run config, generated from the schema (type, default and meaning as declared in
:mod:`hybrid_ds.config.schema`) and from what :mod:`hybrid_ds.config.deepspeed` does with DeepSpeed's keys. Pure Python.

``python -m hybrid_ds.config.reference > docs/config.md`` writes it; ``tests/test_config.py`` checks that the file is
what this module makes, so a key added to the schema without regenerating fails the suite.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic_core import PydanticUndefined

from hybrid_ds.config.deepspeed import DEEPSPEED_KEYS, SCHEDULE_LENGTH
from hybrid_ds.config.schema import _SECTIONS, LoraConfig

SECTION_INTRO = {
    "model": "Which model, from where, and what to train of it.",
    "data": "What to train on and how it is tokenized and packed into sequences.",
    "pipeline": "How the model is split into pipeline stages (the data-parallel size is world size / stages).",
    "train": "The loop: steps, evaluation, checkpoints, resume, export.",
}
OUR_TOP_LEVEL = {
    "description": "free text: what the run is and the cluster it fits (`plan` reads \"N x GPU-MEM\" from it)",
    "extends": "a config file (relative to this one) to inherit; this file's keys override it key by key",
    "on_cpu": "keys merged in when the run is on a machine without a GPU (`validate --profile cpu` shows it)",
    "on_gpu": "keys merged in when the run is on a GPU machine (`validate --profile gpu`)",
}

# DeepSpeed's keys that hybrid_ds reads, checks or sets, and what it does with each; every other DeepSpeed key is
# handed to DeepSpeed unchanged.
DEEPSPEED_HANDLED = {
    "train_batch_size": "checked against micro x accumulation x dp; derived when left out, as DeepSpeed does",
    "train_micro_batch_size_per_gpu": "sequences per micro-batch per rank; derived when left out",
    "gradient_accumulation_steps": "micro-batches per optimizer step (the pipeline's micro-batches); derived when "
                                   "left out. Below 4 x `pipeline.stages` is a bubble warning",
    "optimizer": "`type` must be one DeepSpeed builds; `params` are checked against that class's signature. On "
                 "CPU, Adam/AdamW is torch's fused AdamW (`torch_adam`, `fused`)",
    "scheduler": "`type` must be one DeepSpeed builds; its length (" + ", ".join(
        f"{name} `{key}`" for name, key in SCHEDULE_LENGTH.items()) + ") is `train.max_steps` unless set (then a "
                 "differing one is a warning)",
    "gradient_clipping": "0 (no clipping) unless set; DeepSpeed's own default is 1.0",
    "zero_optimization": "DeepSpeed's ZeRO section, checked by its model. `stage` 0-2 with any `pipeline.stages`, 3 "
                         "with one stage; fp32 ZeRO-1/2 at dp=1 runs as ZeRO-0; reduce and all-gather buckets sized "
                         "to the largest stage unless set",
    "bf16": "`enabled`: bf16 training (`validate` says the precision); with ZeRO-1/2 gradients are summed in fp32 "
            "unless `data_types.grad_accum_dtype` says otherwise",
    "fp16": "`enabled`: fp16 with loss scaling; not with ZeRO-2 at more than one stage",
    "data_types": "`grad_accum_dtype`: fp32 by default for bf16 with ZeRO-1/2 (DeepSpeed's default is the model dtype)",
    "steps_per_print": "progress: one plain line every N steps when there is no terminal",
    "pipeline": "set by hybrid_ds from `pipeline.*` (do not set it here)",
    "expert_parallel": "DeepSpeed's AutoEP (`enabled`, `autoep_size`); needs `pipeline.stages` 1",
    "tensorboard": "DeepSpeed's monitor; needs the `tensorboard` extra",
    "wandb": "DeepSpeed's monitor; needs the `wandb` extra",
    "comet": "DeepSpeed's monitor; needs the `comet` extra",
    "csv_monitor": "DeepSpeed's CSV monitor (no extra needed)",
}


def _type_name(annotation: Any) -> str:
    """A field's type in JSON's words: ``str or null``, ``"sdpa" or "eager" or null``, ``list[int]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is typing.Literal:
        return " or ".join(json.dumps(arg) for arg in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    if annotation is type(None):
        return "null"
    return "any" if annotation is Any else getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return f"`{json.dumps(field.default_factory())}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{json.dumps(field.default)}`"


def _table(prefix: str, model: Any) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{prefix}.{name}` | {_type_name(field.annotation)} | {_default(field)} | {meaning} |")
    return lines


def reference_markdown() -> str:
    lines = ["# Config reference", "",
             "Generated by `python -m hybrid_ds.config.reference > docs/config.md` from the schema "
             "(`hybrid_ds/config/schema.py`); `tests/test_config.py` checks that it is current. A run config is a "
             "JSON file (`//` and `/* */` comments allowed): a DeepSpeed config plus the sections below. `--set "
             "a.b=VALUE` overrides any key.", "", "## Top level", "", "| key | meaning |", "|---|---|"]
    lines += [f"| `{key}` | {meaning} |" for key, meaning in OUR_TOP_LEVEL.items()]
    for name, model in _SECTIONS.items():
        lines += ["", f"## `{name}`", "", SECTION_INTRO[name], ""]
        lines += _table(name, model)
        if name == "model":
            lines += ["", "### `model.lora`", "", LoraConfig.__doc__.strip(), ""] + _table("model.lora", LoraConfig)
    lines += ["", "## DeepSpeed's keys", "",
              "What hybrid_ds reads, checks or sets; DeepSpeed's sections are also checked by DeepSpeed's own config "
              "models at `validate` and at the start of a run.", "", "| key | what hybrid_ds does with it |",
              "|---|---|"]
    lines += [f"| `{key}` | {meaning} |" for key, meaning in DEEPSPEED_HANDLED.items()]
    others = sorted(DEEPSPEED_KEYS - set(DEEPSPEED_HANDLED))
    lines += ["", "Handed to DeepSpeed unchanged (see DeepSpeed's config documentation): "
              + ", ".join(f"`{key}`" for key in others) + ". Any other top-level key is rejected with a suggestion.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
