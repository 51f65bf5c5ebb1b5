"""What a factorized Linear costs in time, measured on this machine: the kernels' price list for ranks.

A layer's parameters fall linearly with its rank; its time does not. GEMM kernels work in tiles, so the
time of x @ A @ B climbs in steps as the rank crosses a tile, on top of a fixed cost per run. Here, for
each layer shape (in, out), a small ONNX graph of the pair x @ A (in x r) @ B (r x out) is timed in ONNX
Runtime at a grid of ranks, with the dense x @ W and an empty graph (what one run costs with no work)
beside it, on one provider and precision, for the tokens of one BATCHxSEQUENCE shape.

Times are taken in interleaved rounds: each round visits every graph, starting one further along each
time, so drift (clock, cache, neighbours on a shared machine) falls on all ranks alike; a graph's time is
the median over rounds. The table is cached as JSON, keyed by the machine (CPU model and vector
extensions, GPU name), the ONNX Runtime version, provider, precision, threads and tokens, with one entry
per layer shape: a second run measures nothing, a new shape only itself.

From the table come a recommended rank multiple (``recommended_multiple``, see there) and a cost per
rank for the global allocation (``cost_tables``: the empty graph's time taken off, ranks off the
multiple left out, then made non-decreasing by isotonic regression). A time budget (``time_budget``)
scales each layer's table to the layer's time inside the profiled dense model (``in_graph``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from tqdm.auto import tqdm

from ..core.allocate import CostTable, TimeBudget
from ..core.compress import plan_layers
from ..core.lowrank import break_even_rank
from ..core.spec import CompressionSpec
from ..errors import FwsvdError, SpecError
from .export import find_module, module_path
from .latency import interleaved
from .precision import check_runs_on, make_variant
from .validate import PROVIDERS, open_session, session_options

TIMING_FORMAT = 1  # bump when what a cache file holds, or how it is measured, changes
OPSET, IR_VERSION = 17, 8
RESOLUTION = 4  # grid step in ranks: fine enough to see tiles of 8 and up
MAX_POINTS = 48  # ranks timed per shape at most; wide layers get a coarser grid (a multiple of RESOLUTION)
MAX_MULTIPLE = 64  # the largest rank multiple recommended_multiple considers
FLAT = 1 / 3  # a multiple is recommended when rounding ranks up to it costs at most this share of the trend
GROUP_BYTES = 256 * 2**20  # weights (fp32) of the graphs held open at once
PRODUCTS = (
    "MatMul",
    "Gemm",
    "FusedMatMul",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "MatMulNBits",
)  # the operators a Linear's product runs as, fused or quantized


@dataclass
class Timing:
    """Medians (ms) for one layer shape: the factor pair at each rank, dense, and an empty graph; and the
    noise, the median over graphs of their rounds' median absolute deviation."""

    in_features: int
    out_features: int
    ranks: list[int]
    factored_ms: list[float]
    dense_ms: float
    empty_ms: float
    noise_ms: float = 0.0

    def work(self) -> list[float]:
        """Milliseconds of the layer's own work at each grid rank: the empty graph's time taken off."""
        return [max(0.0, t - self.empty_ms) for t in self.factored_ms]

    def cost_table(self, multiple: int = 1) -> CostTable:
        """The work per rank at the grid ranks that are multiples of `multiple` (all, when none is), made
        non-decreasing; dense likewise. Ranks off the multiple are left out because they are never used:
        some run slower than the multiple above them (a kernel's slow path for a ragged tile)."""
        every = list(zip(self.ranks, self.work()))
        points = [(r, w) for r, w in every if r % multiple == 0] or every
        return CostTable(
            tuple(r for r, _ in points),
            tuple(_isotonic([w for _, w in points])),
            max(0.0, self.dense_ms - self.empty_ms),
        )


