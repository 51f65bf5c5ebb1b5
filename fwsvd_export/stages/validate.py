"""Proof in ONNX Runtime: numeric parity, task-metric parity and latency, per execution provider.

ONNX Runtime silently falls back to the CPU when a provider cannot start (missing CUDA libraries, for
one), so a provider counts as used only when the session reports it first in ``get_providers()``;
otherwise it is reported as unavailable with the reason, never as passed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from .generation import timed, greedy_ort, greedy_torch, prefill_and_decode
from .ort_io import feeds, has_past
from ..core.batch import Batch
from ..recipe import ValidationSpec
from .tasks import Task, metric_loss, run_torch

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ort.set_default_logger_severity(4)  # a provider's failed start is detected and reported, not printed as an error


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


@dataclass
class Validation:
    metric: str
    original_torch: float
    compressed_torch: float
    providers: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "original_torch": self.original_torch, "compressed_torch": self.compressed_torch,
                "providers": self.providers, "checks": [c.as_dict() for c in self.checks], "passed": self.passed}


def open_session(path: Path, provider: str) -> tuple[Optional[ort.InferenceSession], str]:
    """A session that really runs on `provider` (short name), or None and the reason it does not."""
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        return None, f"{name} is not in this onnxruntime build (has {', '.join(ort.get_available_providers())})"
    try:
        session = ort.InferenceSession(str(path), providers=[name])
    except Exception as exc:  # provider libraries that fail to load raise on some builds
        return None, f"{name} failed to start: {exc}"
    used = session.get_providers()
    if not used or used[0] != name:
        return None, f"{name} could not start on this machine (session fell back to {', '.join(used)})"
    return session, ""


def run_ort(session: ort.InferenceSession, task: Task, batch: Batch) -> torch.Tensor:
    return torch.from_numpy(session.run([task.output_name], feeds(session, batch.inputs))[0])


def parity(outputs: list[torch.Tensor], reference: list[torch.Tensor], atol: float, rtol: float) -> dict:
    """Max absolute error, and error relative to the reference's largest magnitude."""
    abs_err = max(float((o.float() - r.float()).abs().max()) for o, r in zip(outputs, reference))
    scale = max(float(r.float().abs().max()) for r in reference)
    rel_err = abs_err / scale if scale else abs_err
    return {"max_abs_error": abs_err, "max_rel_error": rel_err, "atol": atol, "rtol": rtol,
            "passed": abs_err <= atol + rtol * scale}


def latency(session: ort.InferenceSession, shape: str, vocab_size: int, warmup: int, runs: int) -> dict:
    """Median and p90 wall time (ms) of one run at BATCHxSEQUENCE after warm-up; for a graph with a
    key/value cache, that run is the prefill, and one decode step is timed too."""
    batch, seq = (int(v) for v in shape.split("x"))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, max(2, min(vocab_size, 1001)), (batch, seq), generator=generator)
    prefill, decode = prefill_and_decode(session, ids, warmup, runs) if has_past(session) else (None, None)
    if prefill is not None:
        return {**prefill, "decode_per_token": decode}
    data = feeds(session, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return timed(lambda: session.run(None, data), warmup, runs)


def _outputs(run, batches: list[Batch], desc: str, progress: bool) -> list[torch.Tensor]:
    with torch.no_grad():
        return [run(b) for b in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)]


@dataclass
class Reference:
    """The dense model's results that every compressed model is compared with, measured once."""

    outputs: list[torch.Tensor]  # the original model's PyTorch outputs on the evaluation batches
    metric: float
    timings: dict[str, dict[str, dict]] = field(default_factory=dict)  # provider -> shape -> latency
    skipped: dict[str, str] = field(default_factory=dict)  # provider -> why its dense graph was not timed


def reference(task: Task, spec: ValidationSpec, original: torch.nn.Module, batches: list[Batch], dense_onnx: Path,
              vocab_size: int, progress: bool = True) -> Reference:
    """Evaluate the original model in PyTorch and time its ONNX graph on every provider the spec names."""
    outputs = _outputs(lambda b: run_torch(original, task, b), batches, "original (torch)", progress)
    ref = Reference(outputs, task.metric(outputs, batches, outputs if task.needs_reference else None))
    for provider in spec.providers:
        session, reason = open_session(dense_onnx, provider.name)
        if session is None:
            ref.skipped[provider.name] = reason
            continue
        ref.timings[provider.name] = {shape: latency(session, shape, vocab_size, spec.latency.warmup, spec.latency.runs)
                                      for shape in spec.latency.shapes}
    return ref


