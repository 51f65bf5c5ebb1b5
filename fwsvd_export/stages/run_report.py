"""The run report as data: `RunReport` and its parts, built from the compression's `CompressionResult` and
the validation's `Validation`; ``report.json`` is `RunReport.to_dict()`, serialized once.

The JSON's layout: report_version, tool, versions, recipe_file, recipe, model, compression, finetune, sizes,
flop_ratio, graph, validation (with its derived ``verdicts``), seconds, peak_rss_mb, artifacts, passed,
and, for a whole run only (not a sweep point), output_notes and whole_run. ``report_version`` 2 (a report
without the field is version 1, the dict it was before) added: data_sha256 (the SHA-256 of each data
role's file bytes, or of a hub dataset's id, config and split) and machine (the CPU, its cores and vector
extensions, and the GPU where CUDA was measured: what the latencies were timed on), each written only when
known; and ``scores``, every metric the task reports (``validation.metric`` is the one the checks read),
in validation (original_torch, compressed_torch) and in each provider's and precision variant's entry. `RunReport.from_dict` reads such a
JSON back, so ``from_dict(d).to_dict() == d``.

Also here, the reading every consumer of a report shares: the artifact rows (metric, file size and
latency of every artifact), the dense-int8 comparison and the plain verdicts built on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core import CompressionResult
from ..core.compress import LayerPlan
from .tasks import Task, get_task, metric_loss
from .validate import Check, Validation

TOOL = "fwsvd-export"
REPORT_VERSION = 2  # what changed since 1: the module docstring
_VARIANT_PREFIX = "onnx_compressed_"  # artifacts: one key per precision variant of the compressed graph


@dataclass
class ModelInfo:
    """The model measured: where it was loaded from, its task and dtype, and what loading let pass."""

    source: str
    task: str
    dtype: str | None
    notes: list[str] = field(default_factory=list)  # a head newly initialised or left unused
    head: str | None = None  # a classifier's: single_label_classification, regression, multi_label_classification
    pooling: dict[str, Any] | None = None  # an embedding model's: mode, normalize, and the file that said so

    def to_dict(self) -> dict[str, Any]:
        """The model entry: head and pooling only where the task has them."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("head", "pooling")}


@dataclass
class FinetuneInfo:
    """The recovery fine-tuning: the epochs asked for, the curve of those run (training loss, held-out loss,
    learning rate at each epoch's end), the epoch whose weights were kept and why it stopped, and the rows it
    read. The curve's keys after `batches` came within report_version 2 (only added, each with a default: an
    older report reads back as one without a held-out slice)."""

    epochs: int
    epoch_loss: list[float]  # the training loss of each epoch run
    data: str  # "finetune" or "calibration"
    batches: int  # all the batches read, the held-out ones included
    heldout_loss: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    best_epoch: int | None = None  # 1-based; 0: the weights before training; None: no held-out slice, the last's
    stopped_early: bool = False
    heldout_batches: int = 0
    start_loss: float | None = None  # the held-out loss before the first epoch

    @property
    def best_loss(self) -> float | None:
        """The held-out loss of the weights kept (None: nothing held out)."""
        if self.best_epoch is None:
            return None
        return self.start_loss if self.best_epoch == 0 else self.heldout_loss[self.best_epoch - 1]

    @property
    def stop_reason(self) -> str:
        """Why the fine-tuning ended where it did, and which epoch's weights it kept."""
        run, best = len(self.epoch_loss), self.best_epoch
        if best is None:
            return f"{run} of {self.epochs} epochs ran, nothing held out: the last epoch's weights kept"
        if best == 0:
            return (
                f"{run} of {self.epochs} epochs ran and none lowered the held-out loss below where it started: "
                "the weights before training kept"
            )
        if self.stopped_early:
            return (
                f"stopped after epoch {run} of {self.epochs}: the held-out loss had not improved for {run - best} "
                f"epochs; epoch {best}'s weights kept"
            )
        return f"all {run} epochs ran; epoch {best}'s weights kept (the lowest held-out loss)"


@dataclass
class Sizes:
    params_dense: int
    params_compressed: int
    onnx_dense_bytes: int
    onnx_compressed_bytes: int

    @property
    def model_kept_ratio(self) -> float:
        return self.params_compressed / self.params_dense


@dataclass
class Artifacts:
    """The run's files, relative to its folder."""

    checkpoint: str
    onnx_dense: str
    onnx_compressed: str
    variants: dict[str, str] = field(default_factory=dict)  # precision -> the compressed graph in it
    ranks_plot: str | None = None  # set once the plot is drawn
    frontier_plot: str | None = None

    def to_dict(self) -> dict[str, str]:
        found = {
            "checkpoint": self.checkpoint,
            "onnx_dense": self.onnx_dense,
            "onnx_compressed": self.onnx_compressed,
            **{_VARIANT_PREFIX + p: path for p, path in self.variants.items()},
        }
        plots = {"ranks_plot": self.ranks_plot, "frontier_plot": self.frontier_plot}
        return {**found, **{k: v for k, v in plots.items() if v is not None}}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> Artifacts:
        variants = {k.removeprefix(_VARIANT_PREFIX): v for k, v in data.items() if k.startswith(_VARIANT_PREFIX)}
        return cls(
            data["checkpoint"],
            data["onnx_dense"],
            data["onnx_compressed"],
            variants,
            data.get("ranks_plot"),
            data.get("frontier_plot"),
        )


