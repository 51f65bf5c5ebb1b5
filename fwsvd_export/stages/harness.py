"""lm-evaluation-harness on an exported decoder: `OnnxLM`, registered with lm-eval as ``fwsvd-onnx``, scores
a text-generation graph folder in ONNX Runtime (optimum's ``ORTModelForCausalLM``), so the published tasks
(arc_easy, piqa, hellaswag, winogrande, wikitext, ...) measure the graph that ships rather than its PyTorch
source; `evaluate` is what ``fwsvd-export lm-eval`` runs.

Requests are tokenized without the tokenizer's special tokens, with the beginning-of-sequence token in front
where the tokenizer itself would put one (Llama's does, GPT-2's and Qwen's do not), so the numbers compare
with lm-eval's own Hugging Face model on the same weights:

- ``loglikelihood``: the context's trailing whitespace moves onto the continuation, context + continuation is
  encoded whole and the continuation's tokens are its tail past the context's own encoding; a context left
  empty is the prefix token (BOS, else EOS). A row longer than the model's window loses context tokens from the
  left. Rows are sorted longest first and scored `batch_size` at a time, padded on the right.
- ``loglikelihood_rolling``: a document is cut into windows of at most `max_length` predicted tokens; each
  token is scored exactly once, the first after the prefix token (BOS once; lm-eval's ``hf`` model, encoding
  with special tokens, also scores a second BOS), a later window's with the most context the window holds
  (its inputs are the `max_length` tokens before its last one).
- ``generate_until``: greedy, through the graph's key/value cache (a graph exported without one is run over
  the whole sequence at each step), `batch_size` prompts at a time padded on the left, stopping a row at EOS,
  at any ``until`` string or after ``max_gen_toks`` tokens; the text is cut before the first ``until`` string.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FwsvdError, short_message

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # the extra is optional: the rest of the package never imports this module
    raise FwsvdError("lm-evaluation-harness is not installed: pip install 'fwsvd-export[lm-eval]'") from exc

LOG = logging.getLogger("fwsvd_export")
MODEL_NAME = "fwsvd-onnx"
DEFAULT_MAX_LENGTH = 2048  # lm-eval's own fallback, for a config that names no window
DECODER_TASKS = ("text-generation", "multiple-choice")


@dataclass(frozen=True)
class Pair:
    """One scored row: the tokens it conditions on and the tokens whose log-probability it sums."""

    context: list[int]
    continuation: list[int]


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[Pair]:
    """A document's windows for loglikelihood_rolling: each token predicted once, at most `max_length`
    inputs per window; the first window starts at `prefix`, a later one holds the `max_length` tokens before
    its last one, so its predictions get the most context the model's window allows."""
    stream = [prefix, *tokens]  # stream[i] predicts stream[i + 1]
    windows, done = [], 0
    while done < len(tokens):
        end = min(done + max_length, len(tokens))  # this window predicts tokens[done:end]
        start = max(0, end - max_length)
        windows.append(Pair(stream[start : done + 1], stream[done + 1 : end + 1]))
        done = end
    return windows


def _stop_at(text: str, until: Iterable[str]) -> int | None:
    """Where the earliest non-empty stop string begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return min(found) if found else None


def _gen_settings(kwargs: dict[str, Any], default_tokens: int) -> tuple[list[str], int]:
    """(until strings, max_gen_toks) of a request's generation kwargs; sampling is refused (greedy only)."""
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
        raise FwsvdError(f"{MODEL_NAME} decodes greedily; a task asked for sampling ({kwargs})")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    tokens = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", default_tokens))
    return until, int(tokens)


