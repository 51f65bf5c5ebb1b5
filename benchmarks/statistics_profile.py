"""Where kfac's statistics pass spends its time, and what a Gram's upper block triangle saves.

Why: issue 32 asks for the pass at most 1.2x a plain forward+backward. Two measurements decide what can get it
there, both on this machine's two threads:

- `profile`: the real MiniLM-L6 and fisher_cost's `short` setting (64 demo pairs), kfac's pass run 4 times;
  the last run's seconds inside the Gram accumulators, the real-token gather, the heap trim and the pass's end
  (sums into means), each timed in place by wrapping the package's own functions. Run it with another copy of
  the package first on PYTHONPATH to profile that code.
- `blocks`: x^T x for random rows (460 and 1,700 tokens, a batch of each setting) and widths 384, 1536 and
  4864 (MiniLM's and Qwen2.5-0.5B's sides): the full product against the upper block triangle at several block
  sizes, median of 7 rotated repeats, as a fraction of the full product's time.

    python benchmarks/statistics_profile.py
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fwsvd_export.core.statistics as st

sys.path.insert(0, str(Path(__file__).parent))
from fisher_cost import TASK, encoder_linears, load_model, make_batches  # noqa: E402


def profile() -> None:
    model, tokenizer = load_model()
    batches = make_batches(model, tokenizer, "short", 1, 64)
    spent: collections.Counter[str] = collections.Counter()

    def timed(name: str, f: Callable) -> Callable:
        def inner(*args):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            result = f(*args)
            spent[name] += time.perf_counter() - start
            return result

        return inner

    for key in ("input_gram", "output_gram"):
        st.STATISTICS[key] = dataclasses.replace(
            st.STATISTICS[key], accumulate=timed(key, st.STATISTICS[key].accumulate)
        )
    st._real_rows = timed("gather", st._real_rows)
    st.heap.trim = timed("trim", st.heap.trim)
    st._LayerCollector.finish = timed("end (sums into means)", st._LayerCollector.finish)
    for _ in range(4):
        spent.clear()
        start = time.perf_counter()
        st.collect_statistics(model, encoder_linears(model), batches, TASK.loss, {"input_gram", "output_gram"}, False)
        total = time.perf_counter() - start
    print(
        f"code {Path(st.__file__).parents[1]}: kfac pass {total:.3f} s; "
        + ", ".join(f"{k} {v:.3f} s" for k, v in spent.items())
    )


def upper(block: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def gram(total: torch.Tensor, x: torch.Tensor) -> None:
        for i in range(0, x.shape[1], block):
            total[i : i + block, i:].addmm_(x[:, i : i + block].T, x[:, i:])

    return gram


def blocks() -> None:
    for tokens in (460, 1700):
        for width in (384, 1536, 4864):
            x, total = torch.randn(tokens, width), torch.zeros(width, width)
            ways = {"full": lambda t, x: t.addmm_(x.T, x)} | {
                f"{b}": upper(b) for b in (96, 128, 192, 256, 512) if b < width
            }
            times: dict[str, list[float]] = {k: [] for k in ways}
            for r in range(7):
                for key in list(ways)[r % len(ways) :] + list(ways)[: r % len(ways)]:
                    start = time.perf_counter()
                    ways[key](total, x)
                    times[key].append(time.perf_counter() - start)
            full = statistics.median(times["full"])
            rest = ", ".join(f"{k} rows {statistics.median(v) / full:.2f}" for k, v in times.items() if k != "full")
            print(f"{tokens} tokens x {width}: full {1e3 * full:.2f} ms; blocks of {rest}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    profile()
    blocks()
