"""The model card: ``README.md`` in every run output (and in every sweep point's folder), in the Hugging Face
model-card format, rendered from the `RunReport` alone, as report.md is: YAML front matter (base_model,
library_name, tags, pipeline_tag, and the artifacts' metrics as model-index) over what was done (method,
cut, calibration data and its SHA-256, recovery), the artifact to ship and why, a snippet that loads that
artifact with optimum's ``ORTModelFor*`` and runs it, and every artifact's metric, size and latency with
the machine they were timed on. The front matter is made by huggingface_hub's own ``ModelCardData`` and
``EvalResult``, so ``huggingface_hub.ModelCard.load`` reads it back.

`checkpoint_card` is the card of a `compress` checkpoint folder: no graphs and no validation, so it says
what was done and how to load the checkpoint with ``fwsvd_export.load``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core import CompressionResult
from .run_report import FinetuneInfo, RunReport, artifact_rows, dense_int8_beats, first_measured
from .tasks import get_task

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

CARD_FILE = "README.md"
LIBRARY = "onnx"  # what the card's artifacts are; optimum's ORTModelFor* classes load them
# The optimum class that loads each task's graph folder, and the preprocessor and call of its snippet.
ORT_CLASSES = {
    "text-classification": "ORTModelForSequenceClassification",
    "feature-extraction": "ORTModelForFeatureExtraction",
    "text-generation": "ORTModelForCausalLM",
    "multiple-choice": "ORTModelForCausalLM",
    "image-classification": "ORTModelForImageClassification",
    "question-answering": "ORTModelForQuestionAnswering",
    "token-classification": "ORTModelForTokenClassification",
}
_RUN_LINES = {
    "text-classification": 'print(model(**tokenizer(["A sentence to classify."], return_tensors="pt")).logits.argmax(-1))',
    "feature-extraction": 'print(model(**tokenizer(["A sentence to embed."], return_tensors="pt")).last_hidden_state.mean(1))',
    "text-generation": 'print(tokenizer.decode(model.generate(tokenizer("Once upon a time", return_tensors="pt").input_ids, '
    "max_new_tokens=16)[0]))",
    "multiple-choice": 'print(tokenizer.decode(model.generate(tokenizer("The sun rises in the", return_tensors="pt").input_ids, '
    "max_new_tokens=2)[0]))",
    "image-classification": 'print(model(**tokenizer(Image.new("RGB", (224, 224)), return_tensors="pt")).logits.argmax(-1))',
    "token-classification": 'print(model(**tokenizer(["Ada Lovelace lived in London."], return_tensors="pt")).logits.argmax(-1))',
    "question-answering": 'out = model(**tokenizer("Who wrote it?", "It was written by Ada.", return_tensors="pt"))\n'
    "print(out.start_logits.argmax(-1), out.end_logits.argmax(-1))",
}


@dataclass(frozen=True)
class Pick:
    """The artifact the card recommends: its name as the report's artifact rows give it, the provider it
    was measured on, its folder relative to the report's, and why."""

    artifact: str
    provider: str
    folder: str
    why: str


def artifact_folder(report: RunReport, artifact: str) -> str:
    """The folder (relative to the report's) of an artifact row's graph: a precision variant sits beside
    its fp32 graph's folder, named ``NAME-PRECISION`` (precision.make_variant)."""
    arts = report.artifacts
    kind, precision = artifact.rsplit("-", 1)
    fp32 = posixpath.dirname(arts.onnx_dense if kind == "dense" else arts.onnx_compressed)
    if precision == "fp32":
        return fp32
    if kind == "compressed" and precision in arts.variants:
        return posixpath.dirname(arts.variants[precision])
    return f"{fp32}-{precision}"


def _describe(row: dict, metric: str) -> str:
    timed = (
        f", {row['median_ms']:.3g} ms at {row['shape']} ({row['speedup']:.2f}x dense fp32)"
        if row["median_ms"] is not None
        else ""
    )
    return f"{metric} {row['metric']:.4g} on {row['provider']}, {row['bytes'] / 1e6:.2f} MB{timed}"


