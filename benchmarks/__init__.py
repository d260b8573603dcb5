"""Cost benchmarks measured in one run (not tests): ``python -m benchmarks.step_cost``."""
