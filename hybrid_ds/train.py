"""The training run: process group, data, engine, loop with eval, checkpoints, resume and export.

Engine choice: a PipelineModule and DeepSpeed's PipelineEngine for ZeRO 0/1 (any number of stages);
the plain Hugging Face model and DeepSpeed's ordinary engine for ZeRO-2/3, which need one stage.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybrid_ds import checkpoint
from hybrid_ds.config import RunConfig, load_config_dict
from hybrid_ds.errors import UserError


@dataclass
class Summary:
    steps: int = 0
    first_loss: float = math.nan
    last_loss: float = math.nan
    eval_loss: float = math.nan
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def line(self) -> str:
        ppl = math.exp(self.eval_loss) if self.eval_loss == self.eval_loss else math.nan
        return (f"done: {self.steps} steps in {self.seconds:.0f} s, loss {self.first_loss:.3f} -> "
                f"{self.last_loss:.3f}, eval loss {self.eval_loss:.3f} (ppl {ppl:.1f}), "
                f"{self.tokens_per_s:,.0f} tokens/s")


def with_vocab(cfg: RunConfig, tokenizer: Any, model_vocab: int) -> RunConfig:
    """Size the vocabulary from the tokenizer when the config asks; else check that the tokenizer fits."""
    from hybrid_ds.data import check_vocab, padded_vocab_size

    if cfg.model.vocab_from_tokenizer:
        return load_config_dict(cfg.raw, [f"model.overrides.vocab_size={padded_vocab_size(len(tokenizer))}"])
    check_vocab(tokenizer, model_vocab)
    return cfg


def prepare(cfg: RunConfig, world_size: int) -> tuple[RunConfig, Any]:
    """Tokenizer, packed data and the vocabulary-sized config. The first rank of each node packs, the rest wait."""
    from hybrid_ds.data import load_data
    from hybrid_ds.models.resolve import resolve_model

    resolved = resolve_model(cfg.model)
    folder = resolved.checkpoint if resolved.checkpoint and Path(resolved.checkpoint).is_dir() else None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank == 0:
        data = load_data(cfg.data, resolved.family.task, folder)
    if world_size > 1:
        torch.distributed.barrier()
    if local_rank != 0:
        data = load_data(cfg.data, resolved.family.task, folder)
    return with_vocab(cfg, data.tokenizer, resolved.hf_config.vocab_size), data


def run(cfg: RunConfig, resume: bool | str | None = None) -> Summary:
    """Train ``cfg`` in this process group (every rank calls it)."""
    from hybrid_ds.engine import build_engine, data_parallel, init_distributed

    world_size = init_distributed()
    torch.manual_seed(cfg.train.seed)
    cfg, data = prepare(cfg, world_size)
    engine, plan = build_engine(cfg, world_size)
    rank = torch.distributed.get_rank()
    dp_rank = data_parallel(engine)[0]
    batches = data.train_batches(plan.layout.micro_batch, dp_rank, plan.layout.dp, cfg.train.seed)
    save_dir = Path(cfg.train.save_dir) if cfg.train.save_dir else None
    step = _maybe_resume(engine, save_dir, batches, cfg.train.resume if resume is None else resume)
    if save_dir and rank == 0:
        checkpoint.write_run_files(save_dir, cfg.to_dict(), data.tokenizer)
    summary = _loop(cfg, engine, plan, data, batches, step, save_dir, rank, dp_rank)
    if cfg.train.export_hf and save_dir:
        if rank == 0:
            checkpoint.export(save_dir, cfg.train.export_hf)
        torch.distributed.barrier()
    return summary


def _maybe_resume(engine: Any, save_dir: Path | None, batches: Any, resume: bool | str) -> int:
    if not resume:
        return 0
    if save_dir is None:
        raise UserError("train.resume", f"{resume!r} needs train.save_dir")
    folder = checkpoint.latest_checkpoint(save_dir)
    if folder is None:
        if resume == "auto":
            return 0
        raise UserError("train.resume", f"true, but {save_dir} has no checkpoint; use \"auto\" to start fresh")
    state = checkpoint.resume(engine, folder)
    batches.load_state_dict(state["data"])
    return state["step"]


def _loop(cfg: RunConfig, engine: Any, plan: Any, data: Any, batches: Any, step: int, save_dir: Path | None,
          rank: int, dp_rank: int) -> Summary:
    from tqdm import tqdm

    train = cfg.train
    tokens_per_step = plan.layout.train_batch * cfg.data.seq_len
    summary = Summary(steps=step)
    bar = tqdm(total=train.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc="train")
    start = time.perf_counter()
    trained = 0
    while step < train.max_steps:
        tick = time.perf_counter()
        loss = engine.train_batch(batches).item()
        seconds = time.perf_counter() - tick
        step, trained = step + 1, trained + 1
        summary.losses.append(loss)
        if math.isnan(summary.first_loss):
            summary.first_loss = loss
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{engine.get_lr()[0]:.2e}", tok_s=f"{tokens_per_step / seconds:,.0f}",
                        step_s=f"{seconds:.1f}")
        bar.update(1)
        if train.eval_interval and step % train.eval_interval == 0:
            summary.eval_loss = evaluate(engine, data, plan, train.eval_batches, dp_rank, step, bar)
        if save_dir and ((train.save_interval and step % train.save_interval == 0) or step == train.max_steps):
            checkpoint.save(engine, save_dir, step, batches.state_dict())
    bar.close()
    summary.seconds = time.perf_counter() - start
    summary.steps = step
    summary.last_loss = summary.losses[-1] if summary.losses else math.nan
    summary.tokens_per_s = tokens_per_step * trained / summary.seconds if trained else 0.0
    if train.eval_interval and (math.isnan(summary.eval_loss) or step % train.eval_interval):
        summary.eval_loss = evaluate(engine, data, plan, train.eval_batches, dp_rank, step, None)
    if rank == 0:
        print(summary.line(), flush=True)
        if save_dir:
            (save_dir / "summary.json").write_text(summary_json(summary))
    return summary


def evaluate(engine: Any, data: Any, plan: Any, n_batches: int, dp_rank: int, step: int, bar: Any) -> float:
    """Mean loss over the held-out split's first ``n_batches`` micro-batches per data-parallel rank."""
    batches = data.eval_batches(plan.layout.micro_batch, n_batches, dp_rank, plan.layout.dp)
    n_batches = min(n_batches, batches.per_epoch)
    from hybrid_ds.engine import data_parallel

    loss = engine.eval_batch(batches, num_micro_batches=n_batches).detach().float().reshape(1)
    torch.distributed.all_reduce(loss, group=data_parallel(engine)[2])
    loss = loss.item() / plan.layout.dp
    if engine.monitor.enabled and engine.global_rank == 0:
        samples = step * plan.layout.train_batch
        engine.monitor.write_events([("Eval/loss", loss, samples), ("Eval/perplexity", math.exp(loss), samples)])
    if bar is not None:
        bar.write(f"step {step}: eval loss {loss:.4f}, perplexity {math.exp(loss):.2f}")
    return loss


def summary_json(summary: Summary) -> str:
    return json.dumps(summary.__dict__, indent=2)