@register_model(MODEL_NAME)
class OnnxLM(LM):
    """An exported text-generation graph folder (model.onnx, config.json and the tokenizer) as an lm-eval model.
    `pretrained` is the folder (lm-eval's name for it, so ``--model_args pretrained=FOLDER`` works);
    `provider` cpu or cuda (lm-eval's `device` picks cuda when it names it); `max_length` overrides the
    window read from the config."""

    def __init__(
        self,
        pretrained: str | Path,
        provider: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
    ) -> None:
        super().__init__()
        provider = provider or ("cuda" if device and str(device).startswith("cuda") else "cpu")
        self.batch_size = _positive(batch_size, "batch_size")
        self.max_gen_toks = _positive(max_gen_toks, "max_gen_toks")
        self.folder = Path(pretrained)
        self.model = load_graph(self.folder, provider)
        self.tokenizer = _load_tokenizer(self.folder)
        self.max_length = _positive(max_length or _window(self.model.config, self.tokenizer), "max_length")
        bos = self.tokenizer.bos_token_id
        if add_bos_token is None:  # as the tokenizer itself would encode: Llama's starts with BOS, GPT-2's not
            add_bos_token = bos is not None and self.tokenizer("a")["input_ids"][:1] == [bos]
        self.bos = [bos] if add_bos_token and bos is not None else []
        self.eos = eos = self.tokenizer.eos_token_id
        self.prefix = bos if bos is not None else eos
        if self.prefix is None:
            raise FwsvdError(f"{self.folder}: the tokenizer has neither a BOS nor an EOS token to start a text with")
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else (eos if eos is not None else 0)
        self.cached = bool(self.model.can_use_cache)

    # --- tokens ------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def split(self, context: str, continuation: str) -> Pair:
        """(context tokens, continuation tokens) of a loglikelihood request, as the module docstring says."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return Pair([self.prefix], self.encode(continuation))
        whole, head = self.encode(context + continuation), self.encode(context)
        return Pair(self.bos + whole[: len(head)], whole[len(head) :])

    # --- scoring -----------------------------------------------------------------------------------------
    def score(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """(summed log-probability, whether greedy decoding gives it) of each pair's continuation, in order;
        longest rows first, `batch_size` rows per graph run."""
        import torch

        rows = []
        for pair in pairs:
            if not pair.continuation or len(pair.continuation) > self.max_length:
                raise FwsvdError(
                    f"a continuation of {len(pair.continuation)} tokens cannot be scored in a window of "
                    f"{self.max_length} tokens (it must hold 1 to max_length tokens)"
                )
            rows.append((pair.context + pair.continuation)[-(self.max_length + 1) :])
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        result: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for first in range(0, len(order), self.batch_size):
            chunk = order[first : first + self.batch_size]
            width = max(len(rows[i]) for i in chunk) - 1
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
                mask[row, : len(rows[i]) - 1] = 1
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row, i in enumerate(chunk):
                cont = torch.tensor(pairs[i].continuation)
                end = len(rows[i]) - 1
                logprobs = torch.log_softmax(logits[row, end - len(cont) : end].float(), dim=-1)
                picked = logprobs.gather(-1, cont[:, None]).squeeze(-1)
                result[i] = (float(picked.sum()), bool((logprobs.argmax(-1) == cont).all()))
        return result

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """lm-eval's (log-probability, is greedy) of each (context, continuation) request."""
        answers = self.score([self.split(*request.args) for request in requests])
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """Each document's total log-probability, every token scored once (`rolling_windows`); the windows
        of all documents are batched together."""
        windows = [rolling_windows(self.encode(r.args[0]), self.prefix, self.max_length) for r in requests]
        scores = iter(self.score([w for doc in windows for w in doc]))
        totals = []
        for request, doc in zip(requests, windows):
            total = sum(next(scores)[0] for _ in doc)
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy continuations, grouped by their generation kwargs, longest prompts first."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        texts = [""] * len(requests)
        for members in groups.values():
            until, steps = _gen_settings(requests[members[0]].args[1], self.max_gen_toks)
            if steps >= self.max_length:
                raise FwsvdError(f"max_gen_toks {steps} leaves no room for a prompt in {self.max_length} tokens")
            room = self.max_length - steps
            prompts = {i: (self.bos + self.encode(requests[i].args[0]) or [self.prefix])[-room:] for i in members}
            members = sorted(members, key=lambda i: -len(prompts[i]))
            for first in range(0, len(members), self.batch_size):
                chunk = members[first : first + self.batch_size]
                for i, text in zip(chunk, self.greedy([prompts[i] for i in chunk], steps, until)):
                    texts[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return texts

    def greedy(self, prompts: list[list[int]], steps: int, until: list[str]) -> list[str]:
        """Up to `steps` greedy tokens after each prompt (padded on the left), decoded and cut before the first
        `until` string; a row stops at EOS or once its text holds a stop string, the batch when all have."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self._forward(ids, mask, None)
        made: list[list[int]] = [[] for _ in prompts]
        running = [True] * len(prompts)
        for step in range(steps):
            chosen = out.logits[:, -1].float().argmax(-1)
            for row, token in enumerate(chosen.tolist()):
                if not running[row]:
                    continue
                if token == self.eos:
                    running[row] = False
                    continue
                made[row].append(token)
                running[row] = _stop_at(self._decode(made[row]), until) is None
            if not any(running) or step == steps - 1:
                break
            ids, mask = torch.cat([ids, chosen[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = self._forward(ids, mask, out.past_key_values)
        texts = [self._decode(tokens) for tokens in made]
        return [text[: _stop_at(text, until)] for text in texts]

    def _forward(self, ids: Any, mask: Any, past: Any) -> Any:
        """One graph run over `ids` (all positions so far): with a cache, only the tokens it has not seen."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.cached and past is not None:
            ids, positions = ids[:, -1:], positions[:, -1:]
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=self.cached
        )

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))


