"""Test helpers (tiny models, fake sites, run launchers, table parsing), kept apart from the tests."""