def recommended(report: RunReport) -> Pick:
    """The artifact to ship: of the compressed artifacts that passed every check, the smallest file (the
    faster one on a tie); dense int8 instead where the report's own verdict finds it at least as good and
    no slower (no larger, where nothing was timed): a few megabytes saved do not pay for a slower, less
    accurate graph unless size decides, which the pick then says. A run that failed validation recommends nothing: the pick is its compressed
    fp32 graph, named as failed, for inspection."""
    metric = report.validation.metric
    rows = first_measured(artifact_rows(report))
    ours = [r for r in rows if r["artifact"].startswith("compressed-")]
    if not report.passed or not ours:
        failed = [c.name for c in report.validation.checks if not c.passed]
        folder = posixpath.dirname(report.artifacts.onnx_compressed)
        return Pick(
            "compressed-fp32",
            "cpu",
            folder,
            "nothing is recommended: the run failed validation ("
            + (", ".join(failed) or "no artifact was measured")
            + "); this is the compressed graph, for inspection",
        )
    best = min(ours, key=lambda r: (r["bytes"], r["median_ms"] if r["median_ms"] is not None else float("inf")))
    why = (
        f"the smallest compressed artifact that passed every check: {_describe(best, metric)}; the dense model "
        f"scores {report.validation.original_torch:.4g}"
    )
    all_rows = artifact_rows(report)
    for beaten in dense_int8_beats(all_rows, get_task(report.model.task), report.metric):
        on = beaten["on"]
        timed = best["median_ms"] is not None
        if (beaten["artifact"], beaten["provider"]) != (best["artifact"], best["provider"]) or (
            "latency" not in on if timed else "size" not in on
        ):
            continue
        dense = next(r for r in all_rows if r["artifact"] == "dense-int8" and r["provider"] == best["provider"])
        though = (
            ""
            if "size" in on
            else f", though {best['artifact']} is smaller ({best['bytes'] / 1e6:.2f} MB): pick it where size decides"
        )
        return Pick(
            "dense-int8",
            dense["provider"],
            artifact_folder(report, "dense-int8"),
            f"the dense model quantized to int8 is at least as good and no {'slower' if timed else 'larger'} than "
            f"{best['artifact']} ({_describe(dense, metric)}, against {_describe(best, metric)}){though}",
        )
    return Pick(best["artifact"], best["provider"], artifact_folder(report, best["artifact"]), why)


def snippet(task: str, folder: str, provider: str = "cpu", with_past: bool = True) -> str:
    """Python that loads the graph folder `folder` with optimum's class for `task` and runs it once."""
    cls = ORT_CLASSES[task]
    options = "".join(
        [
            ', provider="CUDAExecutionProvider"' if provider == "cuda" else "",
            ", use_cache=False" if task in ("text-generation", "multiple-choice") and not with_past else "",
        ]
    )
    image = task == "image-classification"
    loader = "AutoImageProcessor" if image else "AutoTokenizer"
    lines = [
        f"from optimum.onnxruntime import {cls}",
        f"from transformers import {loader}" + ("; from PIL import Image" if image else ""),
        f'model, tokenizer = {cls}.from_pretrained("{folder}"{options}), {loader}.from_pretrained("{folder}")',
        _RUN_LINES[task],
    ]
    return "\n".join(lines)


def _cut(compression: dict[str, Any]) -> str:
    """The recipe's compression cut, in words."""
    if compression.get("target_speedup") is not None:
        return (
            f"ranks allocated for a {compression['target_speedup']:g}x speed-up on {compression['latency_provider']} "
            f"at {compression['latency_shape']}"
        )
    if compression.get("budget") is not None:
        return f"ranks allocated globally to keep {compression['budget']:g} of the {compression['budget_scope']} parameters"
    if compression.get("rank") is not None:
        return f"rank {compression['rank']} in every targeted layer"
    return f"each targeted layer keeps {compression.get('ratio', 0.5):g} of its weights"


