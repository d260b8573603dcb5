"""PF2LoRA core: two-level LoRA, bilevel solver, algorithms, data, tasks, metrics (no flwr import)."""
