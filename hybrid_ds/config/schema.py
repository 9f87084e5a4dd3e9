"""The run config's schema: the sections ``model``, ``data``, ``pipeline``, ``train`` and :class:`RunConfig`. Pure Python.

Each setting is documented where it is declared; a bad value is one line naming its JSON path (:func:`section`).
"""

from __future__ import annotations

import copy
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hybrid_ds.config.checks import check_cross_section
from hybrid_ds.config import deepspeed as deepspeed_keys
from hybrid_ds.config.deepspeed import check_deepspeed_keys
from hybrid_ds.errors import UserError, suggest


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Section):
    """LoRA adapters (peft's ``LoraConfig``, same names): the base model frozen, only the adapters trained."""

    r: int = Field(16, ge=1, description="rank of each adapter")
    alpha: float = Field(32, gt=0, description="scaling numerator: updates are scaled by alpha / r "
                                               "(alpha / sqrt(r) with use_rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="modules that get adapters, chosen by peft's get_peft_model on the whole model: "
                                  "a name matches a module whose path ends in it (\"q_proj\"); \"all-linear\" = "
                                  "every linear layer but the output projection (and, as peft does, a Mixture-of-"
                                  "Experts layer's stacked experts); not the embeddings or the output projection")
    use_rslora: bool = Field(False, description="rank-stabilized scaling alpha / sqrt(r)")

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or \"all-linear\"")
        return value


class ModelConfig(_Section):
    # "smollm2-135m": SmolLM2-135M-Instruct of requirements-assets.txt, exported to a folder on first use
    name: str = Field(min_length=1, description="architecture preset (`hybrid-ds presets`), hub name ORG/NAME, local "
                                                "folder, or \"smollm2-135m\" (the offline asset)")
    pretrained: bool = Field(False, description="load the checkpoint's weights; false = the model's own random init")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) when name is a hub name")
    trust_remote_code: bool = Field(False, description="allow a hub model's own Python code; off by default")
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] | None = Field(
        None, description="attention kernel of the HF layers; null: what Hugging Face picks (sdpa where the model "
                          "supports it, eager otherwise). \"flex_attention\" (torch's FlexAttention, GPU only: torch "
                          "has no CPU backward for it) skips the masked-out blocks of packed documents "
                          "(data.document_mask), where sdpa's dense mask rules its flash kernel out")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="HF config fields to change, e.g. {\"n_layer\": 6}")
    vocab_from_tokenizer: bool = Field(False, description="size the vocabulary from the tokenizer, padded to a "
                                                          "multiple of 64 (for models trained from scratch)")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters on the frozen model (fine-tuning); "
                                                       "null = train every weight")

    @field_validator("name")
    @classmethod
    def _offline_asset(cls, value: str) -> str:
        from hybrid_ds.assets import model_folder  # stdlib only until the asset is exported

        return model_folder(value)


class DataConfig(_Section):
    source: str = Field("builtin", description="\"builtin\" (the offline World English Bible), local files "
                                               "(txt/json/jsonl/csv/parquet path or glob), or a hub dataset name")
    source_config: str | None = Field(None, description="hub dataset configuration, e.g. wikitext-103-raw-v1")
    split: str = Field("train", description="split to train on")
    eval_split: str | None = Field(None, description="split to evaluate on; null = hold out eval_fraction")
    eval_fraction: float = Field(0.02, gt=0, lt=1, description="documents held out for evaluation")
    text_column: str = Field("text", description="column holding the documents")
    format: Literal["text", "chat", "prompt_completion"] = Field(
        "text", description="\"text\": documents, every token predicted; \"chat\": rows of messages_column, a "
                            "list of {role, content} (system/user/assistant/tool), rendered with the tokenizer's "
                            "chat_template, only the assistant turns predicted (their content and the template's "
                            "end of turn); \"prompt_completion\": plain text prompt_column + completion_column, "
                            "only the completion and an EOS predicted (TRL's non-conversational convention, no "
                            "template). Causal LMs only. With source \"builtin\": a chat (or prompt/completion) "
                            "set made from the World English Bible: the user quotes a verse and asks its book, "
                            "then the next verse (hybrid_ds.data.chat.builtin_rows)")
    messages_column: str = Field("messages", description="format chat: column holding each row's messages")
    prompt_column: str = Field("prompt", description="format prompt_completion: column holding the prompts")
    completion_column: str = Field("completion", description="format prompt_completion: column holding the "
                                                             "completions")
    tokenizer: str | None = Field(None, description="HF tokenizer name or folder; null = the family's offline "
                                                    "default (GPT-2 BPE, or BERT's WordPiece for masked LMs)")
    seq_len: int = Field(1024, ge=8, description="tokens per training sequence")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="masked LM: share of tokens to predict")
    document_mask: bool | None = Field(
        None, description="causal LM: packed documents do not see each other: positions restart at each document "
                          "(after each EOS), attention stays inside it, and a document's first token is not "
                          "predicted from the one before (what fine-tuning needs; Megatron's reset_position_ids, "
                          "reset_attention_mask, eod_mask_loss); null = on for fine-tuning (model.pretrained true) "
                          "where the model allows it, off when training from scratch; not for masked LMs or "
                          "state-space layers")
    num_proc: int = Field(1, ge=1, description="processes for tokenizing")
    cache_dir: str | None = Field(None, description="packed-data cache; null = ~/.cache/hybrid_ds/data")


