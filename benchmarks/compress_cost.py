"""The statistics pass against the factorization inside one `compress_` call, two code versions side by side.

Why: issue 32 (item 5) asks for kfac's factorization to take at most its statistics pass, and saw 21.5 s of
statistics against 183 s of factorization on Qwen2.5-0.5B's shapes at 1,024 calibration tokens. The per-shape
timings of factorization_cost.py leave out what the pipeline adds around them (the weighting built twice under a
global budget, the model's own layers); this runs the whole step: a seeded random Llama-style decoder of the
shapes given (random weights: what the steps cost does not depend on training), `--batches` x `--batch` x
`--tokens` random token ids scored by the text-generation task's loss, then `compress_` with kfac on every
decoder Linear. `CompressionResult.seconds` reports the two steps. Each `--specs` entry and each `--code` folder
(e.g. `git archive <commit> fwsvd_export | tar -x -C /tmp/before`) runs in a fresh worker process (its peak
resident memory recorded; one the system kills is recorded as failed), the code versions alternating.

    python benchmarks/compress_cost.py --code /tmp/before,. --json benchmarks/results/compress_cost.json
    python benchmarks/compress_cost.py --report --json benchmarks/results/compress_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from measure import run_info

QWEN = {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2, "vocab": 151936}
SPECS = "ratio=0.5;budget=0.5,allocation_check=0;budget=0.5;ratio=0.5,max_gram_size=4863"


def parse_spec(text: str) -> dict[str, float | int]:
    """'budget=0.5,max_gram_size=4863' -> {'budget': 0.5, 'max_gram_size': 4863}"""
    pairs = (item.split("=") for item in text.split(","))
    return {key: int(value) if value.isdigit() else float(value) for key, value in pairs}


def worker(args: argparse.Namespace) -> dict:
    """Seconds of each compress_ step for one spec, and the process's peak memory, with the package of
    PYTHONPATH."""
    from checkpointing import build

    from fwsvd_export.core.compress import compress_
    from fwsvd_export.core.spec import CompressionSpec
    from fwsvd_export.stages.tasks import TASKS

    model, batches = build(args)
    spec = CompressionSpec(method="kfac", **parse_spec(args.specs))  # the family's attention and MLP projections
    dense = sum(p.numel() for p in model.parameters())
    result = compress_(model, spec, batches, TASKS["text-generation"].loss, progress=False)
    return {
        "seconds": result.seconds,
        "model_params_kept": sum(p.numel() for p in model.parameters()) / dense,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def run_spec(code: str, spec: str, args: argparse.Namespace) -> dict:
    """One spec in a fresh worker; a worker the system killed (out of memory) is recorded, not fatal."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(code).resolve()), str(Path(__file__).parent)])}
    argv = [sys.executable, __file__, "--_worker", "--specs", spec, "--tokens", str(args.tokens)]
    argv += ["--batch", str(args.batch), "--batches", str(args.batches)]
    argv += [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in QWEN]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode:
        return {"failed": f"exit {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(result: dict) -> str:
    """Per code and spec: the median seconds of the two steps over rounds, their ratio and the peak memory."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for run in result["runs"]:
        rows.setdefault((run["code"], run["spec"]), []).append(run)
    lines = [
        f"`{result['run']['command']}`, {result['run']['date']}, {result['run']['machine']}",
        "",
        "| code | spec | statistics s | factorize s | factorize / statistics | allocation check s | peak GiB | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (code, spec), runs in rows.items():
        done = [r for r in runs if "failed" in r] or runs
        if "failed" in done[0]:
            lines.append(f"| {code} | {spec} | - | - | {done[0]['failed']} | - | - | {len(runs)} |")
            continue
        stats = statistics.median(r["seconds"]["statistics"] for r in runs)
        factorize = statistics.median(r["seconds"]["factorize"] for r in runs)
        checks = [r["seconds"]["allocation check"] for r in runs if "allocation check" in r["seconds"]]
        check = f"{statistics.median(checks):.1f}" if checks else "-"  # before it was timed apart: in factorize
        peak = max(r["peak_rss_gib"] for r in runs)
        lines.append(
            f"| {code} | {spec} | {stats:.1f} | {factorize:.1f} | {factorize / stats:.2f} | {check} | {peak:.1f} "
            f"| {len(runs)} |"
        )
    return "\n".join(lines)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoder's shapes (Qwen2.5-0.5B's by default) and its calibration batches, as `checkpointing.build`
    reads them."""
    for key, value in QWEN.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--batches", type=int, default=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--specs", default=SPECS, help="';'-separated CompressionSpec settings, key=value,...")
    parser.add_argument("--code", default=".", help="comma-separated package folders, one arm each")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report", action="store_true", help="print the table of an existing --json file")
    parser.add_argument("--_worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        print(table(json.loads(args.json.read_text())))
        return 0
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    runs = []
    for r in range(args.rounds):
        for spec in args.specs.split(";"):
            for code in args.code.split(","):
                runs.append({"code": code, "spec": spec, "round": r, **run_spec(code, spec, args)})
                print(json.dumps(runs[-1]), flush=True)
    kept = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "report")}
    result = {"run": run_info(__file__), "args": kept, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
