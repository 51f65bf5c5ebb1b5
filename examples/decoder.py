"""Compress a decoder on plain text, export it to ONNX with its key/value cache and check it in ONNX Runtime
(perplexity, numeric parity, and greedy generation matching PyTorch's).

    python examples/decoder.py [MODEL]   # a folder or hub id of a *ForCausalLM model
"""

import sys
import tempfile

import fwsvd_export as fx

MODEL = sys.argv[1] if len(sys.argv) > 1 else "Qwen/Qwen2.5-0.5B"
TEXT = (
    "The river ran quiet past the market, where the bright morning light fell on silver fish and orange fruit. "
    "A doctor with a careful hand wrote a letter by the window while music drifted from the old garden. "
)
calibration = [TEXT * 3] * 8  # joined and cut into blocks of max_length tokens
held_out = [TEXT[::-1].capitalize(), TEXT.upper()] * 2

small = fx.compress(MODEL, calibration, method="kfac", ratio=0.5, max_length=32, batch_size=4)
print(small)
with tempfile.TemporaryDirectory() as folder:
    graphs = fx.export(small, folder)
    result = fx.validate(small, held_out, graphs, max_metric_loss=0.05)
print(
    f"{result.metric}: dense {result.original_torch:.2f}, compressed {result.compressed_torch:.2f};",
    "validation",
    "passed" if result.passed else "FAILED",
)
for check in result.checks:
    print(f"  {'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}")
