"""Calibration statistics on disk, so another ratio, budget or method does not recompute them.

A cache file is keyed by what the statistics depend on: the task loss, the targeted layers' names,
every weight and buffer of the model, the calibration batches (token ids, masks, labels), the Gram size limit
and the cache format. Any change to one of these gives a new key. Files are safetensors: one tensor per
layer and statistic, counts in metadata. A file that cannot be read back (truncated, corrupted, another
format) is a miss: the statistics are gathered again and the file replaced, and the run's notes say so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .batch import Batch, LossFn
from .statistics import STATISTICS, LayerStats, link_shared_inputs

CACHE_FORMAT = 3  # bump when what a file holds, or how it is keyed, changes


def _digest_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def cache_key(
    model: nn.Module, layers: dict[str, nn.Module], batches: list[Batch], loss_fn: LossFn, max_gram_size: int
) -> str:
    h = hashlib.sha256()
    h.update(
        f"{CACHE_FORMAT}|{getattr(loss_fn, '__module__', '')}.{getattr(loss_fn, '__qualname__', repr(loss_fn))}|{max_gram_size}".encode()
    )
    h.update("|".join(sorted(layers)).encode())
    for name, tensor in sorted(model.state_dict().items()):  # heads and norms shape the gradients too
        h.update(name.encode())
        _digest_tensor(h, tensor)
    for batch in batches:
        h.update(str(batch.groups).encode())
        for key in sorted(batch.inputs):
            _digest_tensor(h, batch.inputs[key])
        if batch.labels is not None:
            _digest_tensor(h, batch.labels)
    return h.hexdigest()[:32]


class Unreadable(Exception):
    """A cache file that exists but cannot be used; the message says why."""


def load_cached(folder: Path, key: str, layers: list[str], needs: set[str]) -> dict[str, LayerStats] | None:
    """The cached statistics for `key` if they cover every layer and every needed statistic; None when
    there is no file or it lacks some; raises Unreadable for a file that cannot be read back."""
    path = folder / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {})["layers"])
        stats = {}
        for name in layers:
            if name not in meta or any(f"{name}|{s}" not in tensors for s in needs):
                return None
            info = meta[name]
            values = {s: tensors[f"{name}|{s}"] for s in STATISTICS if f"{name}|{s}" in tensors}
            stats[name] = LayerStats(values, info["samples"], info["tokens"], info["shares"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:  # ValueError: bad JSON too
        raise Unreadable(f"{path}: {type(exc).__name__}: {exc}") from None
    return link_shared_inputs(stats)


def save_cached(folder: Path, key: str, stats: dict[str, LayerStats]) -> Path:
    """Write atomically (temp file, then rename) so a crash never leaves a half-written cache entry."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta, stored = {}, {}, {}
    for name, s in stats.items():
        meta[name] = {"samples": s.samples, "tokens": s.tokens, "shares": s.shares_input_with}
        for stat, value in s.values.items():
            # Shared input Grams are one tensor; safetensors wants distinct storage, so clone aliases.
            tensors[f"{name}|{stat}"] = value.clone() if id(value) in stored else value.contiguous()
            stored[id(value)] = True
    path = folder / f"{key}.safetensors"
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"layers": json.dumps(meta)})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
