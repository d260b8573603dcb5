"""Shared fixtures: tiny models and offline switches."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Property-based fuzzing (tests/fuzz/, issue 27). `make test` runs the bounded, derandomized "ci"
# profile (the same examples every run, so a failure reproduces); HYPOTHESIS_PROFILE=deep runs
# many more random ones on purpose (`make fuzz-deep`). A failing example found once is added as a
# regular test beside the property.
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "deep",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
