"""Model-state bytes per rank along the optimizer DeepSpeed 0.19 picks for a precision and ZeRO stage. Pure Python.

torch AdamW, BF16_Optimizer, FP16_Optimizer, DeepSpeedZeroOptimizer (ZeRO-1/2) and ZeRO-3, each with the
buffers it really allocates, partitioned over the data-parallel group, as the peak over the accumulate
and step phases; ``bench/estimator_accuracy.py`` holds the totals against real engines.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hybrid_ds.estimate.activations import DTYPE_BYTES
from hybrid_ds.errors import UserError

ADAM_BYTES = 8                 # exp_avg + exp_avg_sq, fp32, on the partition an optimizer owns
MASTER_BYTES = 4               # fp32 master weights (and fp32 gradient partitions)
ALLREDUCE_BUCKET = 500_000_000  # deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE (elements)
TIED_SUM_CHUNK = 1 << 24       # elements of a tied weight summed at once (hybrid_ds.seam.engines.TIED_SUM_CHUNK)


@dataclass(frozen=True)
class ModelState:
    """Bytes one rank holds for parameters, gradients, fp32 master weights and Adam state, at its peak phase.

    ``comm_buffer`` is the reduce bucket DeepSpeed allocates for gradient reduction (``reduce_bucket_size``
    elements, two with ``overlap_comm`` at ZeRO-2). ``backward_transient`` is held on top of ``total`` inside
    a micro-batch's backward, next to the activations: ZeRO-2's whole gradient of the largest parameter (autograd
    produces it whole before the hook copies it into the bucket; one larger than the bucket waits whole for the
    next reduction). ``transient`` is made and dropped outside backward, when no activations are held: the flat
    copy cast to fp32 inside the optimizer step, and with pipeline stages the fp32 sum of one chunk of a tied weight
    at ReduceTiedGrads (``TIED_SUM_CHUNK`` elements, or the reduce bucket or the weight if smaller).
    """

    optimizer_path: str
    phase: str            # "accumulate" (forward/backward, gradients building up) or "step"
    params: float
    grads: float
    master: float
    optimizer: float
    transient: float = 0.0
    comm_buffer: float = 0.0
    backward_transient: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.master + self.optimizer


def optimizer_path(zero: int, precision: str, grad_accum_dtype: str | None = None) -> str:
    """The optimizer DeepSpeed 0.19 wraps around AdamW (``DeepSpeedEngine._do_optimizer_sanity_check``).

    The gradient-accumulation dtype defaults to the model dtype (``get_data_types``), so bf16 with
    ZeRO-1 uses the ZeRO optimizer unless ``data_types.grad_accum_dtype`` is "fp32".

    >>> optimizer_path(0, "bf16"), optimizer_path(1, "bf16", "fp32"), optimizer_path(1, "bf16")
    ('BF16_Optimizer', 'BF16_Optimizer', 'DeepSpeedZeroOptimizer')
    """
    accum = grad_accum_dtype or precision
    if zero == 3:
        return "DeepSpeedZeroOptimizer_Stage3"
    if zero >= 1:
        return "BF16_Optimizer" if (zero == 1 and precision == "bf16" and accum == "fp32") else "DeepSpeedZeroOptimizer"
    if accum != precision:
        raise UserError("data_types.grad_accum_dtype", f"{accum} with {precision} needs ZeRO stage 1 or higher "
                                                       "(DeepSpeed: unsupported mix of model and accumulation dtype)")
    return {"fp32": "torch AdamW", "bf16": "BF16_Optimizer", "fp16": "FP16_Optimizer"}[precision]


def model_state(params: int, dp: int, zero: int, precision: str, grad_accum_dtype: str | None = None,
                persistent: int = 0, largest_module: int = 0, reduce_bucket: int = 500_000_000,
                contiguous_gradients: bool = True, prefetch_bucket: int = 50_000_000, largest_param: int = 0,
                tied: int = 0, overlap_comm: bool = False, frozen: int = 0) -> ModelState:
    """Model-state bytes per rank for ``params`` trainable parameters on this rank's stage, ``dp`` data-parallel
    ranks, and ``frozen`` ones (a LoRA run's base weights: in the model dtype, no gradient, no optimizer state;
    DeepSpeed's optimizers take only parameters that require a gradient).

    Phases are the peak of what each optimizer keeps, read from DeepSpeed 0.19.8 and measured by
    bench/estimator_accuracy.py. ZeRO-1 keeps the full gradient until the reduction at the accumulation
    boundary; ZeRO-2 reduces every micro-batch into a partition (on the pipeline engine too:
    ``seam.engines.PartitionedGradientsPipelineEngine``), holding the whole gradient of the parameter autograd
    just produced (``largest_param`` elements at most) and, with stages, summing the ``tied`` weight it shares
    with another stage in fp32 once per step; both clone an fp32 master partition even in fp32.
    BF16_Optimizer keeps bf16 gradients plus a full accumulation buffer in the accumulation dtype (bf16 by
    default, fp32 with ``data_types.grad_accum_dtype``), and partitions master weights and Adam over the
    data-parallel group even at ZeRO-0. ZeRO-3 keeps parameters smaller than
    ``stage3_param_persistence_threshold`` whole through forward and backward.

    >>> ms = model_state(1_000_000, dp=1, zero=0, precision="fp32")   # 4 + 4 + 8 bytes per parameter
    >>> ms.optimizer_path, ms.total
    ('torch AdamW', 16000000.0)
    >>> model_state(1_000_000, dp=4, zero=2, precision="bf16").total   # 2 + 16 / 4
    6000000.0
    >>> ms = model_state(1_000_000, dp=4, zero=2, precision="bf16", largest_param=200_000, tied=300_000)
    >>> ms.backward_transient, ms.transient             # 2 x 200,000 in backward; 4 x 300,000 at ReduceTiedGrads
    (400000.0, 1200000.0)
    >>> model_state(10_000, dp=4, zero=1, precision="bf16", frozen=1_000_000).params   # 2 x (10,000 + 1,000,000)
    2020000.0
    """
    if frozen:
        state = model_state(params, dp, zero, precision, grad_accum_dtype, persistent, largest_module, reduce_bucket,
                            contiguous_gradients, prefetch_bucket, largest_param, tied, overlap_comm)
        return replace(state, params=state.params + DTYPE_BYTES[precision] * frozen)
    path = optimizer_path(zero, precision, grad_accum_dtype)
    n, w = float(params), DTYPE_BYTES[precision]
    accum, part = DTYPE_BYTES[grad_accum_dtype or precision], n / dp
    adam, master = ADAM_BYTES * part, MASTER_BYTES * part
    buckets = 2 if (zero == 2 and overlap_comm) else 1   # stage_1_and_2.py setup_buckets: a second for overlap
    bucket = buckets * reduce_bucket * w if contiguous_gradients else 0.0
    allreduce_bucket = min(n, ALLREDUCE_BUCKET) * w if dp > 1 else 0.0
    if path == "torch AdamW":
        phases = {"step": (4 * n, 4 * n, 0.0, 8 * n)}
        return _peak(path, phases, comm_buffer=allreduce_bucket)
    if path == "FP16_Optimizer":  # fused_optimizer.py: fp32 master copy of everything, fp32 flat grads at the step
        phases = {"accumulate": (2 * n, 2 * n, 4 * n, 8 * n), "step": (2 * n, 2 * n + 4 * n, 4 * n, 8 * n)}
        return _peak(path, phases, comm_buffer=allreduce_bucket)
    if path == "BF16_Optimizer":  # bf16_optimizer.py: lp grads + flat hp grad buffer; fp32 copy of the partition
        grads = w * n + accum * n
        phases = {"accumulate": (w * n, grads, master, adam),
                  "step": (w * n, grads + (MASTER_BYTES * part if accum != MASTER_BYTES else 0.0), master, adam)}
        return _peak(path, phases, comm_buffer=allreduce_bucket)
    if zero in (1, 2):  # stage_1_and_2.py; the flat 16-bit partition is cast to fp32 inside step()
        building = w * n if zero == 1 else accum * part
        phases = {"accumulate": (w * n, building, master, adam), "step": (w * n, MASTER_BYTES * part, master, adam)}
        if zero == 1:
            return _peak(path, phases, transient=accum * part, comm_buffer=bucket)
        tied_chunk = MASTER_BYTES * float(min(tied, TIED_SUM_CHUNK, reduce_bucket))  # summed chunk by chunk
        return _peak(path, phases, max(accum * part, tied_chunk), bucket, backward_transient=w * float(largest_param))
    return _zero3(n, w, dp, persistent, largest_module, prefetch_bucket, bucket / buckets)


def _zero3(n: float, w: int, dp: int, persistent: int, largest_module: int, prefetch_bucket: int,
           bucket: float) -> ModelState:
    """stage3.py: 16-bit param and grad partitions, fp32 master/grad/Adam partitions; gathered modules in flight."""
    part = n / dp
    master, adam = MASTER_BYTES * part, ADAM_BYTES * part
    gathered = w * (largest_module + min(prefetch_bucket, max(0.0, n - persistent)))
    phases = {"accumulate": (w * part + w * persistent + gathered, w * part + w * largest_module, master, adam),
              "step": (w * part, w * part + MASTER_BYTES * part, master, adam)}
    return _peak("DeepSpeedZeroOptimizer_Stage3", phases, comm_buffer=bucket)


def _peak(path: str, phases: dict[str, tuple[float, float, float, float]], transient: float = 0.0,
          comm_buffer: float = 0.0, backward_transient: float = 0.0) -> ModelState:
    phase = max(phases, key=lambda name: sum(phases[name]))
    return ModelState(path, phase, *phases[phase], transient=transient, comm_buffer=comm_buffer,
                      backward_transient=backward_transient)
