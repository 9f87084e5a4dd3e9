"""Test worker: ``launch/train.py`` with a non-finite loss on chosen steps, or chosen steps' batches left out.

``--nan-steps 3,4`` multiplies the loss of every micro-batch of steps 3 and 4 by NaN before the backward pass
(the pipeline's ``loss_fn`` on its last stage; the Hugging Face model's output on the plain ZeRO-2/3 engine),
so every gradient is NaN. ``--drop-steps 3`` is the reference: step 3 reads its micro-batches and trains nothing.
Other arguments are ``hybrid-ds train``'s.
"""

import argparse
import math
import sys
import time

from hybrid_ds.runtime import train
from hybrid_ds.cli import main

POISONED = [False]


def poison(engine):
    """Make the loss NaN while ``POISONED[0]`` is set."""
    module = engine.module
    if hasattr(module, "loss_fn"):  # PipelineModule: DeepSpeed calls module.loss_fn(outputs, labels) on the last stage
        loss_fn = module.loss_fn
        module.loss_fn = lambda outputs, labels: loss_fn(outputs, labels) * (math.nan if POISONED[0] else 1.0)
    else:  # the Hugging Face model: its output's loss
        def hook(_module, _inputs, output):
            if POISONED[0]:
                output["loss"] = output["loss"] * math.nan
            return output
        module.register_forward_hook(hook)
    return engine


def patch(nan_steps, drop_steps):
    build_engine, step = train.build_engine, train.Trainer.step
    train.build_engine = lambda plan: poison(build_engine(plan))

    def poisoned_step(self):
        number = self.step_count + 1
        if number in drop_steps:
            for _ in range(self.plan.layout.grad_accum):
                next(self.batches)
            self.step_count = number
            self.history.step(number, math.nan, self.engine.get_lr()[0], time.perf_counter() - self.started)
            return math.nan
        POISONED[0] = number in nan_steps
        return step(self)

    train.Trainer.step = poisoned_step


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--nan-steps", default="")
    parser.add_argument("--drop-steps", default="")
    args, rest = parser.parse_known_args()
    steps = [{int(s) for s in text.split(",") if s} for text in (args.nan_steps, args.drop_steps)]
    patch(*steps)
    sys.exit(main(["train", *rest]))
