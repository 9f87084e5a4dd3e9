"""The PipelineModule's stage boundaries (ours, computed on the meta device) and its per-layer checkpoint file names.

- :class:`HybridPipelineModule`: ``PipelineModule._partition_layers`` (overridden), ``_topo``, ``_set_bounds``,
  ``parts``, ``_local_start`` / ``_local_stop``.
- :func:`layer_checkpoint_file`: ``PipelineModule.ckpt_layer_path`` (export reads each layer's file).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from deepspeed.pipe import PipelineModule

from hybrid_ds.seam.compat import code_has, demand, require, requirement


# ---------------------------------------------------------------- 2. our stage boundaries


_PARTITION_WHY = "hybrid_ds gives DeepSpeed its stage boundaries (computed on the meta device)"

PARTITION_LAYERS = requirement(
    "partition.override", "PipelineModule._partition_layers, called by __init__ after global_rank and _topo are set",
    lambda: callable(PipelineModule._partition_layers) and code_has(
        PipelineModule.__init__, "self.global_rank = ...", "self._topo = ...", "self._partition_layers(...)"),
    _PARTITION_WHY)
SET_BOUNDS = requirement("partition.set_bounds", "PipelineModule._set_bounds",
                         lambda: callable(PipelineModule._set_bounds), _PARTITION_WHY)
PARTS = requirement("partition.parts", "PipelineModule.parts, read by stage_owner",
                    lambda: code_has(PipelineModule.stage_owner, "self.parts[...]"), _PARTITION_WHY)


def check_partition_override() -> None:
    """DeepSpeed 0.19.8 lets a subclass choose the stages' layers by overriding ``_partition_layers``.

    ``PipelineModule.__init__`` sets ``global_rank`` and ``_topo``, then calls ``self._partition_layers()``,
    which sets ``self.parts`` (stage s holds specs ``parts[s]:parts[s + 1]``; ``stage_owner`` reads it to
    place tied weights) and this rank's slice with ``self._set_bounds(start, stop)``, before any layer is built.
    """
    require(PARTITION_LAYERS, SET_BOUNDS, PARTS)


class HybridPipelineModule(PipelineModule):
    """A PipelineModule whose stage ``s`` holds the layer specs ``parts[s]:parts[s + 1]``.

    hybrid_ds computes ``parts`` on the meta device; DeepSpeed's own ``partition_method="parameters"``
    would build every layer on every rank to count parameters (PITFALLS 4). The other arguments are
    ``PipelineModule``'s.
    """

    def __init__(self, layers: Any, parts: list[int], **kwargs: Any):
        check_partition_override()
        self.spec_parts = list(parts)  # before super().__init__, which calls _partition_layers
        super().__init__(layers=layers, **kwargs)
        lo, hi = self.spec_parts[self.stage_id:self.stage_id + 2]
        # Needs the built module: checked here, not registered.
        demand("PipelineModule._local_start and _local_stop, set by _set_bounds",
               lambda: (self._local_start, self._local_stop) == (lo, hi), _PARTITION_WHY)

    def _partition_layers(self, method: str = "uniform") -> None:
        self.parts = self.spec_parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def get_tied_weights_and_groups(self) -> list[tuple[Any, Any]]:
        """DeepSpeed's, with trainable tied weights only: the engine sums each one's gradient over the stages that
        hold it, and a frozen one (LoRA's embedding) has none (bf16's optimizer would look for ``_hp_grad``)."""
        return [(weight, group) for weight, group in super().get_tied_weights_and_groups() if weight.requires_grad]


# ---------------------------------------------------------------- 4. per-layer checkpoint file names and tied names


TIED_MODULES = requirement(
    "pipeline.tied_modules", "PipelineModule.tied_modules, the ModuleDict that names a tied layer's parameters "
    "tied_modules.<key>.",
    lambda: code_has(PipelineModule.__init__, "self.tied_modules = nn.ModuleDict()")
    and code_has(PipelineModule._build, "self.tied_modules[layer.key] = layer.build()"),
    "a checkpoint's tied weights are found under the names DeepSpeed saves them by")


def tied_prefix(key: str | None = None) -> str:
    """The prefix of a tied layer's parameter names in a PipelineModule (and its checkpoints): ``tied_modules.<key>.``,
    or of every tied layer's (``key`` None)."""
    require(TIED_MODULES)
    return f"tied_modules.{key}." if key is not None else "tied_modules."



def layer_checkpoint_file(folder: str | Path, index: int) -> Path:
    """The file in which DeepSpeed's ``save_checkpoint`` keeps layer spec ``index`` of a PipelineModule.

    DeepSpeed 0.19.8 names it in ``PipelineModule.ckpt_layer_path`` (``layer_NN-model_states.pt``, with a
    model-parallel rank hybrid_ds never has), a method of a built module; an export has no process group
    to build one, so the method runs on a stand-in holding the attributes it reads.
    """
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    stand_in = types.SimpleNamespace(_local_start=0, global_rank=0,
                                     _grid=types.SimpleNamespace(_topo=PipeDataParallelTopology(num_pp=1, num_dp=1)))
    return Path(demand("PipelineModule.ckpt_layer_path(ckpt_dir, local_layer_idx)",  # of this folder and index
                       lambda: PipelineModule.ckpt_layer_path(stand_in, str(folder), index),
                       "an export finds each layer's weights under DeepSpeed's file name"))
