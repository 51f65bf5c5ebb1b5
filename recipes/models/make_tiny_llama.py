"""Build the tiny Llama-style decoder that `recipes/tiny-llama-offline.yaml` compresses.

It exists so the causal-LM path runs end to end offline (CI included) with a real model folder:
a word-level tokenizer fitted on the project's demo text, and a seeded Llama with grouped-query
attention, two decoder layers and a short next-token training run on the same text (seconds on a
CPU). The folder is built, not tracked: run `python recipes/models/make_tiny_llama.py` once before
`fwsvd-export run recipes/tiny-llama-offline.yaml`; the tests build their own copy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "pairs-calibration.jsonl"
OUT = HERE / "tiny-llama"


def texts() -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return [r[k] for r in rows for k in ("text", "text_pair")]


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def build(out: Path = OUT) -> Path:
    """Train and save the model and tokenizer into `out`; returns `out`."""
    torch.manual_seed(0)
    corpus = texts()
    tokenizer = build_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    stream = [t for text in corpus for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    blocks = torch.tensor([stream[i : i + 32] for i in range(0, len(stream) - 32, 32)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        batch = blocks[torch.randint(len(blocks), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"final training loss {loss.item():.3f}; saved to {out}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write (default: %(default)s)")
    build(parser.parse_args().out)
