"""``hybrid-ds parity``: does the pipelined model compute what the Hugging Face model computes?

One batch goes through the original model and through the pipeline's stages, each stage built as its
rank would build it (its own meta skeleton, its own reads from the folder's safetensors), run one after
another in this process. Reported: both losses, the largest logit difference, the largest gradient
difference relative to the gradient's scale, and parameters whose gradient one side lacks. These are of
Hugging Face's loss on the pipeline's logits, which is bit for bit the model's; with ``train.fused_loss``
the fused loss (hybrid_ds.models.head_loss, a different summation) runs too, and its loss and gradients must
be within the tolerance of Hugging Face's.

Under sequence parallelism (launched on ``pipeline.sequence_parallel`` processes) each rank runs the stages on its
shard of the batch's tokens, the shards' losses and gradients are summed over the ranks, and each rank's logits are
compared with the Hugging Face model's rows of its shard.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from hybrid_ds.config import RunConfig
from hybrid_ds.config.checks import check_device
from hybrid_ds.models.build import checkpoint_folder
from hybrid_ds.models.head_loss import materialize
from hybrid_ds.models.lora import PEFT_PREFIX, is_adapter, with_peft
from hybrid_ds.models.resolve import auto_class, resolve_model
from hybrid_ds.models.sequence_parallel import SequenceShard, check_model
from hybrid_ds.runtime.pipeline import SequentialStages
from hybrid_ds.runtime.plan import build_plan

TOLERANCE = 1e-5


@dataclass
class ParityReport:
    model: str
    stages: int
    hf_loss: float
    pipeline_loss: float
    max_logit_diff: float
    max_grad_diff: float          # max over parameters of max|g_pipe - g_hf| / max|g_hf|
    worst_grad: str
    unmatched_grads: list[str] = field(default_factory=list)
    fused_loss: float | None = None       # the fused loss (train.fused_loss), and its max relative grad diff
    fused_grad_diff: float | None = None
    # How far Hugging Face's fp32 loss itself is from the same loss summed in float64 (loss, max relative grad
    # diff): the rounding any other summation order may show, which grows with depth (~1e-4 at SmolLM2-135M)
    rounding_loss: float = 0.0
    rounding_grad_diff: float = 0.0
    sequence_parallel: int = 1            # ranks the batch's tokens were sharded over (their results summed)

    @property
    def fused_ok(self) -> bool:
        """The fused loss within the tolerance of Hugging Face's, or no farther from it than twice the rounding of
        Hugging Face's own fp32 loss."""
        return self.fused_loss is None or (
            abs(self.hf_loss - self.fused_loss) <= max(TOLERANCE, 2 * self.rounding_loss)
            and self.fused_grad_diff <= max(TOLERANCE, 2 * self.rounding_grad_diff))

    @property
    def ok(self) -> bool:
        return (abs(self.hf_loss - self.pipeline_loss) <= TOLERANCE and self.max_logit_diff <= TOLERANCE
                and self.max_grad_diff <= TOLERANCE and not self.unmatched_grads and self.fused_ok)

    @property
    def exact(self) -> bool:
        """Bit for bit: the same loss, logits and gradients (what the named families give on CPU in fp32); the
        fused loss, whose sums run in another order, within the tolerance."""
        return (self.hf_loss == self.pipeline_loss and self.max_logit_diff == 0 and self.max_grad_diff == 0
                and not self.unmatched_grads and self.fused_ok)

    def lines(self) -> list[str]:
        sp = f" x sequence_parallel {self.sequence_parallel}" if self.sequence_parallel > 1 else ""
        return [f"model           {self.model} ({self.stages} stages{sp})",
                f"loss            hf {self.hf_loss:.8f}   pipeline {self.pipeline_loss:.8f}   "
                f"diff {abs(self.hf_loss - self.pipeline_loss):.3g}",
                f"max |logit diff| {self.max_logit_diff:.3g}",
                f"max grad diff   {self.max_grad_diff:.3g} (relative, worst: {self.worst_grad})",
                *([f"unmatched grads {self.unmatched_grads[:5]}"] if self.unmatched_grads else []),
                *([f"fused loss      {self.fused_loss:.8f}   diff {abs(self.hf_loss - self.fused_loss):.3g}   "
                   f"max grad diff {self.fused_grad_diff:.3g}"] if self.fused_loss is not None else []),
                *([f"fp32 rounding   Hugging Face's loss in float64: diff {self.rounding_loss:.3g}   "
                   f"max grad diff {self.rounding_grad_diff:.3g}"]
                  if self.fused_loss is not None and self.sequence_parallel == 1 else []),
                f"parity          {'OK' if self.ok else 'FAILED'} "
                f"({'bit for bit' if self.exact else f'tolerance {TOLERANCE:g}'})"]