class PipelineConfig(_Section):
    stages: int = Field(1, ge=1, description="pipeline stages; data-parallel size = world size / stages")
    partition: str | list[int] = Field(
        "flops",
        description="\"flops\" (balance forward FLOPs: compute), \"parameters\" (balance parameter counts: "
                    "memory, DeepSpeed's default), \"uniform\" (balance layer counts), \"type:REGEX\" (balance "
                    "layers whose class matches), or blocks per stage, e.g. [6, 6]")
    activation_checkpoint_interval: int = Field(0, ge=0, description="recompute every N layers; 0 = off")
    schedule: Literal["1f1b", "zb-h1"] = Field(
        "1f1b", description="\"1f1b\" (DeepSpeed's TrainSchedule) or \"zb-h1\" (zero-bubble: each backward split "
                            "into the input gradient and the weight gradient, which fills the pipeline's idle time; "
                            "hybrid_ds.config.schedule)")
    sequence_parallel: int = Field(
        1, ge=1, description="Ulysses sequence parallelism inside each stage: N ranks share every micro-batch, each "
                             "holding 1/N of every sequence's tokens (attention exchanges them for 1/N of the heads "
                             "over the N ranks); world size = stages x N x data-parallel size. N must divide "
                             "data.seq_len and the attention and key/value heads (hybrid_ds.models.sequence_parallel)")
    pipe_partitioned: bool = Field(True, description="DeepSpeed: split activations sent between stages over TP")
    grad_partitioned: bool = Field(True, description="DeepSpeed: split gradients sent between stages over TP")

    @field_validator("partition")
    @classmethod
    def _known_partition(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, list):
            if any(n < 0 for n in value):
                raise ValueError("block counts must be >= 0")
            return value
        if value.lower().startswith("type:"):
            try:
                re.compile(value[5:])
            except re.error as err:
                raise ValueError(f"bad regular expression {value[5:]!r}: {err}") from None
            return value
        if value not in ("flops", "parameters", "uniform"):
            raise ValueError(f"{value!r} is not a method; valid: 'flops', 'parameters', 'uniform', "
                             "'type:REGEX' or a list of blocks per stage")
        return value


