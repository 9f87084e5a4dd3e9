"""The performance tables of docs/performance.md (linked from the README), rendered from the committed result files
(never typed by hand).

    python bench/readme_tables.py           # rewrite docs/performance.md's generated blocks from the files
    python bench/readme_tables.py --check   # exit 1 if docs/performance.md differs from what the files give

A generated block sits between ``<!-- generated from FILE by bench/readme_tables.py -->`` and
``<!-- end generated -->``; FILE is the result it is rendered from: ``bench/results/performance.json``
(``python bench/run_all.py --quick``) or a GPU run under ``bench/measured/`` (``python bench/gpu.py``).
tests/test_bench_smoke.py runs ``--check``, so a figure in those tables cannot go stale.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO  # noqa: E402
from run_all import table  # noqa: E402

README = REPO / "docs" / "performance.md"  # the page the tables live on
BLOCK = re.compile(r"(<!-- generated from (\S+) by bench/readme_tables.py -->\n)(.*?)(<!-- end generated -->)", re.S)


def versions(provenance: dict[str, Any]) -> str:
    """'torch 2.13.0+cpu, DeepSpeed 0.19.8, transformers 5.24.0' from a result's provenance."""
    names = {"torch": "torch", "deepspeed": "DeepSpeed", "transformers": "transformers", "peft": "peft"}
    found = provenance.get("versions", {})
    return ", ".join(f"{label} {found[key]}" for key, label in names.items() if found.get(key))


def performance(result: dict[str, Any]) -> list[str]:
    """bench/run_all.py's table, and the line that says where, when and with what it was measured."""
    p = result["provenance"]
    machine = p.get("machine", {})
    where = f"{machine.get('cores', '?')} cores ({machine.get('cpu', '?')}, {machine.get('system', '?')})"
    seconds = sum(result.get("seconds", {}).values())
    return [*table(result), "",
            f"Measured by `{p['command']}` on {p['date'][:10]}: {seconds:.0f} s on {where}; {versions(p)}."]


def gpu(result: dict[str, Any]) -> list[str]:
    """bench/gpu.py's result as a table of tokens/s, step-time ratio and MFU."""
    rows = ["| model | micro x accum | hybrid_ds tokens/s | DeepSpeed on HF tokens/s | step-time ratio (pairs' 95% CI) "
            "| MFU of the spec's bf16 peak (of the measured GEMM) |", "|---|---|---|---|---|---|"]
    for r in result["results"]:
        low, high = r["pair_ratio_ci95"]
        mfu = (f"{r['mfu_spec_ours']:.1%} vs {r['mfu_spec_baseline']:.1%} "
               f"({r['mfu_measured_ours']:.1%} vs {r['mfu_measured_baseline']:.1%})")
        rows.append(f"| {r['model']} ({r['params'] / 1e6:,.0f}M) | {r['micro_batch']} x {r['grad_accum']} "
                    f"| {r['tokens_per_s_ours']:,.0f} | {r['tokens_per_s_baseline']:,.0f} "
                    f"| {r['ratio']:.3f} ({low:.3f}-{high:.3f}) | {mfu} |")
    first = result["results"][0]
    p = result.get("provenance")
    stamp = (f"`{p['command']}` on {p['date'][:10]}, {versions(p)}" if p else
             f"torch {result['torch']} (the file predates the versions stamp: DeepSpeed and transformers unrecorded)")
    rows += ["", f"{result['device']}; spec peak {first['spec_peak_flops'] / 1e12:.0f} TFLOP/s, measured bf16 GEMM "
                 f"{first['gemm_peak_flops'] / 1e12:.0f} TFLOP/s; {stamp}."]
    return rows


def renderer(path: str) -> Callable[[dict[str, Any]], list[str]]:
    return performance if path.endswith("performance.json") else gpu


def render(text: str) -> str:
    """``text`` with every generated block rendered anew from its file."""
    def block(match: re.Match) -> str:
        result = json.loads((REPO / match.group(2)).read_text())
        return match.group(1) + "\n".join(renderer(match.group(2))(result)) + "\n" + match.group(4)

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the files give")
    args = parser.parse_args(argv)
    text = README.read_text()
    fresh = render(text)
    if args.check:
        if fresh != text:
            print("docs/performance.md's generated tables differ from their result files: run python bench/readme_tables.py")
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
