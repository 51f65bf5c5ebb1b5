"""The accuracy / size / latency frontier over (method, ratio or budget) points, a table, and plots of
the task metric against kept parameters and against latency per execution provider; and, over every
artifact of every point (each precision of the compressed model, the dense baselines once), a table of
metric, file size and latency, the plain verdict of where dense int8 is the better pick, and the
two-panel frontier plot of the task metric against size and against latency.

A sweep pays once for what its points share: the model and data are loaded once, one statistics pass
gathers what every method asks for, and the dense model is exported, evaluated and timed once (in
`dense/`); each point only factorizes, writes its checkpoint, exports and validates the compressed model.
The sweep folder is one staged output: it appears whole when every point has run, or not at all."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .config import Recipe
from .core import LayerStats, gather_for, get_method
from .errors import FwsvdError, SpecError, section
from .loader import load_recipe
from .pipeline import dense_stage, point_stage, prepare, read_paths
from .stages.clock import Clock
from .stages.outputs import resolve_output, staged_output
from .stages.prepared import Dense, Prepared
from .stages.report import FRONTIER_PLOT, plot_frontier, write_report
from .stages.run_report import LATENCY_TIE, RunReport, artifact_rows, dense_int8_beats, first_measured
from .stages.tasks import Task

SWEEP_FILE = "sweep.json"


def _point(method: str, kind: str, value: float, folder: str, report: RunReport) -> dict:
    """One point's row of sweep.json."""
    val = report.validation
    point = {
        "method": method,
        kind: value,
        "folder": folder,
        "targeted_kept_ratio": report.compression.summary()["targeted_kept_ratio"],
        "model_kept_ratio": report.sizes.model_kept_ratio,
        "metric": val.metric,
        "original": val.original_torch,
        "compressed_torch": val.compressed_torch,
        "providers": {},
        "artifacts": artifact_rows(report),
        "passed": report.passed,
    }
    for name, entry in val.providers.items():
        if entry["status"] == "unavailable":
            continue
        lat = entry["latency"][0]
        point["providers"][name] = {
            "metric": entry["metric"],
            "shape": lat["shape"],
            "dense_ms": lat["dense"]["median_ms"],
            "compressed_ms": lat["compressed"]["median_ms"],
            "speedup": lat["speedup"],
        }
    return point