class TrainConfig(_Section):
    max_steps: int = Field(100, ge=1, description="optimizer steps to run")
    seed: int = Field(1234, description="seed of model init, data order and dropout")
    save_dir: str | None = Field(None, description="checkpoint folder; null = no checkpoints")
    save_interval: int = Field(0, ge=0, description="save every N steps (and at the end); 0 = only at the end")
    eval_interval: int = Field(0, ge=0, description="evaluate every N steps; 0 = never")
    eval_batches: int = Field(8, ge=1, description="batches per evaluation")
    resume: bool | Literal["auto"] = Field(False, description="true/\"auto\": continue from the latest checkpoint")
    export_hf: str | None = Field(None, description="write a Hugging Face folder here at the end of the run (with "
                                                     "model.lora: peft's adapter folder)")
    tiled_mlp: int = Field(0, ge=0, description="N > 0: each block's MLP runs on N tiles of the sequence, one after "
                                               "another (DeepSpeed's TiledMLP: its forward under no_grad, recomputed a "
                                               "tile at a time in backward), so its intermediate activations (the "
                                               "ffn-wide ones) exist for one tile at a time, for long sequences where "
                                               "they dominate; costs a second MLP forward; 0 = off")
    selective_checkpoint: Literal["attention", "mlp"] | None = Field(
        None, description="recompute one part of every block in backward (selective activation checkpointing, "
                          "torch.utils.checkpoint): \"attention\" (the attention module) or \"mlp\" (its ffn-wide "
                          "activations); the rest of the block keeps its activations, so memory falls by that part's "
                          "share for one more forward of it. Pipeline engine only; not with "
                          "pipeline.activation_checkpoint_interval (whole layers recomputed) or zb-h1, \"mlp\" not "
                          "with train.tiled_mlp, \"attention\" not with pipeline.sequence_parallel; null = off")
    float8: bool = Field(False, description="train the blocks' linear layers in float8 (torchao's "
                                            "convert_to_float8_training: each matmul's inputs scaled per tensor to "
                                            "e4m3, its output gradient to e5m2; the weights stay in the run's "
                                            "precision): for Hopper GPUs, where float8 matmuls run at twice bf16's "
                                            "rate; layers whose widths are not multiples of 16, the embedding and the "
                                            "output projection stay as they are. Needs torchao (pip install "
                                            "'hybrid_ds[float8]') and a GPU of compute capability 8.9+ (or the CPU); pipeline "
                                            "engine only; not with model.lora or zb-h1")
    fused_loss: bool = Field(True, description="compute the LM loss from the last hidden states a block of rows at "
                                               "a time (hybrid_ds.models.head_loss): no [tokens, vocab] fp32 logits, "
                                               "their log-softmax or gradient; loss and gradients within 1e-5 of "
                                               "Hugging Face's (fp32), not bit for bit. false: Hugging Face's loss on "
                                               "the full logits")
    # 5: one or two overflowing batches are survivable (each is skipped), while a diverged model makes every step
    # non-finite; stopping after 5 wastes at most 5 steps and keeps the last good state.
    # As the Hugging Face Trainer, Megatron-LM and nanoGPT do: decay pulls weights of matrices toward zero; on a
    # norm's gain, a bias or an embedding row it only fights the model (most rows of an embedding see no gradient).
    no_weight_decay: list[Literal["bias", "norm", "embedding"]] = Field(
        ["bias", "norm", "embedding"],
        description="parameters that the optimizer's weight_decay skips (their own parameter group): \"bias\", "
                    "\"norm\" (every other 1-D parameter: norm weights and scales), \"embedding\" (tables of "
                    "nn.Embedding, tied output projection included); [] = decay every parameter")
    max_bad_steps: int = Field(5, ge=1, description="stop (exit 2, with a checkpoint) after this many steps in a row "
                                                    "with a non-finite loss or gradient norm; each is skipped")
    # Off by default: on CPU it does not pay at GPT-2-small size (bench/compile_speed.py), and it costs tens of
    # seconds of compiling at start. hybrid_ds.runtime.compile_blocks says which graphs are made and when.
    compile: bool = Field(False, description="compile each transformer block with torch.compile (regional: identical "
                                             "blocks share one graph; the rotary/mask work stays eager); the compile "
                                             "time is shown in the progress output. Pipeline engine only (not ZeRO-3 "
                                             "or expert parallelism at one stage)")

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_choice(cls, value: Any) -> Any:
        if value not in (True, False, "auto"):  # pydantic would report the bool half of the union only
            raise ValueError('must be true, false or "auto"')
        return value


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "data": DataConfig, "pipeline": PipelineConfig, "train": TrainConfig,
}
_META_KEYS = ("extends", "description", "on_cpu", "on_gpu")
PROFILES = ("cpu", "gpu")



