"""`fwsvd-export check`: everything a run would refuse, found without running it, and the plan it would follow.

``check_recipe(recipe)`` makes the checks `run` makes before its long compute, in the same order and through
the same functions, so a bad recipe gets the same named error: the output folder (``check_replaceable``,
nothing created), the model (its folder, its own Python, config.json against the safetensors headers, the
weights' names against the model the config builds, the preprocessor, the positions), the data (every local
file read, its columns and labels checked and its rows tokenized into the batches a run would make) and the
compression plan (targets, overrides, ranks, the budget). The model is built on the meta device from its
config: no weight is read. A hub id is planned from transformers' local cache only, never fetched; what
could not be checked is listed in ``Plan.not_checked``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from .config import DATA_ROLES, Recipe
from .core.batch import Batch
from .core.compress import LayerPlan, _check_budget, _passes, plan_layers
from .core.methods import get_method
from .core.modules import linear_layers
from .core.statistics import statistic_bytes
from .errors import FwsvdError, section, short_message
from .pipeline import output_path, read_paths
from .stages.data import load_records
from .stages.models import (
    _stored_shapes,
    check_custom_code,
    check_loading,
    check_local_model,
    check_positions,
    check_sizes,
    fit_batches,
    is_local_path,
    load_preprocessor,
    model_location,
    placement,
    set_pad_token,
    text_tokenizer,
)
from .stages.outputs import RUN_MARKER, check_apart, check_replaceable
from .stages.tasks import Task, get_task

log = logging.getLogger("fwsvd_export")
FP32 = 4  # bytes a parameter takes in the fp32 files (checkpoint and graph) the plan's sizes count
CONFIG_FACTS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "n_positions",
    "image_size",
    "patch_size",
    "num_labels",
)


@dataclass
class Lengths:
    """Tokens a sequence holds once batched (min, median, max), and how many were cut at data.max_length
    (None where the task does not truncate: a decoder's text is cut into blocks, an image has no length)."""

    min: int
    median: float
    max: int
    truncated: int | None


@dataclass
class DataCheck:
    role: str  # calibration, evaluation, finetune
    source: str  # the file, or the hub dataset
    records: int | None = None  # after max_samples; None: not read
    batches: int | None = None  # None: not tokenized
    sequences: int | None = None
    tokens: int | None = None  # real tokens (positions, for images) the batches hold
    padded_tokens: int | None = None  # what a pass computes on, padding included
    lengths: Lengths | None = None
    labels: dict[str, int] = field(default_factory=dict)  # class -> rows (classification tasks)
    note: str = ""


@dataclass
class ModelFacts:
    location: str  # the folder, or the hub id
    how: str  # what was read to build it
    model_type: str
    model_class: str
    config: dict[str, Any]  # the sizes that shape the model (CONFIG_FACTS present in config.json)
    parameters: int
    linear_layers: int
    linear_parameters: int  # what a forward multiplies by, per token
    notes: list[str] = field(default_factory=list)  # what loading would let pass (a new head, an unused one)


@dataclass
class LayerRow:
    name: str
    in_features: int
    out_features: int
    rank: int | None  # None: dense, or allocated by the budget (`allocated`)
    allocated: bool
    params_before: int
    params_after: int | None  # None: allocated by the budget
    reason: str


@dataclass
class Plan:
    """What `fwsvd-export check` found: the run a recipe describes, with nothing run."""

    recipe: str
    output: str
    output_state: str
    model: ModelFacts | None = None  # None: a hub id whose config is not cached here
    data: list[DataCheck] = field(default_factory=list)
    method: str = ""
    cut: str = ""  # 'ratio 0.5', 'rank 8', 'budget 0.7 of targeted', 'target_speedup 1.5x'
    layers: list[LayerRow] = field(default_factory=list)
    targeted_params_before: int | None = None
    targeted_params_after: int | None = None  # under a budget, what it allows; None: a speed-up target
    params_before: int | None = None
    params_after: int | None = None
    bytes_before: int | None = None  # fp32 bytes of every parameter
    bytes_after: int | None = None
    statistics_needs: list[str] = field(default_factory=list)
    statistics_bytes: int | None = None  # the accumulators' host memory, all passes together
    statistics_passes: int | None = None
    seconds: float | None = None  # the statistics pass, roughly
    time_basis: str = ""  # how `seconds` was estimated
    not_checked: list[str] = field(default_factory=list)


def check_recipe(recipe: Recipe, output: str | Path | None = None) -> Plan:
    """Every refusal of `run` that needs no weights and no compute, in run's order, then the plan. Writes
    nothing; raises FwsvdError as run would."""
    folder = output_path(recipe, output)
    plan = Plan(str(recipe.source), str(folder), check_output(folder, read_paths(recipe)))
    task = get_task(recipe.model.task)
    built = _model(recipe, task, plan)
    model, preprocessor = built if built is not None else (None, None)
    for role in DATA_ROLES:
        if getattr(recipe.data, role) is not None:
            plan.data.append(_data(recipe, task, role, preprocessor, model, plan))
    placement(recipe)  # a device_map needs accelerate
    if model is None:
        plan.not_checked.append("the layer plan, its sizes and the statistics estimates (they need the model's config)")
        return plan
    _compression(recipe, model, plan)
    _estimates(recipe, model, plan)
    return plan


def check_output(folder: Path, inputs: list[Path]) -> str:
    """What `run` would do with `folder` (refusing, as it would, a folder it may not replace), creating
    nothing."""
    check_apart(folder, inputs)
    check_replaceable(folder)
    if folder.is_dir():
        return (
            "an earlier fwsvd-export output: run replaces it"
            if (folder / RUN_MARKER).is_file()
            else "an empty folder: run writes into it"
        )
    parent = folder.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FwsvdError(f"cannot create the output folder {folder}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FwsvdError(f"cannot create the output folder {folder}: {parent} is not writable")
    return "new: run creates it"


def _model(recipe: Recipe, task: Task, plan: Plan) -> tuple[nn.Module, Any] | None:
    """The recipe's model built on the meta device from its checked config, and its preprocessor; None
    for a hub id whose config transformers has not cached (nothing is fetched)."""
    location = model_location(recipe)
    spec = recipe.model
    kwargs: dict[str, Any] = {
        "trust_remote_code": spec.trust_remote_code,
        **({"revision": spec.revision} if spec.revision else {}),
    }
    local = is_local_path(location)
    source = check_local_model(location) if local else location
    if local:
        check_custom_code(Path(source), spec.trust_remote_code)
    else:
        kwargs["local_files_only"] = True  # the cache or nothing: check fetches nothing
    try:
        return _built(location, source, task, kwargs, recipe, plan)
    except (OSError, SafetensorError) as exc:
        if local:
            raise FwsvdError(f"could not load model '{location}' for {task.name}: {short_message(exc)}") from None
        plan.not_checked.append(
            f"model '{location}' is a hub id whose config and tokenizer are not in this machine's "
            "cache (check fetches nothing): the model's config, its weights, the data's "
            f"tokenization and labels were not checked ({short_message(exc)})"
        )
        return None
    except ValueError as exc:
        raise FwsvdError(f"could not load model '{location}' for {task.name}: {short_message(exc)}") from None


def _built(
    location: str, source: str, task: Task, kwargs: dict[str, Any], recipe: Recipe, plan: Plan
) -> tuple[nn.Module, Any]:
    """`_model`'s work once the folder is checked: `source` is the folder (or hub id) read, `location` the
    model as the recipe names it (as a run's messages name it)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, **kwargs)
    notes: list[str] = []
    local = "local_files_only" not in kwargs
    if local:
        folder = Path(source)
        check_sizes(folder, task, config, kwargs["trust_remote_code"])
        model = _meta_model(task, config, kwargs)
        notes = _check_names(folder, model, task, location)
        how = "config.json, checked against the safetensors headers (no weight read)"
    else:
        model = _meta_model(task, config, kwargs)
        how = "the hub config cached on this machine (the weights were not checked)"
        plan.not_checked.append(f"the weights of hub model '{location}' (fetched by run)")
    preprocessor = load_preprocessor(source, kwargs)
    set_pad_token(text_tokenizer(preprocessor), model, location)
    check_positions(recipe, model.config)
    plan.model = _facts(location, how, model, notes)
    return model, preprocessor


def _meta_model(task: Task, config: Any, kwargs: dict[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return task.auto_class.from_config(config, trust_remote_code=kwargs["trust_remote_code"]).eval()


def _check_names(folder: Path, model: nn.Module, task: Task, location: str) -> list[str]:
    """The weights' names, from the safetensors headers, against the names of the model the config builds,
    matched by transformers' own rules as `from_pretrained` matches them, then judged by `check_loading` as a
    run judges them: the same refusals (a num_hidden_layers that disagrees) and notes."""
    from transformers import modeling_utils

    stored = list(_stored_shapes(folder))
    if not stored:
        raise FwsvdError(
            f"could not load model '{location}' for {task.name}: {folder} holds no safetensors weights "
            "(model.safetensors or model.safetensors.index.json); pickled weights are never loaded"
        )
    prefix = model.base_model_prefix
    has = bool(prefix) and any(k.startswith(prefix) for k in stored)
    expects = bool(prefix) and hasattr(model, prefix)
    task_from_base, base_from_task = expects and not has, has and not expects
    renamed = model._get_key_renaming_mapping(stored, None, base_from_task, task_from_base)
    missing, unexpected = modeling_utils._find_missing_and_unexpected_keys(
        model, stored, list(renamed.values()), base_from_task, None
    )
    missing, unexpected = model._adjust_missing_and_unexpected_keys(missing, unexpected, task_from_base)
    return check_loading(model, {"missing_keys": missing, "unexpected_keys": unexpected}, task, location)


def _facts(location: str, how: str, model: nn.Module, notes: list[str]) -> ModelFacts:
    config = model.config
    sizes = {k: v for k, v in config.to_dict().items() if k in CONFIG_FACTS and v is not None}
    linears = linear_layers(model)
    return ModelFacts(
        location,
        how,
        str(config.model_type),
        type(model).__name__,
        sizes,
        sum(p.numel() for p in model.parameters()),
        len(linears),
        sum(m.weight.numel() for m in linears.values()),
        notes,
    )


def _data(recipe: Recipe, task: Task, role: str, preprocessor: Any, model: nn.Module | None, plan: Plan) -> DataCheck:
    """The role's rows read and checked as a run reads them and, with the model's preprocessor, made into
    the run's batches (`pipeline._batches`: the same calls)."""
    source = getattr(recipe.data, role)
    if source.dataset is not None:
        plan.not_checked.append(f"data.{role}: hub dataset '{source.dataset}' (check reads local files only)")
        return DataCheck(role, f"dataset {source.dataset} [{source.split}]", note="hub dataset: not read")
    check = DataCheck(role, str(recipe.resolve(source.path)))
    training = role != "evaluation"
    records = load_records(recipe, role, task.columns(source, training), skip_empty=task.skip_empty)
    check.records = len(records)
    if preprocessor is None or model is None:
        check.note = "not tokenized: the model's preprocessor is not available here"
        return check
    batches = fit_batches(
        task.make_batches(
            records, source, preprocessor, recipe.data.max_length, recipe.data.batch_size, training, model.config
        ),
        model,
    )
    check.batches, check.sequences = len(batches), sum(b.samples for b in batches)
    check.tokens = int(sum(int(b.token_mask.sum()) for b in batches))
    check.padded_tokens = int(sum(b.token_mask.numel() for b in batches))
    rows = [int(n) for b in batches for n in b.token_mask.reshape(b.token_mask.shape[0], -1).sum(-1)]
    check.lengths = Lengths(
        min(rows),
        statistics.median(rows),
        max(rows),
        _truncated(task, records, source, text_tokenizer(preprocessor), recipe.data.max_length),
    )
    check.labels = _labels(batches, model.config)
    return check


def _truncated(task: Task, records: list, source: Any, tokenizer: Any, max_length: int) -> int | None:
    """Rows longer than max_length before truncation (None where the task does not truncate rows)."""
    if tokenizer is None or task.name not in ("text-classification", "feature-extraction"):
        return None
    texts = [str(r[source.text_column]) for r in records]
    pairs = [str(r[source.text_pair_column]) for r in records] if source.text_pair_column else None
    if task.name == "text-classification":
        encoded = tokenizer(texts, pairs, verbose=False)
    else:  # each text of a pair is its own sequence
        encoded = tokenizer(texts + (pairs or []), verbose=False)
    return sum(len(ids) > max_length for ids in encoded["input_ids"])


def _labels(batches: list[Batch], config: Any) -> dict[str, int]:
    """Rows per class, by the model's label names, for a classification task's batches (one label a row)."""
    if not batches or batches[0].labels is None or batches[0].labels.dim() != 1:
        return {}
    counts = Counter(int(i) for b in batches for i in b.labels)
    names = getattr(config, "id2label", None) or {}
    return {str(names.get(i, i)): n for i, n in sorted(counts.items())}


@section("compression")
def _compression(recipe: Recipe, model: nn.Module, plan: Plan) -> None:
    """The layers' plan, with the refusals `compress_` makes before its statistics pass (targets,
    overrides, ranks, the budget)."""
    spec = recipe.compression
    plans = plan_layers(model, spec)
    _check_budget(model, plans, spec)
    plan.method = spec.method
    plan.cut = (
        f"budget {spec.budget:g} of {spec.budget_scope} parameters"
        if spec.budget is not None
        else f"target_speedup {spec.target_speedup:g}x on {spec.latency_provider}"
        if spec.target_speedup
        else f"rank {spec.rank}"
        if spec.rank is not None
        else f"ratio {spec.ratio:g}"
    )
    if spec.rank_multiple:
        plan.cut += f", ranks in multiples of {spec.rank_multiple}"
    plan.layers = [
        LayerRow(
            p.name,
            p.in_features,
            p.out_features,
            p.rank,
            p.allocate,
            p.params_before,
            None if p.allocate else p.params_after,
            p.reason,
        )
        for p in plans
    ]
    total = sum(p.numel() for p in model.parameters())
    before = sum(p.params_before for p in plans)
    after = _targeted_after(model, plans, spec)
    plan.targeted_params_before, plan.targeted_params_after = before, after
    plan.params_before, plan.bytes_before = total, FP32 * total
    if after is not None:
        plan.params_after = total - before + after
        plan.bytes_after = FP32 * plan.params_after
    if spec.target_speedup is not None:
        plan.not_checked.append("the speed-up target's reach (run times the layers' kernels first)")


def _targeted_after(model: nn.Module, plans: list[LayerPlan], spec: Any) -> int | None:
    """The targeted layers' parameters after: each rank's, or under a budget what it allows."""
    if spec.target_speedup is not None:
        return None
    fixed = sum(p.params_after for p in plans if not p.allocate)
    if spec.budget is None or not any(p.allocate for p in plans):
        return fixed
    total = sum(p.numel() for p in model.parameters())
    allowed = spec.budget * (total if spec.budget_scope == "model" else sum(p.params_before for p in plans))
    untargeted = total - sum(p.params_before for p in plans) if spec.budget_scope == "model" else 0
    return int(allowed) - untargeted


def _estimates(recipe: Recipe, model: nn.Module, plan: Plan) -> None:
    """The statistics pass's accumulator memory (`statistic_bytes` of each layer it gathers) and a rough
    time for it."""
    spec = recipe.compression
    needs = set(get_method(spec.method).needs)
    plan.statistics_needs = sorted(needs)
    if not needs:
        plan.statistics_bytes, plan.statistics_passes, plan.seconds = 0, 0, 0.0
        plan.time_basis = f"method {spec.method} needs no statistics pass"
        return
    todo = {r.name: model.get_submodule(r.name) for r in plan.layers if r.rank is not None or r.allocated}
    plan.statistics_bytes = sum(
        statistic_bytes(r.in_features, r.out_features, needs, spec.max_gram_size) for r in plan.layers if r.name in todo
    )
    plan.statistics_passes = len(_passes(todo, needs, spec)) if todo else 0
    calibration = next((d for d in plan.data if d.role == "calibration"), None)
    if calibration is None or calibration.padded_tokens is None or plan.model is None:
        plan.time_basis = "not estimated: the calibration data was not tokenized"
        return
    rate = matmul_rate()
    flops = 6 * plan.model.linear_parameters * calibration.padded_tokens * max(plan.statistics_passes, 1)
    plan.seconds = flops / rate
    passes = f" x {plan.statistics_passes} passes" if plan.statistics_passes > 1 else ""
    plan.time_basis = (
        f"6 x {plan.model.linear_parameters:,} Linear parameters x {calibration.padded_tokens:,} "
        f"calibration tokens (padding included){passes}"
        f" at {rate / 1e9:.0f} GFLOP/s, a matrix multiply timed on this machine's CPU; attention, "
        "the statistics' own products and a device_map's transfers come on top"
    )


def matmul_rate(size: int = 384, repeats: int = 8) -> float:
    """Floating-point operations a second of an fp32 matrix multiply on this machine's CPU (best of a few)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _megabytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:,.2f} GB" if n >= 2**30 else f"{n / 2**20:,.1f} MB" if n >= 2**20 else f"{n / 2**10:,.1f} kB"


def _duration(seconds: float) -> str:
    return "under 0.1 s" if seconds < 0.1 else f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def describe(plan: Plan) -> list[str]:
    """The plan as `fwsvd-export check` prints it."""
    lines = [f"recipe: {plan.recipe}: valid", f"output: {plan.output} ({plan.output_state})"]
    lines += _describe_model(plan.model)
    lines += [_describe_data(d) for d in plan.data]
    if plan.layers:
        lines += _describe_layers(plan)
    if plan.statistics_bytes is not None:
        needs = ", ".join(plan.statistics_needs) or "none"
        lines.append(
            f"statistics pass: {_megabytes(plan.statistics_bytes)} of accumulators ({needs}) in "
            f"{plan.statistics_passes} pass(es)" + (f"; roughly {_duration(plan.seconds)}" if plan.seconds else "")
        )
        lines.append(f"  time estimate: {plan.time_basis}")
    lines += [f"not checked: {item}" for item in plan.not_checked]
    return lines


def _describe_model(model: ModelFacts | None) -> list[str]:
    if model is None:
        return []
    sizes = ", ".join(f"{k} {v}" for k, v in model.config.items())
    lines = [
        f"model: {model.location}",
        f"  read: {model.how}",
        f"  {model.model_type} as {model.model_class}: {sizes}",
        f"  {model.parameters:,} parameters; {model.linear_layers} Linear layers hold {model.linear_parameters:,}",
    ]
    return lines + [f"  note: {note}" for note in model.notes]


def _describe_data(data: DataCheck) -> str:
    text = f"data.{data.role}: {data.source}: "
    if data.records is None:
        return text + data.note
    text += f"{data.records} records"
    if data.batches is None:
        return f"{text}; {data.note}"
    text += f", {data.batches} batches, {data.sequences} sequences, {data.tokens:,} tokens"
    if data.lengths is not None:
        cut = "" if data.lengths.truncated is None else f", {data.lengths.truncated} truncated at max_length"
        text += f"; lengths {data.lengths.min}/{data.lengths.median:g}/{data.lengths.max} (min/median/max){cut}"
    if data.labels:
        text += "; labels " + ", ".join(f"{k} {v}" for k, v in data.labels.items())
    return text


def _describe_layers(plan: Plan) -> list[str]:
    width = max(len(r.name) for r in plan.layers)
    dense = sum(r.rank is None and not r.allocated for r in plan.layers)
    lines = [
        f"compression: {plan.method}, {plan.cut}: {len(plan.layers)} layers targeted"
        + (f" ({dense} stay dense)" if dense else ""),
        f"  {'layer':<{width}}  {'in':>6} {'out':>6} {'rank':>8}  {'params before':>13} {'after':>10}",
    ]
    for r in plan.layers:
        rank = "budget" if r.allocated else str(r.rank) if r.rank is not None else "dense"
        lines.append(
            f"  {r.name:<{width}}  {r.in_features:>6} {r.out_features:>6} {rank:>8}  "
            f"{r.params_before:>13,} {_count(r.params_after):>10}"
        )
    if any(r.allocated for r in plan.layers):
        lines.append("  budget: ranks are allocated by the budget from the statistics; 'after' is what it allows")
    kept = (
        f" ({plan.targeted_params_after / plan.targeted_params_before:.1%} kept)"
        if plan.targeted_params_after is not None and plan.targeted_params_before
        else ""
    )
    lines.append(
        f"  targeted parameters: {_count(plan.targeted_params_before)} -> {_count(plan.targeted_params_after)}{kept}"
    )
    lines.append(
        f"  model parameters: {_count(plan.params_before)} -> {_count(plan.params_after)}; fp32 size "
        f"{_megabytes(plan.bytes_before)} -> {_megabytes(plan.bytes_after)}"
    )
    return lines


def plan_json(plan: Plan) -> str:
    """The plan as JSON (`check --json`)."""
    from dataclasses import asdict

    return json.dumps(asdict(plan), indent=2)
