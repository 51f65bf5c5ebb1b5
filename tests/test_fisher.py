"""The calibration pass: per-sample Fisher and the Grams match brute force over single samples."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from fwsvd_export.config import DataSource
from fwsvd_export.core.batch import Batch
from fwsvd_export.core.compress import linear_layers
from fwsvd_export.core.statistics import collect_statistics, statistic_bytes
from fwsvd_export.errors import FwsvdError
from fwsvd_export.stages.tasks import TASKS

from conftest import bert_config, sentences


def classifier_batches(tokenizer, config, n=6, batch_size=3):
    records = [{"text": t, "label": i % 3} for i, t in enumerate(sentences(n, 5))]
    task = TASKS["text-classification"]
    return (
        records,
        task,
        task.make_batches(records, DataSource(label_column="label"), tokenizer, 32, batch_size, True, config),
    )


def brute_force(model, task, single_batches, layers):
    """Mean over samples of (dL_n/dW)^2 summed over outputs, one backward per sample."""
    totals = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in layers.items()}
    for batch in single_batches:
        model.zero_grad()
        task.loss(model, batch).backward()
        for name, m in layers.items():
            totals[name] += m.weight.grad.double().square().sum(0)
    return {name: t / len(single_batches) for name, t in totals.items()}


def test_per_sample_fisher_matches_a_loop_over_single_samples(bert_dir, tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    records, task, batches = classifier_batches(tokenizer, model.config)
    layers = linear_layers(model)
    stats = collect_statistics(model, layers, batches, task.loss, {"fisher"}, progress=False)
    singles = task.make_batches(records, DataSource(label_column="label"), tokenizer, 32, 1, True, model.config)
    expected = brute_force(model, task, singles, layers)
    for name in layers:
        torch.testing.assert_close(stats[name].fisher.double(), expected[name], rtol=2e-3, atol=1e-9)
        assert stats[name].samples == len(records)


@pytest.mark.slow
def test_per_sample_fisher_for_a_causal_lm(llama_dir, tokenizer, data_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    task = TASKS["text-generation"]
    records = [{"text": t} for t in sentences(30, 6)]
    batches = task.make_batches(records, DataSource(), tokenizer, 16, 4, True, None)
    layers = {k: v for k, v in linear_layers(model).items() if "layers.0" in k}
    stats = collect_statistics(model, layers, batches, task.loss, {"fisher"}, progress=False)
    singles = [
        type(b)({k: v[i : i + 1] for k, v in b.inputs.items()}, b.token_mask[i : i + 1], b.labels[i : i + 1])
        for b in batches
        for i in range(len(b.token_mask))
    ]
    expected = brute_force(model, task, singles, layers)
    for name in layers:
        torch.testing.assert_close(stats[name].fisher.double(), expected[name], rtol=2e-3, atol=1e-9)


@pytest.mark.parametrize(
    ("hidden", "intermediate", "projected"),
    [
        (48, 96, {"output.dense": "input"}),
        (300, 600, {"output.dense": "input"}),
        (48, 1000, {"output.dense": "input", "intermediate.dense": "output"}),
    ],
    ids=["one-block", "several-blocks", "both-projected"],
)
def test_grams_use_real_tokens_only_and_leave_weights_without_gradients(tokenizer, hidden, intermediate, projected):
    """The Grams are exact whether a side fits one of the accumulation's blocks or spans several (600 wide:
    its upper block triangle is what the pass multiplies, the whole matrix is what it returns). A layer's wider
    side is gathered through its weight where that costs fewer multiplications: the input side of a narrowing
    layer as W C W^T (the Gram of its output before the bias), the output side of a widening one by more than
    1 + sqrt(2) as W^T G W, each beside the side's diagonal."""
    torch.manual_seed(0)
    config = bert_config(tokenizer)
    config.hidden_size, config.intermediate_size = hidden, intermediate
    model = BertForSequenceClassification(config)
    records, task, batches = classifier_batches(tokenizer, model.config)
    up, down = (f"bert.encoder.layer.0.{part}.dense" for part in ("intermediate", "output"))
    layers = {name: model.get_submodule(name) for name in (up, down)}
    stats = collect_statistics(
        model.eval(), layers, batches, task.loss, {"input_gram", "output_gram", "input_abs"}, progress=False
    )
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    seen: dict[str, tuple[list, list]] = {name: ([], []) for name in layers}
    singles = task.make_batches(records, DataSource(label_column="label"), tokenizer, 32, 1, True, model.config)

    def record(name):
        def hook(module, args, out):
            seen[name][0].append(args[0][0].detach())
            out.register_hook(lambda g: seen[name][1].append(g[0]))

        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    for batch in singles:
        task.loss(model, batch).backward()
    for hook in hooks:
        hook.remove()
    for name, layer in layers.items():
        x, g = (torch.cat(part).double() for part in seen[name])
        w, s = layer.weight.detach().double(), stats[name]
        assert s.tokens == x.shape[0]
        side = projected.get(name.removeprefix("bert.encoder.layer.0."))
        assert {n for n in s.values if n.startswith("projected_")} == ({f"projected_{side}_gram"} if side else set())
        c, gram_g = x.T @ x / len(x), g.T @ g / len(g)
        if side == "input":
            torch.testing.assert_close(s.input_gram.double(), c.diagonal(), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(s.projected_input_gram.double(), w @ c @ w.T, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(s.input_gram.double(), c, rtol=1e-4, atol=1e-6)
        if side == "output":
            torch.testing.assert_close(s.output_gram.double(), gram_g.diagonal(), rtol=2e-3, atol=1e-10)
            torch.testing.assert_close(s.projected_output_gram.double(), w.T @ gram_g @ w, rtol=2e-3, atol=1e-10)
        else:
            torch.testing.assert_close(s.output_gram.double(), gram_g, rtol=2e-3, atol=1e-10)
        torch.testing.assert_close(s.input_abs.double(), x.abs().mean(0), rtol=1e-4, atol=1e-6)


def test_a_wide_layers_statistics_take_the_memory_of_its_narrow_width():
    """Qwen2.5-0.5B's MLP: kfac's statistics of gate (896 -> 4864) and down (4864 -> 896) hold 896-wide Grams
    (float32, the projected ones float64) and 4864-wide diagonals; never a 4864-wide Gram unless a side is
    wider than max_gram_size, where it is a diagonal alone."""
    kfac = {"input_gram", "output_gram"}
    narrow = 4 * 896**2 + 4 * 4864 + 8 * 896**2
    assert statistic_bytes(896, 4864, kfac, 8192) == narrow and statistic_bytes(4864, 896, kfac, 8192) == narrow
    assert statistic_bytes(896, 896, kfac, 8192) == 2 * 4 * 896**2  # a square layer: both Grams whole
    assert statistic_bytes(896, 4864, kfac, 4863) == 4 * 896**2 + 4 * 4864
    assert statistic_bytes(896, 1536, kfac, 8192) == 4 * (896**2 + 1536**2)  # widening by under 1 + sqrt 2


def test_layers_share_an_input_gram_only_when_they_gather_it_in_the_same_form():
    """k/v-like layers (narrowing) gather their input as W C W^T beside its diagonal; a square q-like layer
    reading the same tensor needs the whole Gram, whichever of them reads it first."""

    class Readers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.k, self.v, self.q = torch.nn.Embedding(20, 8), *(torch.nn.Linear(8, n) for n in (2, 2, 8))

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.embed

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.embed(ids)
            return self.k(h).square().sum() + self.v(h).sum() + self.q(h).square().mean()

    torch.manual_seed(0)
    model = Readers()
    ids = torch.randint(0, 20, (3, 5))
    batch = Batch({"input": ids}, torch.ones(3, 5, dtype=torch.bool))
    layers = {n: getattr(model, n) for n in ("k", "v", "q")}
    stats = collect_statistics(
        model, layers, [batch], lambda m, b: m(b.inputs["input"]), {"input_gram", "output_gram"}, progress=False
    )
    x = model.embed(ids).detach().reshape(-1, 8).double()
    c = x.T @ x / len(x)
    assert stats["q"].shares_input_with is None and stats["v"].shares_input_with == "k"
    torch.testing.assert_close(stats["q"].input_gram.double(), c, rtol=1e-5, atol=1e-7)
    for name in ("k", "v"):
        w = layers[name].weight.detach().double()
        torch.testing.assert_close(stats[name].input_gram.double(), c.diagonal(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats[name].projected_input_gram.double(), w @ c @ w.T, rtol=1e-5, atol=1e-7)


def test_unknown_statistic_is_rejected(bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    with pytest.raises(ValueError, match="unknown statistics"):
        collect_statistics(model, {}, [], None, {"hessian"})


def _lm_batches(tokenizer):
    task = TASKS["text-generation"]
    return task, task.make_batches([{"text": t} for t in sentences(12, 7)], DataSource(), tokenizer, 16, 4, True, None)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert-classifier", "llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_statistics(family, bert_dir, llama_dir, tokenizer):
    """Blocks recompute their activations in the backward pass; forward hooks fire twice, statistics do not."""
    if family == "bert-classifier":
        model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
        _, task, batches = classifier_batches(tokenizer, model.config)
    else:
        if family == "gpt2":
            torch.manual_seed(0)
            model = GPT2LMHeadModel(
                GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64)
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(llama_dir)
        model.eval()
        task, batches = _lm_batches(tokenizer)
    layers = linear_layers(model)
    needs = {"fisher", "input_gram", "output_gram", "input_abs"}
    plain = collect_statistics(model, layers, batches, task.loss, needs, progress=False)
    recomputed = collect_statistics(model, layers, batches, task.loss, needs, progress=False, checkpointing=True)
    for name in layers:
        assert recomputed[name].values.keys() == plain[name].values.keys()
        for stat in plain[name].values:  # the projected Grams too
            torch.testing.assert_close(
                getattr(recomputed[name], stat), getattr(plain[name], stat), rtol=1e-4, atol=1e-10
            )
        assert (recomputed[name].samples, recomputed[name].tokens) == (plain[name].samples, plain[name].tokens)
    assert all("forward" not in m.__dict__ for m in model.modules()), "blocks keep their own forward afterwards"


def test_gradient_checkpointing_needs_checkpointable_blocks(tokenizer):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    model.get_input_embeddings = lambda: model[0]
    batch = Batch({"input": torch.tensor([[1, 2]])}, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(FwsvdError, match="gradient checkpointing: Sequential has no transformer blocks"):
        collect_statistics(
            model,
            {"1": model[1]},
            [batch],
            lambda m, b: m(b.inputs["input"]).sum(),
            {"fisher"},
            progress=False,
            checkpointing=True,
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_accumulate_in_float32(dtype, llama_dir, tokenizer):
    task, batches = _lm_batches(tokenizer)
    needs = {"fisher", "input_gram", "output_gram"}
    full = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    half = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=dtype).eval()
    name = "model.layers.1.mlp.down_proj"
    reference = collect_statistics(full, {name: full.get_submodule(name)}, batches, task.loss, needs, progress=False)[
        name
    ]
    got = collect_statistics(half, {name: half.get_submodule(name)}, batches, task.loss, needs, progress=False)[name]
    for stat in needs:
        value, expected = getattr(got, stat), getattr(reference, stat)
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        assert float((value - expected).norm() / expected.norm()) < 0.05, stat  # half-precision activations, fp32 sums
