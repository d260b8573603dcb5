"""What travels in messages besides the arrays: flat metric names and a JSON details blob.

Flower's MetricRecord holds flat numbers, so nested evaluation results are flattened to
``<kind>.<metric>`` keys here and split back on the server. Pure functions, no flwr import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pf2lora_core.config.keys import GLOBAL, NUM_EXAMPLES, PERSONALIZED

CLIENT_KEY = "client"  # partition id of the replying client, in every MetricRecord
DETAILS_KEY = "details"  # ConfigRecord with one JSON string (rank spectra, histograms)
CONFIG_YAML_KEY = "pf2lora.config"  # resolved experiment config the server sends
RUN_KEY = "pf2lora.run-key"  # identifies the run; keys the clients' private state on disk
TRAINED_BEFORE_KEY = "pf2lora.trained-before"  # last round the server aggregated this client (0 = never)
SEP = "."


def flatten_eval(client: int, num_examples: int, results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{"personalized": {"accuracy": .9}}`` -> ``{"personalized.accuracy": .9, ...}``."""
    flat: dict[str, float] = {CLIENT_KEY: client, NUM_EXAMPLES: num_examples}
    for kind, metrics in results.items():
        for name, value in metrics.items():
            flat[f"{kind}{SEP}{name}"] = float(value)
    return flat


def split_metrics(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_eval`` (client key already removed): kinds become nested dicts."""
    out: dict[str, Any] = {PERSONALIZED: {}, GLOBAL: {}}
    for key, value in flat.items():
        kind, sep, name = key.partition(SEP)
        if sep:
            out.setdefault(kind, {})[name] = value
        else:
            out[key] = value
    return out


def encode_details(details: Mapping[str, Any]) -> str:
    return json.dumps(details, separators=(",", ":"))


def decode_details(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
