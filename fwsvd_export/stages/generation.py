"""Decoder checks that need the key/value cache: greedy generation parity between PyTorch and an ONNX
graph exported with past."""

from __future__ import annotations

import onnxruntime as ort
import torch

from .ort_io import feeds, next_past


def greedy_torch(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy continuation without a cache: the reference the ONNX graph with past must reproduce."""
    tokens = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[0, ids.shape[1] :].tolist()


def greedy_ort(session: ort.InferenceSession, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy continuation through the graph's cache: one prefill, then one token per run."""
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, feeds(session, {"input_ids": ids}))
    generated: list[int] = []
    for _ in range(steps):
        nxt = int(outputs[names.index("logits")][0, -1].argmax())
        generated.append(nxt)
        outputs = session.run(None, feeds(session, {"input_ids": torch.tensor([[nxt]])}, next_past(session, outputs)))
    return generated
