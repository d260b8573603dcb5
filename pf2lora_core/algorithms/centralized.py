"""Centralized LoRA: the reference upper bound for a global model.

All clients' training splits are pooled and one LoRA adapter is trained on them with AdamW, as
if the data had been moved to one place (what federated learning exists to avoid). To run in the
same harness and on the same data split, one node per round trains on the pooled data
(``pooled_training``) for ``local_steps x num_clients`` steps, the federation's total number of
gradient steps per round; every client then evaluates the resulting model on its own test split.
Personalized and global metrics coincide (there is one model).
"""

from __future__ import annotations

from pf2lora_core.algorithms.homlora import HOMLoRA


class CentralizedLoRA(HOMLoRA):
    name = "centralized"
    pooled_training = True