def _isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def rank_grid(in_features: int, out_features: int) -> list[int]:
    """Ranks to time: multiples of RESOLUTION (coarser for wide layers), up to and including the largest
    rank that still saves parameters; empty when no rank does."""
    be = break_even_rank(in_features, out_features)
    cap = min(int(be) if int(be) < be else int(be) - 1, in_features, out_features)
    if cap < 1:
        return []
    step = RESOLUTION * math.ceil(cap / (RESOLUTION * MAX_POINTS))
    return sorted(set(range(step, cap + 1, step)) | {cap})


def machine(provider: str) -> dict:
    """What the kernels' speed depends on besides the software: CPU model and vector extensions, GPU."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    found = {
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count() or 1,
        "vector": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
    }
    if provider == "cuda":
        import torch

        found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"
    return found


def _key(provider: str, precision: str, threads: int, tokens: int, rounds: int, repeats: int) -> dict:
    return {
        "format": TIMING_FORMAT,
        "machine": machine(provider),
        "onnxruntime": ort.__version__,
        "provider": provider,
        "precision": precision,
        "threads": threads,
        "tokens": tokens,
        "resolution": RESOLUTION,
        "max_points": MAX_POINTS,
        "rounds": rounds,
        "repeats": repeats,
    }


def _check(provider: str, precision: str) -> None:
    """The provider and precision exist and suit each other."""
    if provider not in PROVIDERS:
        raise FwsvdError(f"compression.latency_provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    try:
        check_runs_on(precision, provider)
    except SpecError as exc:
        raise SpecError(f"compression.{exc.key}", exc.problem) from None


def _probe(provider: str, threads: int) -> None:
    """Fail unless the provider really starts here (ONNX Runtime would silently fall back to the CPU)."""
    with tempfile.TemporaryDirectory(prefix="fwsvd-kernel-timing-") as tmp:
        session, reason = open_session(_graph(Path(tmp) / "probe", 1, 1, 0, None, seed=0), provider, threads)
    if session is None:
        raise FwsvdError(f"compression.latency_provider {provider} cannot be timed: {reason}")


class _Quiet(logging.Filter):
    """Drops ONNX Runtime's quantizer advice to pre-process the model, given once per quantized graph (a
    two-node graph has nothing to pre-process)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")


def _quantized(graph: Path, precision: str) -> Path:
    quiet, root = _Quiet(), logging.getLogger()
    root.addFilter(quiet)  # the quantizer logs to the root logger; the filter goes when the variant is made
    try:
        return make_variant(graph, precision)
    finally:
        root.removeFilter(quiet)


def _graph(path: Path, tokens: int, in_features: int, out_features: int, rank: int | None, seed: int) -> Path:
    """x @ A @ B (rank r), x @ W (rank None) or, with out_features 0, the empty graph y = x; fp32."""
    rng = np.random.default_rng(seed)

    def weight(name: str, rows: int, cols: int) -> onnx.TensorProto:
        values = (rng.standard_normal((rows, cols)) / math.sqrt(rows)).astype(np.float32)
        return helper.make_tensor(name, TensorProto.FLOAT, [rows, cols], values.tobytes(), raw=True)

    if out_features == 0:
        nodes, weights, width = [helper.make_node("Identity", ["x"], ["y"])], [], in_features
    elif rank is None:
        nodes, weights = [helper.make_node("MatMul", ["x", "W"], ["y"])], [weight("W", in_features, out_features)]
        width = out_features
    else:
        nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])]
        weights, width = [weight("A", in_features, rank), weight("B", rank, out_features)], out_features
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, width])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    path.mkdir(parents=True)
    onnx.save(model, str(path / "model.onnx"))
    return path / "model.onnx"