def validate(task: Task, spec: ValidationSpec, dense: Reference, compressed: torch.nn.Module,
             batches: list[Batch], compressed_onnx: Path, vocab_size: int,
             progress: bool = True, prompts: Optional[list[torch.Tensor]] = None) -> Validation:
    """All checks of a compressed model against the dense `reference`; `prompts` (token ids, one row
    each) drive the greedy-generation check of decoders."""
    compressed_out = _outputs(lambda b: run_torch(compressed, task, b), batches, "compressed (torch)", progress)
    reference = dense.outputs if task.needs_reference else None
    prompts = prompts or []
    greedy = [greedy_torch(compressed, ids, spec.generation_tokens) for ids in prompts]
    result = Validation(task.metric_name, dense.metric, task.metric(compressed_out, batches, reference))
    loss = metric_loss(task, result.original_torch, result.compressed_torch)
    result.checks.append(Check("metric loss (compressed torch)", loss <= spec.max_metric_loss,
                               f"{task.metric_name} {result.original_torch:.4f} -> {result.compressed_torch:.4f} "
                               f"(loss {loss:.4f}, allowed {spec.max_metric_loss})"))
    for provider in spec.providers:
        entry: dict = {"provider": PROVIDERS[provider.name], "required": provider.required}
        result.providers[provider.name] = entry
        session, reason = open_session(compressed_onnx, provider.name)
        if session is None:
            entry.update(status="unavailable", reason=reason)
            if provider.required:
                result.checks.append(Check(f"{provider.name}: provider available", False, reason))
            continue
        ort_out = _outputs(lambda b: run_ort(session, task, b), batches, f"compressed (onnx, {provider.name})", progress)
        n = max(1, spec.parity_batches)
        entry["parity"] = parity(ort_out[:n], compressed_out[:n], spec.atol, spec.rtol)
        entry["metric"] = task.metric(ort_out, batches, reference)
        entry["metric_loss"] = metric_loss(task, result.original_torch, entry["metric"])
        entry["latency"] = []
        if provider.name in dense.skipped:
            entry["latency_skipped"] = f"dense graph: {dense.skipped[provider.name]}"
        for shape, dense_time in dense.timings.get(provider.name, {}).items():
            small = latency(session, shape, vocab_size, spec.latency.warmup, spec.latency.runs)
            point = {"shape": shape, "dense": dense_time, "compressed": small,
                     "speedup": dense_time["median_ms"] / small["median_ms"]}
            if "decode_per_token" in small:
                point["decode_speedup"] = dense_time["decode_per_token"]["median_ms"] / small["decode_per_token"]["median_ms"]
            entry["latency"].append(point)
        if has_past(session) and prompts:
            matches = [greedy_ort(session, ids, spec.generation_tokens) == expected for ids, expected in zip(prompts, greedy)]
            entry["generation"] = {"prompts": len(prompts), "tokens": spec.generation_tokens, "matching_prompts": sum(matches)}
            result.checks.append(Check(f"{provider.name}: greedy generation", all(matches),
                                       f"{sum(matches)} of {len(prompts)} prompts give the same "
                                       f"{spec.generation_tokens} tokens as PyTorch"))
        p = entry["parity"]
        result.checks.append(Check(f"{provider.name}: numeric parity", p["passed"],
                                   f"max abs error {p['max_abs_error']:.2e}, rel {p['max_rel_error']:.2e}"))
        result.checks.append(Check(f"{provider.name}: metric loss", entry["metric_loss"] <= spec.max_metric_loss,
                                   f"{task.metric_name} {result.original_torch:.4f} -> {entry['metric']:.4f} "
                                   f"(loss {entry['metric_loss']:.4f}, allowed {spec.max_metric_loss})"))
        entry["status"] = "passed" if all(c.passed for c in result.checks if c.name.startswith(provider.name)) else "failed"
    if all(e["status"] == "unavailable" for e in result.providers.values()):
        result.checks.append(Check("onnx runtime: validated", False, "no execution provider ran the compressed graph, "
                                   "so nothing was checked in ONNX Runtime"))
    return result