def _markdown(points: list[dict], kind: str) -> str:
    metric = points[0]["metric"]
    providers = sorted({p for point in points for p in point["providers"]})
    head = ["method", kind, "targeted kept", "model kept", f"{metric} (torch)"]
    for p in providers:
        head += [f"{metric} ({p})", f"{p} ms", f"{p} speedup"]
    lines = [
        f"# Sweep ({metric}; original model: {points[0]['original']:.4g})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for point in points:
        row = [
            point["method"],
            f"{point[kind]:g}",
            f"{point['targeted_kept_ratio']:.3f}",
            f"{point['model_kept_ratio']:.3f}",
            f"{point['compressed_torch']:.4g}",
        ]
        for p in providers:
            e = point["providers"].get(p)
            row += [f"{e['metric']:.4g}", f"{e['compressed_ms']:.2f}", f"{e['speedup']:.2f}"] if e else ["-"] * 3
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _baselines(points: list[dict]) -> list[dict]:
    """The dense artifacts' rows: measured once for the whole sweep, so every point carries the same."""
    return [r for r in points[0]["artifacts"] if r["artifact"].startswith("dense-")]


def _compressed(point: dict) -> list[dict]:
    return [r for r in point["artifacts"] if r["artifact"].startswith("compressed-")]


def dense_int8_wins(points: list[dict], task: Task) -> dict[str, list[dict]]:
    """Per point, the compressed artifacts its dense int8 artifact beats (`report.dense_int8_beats`)."""
    return {p["folder"]: beaten for p in points if (beaten := dense_int8_beats(p["artifacts"], task, p["metric"]))}


def _verdict(points: list[dict], wins: dict[str, list[dict]]) -> str:
    metric = points[0]["metric"]
    if not any(r["artifact"] == "dense-int8" and r["metric"] is not None for p in points for r in p["artifacts"]):
        return (
            "No dense int8 artifact was measured: add int8 to `export.precisions` to compare the compressed "
            "artifacts with the baseline a user would otherwise ship."
        )
    rule = (
        f"{metric} at least as good as the compressed artifact's, and a file no larger or a median latency "
        f"no higher (within {LATENCY_TIE:.0%}, a tie), on the same provider"
    )
    if not wins:
        return f"Dense int8 beats no compressed artifact at any point: nowhere does it have {rule}."
    where = "; ".join(
        f"{name}: " + ", ".join(f"{w['artifact']} on {w['provider']} ({' and '.join(w['on'])})" for w in ws)
        for name, ws in wins.items()
    )
    return f"**Dense int8 beats the compressed artifact** ({rule}) at: {where}."


def _artifact_table(points: list[dict], verdict: str, plotted: bool) -> str:
    metric = points[0]["metric"]
    rows = [("dense", r) for r in _baselines(points)] + [(p["folder"], r) for p in points for r in _compressed(p)]
    shape = next((r["shape"] for _, r in rows if r["shape"]), "-")
    head = ["point", "artifact", "provider", metric, "ONNX MB", f"median ms ({shape})", "speed-up vs dense fp32"]
    lines = ["## Every artifact", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        if r["metric"] is None:
            continue
        cells = [
            name,
            r["artifact"],
            r["provider"],
            f"{r['metric']:.4g}",
            f"{r['bytes'] / 1e6:.2f}",
            "-" if r["median_ms"] is None else f"{r['median_ms']:.2f}",
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"dense-fp32's {metric} is the PyTorch model's; the dense artifacts are measured once for every point.",
        "",
    ]
    missing = sorted({f"{r['artifact'].split('-', 1)[1]} on {r['provider']}" for _, r in rows if r["metric"] is None})
    if missing:
        lines += [f"Not measured (the provider did not start): {', '.join(missing)}.", ""]
    lines += [verdict, ""]
    if plotted:
        lines += [f"![{metric} against file size and latency, every artifact]({FRONTIER_PLOT})", ""]
    return "\n".join(lines)


def plot_artifacts(points: list[dict], task: Task, path: Path) -> bool:
    """The frontier over every point: each method's artifact of each precision one series, each artifact
    on the first provider that measured it, the dense artifacts as reference points (needs matplotlib)."""
    rows = first_measured(_baselines(points))
    rows += [
        {**r, "point": p["folder"], "series": f"{r['artifact']}, {p['method']}"}
        for p in points
        for r in first_measured(_compressed(p))
    ]
    return plot_frontier(
        rows, points[0]["metric"], task.higher_is_better(points[0]["metric"]), path, "every artifact of the sweep"
    )


def plot(points: list[dict], folder: Path) -> list[Path]:
    """PNG plots (needs matplotlib: pip install matplotlib); returns the files written. Drawn on
    standalone figures, so no global matplotlib state (backend, pyplot figures) is touched."""
    from matplotlib.figure import Figure

    metric = points[0]["metric"]
    methods = list(dict.fromkeys(p["method"] for p in points))
    written = []
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for m in methods:
        pts = sorted((p["model_kept_ratio"], p["compressed_torch"]) for p in points if p["method"] == m)
        ax.plot(*zip(*pts), marker="o", label=m)
    ax.axhline(points[0]["original"], color="grey", linestyle="--", label="original")
    ax.set(xlabel="parameters kept (fraction of the model)", ylabel=metric, title=f"{metric} against size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "metric_vs_params.png", dpi=110)
    written.append(folder / "metric_vs_params.png")
    for provider in sorted({p for point in points for p in point["providers"]}):
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for m in methods:
            pts = sorted(
                (p["providers"][provider]["compressed_ms"], p["providers"][provider]["metric"])
                for p in points
                if p["method"] == m and provider in p["providers"]
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        dense = [p["providers"][provider]["dense_ms"] for p in points if provider in p["providers"]]
        ax.axvline(sum(dense) / len(dense), color="grey", linestyle="--", label="dense latency")
        ax.set(xlabel=f"median latency, ms ({provider})", ylabel=metric, title=f"{metric} against latency ({provider})")
        ax.legend()
        fig.tight_layout()
        path = folder / f"metric_vs_latency_{provider}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def point_folder(method: str, kind: str, value: float) -> str:
    """A point's folder in the sweep, e.g. ``kfac-ratio0.5`` (the value to 6 significant digits)."""
    return f"{method}-{kind}{value:g}"


def _refuse_repeats(folders: list[str], kind: str) -> None:
    """A point given twice (a method or a value listed twice) would run twice, the second time into the
    first one's folder; refused before any work."""
    for i, name in enumerate(folders):
        if name in folders[:i]:
            raise FwsvdError(
                f"the sweep lists the point {name} twice (a method or {kind} given twice); each point runs once"
            )


def point_recipe(base: Recipe, method: str, kind: str, value: float) -> Recipe:
    """`base` with the point's method and cut: `kind` ("ratio" or "budget") set to `value`, every other
    cut (ratio, rank, budget, target_speedup) cleared, as a ``--set`` of it would; the spec checks it."""
    ratio, budget = (value, None) if kind == "ratio" else (None, value)
    try:
        return replace(
            base,
            compression=replace(
                base.compression, method=method, ratio=ratio, rank=None, budget=budget, target_speedup=None
            ),
        )
    except SpecError as exc:
        raise FwsvdError(
            f"{base.source}: the sweep's point {point_folder(method, kind, value)}: "
            f"'compression.{exc.key}' {exc.problem}"
        ) from None


def sweep(
    recipe_path: str | Path,
    values: list[float],
    methods: list[str],
    output: Path | None = None,
    overrides: tuple[str, ...] = (),
    budget: bool = False,
    progress: bool = True,
) -> tuple[Path, list[dict], list[Path]]:
    """Run every (method, value) point; `values` are ratios, or budgets when `budget` is set. Returns the
    folder, the points and the plots (none without matplotlib)."""
    base = load_recipe(recipe_path, overrides)
    if not values or not methods:
        raise FwsvdError("a sweep needs at least one method and one ratio or budget")
    if not base.validation.latency.shapes:
        raise FwsvdError(f"{recipe_path}: a sweep plots latency, so 'validation.latency.shapes' must not be empty")
    folder = resolve_output(
        output or base.resolve(base.export.output).with_name(base.resolve(base.export.output).name + "-sweep")
    )
    kind = "budget" if budget else "ratio"
    names = [get_method(m).name for m in methods]  # unknown methods fail before any run
    _refuse_repeats([point_folder(m, kind, v) for m in names for v in values], kind)
    with staged_output(folder, inputs=read_paths(base)) as staged:
        plan = [
            (method, value, point_recipe(base, method, kind, value)) for method in names for value in values
        ]  # every point's recipe is checked before any compute
        clock = Clock()
        prepared = prepare(plan[0][2], clock, names)
        statistics, info = _shared_statistics(prepared, plan, names, Path(base.base_dir or "."), clock, progress)
        dense = dense_stage(prepared, staged.path / "dense", clock, progress)
        shared = {
            "seconds": clock.seconds,
            "peak_rss_mb": clock.peak_rss_mb,
            "statistics": info,
            "dense_onnx": "dense/model.onnx",
        }
        points, wins, whole = _run_points(prepared, dense, plan, kind, staged.path, clock, shared, statistics, progress)
        plots = _summarize(points, prepared.task, kind, wins, whole, folder, staged.path)
    return folder, points, plots


def _shared_statistics(
    prepared: Prepared,
    plan: list[tuple[str, float, Recipe]],
    names: list[str],
    cache_base: Path,
    clock: Clock,
    progress: bool,
) -> tuple[dict[str, LayerStats] | None, dict]:
    """One statistics pass for what every point's method asks for (none when no method needs any); the
    runner that made it is let go after."""
    if not any(get_method(m).needs for m in names):
        return None, {}
    with section("compression"):
        statistics, info = gather_for(
            prepared.model,
            [r.compression for _, _, r in plan],
            prepared.calibration,
            prepared.task.loss,
            progress,
            cache_base,
            prepared.runner,
        )
    prepared.runner = None
    clock.lap("statistics (all points)")
    return statistics, info


def _run_points(
    prepared: Prepared,
    dense: Dense,
    plan: list[tuple[str, float, Recipe]],
    kind: str,
    path: Path,
    clock: Clock,
    shared: dict,
    statistics: dict[str, LayerStats] | None,
    progress: bool,
) -> tuple[list[dict], dict[str, list[dict]], dict]:
    """Each point in its folder under `path`, sweep.json written again after each; returns the points, where
    dense int8 beats them and the whole sweep's time and peak memory."""
    points: list[dict] = []
    peaks = [clock.whole()["peak_rss_mb"]]
    for i, (method, value, recipe) in enumerate(plan):
        name = point_folder(method, kind, value)
        (path / name).mkdir()
        report = point_stage(
            prepared, dense, recipe, path / name, Clock(), progress, statistics, last=i == len(plan) - 1
        )
        report = write_report(report, path / name)
        points.append(_point(method, kind, value, name, report))
        peaks.append(max(report.peak_rss_mb.values(), default=0.0))
        wins = dense_int8_wins(points, prepared.task)
        whole = {**clock.whole(), "peak_rss_mb": max(peaks)}  # each point's clock resets the high-water mark
        (path / SWEEP_FILE).write_text(
            json.dumps(
                {"kind": kind, "shared": shared, "points": points, "dense_int8_beats": wins, "whole_run": whole},
                indent=2,
            )
        )
    return points, wins, whole


def _summarize(
    points: list[dict],
    task: Task,
    kind: str,
    wins: dict[str, list[dict]],
    whole: dict,
    folder: Path,
    path: Path,
) -> list[Path]:
    """The plots (those matplotlib could draw) and sweep.md, written under `path`; returns the plots as they
    will be in `folder`."""
    try:
        plots = [folder / p.name for p in plot(points, path)]
    except ImportError:
        plots = []
    drawn = plot_artifacts(points, task, path / FRONTIER_PLOT)
    plots += [folder / FRONTIER_PLOT] if drawn else []
    (path / "sweep.md").write_text(
        _markdown(points, kind)
        + "\n"
        + _artifact_table(points, _verdict(points, wins), drawn)
        + f"\nWhole sweep: {whole['seconds']:.1f} s, peak host memory "
        f"{whole['peak_rss_mb']:.0f} MB.\n"
    )
    return plots
