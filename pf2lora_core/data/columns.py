"""Column names shared by the data sources, partitioners and tokenization."""

from __future__ import annotations

# Integer class id in a pooled dataset (0..num_labels-1, a ``datasets.ClassLabel`` feature).
LABEL = "label"
# The same ids after tokenization: the keyword Hugging Face models take for the targets.
LABELS = "labels"
# Rotten Tomatoes: the movie each snippet reviews (kept for partitioning by movie).
MOVIE = "movie_name"
# Rotten Tomatoes raw columns.
RT_TEXT = "text"
RT_CATEGORY = "category"
# Causal-LM examples: the model reads PROMPT and learns to continue it with TARGET.
PROMPT = "prompt"
TARGET = "target"
# Tokenized causal-LM rows: how many leading tokens of input_ids are the prompt (masked from the loss).
PROMPT_LENGTH = "prompt_length"
# Label id that cross-entropy ignores (prompt and padding positions of causal-LM labels).
IGNORE_INDEX = -100
# Tokenizer outputs that the model consumes (token_type_ids only for BERT-like tokenizers).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
MODEL_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS, LABELS)
# Position of a row in the pooled dataset, carried through a partitioner to recover indices.
ROW = "pooled_row"
# Keys of a client's label histograms (summary.json) and names of its three splits.
TRAIN = "train"
VALIDATION = "validation"
TEST = "test"