# --- loading -----------------------------------------------------------------------------------------------
def _positive(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() != str(number):
        raise FwsvdError(f"{MODEL_NAME}: {name} must be a whole number of at least 1, got {value!r}")
    return number


def _window(config: Any, tokenizer: Any) -> int:
    """The model's context window: the config's position count, else the tokenizer's limit, else 2048."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else DEFAULT_MAX_LENGTH


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the tokenizer files hold, the user's input is at fault
        raise FwsvdError(f"{folder}: no tokenizer could be loaded ({short_message(exc)})") from None


def load_graph(folder: Path, provider: str) -> Any:
    """`folder`'s graph as optimum's ORTModelForCausalLM on `provider` (cpu or cuda), checked to be a
    causal LM's (input_ids in, logits over the vocabulary at every position out) and to run on `provider`."""
    from .validate import PROVIDERS

    if provider not in PROVIDERS:
        raise FwsvdError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if not any(folder.glob("*.onnx")):
        raise FwsvdError(f"{folder}: no ONNX graph (*.onnx) in it")
    from optimum.onnxruntime import ORTModelForCausalLM

    try:
        model = ORTModelForCausalLM.from_pretrained(
            folder, provider=PROVIDERS[provider], local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - a folder optimum cannot read is the user's input
        raise FwsvdError(f"{folder}: not a text-generation graph optimum can load ({short_message(exc)})") from None
    outputs = {o.name: o.shape for o in model.session.get_outputs()}
    if "input_ids" not in model.input_names or len(outputs.get("logits", ())) != 3:
        raise FwsvdError(
            f"{folder}: not a text-generation graph (a causal LM's takes input_ids and gives logits per "
            f"position; this one takes {', '.join(model.input_names)} and gives {outputs})"
        )
    used = model.session.get_providers()
    if used[0] != PROVIDERS[provider]:
        raise FwsvdError(f"{PROVIDERS[provider]} could not start on this machine (the graph runs on {used[0]})")
    return model


def graph_folder(folder: Path) -> tuple[Path, str]:
    """The graph folder to score, and why: `folder` itself when it holds a graph; for a run's output folder
    (report.json), the artifact its report recommends, or its compressed fp32 graph when that one is absent."""
    from .model_card import recommended
    from .run_report import RunReport

    if not folder.is_dir():
        raise FwsvdError(f"{folder}: no such folder")
    report_file = folder / "report.json"
    if any(folder.glob("*.onnx")) or not report_file.is_file():
        return folder, f"the graph folder {folder}"
    try:
        report = RunReport.from_dict(json.loads(report_file.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise FwsvdError(f"{report_file}: not a run report this tool can read ({short_message(exc)})") from None
    if report.model.task not in DECODER_TASKS:
        raise FwsvdError(
            f"{folder} is a {report.model.task} run; lm-eval scores decoders ({', '.join(DECODER_TASKS)} runs)"
        )
    pick = recommended(report)
    chosen = folder / pick.folder
    if chosen.is_dir():
        return chosen, f"{pick.artifact}, which the run's report recommends: {pick.why}"
    fallback = folder / Path(report.artifacts.onnx_compressed).parent
    return fallback, f"the compressed fp32 graph ({pick.artifact}, which the report recommends, is not in {folder})"


@dataclass
class Evaluation:
    """What `evaluate` returns: lm-eval's results dict, its table as text, and the graph folder scored."""

    results: dict[str, Any]
    table: str
    graph: Path
    why: str


def task_manager(tasks: list[str], include_path: Path | None) -> Any:
    """lm-eval's task index (its own tasks and those under `include_path`), every name in `tasks` checked."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise FwsvdError("--tasks names no task")
    if include_path is not None and not include_path.exists():
        raise FwsvdError(f"--include-path {include_path}: no such file or folder")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" nor under {include_path}" if include_path else " (add --include-path DIR for your own task files)"
        raise FwsvdError(f"unknown lm-eval task {', '.join(map(repr, unknown))}: not one of lm-eval's tasks{where}")
    return manager


def evaluate(
    folder: Path,
    tasks: list[str],
    include_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    provider: str = "cpu",
    num_fewshot: int | None = None,
) -> Evaluation:
    """lm-eval's `simple_evaluate` of `tasks` on `folder` (a graph folder or a run's output folder)."""
    import lm_eval
    from lm_eval.utils import make_table

    graph, why = graph_folder(folder)
    manager = task_manager(tasks, include_path)
    model = OnnxLM(graph, provider=provider, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    if results is None:
        raise FwsvdError("lm-eval returned no results")
    table = make_table(results) + (make_table(results, "groups") if results.get("groups") else "")
    return Evaluation(dict(results), table, graph, why)


def write_results(results: dict[str, Any], path: Path) -> None:
    """lm-eval's results as JSON at `path` (its folder must exist: a typo is not made into new folders)."""
    if not path.parent.is_dir():
        raise FwsvdError(f"--output {path}: no folder {path.parent} to write it in")
    path.write_text(json.dumps(results, indent=2, default=str))
