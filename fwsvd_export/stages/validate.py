"""Proof in ONNX Runtime: numeric parity, task-metric parity and latency, per execution provider.

ONNX Runtime silently falls back to the CPU when a provider cannot start (missing CUDA libraries, for
one), so a provider counts as used only when the session reports it first in ``get_providers()``;
otherwise it is reported as unavailable with the reason, never as passed.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from ..config import LatencySpec, ProviderSpec, ValidationSpec
from ..core.batch import Batch
from .generation import greedy_ort, greedy_torch
from .latency import in_turn, interleaved
from .ort_io import feeds, has_past
from .precision import PRECISIONS
from .tasks import Task, metric_loss, run_torch

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# ONNX Runtime's severity for the sessions the tool opens: errors only (3). Provider-loading messages come from
# ONNX Runtime's global logger, which the tool never changes; `_stderr_to_log` moves them to the log instead.
SESSION_LOG_SEVERITY = 3


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


@dataclass
class Validation:
    metric: str  # the metric the checks read (the task's first, or validation.metric)
    original_torch: float
    compressed_torch: float
    providers: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    variants: dict = field(default_factory=dict)  # "dense-int8", "compressed-int8", ...: per provider
    scores: dict = field(default_factory=dict)  # every metric of the task: "original_torch", "compressed_torch"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "original_torch": self.original_torch,
            "compressed_torch": self.compressed_torch,
            "scores": self.scores,
            "providers": self.providers,
            "variants": self.variants,
            "checks": [c.as_dict() for c in self.checks],
            "passed": self.passed,
        }


@contextmanager
def _stderr_to_log() -> Iterator[None]:
    """Send what native code prints on stderr meanwhile (ONNX Runtime's provider-loading errors) to the
    'fwsvd_export' log at debug level; no logger setting of ONNX Runtime is touched. File descriptor 2 is
    pointed at a temporary file for the block and back at what it was on exit, the block raising or not
    (`open_session` holds this around opening a session only). With fd 2 closed there is nothing to divert."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        if sys.stderr is not None:
            sys.stderr.flush()  # what Python wrote before the block goes where it was meant to
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                if sys.stderr is not None:
                    sys.stderr.flush()
                os.dup2(saved, 2)
                sink.seek(0)
                text = sink.read().decode(errors="replace").strip()
                if text:
                    logging.getLogger("fwsvd_export").debug("onnxruntime: %s", text)
    finally:
        os.close(saved)


def threads(spec: ValidationSpec) -> int:
    """Intra-op threads of every session the tool times: the recipe's, else every core."""
    return spec.latency.threads or os.cpu_count() or 1


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """Options of every session the tool opens. `intra_op_threads` 0 leaves ONNX Runtime's default. The
    worker threads stop spinning when a run ends: the tool times several sessions in turns in one
    process, and a session's threads spinning after its run take the cores from the next session's run
    (benchmarks/logs/spinning.md, "Spinning threads")."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = SESSION_LOG_SEVERITY  # this session only; the global logger stays as it was
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def open_session(path: Path, provider: str, intra_op_threads: int = 0) -> tuple[ort.InferenceSession | None, str]:
    """A session that really runs on `provider` (short name), or None and the reason it does not.
    `intra_op_threads` 0 leaves ONNX Runtime's default."""
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        return None, f"{name} is not in this onnxruntime build (has {', '.join(ort.get_available_providers())})"
    try:
        with _stderr_to_log():  # a provider's failed start is detected and reported below, not printed as an error
            session = ort.InferenceSession(str(path), session_options(intra_op_threads), providers=[name])
    except Exception as exc:  # provider libraries that fail to load raise on some builds
        return None, f"{name} failed to start: {exc}"
    used = session.get_providers()
    if not used or used[0] != name:
        return None, f"{name} could not start on this machine (session fell back to {', '.join(used)})"
    return session, ""


def _spins(options: ort.SessionOptions) -> bool:
    """Whether the worker threads of sessions opened with `options` go on spinning after a run."""
    try:
        return options.get_session_config_entry("session.force_spinning_stop") != "1"
    except RuntimeError:  # the entry was never set: ONNX Runtime's default, spinning
        return True


def run_ort(session: ort.InferenceSession, task: Task, batch: Batch) -> torch.Tensor:
    """The compared output of an ONNX graph for one batch, taken as `run_torch` takes it (`Task.compared`)."""
    values = session.run(list(task.output_names), feeds(session, batch.inputs))
    return task.compared([torch.from_numpy(v) for v in values])


def parity(outputs: list[torch.Tensor], reference: list[torch.Tensor], atol: float, rtol: float) -> dict:
    """Max absolute error, and error relative to the reference's largest magnitude."""
    abs_err = max(float((o.float() - r.float()).abs().max()) for o, r in zip(outputs, reference))
    scale = max(float(r.float().abs().max()) for r in reference)
    rel_err = abs_err / scale if scale else abs_err
    return {
        "max_abs_error": abs_err,
        "max_rel_error": rel_err,
        "atol": atol,
        "rtol": rtol,
        "passed": abs_err <= atol + rtol * scale,
    }


def relative_error(outputs: list[torch.Tensor], source: list[torch.Tensor], rtol: float) -> dict:
    """||outputs - source|| / ||source|| over all batches (Frobenius): the error of a lower precision, which
    max-error parity overstates on outputs with a few outlier features."""
    diff = sum(float((o.float() - s.float()).square().sum()) for o, s in zip(outputs, source))
    norm = sum(float(s.float().square().sum()) for s in source)
    error = (diff / norm) ** 0.5 if norm else diff**0.5
    return {"relative_error": error, "rtol": rtol, "passed": error <= rtol}


@dataclass
class Outputs:
    """A model's outputs on the evaluation batches: whole (at real tokens) for the first `validation.parity_batches`, and of
    every batch what the task's metric reads (`Task.summary`, a decoder's summed loss). A decoder's logits are
    tokens x vocabulary: Qwen2.5-0.5B's on 512 held-out tokens are 297 MiB, on WikiText-2's test split
    hundreds of GB, once per model and artifact checked."""

    whole: list[torch.Tensor]
    summaries: list[torch.Tensor]


def _outputs(run, task: Task, spec: ValidationSpec, batches: list[Batch], desc: str, progress: bool) -> Outputs:
    result = Outputs([], [])
    with torch.no_grad():
        for k, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)):
            output = run(batch)
            result.summaries.append(task.summary(output, batch))
            if k < max(1, spec.parity_batches):
                result.whole.append(_real_positions(output, batch))
    return result