class _Runner:
    """One session with its input and output bound on the provider's device, so a run times the kernels,
    not copies between host and device (its threads stop spinning after a run, as `session_options` says)."""

    def __init__(self, graph: Path, provider: str, threads: int, x: np.ndarray, width: int) -> None:
        self.session = ort.InferenceSession(str(graph), session_options(threads), providers=[PROVIDERS[provider]])
        device = "cuda" if provider == "cuda" else "cpu"
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
        self.binding.bind_ortvalue_output(
            "y", ort.OrtValue.ortvalue_from_shape_and_type([x.shape[0], width], np.float32, device, 0)
        )

    def __call__(self, repeats: int) -> float:
        """Milliseconds per run, over `repeats` runs."""
        start = time.perf_counter()
        for _ in range(repeats):
            self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - start) * 1000 / repeats


def _groups(in_features: int, out_features: int) -> list[list[int]]:
    """The grid's ranks in groups whose graphs are held open together, within GROUP_BYTES of weights."""
    groups: list[list[int]] = [[]]
    size = 0
    for rank in rank_grid(in_features, out_features):
        weight = 4 * rank * (in_features + out_features)
        if groups[-1] and size + weight > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(rank)
        size += weight
    return groups


def _measure_shape(
    in_features: int,
    out_features: int,
    provider: str,
    precision: str,
    threads: int,
    tokens: int,
    rounds: int,
    repeats: int,
    bar: tqdm,
) -> Timing:
    ranks = rank_grid(in_features, out_features)
    x = np.random.default_rng(0).standard_normal((tokens, in_features)).astype(np.float32)
    groups = _groups(in_features, out_features)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fwsvd-kernel-timing-") as tmp:

        def runner(name: str, rank: int | None, width: int) -> _Runner:
            graph = _graph(Path(tmp) / name, tokens, in_features, width, rank, seed=len(times))
            if precision != "fp32" and width:
                graph = _quantized(graph, precision)
            times.setdefault(name, [])
            return _Runner(graph, provider, threads, x, width or in_features)

        fixed = {"empty": runner("empty", None, 0), "dense": runner("dense", None, out_features)}
        for group in groups:
            runners = {**fixed, **{f"r{rank}": runner(f"r{rank}", rank, out_features) for rank in group}}
            names = list(runners)
            for name in names:  # warm-up: first runs allocate and pack weights
                runners[name](repeats)
            for i in range(rounds):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    times[name].append(runners[name](repeats))
                bar.update(1)
            del runners
    medians = {name: statistics.median(t) for name, t in times.items()}
    noise = statistics.median(statistics.median(abs(v - medians[name]) for v in t) for name, t in times.items())
    return Timing(
        in_features, out_features, ranks, [medians[f"r{r}"] for r in ranks], medians["dense"], medians["empty"], noise
    )


def _read(path: Path, key: dict) -> dict[str, dict]:
    """The usable cached shapes of a file with exactly this key: {} when there is none or it cannot be
    read; an entry that is not a whole timing of its shape's grid is left out (measured again)."""
    try:
        data = json.loads(path.read_text())
        shapes = data["shapes"] if data.get("key") == key else {}
        found = {}
        for name, entry in shapes.items():
            timing = Timing(**entry)
            shape = (timing.in_features, timing.out_features)
            if (
                f"{shape[0]}x{shape[1]}" == name
                and timing.ranks == rank_grid(*shape)
                and len(timing.factored_ms) == len(timing.ranks)
            ):
                found[name] = entry
        return found
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def measure(
    shapes: list[tuple[int, int]],
    provider: str,
    precision: str,
    shape: str,
    threads: int,
    cache_dir: Path,
    rounds: int = 9,
    repeats: int = 5,
    progress: bool = True,
) -> dict[tuple[int, int], Timing]:
    """The timing of each (in, out) layer shape on `provider` in `precision`, for the tokens of `shape`
    (BATCHxSEQUENCE), from `cache_dir` where measured before on this machine, else measured and stored."""
    _check(provider, precision)
    batch, sequence = (int(v) for v in shape.split("x"))
    key = _key(provider, precision, threads, batch * sequence, rounds, repeats)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"kernel-timing-{digest}.json"
    cached = _read(path, key)
    wanted = sorted(set(shapes))
    missing = [s for s in wanted if f"{s[0]}x{s[1]}" not in cached]
    if missing:
        _probe(provider, threads)
        with tqdm(
            total=rounds * sum(len(_groups(*s)) for s in missing),
            unit="round",
            disable=not progress,
            desc=f"timing factor pairs ({provider}, {precision}, {shape})",
        ) as bar:
            for in_f, out_f in missing:
                timing = _measure_shape(
                    in_f, out_f, provider, precision, threads, batch * sequence, rounds, repeats, bar
                )
                cached[f"{in_f}x{out_f}"] = asdict(timing)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"key": key, "shapes": cached}, indent=1))
            os.replace(partial, path)
        except OSError as exc:
            raise FwsvdError(f"cannot store the kernel timings in {path.parent}: {exc}") from None
    return {s: Timing(**cached[f"{s[0]}x{s[1]}"]) for s in wanted}