@dataclass
class WholeRun:
    seconds: float
    peak_rss_mb: float  # the largest stage peak


@dataclass
class RunReport:
    """Everything one compressed model's run measured. `compression` and `validation` are the stages' own
    results; their inner entries (allocation, providers, variants) keep the stages' dict shapes."""

    recipe_file: str | None
    recipe: dict[str, Any]  # Recipe.to_dict(): the recipe as run, overrides applied
    model: ModelInfo
    compression: CompressionResult
    finetune: FinetuneInfo
    sizes: Sizes
    graph: dict[str, dict]  # "dense" and "compressed": export.inspect_graph of each
    validation: Validation
    seconds: dict[str, float]  # per stage, in run order
    peak_rss_mb: dict[str, float]  # per stage: the host memory high-water mark while it ran
    artifacts: Artifacts
    versions: dict[str, str] = field(default_factory=dict)
    output_notes: list[str] | None = None  # a whole run's only (a sweep point has none)
    whole_run: WholeRun | None = None  # a whole run's only
    tool: str = TOOL
    data_sha256: dict[str, str] | None = None  # data role -> fingerprint of what it read (stages.data.fingerprint)
    machine: dict[str, Any] | None = None  # what the latencies were timed on (kernel_timing.machine)

    @property
    def passed(self) -> bool:
        return self.validation.passed

    @property
    def flop_ratio(self) -> float:
        """Multiply-adds of the targeted Linear layers after / before (they scale with parameter counts)."""
        before = sum(p.params_before for p in self.compression.layers)
        return sum(p.params_after for p in self.compression.layers) / before if before else 1.0

    @property
    def metric(self) -> str:
        return self.validation.metric

    def to_dict(self) -> dict[str, Any]:
        """report.json's content: plain JSON types, the keys in the order the file shows them."""
        data: dict[str, Any] = {
            "report_version": REPORT_VERSION,
            "tool": self.tool,
            "versions": self.versions,
            "recipe_file": self.recipe_file,
            "recipe": self.recipe,
            "model": self.model.to_dict(),
            "compression": self.compression.to_dict(),
            "finetune": asdict(self.finetune),
            "sizes": asdict(self.sizes),
            "flop_ratio": self.flop_ratio,
            "graph": self.graph,
            "validation": {**self.validation.to_dict(), "verdicts": verdicts(self)},
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "artifacts": self.artifacts.to_dict(),
            "passed": self.passed,
        }
        if self.output_notes is not None:
            data["output_notes"] = self.output_notes
        if self.whole_run is not None:
            data["whole_run"] = asdict(self.whole_run)
        if self.data_sha256 is not None:
            data["data_sha256"] = self.data_sha256
        if self.machine is not None:
            data["machine"] = self.machine
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunReport:
        """A report read back from its JSON (the derived entries, summary, flop_ratio, passed and verdicts,
        are computed again; the compression's stage seconds live in `seconds`)."""
        comp, val = data["compression"], data["validation"]
        compression = CompressionResult(
            comp["summary"]["method"],
            [LayerPlan(**p) for p in comp["layers"]],
            statistics=comp["statistics"],
            allocation=comp["allocation"],
            factorization=comp["factorization"],
        )
        validation = Validation(
            val["metric"],
            val["original_torch"],
            val["compressed_torch"],
            val["providers"],
            [Check(**c) for c in val["checks"]],
            val["variants"],
            val.get("scores", {}),
        )
        whole = data.get("whole_run")
        return cls(
            data["recipe_file"],
            data["recipe"],
            ModelInfo(**data["model"]),
            compression,
            FinetuneInfo(**data["finetune"]),
            Sizes(**data["sizes"]),
            data["graph"],
            validation,
            data["seconds"],
            data["peak_rss_mb"],
            Artifacts.from_dict(data["artifacts"]),
            data["versions"],
            data.get("output_notes"),
            WholeRun(**whole) if whole is not None else None,
            data["tool"],
            data.get("data_sha256"),
            data.get("machine"),
        )


# --- what every reader of a report derives from it ------------------------------------------------------


def _row(
    artifact: str,
    provider: str,
    metric: float | None,
    size: int,
    latency: dict | None,
    ms: float | None,
    speedup: float | None,
) -> dict:
    return {
        "artifact": artifact,
        "provider": provider,
        "metric": metric,
        "bytes": size,
        "shape": latency["shape"] if latency else None,
        "median_ms": ms,
        "speedup": speedup,
    }


