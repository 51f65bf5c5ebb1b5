"""Latency in ONNX Runtime, measured so that ratios can be trusted on a noisy machine: every artifact
of a comparison (dense fp32 and its variants, compressed fp32 and its variants) takes turns, round
after round in a rotated order, so drift and neighbours' load hit all alike; each (artifact, shape)
gets its warm-up first, and the median and p90 of its pooled runs are reported. Graphs too big to be
held side by side take their turns one session at a time (`in_turn`), each turn warming up anew.

A graph exported with its key/value cache is timed as a decoder runs: the prompt pass (prefill) at the
shape, and one decode step with that prompt cached.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort

from .ort_io import feeds, has_past, next_past, timing_inputs


def _passes(session: ort.InferenceSession, shape: str, config: Any, decode: bool) -> dict[str, Callable[[], object]]:
    """What one sample runs at BATCHxSEQUENCE (its inputs made from the graph's own and the model
    `config`: `timing_inputs`): the whole pass, and with `decode` for a graph with a key/value cache,
    one decode step after it too."""
    inputs = timing_inputs(session, config, shape)
    prompt = feeds(session, inputs)
    parts: dict[str, Callable[[], object]] = {"pass": lambda: session.run(None, prompt)}
    if decode and has_past(session):
        step = feeds(session, {"input_ids": inputs["input_ids"][:, -1:]}, next_past(session, session.run(None, prompt)))
        parts["decode_per_token"] = lambda: session.run(None, step)
    return parts


def _summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90)), "runs": len(times)}


def _shares(runs: int, rounds: int) -> list[int]:
    """Timed runs per turn: `runs` spread over `rounds` turns (at most one turn per run)."""
    rounds = max(1, min(rounds, runs))
    return [runs // rounds + (turn < runs % rounds) for turn in range(rounds)]


def _rotated(names: list[str], turn: int) -> list[str]:
    return names[turn % len(names) :] + names[: turn % len(names)]


def _warm(parts: dict[str, Callable[[], object]], warmup: int) -> None:
    for run in parts.values():
        for _ in range(warmup):
            run()


def _time(parts: dict[str, Callable[[], object]], share: int, into: dict[str, list[float]]) -> None:
    for part, run in parts.items():
        for _ in range(share):
            start = time.perf_counter()
            run()
            into.setdefault(part, []).append((time.perf_counter() - start) * 1000)


def _results(times: dict[str, dict[str, dict[str, list[float]]]]) -> dict[str, dict[str, dict]]:
    result: dict[str, dict[str, dict]] = {}
    for name, shapes in times.items():
        for shape, parts in shapes.items():
            measured = _summary(parts["pass"])
            if "decode_per_token" in parts:
                measured["decode_per_token"] = _summary(parts["decode_per_token"])
            result.setdefault(name, {})[shape] = measured
    return result


def interleaved(
    sessions: dict[str, ort.InferenceSession],
    shapes: list[str],
    config: Any,
    warmup: int,
    runs: int,
    rounds: int,
    decode: bool = True,
) -> dict[str, dict[str, dict]]:
    """name -> shape -> {median_ms, p90_ms, runs[, decode_per_token]}: `runs` timed runs per artifact and
    shape, spread over `rounds` turns (the first artifact of a round rotates), on inputs made for each
    graph from its own inputs and the model `config` (`ort_io.timing_inputs`); `decode` False times a
    cached decoder's prompt pass alone."""
    names = list(sessions)
    times: dict = {name: {shape: {} for shape in shapes} for name in names}
    for shape in shapes:
        passes = {name: _passes(sessions[name], shape, config, decode) for name in names}
        for parts in passes.values():
            _warm(parts, warmup)
        for turn, share in enumerate(_shares(runs, rounds)):
            for name in _rotated(names, turn):
                _time(passes[name], share, times[name][shape])
    return _results(times)


def in_turn(
    opens: dict[str, Callable[[], ort.InferenceSession]],
    shapes: list[str],
    config: Any,
    warmup: int,
    runs: int,
    rounds: int,
    decode: bool = True,
) -> dict[str, dict[str, dict]]:
    """As `interleaved`, for graphs too big to be held side by side: one session at a time. Each turn
    opens its artifact's session (`opens[name]()`), warms every shape up again (a new session allocates
    and packs on its first runs), times its share, and lets the session go before the next turn."""
    names = list(opens)
    times: dict = {name: {shape: {} for shape in shapes} for name in names}
    for turn, share in enumerate(_shares(runs, rounds)):
        for name in _rotated(names, turn):
            session = opens[name]()
            for shape in shapes:
                parts = _passes(session, shape, config, decode)
                _warm(parts, warmup)
                _time(parts, share, times[name][shape])
                del parts
            del session
    return _results(times)
