"""Causal LM families on tiny configs: default targets, compression, export and ORT parity."""

import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fwsvd_export.core.compress import plan_layers
from fwsvd_export.core.lowrank import linear_weight
from fwsvd_export.core.spec import CompressionSpec
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import run
from fwsvd_export.stages.export import export_onnx
from fwsvd_export.stages.ort_io import feeds

from conftest import bert_config, quick_validation, write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out

DECODER = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
# family: (model class, config, factorized layers per block)
FAMILIES = {
    "gpt2": (GPT2LMHeadModel, lambda v: GPT2Config(vocab_size=v, n_embd=48, n_layer=2, n_head=4, n_positions=128), 4),
    "llama": (LlamaForCausalLM, lambda v: LlamaConfig(vocab_size=v, **DECODER), 7),
    "qwen2": (Qwen2ForCausalLM, lambda v: Qwen2Config(vocab_size=v, **DECODER), 7),
    "mistral": (MistralForCausalLM, lambda v: MistralConfig(vocab_size=v, sliding_window=None, **DECODER), 7),
    "opt": (
        OPTForCausalLM,
        lambda v: OPTConfig(
            vocab_size=v,
            hidden_size=48,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=48,
            max_position_embeddings=128,
        ),
        6,
    ),
    "phi3": (Phi3ForCausalLM, lambda v: Phi3Config(vocab_size=v, pad_token_id=0, **DECODER), 4),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory, tokenizer):
    cls, config, per_block = FAMILIES[request.param]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    cls(config(tokenizer.vocab_size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return request.param, folder, per_block


def test_family_compresses_exports_and_matches_in_onnx_runtime(tmp_path, family_dir, data_dir):
    family, folder, per_block = family_dir
    recipe = {
        "model": {"path": str(folder), "task": "text-generation"},
        "data": {
            "calibration": {"path": str(data_dir / "corpus.txt")},
            "evaluation": {"path": str(data_dir / "heldout.txt")},
            "max_length": 32,
            "batch_size": 4,
        },
        "compression": {"method": "kfac", "ratio": 0.5},  # no target: the family's default projections
        "validation": quick_validation(),
    }
    result = run(load_recipe(write_recipe(tmp_path, recipe)), tmp_path / "out", progress=False)
    layers = result.report.to_dict()["compression"]["layers"]
    assert len(layers) == 2 * per_block and all(p["rank"] for p in layers)
    assert not any("lm_head" in p["name"] or "embed" in p["name"] for p in layers)
    assert result.report.to_dict()["graph"]["compressed"]["split_matmul_pairs_found"] == 2 * per_block
    cpu = result.report.to_dict()["validation"]["providers"]["cpu"]
    assert cpu["parity"]["passed"], cpu["parity"]
    assert cpu["metric"] == pytest.approx(result.report.to_dict()["validation"]["compressed_torch"], rel=1e-3)


def test_gpt2_conv1d_layers_count_as_linear_with_transposed_weights(tokenizer):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=48, n_layer=1, n_head=4))
    plans = {p.name: p for p in plan_layers(model, CompressionSpec(ratio=0.5))}
    attn = plans["transformer.h.0.attn.c_attn"]
    assert (attn.in_features, attn.out_features) == (48, 144)
    assert linear_weight(model.transformer.h[0].attn.c_attn).shape == (144, 48)


def test_tied_lm_head_is_never_a_default_target_and_stays_dense_when_asked(tokenizer):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=48, n_layer=1, n_head=4))
    assert "lm_head" not in {p.name for p in plan_layers(model, CompressionSpec(ratio=0.5))}
    plans = plan_layers(model, CompressionSpec(target=["lm_head"], ratio=0.5))
    assert plans[0].rank is None and "tied" in plans[0].reason


def test_kv_cache_export_generates_in_onnx_runtime_like_pytorch(tmp_path, lm_recipe, tokenizer):
    from optimum.onnxruntime import ORTModelForCausalLM

    import fwsvd_export

    lm_recipe["validation"]["generation_tokens"] = 6
    lm_recipe["validation"]["prompts"] = ["quiet river at morning", "silver engine"]
    result = run(load_recipe(write_recipe(tmp_path, lm_recipe)), tmp_path / "out", progress=False)
    cpu = result.report.to_dict()["validation"]["providers"]["cpu"]
    assert cpu["generation"] == {"prompts": 2, "tokens": 6, "matching_prompts": 2}
    lat = cpu["latency"][0]
    assert lat["dense"]["decode_per_token"]["median_ms"] > 0 and lat["decode_speedup"] > 0
    ort_model = ORTModelForCausalLM.from_pretrained(result.output / "onnx/compressed")
    torch_model = fwsvd_export.load(result.output / "compressed")
    ids = tokenizer("quiet river", return_tensors="pt", add_special_tokens=False)["input_ids"]
    kwargs = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert ort_model.generate(ids, **kwargs).tolist() == torch_model.generate(ids, **kwargs).tolist()


