"""The run's footprint: ``report.json`` for machines, ``report.md``, the plots and the model card
(``README.md``, model_card.py) for people, each made once from one `RunReport` (``run_report.py``) by functions that change nothing they are given."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path
from typing import Any

from ..core import CompressionResult
from .model_card import recommended, write_model_card
from .run_report import RunReport, artifact_rows, dense_int8_beats, first_measured, verdicts
from .tasks import get_task

__all__ = [
    "FRONTIER_PLOT",
    "RANKS_PLOT",
    "RunReport",
    "artifact_rows",
    "dense_int8_beats",
    "first_measured",
    "markdown",
    "plot_frontier",
    "plot_ranks",
    "precision_rows",
    "verdicts",
    "write_report",
]

FRONTIER_PLOT = "frontier.png"  # the task metric against size and latency, every artifact
RANKS_PLOT = "ranks.png"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _aim_lines(allocation: dict) -> list[str]:
    """The speed-up target's trials, and how far the dense graph's own time moved across the budget and
    the trials: a machine whose speed changes under the run changes every speed-up measured on it."""
    aim = allocation["aim"]
    trials = aim["trials"]
    together = aim["kept_by"] == "measured_together"
    lines = [
        "Trials (each compression's graph timed against the dense one, interleaved"
        + (
            "; then all of them again in the same rounds, where the one closest to the target is kept"
            if together
            else ""
        )
        + f"; search stopped: {aim['stopped']}):",
        "",
    ]
    lines += _table(
        ["trial", "aimed at", "predicted", "measured", "dense ms", "trial ms"]
        + (["measured together"] if together else [])
        + ["targeted weights kept", "kept"],
        [
            [i + 1, t["aimed_at"], t["predicted"], t["measured"], t["dense_ms"], t["compressed_ms"]]
            + ([t["measured_together"]] if together else [])
            + [t["kept_ratio"], "yes" if i == aim["kept"] else ""]
            for i, t in enumerate(trials)
        ],
    )
    dense = [allocation["dense_model_ms"]] + [t["dense_ms"] for t in trials]
    if max(dense) / min(dense) - 1 > aim["tolerance"]:
        lines += [
            f"The dense graph took {min(dense):.3g}-{max(dense):.3g} ms across the budget and the trials "
            f"({max(dense) / min(dense) - 1:.0%} apart): the machine's speed changed during the run, and a "
            "speed-up measured on it is uncertain by about as much: time on a machine nothing else runs on.",
            "",
        ]
    return lines


def _loading_lines(report: RunReport) -> list[str]:
    """What loading the model let pass (a head newly initialised or left unused: report.json's model.notes)
    and whether the model folder's own Python could run: the model measured is not exactly the one stored."""
    notes = list(report.model.notes)
    if (report.recipe or {}).get("model", {}).get("trust_remote_code"):
        notes.append("model.trust_remote_code is true: the model folder's own Python was allowed to run")
    return [f"Note: {note}." for note in notes] + ([""] if notes else [])


def _size_lines(report: RunReport) -> list[str]:
    sizes, summary = report.sizes, report.compression.summary()
    return ["## Size", ""] + _table(
        ["", "dense", "compressed", "ratio"],
        [
            ["parameters", sizes.params_dense, sizes.params_compressed, sizes.model_kept_ratio],
            [
                "targeted Linear parameters",
                summary["targeted_params_before"],
                summary["targeted_params_after"],
                summary["targeted_kept_ratio"],
            ],
            [
                "ONNX file (bytes)",
                sizes.onnx_dense_bytes,
                sizes.onnx_compressed_bytes,
                (sizes.onnx_compressed_bytes or 0) / (sizes.onnx_dense_bytes or 1),
            ],
        ],
    )


def _recovery_lines(report: RunReport) -> list[str]:
    """The fine-tuning's curve, epoch by epoch, and why it stopped: whether it converged is read here."""
    tune = report.finetune
    if not tune.epoch_loss:
        return []
    curve = zip_longest(tune.epoch_loss, tune.heldout_loss, tune.learning_rate)  # '-' where a report has none
    rows = [[epoch, *values, "best" if epoch == tune.best_epoch else ""] for epoch, values in enumerate(curve, 1)]
    if tune.start_loss is not None:
        rows.insert(0, [0, None, tune.start_loss, None, "best" if tune.best_epoch == 0 else ""])
    objective = (report.recipe.get("finetune") or {}).get("objective", "task")
    return (
        ["## Recovery fine-tuning", ""]
        + _table(["epoch", f"train loss ({objective})", "held-out loss", "learning rate", "kept"], rows)
        + [f"{tune.stop_reason} ({tune.heldout_batches} of {tune.batches} batches held out).", ""]
    )


def _allocation_lines(allocation: dict) -> list[str]:
    """The speed-up target and its trials, or the budget allocation's check; nothing for a uniform cut."""
    check = allocation
    if check and "target_speedup" in check:
        lines = [
            f"Speed-up target: **{check['target_speedup']:g}x** {check['measured_on']}; the measured layer timings "
            f"predict {check['predicted_speedup']:.2f}x (dense {check['dense_model_ms']:.3g} ms, Linear time budget "
            f"{check['budget_ms']:.3g} ms); the validation below measures the graphs.",
            "",
        ]
        return lines + (_aim_lines(check) if "aim" in check else [])
    if check:
        losses = ", ".join(
            f"{k} {v['loss']:.4g}" + (f" ± {v['loss_se']:.2g}" if "loss_se" in v else "")
            for k, v in check["candidates"].items()
        )
        return [
            f"Allocation check: **{check['winner']}** ranks had the lowest task loss on {check['check_batches']} "
            f"{'held-out ' if check['held_out'] else ''}calibration batches ({losses}"
            f"{'; ± one standard error, from the spread over the batches' if '±' in losses else ''}).",
            "",
        ]
    return []


def _graph_lines(graph: dict) -> list[str]:
    if not graph:
        return []
    g = graph["compressed"]
    return [
        "## ONNX graph",
        "",
        f"Dense graph: {graph['dense']['matmul_nodes']} MatMul and {graph['dense']['gemm_nodes']} Gemm nodes; "
        f"compressed graph: {g['matmul_nodes']} MatMul and {g['gemm_nodes']} Gemm nodes. "
        f"{g['split_matmul_pairs_found']} of {g['factorized_layers']} factorized layers appear as two matrix "
        "multiplies (MatMul, or Gemm where the model flattens its input).",
        "",
    ]


def _provider_rows(providers: dict) -> tuple[list[list[Any]], list[list[Any]]]:
    """The accuracy table's rows of each provider and the latency table's rows."""
    rows, latency_rows = [], []
    for name, entry in providers.items():
        if entry["status"] == "unavailable":
            rows.append([f"compressed (onnx, {name})", "unavailable", entry["reason"], "-", "-"])
            continue
        p = entry["parity"]
        rows.append(
            [f"compressed (onnx, {name})", entry["status"], entry["metric"], p["max_abs_error"], p["max_rel_error"]]
        )
        for lat in entry["latency"]:
            decode = (
                [
                    lat["dense"]["decode_per_token"]["median_ms"],
                    lat["compressed"]["decode_per_token"]["median_ms"],
                    lat["decode_speedup"],
                ]
                if "decode_speedup" in lat
                else ["-"] * 3
            )
            latency_rows.append(
                [
                    name,
                    lat["shape"],
                    lat["dense"]["median_ms"],
                    lat["dense"]["p90_ms"],
                    lat["compressed"]["median_ms"],
                    lat["compressed"]["p90_ms"],
                    lat["speedup"],
                    *decode,
                ]
            )
    return rows, latency_rows


def _validation_lines(report: RunReport) -> list[str]:
    val = report.validation
    lines = ["## Checks", ""] + _table(
        ["check", "result", "detail"], [[c.name, "pass" if c.passed else "FAIL", c.detail] for c in val.checks]
    )
    provider_rows, latency_rows = _provider_rows(val.providers)
    rows = [
        ["original (torch)", "-", val.original_torch, "-", "-"],
        ["compressed (torch)", "-", val.compressed_torch, "-", "-"],
    ] + provider_rows
    lines += [f"## Accuracy ({val.metric})", ""] + _table(
        ["model", "status", val.metric, "max abs error", "max rel error"], rows
    )
    if latency_rows:
        lines += ["## Latency (ms)", ""] + _table(
            [
                "provider",
                "shape",
                "dense median",
                "dense p90",
                "compressed median",
                "compressed p90",
                "speedup",
                "dense decode/token",
                "compressed decode/token",
                "decode speedup",
            ],
            latency_rows,
        )
        lines += [
            "For decoders exported with the key/value cache, the first columns time the prefill at that shape.",
            "",
        ]
        lines += [
            f"Linear-layer FLOP ratio (compressed / dense): {report.flop_ratio:.3f}; "
            "it bounds the speedup the factorized layers alone can give.",
            "",
        ]
    return lines


def _layer_lines(report: RunReport) -> list[str]:
    lines = ["## Layers", ""]
    if report.artifacts.ranks_plot:
        lines += [f"![ranks per layer]({report.artifacts.ranks_plot})", ""]
    return lines + _table(
        ["layer", "shape (out x in)", "rank", "params kept", "weighted error", "note"],
        [
            [
                p.name,
                f"{p.out_features}x{p.in_features}",
                p.rank if p.rank is not None else "dense",
                p.params_after / p.params_before,
                p.weighted_error,
                "; ".join([p.reason] + p.notes),
            ]
            for p in report.compression.layers
        ],
    )


def _stage_lines(report: RunReport) -> list[str]:
    peaks, run = report.peak_rss_mb, report.whole_run
    whole = [["whole run", run.seconds, run.peak_rss_mb]] if run else []
    return ["## Stages", ""] + _table(
        ["stage", "seconds", "peak host memory (MB)"], [[k, v, peaks.get(k)] for k, v in report.seconds.items()] + whole
    )


def markdown(report: RunReport) -> str:
    """report.md: the verdict, sizes, allocation, graph, checks, accuracy, latency, precisions, layers and
    stages of `report` (which it only reads)."""
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"# fwsvd-export report: {verdict}",
        "",
        f"Model `{report.model.source}` ({report.model.task}), method **{report.compression.method}**.",
        "",
    ]
    lines += _loading_lines(report) + _size_lines(report) + _recovery_lines(report)
    lines += _allocation_lines(report.compression.allocation)
    lines += _graph_lines(report.graph) + _validation_lines(report)
    if report.validation.variants:
        lines += _precisions(report)
    if report.artifacts.frontier_plot:
        lines += [
            f"![{report.metric} against file size and latency, every artifact]({report.artifacts.frontier_plot})",
            "",
        ]
    return "\n".join(lines + _layer_lines(report) + _stage_lines(report))