def cost_tables(
    timings: dict[tuple[int, int], Timing], layers: dict[str, tuple[int, int]], multiple: int = 1
) -> dict[str, CostTable]:
    """Per layer name, the cost table of its (in, out) shape at ranks that are multiples of `multiple`:
    what core.allocate spends a time budget with."""
    tables = {s: t.cost_table(multiple) for s, t in timings.items()}
    return {name: tables[s] for name, s in layers.items()}


def _trend(points: list[tuple[int, float]], noise: float) -> float:
    """Least-squares slope of time against rank: the trend a step is compared with; 0 when the growth it
    predicts over the grid is under 4 times the measurement noise."""
    if len(points) < 3:
        return 0.0
    r_mean = sum(r for r, _ in points) / len(points)
    t_mean = sum(t for _, t in points) / len(points)
    slope = sum((r - r_mean) * (t - t_mean) for r, t in points) / sum((r - r_mean) ** 2 for r, _ in points)
    return slope if slope * (points[-1][0] - points[0][0]) > 4 * noise else 0.0


def recommended_multiple(timings: dict[tuple[int, int], Timing]) -> int:
    """The rank multiple at which the measured time steps, or 1 when it does not step measurably.

    Doubling from the grid's resolution b, a multiple m = 2b is taken when ranks halfway between its
    multiples (r = b mod 2b) run about as fast as the multiple above them: over those ranks of every
    shape, the median of (time(r + b) - time(r)) / (slope * b), with slope the shape's trend, is at most
    FLAT. A smooth cost gives about 1 there, a staircase of step m about 0, and a rank slower than the
    multiple above it (a ragged tile) below 0. Shapes whose time grows with the rank by less than 4 times
    its noise say nothing. The doubling stops at the first m not taken, or past MAX_MULTIPLE; raw medians
    are used, not the smoothed costs, so that slow off-multiple ranks count."""
    chosen, base = 1, RESOLUTION
    while 2 * base <= MAX_MULTIPLE:
        ratios = []
        for timing in timings.values():
            points = list(zip(timing.ranks, timing.work()))
            step = points[1][0] - points[0][0] if len(points) > 2 else 0
            regular = dict(p for p in points if step and p[0] % step == 0)  # without the cap off the grid
            slope = _trend(list(regular.items()), timing.noise_ms)
            if slope <= 0 or base % step:
                continue  # no trend, or the grid cannot show a step of 2 * base
            ratios += [
                (regular[r + base] - t) / (slope * base)
                for r, t in regular.items()
                if r % (2 * base) == base and r + base in regular
            ]
        if len(ratios) < 3 or statistics.median(ratios) > FLAT:
            break
        chosen = base = 2 * base
    return chosen