def test_strided_perplexity_scores_each_token_once_as_transformers_does(llama_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from fwsvd_export.config import DataSource
    from fwsvd_export.stages.tasks import TASKS

    from conftest import sentences

    task = TASKS["text-generation"]
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    records = [{"text": t} for t in sentences(12, 9)]
    batches = task.make_batches(records, DataSource(stride=8), tokenizer, 24, 4, False, None)
    stream_length = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in records)
    scored = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
    assert scored == stream_length - 1
    with torch.no_grad():
        ours = task.score([task.summary(model(**b.inputs).logits, b) for b in batches], batches, None)["perplexity"]
        # The Hugging Face perplexity guide's way: the model's own mean loss times the scored tokens, per window.
        nll = sum(
            float(model(input_ids=row[None], labels=lab[None]).loss) * int((lab[1:] != -100).sum())
            for b in batches
            for row, lab in zip(b.inputs["input_ids"], b.labels)
        )
    assert ours == pytest.approx(float(torch.exp(torch.tensor(nll / scored))), rel=1e-4)


def test_a_decoders_loss_makes_no_copy_of_its_logits():
    """Logits are tokens x vocabulary (a 2 x 128-token batch of Qwen2.5-0.5B: 155 MB): the statistics pass's
    loss and its backward make nothing of that size beyond the logits, their log-softmax and a gradient of
    each (shifting the logits by a position, not the labels, would copy them and scatter their gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fwsvd_export.core.batch import Batch
    from fwsvd_export.stages.tasks import TASKS

    vocab, batch, tokens = 500, 2, 24
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # the tied output projection's

    class VocabularySized(TorchDispatchMode):
        """The op that first made each new memory of tokens x vocabulary (at least the shifted logits' size)."""

        def __init__(self):
            super().__init__()
            self.made: dict[int, tuple[str, torch.Tensor]] = {}  # holding each tensor: no address is reused

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in [] if func.is_view else out if isinstance(out, (tuple, list)) else [out]:
                if (
                    isinstance(t, torch.Tensor)
                    and t.dim() >= 2
                    and t.shape[-1] == vocab
                    and t.numel() >= batch * (tokens - 1) * vocab
                ):
                    where = t.untyped_storage().data_ptr()
                    if where not in weights:
                        self.made.setdefault(where, (str(func), t))
            return out

    with VocabularySized() as seen:
        TASKS["text-generation"].loss(
            model,
            Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.ones_like(ids).bool(), labels),
        ).backward()
    assert sorted(op for op, _ in seen.made.values()) == sorted(
        [
            "aten.mm.default",
            "aten._log_softmax.default",  # the logits and their log-softmax
            "aten.nll_loss_backward.default",
            "aten._log_softmax_backward_data.default",
        ]
    )  # and a gradient of each


def _big_initializers(graph, vocab_size: int) -> list[tuple]:
    return [
        tuple(i.dims) for i in onnx.load(str(graph), load_external_data=False).graph.initializer if vocab_size in i.dims
    ]


def _ort_logits(graph, ids: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], feeds(session, {"input_ids": ids}))[0])


def _transposed_initializers(graph) -> list[str]:
    proto = onnx.load(str(graph), load_external_data=False).graph
    names = {i.name for i in proto.initializer}
    return [n.input[0] for n in proto.node if n.op_type == "Transpose" and n.input[0] in names]


def _weights_are_the_models(graph, model) -> int:
    """Assert every initializer of `graph` holds `model`'s tensor of its name (or its transpose, for a folded
    Transpose's '<name>.transposed') bit for bit and no weight is left a graph input; returns how many."""
    proto = onnx.load(str(graph))
    state = model.state_dict()
    assert not [i.name for i in proto.graph.input if i.name in state]
    for init in proto.graph.initializer:
        name, transposed = init.name.removesuffix(".transposed"), init.name.endswith(".transposed")
        expected = state[name].T if transposed else state[name]
        assert torch.equal(torch.from_numpy(onnx.numpy_helper.to_array(init).copy()), expected), init.name
    return len(proto.graph.initializer)


