"""The adapter: a Hugging Face model's family, from the family table or from its own structure.

Named families are entries of :mod:`hybrid_ds.config.families` (pure data: module paths, embedding and
position rules, task, config keys, shape builder). A model type with no entry goes to the generic
adapter (models/generic/), which maps the common decoder-only layout from the model's own structure
or refuses it with the reason. ``resolve`` turns ``model.name`` into a config, a family and a meta
skeleton, ``build`` materializes one stage, ``layers`` are the pipeline's layers around the Hugging Face
modules (``masks`` what each stage recomputes), ``shape`` is the estimator's view of any accepted model.
"""
