"""Deep cuts on decoders trained until their held-out perplexity stops improving.

The decoder is lm_methods.py's (its data, vocabulary, shape arguments and cache), trained with `--converge`:
the tool's schedule, a held-out tenth of the training batches scored after each epoch, stopped once it no
longer improves (patience 2) and the best epoch kept. On it:
- kfac removes `--ratios` of the decoder Linear weights (kept fractions) with uniform and with global ranks,
  the allocation check off; the targets are 1.05x dense perplexity at 40% removed and 1.15x at 60%;
- at each of `--budgets` every candidate the allocation check weighs (uniform, global, the blends) is scored
  by the summed held-out calibration loss the check sees and by test perplexity, beside the check's own pick
  (hard_models.study with a perplexity scoring): the pick should be at least as good as uniform on test;
- the check's pick at `--recovery-budget` is recovered by distillation from the dense model on unlabelled
  training text the decoder never trained on (`--recovery-batches` of lm_methods' training batches from the
  end), as a recipe's `finetune: {objective: distill, gradient_checkpointing: true}` runs it with the tool's
  default schedule; the target is 1.08x dense perplexity at 60% removed.

    apt-get install wordnet-base
    OMP_NUM_THREADS=1 python benchmarks/lm_deep.py --converge --steps 500 --epochs 10 --json benchmarks/results/lm_deep.json
    python benchmarks/lm_deep.py --report --json benchmarks/results/lm_deep.json   # its tables
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fwsvd_export.config import FinetuneSpec
from fwsvd_export.core import CompressionSpec, compress_
from fwsvd_export.core.batch import Batch
from fwsvd_export.stages.finetune import finetune_

sys.path.insert(0, str(Path(__file__).parent))
from hard_models import Scoring, study  # noqa: E402
from lm_methods import TARGET, TASK, allocation_fields, arguments, build_model, cache_folder, lm_data, perplexity  # noqa: E402

from measure import run_info  # noqa: E402


def check_view(model: nn.Module, batches: list[Batch]) -> dict:
    """What the allocation check sees on its held-out batches: the summed loss and its per-batch values."""
    with torch.no_grad():
        losses = [float(TASK.loss(model, b)) for b in batches]
    return {"loss": sum(losses), "batch_losses": losses}


DECODER = Scoring("perplexity", TARGET, TASK.loss, check_view, perplexity)


def cut(model: nn.Module, kept: float, allocation: str, calibration: list[Batch], cache: str) -> nn.Module:
    """A kfac copy of `model` keeping `kept` of the targeted weights, uniform or global (unchecked) ranks."""
    spec = CompressionSpec(method="kfac", target=TARGET, cache_dir=cache, **allocation_fields(kept, allocation))
    small = copy.deepcopy(model)
    compress_(small, spec, calibration, TASK.loss, False)
    return small.eval()


def recover(student: nn.Module, teacher: nn.Module, text: list[Batch], test: list[Batch], args) -> dict:
    """Distillation from the dense decoder on unlabelled text, the tool's default schedule, checkpointed."""
    spec = FinetuneSpec(
        epochs=args.recovery_epochs,
        learning_rate=args.recovery_lr,
        objective="distill",
        gradient_checkpointing=True,
    )
    start = time.perf_counter()
    curve = finetune_(student, TASK, text, spec, args.seed, True, teacher=teacher)
    return {
        "epochs": args.recovery_epochs,
        "learning_rate": args.recovery_lr,
        "batches": len(text),
        "train_loss": curve.train_loss,
        "heldout_loss": curve.heldout_loss,
        "best_epoch": curve.best_epoch,
        "seconds": time.perf_counter() - start,
        "perplexity": perplexity(student.eval(), test),
    }