class RunConfig:
    """A validated run config: our four sections, plus DeepSpeed's keys kept as given."""

    def __init__(self, raw: dict[str, Any], source: str = "<dict>"):
        self.source = source
        self.raw = raw
        self.description: str = raw.get("description", "")
        self.model: ModelConfig = section(raw, "model")
        self.data: DataConfig = section(raw, "data")
        self.pipeline: PipelineConfig = section(raw, "pipeline")
        self.train: TrainConfig = section(raw, "train")
        self.deepspeed: dict[str, Any] = {k: v for k, v in raw.items()
                                          if k not in _SECTIONS and k not in _META_KEYS}
        check_deepspeed_keys(self.deepspeed, (*_SECTIONS, *_META_KEYS))
        check_cross_section(self)

    @property
    def micro_batch(self) -> int | None:
        return self.deepspeed.get("train_micro_batch_size_per_gpu")

    @property
    def grad_accum(self) -> int | None:
        return self.deepspeed.get("gradient_accumulation_steps")

    @property
    def train_batch(self) -> int | None:
        return self.deepspeed.get("train_batch_size")

    @property
    def zero_stage(self) -> int:
        return self.deepspeed.get("zero_optimization", {}).get("stage", 0)

    def zero_stage_at(self, dp: int) -> int:
        """The ZeRO stage the engine runs at ``dp`` data-parallel ranks: fp32 ZeRO-1/2 on the pipeline engine
        without optimizer offload runs as ZeRO-0 at dp=1 (:func:`hybrid_ds.config.deepspeed.zero_stage_to_run`)."""
        zero = self.deepspeed.get("zero_optimization", {})
        offload = (zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
                   or zero.get("cpu_offload", False))
        return deepspeed_keys.zero_stage_to_run(self.zero_stage, dp, self.precision, self.pipeline_engine and not offload)

    @property
    def expert_parallel(self) -> bool:
        """Whether DeepSpeed's AutoEP spreads the experts of the MoE layers over ranks (``expert_parallel``)."""
        return self.deepspeed.get("expert_parallel", {}).get("enabled", False) is True

    @property
    def pipeline_engine(self) -> bool:
        """Whether the run trains a PipelineModule on DeepSpeed's PipelineEngine: ZeRO 0-2 with stages > 1,
        ZeRO 0/1 at one stage. ZeRO-2/3 at one stage, and expert parallelism (AutoEP replaces the MoE layers of
        the whole Hugging Face model), train the plain Hugging Face model instead."""
        return self.pipeline.stages > 1 or (self.zero_stage <= 1 and not self.expert_parallel)

    @property
    def grad_accum_dtype(self) -> str | None:
        """The dtype gradients are summed in over micro-batches: ``data_types.grad_accum_dtype`` where given, else
        "fp32" for bf16 with ZeRO-1/2 (DeepSpeed's default, the model dtype, sums them in bf16's 8 significant
        bits; gpt-neox #963), else None: DeepSpeed's default. ZeRO-3 sums its gradient partitions in fp32 anyway,
        and at ZeRO-0 DeepSpeed accepts only the model dtype.

        >>> from hybrid_ds.config import load_config_dict
        >>> cfg = load_config_dict({"model": {"name": "gpt2-tiny"}, "bf16": {"enabled": True},
        ...                         "zero_optimization": {"stage": 1}})
        >>> cfg.grad_accum_dtype
        'fp32'
        """
        given = self.deepspeed.get("data_types", {}).get("grad_accum_dtype")
        if given is not None:
            return str(given).lower()
        return "fp32" if self.precision == "bf16" and self.zero_stage in (1, 2) else None

    @property
    def precision(self) -> str:
        """"bf16", "fp16" or "fp32": the dtype the engine trains in."""
        for name in ("bf16", "fp16"):
            if self.deepspeed.get(name, {}).get("enabled", False):
                return name
        return "fp32"

    def replace(self, *, model: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
                pipeline: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
                **deepspeed: Any) -> RunConfig:
        """A new config with fields changed, validated like a file (``--set`` is for users, this for code).

        Each section argument maps field names to values and is merged into that section; objects merge
        key by key (``model={"overrides": {"vocab_size": 512}}`` keeps the other overrides). Other keyword
        arguments are DeepSpeed's top-level keys, merged the same way.

        >>> from hybrid_ds.config import load_config_dict
        >>> cfg = load_config_dict({"model": {"name": "gpt2-tiny"}, "train_micro_batch_size_per_gpu": 2})
        >>> new = cfg.replace(pipeline={"stages": 2}, bf16={"enabled": True})
        >>> new.pipeline.stages, new.precision, new.micro_batch, cfg.pipeline.stages
        (2, 'bf16', 2, 1)
        """
        sections = {"model": model, "data": data, "pipeline": pipeline, "train": train}
        changes = {**{k: v for k, v in sections.items() if v is not None}, **deepspeed}
        return RunConfig(deep_merge(self.raw, changes), source=self.source)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config (extends and --set applied) as plain JSON data."""
        out: dict[str, Any] = {"description": self.description} if self.description else {}
        for name in _SECTIONS:
            out[name] = getattr(self, name).model_dump()
        out.update(copy.deepcopy(self.deepspeed))
        return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: objects merge key by key, anything else replaces.

    >>> deep_merge({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}})
    {'a': {'x': 1, 'y': 3}}
    """
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ---------------------------------------------------------------- validation


def section(raw: dict[str, Any], name: str) -> Any:
    data = raw.get(name, {})
    if not isinstance(data, dict):
        raise UserError(name, f"must be an object, got {data!r}")
    model_cls = _SECTIONS[name]
    try:
        return model_cls(**data)
    except ValidationError as err:
        # An unknown key often explains a missing one (a misspelt `name`): report it first.
        errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
        raise _user_error(name, model_cls, errors[0]) from None


def _user_error(section: str, model_cls: type[_Section], error: dict[str, Any]) -> UserError:
    loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
    # pydantic reports union members (`str`, `list[int]`) as loc parts: keep only real field names.
    fields = [p for p in loc if p in model_cls.model_fields] or loc[:1]
    key = ".".join([section, *fields]) if fields else section
    if error["type"] == "extra_forbidden":
        return UserError(key, f"unknown key; {suggest(loc[-1], model_cls.model_fields)}")
    if error["type"] == "missing":
        return UserError(key, f"required; {model_cls.model_fields[fields[-1]].description}")
    message = error["msg"].removeprefix("Value error, ")
    return UserError(key, f"{message}, got {error['input']!r}")
