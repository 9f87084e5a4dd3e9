"""Every bad input tried, and the exact one line each gets (stderr ``hybrid-ds: error: ...``, exit code 2).

One row per input: a short id, how the input is given, and the line. How it is given:
- ``("config", {changes}, *flags)``: ``hybrid-ds validate`` of TINY with top-level keys replaced (None deletes),
  or a string: the file's whole text;
- ``("cli", *argv)``: ``hybrid-ds`` in this process; ``{tmp}`` is the test's folder (files from ``make_files``);
- ``("data", {DataConfig fields})``: loading and packing the data, as the first rank of a run does;
- ``("run", {changes}, *argv)``: ``python -m hybrid_ds.cli ARGV`` on a trained tiny run's config (``{run}``),
  one process of its own (forked from tests/warm_ranks.py's warm process), no launcher; ``changes`` are ``--set``
  pairs;
- ``("launch", {changes}, *flags)``: launch/train.py through the deepspeed launcher, 2 processes (multiproc);
- ``("see", "file::test")``: checked by that test (a sequence of runs); the row keeps its line in this table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import warm_ranks

from hybrid_ds.cli import main
from hybrid_ds.config import DataConfig
from hybrid_ds.errors import UserError
from test_config import TINY, with_  # the config rows change TINY: gpt2-tiny at 2 stages

ROOT = Path(__file__).resolve().parents[1]
E = "hybrid-ds: error: "

P2 = {"stages": 2}

ROWS = [
    # ---- config: keys, types, numbers (moved from test_config.py)
    ("unknown-top-level", ("config", {"train_micro_batch_size_per_gpuu": 2}),
     E + "train_micro_batch_size_per_gpuu: unknown top-level key; did you mean 'train_micro_batch_size_per_gpu' or "
         "'train_batch_size'?"),
    ("unknown-model-key", ("config", {"model": {"nmae": "gpt2-tiny"}}),
     E + "model.nmae: unknown key; did you mean 'name'?"),
    ("missing-model-name", ("config", {"model": {"pretrained": False}}),
     E + "model.name: required; architecture preset (`hybrid-ds presets`), hub name ORG/NAME, local folder, "
         "or \"smollm2-135m\" (the offline asset)"),
    ("stages-not-int", ("config", {"pipeline": {"stages": "two"}}),
     E + "pipeline.stages: Input should be a valid integer, unable to parse string as an integer, got 'two'"),
    ("stages-zero", ("config", {"pipeline": {"stages": 0}}),
     E + "pipeline.stages: Input should be greater than or equal to 1, got 0"),
    ("partition-unknown", ("config", {"pipeline": {**P2, "partition": "balanced"}}),
     E + "pipeline.partition: 'balanced' is not a method; valid: 'flops', 'parameters', 'uniform', 'type:REGEX' "
         "or a list of blocks per stage, got 'balanced'"),
    ("partition-bad-regex", ("config", {"pipeline": {**P2, "partition": "type:(Block"}}),
     E + "pipeline.partition: bad regular expression '(Block': missing ), unterminated subpattern at position 0, "
         "got 'type:(Block'"),
    ("partition-list-length", ("config", {"pipeline": {**P2, "partition": [1, 1, 0]}}),
     E + "pipeline.partition: [1, 1, 0] names 3 stages but pipeline.stages is 2"),
    ("partition-list-sum", ("config", {"pipeline": {**P2, "partition": [1, 2]}}),
     E + "pipeline.partition: [1, 2] places 3 blocks; the model has 2"),
    ("partition-type-no-match", ("config", {"pipeline": {**P2, "partition": "type:Nothing"}}),
     E + "pipeline.partition: 'type:Nothing' matches none of the layer classes ['Embedding', 'GPT2Block', 'Head']"),
    ("zero3-with-pipeline", ("config", {"zero_optimization": {"stage": 3}}),
     E + "zero_optimization.stage: ZeRO stage 3 cannot be combined with pipeline.stages=2 (parameters partitioned "
         "over data parallel inside a pipeline stage are not supported); use zero_optimization.stage 0, 1 or 2 "
         "with stages > 1, or pipeline.stages=1 for ZeRO-3"),
    ("zero-stage-7", ("config", {"zero_optimization": {"stage": 7}}),
     E + "zero_optimization.stage: must be 0, 1, 2 or 3, got 7"),
    ("fp16-zero2-with-pipeline", ("config", {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}),
     E + "fp16.enabled: fp16 (dynamic loss scaling) is not supported with ZeRO-2 and pipeline.stages=2: hybrid_ds "
         "runs that layout in fp32 or bf16; use bf16.enabled, or zero_optimization.stage 0 or 1 for fp16"),
    ("bf16-no-overflow-check", ("config", {"bf16": {"enabled": True, "check_grad_overflow": False}}),
     E + "bf16.check_grad_overflow: False turns off DeepSpeed's check for non-finite gradients, and a step with a NaN "
         "gradient would then write NaN into every parameter unseen (train.max_bad_steps relies on it); leave it out "
         "(true is the default)"),
    ("zero-no-grad-norm", ("config", {"zero_optimization": {"stage": 1, "compute_grad_norm": False}}),
     E + "zero_optimization.compute_grad_norm: False turns off DeepSpeed's check for non-finite gradients, and a step "
         "with a NaN gradient would then write NaN into every parameter unseen (train.max_bad_steps relies on it); "
         "leave it out (true is the default)"),
    ("allgather-bucket-odd", ("config", {"zero_optimization": {"stage": 1, "allgather_bucket_size": 1001}}),
     E + "zero_optimization.allgather_bucket_size: must be an even number of elements >= 2 (DeepSpeed asserts it), "
         "got 1001"),
    ("muon-zero2-with-pipeline", ("config", {"zero_optimization": {"stage": 2},
                                             "optimizer": {"type": "Muon", "params": {"lr": 1e-3}}}),
     E + "optimizer.type: 'Muon' is not supported with ZeRO-2 and pipeline.stages=2: Muon updates whole matrices while "
         "each rank of that layout holds a flat slice of its stage's gradients; use zero_optimization.stage 0 or 1 "
         "with Muon, or another optimizer"),
    ("fp16-and-bf16", ("config", {"fp16": {"enabled": True}, "bf16": {"enabled": True}}),
     E + "bf16.enabled: fp16 and bf16 are both enabled; enable one of them"),
    ("negative-micro-batch", ("config", {"train_micro_batch_size_per_gpu": -1}),
     E + "train_micro_batch_size_per_gpu: must be a positive integer, got -1"),
    ("inconsistent-batch", ("config", {"train_batch_size": 100}),
     E + "train_batch_size: 100 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 8 x data-parallel "
         "size 1 = 16; fix one of them or drop train_batch_size to derive it"),
    ("no-batch-size", ("config", {"train_micro_batch_size_per_gpu": None}),
     E + "train_micro_batch_size_per_gpu: not set; set it (or train_batch_size)"),
    ("stages-over-layers", ("config", {"pipeline": {"stages": 8}}),
     E + "pipeline.stages: 8 stages need at least 8 layers; the model has 2"),
    ("unknown-model", ("config", {"model": {"name": "gpt5-tiny"}}),
     E + "model.name: 'gpt5-tiny' is not a local folder and the Hugging Face cache ({hf_cache}) holds no model config of it; HF_HUB_OFFLINE is "
         "set; download it where there is a network (runs then read the cache), or name a local folder; "
         "HF_HUB_OFFLINE=1 skips asking the hub; presets: did you mean 'gpt2-tiny' or 'opt-tiny' or "
         "'gpt-neox-tiny'?"),
    ("unknown-override", ("config", {"model": {"name": "gpt2-tiny", "overrides": {"n_layers": 4}}}),
     E + "model.overrides.n_layers: not a field of GPT2Config; did you mean 'n_layer' or 'num_hidden_layers'?"),
    ("seq-len-over-positions", ("config", {"data": {"seq_len": 100000}}),
     E + "data.seq_len: 100000 exceeds the model's 128 positions (max_position_embeddings); use at most 128"),
    ("clipping-not-number", ("config", {"gradient_clipping": "big"}),
     E + "gradient_clipping: must be a number >= 0 (0 = off), got 'big'"),
    ("resume-bad", ("config", {"train": {"resume": "sometimes"}}),
     E + "train.resume: must be true, false or \"auto\", got 'sometimes'"),
    ("pretrained-not-cached", ("config", {"model": {"name": "gpt2-tiny", "pretrained": True}}),
     E + "model.name: 'gpt2-tiny' is not a local folder and the Hugging Face cache ({hf_cache}) holds no model config of it; HF_HUB_OFFLINE is "
         "set; download it where there is a network (runs then read the cache), or name a local folder; "
         "HF_HUB_OFFLINE=1 skips asking the hub; 'gpt2-tiny' is also an architecture preset, which has no "
         "weights: set model.pretrained false to train it from its random init"),
    ("section-not-object", ("config", {"pipeline": 2}), E + "pipeline: must be an object, got 2"),
    ("max-steps-zero", ("config", {"train": {"max_steps": 0}}),
     E + "train.max_steps: Input should be greater than or equal to 1, got 0"),
    ("bad-json", ("config", '{\n  "model": {"name": "gpt2-tiny"},\n  "pipeline": {"stages": 2,}\n}'),
     E + "{tmp}/run.json: invalid JSON at line 3, column 28: Expecting property name enclosed in double quotes"),
    ("not-an-object", ("config", "[1, 2]"), E + "{tmp}/run.json: a config must be a JSON object, got list"),
    # ---- config: new
    ("max-steps-negative", ("config", {"train": {"max_steps": -5}}),
     E + "train.max_steps: Input should be greater than or equal to 1, got -5"),
    ("max-steps-fraction", ("config", {"train": {"max_steps": 2.5}}),
     E + "train.max_steps: Input should be a valid integer, got a number with a fractional part, got 2.5"),
    ("unknown-train-key", ("config", {"train": {"max_step": 3}}),
     E + "train.max_step: unknown key; did you mean 'max_steps' or 'max_bad_steps'?"),
    ("eval-fraction-one", ("config", {"data": {"eval_fraction": 1.0}}),
     E + "data.eval_fraction: Input should be less than 1, got 1.0"),
    ("attention-kernel", ("config", {"model": {"name": "gpt2-tiny", "attn_implementation": "flash_attention_2"}}),
     E + "model.attn_implementation: Input should be 'sdpa', 'eager' or 'flex_attention', got 'flash_attention_2'"),
    ("model-name-empty", ("config", {"model": {"name": ""}}),
     E + "model.name: String should have at least 1 character, got ''"),
    ("model-name-a-file", ("config", {"model": {"name": "{tmp}/notes.txt"}}),
     E + "model.name: '{tmp}/notes.txt': no such folder"),
    ("override-wrong-type", ("config", {"model": {"name": "gpt2-tiny", "overrides": {"n_layer": "two"}}}),
     E + "model.overrides: {'n_layer': 'two'}: transformers cannot build a gpt2 model with it: "
         "StrictDataclassFieldValidationError: Validation error for field 'n_layer': TypeError: Field 'n_layer' "
         "expected int, got str (value: 'two')"),
    ("override-zero-heads", ("config", {"model": {"name": "gpt2-tiny", "overrides": {"n_head": 0}}}),
     E + "model.overrides: {'n_head': 0}: transformers cannot build a gpt2 model with it: ZeroDivisionError: "
         "integer division or modulo by zero"),
    ("override-heads-do-not-divide", ("config", {"model": {"name": "gpt2-tiny", "overrides": {"n_head": 7}}}),
     E + "model.overrides: {'n_head': 7}: transformers cannot build a gpt2 model with it: ValueError: `embed_dim` "
         "must be divisible by num_heads (got `embed_dim`: 64 and `num_heads`: 7)."),
    ("optimizer-a-string", ("config", {"optimizer": "adam"}), E + "optimizer: must be an object, got 'adam'"),
    ("optimizer-typo", ("config", {"optimizer": {"type": "Adamm", "params": {"lr": 1e-3}}}),
     E + "optimizer.type: DeepSpeed builds no optimizer named 'Adamm'; did you mean 'Adam' or 'RAdam' or 'NAdam'?"),
    ("optimizer-negative-lr", ("config", {"optimizer": {"type": "AdamW", "params": {"lr": -1}}}),
     E + "optimizer.params.lr: must be a number >= 0, got -1"),
    ("scheduler-typo", ("config", {"scheduler": {"type": "Cosine"}}),
     E + "scheduler.type: DeepSpeed builds no scheduler named 'Cosine'; did you mean 'WarmupCosineLR'?"),
    # ---- DeepSpeed's own sections, by its config models and the optimizer/scheduler it builds (CPU: torch's AdamW)
    ("deepspeed-key-typo", ("config", {"zero_optimization": {"stag": 1}}),
     E + "zero_optimization.stag: DeepSpeed's zero_optimization section takes no key 'stag'; did you mean 'stage'?"),
    ("deepspeed-nested-key-typo", ("config", {"zero_optimization": {"stage": 1, "offload_optimizer": {"devic": "cpu"}}}),
     E + "zero_optimization.offload_optimizer.devic: DeepSpeed's zero_optimization section takes no key 'devic'; "
         "did you mean 'device'?"),
    ("deepspeed-monitor-key-typo", ("config", {"tensorboard": {"enabled": True, "output_pth": "tb"}}),
     E + "tensorboard.output_pth: DeepSpeed's tensorboard section takes no key 'output_pth'; did you mean "
         "'output_path'?"),
    ("deepspeed-bad-value", ("config", {"fp16": {"enabled": True, "loss_scale_window": "often"}}),
     E + "fp16.loss_scale_window: must be an integer, got 'often'"),
    ("monitor-package-missing", ("config", {"tensorboard": {"enabled": True, "output_path": "tb"}}),
     E + "tensorboard.enabled: DeepSpeed's tensorboard monitor needs the tensorboard package, which is not installed: "
         "pip install 'hybrid_ds[tensorboard]' (or tensorboard), or leave the section out"),
    ("optimizer-param-typo", ("config", {"optimizer": {"type": "AdamW", "params": {"lrr": 1e-3}}}),
     E + "optimizer.params.lrr: AdamW takes no parameter 'lrr'; did you mean 'lr'?"),
    ("optimizer-param-value", ("config", {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [1.5, 0.9]}}}),
     E + "optimizer.params: AdamW refuses them: Invalid beta parameter at index 0: 1.5"),
    ("optimizer-max-grad-norm", ("config", {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "max_grad_norm": 1}}}),
     E + "optimizer.params.max_grad_norm: DeepSpeed clips by the top-level gradient_clipping instead: move the value "
         "there"),
    ("scheduler-param-typo", ("config", {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_stepz": 3}}}),
     E + "scheduler.params.warmup_num_stepz: WarmupLR takes no parameter 'warmup_num_stepz'; did you mean "
         "'warmup_num_steps' or 'warmup_type' or 'warmup_min_lr'?"),
    ("scheduler-param-missing", ("config", {"scheduler": {"type": "StepLR", "params": {"gamma": 0.5}}}),
     E + "scheduler.params: StepLR needs step_size, which scheduler.params does not set"),
    ("partition-negative", ("config", {"pipeline": {**P2, "partition": [-1, 3]}}),
     E + "pipeline.partition: block counts must be >= 0, got [-1, 3]"),
    ("export-without-save-dir", ("config", {"train": {"export_hf": "hf"}}),
     E + "train.export_hf: 'hf' needs train.save_dir: the export is written from the run's last checkpoint"),
    ("config-is-a-folder", ("cli", "validate", "{tmp}"), E + "{tmp}: config file not found"),
    ("config-empty-file", ("cli", "validate", "{tmp}/empty.json"),
     E + "{tmp}/empty.json: invalid JSON at line 1, column 1: Expecting value"),
    # ---- command line (moved from test_config.py, then new)
    ("set-without-value", ("config", {}, "--set", "pipeline.stages"),
     E + "--set: expected KEY.PATH=VALUE, got 'pipeline.stages'"),
    ("set-into-a-number", ("config", {}, "--set", "pipeline.stages.x=2"),
     E + "--set: pipeline.stages.x: pipeline.stages is 2, not an object"),
    ("extends-missing", ("config", {"extends": "nope.json"}), E + "extends: 'nope.json' (named in {tmp}/run.json) not found"),
    ("extends-cycle", ("cli", "validate", "{tmp}/a.json"), E + "extends: cycle: a.json -> b.json -> a.json"),
    ("config-missing", ("cli", "validate", "{tmp}/missing.json"), E + "{tmp}/missing.json: config file not found"),
    ("unsupported-model-type", ("config", {"model": {"name": "{tmp}/t5"}}),
     E + "model.name: model_type 't5' is not supported: it has no named family and the generic decoder-only adapter "
         "cannot map it: it is an encoder-decoder model, not decoder-only; named families: bert, gemma, gpt2, "
         "gpt_neox, llama, mistral, opt, phi, qwen2; to add one, add a Family entry in hybrid_ds/config/families.py and a "
         "parity test"),
    ("no-command", ("cli",), E + "the following arguments are required: command; see hybrid-ds --help"),
    ("unknown-flag", ("config", {}, "--wrld-size", "2"), E + "unrecognized arguments: --wrld-size 2; see hybrid-ds --help"),
    ("no-config", ("cli", "validate"), E + "--config: no config given; e.g. configs/gpt.json"),
    ("export-no-out-dir", ("cli", "export", "{tmp}"),
     E + "the following arguments are required: out_dir; see hybrid-ds export --help"),
    ("parity-stages-zero", ("cli", "parity", "gpt2-tiny", "--stages", "0"),
     E + "--stages: must be >= 1, got 0; see hybrid-ds parity --help"),
    ("compare-unknown-model", ("cli", "compare", "gpt9"),
     E + "gpt9: model.name: 'gpt9' is not a local folder and the Hugging Face cache ({hf_cache}) holds no model config of it; HF_HUB_OFFLINE is "
         "set; download it where there is a network (runs then read the cache), or name a local folder; "
         "HF_HUB_OFFLINE=1 skips asking the hub; presets: did you mean 'gpt2'?"),
    ("compare-zero-gpus", ("cli", "compare", "gpt2-tiny", "--gpus", "0"),
     E + "--gpus: must be >= 1, got 0; see hybrid-ds compare --help"),
    ("compare-efficiency-over-1", ("cli", "compare", "gpt2-tiny", "--efficiency", "2"),
     E + "--efficiency: must be in (0, 1], got 2; see hybrid-ds compare --help"),
    ("compare-zero-nodes", ("cli", "compare", "gpt2-tiny", "--gpus", "8", "--nodes", "0"),
     E + "--nodes: must be >= 1, got 0; see hybrid-ds compare --help"),
    ("plot-not-a-run", ("cli", "plot", "{tmp}/docs"),
     E + "RUN_DIR: {tmp}/docs has no summary.json (a run writes it at its end, or when stopped)"),
    ("compare-unknown-gpu", ("cli", "compare", "gpt2-tiny", "--gpu", "h300"),
     E + "--gpu: unknown GPU 'h300'; did you mean 'h200' or 'h100'?"),
    ("plan-zero-batch", ("cli", "plan", "gpt2-tiny", "--gpus", "8", "--global-batch", "0"),
     E + "--global-batch: must be >= 1, got 0; see hybrid-ds plan --help"),
    ("plan-negative-seq-len", ("cli", "plan", "gpt2-tiny", "--gpus", "8", "--seq-len", "-1"),
     E + "--seq-len: must be >= 8, got -1; see hybrid-ds plan --help"),
    # ---- world size
    ("world-size-3-for-2-stages", ("config", {}, "--world-size", "3"),
     E + "pipeline.stages: world size 3 is not divisible by 2 stages; valid stages: [1]"),
    ("world-size-zero", ("config", {}, "--world-size", "0"),
     E + "--world-size: must be >= 1, got 0; see hybrid-ds validate --help"),
    ("world-size-not-a-number", ("config", {}, "--world-size", "two"),
     E + "--world-size: expected an integer >= 1, got 'two'; see hybrid-ds validate --help"),
    ("two-stages-without-launcher", ("run", {"pipeline.stages": 2}, "train", "{run}"),
     E + "pipeline.stages: world size 1 is not divisible by 2 stages; valid stages: [1]; 2 stages need 2 processes "
         "(or a multiple): launch with `deepspeed --num_gpus 2 ...` (on a machine without GPUs DeepSpeed's launcher "
         "starts one process unless told)"),
    # ---- data (moved from test_data.py, then new)
    ("data-missing-file", ("data", {"source": "missing/corpus.txt"}),
     E + "data.source: 'missing/corpus.txt': no such file or no files match"),
    ("data-blank-lines", ("data", {"source": "{tmp}/blank.txt"}), E + "data.source: '{tmp}/blank.txt' has no documents"),
    ("data-too-short", ("data", {"source": "{tmp}/short.txt", "seq_len": 4096}),
     E + "data.source: '{tmp}/short.txt' gives the training split 5 tokens in 1 document(s), fewer than one block of "
         "data.seq_len=4096; training and evaluation (data.eval_fraction=0.5 of the documents, at least one) need "
         "4096 tokens each: add text or lower data.seq_len"),
    ("data-one-document", ("data", {"source": "{tmp}/one.txt", "seq_len": 8}),
     E + "data.source: '{tmp}/one.txt' gives the evaluation split 0 tokens in 0 document(s), fewer than one block of "
         "data.seq_len=8; training and evaluation (data.eval_fraction=0.5 of the documents, at least one) need 8 "
         "tokens each: add text or lower data.seq_len"),
    ("data-no-text-column", ("data", {"source": "{tmp}/other.jsonl"}),
     E + "data.text_column: 'text' is not a column; columns: ['body']"),
    ("data-tokenizer-folder-empty", ("data", {"tokenizer": "{tmp}/no-tokenizer"}),
     E + "data.tokenizer: '{tmp}/no-tokenizer' is a folder without a tokenizer (none of tokenizer.json, "
         "tokenizer_config.json, vocab.json, vocab.txt, tokenizer.model)"),
    ("data-empty-file", ("data", {"source": "{tmp}/zero.txt"}),
     E + "data.source: '{tmp}/zero.txt' has no documents: 1 empty file(s)"),
    ("data-not-utf8", ("data", {"source": "{tmp}/binary.txt"}),
     E + "data.source: cannot read {tmp}/binary.txt as text: UnicodeDecodeError: 'utf-8' codec can't decode byte "
         "0xff in position 0: invalid start byte"),
    ("data-broken-jsonl", ("data", {"source": "{tmp}/broken.jsonl"}),
     E + "data.source: cannot read {tmp}/broken.jsonl as json: ArrowInvalid: JSON parse error: Invalid value. in row 0"),
    ("data-numbers-not-text", ("data", {"source": "{tmp}/numbers.jsonl"}),
     E + "data.text_column: 'text' holds int64 values, not text"),
    ("data-folder-of-no-text", ("data", {"source": "{tmp}/docs"}),
     E + "data.source: '{tmp}/docs': the folder holds no .txt/.json/.jsonl/.csv/.parquet files"),
    ("data-mixed-formats", ("data", {"source": "{tmp}/mixed/*"}),
     E + "data.source: files must share one format of ['.csv', '.json', '.jsonl', '.parquet', '.txt']; "
         "got ['.csv', '.txt']"),
    ("data-too-little-at-launch", ("launch", {"data.source": "{tmp}/one.txt"}),
     E + "data.source: '{tmp}/one.txt' gives the training split 11 tokens in 1 document(s), fewer than one block of "
         "data.seq_len=32; training and evaluation (data.eval_fraction=0.02 of the documents, at least one) need 32 "
         "tokens each: add text or lower data.seq_len"),
    ("data-chat-without-template", ("data", {"source": "{tmp}/chat.jsonl", "format": "chat"}),
     E + "data.tokenizer: the offline default tokenizer has no chat_template to render data.format \"chat\"; use a "
         "tokenizer that has one (an instruct model's) or data.format \"prompt_completion\""),
    ("data-chat-no-messages-column", ("data", {"source": "{tmp}/chat.jsonl", "format": "chat",
                                               "messages_column": "conversations"}),
     E + "data.messages_column: 'conversations' is not a column of '{tmp}/chat.jsonl'; columns: ['messages']"),
    ("data-completion-missing", ("data", {"source": "{tmp}/pairs.jsonl", "format": "prompt_completion"}),
     E + "data.source: row 3 of {tmp}/pairs.jsonl: completion is missing"),
    ("data-chat-bad-row", ("see", "test_chat_data.py::test_bad_chat_rows_are_one_line_naming_row_and_key"),
     E + "data.source: row 3 of {tmp}/chat.jsonl: messages[0].role 'usr' is not a role; did you mean 'user'?"),
    ("data-format-masked-lm", ("config", {"model": {"name": "bert-tiny"}, "data": {"seq_len": 64, "format": "chat"}}),
     E + "data.format: 'chat' labels answers for a causal LM; bert is a masked LM: use \"text\""),
    # ---- checkpoints and output folders
    ("export-not-a-run", ("cli", "export", "{tmp}/docs", "{tmp}/out"),
     E + "CHECKPOINT: {tmp}/docs is neither a train.save_dir with a 'latest' checkpoint nor a checkpoint folder "
         "inside one"),
    ("export-a-run-subfolder", ("run", {}, "export", "{save_dir}/tokenizer", "{tmp}/out"),
     E + "CHECKPOINT: checkpoint {save_dir}/tokenizer is missing or incomplete (no COMPLETE marker); name a "
         "train.save_dir or one of its step_N folders"),
    ("export-into-a-file", ("run", {}, "export", "{save_dir}", "{tmp}/notes.txt"),
     E + "OUT_DIR: {tmp}/notes.txt is a file, not a folder"),
    ("export-under-a-file", ("run", {}, "export", "{save_dir}", "{tmp}/notes.txt/hf"),
     E + "OUT_DIR: cannot create the folder {tmp}/notes.txt/hf: Not a directory"),
    ("export-into-other-files", ("run", {}, "export", "{save_dir}", "{tmp}/docs"),
     E + "OUT_DIR: {tmp}/docs is a folder of other files (no config.json or adapter_config.json of an earlier "
         "export); export into a new or empty folder"),
    ("save-dir-a-file", ("run", {"train.save_dir": "{tmp}/notes.txt"}, "train", "{run}"),
     E + "train.save_dir: {tmp}/notes.txt is a file, not a folder"),
    ("export-hf-into-other-files", ("run", {"train.export_hf": "{tmp}/docs"}, "train", "{run}"),
     E + "train.export_hf: {tmp}/docs is a folder of other files (no config.json or adapter_config.json of an "
         "earlier export); export into a new or empty folder"),
    ("port-in-use", ("see", "test_bad_inputs.py::test_a_port_in_use_is_one_line"),
     E + "MASTER_PORT: port {port} on 127.0.0.1 is in use (another run, or one that has not exited yet): launch with "
         "deepspeed --master_port PORT, a free one (or set MASTER_PORT)"),
    ("deepspeed-key-typo-at-start", ("run", {"zero_optimization.stag": 1}, "train", "{run}"),
     E + "zero_optimization.stag: DeepSpeed's zero_optimization section takes no key 'stag'; did you mean 'stage'?"),
    ("fresh-run-into-checkpoints", ("run", {}, "train", "{run}"),
     E + "train.resume: false, but {save_dir} already holds checkpoints (latest step_1) that this run would "
         "overwrite; continue them with --resume (or train.resume \"auto\"), or start over in a new train.save_dir "
         "(or after removing that one)"),
    ("resume-another-model", ("run", {"model.name": "llama-tiny", "train.max_steps": 2}, "train", "{run}", "--resume"),
     E + "train.resume: {save_dir} holds checkpoints of model {'name': 'gpt2-tiny', 'overrides': {'vocab_size': "
         "50304}}, this run's model is {'name': 'llama-tiny', 'overrides': {'vocab_size': 50304}}; resume with that "
         "model.name and model.overrides, or start in another train.save_dir"),
    ("resume-without-checkpoint", ("see", "test_train_multiproc.py::test_missing_and_corrupt_checkpoints_are_one_clear_line"),
     E + "train.resume: true, but {save_dir} has no checkpoint; use \"auto\" to start fresh"),
    ("resume-corrupt-layer-file", ("see", "test_train_multiproc.py::test_missing_and_corrupt_checkpoints_are_one_clear_line"),
     E + "train.resume: checkpoint {save_dir}/step_2 cannot be loaded: ..."),
    ("resume-incomplete-checkpoint", ("see", "test_train_multiproc.py::test_missing_and_corrupt_checkpoints_are_one_clear_line"),
     E + "train.resume: checkpoint {save_dir}/step_2 is missing or incomplete (no COMPLETE marker); point "
         "train.save_dir at a run with a complete checkpoint"),
    ("mistake-met-by-one-rank", ("see", "test_config.py::test_a_mistake_met_by_one_rank_only_is_still_reported"),
     E + "{tmp}/missing.json: config file not found"),
    # ---- signals
    ("rank-killed", ("see", "test_train_multiproc.py::test_killing_a_rank_ends_the_run"),
     "(no line: the launcher exits non-zero within 60 s)"),
]


def make_files(tmp: Path) -> None:
    """The files rows name: data files, folders, configs and a model folder of an unsupported type."""
    (tmp / "notes.txt").write_text("some notes\n")
    (tmp / "empty.json").write_text("")
    (tmp / "blank.txt").write_text("\n\n")
    (tmp / "short.txt").write_text("only a few words here\n" * 3)
    (tmp / "one.txt").write_text("In the beginning God created the heavens and the earth.\n")
    (tmp / "other.jsonl").write_text('{"body": "text"}\n')
    (tmp / "no-tokenizer").mkdir()
    (tmp / "zero.txt").write_text("")
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8\n" * 20)
    (tmp / "broken.jsonl").write_text("not json\n")
    (tmp / "numbers.jsonl").write_text('{"text": 5}\n{"text": 7}\n')
    (tmp / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}, '
                                    '{"role": "assistant", "content": "Hello"}]}\n' * 4)
    (tmp / "pairs.jsonl").write_text('{"prompt": "2+2=", "completion": " 4"}\n' * 2 + '{"prompt": "3+3="}\n')
    (tmp / "docs").mkdir()
    (tmp / "docs" / "readme.md").write_text("# a folder of other files\n")
    (tmp / "mixed").mkdir()
    (tmp / "mixed" / "a.txt").write_text("a document\n")
    (tmp / "mixed" / "b.csv").write_text("text\nanother document\n")
    (tmp / "a.json").write_text(json.dumps({**TINY, "extends": "b.json"}))
    (tmp / "b.json").write_text(json.dumps({"extends": "a.json"}))


def config_with(changes: dict | str) -> str:
    return changes if isinstance(changes, str) else json.dumps(with_(TINY, **changes))


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith(E)]


def fill(text: str, **names: object) -> str:
    from huggingface_hub import constants

    names.setdefault("hf_cache", constants.HF_HUB_CACHE)  # where a hub name is looked up
    for name, value in names.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def rows(*kinds: str) -> list:
    marks = {"launch": [pytest.mark.multiproc]}
    return [pytest.param(given, line, id=name, marks=marks.get(given[0], [])) for name, given, line in ROWS
            if given[0] in kinds]


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    make_files(tmp_path)
    if not (tmp_path / "t5").exists():
        import transformers

        transformers.T5Config(num_layers=2, d_model=32).save_pretrained(tmp_path / "t5")
    return tmp_path


@pytest.mark.parametrize("given, line", rows("config", "cli"))
def test_command_line(tmp, capsys, given, line):
    kind, *argv = given
    if kind == "config":
        changes, *flags = argv
        (tmp / "run.json").write_text(fill(config_with(changes), tmp=tmp))
        argv = ["validate", str(tmp / "run.json"), *flags]
    argv = [fill(a, tmp=tmp) for a in argv]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and error_lines(err) == [fill(line, tmp=tmp)], (out[-500:], err[-2000:])


@pytest.mark.parametrize("given, line", rows("data"))
def test_data(tmp, given, line):
    from hybrid_ds.data import load_data

    fields = {k: fill(v, tmp=tmp) if isinstance(v, str) else v for k, v in given[1].items()}
    with pytest.raises(UserError) as err:
        load_data(DataConfig(cache_dir=str(tmp / "cache"), eval_fraction=0.5, **fields), "causal_lm")
    assert f"{E}{err.value}" == fill(line, tmp=tmp)


# ---------------------------------------------------------------- rows that run the CLI in its own process

RUN = {
    "model": {"name": "gpt2-tiny", "vocab_from_tokenizer": True},
    "data": {"seq_len": 32},
    "train": {"max_steps": 1},
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 1},
}


def cli_process(*argv: str) -> warm_ranks.Done:
    """``python -m hybrid_ds.cli ARGV`` in a process of its own (forked warm: tests/warm_ranks.py)."""
    return warm_ranks.cli(*argv, env={"MASTER_PORT": warm_ranks.free_port()})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A one-step gpt2-tiny run (one process): its config, save_dir ``run/`` and checkpoint ``run/step_1``."""
    folder = tmp_path_factory.mktemp("trained")
    config = folder / "config.json"
    config.write_text(json.dumps({**RUN, "data": {**RUN["data"], "cache_dir": str(folder.parent / "data-cache")},
                                  "train": {**RUN["train"], "save_dir": str(folder / "run")}}))
    proc = cli_process("train", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config


@pytest.mark.parametrize("given, line", rows("run"))
def test_run(trained_run, tmp, given, line):
    _, changes, *argv = given
    names = {"tmp": tmp, "run": trained_run, "save_dir": trained_run.parent / "run"}
    sets = [f"{key}={fill(str(value), **names)}" for key, value in changes.items()]
    argv = [fill(a, **names) for a in argv]
    proc = cli_process(*argv, *(s for item in sets for s in ("--set", item)))
    assert proc.returncode == 2 and error_lines(proc.stderr) == [fill(line, **names)], proc.stderr[-3000:]


@pytest.mark.parametrize("given, line", rows("launch"))
def test_launch(tmp, given, line):
    from test_train_multiproc import tiny_config, train

    config = tiny_config(tmp, "gpt2-tiny", 2)
    raw = json.loads(config.read_text())
    for key, value in given[1].items():
        section, field = key.split(".")
        raw[section][field] = fill(value, tmp=tmp)
    config.write_text(json.dumps(raw))
    proc = train(config, 2, *given[2:], expect=2)
    output = proc.stdout + proc.stderr
    assert error_lines(proc.stderr) == [fill(line, tmp=tmp)] and "Connection closed" not in output, output[-3000:]


def test_referred_rows_name_tests_that_exist():
    for name, (kind, *args), _ in ROWS:
        if kind == "see":
            file, test = args[0].split("::")
            assert f"def {test}(" in (ROOT / "tests" / file).read_text(), name


def test_known_optimizer_and_scheduler_names_are_what_deepspeed_builds():
    """config.KNOWN_TYPES is DeepSpeed's and torch's lists, as installed (a pure module cannot import them)."""
    import inspect

    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    from hybrid_ds.config import KNOWN_TYPES

    def classes(module, base):
        return {n for n, c in vars(module).items() if inspect.isclass(c) and issubclass(c, base) and c is not base
                and not n.startswith("_")}

    assert set(KNOWN_TYPES["optimizer"]) == set(DEEPSPEED_OPTIMIZERS) | classes(torch.optim, torch.optim.Optimizer)
    assert set(KNOWN_TYPES["scheduler"]) == set(VALID_LR_SCHEDULES) | classes(torch.optim.lr_scheduler,
                                                                              torch.optim.lr_scheduler.LRScheduler)


def test_table_size():
    """Rows of this table (the closing note reports it); ids are unique."""
    assert len({name for name, _, _ in ROWS}) == len(ROWS) >= 80


def test_a_port_in_use_is_one_line(trained_run):
    """A run whose MASTER_PORT another process holds (a second run started beside the first) stops with one line
    naming --master_port, before any packing."""
    import socket

    line = next(line for name, _, line in ROWS if name == "port-in-use")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = warm_ranks.cli("train", str(trained_run), "--set", "train.resume=true", env={"MASTER_PORT": str(port)})
    assert proc.returncode == 2 and error_lines(proc.stderr) == [fill(line, port=port)], proc.stderr[-3000:]
