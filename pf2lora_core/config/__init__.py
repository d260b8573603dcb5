"""Configuration: the typed schema (``schema``), Hydra composition and validation (``experiment``), and
the names of record, metric and file keys (``keys``)."""
