"""Per-stage memory, FLOPs, communication and step time of a run, before renting the GPUs. Pure Python.

Everything here is arithmetic on the architecture numbers of a preset (or a local ``config.json``):
no torch, no deepspeed, no transformers. The numbers follow what the code that will run actually
allocates, and the tests and ``bench/estimator_accuracy.py`` hold them against a real DeepSpeed engine:

* parameters (:mod:`hybrid_ds.estimate.architecture`): per family, the tensors Hugging Face builds, grouped as
  the pipeline groups them ([embedding, block 0 .. n-1, head]); a tied weight counts on every stage
  holding it;
* model states (:mod:`hybrid_ds.estimate.model_state`): the buffers of the optimizer DeepSpeed 0.19 picks for
  the precision and ZeRO stage (torch AdamW, BF16_Optimizer, FP16_Optimizer, DeepSpeedZeroOptimizer,
  ZeRO-3), partitioned over the data-parallel group, as the peak over the accumulate and step phases;
* activations (:mod:`hybrid_ds.estimate.activations`): the tensors autograd saves in each Hugging Face block
  (Korthikanti et al. 2022's catalogue, with the kernels these models really call), times the
  micro-batches DeepSpeed's 1F1B TrainSchedule keeps in flight on each stage, plus the logits on the
  last stage;
* FLOPs, bubble, bytes sent per rank, step time and MFU from :mod:`hybrid_ds.estimate.gpus`;
* LoRA (``model.lora``): the base frozen (its weights only, no gradient, no optimizer state) and the adapters
  trained like any parameter (r x (in + out) per adapted linear layer, as peft makes them), what both save for
  backward; ``bench/lora_memory.py`` holds the model states against the real engine.

Modules: ``run`` (a run config as the estimator reads it, through the effective DeepSpeed config), ``stages`` (each
stage's memory, FLOPs and bytes sent), ``step`` (the whole step: time, MFU, days), ``flops``, ``model_state``,
``activations``, ``architecture``, ``gpus`` and ``report`` (the tables and JSON that compare and plan print).
"""
