"""Cost of the factorization step per layer shape, two code versions side by side, idle or beside a busy neighbour.

Why: issue 32 (item 5) measured kfac's factorization of Qwen2.5-0.5B's shapes at 183 s against fwsvd's 85 s, and
the demo's 12-layer factorization going from 6 s to 65 s when a second process took a core. What a layer costs
does not depend on trained weights or real statistics, only on its shape and on which sides are full matrices,
so each layer here is a seeded random weight with Grams made from seeded random activations (`--tokens` rows).

For every shape of a model (the decoder projections of one layer of Qwen2.5-0.5B, or the encoder Linears of one
MiniLM-L6 layer), a worker process times what `compress_` does per layer: the method's weighting (`build`), the
weighted spectrum the global allocation reads, and the factorization at half the dense parameters
(`low_rank_from_linear`), median of `--repeats`. Each `--code` folder (a checkout of the package, e.g. the
commit before a change, made with `git archive`) runs in its own worker, the arms alternating `--rounds` times.
With `--neighbour`, a second process keeps one core busy (a one-thread float32 matmul loop) the whole time, as
another job on a shared machine would. The model total is the per-layer sum times the model's layers.

    git archive <commit> fwsvd_export | tar -x -C /tmp/before
    python benchmarks/factorization_cost.py --code /tmp/before,. --json benchmarks/results/factorization_cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import run_info, system_busy_s

ROOT = Path(__file__).resolve().parents[1]
# (out, in) of one block's Linears, and the number of blocks
SHAPES = {
    "qwen2.5-0.5b": (
        {"q": (896, 896), "k": (128, 896), "v": (128, 896), "o": (896, 896)}
        | {"gate": (4864, 896), "up": (4864, 896), "down": (896, 4864)},
        24,
    ),
    "minilm-l6": (
        {"q": (384, 384), "k": (384, 384), "v": (384, 384), "o": (384, 384)} | {"in": (1536, 384), "out": (384, 1536)},
        6,
    ),
}


def worker(model: str, methods: list[str], tokens: int, max_gram: int, repeats: int, threads: int) -> dict:
    """Median seconds of build, spectrum and factorize per shape and method, with the package on sys.path."""
    import torch
    from torch import nn

    from fwsvd_export.core.lowrank import low_rank_from_linear, weighted_spectrum
    from fwsvd_export.core.methods import METHODS
    from fwsvd_export.core.statistics import LayerStats

    try:  # each layer on the threads compress_ gives it, in versions that choose them
        from fwsvd_export.core.threads import threads_for
    except ImportError:

        def threads_for(out_features: int, in_features: int) -> contextlib.AbstractContextManager[None]:
            return contextlib.nullcontext()

    if threads:
        torch.set_num_threads(threads)
    out: dict = {}
    for seed, (name, (d_out, d_in)) in enumerate(SHAPES[model][0].items()):
        gen = torch.Generator().manual_seed(seed)
        linear = nn.Linear(d_in, d_out)
        x = torch.randn(tokens, d_in, generator=gen) * torch.linspace(0.1, 3, d_in)
        g = torch.randn(tokens, d_out, generator=gen) * torch.linspace(0.2, 2, d_out)

        def gram(t: torch.Tensor) -> torch.Tensor:
            return t.T @ t / tokens if t.shape[1] <= max_gram else t.square().mean(0)

        stats = LayerStats({"input_gram": gram(x), "output_gram": gram(g), "fisher": x.square().mean(0)})
        rank = d_in * d_out // (2 * (d_in + d_out))
        for method in methods:
            times: dict[str, list[float]] = {"build": [], "spectrum": [], "factorize": []}
            for _ in range(repeats):
                with threads_for(d_out, d_in):
                    clock = time.perf_counter()
                    w = METHODS[method].build(stats, 0.01)
                    times["build"].append(time.perf_counter() - clock)
                    clock = time.perf_counter()
                    weighted_spectrum(linear.weight, w.left, w.right)
                    times["spectrum"].append(time.perf_counter() - clock)
                    clock = time.perf_counter()
                    low_rank_from_linear(linear, rank, w.left, w.right)
                    times["factorize"].append(time.perf_counter() - clock)
            out[f"{name}/{method}"] = {k: statistics.median(v) for k, v in times.items()}
    return out


def neighbour() -> subprocess.Popen:
    """A process that keeps one core busy until killed."""
    code = "import torch\ntorch.set_num_threads(1)\na=torch.randn(512,512)\nwhile True: a@a"
    return subprocess.Popen([sys.executable, "-c", code])


def run_arm(code: str, args: argparse.Namespace, threads: int) -> dict:
    env = os.environ | {"PYTHONPATH": str(Path(code).resolve())}
    argv = [sys.executable, __file__, "--_worker", args.model, "--methods", args.methods, "--tokens", str(args.tokens)]
    argv += ["--max-gram", str(args.max_gram), "--repeats", str(args.repeats), "--threads", str(threads)]
    busy, wall, mine = system_busy_s(), time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = after.ru_utime + after.ru_stime - mine.ru_utime - mine.ru_stime
    others = (system_busy_s() - busy - worker_cpu) / (time.perf_counter() - wall)
    return {"layers": json.loads(done.stdout.strip().splitlines()[-1]), "other_cores": others}


def tables(result: dict) -> str:
    """Per arm (code, threads) and method: the model's total seconds, per stage, median over rounds."""
    model = result["args"]["model"]
    blocks = SHAPES[model][1]
    arms: dict[tuple[str, int, str], dict[str, list[float]]] = {}
    for run in result["runs"]:
        for key, times in run["layers"].items():
            method = key.split("/")[1]
            arm = arms.setdefault((run["code"], run["threads"], method), {"other": []})
            for stage, seconds in times.items():
                arm.setdefault(f"{run['round']}/{stage}", []).append(seconds)
            arm["other"].append(run.get("other_cores", float("nan")))
    lines = [
        f"`{result['run']['command']}`, {result['run']['date']}, {result['run']['machine']}",
        "",
        f"{model}: {blocks} blocks; seconds for the whole model (median over rounds of the per-layer sums); "
        "other cores: the cores other processes kept busy meanwhile (the neighbour's included)",
        "",
        "| code | threads | method | build | spectrum | factorize | build + factorize | all three | other cores |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (code, threads, method), sums in arms.items():
        rounds = sorted({k.split("/")[0] for k in sums if "/" in k})
        stage = {
            s: statistics.median(blocks * sum(sums[f"{r}/{s}"]) for r in rounds)
            for s in ("build", "spectrum", "factorize")
        }
        lines.append(
            f"| {code} | {threads or 'default'} | {method} | {stage['build']:.1f} | {stage['spectrum']:.1f} | "
            f"{stage['factorize']:.1f} | {stage['build'] + stage['factorize']:.1f} | {sum(stage.values()):.1f} | "
            f"{statistics.median(sums['other']):.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--methods", default="fwsvd,kfac")
    parser.add_argument("--code", default=".", help="comma-separated package folders, one arm each")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--max-gram", type=int, default=8192, help="wider Gram sides are gathered as diagonals")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", default="0", help="comma-separated torch thread counts (0: torch's default)")
    parser.add_argument("--neighbour", action="store_true", help="keep one core busy with another process")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report", action="store_true", help="print the tables of an existing --json file")
    parser.add_argument("--_worker", dest="worker")
    args = parser.parse_args()
    if args.report:
        print(tables(json.loads(args.json.read_text())))
        return 0
    if args.worker:
        print(
            json.dumps(
                worker(
                    args.worker, args.methods.split(","), args.tokens, args.max_gram, args.repeats, int(args.threads)
                )
            )
        )
        return 0
    busy = neighbour() if args.neighbour else None
    runs: list[dict] = []
    try:
        for r in range(args.rounds):
            for code in args.code.split(","):
                for threads in (int(t) for t in args.threads.split(",")):
                    runs.append({"code": code, "threads": threads, "round": r, **run_arm(code, args, threads)})
                    print(json.dumps(runs[-1]), flush=True)
    finally:
        if busy is not None:
            busy.kill()
    kept = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "report")}
    result = {"run": run_info(__file__), "args": kept, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