def _data_line(recipe: dict[str, Any], role: str, digests: dict[str, str]) -> str:
    source = (recipe.get("data") or {}).get(role) or {}
    where = (
        f"`{source['path']}`"
        if source.get("path")
        else f"hub dataset `{source.get('dataset')}`"
        + (f" ({source['dataset_config']})" if source.get("dataset_config") else "")
        + f", split {source.get('split')}"
    )
    limit = f", at most {source['max_samples']} records" if source.get("max_samples") else ""
    digest = digests.get(role)
    return f"{where}{limit}" + (f" (SHA-256 `{digest}`)" if digest else "")


def _done_lines(
    source: str,
    task: str,
    recipe: dict[str, Any],
    compression: CompressionResult,
    digests: dict[str, str],
    recovery: str,
) -> list[str]:
    """What was done: method, cut, layers, calibration data and its fingerprint, recovery."""
    summary = compression.summary()
    return [
        "## What was done",
        "",
        f"- Base model: `{source}` ({task}).",
        f"- Method: **{compression.method}** (Fisher-weighted low-rank factorization: each targeted Linear layer "
        "became two smaller ones), " + _cut(recipe.get("compression") or {}) + ".",
        f"- Layers: {summary['compressed_layers']} of {summary['targeted_layers']} targeted Linear layers factorized; "
        f"they keep {summary['targeted_kept_ratio']:.1%} of their parameters.",
        f"- Calibration data: {_data_line(recipe, 'calibration', digests)}.",
        f"- Recovery: {recovery}.",
        "",
    ]


def _recovery(recipe: dict[str, Any], info: FinetuneInfo | None = None) -> str:
    """The recipe's fine-tuning and, from a run's report, where it stopped and its last losses."""
    tune = recipe.get("finetune") or {}
    if not tune.get("epochs"):
        return "none (the factors come straight from the weighted factorization)"
    said = f"{tune['epochs']} epochs of fine-tuning ({tune.get('objective', 'task')}, training {tune.get('train')})"
    if info is None or not info.epoch_loss:
        return said
    last = f"last epoch's training loss {info.epoch_loss[-1]:.4g}"
    if info.best_loss is not None:
        last += f", best held-out loss {info.best_loss:.4g}"
    return f"{said}: {info.stop_reason}; {last}"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _machine(report: RunReport) -> str:
    found = report.machine or {}
    if not found:
        return "the machine was not recorded"
    threads = {e.get("threads") for e in report.validation.providers.values() if e.get("threads")}
    parts = [f"{found.get('cpu', '?')} ({found.get('cores', '?')} cores, {found.get('machine', '?')})"]
    if found.get("gpu"):
        parts.append(f"GPU {found['gpu']}")
    versions = report.versions
    ort = versions.get("onnxruntime") or versions.get("onnxruntime-gpu")
    return (
        "timed on "
        + ", ".join(parts)
        + (f", ONNX Runtime {ort}" if ort else "")
        + (f", {', '.join(map(str, sorted(threads)))} threads" if threads else "")
    )