def precision_rows(report: RunReport) -> list[list[Any]]:
    """`artifact_rows` as the Precisions table shows them."""
    return [
        [r["artifact"], r["provider"], r["metric"], r["bytes"] / 1e6, r["median_ms"], r["speedup"]]
        for r in artifact_rows(report)
    ]


def _precisions(report: RunReport) -> list[str]:
    metric = report.validation.metric
    lines = ["## Precisions", ""] + _table(
        ["artifact", "provider", metric, "ONNX MB", "median ms", "speed-up vs dense fp32"], precision_rows(report)
    )
    lines += [
        "dense-fp32's metric is the PyTorch model's. A variant is validated on the providers it is meant for "
        "(int8: CPU, fp16: CUDA); '-' marks one whose provider did not start.",
        "",
    ]
    pick = recommended(report)
    said = [*verdicts(report), f"the artifact to ship: **{pick.artifact}** in `{pick.folder}` ({pick.why})"]
    return lines + [f"- {v}" for v in said] + [""]


MARKERS = {"fp32": "o", "int8": "s", "fp16": "^", "int4": "D"}  # one marker style per precision


def plot_frontier(rows: list[dict], metric: str, higher_is_better: bool, path: Path, title: str) -> bool:
    """Two panels: the task metric against ONNX file size and against median latency (needs matplotlib).
    `rows` are `artifact_rows`, one series per artifact; rows of sweep points carry a "point" label and a
    "series" name (the artifact of one method), joined in order along each axis. Marker style says the precision;
    dense artifacts are black reference points with a dotted line at their metric, so what lies on the
    better side of dense int8 shows at a glance. Drawn on a standalone figure: matplotlib's global
    state is left as it was."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False

    measured = [r for r in rows if r["metric"] is not None]
    if not measured:
        return False
    fig = Figure(figsize=(11, 4.5))
    panels = fig.subplots(1, 2)
    shape = next((r["shape"] for r in measured if r["shape"]), None)
    names = list(dict.fromkeys(r.get("series", r["artifact"]) for r in measured))
    dense = {r.get("series", r["artifact"]) for r in measured if r["artifact"].startswith("dense-")}
    colour = {name: f"C{i}" for i, name in enumerate(n for n in names if n not in dense)}
    for ax, key, scale, label in (
        (panels[0], "bytes", 1e-6, "ONNX file, MB"),
        (panels[1], "median_ms", 1.0, f"median latency at {shape}, ms"),
    ):
        for name in names:
            series = sorted(
                (r for r in measured if r.get("series", r["artifact"]) == name and r[key] is not None),
                key=lambda r: r[key],
            )
            if not series:
                continue
            marker = MARKERS.get(series[0]["artifact"].rsplit("-", 1)[-1], "o")
            xs, ys = [r[key] * scale for r in series], [r["metric"] for r in series]
            providers = ", ".join(dict.fromkeys(r["provider"] for r in series))
            style = dict(color="black", markersize=9, linestyle="none") if name in dense else dict(color=colour[name])
            ax.plot(xs, ys, marker=marker, label=f"{name} ({providers})", **style)
            if name in dense:
                ax.axhline(ys[0], color="grey", linestyle=":", linewidth=0.8)
            for x, y, r in zip(xs, ys, series):
                if "point" in r:
                    ax.annotate(r["point"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=label, ylabel=f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot_ranks(compression: CompressionResult, path: Path) -> bool:
    """Bar chart of the rank kept per layer against its break-even rank (needs matplotlib). Drawn on a
    standalone figure, so matplotlib's global state (its backend, pyplot's figures) is left as it was."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False

    layers = compression.layers
    names = [p.name for p in layers]
    even = [p.in_features * p.out_features / (p.in_features + p.out_features) for p in layers]
    ranks = [p.rank if p.rank is not None else e for p, e in zip(layers, even)]
    fig = Figure(figsize=(max(6, 0.22 * len(names)), 5.5))
    ax = fig.subplots()
    ax.bar(range(len(names)), even, color="#dddddd", label="break-even rank (dense above)")
    ax.bar(
        range(len(names)),
        ranks,
        color=["#4477aa" if p.rank is not None else "#bb5566" for p in layers],
        label="rank kept (red: dense)",
    )
    ax.set_xticks(
        range(len(names)), [n.split(".", 1)[-1] if len(names) > 12 else n for n in names], rotation=90, fontsize=6
    )
    ax.set(ylabel="rank", title=f"ranks per layer ({compression.method})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def draw_plots(report: RunReport, folder: Path) -> dict[str, str]:
    """Draw the run's plots into `folder` (none without matplotlib); returns the Artifacts fields naming
    the files drawn."""
    drawn = {}
    if plot_ranks(report.compression, folder / RANKS_PLOT):
        drawn["ranks_plot"] = RANKS_PLOT
    if plot_frontier(
        first_measured(artifact_rows(report)),
        report.metric,
        get_task(report.model.task).higher_is_better(report.metric),
        folder / FRONTIER_PLOT,
        f"every artifact of the run ({report.compression.method})",
    ):
        drawn["frontier_plot"] = FRONTIER_PLOT
    return drawn


def write_report(report: RunReport, folder: Path) -> RunReport:
    """Draw the plots, then write report.json (`RunReport.to_dict()`, serialized once), report.md and the
    model card (README.md) into `folder`, each once. Returns the report as written, naming the plots drawn; `report` is left as it was."""
    drawn = draw_plots(report, folder)
    written = replace(
        report,
        artifacts=replace(
            report.artifacts, ranks_plot=drawn.get("ranks_plot"), frontier_plot=drawn.get("frontier_plot")
        ),
    )
    (folder / "report.json").write_text(json.dumps(written.to_dict(), indent=2, default=str))
    (folder / "report.md").write_text(markdown(written))
    write_model_card(written, folder)
    return written
