"""What gradient checkpointing buys in the statistics pass: peak memory and time, with and without.

A seeded, randomly initialised Llama-style decoder (the cost of a pass does not depend on training)
scores `--batches` batches of `--batch` x `--tokens` random token ids with the next-token loss (the
batches made by the library's text-generation task from the ids, every token scored). Modes,
each timed `--repeats` times in rotated order after one untimed warm-up batch (medians reported):

- ``plain``: forward + backward with parameter gradients, as in training (the reference);
- ``fisher`` / ``kfac``: ``collect_statistics`` with the statistics of method fwsvd / kfac over every
  decoder Linear, and the same with ``checkpointing=True`` (``fisher+ckpt``, ``kfac+ckpt``).

Peak memory: one pass per mode in a fresh subprocess; VmHWM after resetting it through
/proc/self/clear_refs, minus VmRSS just before the pass, next to the model's weight bytes, with
glibc's mmap threshold pinned (measure.MEMORY_ENV) so that heap fragmentation does not count.

    python benchmarks/checkpointing.py --json benchmarks/results/checkpointing.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from fwsvd_export.core.batch import Batch
from fwsvd_export.core.compress import linear_layers
from fwsvd_export.core.statistics import collect_statistics
from fwsvd_export.stages.tasks import TASKS

from measure import (
    MEMORY_ENV,
    IdTokenizer,
    extra_peak,
    lm_blocks,
    plain_pass,
    rotated_timings,
    run_info,
    run_memory_worker,
)

TASK = TASKS["text-generation"]
SHAPE = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "tokens", "batch", "batches")
MODES = {
    "plain": (None, False),
    "fisher": ({"fisher"}, False),
    "fisher+ckpt": ({"fisher"}, True),
    "kfac": ({"input_gram", "output_gram"}, False),
    "kfac+ckpt": ({"input_gram", "output_gram"}, True),
}


def build(args) -> tuple[nn.Module, list[Batch]]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads // 2,
        max_position_embeddings=args.tokens,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    # One text per block: its random ids, written out; no EOS, so every block is exactly one text's ids.
    texts = [
        " ".join(map(str, row.tolist()))
        for _ in range(args.batches)
        for row in torch.randint(0, args.vocab, (args.batch, args.tokens))
    ]
    tokenizer = IdTokenizer(lambda text: [int(i) for i in text.split()], None)
    return model, lm_blocks(texts, tokenizer, args.tokens, args.batch)


def pass_fn(mode: str, model: nn.Module, batches: list[Batch]) -> Callable[[], None]:
    needs, checkpointing = MODES[mode]
    if needs is None:
        return plain_pass(model, TASK.loss, batches)
    layers = {k: v for k, v in linear_layers(model).items() if ".layers." in k}
    return lambda: collect_statistics(
        model, layers, batches, TASK.loss, needs, progress=False, checkpointing=checkpointing
    )


def memory_worker(args) -> None:
    """Subprocess entry: the peak resident memory one pass of `args.memory_worker` adds, in MiB."""
    model, batches = build(args)
    print(json.dumps(extra_peak(pass_fn(args.memory_worker, model, batches))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: half the heads)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    parser.add_argument("--no-memory", action="store_true", help="time only (no peak-memory subprocesses)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return 0
    model, batches = build(args)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    modes = args.modes.split(",")
    for mode in modes:  # warm-up
        pass_fn(mode, model, batches[:1])()
    times = rotated_timings({mode: pass_fn(mode, model, batches) for mode in modes}, args.repeats)
    shape = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in SHAPE and v is not None]
    memory = {
        mode: None
        if args.no_memory
        else run_memory_worker([__file__, "--_memory-worker", mode, *shape])["extra_peak_mib"]
        for mode in modes
    }
    plain = statistics.median(times["plain"])
    rows = {
        m: {
            "median_s": statistics.median(t),
            "times_s": t,
            "vs_plain": statistics.median(t) / plain,
            "extra_peak_mib": memory[m],
            "extra_peak_vs_weights": None if memory[m] is None else memory[m] / weights_mib,
        }
        for m, t in times.items()
    }
    result = {
        **run_info(__file__, argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "memory_worker")},
        "weights_mib": weights_mib,
        "memory_env": MEMORY_ENV,
        "modes": rows,
    }
    print(f"weights {weights_mib:.1f} MiB; {args.batches} batches of {args.batch}x{args.tokens} tokens")
    print("| pass | median s | / plain | extra peak RSS MiB | extra peak / weights |")
    print("|---|---:|---:|---:|---:|")
    for m, row in rows.items():
        peak, ratio = row["extra_peak_mib"], row["extra_peak_vs_weights"]
        print(
            f"| {m} | {row['median_s']:.2f} | {row['vs_plain']:.2f} | {'-' if peak is None else f'{peak:.0f}'} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
