"""Pictures of runs: loss (training and held-out) and learning rate against the optimizer step, from ``summary.json``.

A run with ``train.save_dir`` draws its own (``SAVE_DIR/summary.png``) at its end when matplotlib is installed (the
``plot`` extra; ``make`` installs it); ``hybrid-ds plot RUN_DIR [RUN_DIR ...] -o OUT.png`` draws one or several runs
on the same axes to compare them. Pure Python: no torch.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from hybrid_ds.errors import UserError

SUMMARY, PICTURE = "summary.json", "summary.png"


def pyplot(key: str) -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or one line naming ``key`` and the install."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(key, "needs matplotlib: pip install 'hybrid_ds[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_run(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY if folder.is_dir() else folder
    if not path.is_file():
        raise UserError("RUN_DIR", f"{folder} has no {SUMMARY} (a run writes it at its end, or when stopped)")
    summary = json.loads(path.read_text())
    history = summary.get("history") or {}
    steps = history.get("steps") or list(range(summary["steps"] - len(summary["losses"]) + 1, summary["steps"] + 1))
    return {"label": path.parent.name, "steps": steps, "losses": summary["losses"], "lrs": history.get("lrs", []),
            "evals": history.get("evals", [])}


def plot_runs(folders: list[Path], out: Path) -> Path:
    """Loss (lines: training; dots: held-out) over learning rate, one colour per run, against the optimizer step."""
    runs = [read_run(Path(folder)) for folder in folders]
    plt = pyplot("plot")
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for run, color in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(runs)):
        finite = [(s, v) for s, v in zip(run["steps"], run["losses"]) if math.isfinite(v)]
        loss_ax.plot([s for s, _ in finite], [v for _, v in finite], color=color, label=f"{run['label']} train")
        if run["evals"]:
            loss_ax.plot([e["step"] for e in run["evals"]], [e["loss"] for e in run["evals"]], "o", color=color,
                         label=f"{run['label']} eval")
        if run["lrs"]:
            lr_ax.plot(run["steps"], run["lrs"], color=color)
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_after_run(save_dir: Path) -> Path | None:
    """The run's own picture, ``SAVE_DIR/summary.png``, when matplotlib is installed (else None: nothing drawn)."""
    try:
        return plot_runs([save_dir], save_dir / PICTURE)
    except UserError:
        return None


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plot", help="draw loss and learning rate of one or more runs (their summary.json)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's train.save_dir (or its summary.json)")
    p.add_argument("-o", "--out", default="plot.png", help="the PNG to write (default plot.png)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    out = plot_runs([Path(run) for run in args.runs], Path(args.out))
    print(f"wrote {out}")
    return 0
