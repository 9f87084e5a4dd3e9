"""The seam: every DeepSpeed internal hybrid_ds relies on, one module per concern, each checked before it is relied on.

Written for DeepSpeed 0.19.8 (``compat.WRITTEN_FOR``). A few things hybrid_ds needs are not DeepSpeed's API: a
private method it overrides or replaces, attributes it reads, a file name it derives. A DeepSpeed refactor that renamed
one would not always fail loudly: if ``PipelineEngine`` stopped calling ``clip_fp32_gradients``, our global-norm
replacement would silently never run. So each item first checks what it relies on (the name exists and, where the
item depends on DeepSpeed *calling* it, that the caller still calls it), and otherwise raises
:class:`~hybrid_ds.errors.IncompatibleDeepSpeed`: one line naming the internal and both DeepSpeed versions.
``tests/test_deepspeed_seam.py`` takes each internal away in turn and expects that line.

Modules: ``compat`` (the version and the check every item uses), ``pipeline_module`` (our stage boundaries,
per-layer file names), ``engines`` (one backward pass; ZeRO-2 with stages), ``numerics`` (global clip, non-finite
steps, the dp=1 reduction), ``universal`` (universal checkpoints), ``autoep`` (AutoEP under transformers 5.x),
``environment`` (the CPU comm op, CUDA arch list), ``zero_bubble`` (ZB-H1: the backward split into input and
weight gradients, new instructions, a schedule of our own), ``ulysses`` (DeepSpeed's differentiable all-to-all for sequence
parallelism), ``config_check`` (DeepSpeed's sections checked by its own models
and the optimizer and scheduler it builds), ``instruments`` (for bench/ and the test workers). The seam imports
nothing of hybrid_ds but its errors; the pure layer never imports it.

Transformers and torch internals used elsewhere (they stay next to the code that needs them):

- hybrid_ds/models/resolve.py: ``use_attention`` sets ``hf_config._attn_implementation`` and reads it back: a config
  built from scratch has None and the layers built from it are silently non-causal (PITFALLS 1).
- hybrid_ds/models/build.py: ``skeleton._init_weights(module)`` initializes a stage's modules as Hugging
  Face does and recomputes non-persistent buffers such as rotary ``inv_freq`` (PITFALLS 5);
  ``transformers.core_model_loading`` (``rename_source_key``, ``WeightRenaming``, ``WeightConverter``) with
  ``conversion_mapping.get_model_conversion_mapping`` maps checkpoint keys to parameter names as
  ``from_pretrained`` does; torch's ``module._non_persistent_buffers_set`` and ``module._modules`` (a
  shallow copy of a module without its children).
- hybrid_ds/models/generic/trace.py: replaces every ``masking_utils.create_*mask*`` helper in the modules
  that reach it, and sets ``skeleton._loss_function`` (checked to be what ``loss_function`` then returns), to record
  on the meta device what a model calls.
- bench/overhead.py: ``torch.utils._python_dispatch.TorchDispatchMode`` counts the aten ops of a step.
"""

