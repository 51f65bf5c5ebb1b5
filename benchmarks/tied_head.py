"""What quantizing a tied output projection buys: int8 and int4 copies of a decoder with tied embeddings,
made from the tool's fp32 graph as ONNX Runtime's quantizers see it ("as exported": the output
projection reads the embedding through a Transpose, so it stays an fp32 MatMul) and as the tool now
hands it to them ("untied": the projection gets its own transposed weight, quantized like every other
Linear; `fwsvd_export.stages.precision.make_variant`). In int4 the tool also makes the embedding table
its Gather reads 4-bit (since commit d67b34a); "int4 untied, embedding fp32" is the untied graph with the
MatMuls alone quantized, as the tool made it before.

Decoders built from real configurations with seeded random weights (`scaling.py`'s family; size and
speed do not depend on training, and no trained tied decoder is available offline), exported with the
key/value cache. Per artifact: file size, how many weight MatMuls stay fp32, the logits' error relative
to the fp32 graph on one held-out block (random weights: a sanity check, not an accuracy), and latency
in ONNX Runtime on the CPU, every artifact timed in the same rotated rounds (`latency.interleaved`):
the prompt pass at each shape and one cached decode step after it.

    python benchmarks/tied_head.py --models smollm-135m,qwen2.5-0.5b --json benchmarks/results/tied_head.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import torch
from scaling import FAMILY, build_in_subprocess

from measure import run_info

ARTIFACTS = (
    "fp32",
    "int8 as exported",
    "int8 untied",
    "int4 as exported",
    "int4 untied, embedding fp32",
    "int4 untied",
)


def make_artifacts(name: str, work: Path) -> dict[str, Path]:
    """The fp32 graph and its four quantized copies (reused when already written)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fwsvd_export.stages import precision
    from fwsvd_export.stages.export import export_onnx

    model_dir = work / "models" / name
    build_in_subprocess(name, model_dir)
    root = work / "tied-head" / name
    fp32 = root / "dense" / "model.onnx"
    if not fp32.exists():
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        export_onnx(model, AutoTokenizer.from_pretrained(model_dir), fp32.parent, "text-generation-with-past")
        del model
    graphs = {"fp32": fp32}
    external = fp32.with_name("model.onnx_data").exists()
    for p, make in (
        ("int8", lambda s, t: precision._int8(s, t, "dynamic", [], external)),
        ("int4", lambda s, t: precision._int4(s, t, external)),
    ):
        exported = root / f"{p}-as-exported" / "model.onnx"
        if not exported.exists():
            exported.parent.mkdir(parents=True)
            make(fp32, exported)  # the library's own quantizer call, on the graph as exported
        graphs[f"{p} as exported"] = exported
        untied = root / f"dense-{p}" / "model.onnx"
        graphs[f"{p} untied"] = untied if untied.exists() else precision.make_variant(fp32, p)
    matmuls_only = root / "int4-embedding-fp32" / "model.onnx"
    if not matmuls_only.exists():
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        from fwsvd_export.stages.export import untied_copy

        matmuls_only.parent.mkdir(parents=True)
        untied = matmuls_only.with_name("untied.onnx")
        source = untied if untied_copy(fp32, untied) else fp32  # a decoder without a tie needs no copy
        config = DefaultWeightOnlyQuantConfig(
            block_size=precision.INT4_BLOCK, is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul",)
        )
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(matmuls_only), use_external_data_format=external)
        for leftover in matmuls_only.parent.glob("untied.onnx*"):
            leftover.unlink()
    graphs["int4 untied, embedding fp32"] = matmuls_only
    return graphs


def fp32_weight_matmuls(graph: Path) -> int:
    """Float MatMuls whose second input is a weight: an initializer, or computed from initializers only
    (a Transpose of the embedding, a DequantizeLinear of its int8 copy), work redone on every run."""
    g = onnx.load(str(graph), load_external_data=False).graph
    constant = {i.name for i in g.initializer}
    for n in g.node:  # nodes are in topological order
        if (
            n.op_type == "Constant"
            or n.op_type in ("Transpose", "DequantizeLinear", "Cast", "Identity")
            and all(i in constant for i in n.input if i)
        ):
            constant.update(n.output)
    return sum(n.op_type == "MatMul" and n.input[1] in constant for n in g.node)


def measure(name: str, args) -> dict:
    from fwsvd_export.stages.latency import interleaved
    from fwsvd_export.stages.ort_io import feeds
    from fwsvd_export.stages.validate import open_session

    graphs = make_artifacts(name, args.work)
    vocab = FAMILY[name]["vocab_size"]
    sessions = {a: open_session(graphs[a], "cpu", args.threads)[0] for a in ARTIFACTS}
    ids = torch.randint(3, vocab, (1, 128), generator=torch.Generator().manual_seed(1))
    logits = {a: s.run(["logits"], feeds(s, {"input_ids": ids}))[0] for a, s in sessions.items()}
    times = interleaved(
        sessions,
        args.shapes.split(","),
        SimpleNamespace(vocab_size=vocab),
        warmup=1,
        runs=args.runs,
        rounds=args.rounds,
    )
    rows = {}
    for a in ARTIFACTS:
        folder = graphs[a].parent
        rows[a] = {
            "bytes": sum(f.stat().st_size for f in folder.glob("model.onnx*")),
            "fp32_weight_matmuls": fp32_weight_matmuls(graphs[a]),
            "relative_error": float(np.linalg.norm(logits[a] - logits["fp32"]) / np.linalg.norm(logits["fp32"])),
            "latency": times[a],
        }
    return {"model": name, "threads": args.threads, "artifacts": rows}


def render(results: dict) -> str:
    lines = []
    for name, r in results["models"].items():
        shapes = list(next(iter(r["artifacts"].values()))["latency"])
        head = (
            "| artifact | size MB | fp32 weight MatMuls | logits error vs fp32 | "
            + " | ".join(f"{s} prefill ms | {s} decode ms/token" for s in shapes)
            + " |"
        )
        lines += [f"{name} ({r['threads']} threads):", "", head, "|---|" + "---:|" * (3 + 2 * len(shapes))]
        for a, row in r["artifacts"].items():
            cells = [
                f"{row['latency'][s]['median_ms']:.2f} | {row['latency'][s]['decode_per_token']['median_ms']:.2f}"
                for s in shapes
            ]
            lines.append(
                f"| {a} | {row['bytes'] / 1e6:.1f} | {row['fp32_weight_matmuls']} | "
                f"{row['relative_error']:.4f} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm-135m", help="comma-separated, from: " + ", ".join(FAMILY))
    parser.add_argument("--shapes", default="1x128")
    parser.add_argument("--runs", type=int, default=60, help="timed runs per artifact and shape, over the rounds")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fwsvd-scaling"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {"models": {}}
    for name in args.models.split(","):
        results["models"][name] = measure(name, args)
        print(render({"models": {name: results["models"][name]}}), flush=True)
    results["run_info"] = run_info(__file__, argv)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
