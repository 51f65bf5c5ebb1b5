"""Compress a text classifier, export it to ONNX (fp32 and int8) and check it in ONNX Runtime.

python examples/classifier.py [MODEL]   # a folder or hub id of a *ForSequenceClassification model
"""

import sys
import tempfile

import fwsvd_export as fx

MODEL = sys.argv[1] if len(sys.argv) > 1 else "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
REVIEWS = [
    "a moving, beautifully acted film",
    "dull, slow and far too long",
    "the best meal I have had this year",
    "the service was rude and the soup cold",
    "a clever plot with a warm heart",
    "I want those two hours back",
    "crisp writing and a great cast",
    "flat jokes and a muddled ending",
]
# Labels are class indices (or names from the model's config); here 1 for a kind review, 0 for a harsh one.
records = [{"text": text, "label": (i + 1) % 2} for i, text in enumerate(REVIEWS)] * 4

small = fx.compress(MODEL, records, ratio=0.5, max_length=32, batch_size=8)  # the task comes from the head
print(small)
with tempfile.TemporaryDirectory() as folder:
    graphs = fx.export(small, folder, precisions=("fp32", "int8"))
    result = fx.validate(small, records, graphs, max_metric_loss=0.1, max_quantization_loss=0.1)
print(
    f"{result.metric}: dense {result.original_torch:.3f}, compressed {result.compressed_torch:.3f};",
    "validation",
    "passed" if result.passed else "FAILED",
)
for check in result.checks:
    print(f"  {'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}")
