"""What a run did, across its resumes: every step's loss and learning rate, each evaluation, each checkpoint, and
each segment (the start, then every resume) with its layout and time.

Every rank keeps the same :class:`History` (all ranks see the same loss); rank 0 writes it into each checkpoint's
state, so that a resumed run carries on the history of the checkpoint it resumed from and its ``summary.json`` covers
the whole run. Steps after that checkpoint, which a resume trains again, are not in it. A checkpoint written before
histories were kept starts the history at its step.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", "tokens"}
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # {"step", "path"}
    segments: list[dict[str, Any]] = field(default_factory=list)  # {"first_step", "last_step", "layout", "seconds", ...}
    skipped_steps: int = 0

    @classmethod
    def from_dict(cls, saved: dict[str, Any] | None) -> History:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in (saved or {}).items() if key in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def begin(self, step: int, layout: str, tokens_per_step: int, resumed_from: str = "") -> None:
        """A new segment of the run: trained from ``step`` on at ``layout``."""
        self.segments.append({"first_step": step, "last_step": step, "layout": layout, "seconds": 0.0,
                              "tokens_per_step": tokens_per_step, "resumed_from": resumed_from})

    def step(self, step: int, loss: float, lr: float, seconds_so_far: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.lrs.append(lr)
        self.segments[-1].update(last_step=step, seconds=round(seconds_so_far, 3))

    @property
    def seconds(self) -> float:
        return sum(segment["seconds"] for segment in self.segments)

    @property
    def tokens(self) -> int:
        return sum((s["last_step"] - s["first_step"]) * s["tokens_per_step"] for s in self.segments)


@dataclass
class Summary:
    """``SAVE_DIR/summary.json``: the whole run (all segments); ``losses`` are those of ``history["steps"]``."""

    steps: int = 0
    first_loss: float = math.nan
    last_loss: float = math.nan
    eval_loss: float = math.nan
    eval_tokens: int = 0  # the predicted tokens eval_loss is the mean over
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0  # steps with a non-finite loss or gradient norm, skipped (see Trainer.step)
    stopped: str = ""  # what stopped the run before train.max_steps (a signal), else ""
    history: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, history: History, steps: int, stopped: str = "") -> Summary:
        last_eval = history.evals[-1] if history.evals else {"loss": math.nan, "tokens": 0}
        seconds = history.seconds
        return cls(steps=steps, first_loss=history.losses[0] if history.losses else math.nan,
                   last_loss=history.losses[-1] if history.losses else math.nan, eval_loss=last_eval["loss"],
                   eval_tokens=last_eval["tokens"], tokens_per_s=history.tokens / seconds if seconds else 0.0,
                   seconds=seconds, losses=list(history.losses), skipped_steps=history.skipped_steps,
                   stopped=stopped, history={k: v for k, v in history.to_dict().items() if k != "losses"})

    def line(self) -> str:
        evaluated = "" if math.isnan(self.eval_loss) else (
            f"eval loss {self.eval_loss:.3f} over {self.eval_tokens:,} tokens (ppl {math.exp(self.eval_loss):.1f}), ")
        segments = len(self.history.get("segments", ()))
        resumed = f" ({segments} segments: resumed {segments - 1}x)" if segments > 1 else ""
        return (f"done: {self.steps} steps{resumed} in {self.seconds:.0f} s, loss {self.first_loss:.3f} -> "
                f"{self.last_loss:.3f}, {evaluated}{self.tokens_per_s:,.0f} tokens/s")

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)
