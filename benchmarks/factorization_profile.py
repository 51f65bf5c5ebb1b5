"""Where kfac's factorization step spends its time on Qwen2.5-0.5B's shapes, per decoder block, beside the pass.

Why: issue 32 asks for the factorization to take at most the statistics pass; at 1 x 1,024 calibration tokens it
took about twice as long (compress_cost.py). This runs `compress_` as compress_cost.py does (the seeded random
decoder of `checkpointing.build`, random token ids scored by the text-generation loss, kfac at half the
parameters with uniform ranks) with torch's profiler around the factorization step alone, and sums the
operators' own time by kind: the eigendecompositions, the matrix products, Cholesky factors and triangular
solves, and the rest (copies, casts, checks); what no operator accounts for is Python and the allocator. Every
figure is given per decoder block, beside the statistics pass per block.

    python benchmarks/factorization_profile.py --json benchmarks/results/factorization_profile.json
    python benchmarks/factorization_profile.py --report --json benchmarks/results/factorization_profile.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from compress_cost import add_model_arguments

from measure import run_info

KINDS = {
    "eigendecompositions": ("aten::_linalg_eigh",),
    "matrix products": ("aten::mm", "aten::addmm", "aten::addmm_"),
    "Cholesky and triangular solves": ("aten::linalg_cholesky_ex", "aten::linalg_solve_triangular"),
}


def kind(op: str) -> str:
    return next((k for k, ops in KINDS.items() if op in ops), "other operators")


def measure(args: argparse.Namespace) -> dict:
    from checkpointing import build

    import fwsvd_export.core.compress as compress
    from fwsvd_export.core.spec import CompressionSpec
    from fwsvd_export.stages.tasks import TASKS

    model, batches = build(args)
    ops: dict[str, dict[str, float]] = {}
    factorize = compress._factorize

    def profiled(*step_args):  # type: ignore[no-untyped-def]
        with torch.profiler.profile() as prof:
            factorize(*step_args)
        for event in prof.key_averages():
            ops[event.key] = {"calls": event.count, "self_s": event.self_cpu_time_total / 1e6}

    compress._factorize = profiled
    spec = CompressionSpec(method="kfac", ratio=args.ratio)
    result = compress.compress_(model, spec, batches, TASKS["text-generation"].loss, progress=False)
    return {"run": run_info(__file__), "layers": args.layers, "seconds": result.seconds, "ops": ops}


def table(result: dict) -> str:
    blocks, seconds = result["layers"], result["seconds"]
    spent: dict[str, float] = {}
    for op, row in result["ops"].items():
        spent[kind(op)] = spent.get(kind(op), 0.0) + row["self_s"]
    spent["Python and the allocator (no operator)"] = seconds["factorize"] - sum(spent.values())
    lines = [
        f"`{result['run']['command']}`, {result['run']['date']}, {result['run']['machine']}",
        "",
        "| per decoder block | seconds | / statistics pass |",
        "|---|---:|---:|",
        f"| statistics pass | {seconds['statistics'] / blocks:.3f} | 1.00 |",
        f"| factorization | {seconds['factorize'] / blocks:.3f} | {seconds['factorize'] / seconds['statistics']:.2f} |",
    ]
    for name, s in sorted(spent.items(), key=lambda item: -item[1]):
        lines.append(f"| - {name} | {s / blocks:.3f} | {s / seconds['statistics']:.2f} |")
    top = sorted(result["ops"].items(), key=lambda item: -item[1]["self_s"])[:8]
    lines += ["", "| operator | calls per block | seconds per block |", "|---|---:|---:|"]
    lines += [f"| {op} | {row['calls'] / blocks:g} | {row['self_s'] / blocks:.3f} |" for op, row in top]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--report", action="store_true", help="print the tables of an existing --json file")
    args = parser.parse_args()
    if not args.report:
        args.json.write_text(json.dumps(measure(args), indent=1) + "\n")
    print(table(json.loads(args.json.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
