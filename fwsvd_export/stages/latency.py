"""Latency in ONNX Runtime, measured so that ratios can be trusted on a noisy machine: every artifact
of a comparison (dense fp32 and its variants, compressed fp32 and its variants) takes turns, round
after round in a rotated order, so drift and neighbours' load hit all alike; each (artifact, shape)
gets its warm-up first, and the median and p90 of its pooled runs are reported.

A graph exported with its key/value cache is timed as a decoder runs: the prompt pass (prefill) at the
shape, and one decode step with that prompt cached.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from .ort_io import feeds, has_past, next_past


def _passes(session: ort.InferenceSession, shape: str, vocab_size: int, decode: bool) -> dict[str, Callable[[], object]]:
    """What one sample runs at BATCHxSEQUENCE: the whole pass, and with `decode` for a graph with a
    key/value cache, one decode step after it too."""
    batch, seq = (int(v) for v in shape.split("x"))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, max(2, min(vocab_size, 1001)), (batch, seq), generator=generator)
    if not has_past(session):
        data = feeds(session, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        return {"pass": lambda: session.run(None, data)}
    prompt = feeds(session, {"input_ids": ids})
    parts = {"pass": lambda: session.run(None, prompt)}
    if decode:
        step = feeds(session, {"input_ids": ids[:, -1:]}, next_past(session, session.run(None, prompt)))
        parts["decode_per_token"] = lambda: session.run(None, step)
    return parts


def _summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90)), "runs": len(times)}


def interleaved(sessions: dict[str, ort.InferenceSession], shapes: list[str], vocab_size: int, warmup: int,
                runs: int, rounds: int, decode: bool = True) -> dict[str, dict[str, dict]]:
    """name -> shape -> {median_ms, p90_ms, runs[, decode_per_token]}: `runs` timed runs per artifact and
    shape, spread over `rounds` turns (the first artifact of a round rotates); `decode` False times a
    cached decoder's prompt pass alone."""
    names = list(sessions)
    rounds = max(1, min(rounds, runs))
    result: dict[str, dict[str, dict]] = {name: {} for name in names}
    for shape in shapes:
        passes = {name: _passes(sessions[name], shape, vocab_size, decode) for name in names}
        for parts in passes.values():
            for run in parts.values():
                for _ in range(warmup):
                    run()
        times = {name: {part: [] for part in parts} for name, parts in passes.items()}
        for turn in range(rounds):
            share = runs // rounds + (turn < runs % rounds)
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                for part, run in passes[name].items():
                    for _ in range(share):
                        start = time.perf_counter()
                        run()
                        times[name][part].append((time.perf_counter() - start) * 1000)
        for name, parts in times.items():
            measured = _summary(parts["pass"])
            if "decode_per_token" in parts:
                measured["decode_per_token"] = _summary(parts["decode_per_token"])
            result[name][shape] = measured
    return result
