"""Feeding ONNX Runtime sessions: map model inputs onto a graph's inputs, named and typed as the graph
itself declares them (``session.get_inputs()``), including the key/value cache inputs of graphs exported
with past (empty for a full-sequence run); and the inputs a graph is timed with (`timing_inputs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ..errors import FwsvdError

PAST, PRESENT = "past_key_values.", "present."
_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_DTYPES = {
    **_FLOAT,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
# Text inputs `feeds` makes from input_ids when the model inputs lack them.
DERIVED = ("attention_mask", "token_type_ids", "position_ids")


def graph_name(session: ort.InferenceSession) -> str:
    """'the ONNX graph <file>' for a session opened from a file, else 'the ONNX graph' (one from bytes)."""
    path = getattr(session, "_model_path", None)  # set by InferenceSession for a path; no public accessor
    return f"the ONNX graph {path}" if isinstance(path, (str, Path)) else "the ONNX graph"


def has_past(session: ort.InferenceSession) -> bool:
    return any(i.name.startswith(PAST) for i in session.get_inputs())


def input_dtype(session: ort.InferenceSession, graph_input: Any) -> type:
    """The numpy dtype of a graph input, from the type the graph declares (e.g. 'tensor(int64)')."""
    dtype = _DTYPES.get(graph_input.type)
    if dtype is None:
        raise FwsvdError(
            f"{graph_name(session)}: graph input '{graph_input.name}' is of type {graph_input.type}, "
            f"which this tool cannot feed (it feeds {', '.join(sorted(_DTYPES))})"
        )
    return dtype


def feeds(
    session: ort.InferenceSession, inputs: dict[str, torch.Tensor], past: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The graph's inputs, by the names and dtypes the graph declares (``session.get_inputs()``): each taken
    from `inputs` (model inputs: input_ids, attention_mask, pixel_values, ...) and cast to the graph's dtype,
    with `past` as the key/value cache, or an empty one. What `inputs` holds beyond the graph's inputs is
    left out (a DistilBERT graph takes no token_type_ids). A text graph's attention_mask, token_type_ids
    and position_ids that `inputs` lacks are made from its input_ids: ones over the cache and the tokens,
    zeros, and positions counted along the mask."""
    graph_inputs = session.get_inputs()
    if not inputs:
        raise FwsvdError(
            f"{graph_name(session)}: no model inputs to feed its {', '.join(i.name for i in graph_inputs)}"
        )
    rows = next(iter(inputs.values())).shape[0]
    ids = inputs.get("input_ids")
    past_len = next(iter(past.values())).shape[2] if past else 0
    mask = None
    if ids is not None:
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        if past_len:
            mask = torch.cat([torch.ones(ids.shape[0], past_len, dtype=mask.dtype), mask], dim=1)
    result: dict[str, np.ndarray] = {}
    for graph_input in graph_inputs:
        key = graph_input.name
        if key.startswith(PAST):
            if past:
                result[key] = past[key]
            else:
                heads, head_dim = graph_input.shape[1], graph_input.shape[3]
                if not isinstance(heads, int) or not isinstance(head_dim, int):
                    raise FwsvdError(
                        f"{graph_name(session)}: cannot size the empty key/value cache for graph input "
                        f"'{key}' from its shape {graph_input.shape}: export with a fixed number of heads, "
                        "or without the cache"
                    )
                result[key] = np.zeros((rows, heads, 0, head_dim), dtype=_FLOAT.get(graph_input.type, np.float32))
            continue
        if key == "attention_mask" and mask is not None:
            value = mask
        elif key in inputs:
            value = inputs[key]
        elif key == "token_type_ids" and ids is not None:
            value = torch.zeros_like(ids)
        elif key == "position_ids" and mask is not None and ids is not None:
            value = ((mask.long().cumsum(-1) - 1).clamp(min=0))[:, -ids.shape[1] :]
        else:
            made = f", and {', '.join(DERIVED)} from input_ids" if ids is not None else ""
            raise FwsvdError(
                f"{graph_name(session)} wants input '{key}', which this tool cannot provide "
                f"(it feeds {', '.join(sorted(inputs))}{made} and the key/value cache)"
            )
        result[key] = value.detach().cpu().numpy().astype(input_dtype(session, graph_input), copy=False)
    return result


def _size(
    session: ort.InferenceSession, graph_input: Any, axis: int, dim: Any, config: Any, batch: int, sequence: int
) -> int:
    """One dimension of a timing input: the batch first, a fixed size as the graph has it, and a named
    (dynamic) one read from the model config: an image's height and width from image_size, its channels
    from num_channels; the sequence for sequence_length (an audio waveform's samples)."""
    if axis == 0:
        return batch
    if isinstance(dim, int) and dim > 0:
        return dim
    if dim == "sequence_length":
        return sequence
    if dim in ("height", "width"):
        size = getattr(config, "image_size", None)
        size = size[("height", "width").index(dim)] if isinstance(size, (list, tuple)) else size
        if isinstance(size, int):
            return size
    elif isinstance(dim, str) and isinstance(getattr(config, dim, None), int):
        return getattr(config, dim)
    raise FwsvdError(
        f"{graph_name(session)}: cannot size axis {axis} ({dim!r}) of graph input '{graph_input.name}' "
        f"{graph_input.shape} for timing from the model config"
    )


def timing_inputs(session: ort.InferenceSession, config: Any, shape: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs to time `session` with at BATCHxSEQUENCE, made from the graph's own inputs (names,
    dtypes, shapes) and the model config: an integer input (input_ids) holds token ids drawn below the
    config's vocab_size (at most 1000) at BATCH x SEQUENCE; a float input (pixel_values [batch, channels,
    height, width]) holds noise, each open dimension read from the config (`_size`): an image has no
    sequence, so SEQUENCE is not used for it. The key/value cache and the text inputs `feeds` makes from
    input_ids (attention_mask, token_type_ids, position_ids) are left to `feeds`."""
    batch, sequence = (int(v) for v in shape.split("x"))
    generator = torch.Generator().manual_seed(seed)
    names = {i.name for i in session.get_inputs()}
    result: dict[str, torch.Tensor] = {}
    for graph_input in session.get_inputs():
        key = graph_input.name
        if key.startswith(PAST) or (key in DERIVED and "input_ids" in names):
            continue
        dtype = input_dtype(session, graph_input)
        if np.issubdtype(dtype, np.floating):
            dims = [
                _size(session, graph_input, axis, dim, config, batch, sequence)
                for axis, dim in enumerate(graph_input.shape)
            ]
            result[key] = torch.randn(dims, generator=generator)
        elif key == "attention_mask":
            result[key] = torch.ones(batch, sequence, dtype=torch.long)
        else:
            vocab = getattr(config, "vocab_size", None) or 2
            result[key] = torch.randint(1, max(2, min(vocab, 1001)), (batch, sequence), generator=generator)
    return result


def next_past(session: ort.InferenceSession, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The cache a run returned (present.*), named as the next run's inputs (past_key_values.*)."""
    return {
        o.name.replace(PRESENT, PAST, 1): value
        for o, value in zip(session.get_outputs(), outputs)
        if o.name.startswith(PRESENT)
    }