def _table_lines(report: RunReport) -> list[str]:
    metric = report.validation.metric
    lines = [
        "## Every artifact",
        "",
        f"| artifact | folder | provider | {metric} | ONNX MB | median ms | shape | speed-up vs dense fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in artifact_rows(report):
        lines.append(
            f"| {r['artifact']} | `{artifact_folder(report, r['artifact'])}` | {r['provider']} | "
            f"{_fmt(r['metric'], '.4g')} | {r['bytes'] / 1e6:.2f} | {_fmt(r['median_ms'], '.3g')} | "
            f"{r['shape'] or '-'} | {_fmt(r['speedup'], '.2f')} |"
        )
    return lines + [
        "",
        f"Latency {_machine(report)}. dense-fp32's {metric} is the PyTorch model's; '-' marks what "
        "was not measured. The full report: `report.md` and `report.json`.",
        "",
    ]


def _front_matter(report: RunReport, name: str) -> Any:
    """The card's metadata: huggingface_hub's ModelCardData, every measured artifact's metric in model-index."""
    from huggingface_hub import EvalResult, ModelCardData

    task, metric = report.model.task, report.validation.metric
    evaluation = (report.recipe.get("data") or {}).get("evaluation") or {}
    hub = evaluation.get("dataset")
    dataset = {
        "dataset_type": hub or "local",
        "dataset_name": hub or posixpath.basename(str(evaluation.get("path"))),
        **({"dataset_config": evaluation["dataset_config"]} if hub and evaluation.get("dataset_config") else {}),
        **({"dataset_split": evaluation.get("split")} if hub else {}),
    }
    results = [
        EvalResult(
            task_type=task,
            metric_type=metric,
            metric_value=r["metric"],
            metric_name=f"{metric} ({r['artifact']}, {r['provider']})",
            **dataset,
        )
        for r in first_measured(artifact_rows(report))
    ]
    datasets = sorted(
        {s["dataset"] for s in (report.recipe.get("data") or {}).values() if isinstance(s, dict) and s.get("dataset")}
    )
    return ModelCardData(
        base_model=report.model.source,
        library_name=LIBRARY,
        pipeline_tag=task,
        model_name=name,
        tags=_tags(report.compression.method, task),
        eval_results=results or None,
        datasets=datasets or None,
    )


def _tags(method: str, task: str) -> list[str]:
    return ["fwsvd-export", "onnx", "optimum", "low-rank", "compressed", method, task]


def _name(source: str, method: str) -> str:
    return f"{posixpath.basename(source.rstrip('/')) or source}-{method}-compressed"


def _card(front: Any, body: list[str]) -> ModelCard:
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{front.to_yaml()}\n---\n\n" + "\n".join(body))


def model_card(report: RunReport) -> ModelCard:
    """The run's card (huggingface_hub's ModelCard), made from `report` alone, which it only reads."""
    name = _name(report.model.source, report.compression.method)
    pick = recommended(report)
    val = report.validation
    verdict = "passed" if report.passed else "FAILED"
    with_past = bool((report.recipe.get("export") or {}).get("with_past", True))
    body = [
        f"# {name}",
        "",
        f"`{report.model.source}` compressed by fwsvd-export and exported to ONNX; validation "
        f"in ONNX Runtime **{verdict}** ({val.metric}: dense {val.original_torch:.4g}, compressed "
        f"{val.compressed_torch:.4g} in PyTorch).",
        "",
    ]
    body += _done_lines(
        report.model.source,
        report.model.task,
        report.recipe,
        report.compression,
        report.data_sha256 or {},
        _recovery(report.recipe, report.finetune),
    )
    body += [
        "## The artifact to ship",
        "",
        f"**{pick.artifact}** in `{pick.folder}`: {pick.why}.",
        "",
        "Run from this folder (`pip install optimum-onnx onnxruntime`):",
        "",
        "```python",
        snippet(report.model.task, pick.folder, pick.provider, with_past),
        "```",
        "",
    ]
    body += _table_lines(report)
    return _card(_front_matter(report, name), body)


def checkpoint_card(
    source: str, task: str, recipe: dict[str, Any], compression: CompressionResult, digests: dict[str, str]
) -> ModelCard:
    """The card of a `compress` checkpoint folder (PyTorch weights with the factorized layers; no graphs)."""
    from huggingface_hub import ModelCardData

    name = _name(source, compression.method)
    front = ModelCardData(
        base_model=source,
        library_name="fwsvd-export",
        pipeline_tag=task,
        model_name=name,
        tags=_tags(compression.method, task),
    )
    body = [
        f"# {name}",
        "",
        f"`{source}` compressed by fwsvd-export: a PyTorch checkpoint, not yet exported or "
        "validated (`fwsvd-export run` does both).",
        "",
    ]
    body += _done_lines(source, task, recipe, compression, digests, _recovery(recipe))
    body += ["## Loading it", "", "Run from this folder:", "", "```python", checkpoint_snippet(task), "```", ""]
    return _card(front, body)


def checkpoint_snippet(task: str) -> str:
    """Python that loads a checkpoint folder (the current one) with fwsvd_export.load and runs it once."""
    imports = "from fwsvd_export import load" + ("; from PIL import Image" if task == "image-classification" else "")
    return "\n".join([imports, 'model, tokenizer = load(".", with_tokenizer=True)', _RUN_LINES[task]])


def write_model_card(report: RunReport, folder) -> None:
    """Write the run's card into `folder` as README.md."""
    model_card(report).save(folder / CARD_FILE)