def sample_batch(vocab_size: int, seq_len: int, task: str, batch: int = 2, seed: int = 0,
                 pad_last: int = 3) -> dict[str, torch.Tensor]:
    """Random token ids; the last row right-padded by ``pad_last`` tokens (mask 0, label -100)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, seq_len - pad_last:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if task == "masked_lm":  # predict a random 15% of the real tokens
        labels = labels.masked_fill(torch.rand(ids.shape, generator=generator) > 0.15, -100)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}


def check_parity(cfg: RunConfig, stages: int, seq_len: int = 16,
                 sequence: Callable[[], SequenceShard] | None = None) -> ParityReport:
    """Compare the HF model and the pipeline on one padded batch (fp32, dropout off); with ``sequence``, on the shard
    of the batch's tokens it returns for this rank (every rank calls it; the sequence rounded up to a multiple of the
    shards). ``sequence`` is called once the model's folder is written: transformers writes a model only on the first
    rank of an initialized process group, and each rank writes its own."""
    check_device(cfg, "cpu")  # the check runs on the CPU, backward included
    original = cfg.model.name
    # A padded batch of one sequence a row: data.document_mask (tests/test_document_mask.py) would restart the
    # padding's positions and change its logits, which are compared here too.
    # One process: sequence parallelism (tests/test_sequence_parallel_multiproc.py) off, the weights the same.
    cfg = cfg.replace(pipeline={"stages": stages, "sequence_parallel": 1},
                      data={"seq_len": seq_len, "document_mask": False},
                      train_micro_batch_size_per_gpu=1,
                      gradient_accumulation_steps=1, fp16={"enabled": False}, bf16={"enabled": False},
                      train={"float8": False})  # float8 is a precision too: the mapping is checked in fp32
    with tempfile.TemporaryDirectory() as tmp:
        folder = _checkpoint_folder(cfg, Path(tmp))
        shard = sequence() if sequence is not None else None
        if shard is not None:
            seq_len = -(-seq_len // shard.size) * shard.size
        cfg = cfg.replace(model={"name": folder, "pretrained": True}, data={"seq_len": seq_len})
        plan = build_plan(cfg, world_size=stages)
        family = plan.resolved.family
        if shard is not None:
            check_model(family, plan.resolved.hf_config, shard.size)
        pipe = SequentialStages(plan, sequence=shard)
        hf = auto_class(family).from_pretrained(folder, config=copy.deepcopy(plan.resolved.hf_config),  # overrides
                                                attn_implementation=cfg.model.attn_implementation,
                                                dtype=torch.float32).eval()
        if cfg.model.lora:
            hf = with_adapters_of(pipe, hf)
        batch = sample_batch(hf.config.vocab_size, seq_len, family.task)
        hf_kwargs = {k: v for k, v in batch.items() if k != "token_type_ids" or family.task_info.token_types}
        out = hf(**hf_kwargs, use_cache=False)  # as in training (hybrid models' caches cannot start empty)
        out.loss.backward()

        for module in pipe.modules():
            module.eval()
        inputs = (batch["input_ids"], batch["attention_mask"])
        if family.task_info.token_types:
            inputs += (batch["token_type_ids"],)
        outputs = pipe.forward(inputs)  # the logits, and the router loss of a model that adds it
        loss = pipe.hf_loss_fn(outputs, batch["labels"])
        logits = materialize(outputs[0] if isinstance(outputs, tuple) else outputs)
        loss.backward()
        loss = _summed_over_shards(shard, pipe, loss)
        rows = slice(None) if shard is None else shard.of(seq_len)
        report = _report(original, stages, out, logits, loss, hf, pipe, rows)
        report.sequence_parallel = 1 if shard is None else shard.size
        if cfg.train.fused_loss:
            _check_fused_loss(report, pipe, hf, inputs, batch["labels"], shard)
        return report


def _check_fused_loss(report: ParityReport, pipe: SequentialStages, hf: torch.nn.Module, inputs: tuple,
                      labels: torch.Tensor, shard: SequenceShard | None) -> None:
    """``train.fused_loss``: its loss and gradients into ``report``, and (unsharded) how far Hugging Face's own fp32
    loss is from the same loss in float64, the rounding any other summation may show."""
    for module in pipe.modules():
        module.zero_grad(set_to_none=True)
    fused = pipe.loss_fn(pipe.forward(inputs), labels)
    fused.backward()
    report.fused_loss = _summed_over_shards(shard, pipe, fused).item()
    report.fused_grad_diff = _max_grad_diff(hf, pipe, floor=1e-3)[0]
    if shard is not None:  # the float64 loss is of whole logits
        return
    for module in pipe.modules():
        module.zero_grad(set_to_none=True)
    exact = _float64_loss(pipe.forward(inputs), labels, pipe.plan.resolved.family)
    exact.backward()
    report.rounding_loss = abs(report.hf_loss - exact.item())
    report.rounding_grad_diff = _max_grad_diff(hf, pipe, floor=1e-3)[0]


def _summed_over_shards(shard: SequenceShard | None, pipe: SequentialStages, loss: torch.Tensor) -> torch.Tensor:
    """The loss and every gradient of ``pipe`` summed over the ranks of ``shard`` (each rank computed its share)."""
    loss = loss.detach().clone()
    if shard is None:
        return loss
    torch.distributed.all_reduce(loss, group=shard.group)
    params = {id(p): p for module in pipe.modules() for p in module.parameters()}  # a tied layer is listed twice
    for param in params.values():
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad, group=shard.group)
    return loss


def _float64_loss(outputs, labels: torch.Tensor, family) -> torch.Tensor:
    """Hugging Face's loss (shifted for a causal LM, -100 ignored, the mean over tokens, plus the router loss) of
    the logits in float64: Hugging Face's own ``ForCausalLMLoss`` computes in fp32 whatever it is given."""
    logits, *aux = outputs if isinstance(outputs, tuple) else (outputs,)
    logits = materialize(logits).double()
    if family.task_info.loss == "ForCausalLMLoss":
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)
    return loss + family.router_aux.coef * aux[0].double() if aux else loss


