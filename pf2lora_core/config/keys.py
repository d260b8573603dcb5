"""Names shared across layers: adapter levels, record keys, metric keys, file names.

A key spelled as a literal in two places is a bug waiting; every layer imports it from here.
"""

from __future__ import annotations

# Adapter levels. They double as the peft adapter names, so a parameter's level can be read
# off its name (``...lora_A.common.weight``).
COMMON = "common"
PRIVATE = "private"
LEVELS = (COMMON, PRIVATE)

# peft's LoRA factor names inside parameter names (``...query.lora_A.common.weight``).
LORA_A = ".lora_A."  # down-projection A (and C at the private level)
LORA_B = ".lora_B."  # up-projection B (and D)

# Where the classification head lives (config ``model.head_level``).
HEAD_LEVELS = LEVELS

# Keys inside Flower records (used by server_app / client_app; defined here so tests share them).
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
PRIVATE_STATE_KEY = "pf2lora.private"  # ArrayRecord in context.state
PRIVATE_META_KEY = "pf2lora.private-meta"  # ConfigRecord: round, local_steps_total
LOWER_STATE_KEY = "pf2lora.lower"  # optional lower-level optimiser/algorithm state
# The private level as re-fitted at an evaluation (ArrayRecord), and what it was fitted to (ConfigRecord:
# the digest of the common level, the round of the private level it started from): the next round's
# training at that same common level starts from it instead of re-fitting again (client_app.app).
REFIT_STATE_KEY = "pf2lora.refit"
REFIT_META_KEY = "pf2lora.refit-meta"
REFIT_COMMON_META, REFIT_BASE_META = "common-digest", "base-digest"

# Metric names.
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
GRADIENT_PASSES = "gradient_passes"  # forward+backward passes of a round's local steps
COMPUTE_SECONDS = "compute_s"  # a client's own work on one message (train or evaluate)
UPDATE_NORM = "update_norm"  # ||uplink - what it updates||_2, measured by the server on every accepted reply
FLOPS_PER_STEP = "flops_per_local_step"  # counted FLOPs of a round's training / its local steps
FLOPS_PER_CLIENT_ROUND = "flops_per_client_round"  # counted FLOPs of one client's round of local training
# counted FLOPs of one client's evaluation (both models, test and validation, and any re-fit before it)
FLOPS_PER_CLIENT_EVALUATION = "flops_per_client_evaluation"
# a client's round of training plus one evaluation: the cost of an evaluated round (eval_every = 1)
FLOPS_PER_EVALUATED_ROUND = "flops_per_client_round_with_evaluation"
ACCURACY = "accuracy"
MCC = "matthews_correlation"
# Generation metrics (causal-LM tasks): corpus BLEU (sacrebleu), ROUGE-L F1, METEOR, and the
# perplexity of held-out targets (exp of the mean token cross-entropy, prompt tokens excluded).
BLEU = "bleu"
ROUGE_L = "rouge_l"
METEOR = "meteor"
PERPLEXITY = "perplexity"
# Metrics where lower is better: a client's "worst" is then the largest value.
LOWER_IS_BETTER = frozenset({EVAL_LOSS, PERPLEXITY})
PERSONALIZED = "personalized"
GLOBAL = "global"
# The same two models on each client's validation split (choosing hyper-parameters or rounds
# reads these, never the test split): VALIDATION mirrors PERSONALIZED, VALIDATION_GLOBAL mirrors GLOBAL.
VALIDATION = "validation"
VALIDATION_GLOBAL = "validation_global"
NUM_VALIDATION = "num-validation"  # rows of a client's validation split (weights VALIDATION means)
# Every evaluated kind, and the per-client count that weights its example-weighted mean.
EVAL_KINDS = {
    PERSONALIZED: NUM_EXAMPLES,
    GLOBAL: NUM_EXAMPLES,
    VALIDATION: NUM_VALIDATION,
    VALIDATION_GLOBAL: NUM_VALIDATION,
}
BALANCED_ACCURACY = "balanced_accuracy"  # mean per-class recall over the classes present (classification)
# What one round of local training consumed on a client (train metrics; summary ``cost``).
EXAMPLES_SEEN = "examples_seen"  # rows of the minibatches the algorithm drew
BATCHES_SEEN = "batches_seen"  # minibatches the algorithm drew
# What an evaluate reply may carry: ``<block>.<metric>`` keys (protocol.flatten_eval) with a block
# of EVAL_BLOCKS and a metric of EVAL_METRIC_NAMES; the server rejects any other name. Adding a
# block or a metric is one line here.
EVAL_BLOCKS = tuple(EVAL_KINDS)
EVAL_REQUIRED_BLOCKS = (PERSONALIZED, GLOBAL)  # every evaluate reply has these; the validation blocks are optional
EVAL_METRIC_NAMES = frozenset({EVAL_LOSS, ACCURACY, MCC, BALANCED_ACCURACY, BLEU, ROUGE_L, METEOR, PERPLEXITY})
# Label-prior accuracies beside every result: {client_majority, global_majority}.
BASELINES = "baselines"

# Run-directory contract (docs/DESIGN.md, "Run directory").
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOTS_DIR = "plots"
CHECKPOINTS_DIR = "checkpoints"
AUDIT_DIR = "audit"  # federation.audit_replies: every reply the server received

# Sweep-directory contract: one directory per job holding ``job.json`` (its Hydra overrides and
# status) and either the run-directory files above or ``failed.json``; the report sits beside them.
JOB_FILE = "job.json"
FAILED_FILE = "failed.json"
JOB_LOG_FILE = "job.log"  # a sweep job's whole `flwr run` output, kept in its run directory
REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