def test_validation_holds_a_decoders_whole_logits_for_the_parity_batches_only(llama_dir, tokenizer, tmp_path):
    """A decoder's logits are tokens x vocabulary (hundreds of GB on WikiText-2's test split for a 150k
    vocabulary): of every evaluation batch the validation keeps the summed loss the perplexity reads, and whole
    logits for a compressed model's `parity_batches` only (the dense model's none), and gets the perplexity the
    whole logits give."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from fwsvd_export.config import DataSource, ValidationSpec
    from fwsvd_export.stages.tasks import TASKS
    from fwsvd_export.stages.validate import reference, torch_results

    from conftest import sentences

    task = TASKS["text-generation"]
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    batches = task.make_batches(
        [{"text": t} for t in sentences(12, 9)], DataSource(stride=8), tokenizer, 24, 2, False, None
    )
    assert len(batches) >= 3
    spec = ValidationSpec(parity_batches=1)
    held = torch_results(task, spec, model, batches, progress=False).outputs
    assert len(held.whole) == 1 and [s.numel() for s in held.summaries] == [1] * len(batches)
    dense = reference(task, spec, model, batches, tmp_path / "model.onnx", progress=False)
    assert [s.numel() for s in dense.summaries] == [1] * len(batches)
    with torch.no_grad():
        logits = [model(**b.inputs).logits for b in batches]
    assert torch.equal(held.whole[0], logits[0][batches[0].token_mask.bool()])  # the real tokens' logits
    nll = sum(
        F.cross_entropy(
            out[:, :-1].reshape(-1, out.shape[-1]), b.labels[:, 1:].reshape(-1), reduction="sum", ignore_index=-100
        )
        for out, b in zip(logits, batches)
    )
    tokens = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
    assert dense.scores["perplexity"] == pytest.approx(float(torch.exp(nll / tokens)), rel=1e-5)


@pytest.mark.parametrize("external_data", [False, True])
def test_a_tied_embedding_is_stored_once_in_the_graph(tmp_path, monkeypatch, tokenizer, external_data):
    """The exporter writes the graph without its weights and without constant folding (each would hold the
    weights again in memory), so weights reach their MatMuls through Transposes; the tool then stores the
    model's own tensors, each as its MatMul reads it, except a tied embedding, which the output projection
    reads transposed: it stays stored once, behind its Transpose, in a file with its weights inside or
    beside it, and the graph runs like PyTorch. Beside it is optimum's own way for graphs over 2 GB (forced
    here): constants of 100 bytes or more (the rotary frequencies, with head_dim 64) go to a data file, and
    must still be read right after the rewrite."""
    torch.manual_seed(0)
    vocab = tokenizer.vocab_size
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, head_dim=64, **DECODER)).eval()
    folder = tmp_path / "onnx"
    if external_data:
        monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    graph = export_onnx(model, tokenizer, folder, "text-generation-with-past")
    assert _big_initializers(graph, vocab) == [(vocab, 48)]
    assert _transposed_initializers(graph) == ["model.embed_tokens.weight"]
    # two layers of seven projections, the embedding, and the five norms' weights: all ones, stored once
    assert _weights_are_the_models(graph, model) == 2 * 7 + 1 + 1
    assert (folder / "model.onnx_data").exists() == external_data
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no scratch left
    ids = torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.allclose(_ort_logits(graph, ids), expected, atol=1e-4)


def test_an_exported_graph_stores_every_untied_weight_as_its_matmul_reads_it(tmp_path, tokenizer):
    torch.manual_seed(0)
    vocab = tokenizer.vocab_size
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **DECODER)).eval()
    graph = export_onnx(model, tokenizer, tmp_path / "onnx", "text-generation-with-past")
    assert _transposed_initializers(graph) == []
    assert sorted(_big_initializers(graph, vocab)) == [
        (48, vocab),
        (vocab, 48),
    ]  # lm_head as MatMul reads it, embedding
    assert _weights_are_the_models(graph, model) == 2 * 7 + 2 + 1  # projections, embedding and head, norms
    ids = torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.allclose(_ort_logits(graph, ids), expected, atol=1e-4)


@pytest.mark.parametrize("model_kind", ["bert encoder", "llama tied, factorized", "qwen2 with past"])
def test_shape_inference_sees_no_weight_values_and_the_graph_is_byte_for_byte_the_same(
    tmp_path, monkeypatch, tokenizer, model_kind
):
    """torch's graph-wide ONNX shape inference, given the weights' values, set the 0.5B decoder's export peak
    (4,987 MiB against 2,579 without, BENCHMARKS.md); the tool gives it none, which must change no byte of the
    graph: an encoder, a tied decoder with factorized layers, a decoder with biases and its cache."""
    import contextlib

    import torch._C
    from transformers import BertModel

    from fwsvd_export.core.lowrank import low_rank_from_linear
    from fwsvd_export.core.modules import set_module
    from fwsvd_export.stages import export

    torch.manual_seed(0)
    vocab = tokenizer.vocab_size
    if model_kind == "bert encoder":
        model, task = BertModel(bert_config(tokenizer)).eval(), "feature-extraction"
    elif model_kind == "qwen2 with past":
        model, task = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **DECODER)).eval(), "text-generation-with-past"
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **DECODER)).eval()
        task = "text-generation-with-past"
        for name in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"):
            set_module(model, name, low_rank_from_linear(model.get_submodule(name), 8)[0])

    seen, infer = [], torch._C._jit_pass_onnx_graph_shape_type_inference

    def spy(graph, params_dict, opset_version):
        seen.append(len(params_dict))
        return infer(graph, params_dict, opset_version)

    monkeypatch.setattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", spy)
    graph = export.export_onnx(model, tokenizer, tmp_path / "tool", task)
    assert seen and set(seen) == {0}  # the pass ran, and never with a weight
    assert torch._C._jit_pass_onnx_graph_shape_type_inference is spy  # put back as it was found
    monkeypatch.setattr(export, "_shape_inference_without_weight_values", contextlib.nullcontext)
    seen.clear()
    reference = export.export_onnx(model, tokenizer, tmp_path / "reference", task)
    assert min(seen) > 0  # torch's own way: the weights' values given
    assert graph.read_bytes() == reference.read_bytes()