def _real_positions(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-token outputs (rows, tokens, ...) at the real tokens only: a padding position predicts nothing,
    and the graph numbers its position differently from PyTorch (ort_io builds position ids from the mask),
    so its logits differ without anything being wrong. Other outputs as they are."""
    mask = batch.token_mask.to(output.device)
    if output.dim() >= 3 and output.shape[:2] == mask.shape:
        return output[mask.bool()]
    return output


def _scores(
    task: Task, outputs: Outputs, batches: list[Batch], reference: list[torch.Tensor] | None
) -> dict[str, float]:
    """Every metric the task reports for these outputs."""
    return task.score(outputs.summaries, batches, reference)


@dataclass
class Reference:
    """The dense model's results that every compressed model is compared with, measured once."""

    summaries: list[torch.Tensor]  # what the metric reads of the original model's output on each evaluation batch
    scores: dict[str, float]  # every metric of the task, the original model's
    graphs: dict[str, Path] = field(
        default_factory=dict
    )  # "dense", "dense-int8", ...: timed beside each compressed model
    variants: dict[str, dict] = field(default_factory=dict)  # "dense-int8" -> provider -> measurements


def measure_variant(
    task: Task,
    spec: ValidationSpec,
    precision: str,
    graph: Path,
    source: Outputs,
    batches: list[Batch],
    progress: bool,
    reference_out: list[torch.Tensor] | None,
) -> dict:
    """A precision variant on each provider it is meant for: task metric and parity against `source` (the
    outputs of the fp32 model it was made from) within the precision's tolerance. Its latency is measured
    later, interleaved with the other artifacts (`time_artifacts`)."""
    kind = PRECISIONS[precision]
    result: dict = {"bytes": graph_bytes(graph.parent), "tolerance_rtol": kind.rtol}
    for provider in spec.providers:
        if provider.name not in kind.providers:
            continue
        session, reason = open_session(graph, provider.name, threads(spec))
        if session is None:
            result[provider.name] = {"status": "unavailable", "reason": reason}
            continue
        out = _outputs(
            partial(run_ort, session, task),
            task,
            spec,
            batches,
            f"{graph.parent.name} (onnx, {provider.name})",
            progress,
        )
        scores = _scores(task, out, batches, reference_out)
        result[provider.name] = {
            "status": "measured",
            "metric": scores[task.headline(spec.metric, scores)],
            "scores": scores,
            "parity": relative_error(out.whole, source.whole, kind.rtol),
            "latency": [],
        }
    return result


def graph_bytes(folder: Path) -> int:
    """The ONNX graph's bytes in `folder`, its external weights included."""
    return sum(f.stat().st_size for f in folder.glob("model.onnx*"))


def reference(
    task: Task,
    spec: ValidationSpec,
    original: torch.nn.Module,
    batches: list[Batch],
    dense_onnx: Path,
    progress: bool = True,
    variants: dict[str, Path] | None = None,
) -> Reference:
    """Evaluate the original model in PyTorch and measure its precision `variants` (precision -> graph), the
    baselines a user could ship instead. Of its outputs only the metric's summaries are kept: compressed
    models are checked for parity against their own PyTorch outputs, and these are held through compression.
    The dense graph itself is first opened to be timed beside a compressed one (`time_artifacts`), once the
    torch models are let go: opened here, beside the model, it set a 0.5B run's dense validation peak
    (benchmarks/logs/scaling-memory.md, "Shape inference without the weights' values")."""
    outputs = _outputs(lambda b: run_torch(original, task, b), task, spec, batches, "original (torch)", progress)
    compared = outputs.summaries if task.needs_reference else None
    ref = Reference(
        outputs.summaries,
        _scores(task, outputs, batches, compared),
        {"dense": dense_onnx, **{f"dense-{p}": g for p, g in (variants or {}).items()}},
    )
    task.headline(spec.metric, ref.scores)  # a chosen metric this model or data has not: refused before compressing
    for precision, graph in (variants or {}).items():
        ref.variants[f"dense-{precision}"] = measure_variant(
            task, spec, precision, graph, outputs, batches, progress, compared
        )
    return ref


@dataclass
class TorchResults:
    """The compressed model's PyTorch results its graphs are checked against, taken first so that the
    model can be released before any ONNX Runtime session opens (the host then holds the model once,
    in the sessions)."""

    outputs: Outputs  # on the evaluation batches
    greedy: list[list[int]]  # the greedy continuation of each prompt


def torch_results(
    task: Task,
    spec: ValidationSpec,
    compressed: torch.nn.Module,
    batches: list[Batch],
    prompts: list[torch.Tensor] | None = None,
    progress: bool = True,
) -> TorchResults:
    """`compressed`'s outputs on `batches`, and for `prompts` (token ids, one row each) its greedy tokens."""
    outputs = _outputs(lambda b: run_torch(compressed, task, b), task, spec, batches, "compressed (torch)", progress)
    return TorchResults(outputs, [greedy_torch(compressed, ids, spec.generation_tokens) for ids in prompts or []])


def validate(
    task: Task,
    spec: ValidationSpec,
    dense: Reference,
    compressed: TorchResults,
    batches: list[Batch],
    compressed_onnx: Path,
    progress: bool = True,
    prompts: list[torch.Tensor] | None = None,
    variants: dict[str, Path] | None = None,
) -> Validation:
    """All checks of a compressed model (its PyTorch results and its graph) against the dense `reference`;
    `prompts`, those `torch_results` continued, drive the greedy-generation check of decoders. The artifacts
    are timed afterwards (`time_artifacts`), once the caller has let go of the outputs it no longer needs."""
    compressed_out = compressed.outputs
    reference = dense.summaries if task.needs_reference else None
    metric = task.headline(spec.metric, dense.scores)  # the first present, or validation.metric
    scores = _scores(task, compressed_out, batches, reference)
    result = Validation(
        metric,
        dense.scores[metric],
        scores[metric],
        scores={"original_torch": dense.scores, "compressed_torch": scores},
    )
    loss = metric_loss(task, metric, result.original_torch, result.compressed_torch)
    result.checks.append(
        Check(
            "metric loss (compressed torch)",
            loss <= spec.max_metric_loss,
            f"{metric} {result.original_torch:.4f} -> {result.compressed_torch:.4f} "
            f"(loss {loss:.4f}, allowed {spec.max_metric_loss})",
        )
    )
    for provider in spec.providers:
        _validate_on(
            provider, task, spec, result, compressed, batches, compressed_onnx, progress, prompts or [], reference
        )
    _validate_variants(task, spec, dense, result, compressed_out, batches, progress, reference, variants or {})
    if all(e["status"] == "unavailable" for e in result.providers.values()):
        result.checks.append(
            Check(
                "onnx runtime: validated",
                False,
                "no execution provider ran the compressed graph, so nothing was checked in ONNX Runtime",
            )
        )
    return result


def _validate_on(
    provider: ProviderSpec,
    task: Task,
    spec: ValidationSpec,
    result: Validation,
    compressed: TorchResults,
    batches: list[Batch],
    compressed_onnx: Path,
    progress: bool,
    prompts: list[torch.Tensor],
    reference: list[torch.Tensor] | None,
) -> None:
    """The compressed graph on one provider against the compressed PyTorch model: numeric parity, metric loss
    and a decoder's greedy generation, recorded in `result.providers`; `reference` is what the metric compares
    with (the dense summaries, for tasks that need them). A provider that does not start fails a check only when
    required. Its session is let go on return: the timing opens its own sessions."""
    entry: dict = {"provider": PROVIDERS[provider.name], "required": provider.required, "threads": threads(spec)}
    result.providers[provider.name] = entry
    session, reason = open_session(compressed_onnx, provider.name, threads(spec))
    if session is None:
        entry.update(status="unavailable", reason=reason)
        if provider.required:
            result.checks.append(Check(f"{provider.name}: provider available", False, reason))
        return
    ort_out = _outputs(
        partial(run_ort, session, task), task, spec, batches, f"compressed (onnx, {provider.name})", progress
    )
    metric = result.metric
    entry["parity"] = parity(ort_out.whole, compressed.outputs.whole, spec.atol, spec.rtol)
    entry["scores"] = _scores(task, ort_out, batches, reference)
    entry["metric"] = entry["scores"][metric]
    entry["metric_loss"] = metric_loss(task, metric, result.original_torch, entry["metric"])
    entry["latency"] = []
    if has_past(session) and prompts:
        _check_generation(session, provider.name, spec, prompts, compressed.greedy, entry, result)
    p = entry["parity"]
    result.checks.append(
        Check(
            f"{provider.name}: numeric parity",
            p["passed"],
            f"max abs error {p['max_abs_error']:.2e}, rel {p['max_rel_error']:.2e}",
        )
    )
    result.checks.append(
        Check(
            f"{provider.name}: metric loss",
            entry["metric_loss"] <= spec.max_metric_loss,
            f"{metric} {result.original_torch:.4f} -> {entry['metric']:.4f} "
            f"(loss {entry['metric_loss']:.4f}, allowed {spec.max_metric_loss})",
        )
    )
    entry["status"] = "passed" if all(c.passed for c in result.checks if c.name.startswith(provider.name)) else "failed"


def _check_generation(
    session: ort.InferenceSession,
    provider: str,
    spec: ValidationSpec,
    prompts: list[torch.Tensor],
    greedy: list[list[int]],
    entry: dict,
    result: Validation,
) -> None:
    """A decoder's graph with its cache continues each prompt greedily with the tokens PyTorch chose."""
    matches = [greedy_ort(session, ids, spec.generation_tokens) == expected for ids, expected in zip(prompts, greedy)]
    entry["generation"] = {"prompts": len(prompts), "tokens": spec.generation_tokens, "matching_prompts": sum(matches)}
    result.checks.append(
        Check(
            f"{provider}: greedy generation",
            all(matches),
            f"{sum(matches)} of {len(prompts)} prompts give the same {spec.generation_tokens} tokens as PyTorch",
        )
    )


def _validate_variants(
    task: Task,
    spec: ValidationSpec,
    dense: Reference,
    result: Validation,
    compressed_out: Outputs,
    batches: list[Batch],
    progress: bool,
    reference_out: list[torch.Tensor] | None,
    variants: dict[str, Path],
) -> None:
    """Measure the compressed model's precision variants and check each against the compressed fp32 model
    (parity within the precision's tolerance, metric within max_quantization_loss)."""
    result.variants.update(copy.deepcopy(dense.variants))  # this point's latencies are added to the copies
    for precision, graph in variants.items():
        name = f"compressed-{precision}"
        measured = measure_variant(task, spec, precision, graph, compressed_out, batches, progress, reference_out)
        result.variants[name] = measured
        for provider, entry in measured.items():
            if not isinstance(entry, dict) or entry.get("status") != "measured":
                continue
            fp32 = result.providers.get(provider, {}).get("metric", result.compressed_torch)
            loss = metric_loss(task, result.metric, fp32, entry["metric"])
            p = entry["parity"]
            result.checks.append(
                Check(
                    f"{provider}: {name} parity",
                    p["passed"],
                    f"||{precision} - fp32|| / ||fp32|| = {p['relative_error']:.3f} (allowed {p['rtol']:g})",
                )
            )
            result.checks.append(
                Check(
                    f"{provider}: {name} metric loss",
                    loss <= spec.max_quantization_loss,
                    f"{result.metric} {fp32:.4f} (compressed fp32) -> {entry['metric']:.4f} "
                    f"(loss {loss:.4f}, allowed {spec.max_quantization_loss})",
                )
            )


class _WontOpen(Exception):
    """A graph that would not open for timing, and why."""

    def __init__(self, graph: Path, reason: str) -> None:
        super().__init__(f"{graph}: {reason}")
        self.graph, self.reason = graph, reason


def _reopen(graph: Path, provider: str, intra_op_threads: int) -> ort.InferenceSession:
    session, reason = open_session(graph, provider, intra_op_threads)
    if session is None:
        raise _WontOpen(graph, reason)
    return session


SIDE_BY_SIDE_SHARE = 0.5  # `one_at_a_time: auto` holds graphs side by side while their bytes fit this share


def _available_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory this process can still take: Linux's MemAvailable, or less under a cgroup v2 limit (a
    container's, which /proc/meminfo does not show); None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as meminfo:
            found.append(next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def one_at_a_time(lat: LatencySpec, graphs: dict[str, Path]) -> bool:
    """Whether `graphs` are timed one session at a time: as the recipe says, or with "auto" when their
    files (sessions hold about their weights) would take more than SIDE_BY_SIDE_SHARE of the available
    memory side by side, so that a model the host can hold once is not lost to an out-of-memory at its
    last stage."""
    if lat.one_at_a_time != "auto":
        return lat.one_at_a_time
    available = _available_bytes()
    return (
        available is not None and sum(graph_bytes(g.parent) for g in graphs.values()) > SIDE_BY_SIDE_SHARE * available
    )


def time_graphs(
    graphs: dict[str, Path], provider: str, spec: ValidationSpec, shapes: list[str], config: Any, decode: bool = True
) -> dict[str, dict[str, dict]]:
    """`graphs` timed against each other on `provider` as `spec.latency` asks: their sessions held side
    by side (`latency.interleaved`), or where `one_at_a_time` says so (asked, or "auto" and too big) one
    session at a time, reopened for each turn (`latency.in_turn`): the memory of the biggest graph
    instead of all of them. Each graph is fed inputs made from its own and the model `config`."""
    lat = spec.latency
    opens = {name: functools.partial(_reopen, graph, provider, threads(spec)) for name, graph in graphs.items()}
    if one_at_a_time(lat, graphs):
        return in_turn(opens, shapes, config, lat.warmup, lat.runs, lat.rounds, decode)
    return interleaved(
        {name: o() for name, o in opens.items()}, shapes, config, lat.warmup, lat.runs, lat.rounds, decode
    )


def time_artifacts(
    spec: ValidationSpec,
    dense: Reference,
    result: Validation,
    compressed_onnx: Path,
    variants: dict[str, Path],
    config: Any,
) -> None:
    """On each provider whose dense and compressed graphs both run: time dense fp32, the compressed graph and
    every variant meant for the provider, interleaved (`latency.interleaved`) on inputs made from each
    graph's own and the model `config`, and record each one's latency and speed-up against dense fp32
    measured in the same rounds."""
    for provider, entry in result.providers.items():
        if entry.get("status") not in ("passed", "failed"):
            continue
        timed = _timed(provider, dense, result, compressed_onnx, variants)
        lat = replace(spec.latency, one_at_a_time=one_at_a_time(spec.latency, timed))  # decided once, recorded below
        try:
            timings = time_graphs(timed, provider, replace(spec, latency=lat), lat.shapes, config)
        except _WontOpen as exc:
            _wont_open(exc, provider, dense, entry, result)
            continue
        entry["latency_method"] = {
            "interleaved_rounds": min(lat.rounds, lat.runs),
            "runs": lat.runs,
            "warmup": lat.warmup,
            "threads": threads(spec),
            "artifacts": list(timed),
            "one_at_a_time": lat.one_at_a_time,
            "one_at_a_time_asked": spec.latency.one_at_a_time,
            "spinning_after_run": _spins(session_options()),
        }
        _record_latency(provider, timed, timings, entry, result)


def _timed(
    provider: str, dense: Reference, result: Validation, compressed_onnx: Path, variants: dict[str, Path]
) -> dict[str, Path]:
    """The graphs timed on `provider`: dense fp32 and the compressed graph, and each variant measured there."""
    graphs = {"dense": dense.graphs["dense"], "compressed": compressed_onnx}
    graphs.update({n: g for n, g in dense.graphs.items() if n != "dense"})
    graphs.update({f"compressed-{p}": g for p, g in variants.items()})
    return {
        name: graph
        for name, graph in graphs.items()
        if name in ("dense", "compressed")
        or result.variants.get(name, {}).get(provider, {}).get("status") == "measured"
    }


def _wont_open(exc: _WontOpen, provider: str, dense: Reference, entry: dict, result: Validation) -> None:
    """A graph that would not open for timing fails the provider, naming which graph."""
    if exc.graph == dense.graphs["dense"]:
        # The provider runs the compressed graph, so the dense one (an artifact of the run, the baseline
        # a user compares against) is what fails; it is the first graph opened.
        entry.update(status="failed", latency_skipped=f"dense graph: {exc.reason}")
        result.checks.append(Check(f"{provider}: dense graph opens", False, exc.reason))
    else:  # opened in the validation, not since
        entry.update(status="failed", latency_skipped=str(exc))
        result.checks.append(Check(f"{provider}: graphs open for timing", False, str(exc)))


def _record_latency(
    provider: str, timed: dict[str, Path], timings: dict[str, dict[str, dict]], entry: dict, result: Validation
) -> None:
    """Each shape's latencies on `provider`: the compressed graph's in `entry`, each variant's in
    `result.variants`, every one with its speed-up against dense fp32 measured in the same rounds."""
    for shape, base in timings["dense"].items():
        small = timings["compressed"][shape]
        point = {
            "shape": shape,
            "dense": base,
            "compressed": small,
            "speedup": base["median_ms"] / small["median_ms"],
        }
        if "decode_per_token" in small:
            point["decode_speedup"] = base["decode_per_token"]["median_ms"] / small["decode_per_token"]["median_ms"]
        entry["latency"].append(point)
        for name in timed:
            if name not in ("dense", "compressed"):
                own = timings[name][shape]
                timing = {
                    "shape": shape,
                    "median_ms": own["median_ms"],
                    "p90_ms": own["p90_ms"],
                    "speedup_vs_dense_fp32": base["median_ms"] / own["median_ms"],
                }
                if "decode_per_token" in own:  # a decoder with its cache: one decode step too
                    timing["decode_per_token"] = own["decode_per_token"]
                    timing["decode_speedup_vs_dense_fp32"] = (
                        base["decode_per_token"]["median_ms"] / own["decode_per_token"]["median_ms"]
                    )
                result.variants[name][provider]["latency"].append(timing)
