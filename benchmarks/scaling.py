"""How time and host memory of a whole run grow with model size, and what 2 processes buy.

Three decoders built from configurations, seeded random weights (the cost of a pass does not depend
on training), saved with a word-level tokenizer of exactly their vocabulary size (WordNet gloss words
by frequency, then filler tokens), nothing downloaded:

- ``llama-25m``: Llama in SmolLM's proportions (head 64, 3 query heads per KV head, MLP 2.67x hidden,
  tied embeddings), hidden 384, MLP 1024, 8 layers, vocabulary 32000;
- ``smollm-135m``: SmolLM-135M's configuration (Llama, hidden 576, MLP 1536, 30 layers, 9 heads,
  3 KV heads, vocabulary 49152, tied);
- ``qwen2.5-0.5b``: Qwen2.5-0.5B's configuration (Qwen2, hidden 896, MLP 4864, 24 layers, 14 heads,
  2 KV heads, q/k/v biases, vocabulary 151936, tied).

Each runs the whole tool through its CLI, ``python -m fwsvd_export run RECIPE -o DIR`` (statistics,
factorization, checkpoint, ONNX export with the key/value cache, ONNX Runtime validation), with kfac
and with fwsvd, every decoder projection kept at `--ratio` of its weights (or, with `--budget`, that share
of them under a global allocation, its check off; with `--one-at-a-time`, the final timing holds one
ONNX Runtime session at a time), on WordNet glosses packed
into `--batches` calibration batches of `--batch` x `--tokens` tokens and `--eval-blocks` held-out
blocks. Stage seconds and peak RSS per stage come from the run's report.json; beside them, the
process tree's peak RSS (sampled every 0.5 s) and, per stage, how many cores other processes kept
busy (/proc/stat minus the run's own CPU time): the machine is shared. `--distributed MODEL` adds, on
that model, ``torchrun --nproc-per-node 2`` with OMP_NUM_THREADS=1 per process against the one-process
run (2 threads). `--library DIR` runs the tool of another checkout (a worktree of an older commit, for
an A/B on one machine); each row records the commit it ran.

Results accumulate in the JSON (a run is replaced when measured again), and every invocation then
refits: per stage and method, the power-law exponent of seconds and of peak RSS in the parameter
count; the measured peak against the estimate fp32 weights + one micro-batch's activations + the
statistics accumulators + one layer's factorization workspace; and, on paper, 7B and 70B on one
8-GPU node. `--markdown` prints the tables.

    python benchmarks/scaling.py --json benchmarks/results/scaling.json --distributed smollm-135m
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml
from lm_methods import read_glosses

from measure import run_info, system_busy_s

FAMILY: dict[str, dict] = {
    "llama-25m": {
        "model_type": "llama",
        "hidden_size": 384,
        "intermediate_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "vocab_size": 32000,
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
    },
    "smollm-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
    },
}
# On paper only: Llama-2-7B and Llama-2-70B's shapes (untied, vocabulary 32000).
PAPER = {
    "7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
}
METHODS = ("kfac", "fwsvd")
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]
# Stages in run order as report.json names them; "statistics" and "factorize" are the compress stage's parts.
STAGES = [
    "load model",
    "data",
    "export (dense)",
    "validate (dense)",
    "compress: statistics",
    "compress: factorize",
    "checkpoint",
    "export",
    "validate",
]
BYTES = 4  # fp32


# --- models, tokenizer, data --------------------------------------------------------------------------


def shapes(config: dict) -> dict:
    """Per-layer Linear shapes (in, out) of a Llama/Qwen2 block, and the parameter counts."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    linears = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    per_layer = sum(a * b for a, b in linears.values()) + 2 * h
    if config["model_type"] == "qwen2":
        per_layer += h + 2 * kv  # q/k/v biases
    embedding = config["vocab_size"] * h
    total = embedding * (1 if config["tie_word_embeddings"] else 2) + layers * per_layer + h
    return {
        "linears": linears,
        "kv_width": kv,
        "params": total,
        "params_non_embedding": layers * per_layer + h,
        "params_targeted": layers * sum(a * b for a, b in linears.values()),
    }


