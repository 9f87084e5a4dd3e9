"""The training run: process group, the plan, data, engine, and a small trainer (step, evaluate, save).

``run`` builds everything once per run, in this order: the tokenizer (which may size the vocabulary),
the plan (the model resolved once, its layout and stage boundaries), the packed data, the engine from
that plan, and a :class:`Trainer` that steps, evaluates, saves and resumes. Engine choice (in
hybrid_ds.runtime.engine): a PipelineModule and DeepSpeed's PipelineEngine for ZeRO 0/1 (any number of
stages); the plain Hugging Face model and DeepSpeed's ordinary engine for ZeRO-2/3 (one stage).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from hybrid_ds import plot
from hybrid_ds.runtime import checkpoint, compile_blocks
from hybrid_ds.config import RunConfig
from hybrid_ds.config.checks import check_device
from hybrid_ds.config.deepspeed import deepspeed_sections
from hybrid_ds.data import Data, check_vocab, load_data, load_tokenizer, padded_vocab_size, predicted_tokens
from hybrid_ds.runtime.engine import build_engine, data_parallel, device, init_distributed, raise_shared
from hybrid_ds.runtime.history import History, Summary
from hybrid_ds.runtime.progress import Progress
from hybrid_ds.runtime.quiet import deepspeed_prints_off
from hybrid_ds.errors import UserError
from hybrid_ds.models.resolve import tokenizer_source
from hybrid_ds.runtime.plan import Plan, build_plan
from hybrid_ds.runtime.preemption import StopRequest, gloo_group
from hybrid_ds.seam.config_check import check_deepspeed_sections


def with_vocab(cfg: RunConfig, tokenizer: Any) -> RunConfig:
    """The config with the vocabulary sized from the tokenizer, when the config asks for that."""
    if not cfg.model.vocab_from_tokenizer:
        return cfg
    return cfg.replace(model={"overrides": {"vocab_size": padded_vocab_size(len(tokenizer))}})


def prepare(cfg: RunConfig, world_size: int) -> tuple[Plan, Data]:
    """The run's one plan and its packed data. The first rank of each node packs, the rest wait.

    Nodes that share ``data.cache_dir`` pack at once; the cache is written aside and renamed, so the first
    to finish writes it and the others read that one (``packing.packed_splits``).

    The tokenizer comes first: with ``model.vocab_from_tokenizer`` it decides the model's vocabulary,
    so the model is resolved (and a generic one traced) once, with its final config.
    """
    task, folder = tokenizer_source(cfg.model)
    tokenizer = load_tokenizer(cfg.data.tokenizer, task, folder)
    plan = build_plan(with_vocab(cfg, tokenizer), world_size)
    check_vocab(tokenizer, plan.resolved.hf_config.vocab_size)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    error = None
    if local_rank == 0:
        try:
            data = load_data(plan.config.data, task, tokenizer=tokenizer, document_mask=plan.document_mask)
        except UserError as err:
            error = err
    raise_shared(error, patient=True)  # the ranks that waited meet the packing rank's mistake as their own
    if local_rank != 0:
        data = load_data(plan.config.data, task, tokenizer=tokenizer, document_mask=plan.document_mask)
    return plan, data


def run(cfg: RunConfig, resume: bool | str | None = None) -> Summary:
    """Train ``cfg`` in this process group (every rank calls it)."""
    world_size = init_distributed()
    kind = "cpu" if device().type == "cpu" else "gpu"
    check_device(cfg, kind)
    check_deepspeed_sections(deepspeed_sections(cfg, kind))  # every rank: a misspelt key costs no packing
    if cfg.train.save_dir and world_size > 1:  # before packing and building: a mistake costs seconds
        checkpoint.check_shared(Path(cfg.train.save_dir))
    torch.manual_seed(cfg.train.seed)
    plan, data = prepare(cfg, world_size)
    resume = plan.config.train.resume if resume is None else resume
    checkpoint.check_run_folders(plan.config, bool(resume))
    trainer = Trainer(plan, build_engine(plan), data)
    trainer.resume(resume)
    summary = trainer.fit()
    if not summary.stopped:
        trainer.export()
    return summary


class Trainer:
    """One rank's run: the engine built from the plan, the data, and the state a checkpoint holds."""

    def __init__(self, plan: Plan, engine: Any, data: Data):
        self.plan, self.engine, self.data = plan, engine, data
        self.cfg = plan.config
        self.rank = torch.distributed.get_rank()
        layout = plan.layout
        self.dp_rank, _, self.dp_group = data_parallel(engine, layout.sp)
        self.batches = data.train_batches(layout.micro_batch, self.dp_rank, layout.dp, self.cfg.train.seed)
        self.save_dir = Path(self.cfg.train.save_dir) if self.cfg.train.save_dir else None
        self.tokens_per_step = layout.train_batch * self.cfg.data.seq_len
        self.step_count = 0
        self.bad_in_a_row = 0
        self.stop_group = gloo_group()
        self.history = History()
        self.resumed_from = ""
        self.stopped = ""
        self.progress = Progress(self.cfg.train.max_steps, 0, False, None)  # fit() starts the real one
        self.started = time.perf_counter()

    def resume(self, resume: bool | str) -> None:
        """Continue from ``save_dir``'s latest checkpoint (``"auto"``: only if there is one)."""
        if not resume:
            return
        if self.save_dir is None:
            raise UserError("train.resume", f"{resume!r} needs train.save_dir")
        folder = checkpoint.latest_checkpoint(self.save_dir)
        if folder is None:
            if resume == "auto":
                return
            raise UserError("train.resume", f"true, but {self.save_dir} has no checkpoint; use \"auto\" to start fresh")
        state = checkpoint.resume(self.engine, folder, self.plan)
        self.batches.load_state_dict(state["data"])
        self.step_count = state["step"]
        self.history = History.from_dict(state.get("history"))
        self.resumed_from = str(folder)
        if self.rank == 0:
            now = checkpoint.describe_layout(checkpoint.layout_of(self.plan))
            saved = checkpoint.describe_layout(state["layout"]) if state.get("layout") else now
            at = f"saved at {saved}" + ("" if saved == now else f", now {now}")
            print(f"hybrid-ds: resumed from {folder} (step {self.step_count}, {at})", flush=True)

    def step(self) -> float:
        """One optimizer step (gradient_accumulation_steps micro-batches); the mean loss over data parallel."""
        tick = time.perf_counter()
        with deepspeed_prints_off():  # the PipelineEngine's own "steps: N loss: ..." every steps_per_print
            loss = self.engine.train_batch(self.batches).item()
        seconds = time.perf_counter() - tick
        self.step_count += 1
        lr = self.engine.get_lr()[0]
        self.history.step(self.step_count, loss, lr, time.perf_counter() - self.started)
        self.progress.step(self.step_count, loss, lr, self.tokens_per_step / seconds, seconds)
        self._compiled(f"step {self.step_count}", seconds)
        self._count_bad_step(loss)
        return loss

    def _compiled(self, when: str, seconds: float | None) -> None:
        """``train.compile``: what was compiled during this step or evaluation, and in how long (all ranks call)."""
        line = compile_blocks.progress_line(when, seconds, self.stop_group) if self.cfg.train.compile else None
        if line:
            self.progress.write(line)

    def _count_bad_step(self, loss: float) -> None:
        """A step with a non-finite loss or gradient norm was skipped by the engine (no parameter, optimizer-state
        or learning-rate change; hybrid_ds.seam.numerics.skip_non_finite_steps): count it, say so, and stop with
        a checkpoint after ``train.max_bad_steps`` in a row. Every rank sees the same loss and the same skip."""
        skipped = not self.engine.was_step_applied()
        if self.cfg.precision == "fp16":  # fp16's loss scaler skips overflowing steps as it searches for its scale
            skipped = False
        if math.isfinite(loss) and not skipped:
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        self.history.skipped_steps += 1
        limit = self.cfg.train.max_bad_steps
        self.progress.write(f"step {self.step_count}: loss {loss}, a non-finite loss or gradient norm; step skipped "
                            f"({self.bad_in_a_row} in a row, train.max_bad_steps {limit})")
        if self.bad_in_a_row < limit:
            return
        good = self.step_count - self.bad_in_a_row
        saved = "no train.save_dir, nothing saved"
        if self.save_dir:
            self.save()
            saved = f"saved as {self.save_dir / f'step_{self.step_count}'} (latest)"
        raise UserError("train.max_bad_steps", f"{limit} steps in a row ({good + 1}-{self.step_count}) had a "
                                               f"non-finite loss or gradient norm and were skipped; the state after "
                                               f"step {good} is {saved}; lower the learning rate or check the data")

    def evaluate(self) -> float:
        """Mean loss over a fixed sample of the held-out split, ``eval_batches`` micro-batches per data-parallel
        rank (``data.feed.eval_sample``: seeded, spread over the whole split)."""
        layout, n_batches = self.plan.layout, self.cfg.train.eval_batches
        batches = self.data.eval_batches(layout.micro_batch, n_batches, self.dp_rank, layout.dp, self.cfg.train.seed)
        loss = self.engine.eval_batch(batches, num_micro_batches=batches.per_epoch).detach().double().reshape(())
        self._compiled(f"step {self.step_count} eval", None)
        totals = torch.stack([loss, loss.new_tensor(predicted_tokens(batches))])  # on the engine's device (NCCL)
        torch.distributed.all_reduce(totals, group=self.dp_group)
        # every rank of DeepSpeed's data-parallel group holds the mean; the sp ranks of a replica read its tokens
        loss, tokens = totals[0].item() / layout.data_ranks, int(totals[1].item()) // layout.sp
        if self.engine.monitor.enabled and self.engine.global_rank == 0:  # at the optimizer step (monitor_by_step)
            self.engine.monitor.write_events([("Eval/loss", loss, self.step_count),
                                              ("Eval/perplexity", math.exp(loss), self.step_count)])
        self.progress.write(f"step {self.step_count}: eval loss {loss:.4f} over {tokens:,} tokens, "
                            f"perplexity {math.exp(loss):.2f}")
        self.history.evals.append({"step": self.step_count, "loss": loss, "tokens": tokens})
        return loss

    def save(self) -> None:
        """A checkpoint of every rank at this step (all ranks call it); its state holds the run's history so far."""
        folder = self.save_dir / f"step_{self.step_count}"
        self.history.checkpoints = [c for c in self.history.checkpoints if c["step"] != self.step_count]
        self.history.checkpoints.append({"step": self.step_count, "path": str(folder)})
        checkpoint.save(self.engine, self.save_dir, self.step_count, self.batches.state_dict(),
                        checkpoint.layout_of(self.plan), checkpoint.base_is_reread(self.cfg), self.history.to_dict())
        self.progress.write(f"step {self.step_count}: checkpoint {folder}")

    def fit(self) -> Summary:
        """Train to ``train.max_steps``, evaluating and saving at their intervals and at the end."""
        train = self.cfg.train
        if self.step_count >= train.max_steps:  # resumed a finished run (make train twice): leave it as it is
            if self.rank == 0:
                print(f"hybrid-ds: the run in {self.save_dir} is complete (step {self.step_count}, train.max_steps "
                      f"{train.max_steps}); nothing to train: raise train.max_steps to train on", flush=True)
            return Summary.of(self.history, self.step_count)
        if self.rank == 0:
            self._begin()
        self.history.begin(self.step_count, checkpoint.describe_layout(checkpoint.layout_of(self.plan)),
                           self.tokens_per_step, self.resumed_from)
        self.progress = Progress(train.max_steps, self.step_count, self.rank == 0, self.cfg.deepspeed.get("steps_per_print"))
        self.started = time.perf_counter() - self.history.segments[-1]["seconds"]
        saved = self.step_count  # the resumed checkpoint's step, or 0: nothing to save yet
        with StopRequest(self.stop_group) as stop:  # SIGTERM/SIGINT: finish the step, save, exit 0
            while self.step_count < train.max_steps:
                self.stopped = stop.agreed() or ""
                if self.stopped:
                    if self.save_dir and saved < self.step_count:
                        self.save()
                    break
                self.step()
                if train.eval_interval and self.step_count % train.eval_interval == 0:
                    self.evaluate()
                if self.save_dir and ((train.save_interval and self.step_count % train.save_interval == 0)
                                      or self.step_count == train.max_steps):
                    self.save()
                    saved = self.step_count
        self.progress.close()
        evaluated = self.history.evals and self.history.evals[-1]["step"] == self.step_count
        if not self.stopped and train.eval_interval and not evaluated:
            self.evaluate()
        summary = Summary.of(self.history, self.step_count, self.stopped)
        if self.rank == 0:
            self._end(summary)
        return summary

    def _begin(self) -> None:
        """Rank 0, before the first step: the plan's warnings and where the run's files go."""
        for warning in self.plan.warnings:
            print(f"warning: {warning}", flush=True)
        if self.save_dir:
            checkpoint.write_run_files(self.save_dir, self.cfg.to_dict(), self.data.tokenizer)
            print(f"hybrid-ds: run folder {self.save_dir} (config, tokenizer, checkpoints, summary.json)", flush=True)
        else:
            print("hybrid-ds: no train.save_dir: nothing of this run is saved", flush=True)

    def _end(self, summary: Summary) -> None:
        """Rank 0, after the last step: the summary line, summary.json and its plot."""
        print(self._stopped_line() if self.stopped else summary.line(), flush=True)
        if not self.save_dir:
            return
        (self.save_dir / "summary.json").write_text(summary.to_json())
        drawn = plot.plot_after_run(self.save_dir)
        print(f"hybrid-ds: wrote {self.save_dir / 'summary.json'}{f' and {drawn}' if drawn else ''}", flush=True)

    def _stopped_line(self) -> str:
        latest = checkpoint.latest_checkpoint(self.save_dir) if self.save_dir else None
        where = f"checkpoint {latest} is latest; resume with --resume" if latest else "nothing saved"
        return f"hybrid-ds: stopped by {self.stopped} after step {self.step_count}; {where}"

    def export(self) -> None:
        """``train.export_hf``: a Hugging Face folder from the last checkpoint (rank 0 writes, all wait)."""
        if self.cfg.train.export_hf and self.save_dir:
            if self.rank == 0:
                out = checkpoint.export(self.save_dir, self.cfg.train.export_hf)
                print(f"hybrid-ds: exported {out} (from {checkpoint.latest_checkpoint(self.save_dir)})", flush=True)
            torch.distributed.barrier()
