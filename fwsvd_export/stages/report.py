"""The run's footprint: ``report.json`` for machines and ``report.md`` for people, from one dict."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .tasks import Task, get_task, metric_loss

FRONTIER_PLOT = "frontier.png"  # the task metric against size and latency, every artifact


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
    lines = ["Trials (each compression's graph timed against the dense one, interleaved"
             + ("; then all of them again in the same rounds, where the one closest to the target is kept"
                if together else "") + f"; search stopped: {aim['stopped']}):", ""]
    lines += _table(["trial", "aimed at", "predicted", "measured", "dense ms", "trial ms"]
                    + (["measured together"] if together else []) + ["targeted weights kept", "kept"],
                    [[i + 1, t["aimed_at"], t["predicted"], t["measured"], t["dense_ms"], t["compressed_ms"]]
                     + ([t["measured_together"]] if together else []) + [t["kept_ratio"], "yes" if i == aim["kept"] else ""]
                     for i, t in enumerate(trials)])
    dense = [allocation["dense_model_ms"]] + [t["dense_ms"] for t in trials]
    if max(dense) / min(dense) - 1 > aim["tolerance"]:
        lines += [f"The dense graph took {min(dense):.3g}-{max(dense):.3g} ms across the budget and the trials "
                  f"({max(dense) / min(dense) - 1:.0%} apart): the machine's speed changed during the run, and a "
                  "speed-up measured on it is uncertain by about as much: time on a machine nothing else runs on.", ""]
    return lines


def _loading_lines(report: dict) -> list[str]:
    """What loading the model let pass (a head newly initialised or left unused: report.json's model.notes)
    and whether the model folder's own Python could run: the model measured is not exactly the one stored."""
    notes = list(report["model"].get("notes", []))
    if (report.get("recipe") or {}).get("model", {}).get("trust_remote_code"):
        notes.append("model.trust_remote_code is true: the model folder's own Python was allowed to run")
    return [f"Note: {note}." for note in notes] + ([""] if notes else [])


def markdown(report: dict) -> str:
    comp, val, sizes = report["compression"], report.get("validation"), report["sizes"]
    summary = comp["summary"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"# fwsvd-export report: {verdict}", "",
             f"Model `{report['model']['source']}` ({report['model']['task']}), method **{summary['method']}**.", ""]
    lines += _loading_lines(report)
    lines += ["## Size", ""] + _table(
        ["", "dense", "compressed", "ratio"],
        [["parameters", sizes["params_dense"], sizes["params_compressed"], sizes["params_compressed"] / sizes["params_dense"]],
         ["targeted Linear parameters", summary["targeted_params_before"], summary["targeted_params_after"], summary["targeted_kept_ratio"]],
         ["ONNX file (bytes)", sizes.get("onnx_dense_bytes"), sizes.get("onnx_compressed_bytes"),
          (sizes.get("onnx_compressed_bytes") or 0) / (sizes.get("onnx_dense_bytes") or 1)]])
    check = comp.get("allocation")
    if check and "target_speedup" in check:
        lines += [f"Speed-up target: **{check['target_speedup']:g}x** {check['measured_on']}; the measured layer timings "
                  f"predict {check['predicted_speedup']:.2f}x (dense {check['dense_model_ms']:.3g} ms, Linear time budget "
                  f"{check['budget_ms']:.3g} ms); the validation below measures the graphs.", ""]
        if "aim" in check:
            lines += _aim_lines(check)
    elif check:
        losses = ", ".join(f"{k} {v['loss']:.4g}" for k, v in check["candidates"].items())
        lines += [f"Allocation check: **{check['winner']}** ranks had the lowest task loss on {check['check_batches']} "
                  f"{'held-out ' if check['held_out'] else ''}calibration batches ({losses}).", ""]
    graph = report.get("graph", {})
    if graph:
        g = graph["compressed"]
        lines += ["## ONNX graph", "",
                  f"Dense graph: {graph['dense']['matmul_nodes']} MatMul and {graph['dense']['gemm_nodes']} Gemm nodes; "
                  f"compressed graph: {g['matmul_nodes']} MatMul and {g['gemm_nodes']} Gemm nodes. "
                  f"{g['split_matmul_pairs_found']} of {g['factorized_layers']} factorized layers appear as two matrix "
                  "multiplies (MatMul, or Gemm where the model flattens its input).", ""]
    if val:
        lines += ["## Checks", ""] + _table(["check", "result", "detail"],
                                            [[c["name"], "pass" if c["passed"] else "FAIL", c["detail"]] for c in val["checks"]])
        rows = [["original (torch)", "-", val["original_torch"], "-", "-"],
                ["compressed (torch)", "-", val["compressed_torch"], "-", "-"]]
        latency_rows = []
        for name, entry in val["providers"].items():
            if entry["status"] == "unavailable":
                rows.append([f"compressed (onnx, {name})", "unavailable", entry["reason"], "-", "-"])
                continue
            p = entry["parity"]
            rows.append([f"compressed (onnx, {name})", entry["status"], entry["metric"], p["max_abs_error"], p["max_rel_error"]])
            for lat in entry["latency"]:
                decode = [lat["dense"]["decode_per_token"]["median_ms"], lat["compressed"]["decode_per_token"]["median_ms"],
                          lat["decode_speedup"]] if "decode_speedup" in lat else ["-"] * 3
                latency_rows.append([name, lat["shape"], lat["dense"]["median_ms"], lat["dense"]["p90_ms"],
                                     lat["compressed"]["median_ms"], lat["compressed"]["p90_ms"], lat["speedup"], *decode])
        lines += [f"## Accuracy ({val['metric']})", ""] + _table(["model", "status", val["metric"], "max abs error", "max rel error"], rows)
        if latency_rows:
            lines += ["## Latency (ms)", ""] + _table(
                ["provider", "shape", "dense median", "dense p90", "compressed median", "compressed p90", "speedup",
                 "dense decode/token", "compressed decode/token", "decode speedup"], latency_rows)
            lines += ["For decoders exported with the key/value cache, the first columns time the prefill at that shape.", ""]
            lines += [f"Linear-layer FLOP ratio (compressed / dense): {report['flop_ratio']:.3f}; "
                      "it bounds the speedup the factorized layers alone can give.", ""]
    if val and val.get("variants"):
        lines += _precisions(report)
    if report.get("artifacts", {}).get("frontier_plot"):
        lines += [f"![{val['metric']} against file size and latency, every artifact]({FRONTIER_PLOT})", ""]
    lines += ["## Layers", ""]
    if report.get("artifacts", {}).get("ranks_plot"):
        lines += ["![ranks per layer](ranks.png)", ""]
    lines += _table(
        ["layer", "shape (out x in)", "rank", "params kept", "weighted error", "note"],
        [[p["name"], f"{p['out_features']}x{p['in_features']}", p["rank"] if p["rank"] is not None else "dense",
          p["params_after"] / p["params_before"], p["weighted_error"], "; ".join([p["reason"]] + p["notes"])]
         for p in comp["layers"]])
    peaks = report.get("peak_rss_mb", {})
    run = report.get("whole_run")
    whole = [["whole run", run["seconds"], run["peak_rss_mb"]]] if run else []
    lines += ["## Stages", ""] + _table(["stage", "seconds", "peak host memory (MB)"],
                                        [[k, v, peaks.get(k)] for k, v in report["seconds"].items()] + whole)
    return "\n".join(lines)


def artifact_rows(report: dict) -> list[dict]:
    """Every artifact of the run on each provider it was measured on or meant for: the dense and the
    compressed fp32 graph and every precision variant, with task metric, ONNX bytes, and at the first
    latency shape the median latency and the speed-up over dense fp32 (None where not measured).
    Dense fp32's metric is the PyTorch model's: its graph is timed, not evaluated."""
    val, sizes = report["validation"], report["sizes"]
    rows = []

    def row(artifact: str, provider: str, metric: Optional[float], size: int, latency: Optional[dict],
            ms: Optional[float], speedup: Optional[float]) -> None:
        rows.append({"artifact": artifact, "provider": provider, "metric": metric, "bytes": size,
                     "shape": latency["shape"] if latency else None, "median_ms": ms, "speedup": speedup})

    for name, entry in val["providers"].items():
        if entry["status"] == "unavailable":
            continue
        first = entry["latency"][0] if entry["latency"] else None
        row("dense-fp32", name, val["original_torch"], sizes["onnx_dense_bytes"], first,
            first["dense"]["median_ms"] if first else None, 1.0 if first else None)
        row("compressed-fp32", name, entry["metric"], sizes["onnx_compressed_bytes"], first,
            first["compressed"]["median_ms"] if first else None, first["speedup"] if first else None)
    for variant, measured in val["variants"].items():
        for name, entry in measured.items():
            if not isinstance(entry, dict):
                continue
            first = entry["latency"][0] if entry.get("latency") else None
            row(variant, name, entry.get("metric"), measured["bytes"], first, first["median_ms"] if first else None,
                first["speedup_vs_dense_fp32"] if first else None)
    return rows


def first_measured(rows: list[dict]) -> list[dict]:
    """Per artifact, its row on the first provider (in the recipe's order) that measured it."""
    first: dict[str, dict] = {}
    for r in rows:
        if r["metric"] is not None:
            first.setdefault(r["artifact"], r)
    return list(first.values())


def dense_int8_beats(rows: list[dict], task: Task) -> list[dict]:
    """The compressed artifacts of one run that its dense int8 artifact beats on the same provider: a task
    metric at least as good together with a file no larger or a median latency no higher (`on` names
    which). Dense int8 is the artifact a user would ship instead of ours, so the report says so plainly."""
    beaten = []
    for dense in (r for r in rows if r["artifact"] == "dense-int8" and r["metric"] is not None):
        for ours in rows:
            if (not ours["artifact"].startswith("compressed-") or ours["provider"] != dense["provider"]
                    or ours["metric"] is None or metric_loss(task, ours["metric"], dense["metric"]) > 0):
                continue
            on = [name for name, key in (("size", "bytes"), ("latency", "median_ms"))
                  if dense[key] is not None and ours[key] is not None and dense[key] <= ours[key]]
            if on:
                beaten.append({"artifact": ours["artifact"], "provider": ours["provider"], "on": on})
    return beaten


def verdicts(report: dict) -> list[str]:
    """The run's plain statements: where dense int8 is the better pick, and why."""
    rows = {(r["artifact"], r["provider"]): r for r in artifact_rows(report)}
    metric = report["validation"]["metric"]
    lines = []
    for beaten in dense_int8_beats(list(rows.values()), get_task(report["model"]["task"])):
        dense, ours = rows[("dense-int8", beaten["provider"])], rows[(beaten["artifact"], beaten["provider"])]
        on = beaten["on"]  # beaten on one axis only, ours may still win on the other
        unless = "" if len(on) == 2 else f" unless {'size' if on == ['latency'] else 'latency'} decides"
        lines.append(f"dense-int8 beats {beaten['artifact']} on {beaten['provider']} ({' and '.join(on)}): "
                     f"{metric} {dense['metric']:.4f} vs {ours['metric']:.4f}, {dense['bytes'] / 1e6:.1f} MB vs "
                     f"{ours['bytes'] / 1e6:.1f} MB" + (f", {dense['median_ms']:.2f} ms vs {ours['median_ms']:.2f} ms"
                                                      if dense["median_ms"] and ours["median_ms"] else "")
                     + f"; ship dense-int8{unless}")
    return lines


def precision_rows(report: dict) -> list[list[Any]]:
    """`artifact_rows` as the Precisions table shows them."""
    return [[r["artifact"], r["provider"], r["metric"], r["bytes"] / 1e6, r["median_ms"], r["speedup"]]
            for r in artifact_rows(report)]


def _precisions(report: dict) -> list[str]:
    val = report["validation"]
    lines = ["## Precisions", ""] + _table(
        ["artifact", "provider", val["metric"], "ONNX MB", "median ms", "speed-up vs dense fp32"], precision_rows(report))
    lines += ["dense-fp32's metric is the PyTorch model's. A variant is validated on the providers it is meant for "
              "(int8: CPU, fp16: CUDA); '-' marks one whose provider did not start.", ""]
    said = verdicts(report)
    return lines + [f"- {v}" for v in said] + ([""] if said else [])


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
    for ax, key, scale, label in ((panels[0], "bytes", 1e-6, "ONNX file, MB"),
                                  (panels[1], "median_ms", 1.0, f"median latency at {shape}, ms")):
        for name in names:
            series = sorted((r for r in measured if r.get("series", r["artifact"]) == name and r[key] is not None),
                            key=lambda r: r[key])
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


def plot_ranks(report: dict, path: Path) -> bool:
    """Bar chart of the rank kept per layer against its break-even rank (needs matplotlib). Drawn on a
    standalone figure, so matplotlib's global state (its backend, pyplot's figures) is left as it was."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False

    layers = report["compression"]["layers"]
    names = [p["name"] for p in layers]
    even = [p["in_features"] * p["out_features"] / (p["in_features"] + p["out_features"]) for p in layers]
    ranks = [p["rank"] if p["rank"] is not None else e for p, e in zip(layers, even)]
    fig = Figure(figsize=(max(6, 0.22 * len(names)), 5.5))
    ax = fig.subplots()
    ax.bar(range(len(names)), even, color="#dddddd", label="break-even rank (dense above)")
    ax.bar(range(len(names)), ranks, color=["#4477aa" if p["rank"] is not None else "#bb5566" for p in layers],
           label="rank kept (red: dense)")
    ax.set_xticks(range(len(names)), [n.split(".", 1)[-1] if len(names) > 12 else n for n in names],
                  rotation=90, fontsize=6)
    ax.set(ylabel="rank", title=f"ranks per layer ({report['compression']['summary']['method']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_report(report: dict, folder: Path) -> None:
    if plot_ranks(report, folder / "ranks.png"):
        report.setdefault("artifacts", {})["ranks_plot"] = "ranks.png"
    val = report.get("validation")
    if val:
        val["verdicts"] = verdicts(report)
    if val and plot_frontier(first_measured(artifact_rows(report)), val["metric"],
                             get_task(report["model"]["task"]).higher_is_better, folder / FRONTIER_PLOT,
                             f"every artifact of the run ({report['compression']['summary']['method']})"):
        report.setdefault("artifacts", {})["frontier_plot"] = FRONTIER_PLOT
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "report.md").write_text(markdown(report))