def with_adapters_of(pipe: SequentialStages, hf: torch.nn.Module) -> torch.nn.Module:
    """``hf`` made a peft model by ``get_peft_model``, with the pipeline's adapters, whose B matrices are first set
    to random values: peft starts them at zero, which leaves the A matrices without gradient to compare."""
    peft_model = with_peft(hf, pipe.plan.config.model.lora, pipe.plan.resolved.family.task)
    values = dict(peft_model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.named_parameters().items():
            if is_adapter(name):
                if ".lora_B." in name:
                    param.normal_(0, 0.1, generator=generator)
                values[PEFT_PREFIX + name].copy_(param)
    return peft_model.eval()


def hf_named_parameters(hf: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's parameters by the names the pipeline gives them (a peft model's without its prefix)."""
    return [(name.removeprefix(PEFT_PREFIX), p) for name, p in hf.named_parameters()]


def _checkpoint_folder(cfg: RunConfig, tmp: Path) -> str:
    """The folder to compare from: the model's own, or a random init of a preset saved to ``tmp``."""
    if cfg.model.pretrained:
        return str(checkpoint_folder(cfg.model.name, cfg.model.revision))
    resolved = resolve_model(cfg.model)
    torch.manual_seed(cfg.train.seed)
    auto_class(resolved.family).from_config(resolved.hf_config).save_pretrained(tmp)
    return str(tmp)


def _max_grad_diff(hf, pipe, floor: float = 0.0) -> tuple[float, str]:
    """max over parameters of max|g_pipe - g_hf| / max|g_hf|, and the worst parameter's name.

    ``floor``: the scale is at least this fraction of the largest gradient of the model. A gradient that is zero
    in exact arithmetic (BERT's key biases: softmax ignores a constant) is rounding noise, ~1e-11, on both sides,
    and two different summations give two different noises; only bit-for-bit comparisons can do without it.
    """
    grads = pipe.named_gradients()
    hf_grads = [p.grad for p in hf.parameters() if p.grad is not None]
    least = floor * max(g.abs().max().item() for g in hf_grads) if floor and hf_grads else 1e-12
    worst, worst_name = 0.0, "-"
    for key, param in hf_named_parameters(hf):
        if param.grad is not None and key in grads:
            diff = ((grads[key] - param.grad).abs().max() / param.grad.abs().max().clamp_min(least)).item()
            if not diff <= worst:  # a NaN on either side is the worst difference, never "no difference"
                worst, worst_name = diff, key
                if math.isnan(diff):
                    break
    return worst, worst_name


def _report(name, stages, out, logits, loss, hf, pipe, rows: slice = slice(None)) -> ParityReport:
    hf_grads = {n for n, p in hf_named_parameters(hf) if p.grad is not None}
    worst, worst_name = _max_grad_diff(hf, pipe)
    unmatched = sorted(hf_grads ^ set(pipe.named_gradients()))
    return ParityReport(name, stages, out.loss.item(), loss.item(), (logits - out.logits[:, rows]).abs().max().item(),
                        worst, worst_name, unmatched)