def time_budget(
    model,
    spec: CompressionSpec,
    dense_graph: Path,
    config: Any,
    threads: int,
    warmup: int,
    runs: int,
    rounds: int,
    cache_dir: Path,
    progress: bool = True,
) -> TimeBudget:
    """What `spec.target_speedup` spends: the dense graph (in `spec.latency_precision`) profiled on
    `spec.latency_provider` at `spec.latency_shape`, and the factor-pair cost table of every targeted layer.

    A layer runs at another speed inside the model than alone (caches, threads, a busy neighbour), and the
    whole graph's time drifts between runs; so the budget takes the model's time and each targeted layer's
    time in it from the same stretch of interleaved runs (`profiled`), and the tables only say how a
    layer's time changes with its rank: each is scaled so that its dense entry is the layer's time in the
    model (`in_graph`)."""
    provider, shape, precision = spec.latency_provider, spec.latency_shape, spec.latency_precision
    where = f"on {provider} at {shape} ({precision})"
    session, reason = open_session(dense_graph, provider, threads)
    if session is None:
        raise FwsvdError(f"compression.target_speedup is measured {where}, which cannot run here: {reason}")
    model_ms, nodes = profiled(session, dense_graph, provider, threads, shape, config, warmup, runs, rounds)
    del session
    layers = {p.name: (p.in_features, p.out_features) for p in plan_layers(model, spec)}
    timings = measure(sorted(set(layers.values())), provider, precision, shape, threads, cache_dir, progress=progress)
    multiple = spec.rank_multiple or recommended_multiple(timings)
    tables, ratio = in_graph(cost_tables(timings, layers, multiple), nodes)
    return TimeBudget(tables, model_ms, where, multiple, ratio)


def in_graph(tables: dict[str, CostTable], nodes: dict[str, float]) -> tuple[dict[str, CostTable], float]:
    """Each layer's table scaled by (its product nodes' time in the model) / (its dense time alone); a
    layer whose nodes are not found (renamed by a fusion) takes the median ratio of those found, 1 when
    none is. Returns the tables and that median."""
    by_module: dict[str, float] = {}
    for name, ms in nodes.items():
        by_module[module_path(name)] = by_module.get(module_path(name), 0.0) + ms
    ratios = {}
    for layer, table in tables.items():
        found = find_module(by_module, layer)
        if found is not None and table.dense > 0:
            ratios[layer] = found / table.dense
    median = statistics.median(ratios.values()) if ratios else 1.0
    scaled = {}
    for layer, table in tables.items():
        r = ratios.get(layer, median)
        scaled[layer] = CostTable(table.ranks, tuple(c * r for c in table.costs), table.dense * r)
    return scaled, median


def profiled(
    session: ort.InferenceSession,
    graph: Path,
    provider: str,
    threads: int,
    shape: str,
    config: Any,
    warmup: int,
    runs: int,
    rounds: int,
) -> tuple[float, dict[str, float]]:
    """The median time (ms) of `session` (a plain one of `graph`) at BATCHxSEQUENCE (its inputs made from the
    graph's own and the model `config`: `ort_io.timing_inputs`), and per matrix-product
    node (by name) the median of its kernel time in a profiled session of `graph`, the two timed in
    interleaved rounds: profiling slows the work between kernels, not the kernels, so the model's time
    is taken without it and its nodes' times with it, from the same stretch of time. The profile is
    written to a temporary folder and read back; nothing stays behind."""
    with tempfile.TemporaryDirectory(prefix="fwsvd-profile-") as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        profiling = ort.InferenceSession(str(graph), options, providers=[PROVIDERS[provider]])
        timed = interleaved(
            {"plain": session, "profiled": profiling}, [shape], config, warmup, runs, rounds, decode=False
        )  # a decoder's budget is its prompt pass: only those runs are profiled
        events = json.loads(Path(profiling.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-runs:]
    start = model_runs[0]["ts"]  # the warm-up runs come first
    nodes: dict[str, list[float]] = {}
    for e in events:
        if (
            e.get("cat") == "Node"
            and e["ts"] >= start
            and e["name"].endswith("_kernel_time")
            and e.get("args", {}).get("op_name") in PRODUCTS
        ):
            nodes.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1000)
    return timed["plain"][shape]["median_ms"], {name: statistics.median(times) for name, times in nodes.items()}