def measure(args, argv: list[str]) -> dict:
    _, vocab, train_batches, calibration, test, data = lm_data(args)
    model, training = build_model(args, vocab, train_batches)
    dense = perplexity(model, test)
    print(json.dumps({"training": training, "dense_perplexity": dense}), flush=True)
    cache = str(Path(args.cache) / "statistics")
    out = {
        "run": run_info(__file__, argv),
        "model": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads")},
        "model_folder": str(cache_folder(args, vocab)),
        "data": data,
        "training": training,
        "dense_perplexity": dense,
        "cuts": [],
        "budgets": [],
    }
    for kept in args.ratios:
        for allocation in ("uniform", "global"):
            ppl = perplexity(cut(model, kept, allocation, calibration, cache), test)
            out["cuts"].append({"kept": kept, "allocation": allocation, "perplexity": ppl, "ratio": ppl / dense})
            print(json.dumps(out["cuts"][-1]), flush=True)
    for budget in args.budgets:
        row, checked = study(model, budget, calibration, test, cache, DECODER)
        if budget == args.recovery_budget and args.recovery_epochs:
            text = train_batches[-args.recovery_batches :]
            row["recovery"] = recover(checked, model, text, test, args)
            print(json.dumps({"recovered": row["recovery"]["perplexity"], "dense": dense}), flush=True)
        out["budgets"].append(row)
    return out


def report(path: Path) -> None:
    """Print a results file's tables as markdown (the log's tables are this output)."""
    out = json.loads(path.read_text())
    dense, m = out["dense_perplexity"], out["model"]
    t = out["training"]
    print(f"`{out['run']['command']}`, {out['run']['date']}, {out['run']['machine']}\n")
    print(
        f"Decoder: hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads ({m['kv_heads']} KV), MLP "
        f"{m['intermediate']}; trained {t['epochs']} epochs (best {t['best_epoch']}, held-out loss per epoch "
        f"{', '.join(f'{x:.3f}' for x in t['heldout_loss'])}); dense test perplexity {dense:.2f}\n"
    )
    print("| removed | allocation (check off) | perplexity | x dense |\n|---|---|---|---|")
    for c in out["cuts"]:
        print(f"| {100 * (1 - c['kept']):.0f}% | {c['allocation']} | {c['perplexity']:.2f} | {c['ratio']:.3f} |")
    print("\n| kept | candidate | check loss ± se | test perplexity | x dense | picked |\n|---|---|---|---|---|---|")
    for b in out["budgets"]:
        for name, r in b["candidates"].items():
            n = len(r["batch_losses"])  # the summed loss's standard error, as the check reports it
            se = statistics.stdev(r["batch_losses"]) * math.sqrt(n) if n > 1 else 0.0
            picked = "**check**" if name == b["check_pick"] else ""
            ppl = r["test_perplexity"]
            print(
                f"| {b['budget']:g} | {name} | {r['loss']:.3f} ± {se:.3f} | {ppl:.2f} | {ppl / dense:.3f} | {picked} |"
            )
    for b in (b for b in out["budgets"] if "recovery" in b):
        r = b["recovery"]
        before = b["check_pick_test_perplexity"]
        print(
            f"\nDistillation recovery of the pick at {b['budget']:g} kept ({r['batches']} batches of unlabelled text, "
            f"{r['epochs']} epochs at most, learning rate {r['learning_rate']:g}, best epoch {r['best_epoch']}, "
            f"{r['seconds']:.0f} s): perplexity {before:.2f} ({before / dense:.3f}x) -> {r['perplexity']:.2f} "
            f"({r['perplexity'] / dense:.3f}x); held-out distillation loss per epoch "
            f"{', '.join(f'{x:.4f}' for x in r['heldout_loss'])}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = arguments()
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(ratios="0.6,0.4")
    parser.add_argument("--budgets", default="0.25,0.15,0.1", help="kept fractions the allocation check runs at")
    parser.add_argument("--recovery-budget", type=float, default=0.4, help="the budget whose check pick is recovered")
    parser.add_argument("--recovery-epochs", type=int, default=3, help="0: no recovery")
    parser.add_argument("--recovery-lr", type=float, default=3e-4)
    parser.add_argument("--recovery-batches", type=int, default=150, help="training batches from the end")
    parser.add_argument("--report", action="store_true", help="print the tables of an existing --json file")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.json is None:
        parser.error("--json is required")
    if args.report:
        report(args.json)
        return 0
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.budgets = [float(b) for b in args.budgets.split(",")]
    if args.recovery_epochs and args.recovery_budget not in args.budgets:
        args.budgets.append(args.recovery_budget)
    out = measure(args, argv)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    report(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