def artifact_rows(report: RunReport) -> list[dict]:
    """Every artifact of the run on each provider it was measured on or meant for: the dense and the
    compressed fp32 graph and every precision variant, with task metric, ONNX bytes, and at the first
    latency shape the median latency and the speed-up over dense fp32 (None where not measured).
    Dense fp32's metric is the PyTorch model's: its graph is timed, not evaluated."""
    val, sizes = report.validation, report.sizes
    rows = []
    for name, entry in val.providers.items():
        if entry["status"] == "unavailable":
            continue
        first = entry["latency"][0] if entry["latency"] else None
        rows.append(
            _row(
                "dense-fp32",
                name,
                val.original_torch,
                sizes.onnx_dense_bytes,
                first,
                first["dense"]["median_ms"] if first else None,
                1.0 if first else None,
            )
        )
        rows.append(
            _row(
                "compressed-fp32",
                name,
                entry["metric"],
                sizes.onnx_compressed_bytes,
                first,
                first["compressed"]["median_ms"] if first else None,
                first["speedup"] if first else None,
            )
        )
    for variant, measured in val.variants.items():
        for name, entry in measured.items():
            if not isinstance(entry, dict):
                continue
            first = entry["latency"][0] if entry.get("latency") else None
            rows.append(
                _row(
                    variant,
                    name,
                    entry.get("metric"),
                    measured["bytes"],
                    first,
                    first["median_ms"] if first else None,
                    first["speedup_vs_dense_fp32"] if first else None,
                )
            )
    return rows


def first_measured(rows: list[dict]) -> list[dict]:
    """Per artifact, its row on the first provider (in the recipe's order) that measured it."""
    first: dict[str, dict] = {}
    for r in rows:
        if r["metric"] is not None:
            first.setdefault(r["artifact"], r)
    return list(first.values())


# Medians within this fraction are a tie: the same graph timed twice in one run differs by a few percent
# (the A/A ratios of benchmarks/logs/speedup-targets*.md), so a smaller gap says nothing about speed.
LATENCY_TIE = 0.05


def dense_int8_beats(rows: list[dict], task: Task, metric: str) -> list[dict]:
    """The compressed artifacts of one run that its dense int8 artifact beats on the same provider: a task
    metric at least as good together with a file no larger or a median latency no higher, within
    LATENCY_TIE (`on` names which). Dense int8 is the artifact a user would ship instead of ours, so the report says so plainly."""
    beaten = []
    for dense in (r for r in rows if r["artifact"] == "dense-int8" and r["metric"] is not None):
        for ours in rows:
            if (
                not ours["artifact"].startswith("compressed-")
                or ours["provider"] != dense["provider"]
                or ours["metric"] is None
                or metric_loss(task, metric, ours["metric"], dense["metric"]) > 0
            ):
                continue
            on = [
                name
                for name, key, tie in (("size", "bytes", 1.0), ("latency", "median_ms", 1 + LATENCY_TIE))
                if dense[key] is not None and ours[key] is not None and dense[key] <= ours[key] * tie
            ]
            if on:
                beaten.append({"artifact": ours["artifact"], "provider": ours["provider"], "on": on})
    return beaten


def verdicts(report: RunReport) -> list[str]:
    """The run's plain statements: where dense int8 is the better pick, and why. "Ship dense-int8" only where
    it beats every compressed artifact on that provider on size and latency alike; otherwise the line says
    which of ours it beats, since another of ours (often the compressed int8 graph) may still be the pick."""
    rows = {(r["artifact"], r["provider"]): r for r in artifact_rows(report)}
    metric = report.validation.metric
    lines = []
    beats = dense_int8_beats(list(rows.values()), get_task(report.model.task), report.metric)
    # the providers where dense int8 beats every measured compressed artifact on size and latency alike
    measured = {(a, p) for (a, p), r in rows.items() if a.startswith("compressed-") and r["metric"] is not None}
    wholly = {(b["artifact"], b["provider"]) for b in beats if len(b["on"]) == 2}
    shipped = {p for _, p in measured if all(m in wholly for m in measured if m[1] == p)}
    for beaten in beats:
        dense, ours = rows[("dense-int8", beaten["provider"])], rows[(beaten["artifact"], beaten["provider"])]
        on = beaten["on"]  # beaten on one axis only, ours may still win on the other
        unless = "" if len(on) == 2 else f" unless {'size' if on == ['latency'] else 'latency'} decides"
        advice = "ship dense-int8" if beaten["provider"] in shipped else f"prefer dense-int8 to {beaten['artifact']}"
        lines.append(
            f"dense-int8 beats {beaten['artifact']} on {beaten['provider']} ({' and '.join(on)}): "
            f"{metric} {dense['metric']:.4f} vs {ours['metric']:.4f}, {dense['bytes'] / 1e6:.1f} MB vs "
            f"{ours['bytes'] / 1e6:.1f} MB"
            + (
                f", {dense['median_ms']:.2f} ms vs {ours['median_ms']:.2f} ms"
                + (f" (within {LATENCY_TIE:.0%}: a tie)" if dense["median_ms"] > ours["median_ms"] else "")
                if dense["median_ms"] and ours["median_ms"]
                else ""
            )
            + f"; {advice}{unless}"
        )
    return lines