def build_tokenizer(vocab_size: int, glosses: list[str]):
    """A word-level tokenizer of exactly `vocab_size` ids: specials, gloss words by frequency, fillers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    counts = Counter(w for g in glosses for w, _ in split.pre_tokenize_str(g.lower()))
    words = [w for w, _ in counts.most_common(vocab_size - len(SPECIAL))]
    words += [f"<filler_{k}>" for k in range(vocab_size - len(SPECIAL) - len(words))]
    core = Tokenizer(models.WordLevel({w: k for k, w in enumerate(SPECIAL + words)}, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def build_model(name: str, folder: Path) -> None:
    """Save `name`'s seeded random model and its tokenizer into `folder` (skipped when already there)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").exists():
        return
    config = dict(FAMILY[name])
    tokenizer = build_tokenizer(config["vocab_size"], read_glosses())
    assert len(tokenizer) == config["vocab_size"]
    config.update(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == shapes(FAMILY[name])["params"]
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_data(folder: Path, args) -> dict[str, Path]:
    """Calibration and held-out text: shuffled WordNet glosses, one a line, just enough for the blocks
    asked (the tool joins the records' tokens with EOS and drops the tail shorter than a block; a
    word-level tokenizer makes as many tokens of a text whatever its vocabulary size)."""
    import random

    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    glosses = read_glosses()
    random.Random(0).shuffle(glosses)
    folder.mkdir(parents=True, exist_ok=True)
    paths, start = {}, 0
    for role, blocks in (("calibration", args.batches * args.batch), ("evaluation", args.eval_blocks)):
        tokens, end = 0, start
        while tokens < blocks * args.tokens:
            tokens += len(split.pre_tokenize_str(glosses[end])) + 1
            end += 1
        assert tokens // args.tokens == blocks
        paths[role] = folder / f"{role}.txt"
        paths[role].write_text("\n".join(glosses[start:end]) + "\n")
        start = end
    return paths


def recipe(model_dir: Path, data: dict[str, Path], method: str, args, name: str) -> dict:
    share = {"budget": args.budget, "allocation_check": 0.0} if args.budget else {"ratio": args.ratio}
    compression = {"method": method, **share, "gradient_checkpointing": True, "damping": 0.01}
    if method == "kfac" and name in args.diagonal_mlp:
        # Full Grams of the MLP-wide sides would not fit in this machine's memory: see the module doc.
        compression["max_gram_size"] = FAMILY[name]["intermediate_size"] - 1
    return {
        "model": {"path": str(model_dir), "task": "text-generation"},
        "data": {
            "calibration": {"path": str(data["calibration"])},
            "evaluation": {"path": str(data["evaluation"])},
            "max_length": args.tokens,
            "batch_size": args.batch,
        },
        "compression": compression,
        "export": {"precisions": ["fp32"], "with_past": True},
        "validation": {
            "providers": [{"name": "cpu", "required": True}],
            "max_metric_loss": 0.05,
            "prompts": ["the act of"],
            "generation_tokens": 4,
            "latency": {
                "shapes": [f"1x{args.tokens // 2}"],
                "warmup": 1,
                "runs": 2,
                "rounds": 1,
                "one_at_a_time": args.one_at_a_time,
            },
        },
    }


# --- one run, watched ---------------------------------------------------------------------------------


class Watch:
    """Samples, every `period` s, the process tree's resident memory and CPU time and the machine's busy
    CPU seconds, so that stages can be given the cores other processes kept busy meanwhile."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.root, self.me, self.period = psutil.Process(pid), psutil.Process(), period
        self.samples: list[tuple[float, float, float]] = []  # (time, machine busy s, tree CPU s)
        self.peak_mb, self.cpu_s = 0.0, 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        seen: dict[int, float] = {}
        while not self.done.is_set():
            rss = 0
            try:
                tree = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in tree:
                try:
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    seen[p.pid] = t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            self.cpu_s = sum(seen.values())
            self.peak_mb = max(self.peak_mb, rss / 2**20)
            watching = sum(self.me.cpu_times()[:2])  # this process's own polling is not "other processes"
            self.samples.append((time.perf_counter(), system_busy_s(), self.cpu_s + watching))
            self.done.wait(self.period)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def others_cores(self, start: float, end: float) -> float | None:
        """Mean cores other processes kept busy between two perf_counter times."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return None
        (t0, b0, c0), (t1, b1, c1) = inside[0], inside[-1]
        return round(max(0.0, (b1 - b0) - (c1 - c0)) / (t1 - t0), 2) if t1 > t0 else None


def launch(command: list[str], env: dict, log: Path, library: Path) -> dict:
    """Run `command` in `library` (its ``-m fwsvd_export`` is that checkout's), watched; wall seconds, exit
    code, tree peak RSS, load, other processes' cores."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=library)
        watch = Watch(proc.pid)
        code = proc.wait()
    end = time.perf_counter()
    watch.stop()
    return {
        "exit_code": code,
        "wall_s": round(end - start, 1),
        "tree_peak_rss_mb": round(watch.peak_mb),
        "tree_cpu_s": round(watch.cpu_s, 1),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "others_cores": watch.others_cores(start, end),
        "_watch": watch,
        "_end": end,
    }


def stage_loads(report: dict, watch: Watch, end: float) -> dict[str, float | None]:
    """Other processes' mean busy cores per stage; stage windows rebuilt from the report's laps, the
    last one ending a moment before the process did (the report is written then)."""
    laps = {k: v for k, v in report["seconds"].items() if not k.startswith("compress: ") and k != "total"}
    t, windows = end - sum(laps.values()), {}
    for stage, seconds in laps.items():
        windows[stage] = (t, t + seconds)
        t += seconds
    if "compress" in windows:  # its parts, in order: statistics, then factorization
        s0, _ = windows["compress"]
        stats = report["seconds"].get("compress: statistics", 0.0)
        windows["compress: statistics"] = (s0, s0 + stats)
        windows["compress: factorize"] = (s0 + stats, s0 + stats + report["seconds"].get("compress: factorize", 0.0))
    return {stage: watch.others_cores(a, b) for stage, (a, b) in windows.items()}


def measure(name: str, method: str, processes: int, threads: int, args, data: dict[str, Path]) -> dict:
    """One whole run of `name` with `method` on `processes` processes of `threads` threads each."""
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = work / f"{method}.yaml"
    recipe_path.write_text(
        yaml.safe_dump(recipe(args.work / "models" / name, data, method, args, name), sort_keys=False)
    )
    arm = f"{processes}x{threads}"
    output = work / f"out-{method}-{arm}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if processes == 1:
        command = [sys.executable, "-m", "fwsvd_export", "run", str(recipe_path), "-o", str(output), "--quiet"]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "fwsvd_export",
            "run",
            str(recipe_path),
            "-o",
            str(output),
            "--quiet",
        ]
    print(f"[{time.strftime('%H:%M:%S')}] {name} {method} {arm} ...", flush=True)
    log = work / f"log-{method}-{arm}.txt"
    result = launch(command, env, log, args.library)
    watch, end = result.pop("_watch"), result.pop("_end")
    data_spec = {
        "calibration_tokens": args.batches * args.batch * args.tokens,
        "evaluation_tokens": args.eval_blocks * args.tokens,
    }
    row = {
        "model": name,
        "method": method,
        "processes": processes,
        "threads_per_process": threads,
        **data_spec,
        "command": " ".join(command[1:]).replace(sys.executable, "python"),
        "recipe": yaml.safe_load(recipe_path.read_text()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "library_commit": commit(args.library),
        **result,
    }
    report_path = output / "report.json"
    if result["exit_code"] not in (0, 1) or not report_path.exists():
        row["log_tail"] = log.read_text()[-4000:]
        print(f"  failed with exit code {result['exit_code']}:\n{row['log_tail']}", flush=True)
        return row
    report = json.loads(report_path.read_text())
    report["seconds"]["total"] = sum(v for k, v in report["seconds"].items() if not k.startswith("compress: "))
    row.update(
        seconds={k: round(v, 2) for k, v in report["seconds"].items()},
        peak_rss_mb=report["peak_rss_mb"],
        stage_others_cores=stage_loads(report, watch, end),
        factorization=report["compression"].get("factorization"),
        statistics_info=report["compression"]["statistics"],
        summary=report["compression"]["summary"],
        metric={k: report["validation"][k] for k in ("metric", "original_torch", "compressed_torch")},
        checks=report["validation"]["checks"],
        passed=report["passed"],
        sizes=report["sizes"],
    )
    print(
        f"  {result['wall_s']} s, exit {result['exit_code']}, passed {report['passed']}, "
        f"peak {max(report['peak_rss_mb'].values()):.0f} MB, others {result['others_cores']} cores",
        flush=True,
    )
    return row


def commit(library: Path) -> str:
    """The commit `library` is checked out at (with '+changes' when its tracked files differ from it)."""
    head = subprocess.run(["git", "-C", str(library), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(library), "diff", "--quiet", "HEAD", "--", "fwsvd_export"]).returncode
    return head.stdout.strip() + ("+changes" if dirty else "")


# --- invocation -----------------------------------------------------------------------------------------


def build_in_subprocess(name: str, folder: Path) -> None:
    """Build in a child process, so that this one never holds a model's weights."""
    subprocess.run([sys.executable, __file__, "--_build", name, str(folder)], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(FAMILY), help="comma-separated, from: " + ", ".join(FAMILY))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--distributed", default="", help="models to also run with torchrun --nproc-per-node 2")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the --distributed arms, rotated")
    parser.add_argument(
        "--single-thread-reference",
        action="store_true",
        help="with --distributed, also 1 process of 1 thread: 2 processes' gain apart from threading",
    )
    parser.add_argument(
        "--diagonal-mlp",
        default="qwen2.5-0.5b",
        help="models whose kfac run gathers MLP-wide Gram sides as diagonals (max_gram_size)",
    )
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--eval-blocks", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--budget", type=float, help="a global budget (allocation check off) instead of --ratio")
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="validation.latency.one_at_a_time: the final timing holds one graph at a time",
    )
    parser.add_argument(
        "--library",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the checkout whose tool is run (an older commit's worktree, for an A/B)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/fwsvd-scaling"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-runs", action="store_true", help="only refit and print from --json")
    parser.add_argument("--markdown", action="store_true", help="print the tables")
    parser.add_argument("--_build", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._build:
        build_model(args._build[0], Path(args._build[1]))
        return 0
    args.diagonal_mlp = [m for m in args.diagonal_mlp.split(",") if m]
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {"runs": {}}
    if not args.skip_runs:
        data = write_data(args.work / "data", args)
        distributed = [m for m in args.distributed.split(",") if m]
        cores = os.cpu_count() or 1
        for name in [m for m in args.models.split(",") if m] + [m for m in distributed if m not in args.models]:
            build_in_subprocess(name, args.work / "models" / name)
            arms = [(1, cores), (2, 1)] + ([(1, 1)] if args.single_thread_reference else [])
            for method in args.methods.split(","):
                for k in range(args.repeats if name in distributed else 1):
                    # each repeat starts one arm later, so drift and neighbours' load hit every arm alike
                    for processes, threads in (
                        arms[k % len(arms) :] + arms[: k % len(arms)] if name in distributed else arms[:1]
                    ):
                        row = measure(name, method, processes, threads, args, data)
                        row["invocation"] = run_info(__file__, argv)["command"]
                        results["runs"][f"{name}/{method}/{processes}x{threads}/{k}"] = row
                        if args.json:  # after every run: a later failure keeps what was measured
                            results.update(analyse(results["runs"], args))
                            args.json.write_text(json.dumps(results, indent=1) + "\n")
    results.update(analyse(results["runs"], args))
    info = run_info(__file__, argv)
    if args.skip_runs and "run_info" in results:  # the measuring command stays; the refit is noted
        results["run_info"]["refit"] = {k: info[k] for k in ("command", "date")}
    else:
        results["run_info"] = info
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        print(render(results))
    return 0


# --- fits, memory estimate, paper estimate ---------------------------------------------------------------

LAPS = ["load model", "data", "export (dense)", "validate (dense)", "compress", "checkpoint", "export", "validate"]
MIB = 2**20


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def power_fit(points: list[tuple[float, float]]) -> dict | None:
    """y = a x^b by least squares in log-log; b, a, R^2 and the points' count."""
    points = [(x, y) for x, y in points if y and y > 0]
    if len(points) < 2:
        return None
    lx, ly = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((v - mx) ** 2 for v in lx)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ly)) / sxx
    a = my - b * mx
    total = sum((v - my) ** 2 for v in ly)
    residual = sum((v - a - b * u) ** 2 for u, v in zip(lx, ly))
    return {
        "exponent": round(b, 3),
        "prefactor": math.exp(a),
        "r2": round(1 - residual / total, 4) if total else None,
        "points": len(points),
    }


def gram_floats(config: dict, method: str, max_gram: int) -> int:
    """Statistics accumulator elements of every targeted layer: kfac one input Gram per distinct input
    (q/k/v share one, gate/up share one) and one output Gram per layer; fwsvd one Fisher row per layer."""
    lin = shapes(config)["linears"]
    if method == "fwsvd":
        return config["num_hidden_layers"] * sum(i for i, _ in lin.values())
    side = lambda d: d * d if d <= max_gram else d  # noqa: E731
    inputs = [lin["q"][0], lin["o"][0], lin["gate"][0], lin["down"][0]]
    return config["num_hidden_layers"] * (sum(map(side, inputs)) + sum(side(o) for _, o in lin.values()))


def workspace_floats(config: dict, method: str, max_gram: int) -> int:
    """One layer's float64 factorization workspace, the largest layer's: the weight, P W Q and the
    product with the factors (3 in x out), the thin SVD factors, and the side weights with their
    decomposition and solve copies (3 out^2 + 2 in^2; vectors when a side is diagonal)."""

    def one(i: int, o: int) -> int:
        full = lambda d: method == "kfac" and d <= max_gram  # noqa: E731
        sq = lambda d: d * d if full(d) else d  # noqa: E731
        return 3 * i * o + min(i, o) * (i + o) + 3 * sq(o) + 2 * sq(i)

    return max(one(i, o) for i, o in shapes(config)["linears"].values())


def activation_floats(config: dict, batch: int, tokens: int) -> int:
    """One micro-batch under gradient checkpointing: every block's input, one block's activations
    recomputed for its backward (about 10 hidden + 4 MLP + heads x tokens values a token), and the
    logits with their log-softmax and gradient (3 x vocabulary a token)."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    block = 10 * h + 4 * i + config["num_attention_heads"] * tokens
    return batch * tokens * (layers * h + block + 3 * config["vocab_size"])


def max_gram_of(row: dict) -> int:
    return row["recipe"]["compression"].get("max_gram_size", 8192)


def memory_estimate(config: dict, row: dict) -> dict:
    method, max_gram = row["method"], max_gram_of(row)
    data = row["recipe"]["data"]
    parts = {
        "weights fp32": BYTES * shapes(config)["params"],
        "activations (1 micro-batch)": BYTES * activation_floats(config, data["batch_size"], data["max_length"]),
        "statistics accumulators": BYTES * gram_floats(config, method, max_gram),
        "1 layer's factorization workspace": 8 * workspace_floats(config, method, max_gram),
    }
    return {k: round(v / MIB) for k, v in parts.items()} | {"total": round(sum(parts.values()) / MIB)}


def arm(row: dict) -> str:
    return f"{row['processes']}x{row['threads_per_process']}"


def single_runs(runs: dict) -> dict[tuple[str, str], list[dict]]:
    """The 1-process runs at the default thread count (the fits' points), by model and method."""
    found: dict[tuple[str, str], list[dict]] = {}
    for row in runs.values():
        if arm(row) == f"1x{os.cpu_count()}" and "seconds" in row:
            found.setdefault((row["model"], row["method"]), []).append(row)
    return found


def analyse(runs: dict, args) -> dict:
    singles = single_runs(runs)
    models = {
        name: {**{k: v for k, v in shapes(c).items() if k != "linears"}, "config": c} for name, c in FAMILY.items()
    }
    fits: dict = {}
    for method in METHODS:
        rows = {name: singles.get((name, method), []) for name in FAMILY}
        fits[method] = {
            "seconds": {
                stage: power_fit(
                    [
                        (models[n]["params"], _median([r["seconds"].get(stage, 0) for r in rs]))
                        for n, rs in rows.items()
                        if rs
                    ]
                )
                for stage in STAGES + ["total"]
            },
            "peak_rss_mb": {
                stage: power_fit(
                    [
                        (models[n]["params"], _median([r["peak_rss_mb"].get(stage, 0) for r in rs]))
                        for n, rs in rows.items()
                        if rs
                    ]
                )
                for stage in LAPS
            },
        }
    memory = {}
    for (name, method), rows in singles.items():
        row = rows[0]
        estimate = memory_estimate(FAMILY[name], row)
        stage, peak = max(row["peak_rss_mb"].items(), key=lambda kv: kv[1])
        memory[f"{name}/{method}"] = {
            "estimate_mib": estimate,
            "measured_peak_mib": peak,
            "peak_stage": stage,
            "ratio": round(peak / estimate["total"], 2),
            "max_gram_size": max_gram_of(row),
        }
    return {
        "models": models,
        "fits": fits,
        "speedup": speedups(runs),
        "memory": memory,
        "paper": paper_estimate(fits, singles),
    }


def speedups(runs: dict) -> dict:
    """Per model and method with 2-process runs: median seconds of each arm (processes x threads) and
    the 2-process speedup over 1 process of 2 threads (the target) and of 1 thread."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for row in runs.values():
        if "seconds" in row:
            groups.setdefault((row["model"], row["method"]), {}).setdefault(arm(row), []).append(row)
    out = {}
    for (name, method), by in groups.items():
        if "2x1" not in by:
            continue
        entry: dict = {}
        for stage in ("compress: statistics", "compress: factorize", "total"):
            seconds = {a: round(_median([r["seconds"].get(stage, 0) for r in rows]), 2) for a, rows in by.items()}
            entry[stage] = {
                "median s": seconds,
                **{
                    f"speedup 2x1 over {a}": round(seconds[a] / seconds["2x1"], 2)
                    for a in seconds
                    if a != "2x1" and seconds["2x1"]
                },
            }
        entry["runs"] = {a: len(rows) for a, rows in by.items()}
        entry["factorization (2x1)"] = [r.get("factorization") for r in by["2x1"]]
        entry["others_cores"] = {
            a: [
                {s: r["stage_others_cores"].get(s) for s in ("compress: statistics", "compress: factorize")}
                for r in rows
            ]
            for a, rows in by.items()
        }
        out[f"{name}/{method}"] = entry
    return out


# On paper: one node of 8 GPUs (H100/H200 class) and its host (2 x 64 cores), calibration and
# evaluation as in published low-rank LLM work (256 x 2048 calibration tokens, WikiText-2 test).
ASSUMPTIONS = {
    "gpus": 8,
    "calibration_tokens": 256 * 2048,
    "sequence": 2048,
    "evaluation_tokens": 300_000,
    "gpu_forward_backward_tflops": 400,  # per GPU: bf16 tensor cores at ~40% of the 989 TFLOP/s dense peak
    "gpu_fp32_gemm_tflops": 30,  # per GPU: the Gram products, float32 without TF32, ~50% of peak
    "host_gram_bandwidth_gb_s": 200,  # whole node: every micro-batch's Grams copied to the host and added there
    "gpu_fp64_decomposition_tflops": 3,  # per GPU: cuSOLVER eigh/SVD/Cholesky in float64, ~5% of the fp64 peak
    "host_fp64_decomposition_tflops": 1,  # whole node's CPUs: LAPACK eigh/SVD in float64
    "host_fp32_forward_tflops": 1.5,  # whole node's CPUs: torch / ONNX Runtime fp32 forward passes
    "gpu_fp32_forward_tflops": 50,  # one GPU: ONNX Runtime CUDA EP / torch on an fp32 graph
    "gpu_memory_gb": 80,
}


def stat_flops(config: dict, method: str, tokens: int, max_gram: int, seq: int) -> tuple[float, float]:
    """Statistics pass FLOPs: (forward, recomputed forward under checkpointing and backward to the
    activations = 4 forwards; weight gradients are never formed; accumulation of Grams or Fisher rows)."""
    info = shapes(config)
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    forward = 2 * info["params_targeted"] + 2 * vocab * h + 4 * layers * seq * h
    accumulate = (
        2 * gram_floats(config, method, max_gram)
        if method == "kfac"
        else 2 * seq * layers * sum(i + o for i, o in info["linears"].values())
    )
    return tokens * 4 * forward, tokens * accumulate


def factor_flops(config: dict, method: str, ratio: float, max_gram: int) -> float:
    """Float64 decomposition FLOPs of every targeted layer: thin SVD of P W Q (6 m n^2 + 20 n^3), and for
    kfac eigh of the output Gram (9 out^3), Cholesky of the input Gram (in^3 / 3), the products P W Q and
    the two solves (LU 2/3 d^3 + 2 d^2 r). A side wider than max_gram_size is a vector: no cubic term."""
    total = 0.0
    for i, o in shapes(config)["linears"].values():
        m, n = max(i, o), min(i, o)
        r = ratio * i * o / (i + o)
        flops = 6 * m * n * n + 20 * n**3
        if method == "kfac":
            if o <= max_gram:
                flops += 9 * o**3 + 2 * o * o * i + 2 / 3 * o**3 + 2 * o * o * r
            if i <= max_gram:
                flops += i**3 / 3 + 2 * o * i * i + 2 / 3 * i**3 + 2 * i * i * r
        total += flops
    return total * config["num_hidden_layers"]


def achieved_rates(singles: dict) -> dict:
    """GFLOP/s this machine reached in the statistics pass and the factorization, per measured run:
    how well the FLOP model explains the measured growth (a constant rate: fully)."""
    out = {}
    for (name, method), rows in singles.items():
        row, config = rows[0], FAMILY[name]
        compression = row["recipe"]["compression"]
        data, ratio = row["recipe"]["data"], compression.get("ratio", compression.get("budget"))  # a budget: on average
        forward, accumulate = stat_flops(
            config, method, row["calibration_tokens"], max_gram_of(row), data["max_length"]
        )
        out[f"{name}/{method}"] = {
            "statistics_gflop": round((forward + accumulate) / 1e9),
            "statistics_gflop_s": round((forward + accumulate) / row["seconds"]["compress: statistics"] / 1e9, 1),
            "factorize_gflop": round(factor_flops(config, method, ratio, max_gram_of(row)) / 1e9),
            "factorize_gflop_s": round(
                factor_flops(config, method, ratio, max_gram_of(row)) / row["seconds"]["compress: factorize"] / 1e9, 1
            ),
        }
    return out


def paper_estimate(fits: dict, singles: dict) -> dict:
    """7B and 70B (Llama-2 shapes) on one 8-GPU node, per stage. Statistics and factorization from FLOP
    counts at the assumed rates: data-parallel statistics on the GPUs (model.device_map per rank), and
    the factorization split over the 8 ranks, on the host's CPUs as the tool runs it today (the host
    copy's weights) or on the GPUs; validation from its forward FLOPs (4 passes: torch and ONNX Runtime,
    dense and compressed) on the host, or on one GPU when the fp32 graph fits; load, export and
    checkpoint (host work, no GPU) from this machine's fitted power laws. Memory from the formulas of
    the measured estimate, with what the tool holds today per process."""
    a = ASSUMPTIONS
    out: dict = {"assumptions": a, "achieved_here": achieved_rates(singles)}
    for size, config in PAPER.items():
        info = shapes(config)
        for method in METHODS:
            for max_gram in (8192, 32768) if method == "kfac" else (8192,):
                key = f"{size}/{method}" + (f"/max_gram_size={max_gram}" if method == "kfac" else "")
                forward, accumulate = stat_flops(config, method, a["calibration_tokens"], max_gram, a["sequence"])
                grams = BYTES * gram_floats(config, method, max_gram)
                host_adds = a["calibration_tokens"] / a["sequence"] * grams / (a["host_gram_bandwidth_gb_s"] * 1e9)
                statistics = (
                    forward / (a["gpu_forward_backward_tflops"] * 1e12 * a["gpus"])
                    + accumulate / (a["gpu_fp32_gemm_tflops"] * 1e12 * a["gpus"])
                    + host_adds
                )
                factor = factor_flops(config, method, 0.5, max_gram)
                graph_gb = BYTES * info["params"] / 1e9
                evaluation = 4 * 2 * info["params"] * a["evaluation_tokens"]
                seconds = {
                    "statistics (8 GPUs)": round(statistics),
                    "  of which host Gram adds": round(host_adds),
                    "factorize, host CPUs (today)": round(factor / (a["host_fp64_decomposition_tflops"] * 1e12)),
                    "factorize, 8 GPUs": round(factor / (a["gpu_fp64_decomposition_tflops"] * 1e12 * a["gpus"])),
                    "validate, host CPUs": round(evaluation / (a["host_fp32_forward_tflops"] * 1e12)),
                    "validate, 1 GPU": round(evaluation / (a["gpu_fp32_forward_tflops"] * 1e12))
                    if graph_gb < a["gpu_memory_gb"]
                    else None,
                    **{
                        f"{stage} (fit)": _extrapolate(fits[method]["seconds"].get(stage), info["params"])
                        for stage in ("load model", "export (dense)", "checkpoint", "export")
                    },
                }
                memory = {
                    "host: fp32 weights, each process": round(graph_gb, 1),
                    "host: statistics accumulators, each process": round(grams / 1e9, 1),
                    "host: kfac side weights (float64), all layers (held together before 701d1ee)": round(
                        8 * side_weight_floats(config, max_gram) / 1e9, 1
                    )
                    if method == "kfac"
                    else 0.0,
                    "host: 1 layer's factorization workspace": round(
                        8 * workspace_floats(config, method, max_gram) / 1e9, 2
                    ),
                    "host: 8 processes, today (side weights built per layer)": round(
                        a["gpus"] * (graph_gb + grams / 1e9 + 8 * workspace_floats(config, method, max_gram) / 1e9), 1
                    ),
                    "host: one copy, accumulators sharded, side weights built per layer": round(
                        graph_gb + grams / 1e9 + a["gpus"] * 8 * workspace_floats(config, method, max_gram) / 1e9, 1
                    ),
                    "GPU: bf16 weights replica": round(2 * info["params"] / 1e9, 1),
                    "GPU: 1 x 2048 micro-batch activations": round(
                        BYTES * activation_floats(config, 1, a["sequence"]) / 1e9, 1
                    ),
                }
                out[key] = {"params": info["params"], "seconds": seconds, "memory_gb": memory}
    return out


def side_weight_floats(config: dict, max_gram: int) -> int:
    """kfac's P (out^2) and Q (in^2) of every targeted layer, each layer its own (shared inputs too)."""
    sq = lambda d: d * d if d <= max_gram else d  # noqa: E731
    return config["num_hidden_layers"] * sum(sq(i) + sq(o) for i, o in shapes(config)["linears"].values())


def _extrapolate(fit: dict | None, params: int) -> int | None:
    return None if not fit else round(fit["prefactor"] * params ** fit["exponent"])


def _cell(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(results: dict) -> str:
    """Markdown: models, every run's stage seconds (with other processes' busy cores) and peak RSS,
    the fits, the 2-process speedups, the memory estimate and the paper estimate."""
    models, runs = results["models"], results["runs"]
    lines = [
        "| model | family | hidden | MLP | layers | heads / KV | vocabulary | parameters | non-embedding |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in models.items():
        c = m["config"]
        lines.append(
            f"| {name} | {c['model_type']} | {c['hidden_size']} | {c['intermediate_size']} | "
            f"{c['num_hidden_layers']} | {c['num_attention_heads']} / {c['num_key_value_heads']} | "
            f"{c['vocab_size']} | {m['params'] / 1e6:.1f}M | {m['params_non_embedding'] / 1e6:.1f}M |"
        )
    order = sorted(runs.values(), key=lambda r: (list(FAMILY).index(r["model"]), r["method"], arm(r), r["date"]))
    lines += [
        "",
        "Seconds per stage (in brackets: cores other processes kept busy meanwhile, of 2):",
        "",
        "| model | method | processes x threads | " + " | ".join(STAGES) + " | total | launch to exit | exit |",
        "|---|---|---:|" + "---:|" * (len(STAGES) + 3),
    ]
    for r in order:
        if "seconds" not in r:
            lines.append(
                f"| {r['model']} | {r['method']} | {arm(r)} | "
                + " | ".join("-" for _ in STAGES)
                + f" | - | {r['wall_s']} | {r['exit_code']} |"
            )
            continue
        cells = [f"{r['seconds'].get(s, 0):.1f} ({_cell(r['stage_others_cores'].get(s))})" for s in STAGES]
        lines.append(
            f"| {r['model']} | {r['method']} | {arm(r)} | "
            + " | ".join(cells)
            + f" | {r['seconds']['total']:.1f} | {r['wall_s']} ({_cell(r['others_cores'])}) | {r['exit_code']} |"
        )
    lines += [
        "",
        "Peak RSS per stage, MiB (the process running the stage; rank 0 under torchrun), and the "
        "process tree's peak (all ranks, sampled):",
        "",
        "| model | method | processes x threads | " + " | ".join(LAPS) + " | tree peak | checks passed |",
        "|---|---|---:|" + "---:|" * (len(LAPS) + 2),
    ]
    for r in order:
        if "peak_rss_mb" in r:
            failed = [c["name"] for c in r["checks"] if not c["passed"]]
            lines.append(
                f"| {r['model']} | {r['method']} | {arm(r)} | "
                + " | ".join(_cell(r["peak_rss_mb"].get(s), 0) for s in LAPS)
                + f" | {r['tree_peak_rss_mb']} | {'all' if not failed else 'failed: ' + ', '.join(failed)} |"
            )
    lines += [
        "",
        "Power-law fits over the 1-process runs, seconds (or MiB) = a x parameters^b:",
        "",
        "| method | stage | seconds: b | R^2 | peak RSS: b | R^2 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method, fit in results["fits"].items():
        for stage in STAGES + ["total"]:
            t = fit["seconds"].get(stage)
            m = fit["peak_rss_mb"].get("compress" if stage.startswith("compress: ") else stage)
            lines.append(
                f"| {method} | {stage} | {_cell(t and t['exponent'], 2)} | {_cell(t and t['r2'], 3)} | "
                f"{_cell(m and m['exponent'], 2)} | {_cell(m and m['r2'], 3)} |"
            )
    lines += [
        "",
        "Two processes (torchrun, OMP_NUM_THREADS=1 each, 2x1) against one process of 2 threads (1x2) "
        "and of 1 thread (1x1), median seconds:",
        "",
        "| model/method | stage | 1x2 | 2x1 | 1x1 | speedup 2x1 over 1x2 | over 1x1 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, entry in results["speedup"].items():
        for stage in ("compress: statistics", "compress: factorize", "total"):
            e, m = entry[stage], entry[stage]["median s"]
            lines.append(
                f"| {key} | {stage} | {_cell(m.get('1x2'), 2)} | {_cell(m.get('2x1'), 2)} | {_cell(m.get('1x1'), 2)} | "
                f"{_cell(e.get('speedup 2x1 over 1x2'), 2)} | {_cell(e.get('speedup 2x1 over 1x1'), 2)} |"
            )
    lines += [
        "",
        "Peak host memory of the whole run against the estimate, MiB:",
        "",
        "| model/method | weights | activations | accumulators | workspace | estimate | measured peak (stage) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, m in results["memory"].items():
        e = list(m["estimate_mib"].values())
        lines.append(
            f"| {key} | "
            + " | ".join(str(v) for v in e)
            + f" | {m['measured_peak_mib']:.0f} ({m['peak_stage']}) | {m['ratio']} |"
        )
    paper = results["paper"]
    lines += [
        "",
        "| model/method | statistics GFLOP | GFLOP/s | factorize GFLOP | GFLOP/s |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v['statistics_gflop']} | {v['statistics_gflop_s']} | {v['factorize_gflop']} | {v['factorize_gflop_s']} |"
        for k, v in paper["achieved_here"].items()
    ]
    for key, est in paper.items():
        if key in ("assumptions", "achieved_here"):
            continue
        lines += [
            "",
            f"{key} ({est['params'] / 1e9:.2f}B): seconds "
            + ", ".join(f"{k} {v}" for k, v in est["seconds"].items())
            + "; memory GB "
            + ", ".join(f"{k} {v}" for k, v in est["memory_gb"].items()),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
