"""Feeding ONNX Runtime sessions: map model inputs onto a graph's inputs, including the key/value
cache inputs of graphs exported with past (empty for a full-sequence run)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import torch

from ..errors import FwsvdError

PAST, PRESENT = "past_key_values.", "present."
_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def graph_name(session: ort.InferenceSession) -> str:
    """'the ONNX graph <file>' for a session opened from a file, else 'the ONNX graph' (one from bytes)."""
    path = getattr(session, "_model_path", None)  # set by InferenceSession for a path; no public accessor
    return f"the ONNX graph {path}" if isinstance(path, (str, Path)) else "the ONNX graph"


def has_past(session: ort.InferenceSession) -> bool:
    return any(i.name.startswith(PAST) for i in session.get_inputs())


def feeds(session: ort.InferenceSession, inputs: dict[str, torch.Tensor],
          past: Optional[dict[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
    """Graph inputs for `inputs` (input_ids, attention_mask, ...), with `past` as the cache, or an empty one."""
    ids = inputs["input_ids"]
    past_len = next(iter(past.values())).shape[2] if past else 0
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    if past_len:
        mask = torch.cat([torch.ones(ids.shape[0], past_len, dtype=mask.dtype), mask], dim=1)
    result: dict[str, np.ndarray] = {}
    for graph_input in session.get_inputs():
        key = graph_input.name
        if key.startswith(PAST):
            if past:
                result[key] = past[key]
            else:
                heads, head_dim = graph_input.shape[1], graph_input.shape[3]
                if not isinstance(heads, int) or not isinstance(head_dim, int):
                    raise FwsvdError(f"{graph_name(session)}: cannot size the empty key/value cache for graph input "
                                     f"'{key}' from its shape {graph_input.shape}: export with a fixed number of heads, "
                                     "or without the cache")
                result[key] = np.zeros((ids.shape[0], heads, 0, head_dim), dtype=_FLOAT.get(graph_input.type, np.float32))
            continue
        if key == "attention_mask":
            value = mask
        elif key in inputs:
            value = inputs[key]
        elif key == "token_type_ids":
            value = torch.zeros_like(ids)
        elif key == "position_ids":
            value = ((mask.long().cumsum(-1) - 1).clamp(min=0))[:, -ids.shape[1]:]
        else:
            raise FwsvdError(f"{graph_name(session)} wants input '{key}', which this tool cannot provide "
                             f"(it feeds {', '.join(sorted(inputs))}, attention_mask, token_type_ids, position_ids "
                             "and the key/value cache)")
        result[key] = value.cpu().numpy().astype(np.int64)
    return result


def next_past(session: ort.InferenceSession, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The cache a run returned (present.*), named as the next run's inputs (past_key_values.*)."""
    return {o.name.replace(PRESENT, PAST, 1): value for o, value in zip(session.get_outputs(), outputs)
            if o.name.startswith(PRESENT)}
