"""The adapter: a Hugging Face model's family, from the family table or from its own structure.

Named families are entries of :mod:`hybrid_ds.families` (pure data: module paths, embedding and
position rules, task, config keys, shape builder). A model type with no entry goes to the generic
adapter (models/generic/), which maps the common decoder-only layout from the model's own structure
or refuses it with the reason. ``resolve`` turns ``model.name`` into a config and a meta skeleton,
``build`` materializes one stage, ``parts`` are the pipeline's layers around the Hugging Face modules.
"""

from __future__ import annotations

from typing import Any

from hybrid_ds.errors import UserError, suggest
from hybrid_ds.families import FAMILIES, Family

__all__ = ["FAMILIES", "Family", "get_family"]


def get_family(model_type: str, hf_config: Any = None) -> Family:
    """The named family of ``model_type``, else the generic decoder-only adapter's mapping of ``hf_config``.

    The generic adapter (hybrid_ds/models/generic/) builds the model on the meta device from
    ``hf_config`` (overrides applied) and maps it, or raises a UserError saying what it cannot map.
    """
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if hf_config is None:
        raise UserError("model.name",
                        f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))} "
                        f"({suggest(model_type, FAMILIES)}); to add one, add a Family entry in "
                        "hybrid_ds/families.py and a parity test")
    from hybrid_ds.models.generic import generic_family, meta_causal_lm

    return generic_family(model_type, meta_causal_lm(model_type, hf_config))
